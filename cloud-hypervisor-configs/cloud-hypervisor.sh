#!/usr/bin/env bash
# Boot a cloud-hypervisor guest whose disk is the vhost-clone socket. Needs KVM (/dev/kvm).
#
# Usage: cloud-hypervisor.sh [--dry-run] [--kernel F] [--initramfs F] [--firmware F] [--cmdline S]
#                            [--socket SOCK] [--queues N] [--queue-size Q] [--cpus N] [--memory-mib M]
#                            [--api-socket PATH] [-- extra cloud-hypervisor args]
#   --kernel      PVH-capable kernel (vmlinux) for direct boot          (env KERNEL)
#   --initramfs   initramfs for direct boot                            (env INITRD)
#   --firmware    firmware (rust-hypervisor-fw, CLOUDHV.fd) to boot the disk's own bootloader
#                 instead of --kernel                                  (env FIRMWARE)
#   --cmdline     kernel command line (default: console=ttyS0 root=/dev/vda1 rw)   (env CMDLINE)
#   --dry-run     print the command instead of running it (check-syntax.sh uses this)
# Env (see common.sh): SOCK QUEUES QUEUE_SIZE CPUS MEM_MIB; CH_BIN (default cloud-hypervisor)
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"
dry= kernel=${KERNEL:-} initrd=${INITRD:-} firmware=${FIRMWARE:-} api=${API_SOCKET:-}
cmdline=${CMDLINE:-console=ttyS0 root=/dev/vda1 rw}
extra=()
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) dry=1; shift ;;
        --kernel) kernel=${2:?}; shift 2 ;;
        --initramfs) initrd=${2:?}; shift 2 ;;
        --firmware) firmware=${2:?}; shift 2 ;;
        --cmdline) cmdline=${2:?}; shift 2 ;;
        --socket) SOCK=${2:?}; shift 2 ;;
        --queues) QUEUES=${2:?}; shift 2 ;;
        --queue-size) QUEUE_SIZE=${2:?}; shift 2 ;;
        --cpus) CPUS=${2:?}; shift 2 ;;
        --memory-mib) MEM_MIB=${2:?}; shift 2 ;;
        --api-socket) api=${2:?}; shift 2 ;;
        --) shift; extra=("$@"); break ;;
        -h|--help) sed -n '2,14s/^# \{0,1\}//p' "$0"; exit 0 ;;
        *) die "unknown argument $1" ;;
    esac
done
[ -n "$kernel$firmware" ] || die "give --kernel (direct boot) or --firmware (boot the disk)"
cmd=("${CH_BIN:-cloud-hypervisor}"
     --cpus "boot=$CPUS"
     # vhost-user needs guest memory the backend can map: shared=on.
     --memory "size=${MEM_MIB}M,shared=on")
if [ -n "$kernel" ]; then
    cmd+=(--kernel "$kernel" --cmdline "$cmdline")
    [ -z "$initrd" ] || cmd+=(--initramfs "$initrd")
else
    cmd+=(--firmware "$firmware")
fi
cmd+=(--disk "vhost_user=true,socket=$SOCK,num_queues=$QUEUES,queue_size=$QUEUE_SIZE"
      --serial tty --console off)
[ -z "$api" ] || cmd+=(--api-socket "path=$api")
cmd+=("${extra[@]}")
if [ -n "$dry" ]; then print_cmd "${cmd[@]}"; exit 0; fi
[ -w /dev/kvm ] || die "cloud-hypervisor needs KVM: /dev/kvm is missing or not writable"
[ -S "$SOCK" ] || die "no vhost-user socket $SOCK: start serve.sh first"
exec "${cmd[@]}"
