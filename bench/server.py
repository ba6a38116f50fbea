"""The server part of sqlferry's benchmark: push and pull through `sqlferry serve`.

bench/engine.py runs it in the same run as the local cases (leave it out with
--skip-server). A real server listens on 127.0.0.1:0 with its own data directory, and
the same database bench/mkdb.py makes for the local cases, with the same three 1%
changes applied one after the other, travels over loopback WebSocket:

  push full         the database onto a new replica, with the admin key
  push no change    onto the replica it was last pushed to (makes no version)
  push scatter,     a new version after that change, based on the version this client
  cluster, append   last pushed, whose manifest it kept ("known base": no hash travels)
  pull full         version 1 into a new file
  pull no change    version 1 into a file that holds it already
  pull scatter,     version N+1 into a file that holds version N (the hash-tree
  cluster, append   exchange finds the pages that differ)

Every timing is the median of 3 runs, wall clock around the whole command (process
start, connection, sync, closing). Each run does the same work: the full pushes go to
a fresh replica each (bench/full-1, -2, -3, after one untimed warm-up push so the page
hash cache is warm, as in the local cases); each change push goes to a fresh replica
(bench/scatter-1 …) whose version 1 an untimed push made from the state before the
change, from the same local path, so the client knows that base; pulls into an
existing file restore that file and the puller's cache and history before every run.
The versions pulled are those of acme/app.db, pushed untimed from the same states.
After every push the local file's digest (`sqlferry verify --json`) must equal the
version's; after every pull the file's digest must equal that of the state pushed.

The pusher and the puller are two clients with their own XDG config, data, state and
cache directories inside the work directory (two machines, as far as sqlferry can
tell); keys go through SQLFERRY_KEY, never the command line.

Then (unless --skip-memory) the server's peak RSS while it receives a full push of a
1 GiB database with 4096-byte pages: VmHWM of a freshly started server, read from
/proc/PID/status once the push is done and before the server stops; and the pushing
client's peak RSS (VmHWM sampled while it runs; bench/rss.py says why not ru_maxrss).

Disk: about 8x the database size in DIR/server while it runs (the four states, the
local copies and the server's store; the store is deleted at the end), 2 GiB more for
the memory run.
"""

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.dont_write_bytecode = True
import mkdb  # noqa: E402
import rss  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SQLFERRY = REPO / "target" / "release" / "sqlferry"
REPEATS = 3
MIB = 1024 * 1024
PAGE_SIZE = 4096
MODES = ("scatter", "cluster", "append")
REPLICA = "acme/app.db"

# Targets: issue 3 (server memory), DESIGN.md invariant 4 (cost follows change; no hash
# travels when the client knows its base), in issue 2's form for the bytes.
SERVER_RSS_MAX_KIB = 100 * 1024
# Issue 10: full copies through the server against the local full copy of the same run.
PUSH_FULL_VS_LOCAL_MAX = 1.3
PULL_FULL_VS_LOCAL_MAX = 1.1
PUSH_FULL_SERVER_CPU_MAX_S = 1.0
BYTES_SLACK = 1.01
CONTROL_BYTES = 1024  # a session's control frames (open, config, end) beside pages
START_TIMEOUT_S = 30
STOP_TIMEOUT_S = 30


def fail(message):
    sys.exit(f"bench/server.py: {message}")


def xdg_env(root):
    """The environment of one sqlferry process whose XDG directories and HOME are under
    `root`, with no SQLFERRY_* setting inherited from the caller: nothing falls back to
    the user's own files, and two roots are two machines."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SQLFERRY_")}
    for var, sub in (("HOME", "home"), ("XDG_CONFIG_HOME", "config"),
                     ("XDG_DATA_HOME", "data"), ("XDG_STATE_HOME", "state"),
                     ("XDG_CACHE_HOME", "cache")):
        env[var] = str(Path(root) / sub)
    return env


# ---------------------------------------------------------------------------- processes


class Server:
    """`sqlferry serve` on 127.0.0.1:0 with its own data directory: started on enter,
    stopped with SIGTERM on exit (also when the benchmark fails). With `verbose`, it
    runs with -v and its stderr (`stderr()`) logs each session and each push committed,
    with microsecond timestamps."""

    def __init__(self, root, verbose=False):
        self.root = Path(root)
        self.data = self.root / "data"
        self.verbose = verbose
        self.proc = None
        self.url = self.key = None

    def __enter__(self):
        self.root.mkdir(parents=True, exist_ok=True)
        self.out = open(self.root / "stdout", "w+")
        self.err = open(self.root / "stderr", "w+")
        self.proc = subprocess.Popen(
            [str(SQLFERRY), *(["-v"] if self.verbose else []), "serve", "--data",
             str(self.data), "--listen", "127.0.0.1:0"],
            env=xdg_env(self.root), stdout=self.out, stderr=self.err)
        deadline = time.monotonic() + START_TIMEOUT_S
        while self.url is None:
            if self.proc.poll() is not None:
                fail(f"sqlferry serve exited with {self.proc.returncode}:\n{self.stderr()}")
            if time.monotonic() > deadline:
                self.stop()
                fail(f"sqlferry serve did not say where it listens in {START_TIMEOUT_S} s")
            time.sleep(0.05)
            self.out.seek(0)
            for line in self.out.read().splitlines():
                if line.startswith("admin key") and "sfk_" in line:
                    self.key = line[line.index("sfk_"):].split()[0]
                elif line.startswith("listening on ws://"):
                    self.url = line.split()[2]
        if self.key is None:
            self.stop()
            fail("sqlferry serve printed no admin key on its first start")
        return self

    def __exit__(self, *exc):
        self.stop()
        return False

    def stderr(self):
        self.err.seek(0)
        return self.err.read()

    def cpu_s(self):
        """The server's CPU seconds so far (utime + stime, /proc/PID/stat)."""
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def vm_hwm_kib(self):
        """The server's peak resident set so far (VmHWM), in KiB."""
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
        fail("no VmHWM in /proc/PID/status")

    def stop(self):
        """SIGTERM, then waits (SIGKILL after STOP_TIMEOUT_S)."""
        if self.proc is None or self.proc.returncode is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            print("  note: sqlferry serve ignored SIGTERM; killed", flush=True)
        self.out.close()
        self.err.close()
        if self.proc.returncode not in (0, None) and sys.exc_info()[0] is None:
            print(f"  note: sqlferry serve exited with {self.proc.returncode}", flush=True)


class Client:
    """One machine running sqlferry against the server: its own XDG directories under
    `root` (secrets file, sync history, kept manifests, page-hash caches)."""

    def __init__(self, root, server):
        self.root = Path(root)
        self.server = server
        self.env = xdg_env(self.root)

    def run(self, args, admin=False):
        """Runs sqlferry ARGS; returns (wall seconds, stdout). Fails loudly on a
        non-zero exit. With `admin`, the admin key goes in SQLFERRY_KEY."""
        env = dict(self.env, SQLFERRY_KEY=self.server.key) if admin else self.env
        cmd = [str(SQLFERRY), *args]
        os.sync()  # not timed: the command pays for its own writes (engine.py's Lab.run)
        cpu_before = self.server.cpu_s()
        started = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - started
        # The server's CPU for this command (it serves nothing else meanwhile).
        self.server_cpu_s = self.server.cpu_s() - cpu_before
        if proc.returncode != 0:
            fail(f"{' '.join(cmd)} exited with {proc.returncode}:\n{proc.stderr}")
        return wall, proc.stdout

    def push(self, local, replica, admin=False):
        wall, out = self.run(["push", str(local), "--replica", replica, "--server", self.server.url,
                              "--json"], admin)
        return wall, dict(json.loads(out), server_cpu_s=self.server_cpu_s)

    def pull(self, remote, local):
        # Pulls use the admin key: the benchmark measures the transfer, not the keys.
        wall, out = self.run(["pull", "--replica", remote, str(local), "--server", self.server.url,
                              "--json"], admin=True)
        return wall, dict(json.loads(out), server_cpu_s=self.server_cpu_s)

    def digest(self, path, form=None):
        """`path`'s digest 1, or the form of `form` (a digest that starts with `c:`
        asks for the chunked one, which a push through the server records)."""
        _, out = self.run(["verify", str(path), "--json"])
        report = json.loads(out)
        if report.get("integrity") != ["ok"]:
            fail(f"{path}: integrity check says {report.get('integrity')}")
        if form is not None and form.startswith("c:"):
            return report["digest2"]
        return report["digest"]

    def save_state(self, name, db):
        """Saves `db` and this client's cache and state directories under `name`."""
        state = self.root / "saved" / name
        shutil.rmtree(state, ignore_errors=True)
        state.mkdir(parents=True)
        mkdb.copy_db(str(db), str(state / "db"))
        for sub in ("cache", "state"):
            if (self.root / sub).exists():
                shutil.copytree(self.root / sub, state / sub)
        return state

    def restore_state(self, state, db):
        mkdb.copy_db(str(state / "db"), str(db))
        for sub in ("cache", "state"):
            shutil.rmtree(self.root / sub, ignore_errors=True)
            if (state / sub).exists():
                shutil.copytree(state / sub, self.root / sub)


# ---------------------------------------------------------------------------- cases


def prepare(workdir, origin):
    """Keeps a copy of the freshly made origin: the state every server case starts from
    (the local cases change the origin as they go)."""
    root = Path(workdir)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    mkdb.copy_db(origin, str(root / "state-0.db"))


def make_states(root, client):
    """The origin before any change and after each change in turn, with their digests
    and the pages each change rewrote."""
    states = [str(root / "state-0.db")]
    for i, mode in enumerate(MODES, 1):
        path = str(root / f"state-{i}.db")
        mkdb.copy_db(states[-1], path)
        rows = mkdb.change(path, mode)
        print(f"  state {i}: {mode}, {rows} rows changed", flush=True)
        states.append(path)
    digests = [client.digest(s) for s in states]
    changed = [mkdb.pagediff(os.devnull, states[0], PAGE_SIZE)[1]]
    changed += [mkdb.pagediff(states[i], states[i + 1], PAGE_SIZE)[1] for i in range(3)]
    return states, digests, changed


def check_push(client, local, stats, version, what):
    if stats["version"] != version:
        fail(f"{what}: the push made version {stats['version']}, expected {version}")
    got = client.digest(local, form=stats["digest"])
    if got != stats["digest"]:
        fail(f"{what}: {local} has digest {got}, the pushed version has {stats['digest']}")


def check_pull(client, local, stats, expected, what):
    got = client.digest(local)
    if got != expected or stats["digest"] != expected:
        fail(f"{what}: {local} has digest {got} (pull says {stats['digest']}), "
             f"the pushed state has {expected}")


def summarize(direction, name, runs, changed_pages, db_bytes):
    """One case's figures: medians of the walls, the byte counts of the first run
    (noted if another run differs)."""
    stats = runs[0][1]
    keys = ("bytes_sent", "bytes_received", "hash_bytes")
    for _, other in runs[1:]:
        if any(other[k] != stats[k] for k in keys):
            print(f"  note: {direction} {name}: bytes differ between runs "
                  f"({[[s[k] for k in keys] for _, s in runs]})", flush=True)
            break
    return {
        "direction": direction, "case": name,
        "wall_s": statistics.median(w for w, _ in runs),
        "runs_s": [w for w, _ in runs],
        "engine_ms": statistics.median(s["duration_ms"] for _, s in runs),
        "server_cpu_s": statistics.median(s["server_cpu_s"] for _, s in runs),
        "bytes_sent": stats["bytes_sent"], "bytes_received": stats["bytes_received"],
        "hash_bytes": stats["hash_bytes"], "pages_sent": stats["pages_sent"],
        "pages_total": stats["pages_total"], "page_size": stats["page_size"],
        "changed_pages": changed_pages, "db_bytes": db_bytes,
        "load": "%.2f %.2f %.2f" % os.getloadavg(),
    }


def push_cases(root, pusher, states, digests, changed):
    results = []
    size = os.path.getsize(states[0])
    local = root / "full.db"
    mkdb.copy_db(states[0], str(local))
    print("  push: warm-up, one full push", flush=True)
    pusher.push(local, "bench/full-0", admin=True)
    print("  push: full", flush=True)
    runs = []
    for r in range(1, REPEATS + 1):
        wall, stats = pusher.push(local, f"bench/full-{r}", admin=True)
        check_push(pusher, local, stats, 1, "push full")
        runs.append((wall, stats))
    results.append(summarize("push", "full", runs, changed[0], size))

    # acme/app.db gets version 1 from state 0 and a version per change: the versions
    # the pulls bring back. Its first push is also where "no change" starts.
    app = root / "app.db"
    mkdb.copy_db(states[0], str(app))
    _, stats = pusher.push(app, REPLICA, admin=True)
    check_push(pusher, app, stats, 1, f"push {REPLICA}@1")
    print("  push: no change", flush=True)
    runs = []
    for _ in range(REPEATS):
        wall, stats = pusher.push(app, REPLICA)
        check_push(pusher, app, stats, 1, "push no change")
        runs.append((wall, stats))
    results.append(summarize("push", "no change", runs, 0, size))

    rep = root / "rep.db"
    for i, mode in enumerate(MODES):
        print(f"  push: {mode}", flush=True)
        runs = []
        for r in range(1, REPEATS + 1):
            replica = f"bench/{mode}-{r}"
            mkdb.copy_db(states[i], str(rep))
            pusher.push(rep, replica, admin=True)  # version 1: the known base
            mkdb.copy_db(states[i + 1], str(rep))
            wall, stats = pusher.push(rep, replica)
            check_push(pusher, rep, stats, 2, f"push {mode}")
            runs.append((wall, stats))
        results.append(summarize("push", mode, runs, changed[i + 1],
                                 os.path.getsize(states[i + 1])))
        mkdb.copy_db(states[i + 1], str(app))
        _, stats = pusher.push(app, REPLICA)
        check_push(pusher, app, stats, i + 2, f"push {REPLICA}@{i + 2}")
        want = pusher.digest(states[i + 1], form=stats["digest"])
        if stats["digest"] != want:
            fail(f"{REPLICA}@{i + 2} has digest {stats['digest']}, "
                 f"state {i + 1} has {want}")
    return results


def pull_cases(root, puller, states, digests, changed):
    results = []
    local = root / "pulled.db"
    print("  pull: full", flush=True)
    runs = []
    for _ in range(REPEATS):
        mkdb.remove_db(str(local))
        wall, stats = puller.pull(f"{REPLICA}@1", local)
        check_pull(puller, local, stats, digests[0], "pull full")
        runs.append((wall, stats))
    results.append(summarize("pull", "full", runs, changed[0], os.path.getsize(states[0])))

    # The steady state of a copy kept fresh by pulls: one untimed pull of the version
    # it holds already, so the puller's page-hash cache knows the file.
    puller.pull(f"{REPLICA}@1", local)
    state = puller.save_state("at-1", local)
    print("  pull: no change", flush=True)
    runs = []
    for _ in range(REPEATS):
        puller.restore_state(state, local)
        # The copy put back is another file (new times), which a pull's seal does not
        # describe: one untimed pull of the version it holds seals it again, as a copy
        # last written by a pull is (docs/engine.md, "A pull that reads what changed").
        puller.pull(f"{REPLICA}@1", local)
        wall, stats = puller.pull(f"{REPLICA}@1", local)
        check_pull(puller, local, stats, digests[0], "pull no change")
        runs.append((wall, stats))
    results.append(summarize("pull", "no change", runs, 0, os.path.getsize(states[0])))

    for i, mode in enumerate(MODES):
        version = i + 2
        print(f"  pull: {mode}", flush=True)
        runs = []
        for _ in range(REPEATS):
            puller.restore_state(state, local)
            puller.pull(f"{REPLICA}@{version - 1}", local)  # sealed again, as above
            wall, stats = puller.pull(f"{REPLICA}@{version}", local)
            check_pull(puller, local, stats, digests[i + 1], f"pull {mode}")
            runs.append((wall, stats))
        results.append(summarize("pull", mode, runs, changed[i + 1],
                                 os.path.getsize(states[i + 1])))
        puller.pull(f"{REPLICA}@{version}", local)
        state = puller.save_state(f"at-{version}", local)
    return results


def run_cases(workdir):
    """All push and pull cases against one server; returns their figures."""
    root = Path(workdir)
    with Server(root / "serve") as server:
        print(f"  sqlferry serve listening on {server.url}", flush=True)
        pusher = Client(root / "pusher", server)
        puller = Client(root / "puller", server)
        states, digests, changed = make_states(root, pusher)
        results = push_cases(root, pusher, states, digests, changed)
        results += pull_cases(root, puller, states, digests, changed)
        store_bytes = sum(f.stat().st_size for f in server.data.rglob("*") if f.is_file())
        print(f"  server store: {store_bytes / MIB:.0f} MiB in {server.data}", flush=True)
    # What is left is small: the clients' caches, histories and secrets.
    shutil.rmtree(root / "serve", ignore_errors=True)
    for client in ("pusher", "puller"):
        shutil.rmtree(root / client / "saved", ignore_errors=True)
    for path in root.glob("*.db"):
        mkdb.remove_db(str(path))
        Path(f"{path}-sqlferry").unlink(missing_ok=True)
    return results


# ---------------------------------------------------------------------------- memory


def memory_run(workdir, size=1024 * MIB):
    """Peak RSS of a fresh server receiving a full push of a 1 GiB database, and of
    the pushing client."""
    root = Path(workdir) / "memory"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    src = str(root / f"mem-{size // MIB}m.db")
    print(f"  making the {size // MIB} MiB database for the server", flush=True)
    _, pages, page_size = mkdb.make_blob(src, size, PAGE_SIZE)
    try:
        with Server(root / "serve") as server:
            client = Client(root / "client", server)
            digest = client.digest(src)
            idle_kib = server.vm_hwm_kib()
            cmd = [str(SQLFERRY), "push", src, "--replica", "bench/mem.db", "--server", server.url,
                   "--json"]
            run = rss.run(cmd, dict(client.env, SQLFERRY_KEY=server.key))
            if run.returncode != 0:
                fail(f"{' '.join(cmd)} exited with {run.returncode}:\n"
                     f"{run.stderr.decode()}")
            stats = json.loads(run.stdout)
            if stats["digest"].startswith("c:"):
                digest = client.digest(src, form=stats["digest"])
            # pages_sent leaves out the lock-byte page, which a 1 GiB file has.
            if stats["digest"] != digest or stats["pages_total"] != pages:
                fail(f"memory run: pushed {stats['pages_total']} pages with digest "
                     f"{stats['digest']}, the database has {pages} and {digest}")
            server_kib = server.vm_hwm_kib()
        return {"db_bytes": os.path.getsize(src), "pages": pages, "page_size": page_size,
                "server_idle_kib": idle_kib, "server_peak_kib": server_kib,
                "client_peak_kib": run.peak_kib,
                "client_wait4_maxrss_kib": run.wait4_maxrss_kib, "wall_s": run.wall_s,
                "bytes_sent": stats["bytes_sent"]}
    finally:
        shutil.rmtree(root, ignore_errors=True)


# ---------------------------------------------------------------------------- report


def figures(results, local):
    """(headers, rows) of the push and pull figures. "vs local" is the wall time over
    that of the local `sqlferry push` of the same case in this run."""
    local_wall = {r["case"]: r["sqlferry_s"] for r in local}
    local_name = {"full": "full copy"}
    headers = ["case", "wall s", "engine s", "server cpu s", "vs local", "bytes sent",
               "bytes received",
               "hash bytes", "pages moved", "changed pages", "pages vs changed"]
    rows = []
    for r in results:
        base = local_wall.get(local_name.get(r["case"], r["case"]))
        payload = r["bytes_sent"] if r["direction"] == "push" else r["bytes_received"]
        rows.append([
            f"{r['direction']} {r['case']}", "%.3f" % r["wall_s"],
            "%.3f" % (r["engine_ms"] / 1000), "%.3f" % r["server_cpu_s"],
            "%.2f" % (r["wall_s"] / base) if base else "—",
            r["bytes_sent"], r["bytes_received"], r["hash_bytes"], r["pages_sent"],
            r["changed_pages"], on_wire_vs_changed(r, payload),
        ])
    return headers, rows


def on_wire_vs_changed(r, payload):
    changed = r["changed_pages"] * r["page_size"]
    if not changed:
        return f"+{payload} B"
    return "%+.2f%%" % (100.0 * (payload - changed) / changed)


def memory_figures(memory):
    headers = ["database", "pages", "server idle MiB", "server peak MiB",
               "client peak MiB", "wall s"]
    rows = [["%d MiB" % (memory["db_bytes"] // MIB), memory["pages"], "%.1f" % (memory["server_idle_kib"] / 1024),
             "%.1f" % (memory["server_peak_kib"] / 1024),
             "%.1f" % (memory["client_peak_kib"] / 1024), "%.1f" % memory["wall_s"]]]
    return headers, rows


def targets(results, memory, local):
    """(target, measured, limit, PASS/MISS) rows for the server part; `local` holds the
    local cases of the same run (the full copy the full push and pull are held to)."""
    out = []

    def check(what, measured, limit, ok):
        out.append([what, measured, limit, "PASS" if ok else "MISS"])

    local_full = next(r["sqlferry_s"] for r in local if r["case"] == "full copy")
    for r in results:
        if r["case"] != "full":
            continue
        most = PUSH_FULL_VS_LOCAL_MAX if r["direction"] == "push" else PULL_FULL_VS_LOCAL_MAX
        ratio = r["wall_s"] / local_full
        check(f"{r['direction']} full: wall / local full copy", "%.2f" % ratio,
              "<= %.1f" % most, ratio <= most)
        if r["direction"] == "push":
            check("push full: server CPU", "%.2f s" % r["server_cpu_s"],
                  "< %.1f s" % PUSH_FULL_SERVER_CPU_MAX_S,
                  r["server_cpu_s"] < PUSH_FULL_SERVER_CPU_MAX_S)

    for r in results:
        if r["case"] == "full":
            continue
        name = f"{r['direction']} {r['case']}"
        payload = r["bytes_sent"] if r["direction"] == "push" else r["bytes_received"]
        limit = (r["changed_pages"] * r["page_size"] * BYTES_SLACK + r["hash_bytes"]
                 + CONTROL_BYTES)
        label = "bytes sent" if r["direction"] == "push" else "bytes received"
        check(f"{name}: {label}", payload, "<= %d" % limit, payload <= limit)
    for r in results:
        if r["direction"] == "push" and r["case"] != "full":
            check(f"push {r['case']}: hash bytes (known base)", r["hash_bytes"], "= 0",
                  r["hash_bytes"] == 0)
    if memory:
        kib = memory["server_peak_kib"]
        check("server peak RSS, 1 GiB push", "%.1f MiB" % (kib / 1024), "< 100 MiB",
              kib < SERVER_RSS_MAX_KIB)
    return out
