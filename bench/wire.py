"""Compression on the wire: bytes and time of full pushes and pulls through
`sqlferry serve`, pages zstd-compressed against plain, side by side.

    python3 bench/wire.py [--bin PATH] [--size BYTES] [--repeats N] [--dir DIR]

Three databases of about --size bytes (64 MiB by default), made by bench/mkdb.py:
`text` (`mkdb.py make`, the benchmark's rows of uniformly random letters), `apptext`
(`mkdb.py text`, application-like messages: Zipf-distributed words, names, timestamps,
JSON) and `blob` (`mkdb.py blob`, random 1000-byte blobs, which do not compress);
`--kinds` picks some. Two servers on 127.0.0.1:0, each with its own store (a store
keeps a page in the form it first arrived in, so one store shared by both modes would
serve the second mode the first one's pages): the client offers compression (`zstd`)
to one, and not (`plain`: SQLFERRY_COMPRESS=off, what an older client does) to the
other. For each database, after one untimed warm-up push (so the
client's page-hash cache is warm, as in bench/server.py), each repeat runs, plain and
zstd alternately:

  push full   the database onto a new replica (admin key)
  pull full   that version into a new file

and records the wall time of the command, the client's CPU (user + system, from
wait4), the server's CPU over the command (/proc/PID/stat utime + stime), and the bytes
the command reports (`bytes_sent` of a push, `bytes_received` of a pull: the protocol
frames as they went on the wire, compressed pages compressed, without WebSocket
framing). Medians of --repeats runs (3). Every pull's digest must equal the pushed
database's. Wall times mean something only on a quiet machine; CPU and bytes do anyway.

Disk: about 4x --size under DIR (a temporary directory by default), deleted at the end.
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

TICKS = os.sysconf("SC_CLK_TCK")


def fail(message):
    sys.exit(f"bench/wire.py: {message}")


def proc_cpu(pid):
    """User + system CPU seconds of process `pid` so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


class Client:
    """One machine (its own XDG directories) running sqlferry against the server, with
    compression offered or not."""

    def __init__(self, root, server, compress):
        self.server = server
        self.env = dict(srv.xdg_env(root), SQLFERRY_KEY=server.key)
        if not compress:
            self.env["SQLFERRY_COMPRESS"] = "off"

    def run(self, args):
        """Runs sqlferry ARGS: (wall s, client CPU s, server CPU s, JSON output)."""
        cmd = [str(srv.SQLFERRY), *args]
        server_before = proc_cpu(self.server.proc.pid)
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, env=self.env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        out, err = proc.communicate()
        wall = time.perf_counter() - started
        # communicate() reaped it: its CPU is in the children's rusage, by difference.
        if proc.returncode != 0:
            fail(f"{' '.join(cmd)} exited with {proc.returncode}:\n{err}")
        server_cpu = proc_cpu(self.server.proc.pid) - server_before
        return wall, server_cpu, json.loads(out) if out.strip() else None


def children_cpu():
    r = os.times()
    return r.children_user + r.children_system


def timed(client, args):
    """(wall, client CPU, server CPU, report) of one command."""
    before = children_cpu()
    wall, server_cpu, report = client.run(args)
    return wall, children_cpu() - before, server_cpu, report


def run_kind(root, servers, kind, db, repeats):
    clients = {mode: Client(root / f"client-{kind}-{mode}", servers[mode], mode == "zstd")
               for mode in ("plain", "zstd")}
    _, _, _, v = timed(clients["zstd"], ["verify", str(db), "--json"])
    digest = v["digest"]
    for mode, c in clients.items():
        url = servers[mode].url
        timed(c, ["push", str(db), f"warm/{kind}-{mode}", "--server", url, "--json"])
    rows = {}
    for r in range(repeats):
        for mode in (("plain", "zstd") if r % 2 == 0 else ("zstd", "plain")):
            c, url = clients[mode], servers[mode].url
            replica = f"wire/{kind}-{mode}-{r}"
            push = timed(c, ["push", str(db), replica, "--server", url, "--json"])
            out = root / f"pulled-{kind}-{mode}-{r}.db"
            pull = timed(c, ["pull", replica, str(out), "--server", url, "--json"])
            if pull[3]["digest"] != digest:
                fail(f"pull {replica}: digest {pull[3]['digest']}, pushed {digest}")
            os.remove(out)
            rows.setdefault(("push full", mode), []).append(
                (push[3]["bytes_sent"], push[0], push[1], push[2]))
            rows.setdefault(("pull full", mode), []).append(
                (pull[3]["bytes_received"], pull[0], pull[1], pull[2]))
    return rows


def median(runs, i):
    return statistics.median(run[i] for run in runs)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bin", type=Path, default=srv.SQLFERRY)
    p.add_argument("--size", type=int, default=64 * 1024 * 1024)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dir", type=Path)
    p.add_argument("--kinds", default="text,apptext,blob",
                   help="databases to measure, comma-separated (text, apptext, blob)")
    args = p.parse_args()
    srv.SQLFERRY = args.bin.resolve()
    if not srv.SQLFERRY.exists():
        fail(f"{srv.SQLFERRY} does not exist: build it (cargo build --release) or pass --bin")
    root = Path(tempfile.mkdtemp(prefix="sqlferry-wire-", dir=args.dir))
    try:
        makers = {"text": mkdb.make, "apptext": mkdb.make_text, "blob": mkdb.make_blob}
        kinds = args.kinds.split(",")
        for kind in kinds:
            if kind not in makers:
                fail(f"unknown kind {kind!r}: text, apptext or blob")
        dbs = {kind: root / f"{kind}.db" for kind in kinds}
        for kind, db in dbs.items():
            makers[kind](str(db), args.size)
        results = {}
        with srv.Server(root / "server-plain") as plain, \
                srv.Server(root / "server-zstd") as zstd:
            servers = {"plain": plain, "zstd": zstd}
            for kind, db in dbs.items():
                results[kind] = (os.path.getsize(db), run_kind(root, servers, kind, db,
                                                                args.repeats))
        print(f"sqlferry {srv.SQLFERRY}, medians of {args.repeats}; wall / client CPU / "
              "server CPU in seconds; bytes as reported by --json")
        print(f"{'database':<16} {'operation':<10} {'plain bytes':>12} {'zstd bytes':>12} "
              f"{'ratio':>6}  {'plain wall/cli/srv':>20}  {'zstd wall/cli/srv':>20}  "
              f"{'wall ×':>6} {'cpu ×':>6}")
        for kind, (size, rows) in results.items():
            for op in ("push full", "pull full"):
                plain, zstd = rows[(op, "plain")], rows[(op, "zstd")]
                pb, zb = median(plain, 0), median(zstd, 0)
                pt = [median(plain, i) for i in (1, 2, 3)]
                zt = [median(zstd, i) for i in (1, 2, 3)]
                print(f"{kind + ' ' + str(round(size / 2**20)) + ' MiB':<16} {op:<10} "
                      f"{pb:>12.0f} {zb:>12.0f} {zb / pb:>6.3f}  "
                      f"{pt[0]:>6.2f} {pt[1]:>6.2f} {pt[2]:>6.2f}  "
                      f"{zt[0]:>6.2f} {zt[1]:>6.2f} {zt[2]:>6.2f}  "
                      f"{zt[0] / pt[0]:>6.2f} {(zt[1] + zt[2]) / (pt[1] + pt[2]):>6.2f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
