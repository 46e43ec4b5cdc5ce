#!/usr/bin/env python3
"""Paired A/B of vhost-user-blk servers: every server is up at once, the load generator runs one
short slice against each in turn (rotating order), and the report gives each server's median
and the median over rounds of its IOPS over the first server's (measured back to back).

  benches/ab.py --bench-bin target/release/deps/vhost_bench-HASH \\
      --cfg off=target/release/vhost-clone,--poll-us,0 \\
      --cfg on=target/release/vhost-clone,--poll-us,64 --qsd --qd 1 --queues 1

`--cfg NAME=BINARY[,ARG...]` starts `BINARY serve --socket S --table "linear IMG 0"
--num-queues 4 ARG...`; `--qsd` adds qemu-storage-daemon on the same image. The image is
DIR/img.raw (1 GiB, as benches/run.sh writes it).
"""

import argparse
import json
import os
import signal
import statistics
import subprocess
import time


def start(cmd, sock, log):
    if os.path.exists(sock):
        os.unlink(sock)
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
    for _ in range(500):
        if os.path.exists(sock):
            time.sleep(0.1)
            return p
        if p.poll() is not None:
            raise SystemExit(f"{cmd[0]} exited with {p.returncode}")
        time.sleep(0.02)
    raise SystemExit(f"no socket {sock}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bench-bin", required=True)
    ap.add_argument("--dir", default="target/bench")
    ap.add_argument("--cfg", action="append", default=[])
    ap.add_argument("--qsd", action="store_true")
    ap.add_argument("--pattern", default="randread")
    ap.add_argument("--bs", type=int, default=4096)
    ap.add_argument("--qd", type=int, default=1)
    ap.add_argument("--poll", action="store_true", help="the client busy-polls (libblkio poll queues)")
    ap.add_argument("--queues", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--runtime", type=float, default=0.6)
    ap.add_argument("--ramp", type=float, default=0.1)
    a = ap.parse_args()
    d = os.path.abspath(a.dir)
    img = os.path.join(d, "img.raw")
    cfgs = []
    for i, c in enumerate(a.cfg):
        name, _, rest = c.partition("=")
        binary, *args = rest.split(",")
        sock = os.path.join(d, f"ab{i}.sock")
        cfgs.append((name, sock, [binary, "serve", "--socket", sock, "--table", f"linear {img} 0",
                                  "--num-queues", "4", *args]))
    if a.qsd:
        sock = os.path.join(d, "abq.sock")
        cfgs.append(("qsd", sock, [
            "qemu-storage-daemon", "--blockdev",
            f"driver=file,node-name=f0,filename={img},cache.direct=on,aio=io_uring", "--export",
            f"type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path={sock},"
            "writable=on,num-queues=4"]))
    if not cfgs:
        raise SystemExit("give at least one --cfg or --qsd")
    with open(os.path.join(d, "ab.log"), "ab") as log:
        procs = [start(cmd, sock, log) for _, sock, cmd in cfgs]
        res = {n: [] for n, _, _ in cfgs}
        try:
            for r in range(a.rounds):
                k = r % len(cfgs)
                for name, sock, _ in cfgs[k:] + cfgs[:k]:
                    out = subprocess.run(
                        [a.bench_bin, "--socket", sock, "--pattern", a.pattern, "--bs",
                         str(a.bs), "--qd", str(a.qd), "--queues", str(a.queues), "--runtime",
                         str(a.runtime), "--ramp", str(a.ramp), "--json"]
                        + (["--poll"] if a.poll else []),
                        capture_output=True, text=True, check=True)
                    res[name].append(json.loads(out.stdout.strip().splitlines()[-1])["iops"])
        finally:
            for p in procs:
                p.send_signal(signal.SIGTERM)
                p.wait(10)
    base = cfgs[0][0]
    for name, v in res.items():
        ratio = statistics.median(x / b for x, b in zip(v, res[base]))
        print(f"{name:10s} median {statistics.median(v):9.0f} IOPS  paired ratio vs {base}: "
              f"{ratio:.2f}  [{min(v):.0f}..{max(v):.0f}]")


if __name__ == "__main__":
    main()
