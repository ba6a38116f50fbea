"""The server's memory under many concurrent pulls: issue 8's "100 concurrent pulls of a
60 MB version stay under 200 MiB".

    python3 bench/server_memory.py [--bin PATH] [--pulls 100] [--size-mib 60]
                                   [--max-sessions N] [--workdir DIR]

A real `sqlferry serve` on 127.0.0.1:0 (bench/server.py's Server) receives one push of
a database made by bench/mkdb.py (make_blob, 4096-byte pages). Then its VmHWM is reset
(/proc/PID/clear_refs) and its VmRSS read, and `--pulls` `sqlferry pull` processes
start at once, each a machine of its own (own XDG directories), each pulling the
version into a new file. Once all have exited it prints the server's peak resident set
during the pulls (VmHWM), its resident set after (VmRSS, read once it has been idle for
2 s), how many pulls succeeded, and the exit codes of the others (10: told the server
was busy). Pulled files are checked against the version's digest and deleted.

--bin picks the binary (default target/release/sqlferry, else target/debug/sqlferry);
--max-sessions is passed to `serve` (its default otherwise). Memory only: no timing is
taken, so it may run while other builds do. Disk: the database, the store's copy and
every pulled file at once (100 x 60 MB = 6 GB with the defaults), under --workdir.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.dont_write_bytecode = True
sys.path.insert(0, str(Path(__file__).resolve().parent))
import mkdb  # noqa: E402
import rss  # noqa: E402
import server as bench_server  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
MIB = 1024 * 1024
REPLICA = "acme/app.db"
SETTLE_S = 2.0


def default_bin():
    for profile in ("release", "debug"):
        p = REPO / "target" / profile / "sqlferry"
        if p.exists():
            return p
    sys.exit("bench/server_memory.py: no target/release/sqlferry nor target/debug/sqlferry")


class Serve:
    """`sqlferry serve` on 127.0.0.1:0 with `extra` arguments; `url`, `key`, `proc`."""

    def __init__(self, binary, root, extra):
        self.binary, self.root, self.extra = binary, Path(root), extra

    def __enter__(self):
        self.root.mkdir(parents=True)
        self.proc = subprocess.Popen(
            [str(self.binary), "serve", "--data", str(self.root / "data"), "--listen",
             "127.0.0.1:0", *self.extra],
            env=bench_server.xdg_env(self.root), stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, text=True)
        self.key = self.url = None
        for line in self.proc.stdout:  # ends at EOF if it exits
            if line.startswith("admin key") and "sfk_" in line:
                self.key = line[line.index("sfk_"):].split()[0]
            elif line.startswith("listening on ws://"):
                self.url = line.split()[2]
                break
        if self.url is None or self.key is None:
            self.proc.kill()
            sys.exit("bench/server_memory.py: sqlferry serve did not start")
        return self

    def __exit__(self, *exc):
        self.proc.terminate()
        self.proc.wait(30)
        return False


def client_env(root, key):
    env = bench_server.xdg_env(root)
    env["SQLFERRY_KEY"] = key
    return env


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bin", type=Path, default=None)
    ap.add_argument("--pulls", type=int, default=100)
    ap.add_argument("--size-mib", type=int, default=60)
    ap.add_argument("--max-sessions", type=int, default=None)
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args(argv)
    binary = (args.bin or default_bin()).resolve()
    bench_server.SQLFERRY = binary
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="sqlferry-srvmem-", dir=args.workdir))
    try:
        db = work / "app.db"
        _, pages, page_size = mkdb.make_blob(str(db), args.size_mib * MIB)
        print(f"binary {binary}")
        print(f"database {pages} pages of {page_size} bytes ({pages * page_size / MIB:.1f} MiB)")
        extra = [] if args.max_sessions is None else ["--max-sessions", str(args.max_sessions)]
        with Serve(binary, work / "server", extra) as srv:
            push = subprocess.run(
                [str(binary), "push", str(db), REPLICA, "--server", srv.url, "--json"],
                env=client_env(work / "pusher", srv.key), capture_output=True, text=True)
            if push.returncode != 0:
                sys.exit(f"push failed ({push.returncode}): {push.stderr}")
            digest = json.loads(push.stdout)["digest"]
            pid = srv.proc.pid
            rss.reset_hwm(pid)
            before = rss.status_kib(pid, "VmRSS")
            procs = []
            for i in range(args.pulls):
                root = work / f"puller-{i}"
                root.mkdir()
                procs.append(subprocess.Popen(
                    [str(binary), "pull", REPLICA, str(root / "copy.db"), "--server", srv.url,
                     "--json"],
                    env=client_env(root, srv.key), stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE, text=True))
            codes = {}
            ok = 0
            for i, p in enumerate(procs):
                out, err = p.communicate()
                codes[p.returncode] = codes.get(p.returncode, 0) + 1
                if p.returncode == 0:
                    got = json.loads(out)["digest"]
                    if got != digest:
                        sys.exit(f"pull {i}: digest {got}, the version's is {digest}")
                    ok += 1
                elif p.returncode != 10:
                    print(f"  pull {i} exited {p.returncode}: {err.strip()}")
                shutil.rmtree(work / f"puller-{i}", ignore_errors=True)
            peak = rss.status_kib(pid, "VmHWM")
            time.sleep(SETTLE_S)
            after = rss.status_kib(pid, "VmRSS")
        print(f"pulls {args.pulls}: {ok} ok; exit codes {dict(sorted(codes.items()))}")
        print(f"server VmRSS before {before / 1024:.1f} MiB")
        print(f"server peak VmHWM during the pulls {peak / 1024:.1f} MiB")
        print(f"server VmRSS after {after / 1024:.1f} MiB")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1:])
