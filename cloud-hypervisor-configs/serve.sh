#!/usr/bin/env bash
# Start the daemon on the prepared devices (foreground; Ctrl-C or SIGTERM flushes and commits).
#
# Usage: serve.sh [--dry-run] [extra vhost-clone serve flags, e.g. --on-hydrated linear]
# Env (see common.sh): VHOST_CLONE SRC DEST META REGION SOCK CTRL QUEUES QUEUE_SIZE
#   FEATURES   dm-clone feature args, e.g. "no_hydration" or "no_discard_passdown" (default none)
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"
dry=
[ "${1:-}" != --dry-run ] || { dry=1; shift; }
table="clone $META $DEST $SRC $REGION"
if [ -n "${FEATURES:-}" ]; then
    read -r -a feats <<< "$FEATURES"
    table+=" ${#feats[@]} $FEATURES"
fi
# The guest may ask for up to one queue per vCPU; offer at least that many.
nq=$QUEUES; [ "$nq" -ge "$CPUS" ] || nq=$CPUS
cmd=("$VHOST_CLONE" serve --socket "$SOCK" --control "$CTRL" --table "$table"
     --num-queues "$nq" --queue-size "$QUEUE_SIZE" "$@")
if [ -n "$dry" ]; then print_cmd "${cmd[@]}"; exit 0; fi
exec "${cmd[@]}"
