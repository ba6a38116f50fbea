"""Benchmark of sqlferry's subscribers (issue 4): fan-out latency and idle CPU.

    python3 bench/subscribe.py [--subscribers 100] [--size-mb 20] [--rounds 3]
                               [--idle-seconds 60] [--workdir DIR] [--bin PATH]

Builds the release binary (`cargo build --release`), makes a WAL database of about
--size-mb with bench/mkdb.py, starts a real `sqlferry serve` on 127.0.0.1:0 with its own
data directory (bench/server.py; stopped at the end, also when the benchmark fails or
is killed with SIGTERM or SIGINT) and pushes the database as version 1 with the admin
key. That first push saves a PUSH key in the pusher's secrets file and writes the
sidecar `app.db-sqlferry` with a PULL key.

1. Fan-out latency. --subscribers pull subscribers start, each a machine of its own
   (HOME and XDG directories under DIR/subs/NNN), each with a copy of the sidecar
   beside its own database, running `sqlferry pull --from SIDECAR --subscribe`. Once
   every one has printed `pull (start): version 1`, each round changes 1% of the
   origin's rows in one contiguous id range (mkdb.py's cluster change, a new seed each
   round) and runs one `sqlferry push` with the saved PUSH key. One thread reads every
   subscriber's stdout pipe (selectors/epoll) and stamps each line with
   time.perf_counter() the moment it is read. A subscriber's latency is the stamp of
   its `pull (...): version N` line minus the moment the push command returned (the
   version is committed on the server before that), and also minus the moment the push
   started. The server runs with -v and the subscribers with -v, so their logs (UTC,
   microseconds) also say when the server committed the version and when each
   subscriber started its pull: the latency splits into hearing of the version and
   pulling it. After the rounds, every subscriber's database must have the origin's
   digest and an ok integrity check (`sqlferry verify --json`), or the benchmark
   fails. Then every subscriber but one stops and the same rounds run again with that
   one alone: the latency without 100 of them competing for the cores. Each round
   also counts the CPU seconds the subscribers, the server and, from /proc/stat, the
   machine's other processes used from the push's start to the last line: on a shared
   machine, the last say how much of the cores the subscribers did not have.
   The server's peak RSS (VmHWM) is read after the 100 initial pulls and, reset with
   /proc/PID/clear_refs, again after the rounds: the peak of the fan-out itself.

2. Idle CPU. A push subscriber, `sqlferry push DB REPLICA --subscribe --waitIdle 10m`
   (the saved PUSH key, no --key), and a new pull subscriber run side by side; once each
   has printed its start line, their CPU time (utime + stime in /proc/PID/stat) is read
   before and after --idle-seconds in which nothing writes the database. Reported as CPU
   seconds per minute. Neither may print anything in that time.

It prints the figures and a table of targets (p99 latency from the push's end under
1 s; an idle push subscriber under 0.1 CPU s/min) with PASS/MISS, and writes every
figure, each subscriber's latency included, to DIR/results-subscribe.json. DIR
(default /tmp/sqlferry-bench-subscribe) takes about (subscribers + 3) x the database
size; it is emptied at the start and the databases are left there for inspection.
About 3 minutes on two cores with the defaults.
"""

import argparse
import collections
import concurrent.futures
import datetime
import json
import os
import re
import resource
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.dont_write_bytecode = True  # no __pycache__ in the repository's bench/
import engine  # noqa: E402
import mkdb  # noqa: E402
import rss  # noqa: E402
import server  # noqa: E402

SQLFERRY = engine.SQLFERRY
REPLICA = "acme/app.db"
MIB = 1024 * 1024

# Targets (issue 4).
LATENCY_P99_MAX_S = 1.0  # from the push landing to the last subscriber's pull line
IDLE_PUSH_CPU_MAX_S_PER_MIN = 0.1

START_TIMEOUT_S = 300  # every subscriber's first pull (a full copy each)
VERSION_TIMEOUT_S = 60  # every subscriber's pull of a new version
STOP_TIMEOUT_S = 15
SETTLE_S = 1.0  # between rounds, so one round's stragglers do not load the next
VERIFY_WORKERS = 2  # the machine's cores

PULL_LINE = re.compile(
    r"pull \((?P<reason>[a-z-]+)\): version (?P<version>\d+), (?P<written>\d+) of "
    r"(?P<total>\d+) pages written, .* in (?P<took>\S+)$")
PUSH_LINE = re.compile(
    r"push \((?P<reason>[a-z-]+)\): (?:no change, still )?version (?P<version>\d+)")
# tracing's default format: `2026-11-22T03:08:46.431016Z  INFO message key=value`.
LOG_LINE = re.compile(r"^(?P<at>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+Z)\s+INFO\s+(?P<msg>.*)$")
DURATION = re.compile(r"^(?P<n>[0-9.]+)(?P<unit>ns|µs|us|ms|s)$")
DURATION_UNIT_S = {"ns": 1e-9, "µs": 1e-6, "us": 1e-6, "ms": 1e-3, "s": 1.0}


def fail(message):
    sys.exit(f"bench/subscribe.py: {message}")


def note(message):
    print(f"  note: {message}", flush=True)


def seconds(text):
    """A Rust `{:.2?}` Duration (`45.12ms`, `1.03s`, `812.00µs`) in seconds."""
    m = DURATION.match(text)
    return float(m["n"]) * DURATION_UNIT_S[m["unit"]] if m else None


def wall_offset_s():
    """time.time() minus time.perf_counter(): what moves the logs' wall-clock stamps
    onto perf_counter's scale. Taken again each round, so a clock slewed by NTP drifts
    for seconds, not minutes."""
    return time.time() - time.perf_counter()


def log_events(text, message):
    """(wall-clock seconds, message) of the INFO log lines whose message starts with
    `message`."""
    out = []
    for line in text.splitlines():
        m = LOG_LINE.match(line)
        if m and m["msg"].startswith(message):
            wall = datetime.datetime.strptime(m["at"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(
                tzinfo=datetime.timezone.utc).timestamp()
            out.append((wall, m["msg"]))
    return out


def percentile(values, p):
    """The p-th percentile, linear between the closest ranks (statistics.quantiles'
    "inclusive" method), defined for one value too."""
    xs = sorted(values)
    if len(xs) == 1:
        return xs[0]
    pos = (len(xs) - 1) * p / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def spread(values):
    """min, median, p90, p99, max of `values`."""
    return {"n": len(values), "min": min(values), "median": percentile(values, 50),
            "p90": percentile(values, 90), "p99": percentile(values, 99),
            "max": max(values)}


def load():
    return "%.2f %.2f %.2f" % os.getloadavg()


def machine_busy_s():
    """CPU seconds every core of the machine spent busy since boot, from /proc/stat
    (user, nice, system, irq, softirq, steal; guest time is inside user)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / rss.CLOCK_TICKS_PER_S


def own_cpu_s():
    """CPU seconds of this Python process and of its children it has reaped (the
    push, which subprocess.run waits for; the subscribers run on until the end)."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


# ---------------------------------------------------------------------------- subscribers


class Subscribers:
    """Long-running sqlferry subscribers, each its own machine (HOME and XDG directories
    of its own). One thread reads all their stdout pipes and stamps each line with
    time.perf_counter() as soon as it is read; their stderr (-v logs) goes to a file.
    Every process is stopped on exit, also when the benchmark fails."""

    def __init__(self):
        self.procs = {}  # name -> Popen
        self.dirs = {}
        self.events = collections.defaultdict(list)  # name -> [event dict]
        self.other = collections.defaultdict(list)  # name -> [(t, line)] not parsed
        self.exit_codes = {}
        self.cond = threading.Condition()
        self.selector = selectors.DefaultSelector()
        self.reader = None
        self.closing = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop(list(self.procs))
        self.closing = True
        if self.reader:
            self.reader.join(5)
        return False

    def start(self, name, root, args, env):
        """Starts `sqlferry -v ARGS` as subscriber `name`, working in `root`."""
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        with open(root / "stderr", "w") as err:
            proc = subprocess.Popen([str(SQLFERRY), "-v", *args], env=env, cwd=root,
                                    stdout=subprocess.PIPE, stderr=err,
                                    stdin=subprocess.DEVNULL)
        self.procs[name] = proc
        self.dirs[name] = root
        os.set_blocking(proc.stdout.fileno(), False)
        self.selector.register(proc.stdout.fileno(), selectors.EVENT_READ, (name, [b""]))
        if self.reader is None:
            self.reader = threading.Thread(target=self._read, daemon=True)
            self.reader.start()

    def _read(self):
        while not self.closing:
            try:
                ready = self.selector.select(timeout=0.2)
            except (OSError, ValueError):
                continue
            for key, _ in ready:
                try:
                    chunk = os.read(key.fd, 65536)
                except BlockingIOError:
                    continue
                at = time.perf_counter()
                name, pending = key.data
                if not chunk:
                    self.selector.unregister(key.fd)
                    continue
                lines = (pending[0] + chunk).split(b"\n")
                pending[0] = lines.pop()
                with self.cond:
                    for raw in lines:
                        self._record(name, at, raw.decode(errors="replace"))
                    self.cond.notify_all()

    def _record(self, name, at, line):
        m = PULL_LINE.search(line) or PUSH_LINE.search(line)
        if not m:
            self.other[name].append((at, line))
            return
        self.events[name].append({
            "t": at, "kind": "pull" if m.re is PULL_LINE else "push",
            "reason": m["reason"], "version": int(m["version"]),
            "took_s": seconds(m["took"]) if "took" in m.groupdict() else None,
            "line": line,
        })

    def wait(self, names, kind, version, timeout):
        """Waits until each of `names` printed a `kind` line of `version`; returns
        {name: event}. Fails, naming the missing ones, after `timeout` seconds."""
        deadline = time.monotonic() + timeout

        def found():
            out = {}
            for n in names:
                e = next((e for e in self.events[n]
                          if e["kind"] == kind and e["version"] == version), None)
                if e:
                    out[n] = e
            return out

        with self.cond:
            while True:
                got = found()
                if len(got) == len(names):
                    return got
                dead = [n for n in names if n not in got and self.procs[n].poll() is not None]
                left = deadline - time.monotonic()
                if dead or left <= 0:
                    missing = [n for n in names if n not in got]
                    break
                self.cond.wait(min(left, 1.0))
        detail = "\n".join(self.describe(n) for n in missing[:5])
        fail(f"{len(missing)} of {len(names)} subscribers printed no {kind} line of "
             f"version {version} within {timeout} s ({len(dead)} exited); first "
             f"ones:\n{detail}")

    def describe(self, name):
        proc = self.procs[name]
        state = "running" if proc.poll() is None else f"exited with {proc.returncode}"
        lines = [e["line"] for e in self.events[name]] + [l for _, l in self.other[name]]
        err = (self.dirs[name] / "stderr").read_text(errors="replace").splitlines()
        return (f"  {name} ({state}), stdout: {lines[-3:]}\n"
                f"    stderr (last lines): {err[-5:]}")

    def cpu_s(self, names):
        """CPU seconds the named subscribers used so far, summed."""
        total = 0.0
        for n in names:
            used = rss.cpu_s(self.procs[n].pid)
            if used is None:
                fail(f"subscriber {n} is gone:\n{self.describe(n)}")
            total += used
        return total

    def stderr(self, name):
        return (self.dirs[name] / "stderr").read_text(errors="replace")

    def stop(self, names):
        """SIGTERM to each of `names`, then waits (SIGKILL after STOP_TIMEOUT_S);
        records the exit codes."""
        for n in names:
            if self.procs[n].poll() is None:
                self.procs[n].send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for n in names:
            proc = self.procs[n]
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                note(f"subscriber {n} ignored SIGTERM; killed")
            self.exit_codes.setdefault(n, proc.returncode)


def pull_subscriber(subs, name, root, sidecar):
    """Starts a pull subscriber into ROOT/app.db, following the replica of a copy of
    `sidecar` beside it: `sqlferry pull --from ROOT/app.db-sqlferry --subscribe`."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(sidecar, root / "app.db-sqlferry")
    subs.start(name, root, ["pull", "--from", str(root / "app.db-sqlferry"), "--subscribe"],
               server.xdg_env(root))


# ---------------------------------------------------------------------------- checks


def verify(env, path):
    """(digest, integrity) of `path` from `sqlferry verify --json`."""
    proc = subprocess.run([str(SQLFERRY), "verify", str(path), "--json"], env=env,
                          capture_output=True, text=True)
    if proc.returncode not in (0, 7):
        fail(f"sqlferry verify {path} exited with {proc.returncode}:\n{proc.stderr}")
    report = json.loads(proc.stdout)
    return report["digest"], report.get("integrity")


def verify_all(env, paths, expected):
    """Checks that every file in `paths` has digest `expected` and an ok integrity
    check, two at a time; returns how many were checked."""
    with concurrent.futures.ThreadPoolExecutor(VERIFY_WORKERS) as pool:
        reports = list(pool.map(lambda p: (p, *verify(env, p)), paths))
    bad = [(p, d, i) for p, d, i in reports if d != expected or i != ["ok"]]
    if bad:
        lines = "\n".join(f"  {p}: digest {d}, integrity {i}" for p, d, i in bad[:10])
        fail(f"{len(bad)} of {len(paths)} subscriber databases differ from the origin "
             f"(digest {expected}):\n{lines}")
    return len(reports)


# ---------------------------------------------------------------------------- fan-out


def one_round(root, pusher, subs, names, srv, version, seed):
    """Changes the origin, pushes it, and waits for every one of `names` to pull the new
    version. Returns the round's figures."""
    origin = root / "origin" / "app.db"
    rows = mkdb.change(str(origin), "cluster", seed)
    time.sleep(SETTLE_S)
    cpu_subs = subs.cpu_s(names)
    cpu_server = rss.cpu_s(srv.proc.pid)
    cpu_own, cpu_busy = own_cpu_s(), machine_busy_s()
    offset = wall_offset_s()
    started = time.perf_counter()
    _, stats = pusher.push(origin, REPLICA)
    ended = time.perf_counter()
    if stats["version"] != version or not stats["created"]:
        fail(f"the push made version {stats['version']} (created: {stats['created']}), "
             f"expected a new version {version}")
    got = subs.wait(names, "pull", version, VERSION_TIMEOUT_S)
    last = max(e["t"] for e in got.values())
    cpu_subs = subs.cpu_s(names) - cpu_subs
    cpu_server = rss.cpu_s(srv.proc.pid) - cpu_server
    cpu_own, cpu_busy = own_cpu_s() - cpu_own, machine_busy_s() - cpu_busy
    window = time.perf_counter() - started
    reasons = collections.Counter(e["reason"] for e in got.values())
    return {
        "version": version, "rows_changed": rows, "subscribers": len(names),
        "push_started": started, "push_ended": ended, "wall_offset_s": offset, "push_wall_s": ended - started,
        "push_engine_s": stats["duration_ms"] / 1000, "pages_sent": stats["pages_sent"],
        "bytes_sent": stats["bytes_sent"], "pages_total": stats["pages_total"],
        "digest": stats["digest"],
        "arrived": {n: e["t"] for n, e in got.items()},
        "from_end_s": {n: e["t"] - ended for n, e in got.items()},
        "from_start_s": {n: e["t"] - started for n, e in got.items()},
        "pull_took_s": {n: e["took_s"] for n, e in got.items()},
        "pages_written": {n: int(PULL_LINE.search(e["line"])["written"])
                          for n, e in got.items()},
        "reasons": dict(reasons),
        "last_line_after_end_s": last - ended,
        "subscribers_cpu_s": cpu_subs, "server_cpu_s": cpu_server,
        # From the push's start to the last subscriber's line: the benchmark and the
        # push; the whole machine busy; so what other processes (other users of a
        # shared machine) took from the cores meanwhile.
        "window_s": window, "bench_and_push_cpu_s": cpu_own, "machine_busy_s": cpu_busy,
        "others_cpu_s": max(0.0, cpu_busy - cpu_subs - cpu_server - cpu_own),
        "load": load(),
    }


def split_latency(rounds, srv_log, subs):
    """From the -v logs: when the server committed each version, and when each
    subscriber started the pull that brought it. Adds to each round:
    commit_after_start_s, push_exit_after_commit_s, and per subscriber heard_s (commit
    to its pull starting) and pulled_s (pull starting to its line read)."""
    commits = {}
    for wall, msg in log_events(srv_log, "push committed"):
        m = re.search(r"version=(\d+)", msg)
        if m:
            commits[int(m[1])] = wall
    starts = {}
    for rnd in rounds:
        for n in rnd["arrived"]:
            if n not in starts:
                starts[n] = [w for w, _ in log_events(subs.stderr(n), "pull starting")]
    for rnd in rounds:
        if rnd["version"] not in commits:
            note(f"no `push committed` log line for version {rnd['version']}")
            continue
        commit = commits[rnd["version"]] - rnd["wall_offset_s"]
        rnd["commit_after_start_s"] = commit - rnd["push_started"]
        rnd["push_exit_after_commit_s"] = rnd["push_ended"] - commit
        heard, pulled = {}, {}
        for n, arrived in rnd["arrived"].items():
            before = [w - rnd["wall_offset_s"] for w in starts[n]]
            before = [at for at in before if rnd["push_started"] - 0.01 <= at <= arrived]
            if before:
                heard[n] = before[-1] - commit
                pulled[n] = arrived - before[-1]
        rnd["heard_s"], rnd["pulled_s"] = heard, pulled


def fan_out(root, args, srv, pusher, sidecar, origin_digest):
    """Case 1: the fan-out rounds with every subscriber, then with one alone."""
    out = {}
    names = [f"{i:03d}" for i in range(args.subscribers)]
    with Subscribers() as subs:
        idle_kib = rss.status_kib(srv.proc.pid, "VmRSS")
        print(f"  starting {len(names)} pull subscribers", flush=True)
        t0 = time.perf_counter()
        for n in names:
            pull_subscriber(subs, n, root / "subs" / n, sidecar)
        got = subs.wait(names, "pull", 1, START_TIMEOUT_S)
        out["start_s"] = max(e["t"] for e in got.values()) - t0
        out["start_reasons"] = dict(collections.Counter(e["reason"] for e in got.values()))
        print(f"  every subscriber pulled version 1 in {out['start_s']:.1f} s", flush=True)
        time.sleep(SETTLE_S)
        out["server_rss_idle_kib"] = idle_kib
        out["server_rss_connected_kib"] = rss.status_kib(srv.proc.pid, "VmRSS")
        out["server_hwm_start_kib"] = rss.vm_hwm_kib(srv.proc.pid)
        out["server_hwm_reset"] = rss.reset_hwm(srv.proc.pid)
        if not out["server_hwm_reset"]:
            note("could not reset the server's VmHWM: its fan-out peak includes the start")

        rounds = []
        for r in range(args.rounds):
            version = 2 + r
            print(f"  round {r + 1}: change, push version {version}, "
                  f"{len(names)} subscribers (load {load()})", flush=True)
            rounds.append(one_round(root, pusher, subs, names, srv, version, seed=7 + r))
            print(f"    push {rounds[-1]['push_wall_s']:.3f} s; last subscriber "
                  f"{rounds[-1]['last_line_after_end_s']:.3f} s after the push returned",
                  flush=True)
        out["server_hwm_fanout_kib"] = rss.vm_hwm_kib(srv.proc.pid)
        out["server_rss_after_kib"] = rss.status_kib(srv.proc.pid, "VmRSS")
        final = rounds[-1]["digest"]
        if final != origin_digest():
            fail(f"the last version has digest {final}, the origin {origin_digest()}")
        print(f"  verifying {len(names)} subscriber databases", flush=True)
        out["verified"] = verify_all(pusher.env, [root / "subs" / n / "app.db" for n in names],
                                     final)

        alone = names[0]
        print(f"  stopping every subscriber but {alone}", flush=True)
        subs.stop(names[1:])
        time.sleep(SETTLE_S)
        single = []
        for r in range(args.rounds):
            version = 2 + args.rounds + r
            print(f"  round {r + 1} alone: push version {version}, 1 subscriber", flush=True)
            single.append(one_round(root, pusher, subs, [alone], srv, version,
                                    seed=7 + args.rounds + r))
        verify_all(pusher.env, [root / "subs" / alone / "app.db"], single[-1]["digest"])
        subs.stop([alone])
        split_latency(rounds + single, srv.stderr(), subs)
        out["exit_codes"] = subs.exit_codes
        bad_exits = {n: c for n, c in subs.exit_codes.items() if c != 0}
        if bad_exits:
            note(f"subscribers that did not exit 0 on SIGTERM: {bad_exits}")
        # Besides one pull line per version, a subscriber prints only its banner.
        out["unexpected_stdout"] = {
            n: [l for _, l in ls if " pull subscriber: " not in l]
            for n, ls in subs.other.items()}
        out["unexpected_stdout"] = {n: ls for n, ls in out["unexpected_stdout"].items() if ls}
        out["extra_pulls"] = {n: [e["line"] for e in es] for n, es in subs.events.items()
                              if len(es) != 1 + len([x for x in rounds + single
                                                     if n in x["arrived"]])}
        for what in ("unexpected_stdout", "extra_pulls"):
            if out[what]:
                note(f"{what}: {json.dumps(out[what])[:800]}")
        out["stderr_problems"] = {}
        for n in names:
            lines = [l for l in subs.stderr(n).splitlines()
                     if not LOG_LINE.match(l) and l.strip()]
            if lines:
                out["stderr_problems"][n] = lines[:5]
        if out["stderr_problems"]:
            note(f"subscribers wrote more than logs on stderr: "
                 f"{json.dumps(out['stderr_problems'])[:800]}")
    out["rounds"], out["alone"] = rounds, single
    return out


# ---------------------------------------------------------------------------- idle


def idle_cpu(root, args, srv, pusher, sidecar, version):
    """Case 2: a push subscriber and a pull subscriber with nothing to do, side by
    side; their CPU time over --idle-seconds."""
    origin = root / "origin" / "app.db"
    with Subscribers() as subs:
        subs.start("push", root / "idle-push",
                   ["push", str(origin), REPLICA, "--subscribe", "--waitIdle", "10m",
                    "--server", srv.url], pusher.env)
        pull_subscriber(subs, "pull", root / "idle-pull", sidecar)
        push = subs.wait(["push"], "push", version, START_TIMEOUT_S)["push"]
        if push["reason"] != "start":
            fail(f"the push subscriber's first line is {push['line']!r}")
        subs.wait(["pull"], "pull", version, START_TIMEOUT_S)
        time.sleep(SETTLE_S)  # past the start pushes' and pulls' last work
        print(f"  push and pull subscriber idle for {args.idle_seconds} s", flush=True)
        before = {n: subs.cpu_s([n]) for n in ("push", "pull")}
        server_before = rss.cpu_s(srv.proc.pid)
        lines_before = {n: len(subs.events[n]) + len(subs.other[n]) for n in before}
        t0 = time.perf_counter()
        time.sleep(args.idle_seconds)
        after = {n: subs.cpu_s([n]) for n in ("push", "pull")}
        server_after = rss.cpu_s(srv.proc.pid)
        elapsed = time.perf_counter() - t0
        quiet = {n: len(subs.events[n]) + len(subs.other[n]) == lines_before[n]
                 for n in before}
        out = {"idle_s": elapsed, "server_cpu_s": server_after - server_before}
        for n in before:
            used = after[n] - before[n]
            out[n] = {"cpu_s": used, "cpu_s_per_min": used * 60 / elapsed,
                      "ticks": round(used * rss.CLOCK_TICKS_PER_S),
                      "printed_nothing": quiet[n],
                      "lines": [e["line"] for e in subs.events[n]]
                      + [l for _, l in subs.other[n]]}
            if not quiet[n]:
                note(f"the idle {n} subscriber printed: {out[n]['lines'][-3:]}")
    out["exit_codes"] = subs.exit_codes
    return out


# ---------------------------------------------------------------------------- report


def ms(s):
    return "%.0f" % (1000 * s)


def merged(rounds, key):
    return [v for r in rounds for v in r[key].values() if v is not None]


def latency_rows(rounds, label):
    rows = []
    for i, r in enumerate(rounds, 1):
        end, start = spread(list(r["from_end_s"].values())), spread(
            list(r["from_start_s"].values()))
        rows.append([f"{label} {i} (v{r['version']})", r["subscribers"],
                     ms(r["push_wall_s"]), r["pages_sent"], ms(end["min"]),
                     ms(end["median"]), ms(end["p90"]), ms(end["p99"]), ms(end["max"]),
                     ms(start["median"]), ms(start["p99"]),
                     "%.2f" % r["subscribers_cpu_s"], "%.2f" % r["server_cpu_s"],
                     "%.2f" % r["others_cpu_s"]])
    if len(rounds) > 1:
        end, start = spread(merged(rounds, "from_end_s")), spread(
            merged(rounds, "from_start_s"))
        rows.append([f"{label}, all", sum(r["subscribers"] for r in rounds),
                     ms(sum(r["push_wall_s"] for r in rounds) / len(rounds)), "",
                     ms(end["min"]), ms(end["median"]), ms(end["p90"]), ms(end["p99"]),
                     ms(end["max"]), ms(start["median"]), ms(start["p99"]), "", "", ""])
    return rows


def latency_table(fan):
    headers = ["round", "subscribers", "push ms", "pages", "min ms", "median ms",
               "p90 ms", "p99 ms", "max ms", "median from start ms",
               "p99 from start ms", "subscribers CPU s", "server CPU s",
               "other processes CPU s"]
    rows = latency_rows(fan["rounds"], "round")
    rows += latency_rows(fan["alone"], "alone")
    return engine.table(headers, rows)


def split_table(fan):
    """Where the time goes, per round: medians (and p99) over the subscribers."""
    headers = ["round", "push start to commit ms", "commit to push exit ms",
               "heard: commit to pull start ms (median / p99)",
               "pulled: pull start to line ms (median / p99)",
               "pull's own time ms (median / p99)"]
    rows = []
    for label, rounds in (("round", fan["rounds"]), ("alone", fan["alone"])):
        for i, r in enumerate(rounds, 1):
            if "heard_s" not in r or not r["heard_s"]:
                continue
            h, p = spread(list(r["heard_s"].values())), spread(list(r["pulled_s"].values()))
            took = spread([v for v in r["pull_took_s"].values() if v is not None])
            rows.append([f"{label} {i} (v{r['version']})", ms(r["commit_after_start_s"]),
                         ms(r["push_exit_after_commit_s"]),
                         f"{ms(h['median'])} / {ms(h['p99'])}",
                         f"{ms(p['median'])} / {ms(p['p99'])}",
                         f"{ms(took['median'])} / {ms(took['p99'])}"])
    return engine.table(headers, rows)


def idle_table(idle):
    rows = [[f"{n} subscriber", "%.1f" % idle["idle_s"], "%.2f" % idle[n]["cpu_s"],
             idle[n]["ticks"], "%.3f" % idle[n]["cpu_s_per_min"],
             "yes" if idle[n]["printed_nothing"] else "no"] for n in ("push", "pull")]
    rows.append(["server", "%.1f" % idle["idle_s"], "%.2f" % idle["server_cpu_s"],
                 round(idle["server_cpu_s"] * rss.CLOCK_TICKS_PER_S),
                 "%.3f" % (idle["server_cpu_s"] * 60 / idle["idle_s"]), ""])
    return engine.table(["process", "idle s", "CPU s", "ticks", "CPU s/min",
                         "printed nothing"], rows)


def memory_table(fan, subscribers):
    kib = lambda k: "%.1f" % (fan[k] / 1024)
    return engine.table(
        ["server", "MiB"],
        [["RSS before the subscribers", kib("server_rss_idle_kib")],
         [f"RSS with {subscribers} subscribers connected", kib("server_rss_connected_kib")],
         [f"peak (VmHWM) through {subscribers} first pulls", kib("server_hwm_start_kib")],
         [f"peak (VmHWM) through the fan-out rounds", kib("server_hwm_fanout_kib")]])


def targets(fan, idle):
    out = []

    def check(what, measured, limit, ok):
        out.append([what, measured, limit, "PASS" if ok else "MISS"])

    for i, r in enumerate(fan["rounds"], 1):
        p99 = percentile(list(r["from_end_s"].values()), 99)
        check(f"round {i}: p99 latency from push end", "%.3f s" % p99,
              "< %.0f s" % LATENCY_P99_MAX_S, p99 < LATENCY_P99_MAX_S)
    p99 = percentile(merged(fan["rounds"], "from_end_s"), 99)
    check("all rounds: p99 latency from push end", "%.3f s" % p99,
          "< %.0f s" % LATENCY_P99_MAX_S, p99 < LATENCY_P99_MAX_S)
    rate = idle["push"]["cpu_s_per_min"]
    check("idle push subscriber: CPU", "%.3f s/min" % rate,
          "< %.1f s/min" % IDLE_PUSH_CPU_MAX_S_PER_MIN, rate < IDLE_PUSH_CPU_MAX_S_PER_MIN)
    return out


def machine():
    try:
        return engine.machine()
    except OSError:  # no /usr/bin/sqlite3: only engine.py needs it
        return {"nproc": os.cpu_count()}


# ---------------------------------------------------------------------------- main


def main():
    parser = argparse.ArgumentParser(
        description="Benchmark sqlferry's subscribers: fan-out latency and idle CPU "
                    "(see the docstring).")
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(),
                                                          "sqlferry-bench-subscribe"),
                        help="where everything goes (default /tmp/sqlferry-bench-subscribe)")
    parser.add_argument("--subscribers", type=int, default=100,
                        help="pull subscribers in the fan-out (default 100)")
    parser.add_argument("--size-mb", type=int, default=20,
                        help="size of the database in MiB (default 20)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="change-and-push rounds (default 3)")
    parser.add_argument("--idle-seconds", type=int, default=60,
                        help="how long the idle CPU is measured (default 60)")
    parser.add_argument("--bin", type=Path, default=None,
                        help="run this sqlferry binary (server, pusher and subscribers) "
                             "instead of building target/release/sqlferry: to compare two "
                             "commits' builds in alternating runs on the same machine")
    args = parser.parse_args()
    if args.subscribers < 1 or args.rounds < 1 or args.idle_seconds < 1:
        parser.error("--subscribers, --rounds and --idle-seconds must be at least 1")
    # SIGTERM unwinds like Ctrl-C, so the finally blocks stop every process started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("bench/subscribe.py: terminated"))

    if args.bin is None:
        engine.build()
    else:
        global SQLFERRY
        if not args.bin.is_file():
            parser.error(f"--bin {args.bin}: no such file")
        SQLFERRY = server.SQLFERRY = engine.SQLFERRY = args.bin.resolve()
    root = Path(args.workdir)
    shutil.rmtree(root, ignore_errors=True)
    (root / "origin").mkdir(parents=True)
    origin = root / "origin" / "app.db"
    info = machine()
    began = time.perf_counter()
    print(f"making a {args.size_mb} MiB WAL database with bench/mkdb.py", flush=True)
    rows, pages, page_size = mkdb.make(str(origin), args.size_mb * MIB)
    print(f"  {rows} rows, {pages} pages of {page_size} bytes", flush=True)
    info["load_start"] = load()

    with server.Server(root / "serve", verbose=True) as srv:
        print(f"  sqlferry serve listening on {srv.url} (load {info['load_start']})",
              flush=True)
        pusher = server.Client(root / "pusher", srv)
        _, stats = pusher.push(origin, REPLICA, admin=True)
        if stats["version"] != 1:
            fail(f"the first push made version {stats['version']}")
        sidecar = Path(f"{origin}-sqlferry")
        if not sidecar.is_file():
            fail(f"the first push wrote no sidecar {sidecar}")
        origin_digest = lambda: pusher.digest(origin)
        print("fan-out", flush=True)
        fan = fan_out(root, args, srv, pusher, sidecar, origin_digest)
        print(f"idle (load {load()})", flush=True)
        idle = idle_cpu(root, args, srv, pusher, sidecar, fan["alone"][-1]["version"])
    info["load_end"] = load()
    info["total_s"] = time.perf_counter() - began

    checks = targets(fan, idle)
    print()
    built = (f"binary {SQLFERRY}" if args.bin else
             f"{info.get('commit', '?')}{' (src/ modified)' if info.get('src_dirty') else ''}")
    print(f"sqlferry {built}, {info['nproc']} CPUs "
          f"({info.get('cpu', '?')}), load {info['load_start']} -> {info['load_end']}; "
          f"{pages} pages of {page_size} bytes, {args.subscribers} subscribers, "
          f"{fan['verified']} verified\n")
    print("latency: the subscriber's `pull (...): version N` line read, minus the push "
          "command's return (or start)\n")
    print(latency_table(fan))
    print("\nwhere the time goes (from the -v logs)\n")
    print(split_table(fan))
    print()
    print(memory_table(fan, args.subscribers))
    print()
    print(idle_table(idle))
    print()
    print(engine.table(["target", "measured", "limit", "result"], checks))
    report = {"machine": info, "args": {k: (str(v) if isinstance(v, Path) else v)
                                        for k, v in vars(args).items()}, "rows": rows, "pages": pages,
              "page_size": page_size, "fan_out": fan, "idle": idle, "targets": checks}
    out = root / "results-subscribe.json"
    out.write_text(json.dumps(report, indent=2))
    print(f"\nall figures: {out} ({info['total_s']:.0f} s)")
    missed = sum(1 for c in checks if c[3] == "MISS")
    print(f"{len(checks) - missed} of {len(checks)} targets met")


if __name__ == "__main__":
    main()
