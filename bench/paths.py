"""The server's plain paths, counted: CPU seconds and system calls of the server and of
the client for a full push and a full pull through `sqlferry serve` on loopback.

    python3 bench/paths.py [--bin PATH] [--db FILE | --size BYTES] [--repeats N]
                           [--strace] [--dir DIR]

The database is --db, or one made by `bench/mkdb.py make` of about --size bytes
(216 MB, the benchmark's, by default). A server of its own on 127.0.0.1:0; a client
with its own XDG directories (two machines, as far as sqlferry can tell); pages go
plain (a loopback peer: `--compress auto` sends plain). After one untimed push (so
the client's page-hash cache is warm), each repeat runs:

  push full, new store    the database onto a new replica of a store holding none of
                          its pages (a server started for it: every page is written)
  push full               the database onto a new replica of a store that holds its
                          pages (the server receives, hashes and looks up every page)
  pull full               that version into a new file

and records the client's CPU (user + system, from wait4) and the server's CPU over the
command (/proc/PID/stat). Medians of --repeats (3). Wall time is not reported: it
means something only on an idle machine (bench/engine.py measures it).

With --strace, one more run of each case under `strace -c -f`, for the server
(attached by PID) and the client: the count of each system call of interest. strace
slows both ends, so its runs are not the CPU figures.

Every pull's digest must equal the database's.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.dont_write_bytecode = True
sys.path.insert(0, str(Path(__file__).resolve().parent))
import mkdb  # noqa: E402
import server as srv  # noqa: E402

SYSCALLS = ("pread64", "pwrite64", "read", "write", "sendto", "recvfrom", "futex",
            "epoll_wait", "sched_yield")


def fail(message):
    sys.exit(f"bench/paths.py: {message}")


def children_cpu():
    r = os.times()
    return r.children_user + r.children_system


def parse_strace(path):
    """{syscall: calls} from a `strace -c` summary."""
    calls = {}
    for line in Path(path).read_text().splitlines():
        parts = line.split()
        if len(parts) >= 5 and parts[0][0].isdigit() and not parts[-1].startswith("-"):
            name = parts[-1]
            try:
                # % time, seconds, usecs/call, calls, [errors], syscall
                calls[name] = int(parts[3])
            except ValueError:
                pass
        elif parts and parts[-1] == "total" and len(parts) >= 4:
            calls["total"] = int(parts[3])
    return calls


class Client:
    def __init__(self, root, server):
        self.server = server
        self.env = dict(srv.xdg_env(root), SQLFERRY_KEY=server.key)

    def run(self, args, strace_to=None):
        """(client CPU s, server CPU s, JSON report, strace files) of sqlferry ARGS."""
        cmd = [str(srv.SQLFERRY), *args, "--server", self.server.url, "--json"]
        attached = None
        files = None
        if strace_to:
            files = (f"{strace_to}.server", f"{strace_to}.client")
            attached = subprocess.Popen(
                ["strace", "-c", "-f", "-o", files[0], "-p", str(self.server.proc.pid)],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            # strace says "Process N attached" on stderr once it holds the threads.
            attached.stderr.readline()
            time.sleep(0.3)
            cmd = ["strace", "-c", "-f", "-o", files[1], *cmd]
        server_before = self.server.cpu_s()
        before = children_cpu()
        proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True)
        client_cpu = children_cpu() - before
        server_cpu = self.server.cpu_s() - server_before
        if attached:
            attached.send_signal(2)
            attached.wait(30)
        if proc.returncode != 0:
            fail(f"{' '.join(cmd)} exited with {proc.returncode}:\n{proc.stderr}")
        return client_cpu, server_cpu, json.loads(proc.stdout), files


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bin", type=Path, default=srv.SQLFERRY)
    p.add_argument("--db", type=Path)
    p.add_argument("--size", type=int, default=200 * 1024 * 1024)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--strace", action="store_true")
    p.add_argument("--dir", type=Path)
    args = p.parse_args()
    srv.SQLFERRY = args.bin.resolve()
    root = Path(tempfile.mkdtemp(prefix="sqlferry-paths-", dir=args.dir))
    try:
        db = args.db
        if db is None:
            db = root / "app.db"
            mkdb.make(str(db), args.size)
        env = srv.xdg_env(root / "client")
        digest = json.loads(subprocess.run(
            [str(srv.SQLFERRY), "verify", str(db), "--json"], env=env,
            capture_output=True, text=True, check=True).stdout)["digest"]
        pages = os.path.getsize(db) // 4096
        print(f"{db}: {os.path.getsize(db)} bytes, about {pages} pages", flush=True)
        cases = {}
        with srv.Server(root / "serve") as server:
            c = Client(root / "client", server)
            c.run(["push", str(db), "paths/warm.db"])
            runs = list(range(args.repeats)) + (["strace"] if args.strace else [])
            for r in runs:
                strace_dir = root if r == "strace" else None
                tag = (lambda case: str(root / f"{case}")) if strace_dir else (lambda case: None)
                # A store that holds none of the pages: a server of its own.
                with srv.Server(root / f"serve-new-{r}") as fresh:
                    cf = Client(root / "client", fresh)
                    res = cf.run(["push", str(db), f"paths/new-{r}.db"], tag("push-new"))
                    cases.setdefault("push full, new store", {})[r] = res
                shutil.rmtree(root / f"serve-new-{r}")
                res = c.run(["push", str(db), f"paths/full-{r}.db"], tag("push"))
                cases.setdefault("push full", {})[r] = res
                pulled = root / f"pulled-{r}.db"
                res = c.run(["pull", f"paths/full-{r}.db", str(pulled)], tag("pull"))
                if res[2]["digest"] != digest:
                    fail(f"pull: digest {res[2]['digest']}, pushed {digest}")
                os.remove(pulled)
                cases.setdefault("pull full", {})[r] = res
        print()
        print(f"sqlferry {srv.SQLFERRY}, medians of {args.repeats}; CPU seconds")
        print()
        print("| case | client CPU s | server CPU s |")
        print("|:--|--:|--:|")
        for case, runs in cases.items():
            timed = [v for k, v in runs.items() if k != "strace"]
            cli = statistics.median(v[0] for v in timed)
            ser = statistics.median(v[1] for v in timed)
            print(f"| {case} | {cli:.3f} | {ser:.3f} |")
        if args.strace:
            print()
            print("system calls (one run under strace -c -f)")
            print()
            print("| case | side | " + " | ".join(SYSCALLS) + " | total |")
            print("|:--|:--|" + "--:|" * (len(SYSCALLS) + 1))
            for case, runs in cases.items():
                files = runs["strace"][3]
                for side, f in zip(("server", "client"), files):
                    calls = parse_strace(f)
                    row = " | ".join(f"{calls.get(s, 0):,}" for s in SYSCALLS)
                    print(f"| {case} | {side} | {row} | {calls.get('total', 0):,} |")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
