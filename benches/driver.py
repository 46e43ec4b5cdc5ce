#!/usr/bin/env python3
"""vhost-clone benchmark driver (issue 6): one run, same files, same client for every server.

Called by benches/run.sh (which builds the binaries). Measures, for every workload x queue count:
  fio (io_uring, O_DIRECT, on the image file: the physical limit), qemu-storage-daemon,
  vhost-clone `linear`, vhost-clone `clone` fully hydrated, vhost-clone `clone` with nothing
  hydrated; all vhost-user servers are driven by benches/vhost_bench.rs (libblkio client).
Then hydration time (clone vs dd vs qemu-img convert), guest-visible cost of background
hydration, and daemon memory for a 64 GiB clone at 4 KiB regions.
Prints markdown, writes DIR/results.json and DIR/results.md.
"""

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time

GiB = 1 << 30
MiB = 1 << 20
# Metadata for the 64 GiB / 4 KiB-region clone: ~524 blocks are needed. Keep it below 16320
# blocks (one space-map bitmap block): the daemon at 8bbba76 rejects a metadata device of
# 64 MiB ("space-map bitmap block 4: self-location field says block 0").
META64 = 32 * MiB

WORKLOADS = [
    # name, pattern, bs, qd
    ("4k-randread-qd1", "randread", 4096, 1),
    ("4k-randread-qd32", "randread", 4096, 32),
    ("4k-randwrite-qd32", "randwrite", 4096, 32),
    ("1m-seqread-qd8", "seqread", MiB, 8),
]
QUEUES = [1, 4]
# (hydration_threshold, hydration_batch_size) in 4 KiB regions: MiB in flight / MiB per copy
# 1/0.25, 8/4, 16/4. Many small copies in flight into a fresh sparse file on ext4 make it
# allocate and free an extent block per copy (see benches/README.md), hence the large ones.
HYDRATION_SETTINGS = [(256, 64), (2048, 1024), (4096, 1024)]
# A setting that leaves the disk to the guest: 256 KiB in flight in 64 KiB copies.
COST_GENTLE = (64, 16)
SERVERS = ["fio", "qsd", "linear", "clone-hydrated", "clone-empty"]
LABEL = {
    "fio": "fio (file)",
    "qsd": "qemu-storage-daemon",
    "linear": "ours linear",
    "clone-hydrated": "ours clone (hydrated)",
    "clone-empty": "ours clone (empty)",
}


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def run(cmd, check=True, **kw):
    return subprocess.run(cmd, check=check, text=True, capture_output=True, **kw)


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def fmt2(x):
    return "n/a" if x is None else f"{x:.2f}"


def proc_mem(pid):
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("VmRSS", "VmHWM"):
                    out[k] = int(v.split()[0]) * 1024
    except OSError:
        pass
    return out


# ----------------------------------------------------------------------------- servers


class Server:
    """A vhost-user-blk server process on a unix socket."""

    def __init__(self, name, cmd, sock, ctrl=None, logpath=None):
        self.name, self.cmd, self.sock, self.ctrl = name, cmd, sock, ctrl
        self.logpath = logpath
        self.proc = None

    def start(self, timeout=15):
        for p in (self.sock, self.ctrl):
            if p and os.path.exists(p):
                os.unlink(p)
        logf = open(self.logpath, "ab") if self.logpath else subprocess.DEVNULL
        env = dict(os.environ)
        env.setdefault("RUST_LOG", "warn")
        self.proc = subprocess.Popen(self.cmd, stdout=logf, stderr=logf, env=env,
                                     start_new_session=True)
        t0 = time.time()
        while time.time() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode} "
                                   f"(see {self.logpath})")
            if os.path.exists(self.sock) and (not self.ctrl or os.path.exists(self.ctrl)):
                time.sleep(0.1)
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{self.name}: socket {self.sock} did not appear")

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


class Bench:
    def __init__(self, a):
        self.a = a
        self.dir = os.path.abspath(a.dir)
        self.img = os.path.join(self.dir, "img.raw")
        self.results = {"meta": {}, "matrix": [], "hydration": {}, "hydration_cost": {},
                        "memory": {}, "notes": []}
        self.servers = {}
        self.unavailable = {}

    # ------------------------------------------------------------------ helpers
    def p(self, name):
        return os.path.join(self.dir, name)

    def note(self, msg):
        log("NOTE:", msg)
        self.results["notes"].append(msg)

    def ours(self, *args):
        return run([self.a.daemon, *args], check=False, timeout=30)

    def message(self, ctrl, *words):
        r = self.ours("message", "--control", ctrl, *map(str, words))
        if r.returncode != 0:
            raise RuntimeError(f"message {words}: {r.stderr.strip()}")

    def status(self, ctrl):
        # Straight on the control socket (one line out, "ok" + payload back): polling through
        # a `vhost-clone status` process every 20 ms would take CPU from the copy it times.
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
                c.connect(ctrl)
                c.sendall(b"status\n")
                reply = b""
                while chunk := c.recv(4096):
                    reply += chunk
        except OSError as e:
            raise RuntimeError(f"status: {e}") from e
        head, _, line = reply.decode().partition("\n")
        if head != "ok":
            raise RuntimeError(f"status: {head}")
        m = re.findall(r"(\d+)/(\d+)", line)
        if len(m) < 2:
            raise RuntimeError(f"cannot parse status line {line!r}")
        return int(m[1][0]), int(m[1][1]), line.strip()

    def client(self, sock, pattern, bs, qd, queues, runtime=None, ramp=None, offset=0, size=0):
        runtime = self.a.runtime if runtime is None else runtime
        ramp = self.a.ramp if ramp is None else ramp
        cmd = [self.a.bench_bin, "--socket", sock, "--pattern", pattern, "--bs", str(bs),
               "--qd", str(qd), "--queues", str(queues), "--runtime", str(runtime),
               "--ramp", str(ramp), "--offset", str(offset), "--size", str(size), "--json"]
        r = run(cmd, check=False, timeout=runtime + ramp + 60)
        if r.returncode != 0:
            raise RuntimeError(f"vhost_bench failed ({r.returncode}): {r.stderr.strip()[-400:]}")
        return json.loads(r.stdout.strip().splitlines()[-1])

    def fio(self, pattern, bs, qd, queues, runtime=None, ramp=None):
        runtime = self.a.runtime if runtime is None else runtime
        ramp = self.a.ramp if ramp is None else ramp
        rw = {"randread": "randread", "randwrite": "randwrite", "seqread": "read"}[pattern]
        cmd = ["fio", "--name=b", f"--filename={self.img}", "--ioengine=io_uring", "--direct=1",
               "--invalidate=0", f"--rw={rw}", f"--bs={bs}", f"--iodepth={qd}",
               f"--numjobs={queues}", "--group_reporting", "--time_based",
               # integer milliseconds: fio mis-parses fractional seconds such as "0.8s"
               f"--runtime={int(runtime * 1000)}ms", f"--ramp_time={int(ramp * 1000)}ms",
               "--output-format=json",
               "--randrepeat=0", "--norandommap"]
        if pattern == "seqread":
            share = GiB // queues
            cmd += [f"--size={share}", f"--offset_increment={share}"]
        else:
            cmd += [f"--size={GiB}"]
        r = run(cmd, check=False, timeout=runtime + ramp + 60)
        if r.returncode != 0:
            raise RuntimeError(f"fio failed: {r.stderr.strip()[-400:]}")
        out = r.stdout[r.stdout.index("{"):]
        j = json.loads(out)["jobs"][0]
        d = j["write" if pattern == "randwrite" else "read"]
        pc = d["clat_ns"].get("percentile", {})
        return {"iops": d["iops"], "mib_s": d["bw_bytes"] / MiB,
                "lat_mean_us": d["lat_ns"]["mean"] / 1000,
                "lat_p50_us": pc.get("50.000000", 0) / 1000,
                "lat_p99_us": pc.get("99.000000", 0) / 1000, "errors": j["error"],
                "secs": j.get("job_runtime", 0) / 1000 / max(1, queues)}

    # ------------------------------------------------------------------ setup
    def setup(self):
        os.makedirs(self.dir, exist_ok=True)
        fstype = run(["stat", "-f", "-c", "%T", self.dir]).stdout.strip()
        self.results["meta"].update({
            "dir": self.dir, "fs": fstype, "runs": self.a.runs, "runtime_s": self.a.runtime,
            "ramp_s": self.a.ramp, "quick": self.a.quick, "host": os.uname().nodename,
            "kernel": os.uname().release, "cpus": os.cpu_count(),
            "loadavg_start": os.getloadavg(),
            "git": run(["git", "rev-parse", "--short", "HEAD"], check=False).stdout.strip(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        })
        if fstype in ("tmpfs", "ramfs", "overlayfs"):
            self.note(f"{self.dir} is on {fstype}: O_DIRECT numbers are not representative")
        if not (os.path.exists(self.img) and os.path.getsize(self.img) == GiB):
            log(f"writing {self.img} (1 GiB from /dev/urandom)")
            run(["dd", "if=/dev/urandom", f"of={self.img}", "bs=4M", "count=256",
                 "conv=fsync", "status=none"])
        self.have_daemon = os.access(self.a.daemon, os.X_OK)
        if not self.have_daemon:
            self.note(f"{self.a.daemon} not built: our rows are n/a")

    def fresh_clone_files(self, tag, size=GiB, meta_size=4 * MiB, sparse_dest=True):
        meta, dest = self.p(f"{tag}.meta"), self.p(f"{tag}.dest")
        for f in (meta, dest):
            if os.path.exists(f):
                os.unlink(f)
        run(["truncate", "-s", str(meta_size), meta])
        if sparse_dest:
            run(["truncate", "-s", str(size), dest])
        else:
            # fully allocated zeroes, written O_DIRECT (no dirty page cache left to flush)
            run(["dd", "if=/dev/zero", f"of={dest}", "bs=4M", f"count={size // (4 * MiB)}",
                 "oflag=direct", "status=none"])
        return meta, dest

    def clone_server(self, name, meta, dest, src, hydrate=False):
        sock, ctrl = self.p(f"{name}.sock"), self.p(f"{name}.ctrl")
        table = f"clone {meta} {dest} {src} 8 1 no_hydration"
        cmd = [self.a.daemon, "serve", "--socket", sock, "--control", ctrl, "--table", table,
               "--num-queues", "4"]
        return Server(name, cmd, sock, ctrl, self.p(f"{name}.log"))

    def make_server(self, name):
        sock = self.p(f"{name}.sock")
        if name == "qsd":
            cmd = ["qemu-storage-daemon", "--blockdev",
                   f"driver=file,node-name=f0,filename={self.img},cache.direct=on,aio=io_uring",
                   "--export", "type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,"
                   f"addr.path={sock},writable=on,num-queues=4"]
            return Server(name, cmd, sock, None, self.p("qsd.log"))
        if not self.have_daemon:
            raise RuntimeError("daemon not built")
        if name == "linear":
            cmd = [self.a.daemon, "serve", "--socket", sock, "--table", f"linear {self.img} 0",
                   "--num-queues", "4"]
            return Server(name, cmd, sock, None, self.p("linear.log"))
        if name == "clone-empty":
            # DEST fully allocated: writes into holes of a sparse DEST are punted by io_uring to
            # io-wq workers for ext4 block allocation (~40% of the daemon's CPU, half the IOPS)
            meta, dest = self.fresh_clone_files("empty", sparse_dest=False)
            return self.clone_server(name, meta, dest, self.img)
        if name == "clone-hydrated":
            meta, dest = self.p("hydrated.meta"), self.p("hydrated.dest")
            if not (os.path.exists(meta) and os.path.exists(dest)) or not self.hydrated_ok:
                raise RuntimeError("no fully hydrated clone (hydration phase failed or skipped)")
            return self.clone_server(name, meta, dest, self.img)
        raise ValueError(name)

    def start_server(self, name):
        if name in self.unavailable:
            return None
        try:
            s = self.make_server(name).start()
            # smoke probe: a short read through the same client
            self.client(s.sock, "randread", 4096, 1, 1, runtime=0.2, ramp=0)
            self.servers[name] = s
            return s
        except Exception as e:  # noqa: BLE001
            self.unavailable[name] = str(e)[:300]
            self.note(f"{LABEL[name]}: n/a ({str(e)[:300]})")
            if name in self.servers:
                self.servers.pop(name).stop()
            try:
                s.stop()
            except Exception:  # noqa: BLE001
                pass
            return None

    def stop_all(self):
        for s in self.servers.values():
            s.stop()
        self.servers.clear()

    # ------------------------------------------------------------------ phase: hydration
    def wait_hydrated(self, ctrl, timeout, server=None):
        t0 = time.time()
        while True:
            h, n, line = self.status(ctrl)
            if h >= n:
                return time.time() - t0, line
            if time.time() - t0 > timeout:
                raise TimeoutError(f"hydration not done after {timeout}s: {line}")
            if server and not server.alive():
                raise RuntimeError("daemon died while hydrating")
            time.sleep(0.02)

    def watch_complete(self, ctrl):
        """Subscribe to the daemon's events; returns a dict whose "t" is set (time.time())
        when hydration_complete arrives: every region copied *and* committed, destination
        flushed."""
        seen = {"t": None}
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.connect(ctrl)
        c.sendall(b"events\n")
        f = c.makefile("r")
        if f.readline().strip() != "ok":
            raise RuntimeError("events subscription refused")

        def read():
            with c, f:
                for line in f:
                    if '"hydration_complete"' in line:
                        seen["t"] = time.time()
                        return
        threading.Thread(target=read, daemon=True).start()
        return seen

    def phase_hydration(self):
        """Rounds of dd, qemu-img convert and our clone at each setting, interleaved (rotating
        order) so the machine's drift spreads over all of them; medians per method.

        Two times per method: "copied" (every byte written with O_DIRECT: dd's end, and for
        the clone the moment its status counts every region hydrated) and "durable" (also
        flushed: dd conv=fsync, and for the clone its hydration_complete event, which follows
        the commit that flushes the destination and writes the bitmap)."""
        hy = self.results["hydration"]
        dst = self.p("copy.raw")
        dd = ["dd", f"if={self.img}", f"of={dst}", "iflag=direct", "oflag=direct", "bs=4M",
              "status=none"]
        tools = {"dd": dd, "dd conv=fsync": dd + ["conv=fsync"],
                 "qemu-img convert": ["qemu-img", "convert", "-t", "none", "-T", "none", "-O",
                                      "raw", self.img, dst]}
        settings = [(2048, 1024)] if self.a.quick else HYDRATION_SETTINGS
        methods = list(tools) + ([f"clone {t}/{b}" for t, b in settings]
                                 if self.have_daemon else [])
        secs = {m: [] for m in methods}
        durable = {m: [] for m in methods}
        paired = {m: [] for m in methods}  # dd's time / this method's, per round
        failed = set()
        self.hydrated_ok = False
        for r in range(self.a.runs if not self.a.quick else 1):
            k = r % len(methods)
            this_round = {}
            for m in methods[k:] + methods[:k]:
                if m in failed:
                    continue
                if m in tools:
                    if os.path.exists(dst):
                        os.unlink(dst)
                    t0 = time.time()
                    run(tools[m])
                    secs[m].append(time.time() - t0)
                    this_round[m] = secs[m][-1]
                    log(f"hydration: {m}: {secs[m][-1]:.2f} s")
                    continue
                thr, batch = (int(x) for x in m.split()[1].split("/"))
                meta, dest = self.fresh_clone_files("hyd")
                s = self.clone_server("hyd", meta, dest, self.img).start()
                try:
                    self.message(s.ctrl, "hydration_threshold", thr)
                    self.message(s.ctrl, "hydration_batch_size", batch)
                    done = self.watch_complete(s.ctrl)
                    t0 = time.time()
                    self.message(s.ctrl, "enable_hydration")
                    _, line = self.wait_hydrated(s.ctrl, self.a.hydration_timeout, s)
                    secs[m].append(time.time() - t0)
                    this_round[m] = secs[m][-1]
                    while done["t"] is None and time.time() - t0 < self.a.hydration_timeout:
                        time.sleep(0.01)
                    if done["t"] is None:
                        raise TimeoutError("no hydration_complete event")
                    durable[m].append(done["t"] - t0)
                    log(f"hydration: {m}: {secs[m][-1]:.2f} s, durable {durable[m][-1]:.2f} s "
                        f"({line})")
                except Exception as e:  # noqa: BLE001
                    self.note(f"clone hydration thr={thr} batch={batch}: {e}")
                    failed.add(m)
                    continue
                finally:
                    s.stop()
                # keep the last fully hydrated clone for the clone-hydrated rows
                os.replace(meta, self.p("hydrated.meta"))
                os.replace(dest, self.p("hydrated.dest"))
                self.hydrated_ok = True
            for m, t in this_round.items():
                if "dd" in this_round and t:
                    paired[m].append(this_round["dd"] / t)
        if os.path.exists(dst):
            os.unlink(dst)
        for t in tools:
            hy[t] = {"secs": secs[t], "median_s": median(secs[t])}
        hy["dd conv=fsync"]["durable"] = True
        if not self.have_daemon:
            hy["clone"] = "n/a (daemon not built)"
            return
        per, best = {}, None
        for thr, batch in settings:
            m = f"clone {thr}/{batch}"
            ts = secs[m]
            if not ts:
                continue
            per[f"threshold={thr},batch={batch}"] = {
                "secs": ts, "median_s": median(ts), "durable_secs": durable[m],
                "durable_median_s": median(durable[m]), "dd_over_clone_paired": paired[m],
                "dd_over_clone": median(paired[m])}
            speed = median(paired[m]) or 0.0
            if best is None or speed > best[1]:
                best = (f"threshold={thr},batch={batch}", speed, thr, batch, median(ts))
        hy["clone"] = per
        if best:
            hy["clone_best"] = {"settings": best[0], "median_s": best[4]}
            hy["dd_over_clone"] = best[1]
            self.best_hyd = (best[2], best[3])
        if self.hydrated_ok:
            h = run(["cmp", self.img, self.p("hydrated.dest")], check=False)
            hy["dest_equals_source"] = h.returncode == 0
            if h.returncode != 0:
                self.note("hydrated DEST differs from SRC: " + (h.stdout + h.stderr).strip())

    # ------------------------------------------------------------------ phase: matrix
    def phase_matrix(self):
        rows = {}
        servers = [s for s in SERVERS if s in self.a.servers]
        for name in servers:
            if name != "fio":
                self.start_server(name)
        empty_written = False
        for r in range(self.a.runs):
            order = servers[r % len(servers):] + servers[:r % len(servers)]
            for wname, pattern, bs, qd in WORKLOADS:
                writes = "write" in pattern
                if empty_written and not writes and "clone-empty" in self.servers:
                    # a fresh empty clone: random writes hydrated a sixth of its regions, which
                    # splits a 1 MiB read into ~80 pieces (half the throughput)
                    self.servers.pop("clone-empty").stop()
                    self.start_server("clone-empty")
                    empty_written = False
                empty_written |= writes
                for nq in QUEUES:
                    for name in order:
                        key = (wname, nq, name)
                        row = rows.setdefault(key, {"workload": wname, "queues": nq,
                                                    "server": name, "runs": [], "error": None})
                        if name != "fio" and name not in self.servers:
                            row["error"] = self.unavailable.get(name, "n/a")
                            continue
                        try:
                            if name == "fio":
                                res = self.fio(pattern, bs, qd, nq)
                            else:
                                s = self.servers[name]
                                if not s.alive():
                                    raise RuntimeError(f"{name} died (see {s.logpath})")
                                res = self.client(s.sock, pattern, bs, qd, nq)
                            res["round"] = r
                            row["runs"].append(res)
                            log(f"run {r + 1}/{self.a.runs} {wname} q{nq} {name}: "
                                f"{res['iops']:.0f} IOPS {res['mib_s']:.1f} MiB/s "
                                f"p99 {res['lat_p99_us']:.0f} us")
                        except Exception as e:  # noqa: BLE001
                            row["error"] = str(e)[:300]
                            log(f"run {r + 1} {wname} q{nq} {name}: FAILED {e}")
                            if name in self.servers and not self.servers[name].alive():
                                self.servers.pop(name).stop()
                                self.start_server(name)
        self.stop_all()
        for row in rows.values():
            med = {}
            for k in ("iops", "mib_s", "lat_mean_us", "lat_p50_us", "lat_p99_us"):
                med[k] = median([x[k] for x in row["runs"]]) if row["runs"] else None
            row["median"] = med
            self.results["matrix"].append(row)

    # ------------------------------------------------------------------ phase: hydration cost
    def phase_cost(self):
        """4 KiB QD32 randread IOPS on hydrated regions with background hydration vs idle."""
        out = self.results["hydration_cost"]
        if not self.have_daemon:
            out["error"] = "n/a (daemon not built)"
            return
        # The fastest setting of the hydration phase, and a gentle one: bigger copies finish
        # sooner but take more of the disk from the guest.
        settings = [getattr(self, "best_hyd", (1024, 256)), COST_GENTLE]
        settings = list(dict.fromkeys(settings))
        out["by_settings"] = {}
        for thr, batch in settings:
            res = out["by_settings"][f"threshold={thr},batch={batch}"] = {}
            self.cost_one(res, thr, batch)
        first = next(iter(out["by_settings"].values()))
        out.update({k: v for k, v in first.items() if k not in ("busy", "idle")})

    def cost_one(self, out, thr, batch):
        # 64 GiB clone so hydration cannot finish during the measurement: its first GiB has the
        # real image's data, the rest of the source is sparse (cheap source reads).
        size = 64 * GiB
        src = self.p("src64.raw")
        self.make_src64(src, size)
        meta, dest = self.fresh_clone_files("cost", size=size, meta_size=META64)
        s = self.clone_server("cost", meta, dest, src).start()
        try:
            self.message(s.ctrl, "hydration_threshold", thr)
            self.message(s.ctrl, "hydration_batch_size", batch)
            self.message(s.ctrl, "enable_hydration")
            want = (512 * MiB) // 4096
            t0 = time.time()
            while self.status(s.ctrl)[0] < want:
                if time.time() - t0 > self.a.hydration_timeout:
                    raise TimeoutError("first 512 MiB not hydrated in time")
                time.sleep(0.05)
            busy, idle = [], []
            for _ in range(max(self.a.runs, 3)):
                self.message(s.ctrl, "enable_hydration")
                h0 = self.status(s.ctrl)[0]
                busy.append(self.client(s.sock, "randread", 4096, 32, 1, size=256 * MiB))
                h1 = self.status(s.ctrl)[0]
                busy[-1]["hydrated_regions_during"] = h1 - h0
                self.message(s.ctrl, "disable_hydration")
                time.sleep(0.2)
                idle.append(self.client(s.sock, "randread", 4096, 32, 1, size=256 * MiB))
            b, i = median([x["iops"] for x in busy]), median([x["iops"] for x in idle])
            paired = median([x["iops"] / y["iops"] for x, y in zip(busy, idle) if y["iops"]])
            rate = median([x["hydrated_regions_during"] * 4096 / MiB /
                           (self.a.runtime + self.a.ramp) for x in busy])
            out.update({"settings": f"threshold={thr},batch={batch}", "busy": busy,
                        "idle": idle, "iops_during_hydration": b, "iops_idle": i,
                        "ratio": paired, "hydration_mib_s_during": rate,
                        "p99_during_us": median([x["lat_p99_us"] for x in busy]),
                        "p99_idle_us": median([x["lat_p99_us"] for x in idle])})
            log(f"hydration cost {thr}/{batch}: {b:.0f} IOPS during vs {i:.0f} idle "
                f"(hydrating {rate:.0f} MiB/s)")
        except Exception as e:  # noqa: BLE001
            out["error"] = str(e)[:300]
            self.note(f"hydration cost: {e}")
        finally:
            s.stop()

    def make_src64(self, src, size):
        if os.path.exists(src) and os.path.getsize(src) == size:
            return
        run(["truncate", "-s", str(size), src])
        run(["dd", f"if={self.img}", f"of={src}", "bs=4M", "conv=notrunc,fsync", "status=none"])

    # ------------------------------------------------------------------ phase: memory
    def phase_memory(self):
        out = self.results["memory"]
        if not self.have_daemon:
            out["error"] = "n/a (daemon not built)"
            return
        size = 64 * GiB
        src = self.p("src64.raw")
        self.make_src64(src, size)
        meta, dest = self.fresh_clone_files("mem", size=size, meta_size=META64)
        s = self.clone_server("mem", meta, dest, src).start()
        samples = []

        def sample(what):
            m = proc_mem(s.proc.pid)
            h = None
            try:
                h = self.status(s.ctrl)[0]
            except Exception:  # noqa: BLE001
                pass
            samples.append({"when": what, "rss": m.get("VmRSS"), "hwm": m.get("VmHWM"),
                            "hydrated_regions": h})
            log(f"memory {what}: VmRSS {m.get('VmRSS', 0) / MiB:.1f} MiB "
                f"VmHWM {m.get('VmHWM', 0) / MiB:.1f} MiB hydrated {h}")

        try:
            sample("start (idle, 16M regions)")
            self.client(s.sock, "randread", 4096, 32, 4, runtime=1, ramp=0)
            sample("after 1 s random reads (client connected, queues mapped)")
            thr, batch = getattr(self, "best_hyd", (64, 16))
            self.message(s.ctrl, "hydration_threshold", thr)
            self.message(s.ctrl, "hydration_batch_size", batch)
            self.message(s.ctrl, "enable_hydration")
            for t in (self.a.mem_secs / 2, self.a.mem_secs / 2):
                time.sleep(t)
                sample("during hydration")
            self.message(s.ctrl, "disable_hydration")
            time.sleep(0.5)
            sample("after hydration disabled")
            # Every region hydrated without writing 64 GiB: a discard of whole unhydrated
            # regions marks them hydrated with no copy (dm-clone semantics).
            self.client(s.sock, "seqdiscard", 64 * MiB, 4, 4, runtime=20, ramp=0)
            self.wait_hydrated(s.ctrl, self.a.hydration_timeout, s)
            time.sleep(1.5)  # the commit that announces completion
            sample("after hydration (every region hydrated, the rest by discards)")
            out.update({"clone_size": size, "region_size": 4096, "samples": samples,
                        "peak_hwm": max(x["hwm"] or 0 for x in samples)})
        except Exception as e:  # noqa: BLE001
            out["error"] = str(e)[:300]
            out["samples"] = samples
            self.note(f"memory: {e}")
        finally:
            s.stop()

    # ------------------------------------------------------------------ report
    def report(self):
        R = self.results
        R["meta"]["loadavg_end"] = os.getloadavg()
        R["meta"]["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        by = {(r["workload"], r["queues"], r["server"]): r for r in R["matrix"]}

        def val(w, q, s, k="iops"):
            r = by.get((w, q, s))
            return r["median"][k] if r and r["median"].get(k) is not None else None

        def fmt(v, k="iops"):
            if v is None:
                return "n/a"
            if k == "iops":
                return f"{v / 1000:.1f}k" if v >= 1000 else f"{v:.0f}"
            return f"{v:.0f}"

        def paired(w, q, a, b, k="iops"):
            """Median over rounds of a/b, each pair measured back to back in one round: far
            steadier on a shared machine than the ratio of two medians."""
            ra, rb = by.get((w, q, a)), by.get((w, q, b))
            if not ra or not rb:
                return None
            vb = {x.get("round"): x[k] for x in rb["runs"] if x.get(k)}
            rs = [x[k] / vb[x.get("round")] for x in ra["runs"]
                  if x.get(k) is not None and vb.get(x.get("round"))]
            return median(rs)

        def pfmt(v):
            return f"{v:.2f}" if v is not None else "n/a"

        L = []
        m = R["meta"]
        L.append(f"# vhost-clone benchmark ({m['started']}, git {m['git']})\n")
        L.append(f"Medians of {m['runs']} runs, {m['runtime_s']} s each (+{m['ramp_s']} s ramp); "
                 f"files in `{m['dir']}` ({m['fs']}); {m['cpus']} CPUs; load average at start "
                 f"{m['loadavg_start'][0]:.1f}"
                 + (f"; guest_halt_poll_ns {m['guest_halt_poll_ns']}"
                    if m.get("guest_halt_poll_ns") is not None else "")
                 + (f"; every process pinned to CPU(s) "
                    f"{','.join(map(str, m['cpus_pinned']['cpus']))} "
                    f"({m['cpus_pinned']['how']})" if m.get("cpus_pinned") else "")
                 + ". vhost-user servers are driven by "
                 "`benches/vhost_bench.rs` (libblkio), fio uses io_uring + O_DIRECT on the "
                 "same image. IOPS for 4k rows, MiB/s for 1m rows.\n")
        srvs = [s for s in SERVERS if s in self.a.servers]
        hdr = ["workload", "queues"] + [LABEL[s] for s in srvs] + \
            ["linear/qsd", "linear/fio", "clone-hyd/qsd", "clone-empty/qsd"]
        L.append("| " + " | ".join(hdr) + " |")
        L.append("|" + "---|" * len(hdr))
        R["ratios"] = []
        for w, _, _, _ in WORKLOADS:
            k = "mib_s" if w.startswith("1m") else "iops"
            for q in QUEUES:
                vals = {s: val(w, q, s, k) for s in srvs}
                cells = [w, str(q)] + [fmt(vals[s], k) for s in srvs]
                rl = pfmt(paired(w, q, "linear", "qsd", k))
                rf = pfmt(paired(w, q, "linear", "fio", k))
                rh = pfmt(paired(w, q, "clone-hydrated", "qsd", k))
                re_ = pfmt(paired(w, q, "clone-empty", "qsd", k))
                cells += [rl, rf, rh, re_]
                R["ratios"].append({"workload": w, "queues": q, "metric": k,
                                    "linear_over_qsd": rl, "linear_over_fio": rf,
                                    "clone_hydrated_over_qsd": rh, "clone_empty_over_qsd": re_})
                L.append("| " + " | ".join(cells) + " |")
        L.append("\nRatios are paired: the median over rounds of ours/peer, both measured back to "
                 "back in the same round. Targets: ours >= 1.3x qsd at 4k QD32, >= 1.5x qsd at "
                 "QD1, >= 0.9x fio.\n")
        L.append("Latency p50 / p99 (us):\n")
        hdr = ["workload", "queues"] + [LABEL[s] for s in srvs]
        L.append("| " + " | ".join(hdr) + " |")
        L.append("|" + "---|" * len(hdr))
        for w, _, _, _ in WORKLOADS:
            for q in QUEUES:
                cells = [w, str(q)]
                for s in srvs:
                    a, b = val(w, q, s, "lat_p50_us"), val(w, q, s, "lat_p99_us")
                    cells.append("n/a" if a is None else f"{a:.0f} / {b:.0f}")
                L.append("| " + " | ".join(cells) + " |")
        hy = R["hydration"]
        if hy:
            L.append("\nHydration of 1 GiB (seconds, median; copied = every byte written "
                     "O_DIRECT, durable = also flushed):\n")
            L.append("| method | copied | durable | dd / method (paired) |")
            L.append("|---|---|---|---|")
            shown = {"dd": "dd iflag=direct oflag=direct bs=4M",
                     "dd conv=fsync": "dd iflag=direct oflag=direct bs=4M conv=fsync",
                     "qemu-img convert": "qemu-img convert -t none -T none -O raw"}
            for t, label in shown.items():
                if t in hy and hy[t]["median_s"] is not None:
                    v = hy[t]["median_s"]
                    dur = f"{v:.2f}" if hy[t].get("durable") else "-"
                    cp = "-" if hy[t].get("durable") else f"{v:.2f}"
                    L.append(f"| {label} | {cp} | {dur} | |")
            if isinstance(hy.get("clone"), dict):
                for st, v in hy["clone"].items():
                    cells = [fmt2(v["median_s"]), fmt2(v["durable_median_s"]),
                             fmt2(v["dd_over_clone"])]
                    L.append(f"| vhost-clone clone, {st} (4 KiB regions) | "
                             + " | ".join(cells) + " |")
            else:
                L.append(f"| vhost-clone clone | {hy.get('clone', 'n/a')} | | |")
            if hy.get("dd_over_clone"):
                L.append(f"\nFastest clone setting ({hy['clone_best']['settings']}): "
                         f"{hy['dd_over_clone']:.2f}x dd's speed, copied vs copied (target >= "
                         "0.95; paired: the median over rounds of dd's time / ours). Methods "
                         "run interleaved, one of each per round.")
        c = R["hydration_cost"]
        if c:
            L.append("\nGuest-visible cost of background hydration (4k randread QD32, 1 queue, "
                     "hydrated regions):\n")
            L.append("| settings | IOPS during hydration | IOPS idle | ratio (paired median, "
                     "target >= 0.8) | hydrated meanwhile MiB/s | p99 during / idle us |")
            L.append("|---|---|---|---|---|---|")
            for st, x in c.get("by_settings", {}).items():
                if "ratio" in x and x["ratio"] is not None:
                    L.append(f"| {st} | {x['iops_during_hydration']:.0f} | {x['iops_idle']:.0f} "
                             f"| {x['ratio']:.2f} | {x['hydration_mib_s_during']:.0f} | "
                             f"{x['p99_during_us']:.0f} / {x['p99_idle_us']:.0f} |")
                else:
                    L.append(f"| {st} | n/a ({x.get('error')}) | | | | |")
        mm = R["memory"]
        if mm:
            L.append("\nMemory, 64 GiB clone at 4 KiB regions (16 Mi regions), sparse files:\n")
            if mm.get("samples"):
                L.append("| when | VmRSS MiB | VmHWM MiB | hydrated regions |")
                L.append("|---|---|---|---|")
                for x in mm["samples"]:
                    L.append(f"| {x['when']} | {(x['rss'] or 0) / MiB:.1f} | "
                             f"{(x['hwm'] or 0) / MiB:.1f} | {x['hydrated_regions']} |")
            if mm.get("error"):
                L.append(f"\nerror: {mm['error']}")
        if R["notes"]:
            L.append("\nNotes:\n")
            L += [f"- {n}" for n in R["notes"]]
        md = "\n".join(L) + "\n"
        with open(self.p("results.md"), "w") as f:
            f.write(md)
        with open(self.p("results.json"), "w") as f:
            json.dump(R, f, indent=1)
        print(md)
        log(f"wrote {self.p('results.md')} and {self.p('results.json')}")


HALT_POLL = "/sys/module/haltpoll/parameters/guest_halt_poll_ns"


def read_halt_poll():
    """The haltpoll cpuidle driver's poll time in ns, or None where there is none."""
    try:
        with open(HALT_POLL) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def write_halt_poll(ns):
    with open(HALT_POLL, "w") as f:
        f.write(str(ns))


def disk_irq_cpus(path):
    """The CPU that took most of the interrupts of the disk holding `path`, and the disk's PCI
    device in sysfs. Its interrupts are the IRQs listed in the device's msi_irqs
    (virtio-blk, NVMe), counted in /proc/interrupts. A thread on that CPU is woken by its
    completions without an inter-processor interrupt."""
    st = os.stat(path)
    dev = os.path.realpath(f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}")
    while dev != "/" and not os.path.isdir(os.path.join(dev, "msi_irqs")):
        dev = os.path.dirname(dev)
    if dev == "/":
        raise SystemExit(f"--cpus irq: the disk holding {path} has no MSI interrupts in sysfs "
                         "(give the CPUs instead, as in --cpus 1)")
    irqs = set(os.listdir(os.path.join(dev, "msi_irqs")))
    with open("/proc/interrupts") as f:
        ncpu = len(f.readline().split())
        counts = [0] * ncpu
        for line in f:
            cols = line.split()
            if cols and cols[0].rstrip(":") in irqs:
                for i, c in enumerate(cols[1:1 + ncpu]):
                    counts[i] += int(c)
    if not any(counts):
        raise SystemExit(f"--cpus irq: no interrupts counted yet for {dev}")
    return max(range(ncpu), key=counts.__getitem__), dev


def parse_cpus(spec):
    """A taskset-style CPU list: 1 / 0,2 / 0-3."""
    cpus = set()
    try:
        for part in spec.split(","):
            lo, _, hi = part.partition("-")
            cpus.update(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise SystemExit(f"--cpus {spec!r}: give 'irq' or a CPU list such as 1, 0,2 or 0-3")
    if not cpus:
        raise SystemExit(f"--cpus {spec!r}: no CPU in the list")
    return cpus


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dir", default="target/bench")
    ap.add_argument("--daemon", default="target/release/vhost-clone")
    ap.add_argument("--bench-bin", required=True)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--runtime", type=float, default=2.0)
    ap.add_argument("--ramp", type=float, default=0.5)
    ap.add_argument("--quick", action="store_true",
                    help="CI smoke: 1 run, 1 s each, one hydration setting (< 2 min)")
    ap.add_argument("--servers", default=",".join(SERVERS),
                    help="comma-separated subset of " + ",".join(SERVERS))
    ap.add_argument("--phases", default="hydration,matrix,cost,memory")
    ap.add_argument("--hydration-timeout", type=float, default=120)
    ap.add_argument("--mem-secs", type=float, default=10)
    ap.add_argument("--guest-halt-poll-ns", type=int, default=None,
                    help="set the haltpoll cpuidle driver's guest_halt_poll_ns for the run (KVM "
                         "guests; restored afterwards): how long an idle vCPU polls before it "
                         "halts, which decides what waking a thread on it costs")
    ap.add_argument("--cpus", default=None,
                    help="run everything (every server, the client, fio, dd, qemu-img) on these "
                         "CPUs, e.g. 1 or 0-1; 'irq': the CPU taking the interrupts of the disk "
                         "under --dir, so that no completion needs an inter-processor wake-up")
    a = ap.parse_args()
    if a.quick:
        a.runs, a.runtime, a.ramp, a.mem_secs, a.hydration_timeout = 1, 0.8, 0.2, 2, 60
    a.servers = a.servers.split(",")
    a.daemon = os.path.abspath(a.daemon)
    b = Bench(a)
    b.hydrated_ok = False
    halt_poll_before = read_halt_poll()
    if a.guest_halt_poll_ns is not None and halt_poll_before is None:
        raise SystemExit(f"--guest-halt-poll-ns: no {HALT_POLL} (not a haltpoll guest)")
    if a.cpus is not None:
        os.makedirs(a.dir, exist_ok=True)
        if a.cpus == "irq":
            cpu, dev = disk_irq_cpus(a.dir)
            cpus = {cpu}
            how = f"the CPU taking the interrupts of {dev}"
        else:
            cpus, how = parse_cpus(a.cpus), "given"
        # Inherited by every process the driver starts.
        try:
            os.sched_setaffinity(0, cpus)
        except OSError as e:
            raise SystemExit(f"--cpus {a.cpus}: cannot run on CPUs {sorted(cpus)}: {e}")
        b.results["meta"]["cpus_pinned"] = {"cpus": sorted(cpus), "how": how}
        log(f"pinned to CPUs {sorted(cpus)} ({how})")
    t0 = time.time()
    b.setup()
    b.results["meta"]["setup_secs"] = round(time.time() - t0, 1)
    phases = a.phases.split(",")
    try:
        if a.guest_halt_poll_ns is not None:
            write_halt_poll(a.guest_halt_poll_ns)
        b.results["meta"]["guest_halt_poll_ns"] = read_halt_poll()
        for ph in ("hydration", "matrix", "cost", "memory"):
            if ph in phases:
                t0 = time.time()
                try:
                    getattr(b, "phase_" + ph)()
                except Exception as e:  # noqa: BLE001
                    b.note(f"phase {ph} failed: {e}")
                b.results["meta"].setdefault("phase_secs", {})[ph] = round(time.time() - t0, 1)
                log(f"phase {ph}: {time.time() - t0:.1f} s")
    finally:
        b.stop_all()
        if a.guest_halt_poll_ns is not None:
            write_halt_poll(halt_poll_before)
        b.report()


if __name__ == "__main__":
    main()
