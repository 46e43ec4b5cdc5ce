#!/usr/bin/env bash
# Install everything the test bed needs on a fresh Debian 12 (bookworm) x86-64 machine, as root.
# Idempotent: steps whose results already exist are skipped.
#
# Usage: ci/install-deps.sh
# Env:   VHOST_CLONE_CACHE  cache dir for the extracted guest kernel (default /var/cache/vhost-clone)
#
# Results:
#   - apt packages: qemu-system-x86 (bookworm-backports, matches qemu-utils 10.0), qemu-utils, busybox-static,
#     dmsetup, kmod, cpio, xz-utils, build-essential, nbdkit, fio, python3, linux-headers-<KVER>, linux-source-6.1
#   - the Debian kernel image linux-image-<KVER> unpacked (not installed) into $VHOST_CLONE_CACHE/kernel/<KVER>
#   - $VHOST_CLONE_CACHE/kernel.env with KVER, KIMAGE_DIR, KHEADERS (read by ci/build-guest.sh)
set -euo pipefail

CACHE=${VHOST_CLONE_CACHE:-/var/cache/vhost-clone}
export DEBIAN_FRONTEND=noninteractive
APT_OPTS=(-y -q -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold --no-install-recommends)

t_start=$(date +%s.%N)
step_t=$t_start
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }
step() {
    local now; now=$(date +%s.%N)
    echo "[install-deps] $1 (previous step took $(elapsed "$step_t" "$now") s)"
    step_t=$now
}

if [ "$(id -u)" -ne 0 ]; then
    echo "install-deps: must run as root" >&2
    exit 1
fi

have_pkg() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q '^install ok installed$'; }

# --- apt sources: bookworm-backports (for qemu-system-x86 10.0, which coexists with qemu-utils 10.0) ---
BPO_LIST=/etc/apt/sources.list.d/bookworm-backports.list
updated=0
if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
    step "adding bookworm-backports to $BPO_LIST"
    echo 'deb http://deb.debian.org/debian bookworm-backports main' > "$BPO_LIST"
fi

apt_update() {
    if [ "$updated" -eq 0 ]; then
        step "apt-get update"
        apt-get update -q
        updated=1
    fi
}

# --- plain packages ---
PKGS=(busybox-static dmsetup kmod cpio xz-utils build-essential nbdkit fio python3 qemu-utils)
missing=()
for p in "${PKGS[@]}"; do have_pkg "$p" || missing+=("$p"); done
if [ "${#missing[@]}" -gt 0 ]; then
    apt_update
    step "apt-get install ${missing[*]}"
    apt-get install "${APT_OPTS[@]}" "${missing[@]}"
fi

# qemu-system-x86 from backports (bookworm's 7.2 would remove qemu-utils 10.0)
if ! have_pkg qemu-system-x86; then
    apt_update
    step "apt-get install -t bookworm-backports qemu-system-x86"
    apt-get install "${APT_OPTS[@]}" -t bookworm-backports qemu-system-x86
fi

# --- kernel: resolve the current Debian 6.1 ABI from the linux-image-amd64 metapackage ---
resolve_kver() {
    # linux-image-amd64 (bookworm) Depends: linux-image-6.1.0-NN-amd64
    apt-cache depends linux-image-amd64 2>/dev/null \
        | sed -n 's/^ *Depends: linux-image-\([0-9][^ ]*-amd64\)$/\1/p' | head -n1
}
KVER=""
if [ -f "$CACHE/kernel.env" ]; then
    # shellcheck disable=SC1091
    . "$CACHE/kernel.env"
fi
if [ -z "$KVER" ] || [ ! -f "$CACHE/kernel/$KVER/boot/vmlinuz-$KVER" ] || ! have_pkg "linux-headers-$KVER" \
    || ! have_pkg linux-source-6.1; then
    # fresh lists first: stale ones name an ABI whose packages the mirror no longer has
    apt_update
    KVER=$(resolve_kver)
    if [ -z "$KVER" ]; then
        echo "install-deps: cannot resolve the kernel ABI from linux-image-amd64" >&2
        exit 1
    fi
fi
echo "[install-deps] kernel: $KVER"

# Image and headers must come from the same source version.
if ! have_pkg "linux-headers-$KVER" || ! have_pkg linux-source-6.1; then
    apt_update
    step "apt-get install linux-headers-$KVER linux-source-6.1"
    apt-get install "${APT_OPTS[@]}" "linux-headers-$KVER" linux-source-6.1
fi

KIMAGE_DIR=$CACHE/kernel/$KVER
if [ ! -f "$KIMAGE_DIR/boot/vmlinuz-$KVER" ]; then
    apt_update
    step "apt-get download linux-image-$KVER + dpkg -x"
    tmp=$(mktemp -d)
    chmod 0755 "$tmp"; chown _apt "$tmp" 2>/dev/null || true
    (cd "$tmp" && apt-get download -q "linux-image-$KVER")
    deb=$(ls "$tmp"/linux-image-"$KVER"_*.deb)
    # keep the image version equal to the headers version
    img_v=$(dpkg-deb -f "$deb" Version)
    hdr_v=$(dpkg-query -W -f='${Version}' "linux-headers-$KVER")
    if [ "$img_v" != "$hdr_v" ]; then
        echo "install-deps: linux-image-$KVER $img_v != linux-headers-$KVER $hdr_v" >&2
        exit 1
    fi
    rm -rf "$KIMAGE_DIR.tmp"
    mkdir -p "$KIMAGE_DIR.tmp"
    dpkg -x "$deb" "$KIMAGE_DIR.tmp"
    # usrmerge layouts: normalise to lib/modules
    if [ ! -d "$KIMAGE_DIR.tmp/lib/modules" ] && [ -d "$KIMAGE_DIR.tmp/usr/lib/modules" ]; then
        mkdir -p "$KIMAGE_DIR.tmp/lib"
        mv "$KIMAGE_DIR.tmp/usr/lib/modules" "$KIMAGE_DIR.tmp/lib/modules"
    fi
    # the package ships no modules.dep (its postinst runs depmod): build it here
    depmod -b "$KIMAGE_DIR.tmp" "$KVER"
    # vmlinuz is 0600 in the package; make it readable for non-root test runs
    chmod 0644 "$KIMAGE_DIR.tmp/boot/vmlinuz-$KVER"
    rm -rf "$KIMAGE_DIR"
    mv "$KIMAGE_DIR.tmp" "$KIMAGE_DIR"
    rm -rf "$tmp"
fi

if [ ! -f "$KIMAGE_DIR/lib/modules/$KVER/modules.dep" ]; then
    step "depmod -b $KIMAGE_DIR $KVER"
    depmod -b "$KIMAGE_DIR" "$KVER"
fi

KHEADERS=/usr/src/linux-headers-$KVER
if [ ! -f "$KHEADERS/Makefile" ]; then
    echo "install-deps: $KHEADERS/Makefile missing" >&2
    exit 1
fi
if [ ! -f /usr/src/linux-source-6.1.tar.xz ]; then
    echo "install-deps: /usr/src/linux-source-6.1.tar.xz missing" >&2
    exit 1
fi

mkdir -p "$CACHE"
cat > "$CACHE/kernel.env.tmp" <<ENV
KVER=$KVER
KIMAGE_DIR=$KIMAGE_DIR
KHEADERS=$KHEADERS
KSOURCE_TARBALL=/usr/src/linux-source-6.1.tar.xz
ENV
# rewrite only on change: ci/build-guest.sh rebuilds when kernel.env is newer than its outputs
if cmp -s "$CACHE/kernel.env.tmp" "$CACHE/kernel.env"; then
    rm -f "$CACHE/kernel.env.tmp"
else
    mv "$CACHE/kernel.env.tmp" "$CACHE/kernel.env"
fi

step "done"
echo "[install-deps] qemu: $(qemu-system-x86_64 --version | head -n1)"
echo "[install-deps] linux-headers-$KVER $(dpkg-query -W -f='${Version}' "linux-headers-$KVER"), linux-source-6.1 $(dpkg-query -W -f='${Version}' linux-source-6.1)"
echo "[install-deps] total $(elapsed "$t_start" "$(date +%s.%N)") s"
