#!/usr/bin/env bash
# Static check of the launch scripts (no VM is started; cloud-hypervisor needs KVM and is not
# installed on CI machines). For several configurations, run cloud-hypervisor.sh --dry-run and check
# every option, and every key of the key=value lists of --disk/--memory/--cpus/..., against
# ch-options.txt (taken from cloud-hypervisor's documented CLI); toggles must be on|off|true|false.
# If a cloud-hypervisor binary is on PATH, its --help must also list every option used.
# If qemu-system-x86_64 is on PATH, qemu.sh --dry-run's vhost-user-blk-pci properties are checked
# against `-device vhost-user-blk-pci,help`.
#
# Usage: check-syntax.sh            exit 0 when everything checks, 1 with one line per problem
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
spec=$here/ch-options.txt
fail=0
problem() { echo "check-syntax: $*" >&2; fail=1; }

declare -A keys=() toggles=()
while read -r opt rest; do
    case "$opt" in ''|'#'*) continue ;; esac
    if [ "$opt" = toggle ]; then for k in $rest; do toggles[$k]=1; done; continue; fi
    keys[$opt]=" $rest "
done < "$spec"

check_ch() {
    local line=$1 label=$2 opt val kv k v
    eval "set -- $line"   # the line was printed with printf %q: safe to re-split
    shift                 # the binary
    local joined=" $* "
    while [ $# -gt 0 ]; do
        opt=$1; shift
        [ -n "${keys[$opt]+x}" ] || { problem "$label: unknown cloud-hypervisor option $opt"; continue; }
        [ "$opt" != -v ] || continue
        [ $# -gt 0 ] || { problem "$label: $opt needs a value"; break; }
        val=$1; shift
        [ "${keys[$opt]}" != "  " ] || continue   # plain value
        IFS=, read -r -a kvs <<< "$val"
        for kv in "${kvs[@]}"; do
            k=${kv%%=*}; v=${kv#*=}
            [ "$kv" != "$k" ] || { [ "$opt" = --console ] || [ "$opt" = --serial ] || problem "$label: $opt: '$kv' is not key=value"; k=$kv; }
            case "${keys[$opt]}" in *" $k "*) ;; *) problem "$label: $opt: unknown key '$k'" ;; esac
            if [ -n "${toggles[$k]+x}" ] && [ "$kv" != "$k" ]; then
                case "$v" in on|off|true|false) ;; *) problem "$label: $opt: $k=$v is not on|off|true|false" ;; esac
            fi
        done
    done
    case "$joined" in *" --disk vhost_user=true,socket="*) ;; *) problem "$label: no vhost-user --disk" ;; esac
    case "$joined" in *" --memory size="*",shared=on "*) ;; *) problem "$label: --memory lacks shared=on (vhost-user needs it)" ;; esac
    if command -v "${CH_BIN:-cloud-hypervisor}" >/dev/null; then
        local help; help=$("${CH_BIN:-cloud-hypervisor}" --help 2>&1 || true)
        eval "set -- $line"; shift
        for opt in "$@"; do
            case "$opt" in --*) grep -q -- "$opt" <<< "$help" || problem "$label: $opt not in cloud-hypervisor --help" ;; esac
        done
    fi
}

export SOCK=/run/vhost-clone/vm0.sock QUEUES=4 QUEUE_SIZE=128 CPUS=4 MEM_MIB=2048
n=0
while IFS= read -r args; do
    n=$((n + 1))
    # shellcheck disable=SC2086
    line=$("$here/cloud-hypervisor.sh" --dry-run $args) || { problem "config $n ($args): script failed"; continue; }
    echo "config $n: $line"
    check_ch "$line" "config $n"
done <<'CONFIGS'
--kernel /boot/vmlinux
--kernel /boot/vmlinux --initramfs /boot/initrd.img --cmdline console=hvc0 --api-socket /run/ch.sock
--firmware /usr/share/cloud-hypervisor/CLOUDHV.fd --queues 1 --queue-size 256 --cpus 1
CONFIGS

# A deliberately wrong line must be caught (the checker checks itself).
saved=$fail
check_ch "cloud-hypervisor --cpus boot=1 --memory size=1G,shared=maybe --disk vhost_user=true,socket=/s,num_queue=2 --bogus x" selftest 2>/dev/null
[ "$fail" = 1 ] || { echo "check-syntax: self-test did not detect errors" >&2; exit 1; }
fail=$saved

if command -v "${QEMU_BIN:-qemu-system-x86_64}" >/dev/null; then
    props=$("${QEMU_BIN:-qemu-system-x86_64}" -device vhost-user-blk-pci,help 2>&1 || true)
    line=$(ACCEL=tcg "$here/qemu.sh" --dry-run --kernel /boot/vmlinuz)
    echo "qemu: $line"
    dev=$(eval "set -- $line"; while [ $# -gt 0 ]; do [ "$1" != -device ] || { echo "$2"; break; }; shift; done)
    IFS=, read -r -a kvs <<< "${dev#vhost-user-blk-pci,}"
    for kv in "${kvs[@]}"; do
        k=${kv%%=*}
        grep -qE "^ *$k=" <<< "$props" || problem "qemu: vhost-user-blk-pci has no property '$k'"
    done
fi
[ "$fail" = 0 ] && echo "check-syntax: ok"
exit "$fail"
