# Shared defaults for the scripts in this directory (sourced, not run).
# Every variable can be overridden from the environment.
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)
: "${WORK:=/var/lib/vhost-clone/demo}"          # where images, sockets and logs live
: "${VHOST_CLONE:=$root/target/release/vhost-clone}"
[ -x "$VHOST_CLONE" ] || VHOST_CLONE=$root/target/debug/vhost-clone
[ -x "$VHOST_CLONE" ] || VHOST_CLONE=$(command -v vhost-clone || echo vhost-clone)
: "${SRC:=$WORK/source.img}"                    # the archival, read-only image
: "${DEST:=$WORK/dest.img}"                     # the local destination (same size)
: "${META:=$WORK/meta.img}"                     # the dm-clone metadata device (zeroed)
: "${REGION:=8}"                                # region size in 512-byte sectors (8 = 4 KiB)
: "${SOCK:=$WORK/vhost.sock}"                   # vhost-user socket
: "${CTRL:=$WORK/control.sock}"                 # control socket
: "${QUEUES:=2}"                                # virtqueues the guest uses
: "${QUEUE_SIZE:=256}"                          # virtqueue size
: "${CPUS:=2}"                                  # guest vCPUs
: "${MEM_MIB:=1024}"                            # guest memory, MiB (shared with the backend)

die() { echo "$(basename "$0"): $*" >&2; exit 1; }
# Print a command shell-quoted on one line (for --dry-run).
# Plain words are printed as is, anything else with printf %q (so `eval "set -- $line"` re-splits it).
print_cmd() {
    local a out=
    for a in "$@"; do
        if [[ $a =~ ^[A-Za-z0-9_,=:/.@%+-]+$ ]]; then out+="$a "; else out+="$(printf '%q' "$a") "; fi
    done
    echo "${out% }"
}
