#!/usr/bin/env python3
"""What a push that changes nothing writes to disk, push after push, and where.

Usage: python3 bench/no_change_writes.py [--bin PATH] [--workdir DIR] [--size-gib N]
                                         [--rounds N] [--perf]

Issue 10 asks that "a no-change push writes under 100 KB to disk". bench/engine.py
measures it among everything else (the median of three pushes); this runs one full push
of a WAL database that an application process keeps open (made once in DIR by engine.py's
own code and kept), then N pushes with nothing changed, each after an untimed sync(2),
and prints each one's write_bytes and cancelled_write_bytes from /proc/PID/io (read
before the process is reaped). The first no-change push after a replica is made differs
from the ones after it (the replica was never read; the history's room is made), so
every push is shown. With --perf, one more push runs under
`perf record -e writeback:writeback_dirty_folio` and the pages it dirtied are counted by
file (inodes of files that still exist are named; the rest is the block device's
metadata or a file since removed).

The store, cache and state are made anew in DIR/no-change each run. Needs perf only
with --perf.
"""

import argparse
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import engine  # noqa: E402
import mkdb  # noqa: E402

GIB = 1 << 30

HOLDER = ("import sqlite3, sys\n"
          "c = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
          "c.execute('PRAGMA user_version = 7')\n"
          "print('ready', flush=True)\n"
          "sys.stdin.read()")


def inode_names(root):
    names = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            try:
                names[os.stat(p).st_ino] = os.path.relpath(p, root)
            except OSError:
                pass
    return names


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bin", default=str(engine.SQLFERRY),
                        help="the sqlferry binary (default: the release build)")
    parser.add_argument("--workdir", default="/tmp/sqlferry-bench")
    parser.add_argument("--size-gib", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--perf", action="store_true")
    args = parser.parse_args()

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    src = str(workdir / f"big-{args.size_gib * 1024}m.db")
    if not os.path.exists(src):
        print(f"making the {args.size_gib} GiB database (kept for later runs)", flush=True)
        mkdb.make_blob(src, args.size_gib * GIB, engine.PAGE_SIZE)
    home = workdir / "no-change"
    shutil.rmtree(home, ignore_errors=True)
    env = dict(os.environ, XDG_CACHE_HOME=str(home / "cache"),
               XDG_CONFIG_HOME=str(home / "config"), XDG_DATA_HOME=str(home / "data"),
               XDG_STATE_HOME=str(home / "state"))
    push = [args.bin, "push", src, "--replica", "bench/no-change", "--json"]
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, src], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        holder.stdout.readline()
        wall, _, io, _ = engine.measured_run(push, env)
        print(f"full push: {wall:.2f} s, {io['write_bytes'] / 1e6:.0f} MB written")
        print(f"{'push':>6} {'wall s':>8} {'write_bytes':>12} {'cancelled':>10} {'net KiB':>8}")
        for i in range(args.rounds):
            wall, _, io, out = engine.measured_run(push, env)
            net = io["write_bytes"] - io["cancelled_write_bytes"]
            print(f"{i + 1:>6} {wall:>8.4f} {io['write_bytes']:>12} "
                  f"{io['cancelled_write_bytes']:>10} {net / 1024:>8.1f}", flush=True)
        if args.perf:
            data = home / "perf.data"
            os.sync()
            subprocess.run(["perf", "record", "-q", "-e", "writeback:writeback_dirty_folio",
                            "-o", str(data), "--"] + push, env=env, check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            script = subprocess.run(["perf", "script", "-i", str(data), "-F", "trace"],
                                    capture_output=True, text=True, check=True).stdout
            inodes = Counter(int(w[4:]) for line in script.splitlines()
                             for w in line.split() if w.startswith("ino="))
            names = inode_names(home)
            print(f"pages dirtied by one more no-change push: {sum(inodes.values())}")
            for ino, n in inodes.most_common():
                print(f"  {n:>4}  {names.get(ino, f'inode {ino} (metadata, or removed)')}")
    finally:
        holder.stdin.close()
        holder.wait()


if __name__ == "__main__":
    main()
