#!/usr/bin/env bash
# Prepare the three devices of a clone: source (archival, read-only), destination, metadata.
#
# Usage: prepare.sh [--make-source SIZE_MIB]
#   --make-source N   create a demo archival image of N MiB of random data at $SRC (else $SRC must exist)
# Env (see common.sh): WORK SRC DEST META REGION
# Creates $DEST (sparse, the size of $SRC) and $META (zeroed; formatted by the daemon on first start,
# exactly as the kernel's dm-clone formats an all-zero metadata device), then prints the table.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"
make_mib=
while [ $# -gt 0 ]; do
    case "$1" in
        --make-source) make_mib=${2:?}; shift 2 ;;
        -h|--help) sed -n '2,9s/^# \{0,1\}//p' "$0"; exit 0 ;;
        *) die "unknown argument $1" ;;
    esac
done
mkdir -p "$WORK"
if [ -n "$make_mib" ]; then
    dd if=/dev/urandom of="$SRC" bs=1M count="$make_mib" conv=fsync status=none
    chmod a-w "$SRC"
fi
[ -e "$SRC" ] || die "no source image $SRC (give --make-source MIB for a demo image)"
size=$(blockdev --getsize64 "$SRC" 2>/dev/null || stat -L -c %s "$SRC")
[ $((size % 512)) -eq 0 ] || die "source size $size is not a multiple of 512"
sectors=$((size / 512))
regions=$(( (sectors + REGION - 1) / REGION ))
# Metadata: superblock, space map, bitset (1 bit per region) and btree nodes; generous 4 MiB floor.
meta_bytes=$(( 4 * 1024 * 1024 + 2 * ((regions + 7) / 8) ))
meta_bytes=$(( (meta_bytes + 4095) / 4096 * 4096 ))
if [ ! -b "$DEST" ]; then rm -f "$DEST"; truncate -s "$size" "$DEST"; fi
if [ ! -b "$META" ]; then rm -f "$META"; truncate -s "$meta_bytes" "$META"; else
    dd if=/dev/zero of="$META" bs=4096 count=1 conv=fsync status=none; fi
echo "source      $SRC ($size bytes, $sectors sectors, $regions regions of $REGION sectors)"
echo "destination $DEST"
echo "metadata    $META ($meta_bytes bytes, zeroed)"
echo "table       0 $sectors clone $META $DEST $SRC $REGION"
