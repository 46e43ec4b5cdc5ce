#!/usr/bin/env bash
# Boot a QEMU guest whose disk is the vhost-clone socket (vhost-user-blk-pci). KVM when usable, else TCG.
#
# Usage: qemu.sh [--dry-run] [--kernel F] [--initrd F] [--append S] [--socket SOCK] [--queues N]
#                [--queue-size Q] [--cpus N] [--memory-mib M] [-- extra qemu args]
#   --kernel/--initrd/--append   direct kernel boot (env KERNEL, INITRD, CMDLINE); without --kernel
#                                the firmware boots the vhost-user disk (bootindex=0)
#   --dry-run                    print the command instead of running it
# Env (see common.sh): SOCK QUEUES QUEUE_SIZE CPUS MEM_MIB; QEMU_BIN (default qemu-system-x86_64);
#   ACCEL=kvm|tcg to force the accelerator.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"
dry= kernel=${KERNEL:-} initrd=${INITRD:-} append=${CMDLINE:-console=ttyS0 root=/dev/vda1 rw}
extra=()
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) dry=1; shift ;;
        --kernel) kernel=${2:?}; shift 2 ;;
        --initrd) initrd=${2:?}; shift 2 ;;
        --append) append=${2:?}; shift 2 ;;
        --socket) SOCK=${2:?}; shift 2 ;;
        --queues) QUEUES=${2:?}; shift 2 ;;
        --queue-size) QUEUE_SIZE=${2:?}; shift 2 ;;
        --cpus) CPUS=${2:?}; shift 2 ;;
        --memory-mib) MEM_MIB=${2:?}; shift 2 ;;
        --) shift; extra=("$@"); break ;;
        -h|--help) sed -n '2,11s/^# \{0,1\}//p' "$0"; exit 0 ;;
        *) die "unknown argument $1" ;;
    esac
done
accel=${ACCEL:-}
if [ -z "$accel" ]; then
    # Usable = openable for read/write; a nested host may still fail at boot: then use ACCEL=tcg.
    if [ -r /dev/kvm ] && [ -w /dev/kvm ] && (exec 3<>/dev/kvm) 2>/dev/null; then accel=kvm; else accel=tcg; fi
fi
cpu=max; [ "$accel" != kvm ] || cpu=host
dev="vhost-user-blk-pci,chardev=c0,num-queues=$QUEUES,queue-size=$QUEUE_SIZE"
[ -n "$kernel" ] || dev+=",bootindex=0"
cmd=("${QEMU_BIN:-qemu-system-x86_64}" -machine q35 -accel "$accel" -cpu "$cpu"
     -smp "$CPUS" -m "${MEM_MIB}M"
     # vhost-user needs shared guest memory.
     -object "memory-backend-memfd,id=mem,size=${MEM_MIB}M,share=on" -numa "node,memdev=mem"
     -chardev "socket,id=c0,path=$SOCK" -device "$dev"
     -nographic -serial mon:stdio)
if [ -n "$kernel" ]; then
    cmd+=(-kernel "$kernel" -append "$append")
    [ -z "$initrd" ] || cmd+=(-initrd "$initrd")
fi
cmd+=("${extra[@]}")
if [ -n "$dry" ]; then print_cmd "${cmd[@]}"; exit 0; fi
[ -S "$SOCK" ] || die "no vhost-user socket $SOCK: start serve.sh first"
exec "${cmd[@]}"
