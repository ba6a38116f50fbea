#!/usr/bin/env python3
"""The same change pushed at 1 GiB and at a larger size, many times, by one or more builds.

Usage: python3 bench/same_change.py --bin NAME=PATH [--bin NAME=PATH ...]
                                    [--workdir DIR] [--rounds N] [--huge-gib N]

Issue 10 asks that "on a 10 GiB database the same changes take about the same time" as
on 1 GiB. bench/engine.py measures it once among everything else (three pushes, the
store made again each run); this keeps, for each build, a store of each size made once
(a full copy by that build: a store's layout is the build's), then for each build and
size pushes N times the change 1 GiB's 1% makes (the same number of rows rewritten in
one contiguous range, by a second process, auto-checkpoints off, as engine.py's
"cluster, same rows as 1 GiB's 1%"), each push timed with its CPU and /proc/PID/io.
The first push after the stores are opened is not counted (an application process is
started to hold each database open, and the WAL it finds is new to the store's client:
that push reads the whole file). Each index's files are read once before the timed
pushes, so every build starts with its index in the page cache.

Builds run one after the other, each on its own stores (about 1.1x the database size
each on disk); the databases are made once in DIR by engine.py's own code and kept.
Prints, for each build and size, the medians (wall, CPU, bytes read, bytes that reached
the disk) and every wall time, so a merge or a checkpoint that one push pays shows.
Run it alone on the machine: the figures are wall times.
"""

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import engine  # noqa: E402
import mkdb  # noqa: E402

GIB = 1 << 30
MIB = 1 << 20

HOLDER = ("import sqlite3, sys\n"
          "c = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
          "c.execute('PRAGMA user_version = 7')\n"
          "print('ready', flush=True)\n"
          "sys.stdin.read()")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bin", action="append", required=True, metavar="NAME=PATH",
                        help="a build to measure (repeat for several)")
    parser.add_argument("--workdir", default="/tmp/sqlferry-same-change")
    parser.add_argument("--rounds", type=int, default=7, help="timed pushes a build and size")
    parser.add_argument("--huge-gib", type=int, default=10, help="the larger size in GiB")
    args = parser.parse_args()
    builds = [b.split("=", 1) for b in args.bin]
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    sizes = [(1, GIB), (args.huge_gib, args.huge_gib * GIB)]

    holders = []
    labs = {}
    try:
        for gib, size in sizes:
            src = str(work / f"big-{size // MIB}m.db")
            if not os.path.exists(src):
                print(f"making the {gib} GiB database (kept for later runs)", flush=True)
                mkdb.make_blob(src, size, engine.PAGE_SIZE)
            holder = subprocess.Popen([sys.executable, "-c", HOLDER, src], text=True,
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            holder.stdout.readline()
            holders.append(holder)
            for name, path in builds:
                lab = engine.Lab(work / f"{name}-{gib}g")
                push = [path, "push", src, "--replica", f"bench/b{gib}.db", "--json"]
                if not (lab.dir / "data").exists():
                    wall = engine.measured_run(push, lab.env)[0]
                    print(f"{name}: {gib} GiB full copy {wall:.1f} s", flush=True)
                labs[(name, gib)] = (lab, src, size, push)

        seed = 1000
        for (name, gib), (lab, src, size, push) in labs.items():
            seed += 1
            engine.change_live(src, seed=seed, autocheckpoint=False, fraction=0.01 * GIB / size)
            engine.measured_run(push, lab.env)
            for root, _, files in os.walk(lab.dir / "data"):
                for f in files:
                    if f.startswith(("index", "run-")):
                        with open(os.path.join(root, f), "rb") as fh:
                            while fh.read(MIB):
                                pass

        print(f"\n{'build':<12} {'size':>6} {'wall s':>7} {'cpu s':>6} {'read MB':>8} "
              f"{'disk write MB':>14}  every wall s")
        for (name, gib), (lab, src, size, push) in labs.items():
            runs = []
            for _ in range(args.rounds):
                seed += 1
                engine.change_live(src, seed=seed, autocheckpoint=False,
                                   fraction=0.01 * GIB / size)
                wall, cpu, io, _ = engine.measured_run(push, lab.env)
                runs.append((wall, cpu, io["rchar"],
                             io["write_bytes"] - io["cancelled_write_bytes"]))

            def med(i):
                return statistics.median(r[i] for r in runs)

            print(f"{name:<12} {gib:>4} G {med(0):>7.3f} {med(1):>6.3f} {med(2) / 1e6:>8.1f} "
                  f"{med(3) / 1e6:>14.1f}  {[round(r[0], 3) for r in runs]}", flush=True)
    finally:
        for h in holders:
            h.stdin.close()
            h.wait()


if __name__ == "__main__":
    main()
