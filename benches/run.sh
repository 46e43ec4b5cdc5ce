#!/usr/bin/env bash
# vhost-clone benchmark harness (issue 6): fio vs qemu-storage-daemon vs vhost-clone, one run,
# same files, same libblkio client for every vhost-user-blk server.
#
#   benches/run.sh            full run (3 runs per point, ~10 min; --runs 5 --runtime 1.5: ~12 min)
#   benches/run.sh --quick    smoke (1 run, 1 s per point, ~3 min)
#   benches/run.sh --servers fio,qsd --phases matrix     subsets; see --help
#
# Results: target/bench/results.md and target/bench/results.json (override with --dir).
# Needs: fio (apt-get install -y fio), qemu-storage-daemon + qemu-img (qemu-utils), python3.
set -euo pipefail
cd "$(dirname "$0")/.."

command -v fio >/dev/null || { echo "fio missing: apt-get install -y fio" >&2; exit 1; }
command -v qemu-storage-daemon >/dev/null || { echo "qemu-storage-daemon missing (qemu-utils)" >&2; exit 1; }

# The load generator (cargo bench target, harness = false) in the release (bench) profile.
BENCH_BIN=$(cargo bench --bench vhost_bench --no-run --message-format=json 2>/dev/null \
  | python3 -c 'import json,sys
for l in sys.stdin:
    try: j=json.loads(l)
    except Exception: continue
    if j.get("reason")=="compiler-artifact" and j["target"]["name"]=="vhost_bench" and j.get("executable"): print(j["executable"])' \
  | tail -n1)
[ -n "$BENCH_BIN" ] || { cargo bench --bench vhost_bench --no-run; echo "could not build vhost_bench" >&2; exit 1; }

# Our daemon: rows are "n/a" when it does not build yet.
if [ -z "${VHOST_CLONE:-}" ]; then
  if cargo build --release --bin vhost-clone >/dev/null 2>target/bench-daemon-build.log; then
    VHOST_CLONE=target/release/vhost-clone
  else
    echo "vhost-clone does not build (see target/bench-daemon-build.log): our rows will be n/a" >&2
    VHOST_CLONE=/nonexistent/vhost-clone
  fi
fi

exec python3 benches/driver.py --bench-bin "$BENCH_BIN" --daemon "$VHOST_CLONE" "$@"
