#!/usr/bin/env bash
# Build the tiny test guest: Debian kernel + busybox initramfs with virtio/dm modules, dmsetup, and the
# kernel's dm-clone.ko built out of tree (Debian ships CONFIG_DM_CLONE unset).
#
# Usage: ci/build-guest.sh [--force] [OUTDIR]      (OUTDIR default: target/guest, relative to the repo root,
#                                                    or $CARGO_TARGET_DIR/guest when that is set)
# Needs: ci/install-deps.sh done (reads $VHOST_CLONE_CACHE/kernel.env, default /var/cache/vhost-clone).
# Outputs in OUTDIR: vmlinuz, vmlinux (same kernel, unpacked ELF for PVH boot: faster under TCG), initramfs.cpio.gz,
# dm-clone.ko, kernel.release, modules.order (guest load order).
# Skips the build when every output is newer than this script and kernel.env (pass --force to rebuild).
#
# Guest contract (implemented by /init, see ci/guest-init.sh):
#   - kernel cmdline vhc.ndisks=N: wait until N virtio disks are present (10 s max);
#   - every virtio disk with a serial gets /dev/disk/by-serial/SERIAL and $DISK_<serial> (non [A-Za-z0-9_]
#     characters become _); vhost-user-blk disks (PCI slot 0x08+i, placed by ci/run-guest.sh) get
#     /dev/disk/vhostI and $DISK_vhostI, and the list $VHOST_DISKS;
#   - the script is read from the disk with serial "plan" (vhc.plan=SERIAL to change) or the path in
#     vhc.script=PATH, run with sh, its output on the serial console; then "GUEST_EXIT=<rc>", poweroff -f.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)
force=0
if [ "${1:-}" = "--force" ]; then force=1; shift; fi
if [ -n "${1:-}" ]; then
    out=$1
elif [ -n "${CARGO_TARGET_DIR:-}" ]; then
    out=$CARGO_TARGET_DIR/guest
else
    out=$root/target/guest
fi
CACHE=${VHOST_CLONE_CACHE:-/var/cache/vhost-clone}
t0=$(date +%s.%N)
elapsed() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }
log() { echo "[build-guest] $*"; }

if [ ! -f "$CACHE/kernel.env" ]; then
    echo "build-guest: $CACHE/kernel.env missing: run ci/install-deps.sh first" >&2
    exit 1
fi
# shellcheck disable=SC1091
. "$CACHE/kernel.env"
: "${KVER:?}" "${KIMAGE_DIR:?}" "${KHEADERS:?}" "${KSOURCE_TARBALL:?}"
MODDIR=$KIMAGE_DIR/lib/modules/$KVER

outputs=(vmlinuz initramfs.cpio.gz dm-clone.ko kernel.release)
if [ "$force" -eq 0 ] && [ -f "$out/kernel.release" ] && [ "$(cat "$out/kernel.release")" = "$KVER" ]; then
    fresh=1
    for f in "${outputs[@]}"; do
        for dep in "$0" "$here/guest-init.sh" "$CACHE/kernel.env"; do
            if [ ! -f "$out/$f" ] || [ ! "$out/$f" -nt "$dep" ]; then fresh=0; fi
        done
    done
    if [ "$fresh" -eq 1 ]; then
        log "up to date in $out (kernel $KVER); --force to rebuild"
        exit 0
    fi
fi

mkdir -p "$out"
work=$(mktemp -d "${TMPDIR:-/tmp}/build-guest.XXXXXX")
trap 'rm -rf "$work"' EXIT

# --- 1. dm-clone.ko, out of tree ---
t=$(date +%s.%N)
src=$work/dm-clone
mkdir -p "$src"
# the few sources needed, cached per linux-source version (unpacking the 140 MB tarball takes 15-40 s)
srcver=$(dpkg-query -W -f='${Version}' linux-source-6.1 2>/dev/null || stat -c %Y "$KSOURCE_TARBALL")
srccache=$CACHE/dm-clone-src/$srcver
if [ -f "$srccache/dm-clone-target.c" ]; then
    cp -r "$srccache/." "$src/"
else
    tar -xJf "$KSOURCE_TARBALL" -C "$src" --strip-components=3 --wildcards \
        'linux-source-6.1/drivers/md/dm-clone-target.c' \
        'linux-source-6.1/drivers/md/dm-clone-metadata.c' \
        'linux-source-6.1/drivers/md/dm-clone-metadata.h' \
        'linux-source-6.1/drivers/md/dm.h' \
        'linux-source-6.1/drivers/md/dm-stats.h' \
        'linux-source-6.1/drivers/md/persistent-data/*.h'
    if mkdir -p "$srccache.tmp" 2>/dev/null && cp -r "$src/." "$srccache.tmp/"; then
        rm -rf "$srccache" && mv "$srccache.tmp" "$srccache"
    else
        rm -rf "$srccache.tmp"
    fi
fi
cat > "$src/Kbuild" <<'KB'
obj-m := dm-clone.o
dm-clone-y := dm-clone-target.o dm-clone-metadata.o
KB
make -s -C "$KHEADERS" M="$src" modules >"$work/kbuild.log" 2>&1 || { cat "$work/kbuild.log" >&2; exit 1; }
strip --strip-debug "$src/dm-clone.ko"
cp "$src/dm-clone.ko" "$out/dm-clone.ko.tmp"
log "dm-clone.ko built ($(elapsed "$t") s)"

# --- 2. modules, in load order, with their modules.dep dependencies first ---
WANT=(virtio_pci_legacy_dev virtio_pci_modern_dev virtio_ring virtio virtio_pci virtio_blk
      crc32c_generic crc32c-intel libcrc32c dm-mod dm-bufio dm-persistent-data qemu_fw_cfg)
declare -A seen=()
order=()
mod_path() { # module name -> path relative to MODDIR ("-" and "_" are equivalent)
    local alt=${1//-/_} p
    p=$(awk -F: -v a="$1" -v b="$alt" '{ n = $1; sub(/.*\//, "", n); sub(/\.ko(\.[gx]z|\.zst)?$/, "", n);
         m = n; gsub(/-/, "_", m); if (n == a || m == b) { print $1; exit } }' "$MODDIR/modules.dep")
    [ -n "$p" ] || { echo "build-guest: module $1 not in $MODDIR/modules.dep" >&2; return 1; }
    echo "$p"
}
add_mod() { # add_mod RELPATH: its deps (deepest first), then itself
    local rel=$1 deps d i
    [ -z "${seen[$rel]:-}" ] || return 0
    deps=$(awk -F': *' -v r="$rel" '$1 == r { print $2; exit }' "$MODDIR/modules.dep")
    # shellcheck disable=SC2206
    local arr=($deps)
    for ((i = ${#arr[@]} - 1; i >= 0; i--)); do
        d=${arr[$i]}
        add_mod "$d"
    done
    seen[$rel]=1
    order+=("$rel")
}
for m in "${WANT[@]}"; do add_mod "$(mod_path "$m")"; done

# --- 3. initramfs tree ---
t=$(date +%s.%N)
ir=$work/initramfs
mkdir -p "$ir"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,tmp,run,etc,lib/modules}
cp /bin/busybox "$ir/bin/busybox"
for a in $("$ir/bin/busybox" --list); do
    [ -e "$ir/bin/$a" ] || ln -s busybox "$ir/bin/$a"
done
: > "$ir/lib/modules/load.order"
for rel in "${order[@]}"; do
    f=$MODDIR/$rel
    base=$(basename "$rel")
    case "$base" in
        *.ko.xz) xz -dc "$f" > "$ir/lib/modules/${base%.xz}"; base=${base%.xz} ;;
        *.ko.zst) zstd -qdc "$f" > "$ir/lib/modules/${base%.zst}"; base=${base%.zst} ;;
        *.ko.gz) gzip -dc "$f" > "$ir/lib/modules/${base%.gz}"; base=${base%.gz} ;;
        *) cp "$f" "$ir/lib/modules/$base" ;;
    esac
    echo "$base" >> "$ir/lib/modules/load.order"
done
cp "$out/dm-clone.ko.tmp" "$ir/lib/modules/dm-clone.ko"
echo dm-clone.ko >> "$ir/lib/modules/load.order"

# dmsetup and its shared libraries (ldd), at their host paths
copy_bin() {
    local b=$1 lib
    mkdir -p "$ir$(dirname "$b")"
    cp -L "$b" "$ir$b"
    for lib in $(ldd "$b" | awk '/=> \// { print $3 } /^[ \t]*\// { print $1 }'); do
        [ -e "$ir$lib" ] && continue
        mkdir -p "$ir$(dirname "$lib")"
        cp -L "$lib" "$ir$lib"
    done
}
copy_bin "$(command -v dmsetup)"
if [ "$(command -v dmsetup)" != /sbin/dmsetup ]; then ln -sf "$(command -v dmsetup)" "$ir/sbin/dmsetup"; fi
mknod -m 600 "$ir/dev/console" c 5 1 2>/dev/null || true
mknod -m 666 "$ir/dev/null" c 1 3 2>/dev/null || true
install -m 0755 "$here/guest-init.sh" "$ir/init"
echo "$KVER" > "$ir/etc/kernel.release"

(cd "$ir" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --quiet --owner=0:0) \
    | gzip -1 > "$out/initramfs.cpio.gz.tmp"
log "initramfs: ${#order[@]} modules + dm-clone.ko, dmsetup, busybox ($(elapsed "$t") s)"

cp "$KIMAGE_DIR/boot/vmlinuz-$KVER" "$out/vmlinuz.tmp"
# vmlinux: the kernel ELF unpacked from the bzImage. QEMU boots it through its PVH entry point, which skips
# the in-guest xz decompression (several seconds under TCG). ci/run-guest.sh prefers it when present.
t=$(date +%s.%N)
rm -f "$out/vmlinux"
if python3 - "$out/vmlinuz.tmp" "$out/vmlinux.tmp" <<'PY'
import lzma, sys
data = open(sys.argv[1], "rb").read()
start = data.find(b"\xfd7zXZ\x00")
if start < 0:
    sys.exit(1)
elf = lzma.LZMADecompressor().decompress(data[start:])
if elf[:4] != b"\x7fELF":
    sys.exit(1)
open(sys.argv[2], "wb").write(elf)
PY
then
    # XEN_ELFNOTE_PHYS32_ENTRY (type 0x12) is the PVH entry QEMU needs
    if readelf -n "$out/vmlinux.tmp" 2>/dev/null | grep -q '0x00000012'; then
        mv "$out/vmlinux.tmp" "$out/vmlinux"
        log "vmlinux (PVH) unpacked ($(elapsed "$t") s)"
    fi
fi
rm -f "$out/vmlinux.tmp"
cp "$ir/lib/modules/load.order" "$out/modules.order"
mv "$out/dm-clone.ko.tmp" "$out/dm-clone.ko"
mv "$out/vmlinuz.tmp" "$out/vmlinuz"
mv "$out/initramfs.cpio.gz.tmp" "$out/initramfs.cpio.gz"
echo "$KVER" > "$out/kernel.release"
log "done: $out (kernel $KVER, initramfs $(du -k "$out/initramfs.cpio.gz" | cut -f1) KiB) in $(elapsed "$t0") s"
