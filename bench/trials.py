"""Kill -9 trials: sqlferry killed at a random moment loses nothing and tears nothing.

    python3 bench/trials.py [--push N] [--server N] [--pull N] [--size-mib M]
                            [--bin PATH] [--seed S] [--dir DIR] [--keep]

A real `sqlferry serve` listens on 127.0.0.1 (a fixed free port, so it can be killed and
restarted at the same address) with its own data directory; a pushing client and a
pulling client each have their own XDG directories (two machines). The origin is a WAL
database of M MiB (default 8) made by bench/mkdb.py. Every trial first changes the
origin (1% of the rows, scatter or cluster, so the push has work to do), then:

  push    starts `sqlferry push ORIGIN acme/trial.db` and SIGKILLs the client after a
          random delay (uniform over 0 .. 1.5 x a measured push). One trial in five
          pushes a fresh copy to a new replica with the admin key instead (a first
          push, which builds the replica in a private file).
  server  the same pushes, but SIGKILLs the server after the random delay, then
          restarts it on the same data directory and port.
  pull    pushes the change (not killed), then starts `sqlferry pull acme/trial.db
          REPLICA` into the puller's copy while a reader process reads that copy in a
          loop, and SIGKILLs the pull after a random delay.

After each trial it checks what a user would check:

  - the replica's latest version is the old one or the new one (its digest is the
    digest of the origin before or after the change), never anything else;
  - no acknowledged version is lost: a push that exited 0 before the kill names a
    version that exists, with the new digest;
  - the latest version pulls back into a new file with exit 0, `PRAGMA
    integrity_check` ok (through `sqlferry verify`) and the version's digest;
  - the next push of the same origin (not killed) exits 0, whatever the killed one did:
    "already at version N" or a new version, never VERSION_CONFLICT; afterwards the
    latest version has the origin's digest;
  - the puller's copy after a killed pull has integrity ok and the old or the new
    digest; the reader never saw an error; the next pull exits 0;
  - no file a crashed push or server leaves behind (`*.new`, its -wal/-shm) is left in
    the data directory once the replica has been used again.

It prints one line per trial and a table of counts; it exits 1 if any check failed
(the failing trial's details are printed). The binary defaults to target/release/sqlferry,
else target/debug/sqlferry (`cargo build --release` first for realistic timing).
"""

import argparse
import json
import os
import random
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.dont_write_bytecode = True
sys.path.insert(0, str(Path(__file__).resolve().parent))
import mkdb  # noqa: E402
from server import xdg_env  # noqa: E402  (one machine's XDG directories)

REPO = Path(__file__).resolve().parent.parent
REPLICA = "acme/trial.db"
START_TIMEOUT_S = 30
RUN_TIMEOUT_S = 120

# The reader of the puller's copy: reads in a loop until told to stop, counting reads
# and errors; an error is any exception, including "database disk image is malformed".
READER = r"""
import sqlite3, sys, os, time
path, stop = sys.argv[1], sys.argv[2]
ok = err = 0
last = ""
while not os.path.exists(stop):
    try:
        db = sqlite3.connect(path, timeout=30)
        row = db.execute("SELECT count(*), sum(length(payload)) FROM t").fetchone()
        if row[0] == 0:
            raise RuntimeError("no rows")
        db.close()
        ok += 1
    except Exception as e:
        err += 1
        last = repr(e)
    time.sleep(0.005)
print(ok, err, last)
"""


class Failure(Exception):
    pass


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`sqlferry serve` on a fixed loopback port; start() again after a kill reuses the
    data directory (the admin key is printed only on the first start)."""

    def __init__(self, binary, root):
        self.binary = binary
        self.root = Path(root)
        self.data = self.root / "data"
        self.port = free_port()
        self.url = f"ws://127.0.0.1:{self.port}"
        self.key = None
        self.proc = None
        self.starts = 0

    def start(self):
        self.root.mkdir(parents=True, exist_ok=True)
        self.starts += 1
        out = open(self.root / f"stdout.{self.starts}", "w+")
        err = open(self.root / f"stderr.{self.starts}", "w+")
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            self.proc = subprocess.Popen(
                [self.binary, "serve", "--data", str(self.data), "--listen",
                 f"127.0.0.1:{self.port}"],
                env=xdg_env(self.root), stdout=out, stderr=err)
            while True:
                out.seek(0)
                text = out.read()
                if "listening on" in text:
                    if self.key is None:
                        for line in text.splitlines():
                            if line.startswith("admin key") and "sfk_" in line:
                                self.key = line[line.index("sfk_"):].split()[0]
                        if self.key is None:
                            raise Failure("the first start printed no admin key")
                    return
                if self.proc.poll() is not None:
                    break
                if time.monotonic() > deadline:
                    raise Failure("sqlferry serve did not start")
                time.sleep(0.02)
            # The port of a killed server may take a moment to be free again.
            err.seek(0)
            if time.monotonic() > deadline:
                raise Failure(f"sqlferry serve exited: {err.read()}")
            time.sleep(0.1)

    def kill(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()

    def leftovers(self):
        """Files a crashed push leaves: a new replica's private file and its WAL."""
        found = []
        for dirpath, _, files in os.walk(self.data):
            found += [os.path.join(dirpath, f) for f in files
                      if ".new" in f and f.startswith(".")]
        return found


class Client:
    def __init__(self, binary, root, server):
        self.binary = binary
        self.root = Path(root)
        self.server = server
        self.env = xdg_env(self.root)

    def cmd(self, args):
        return [self.binary, *args]

    def env_for(self, admin):
        return dict(self.env, SQLFERRY_KEY=self.server.key) if admin else self.env

    def run(self, args, admin=False):
        proc = subprocess.run(self.cmd(args), env=self.env_for(admin), capture_output=True,
                              text=True, timeout=RUN_TIMEOUT_S)
        return proc.returncode, proc.stdout, proc.stderr

    def start(self, args, admin=False):
        return subprocess.Popen(self.cmd(args), env=self.env_for(admin),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def must(self, args, admin=False, what=""):
        code, out, err = self.run(args, admin)
        if code != 0:
            raise Failure(f"{what or ' '.join(args)}: exit {code}: {err.strip()}")
        return out

    def push_args(self, local, replica):
        return ["push", str(local), replica, "--server", self.server.url, "--json"]

    def versions(self, replica):
        code, out, err = self.run(["versions", replica, "--server", self.server.url,
                                   "--json"], admin=True)
        if code == 8:
            return []
        if code != 0:
            raise Failure(f"versions {replica}: exit {code}: {err.strip()}")
        data = json.loads(out)
        return data["versions"] if isinstance(data, dict) else data

    def verify(self, path):
        out = self.must(["verify", str(path), "--json"], what=f"verify {path}")
        report = json.loads(out)
        if report.get("integrity") != ["ok"]:
            raise Failure(f"{path}: integrity check says {report.get('integrity')}")
        return report["digest"]


def killed_run(proc, delay):
    """Waits `delay` seconds for `proc`; SIGKILLs it if it is still running. Returns
    (exit code or None if killed, stdout)."""
    try:
        out, _ = proc.communicate(timeout=delay)
        return proc.returncode, out
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate()
        return None, out


class Trials:
    def __init__(self, args):
        self.args = args
        self.rng = random.Random(args.seed)
        self.root = Path(args.dir)
        self.server = Server(args.bin, self.root / "server")
        self.pusher = Client(args.bin, self.root / "pusher", self.server)
        self.puller = Client(args.bin, self.root / "puller", self.server)
        self.origin = self.root / "origin.db"
        self.replica_copy = self.root / "puller" / "replica.db"
        self.counts = {}
        self.failures = []
        self.push_s = 0.5
        self.pull_s = 0.5
        self.firsts = 0

    # ------------------------------------------------------------------ set-up

    def setup(self):
        shutil.rmtree(self.root, ignore_errors=True)
        self.root.mkdir(parents=True)
        (self.root / "puller").mkdir()
        print(f"making a {self.args.size_mib} MiB origin", flush=True)
        mkdb.make(str(self.origin), self.args.size_mib * 1024 * 1024)
        self.server.start()
        self.pusher.must(self.pusher.push_args(self.origin, REPLICA), admin=True,
                         what="the first push")
        # Measure a typical push and pull, so kills land across the whole sync.
        pushes, pulls = [], []
        for i in range(3):
            self.change(i)
            t = time.perf_counter()
            self.pusher.must(self.pusher.push_args(self.origin, REPLICA))
            pushes.append(time.perf_counter() - t)
            t = time.perf_counter()
            self.pull_into(self.replica_copy)
            pulls.append(time.perf_counter() - t)
        self.push_s = sorted(pushes)[1]
        self.pull_s = sorted(pulls)[1]
        print(f"a push takes about {self.push_s:.2f} s, a pull {self.pull_s:.2f} s", flush=True)

    def change(self, i):
        mkdb.change(str(self.origin), self.rng.choice(("scatter", "cluster")), seed=1000 + i)

    def pull_into(self, path, admin=True):
        return self.puller.must(["pull", REPLICA, str(path), "--server", self.server.url,
                                 "--json"], admin=admin, what=f"pull into {path}")

    def latest(self, replica=REPLICA):
        v = self.pusher.versions(replica)
        return v[-1] if v else None

    # ------------------------------------------------------------------ checks

    def check_replica(self, replica, old_digest, new_digest, acked):
        """The latest version is old or new; an acknowledged version exists; it pulls
        back whole."""
        versions = self.pusher.versions(replica)
        latest = versions[-1] if versions else None
        allowed = {d for d in (old_digest, new_digest) if d}
        if latest is None:
            if old_digest is not None or acked is not None:
                raise Failure(f"{replica} has no version (acknowledged: {acked})")
            return
        if latest["digest"] not in allowed:
            raise Failure(f"{replica}@{latest['number']} has digest {latest['digest']}, "
                          f"neither the old nor the new state")
        if acked is not None:
            match = [v for v in versions if v["number"] == acked["version"]]
            if not match or match[0]["digest"] != new_digest:
                raise Failure(f"acknowledged version {acked['version']} is lost "
                              f"(versions: {[(v['number'], v['digest'][:8]) for v in versions]})")
        with tempfile.TemporaryDirectory(dir=self.root) as tmp:
            out = Path(tmp) / "check.db"
            self.puller.must(["pull", f"{replica}@{latest['number']}", str(out), "--server",
                              self.server.url, "--json"], admin=True,
                             what=f"pull {replica}@{latest['number']}")
            got = self.puller.verify(out)
            if got != latest["digest"]:
                raise Failure(f"{replica}@{latest['number']} pulled with digest {got}, "
                              f"the version says {latest['digest']}")

    def check_next_push(self, local, replica, admin, new_digest):
        code, out, err = self.pusher.run(self.pusher.push_args(local, replica), admin)
        if code != 0:
            raise Failure(f"the push after the kill: exit {code}: {err.strip()}")
        latest = self.latest(replica)
        if latest is None or latest["digest"] != new_digest:
            raise Failure(f"after the next push {replica} is not at the origin's digest")

    def check_leftovers(self):
        left = self.server.leftovers()
        if left:
            raise Failure(f"files left behind: {left}")

    # ------------------------------------------------------------------ trials

    def push_trial(self, i, kill_server):
        first = i % 5 == 4
        if first:
            self.firsts += 1
            replica = f"acme/first-{'s' if kill_server else 'c'}{self.firsts}.db"
            local = self.root / "pusher" / f"first-{i}.db"
            self.change(i)
            mkdb.copy_db(str(self.origin), str(local))
            old = None
        else:
            replica, local = REPLICA, self.origin
            old = self.latest()["digest"]
            self.change(i)
        new = self.pusher.verify(local)
        delay = self.rng.uniform(0, 1.5 * self.push_s)
        proc = self.pusher.start(self.pusher.push_args(local, replica), admin=first)
        if kill_server:
            time.sleep(delay)
            self.server.kill()
            out, _ = proc.communicate(timeout=RUN_TIMEOUT_S)
            code = proc.returncode
            self.server.start()
        else:
            code, out = killed_run(proc, delay)
        acked = json.loads(out) if code == 0 and out.strip() else None
        outcome = "acked" if acked else ("killed" if code is None else f"exit {code}")
        self.check_replica(replica, old, new, acked)
        # A first push killed before it saved its PUSH key leaves this client without
        # one: the admin key pushes again.
        self.check_next_push(local, replica, first, new)
        self.check_leftovers()
        return f"{'first push, ' if first else ''}{outcome} after {delay:.2f}s"

    def pull_trial(self, i):
        old = self.puller.verify(self.replica_copy)
        self.change(i)
        new = self.pusher.verify(self.origin)
        self.pusher.must(self.pusher.push_args(self.origin, REPLICA))
        stop = self.root / "reader.stop"
        stop.unlink(missing_ok=True)
        reader = subprocess.Popen([sys.executable, "-c", READER, str(self.replica_copy),
                                   str(stop)], stdout=subprocess.PIPE, text=True)
        try:
            delay = self.rng.uniform(0, 1.5 * self.pull_s)
            proc = self.puller.start(["pull", REPLICA, str(self.replica_copy), "--server",
                                      self.server.url, "--json"], admin=True)
            code, _ = killed_run(proc, delay)
            got = self.puller.verify(self.replica_copy)
            if got not in (old, new):
                raise Failure(f"the puller's copy has digest {got}: neither old nor new")
            if code not in (None, 0):
                raise Failure(f"the pull exited {code} before it was killed")
            self.pull_into(self.replica_copy)
            if self.puller.verify(self.replica_copy) != new:
                raise Failure("the pull after the kill did not bring the new version")
        finally:
            stop.touch()
            out, _ = reader.communicate(timeout=60)
        ok, err, last = (out.split(" ", 2) + ["", "", ""])[:3]
        if int(err or 0) > 0:
            raise Failure(f"the reader saw {err} errors ({ok} reads ok): {last.strip()}")
        return f"{'completed' if code == 0 else 'killed'} after {delay:.2f}s, {ok} reads ok"

    def run(self):
        self.setup()
        plan = (["push"] * self.args.push + ["server"] * self.args.server
                + ["pull"] * self.args.pull)
        self.rng.shuffle(plan)
        for i, kind in enumerate(plan):
            started = time.perf_counter()
            try:
                if kind == "pull":
                    what = self.pull_trial(i)
                else:
                    what = self.push_trial(i, kill_server=kind == "server")
                ok = True
            except (Failure, subprocess.TimeoutExpired, json.JSONDecodeError,
                    sqlite3.Error) as e:
                what, ok = f"FAILED: {e}", False
                self.failures.append((i, kind, str(e)))
                self.recover()
            c = self.counts.setdefault(kind, [0, 0])
            c[0 if ok else 1] += 1
            print(f"{i + 1:4}/{len(plan)} {kind:6} {what} ({time.perf_counter() - started:.1f} s)",
                  flush=True)
        self.server.stop()

    def recover(self):
        """After a failed trial, the next one starts from a running server, a replica
        at the origin's state and a puller's copy at the latest version, so one failure
        is counted once rather than in every trial after it."""
        try:
            if self.server.proc is None or self.server.proc.poll() is not None:
                self.server.start()
            self.pusher.run(self.pusher.push_args(self.origin, REPLICA) + ["--force"],
                            admin=True)
            self.puller.run(["pull", REPLICA, str(self.replica_copy), "--server",
                             self.server.url, "--force"], admin=True)
        except (Failure, subprocess.TimeoutExpired) as e:
            print(f"  could not recover: {e}", flush=True)

    def report(self):
        print("\nkilled    trials  failed")
        for kind in ("push", "server", "pull"):
            ok, bad = self.counts.get(kind, [0, 0])
            print(f"{kind:8} {ok + bad:7} {bad:7}")
        total = sum(sum(c) for c in self.counts.values())
        print(f"{'all':8} {total:7} {len(self.failures):7}")
        for i, kind, why in self.failures:
            print(f"  trial {i + 1} ({kind}): {why}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--push", type=int, default=100, help="trials killing the pushing client")
    p.add_argument("--server", type=int, default=100, help="trials killing the server")
    p.add_argument("--pull", type=int, default=100, help="trials killing the pulling client")
    p.add_argument("--size-mib", type=int, default=8, help="size of the origin database")
    p.add_argument("--bin", default=None, help="the sqlferry binary")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--dir", default=None, help="work directory (default: a temporary one)")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    args = p.parse_args()
    if args.bin is None:
        for profile in ("release", "debug"):
            candidate = REPO / "target" / profile / "sqlferry"
            if candidate.exists():
                args.bin = str(candidate)
                break
        else:
            sys.exit("no target/*/sqlferry: run cargo build --release first")
    tmp = None
    if args.dir is None:
        tmp = tempfile.mkdtemp(prefix="sqlferry-trials-")
        args.dir = tmp
    print(f"binary {args.bin}, work directory {args.dir}, seed {args.seed}", flush=True)
    trials = Trials(args)
    try:
        trials.run()
    finally:
        trials.server.kill()
        trials.report()
        if tmp and not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    sys.exit(1 if trials.failures else 0)


if __name__ == "__main__":
    main()
