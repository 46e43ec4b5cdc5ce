#!/usr/bin/env bash
# Boot the test guest under TCG, run one script in it, exit with the script's status.
#
# Usage: ci/run-guest.sh --script FILE [options]
#   --script FILE                 shell script run by the guest (busybox sh) - attached as a raw disk, serial "plan"
#   --disk FILE,serial=NAME[,ro][,cache=writeback|none|unsafe]
#                                 raw virtio-blk-pci disk (repeatable); in the guest: /dev/disk/by-serial/NAME, $DISK_NAME
#   --vhost-user SOCK[,num-queues=N]
#                                 vhost-user-blk-pci disk on a unix socket (repeatable, max 8; N default 2); in the
#                                 guest: /dev/disk/vhostI and $DISK_vhostI (I = 0,1,.. in command-line order), $VHOST_DISKS
#   --timeout SECS                kill QEMU after SECS (default 300)
#   --guest-dir DIR               vmlinuz + initramfs.cpio.gz (default $CARGO_TARGET_DIR/guest or target/guest)
#   --kernel FILE                 kernel to boot (default: GUEST_DIR/vmlinux (PVH ELF) if present, else GUEST_DIR/vmlinuz)
#   --mem MIB                     guest memory (default 1024)   --smp N   vCPUs (default 1)
#   --append ARGS                 extra kernel command line
#   --log FILE                    also write the (CR-stripped) console log to FILE
# Output: the guest console on stdout (lines the guest prints: GUEST_DISK ..., the script's own output,
# GUEST_EXIT=<rc>); "RUN_GUEST ..." summary on stderr.
# Exit status: the script's status; 124 timeout; 125 the guest ended without GUEST_EXIT; 2 usage error.
# Env: QEMU_CPU (-cpu, default max), QEMU_BIOS (-bios FILE, e.g. /usr/share/qemu/qboot.rom; default SeaBIOS),
#      GUEST_QUIET (replaces "quiet" on the kernel command line; GUEST_QUIET=" " shows the boot log).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)
usage() { sed -n '2,24s/^# \{0,1\}//p' "${BASH_SOURCE[0]}" >&2; exit 2; }

script= timeout_s=300 mem=1024 smp=1 append= logfile= kernel=
guest_dir=${CARGO_TARGET_DIR:-$root/target}/guest
disks=() vhosts=()
while [ $# -gt 0 ]; do
    case "$1" in
        --script) script=${2:?}; shift 2 ;;
        --disk) disks+=("${2:?}"); shift 2 ;;
        --vhost-user) vhosts+=("${2:?}"); shift 2 ;;
        --timeout) timeout_s=${2:?}; shift 2 ;;
        --guest-dir) guest_dir=${2:?}; shift 2 ;;
        --kernel) kernel=${2:?}; shift 2 ;;
        --mem) mem=${2:?}; shift 2 ;;
        --smp) smp=${2:?}; shift 2 ;;
        --append) append=${2:?}; shift 2 ;;
        --log) logfile=${2:?}; shift 2 ;;
        -h|--help) usage ;;
        *) echo "run-guest: unknown argument $1" >&2; usage ;;
    esac
done
[ -n "$script" ] || { echo "run-guest: --script is required" >&2; usage; }
[ -f "$script" ] || { echo "run-guest: no script $script" >&2; exit 2; }
for f in vmlinuz initramfs.cpio.gz; do
    [ -f "$guest_dir/$f" ] || { echo "run-guest: $guest_dir/$f missing: run ci/build-guest.sh" >&2; exit 2; }
done
if [ -z "$kernel" ]; then
    kernel=$guest_dir/vmlinuz
    [ ! -f "$guest_dir/vmlinux" ] || kernel=$guest_dir/vmlinux
fi
[ -f "$kernel" ] || { echo "run-guest: no kernel $kernel" >&2; exit 2; }
[ "${#vhosts[@]}" -le 8 ] || { echo "run-guest: at most 8 --vhost-user" >&2; exit 2; }
[ "${#disks[@]}" -le 14 ] || { echo "run-guest: at most 14 --disk" >&2; exit 2; }

tmp=$(mktemp -d "${TMPDIR:-/tmp}/run-guest.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

# plan disk: the script, padded with newlines to a 4 KiB multiple (64 KiB at least)
plan=$tmp/plan.img
cp "$script" "$plan"
printf '\n' >> "$plan"
size=$(stat -c %s "$plan")
want=$(( (size + 4095) / 4096 * 4096 ))
# at least 64 KiB: the kernel's partition probes (Amiga RDB) read the first 16 sectors
[ "$want" -ge 65536 ] || want=65536
pad=$(( want - size ))
if [ "$pad" -gt 0 ]; then head -c "$pad" /dev/zero | tr '\0' '\n' >> "$plan"; fi

args=(-machine q35 -accel tcg -cpu ${QEMU_CPU:-max} -m "$mem" -smp "$smp"
      -nodefaults -nographic -serial stdio -monitor none -no-reboot ${QEMU_BIOS:+-bios "$QEMU_BIOS"}
      -kernel "$kernel" -initrd "$guest_dir/initramfs.cpio.gz")
# fixed PCI slots: plan 0x07, vhost-user 0x08+i (the guest recognises them by slot), plain disks 0x10+i
args+=(-drive "file=$plan,if=none,format=raw,id=plan,readonly=on"
       -device "virtio-blk-pci,drive=plan,serial=plan,addr=0x07")
i=0
for spec in "${disks[@]}"; do
    IFS=, read -r -a parts <<< "$spec"
    file=${parts[0]} serial= ro=off cache=writeback
    for p in "${parts[@]:1}"; do
        case "$p" in
            serial=*) serial=${p#serial=} ;;
            ro|readonly|readonly=on) ro=on ;;
            cache=*) cache=${p#cache=} ;;
            *) echo "run-guest: bad --disk option $p" >&2; exit 2 ;;
        esac
    done
    [ -n "$serial" ] || { echo "run-guest: --disk $spec needs serial=NAME" >&2; exit 2; }
    [ -f "$file" ] || [ -b "$file" ] || { echo "run-guest: no disk file $file" >&2; exit 2; }
    args+=(-drive "file=$file,if=none,format=raw,id=d$i,cache=$cache,readonly=$ro"
           -device "virtio-blk-pci,drive=d$i,serial=$serial,addr=$(printf '0x%02x' $((0x10 + i)))")
    i=$((i + 1))
done
if [ "${#vhosts[@]}" -gt 0 ]; then
    # vhost-user needs guest memory the backend can map
    args+=(-object "memory-backend-memfd,id=mem,size=${mem}M,share=on" -numa node,memdev=mem)
fi
j=0
for spec in "${vhosts[@]}"; do
    IFS=, read -r -a parts <<< "$spec"
    sock=${parts[0]} nq=2
    for p in "${parts[@]:1}"; do
        case "$p" in
            num-queues=*) nq=${p#num-queues=} ;;
            *) echo "run-guest: bad --vhost-user option $p" >&2; exit 2 ;;
        esac
    done
    [ -S "$sock" ] || { echo "run-guest: $sock is not a socket" >&2; exit 2; }
    args+=(-chardev "socket,id=c$j,path=$sock"
           -device "vhost-user-blk-pci,chardev=c$j,num-queues=$nq,addr=$(printf '0x%02x' $((0x08 + j)))")
    j=$((j + 1))
done
ndisks=$((1 + i + j))
args+=(-append "console=ttyS0 ${GUEST_QUIET-quiet} panic=-1 vhc.ndisks=$ndisks $append")

log=$tmp/console.log
t0=$(date +%s.%N)
set +e
timeout --kill-after=5 "$timeout_s" qemu-system-x86_64 "${args[@]}" </dev/null 2>&1 | tr -d '\r' | tee "$log"
statuses=("${PIPESTATUS[@]}")
set -e
wall=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.2f", b - a }')
qrc=${statuses[0]}
[ -z "$logfile" ] || cp "$log" "$logfile"

rc=$(sed -n 's/^GUEST_EXIT=\([0-9][0-9]*\).*/\1/p' "$log" | tail -n1)
if [ "$qrc" -eq 124 ] || [ "$qrc" -eq 137 ]; then
    echo "RUN_GUEST timeout after ${timeout_s}s wall=${wall}s" >&2
    exit 124
fi
if [ -z "$rc" ]; then
    echo "RUN_GUEST no GUEST_EXIT line (qemu status $qrc) wall=${wall}s" >&2
    exit 125
fi
echo "RUN_GUEST exit=$rc qemu=$qrc wall=${wall}s" >&2
exit "$rc"
