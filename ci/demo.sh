#!/usr/bin/env bash
# The main job on a demo: generate an "archival" image, clone it with vhost-clone, serve the
# clone on a vhost-user socket, and print how to attach QEMU or a libblkio client and how to
# watch hydration. Works on a fresh Debian 12 machine as root (installs what it needs).
#
# Usage: ci/demo.sh [--size MiB] [--dir DIR] [--no-install] [--foreground]
#   --foreground  keep serving until Ctrl-C (default: show the clone working for a few
#                 seconds: read it, hydrate it, switch to linear, then stop)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
size=256 dir=target/demo install=1 foreground=0
while [ $# -gt 0 ]; do
    case $1 in
        --size) size=$2; shift 2 ;;
        --dir) dir=$2; shift 2 ;;
        --no-install) install=0; shift ;;
        --foreground) foreground=1; shift ;;
        *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
done
if ! command -v cargo >/dev/null 2>&1 && [ -f "$HOME/.cargo/env" ]; then
    . "$HOME/.cargo/env"
fi
if [ "$install" = 1 ] && [ "$(id -u)" = 0 ] && ! command -v qemu-img >/dev/null 2>&1; then
    apt-get update -qq && apt-get install -y -qq qemu-utils >/dev/null
fi
cargo build --release --quiet
bin=$PWD/target/release/vhost-clone
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
src=$dir/archive.img dest=$dir/dest.img meta=$dir/meta.img
sock=$dir/vhost.sock ctl=$dir/ctl.sock

echo "== generating a ${size} MiB archival image (random data) at $src"
dd if=/dev/urandom of="$src" bs=1M count="$size" status=none conv=fsync
truncate -s 0 "$dest" "$meta"
truncate -s "${size}M" "$dest"
truncate -s 8M "$meta"

table="clone $meta $dest $src 8 1 no_hydration 4 hydration_threshold 64 hydration_batch_size 16"
echo "== serving: vhost-clone serve --socket $sock --control $ctl --table \"$table\" --on-hydrated linear"
"$bin" serve --socket "$sock" --control "$ctl" --table "$table" --on-hydrated linear --num-queues 4 &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null' EXIT
for _ in $(seq 100); do [ -S "$ctl" ] && [ -S "$sock" ] && break; sleep 0.05; done

cat <<EOT

The clone is being served on $sock. Attach a guest:
  QEMU:   qemu-system-x86_64 -machine q35 -m 1G \\
            -object memory-backend-memfd,id=mem,size=1G,share=on -numa node,memdev=mem \\
            -chardev socket,id=c0,path=$sock -device vhost-user-blk-pci,chardev=c0,num-queues=4 ...
  cloud-hypervisor: --memory size=1G,shared=on --disk vhost_user=true,socket=$sock,num_queues=4
  libblkio: driver "virtio-blk-vhost-user", path=$sock
Watch and steer it:
  $bin status --control $ctl [--json]
  $bin events --control $ctl
  $bin message --control $ctl enable_hydration
  $bin table --control $ctl --dmsetup

EOT
echo "== status: $("$bin" status --control "$ctl")"
if [ "$foreground" = 1 ]; then
    echo "serving until Ctrl-C"
    wait $pid
    exit 0
fi
echo "== enabling background hydration"
"$bin" message --control "$ctl" enable_hydration
t0=$(date +%s.%N)
while ! "$bin" table --control "$ctl" | grep -q ' linear '; do
    sleep 0.2
    "$bin" status --control "$ctl" --json | python3 -c 'import json,sys; s=json.load(sys.stdin); print("   %(hydrated_regions)d/%(nr_regions)d regions, %(progress_percent).1f %%" % s)' 2>/dev/null || true
done
t1=$(date +%s.%N)
echo "== hydrated and switched to linear in $(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.1f", b-a}') s: table is now: $("$bin" table --control "$ctl")"
kill "$pid"; wait "$pid" || true
trap - EXIT
if cmp -s "$src" "$dest"; then
    echo "== the destination is byte-identical to the archive; the metadata device can be retired:"
else
    echo "!! destination differs from the archive" >&2
    exit 1
fi
"$bin" metadata dump "$meta" | tail -3
