"""What the sync log costs a push: the 1% cluster change pushed with and without it.

    python3 bench/synclog.py [--size-mb 200] [--rounds 9] [--workdir DIR] [--bin PATH]

Makes a WAL database of about --size-mb with bench/mkdb.py, pushes it once to a
replica of the embedded store (in DIR), then for each round rewrites 1% of the rows in
one contiguous id range (mkdb.py change cluster, a new seed each round) and pushes
that change, alternating rounds with the sync log on (the default) and off
(`SQLFERRY_SYNC_LOG=off`), so both see the same mix of changes and the same machine
state. Each push is timed around the whole command (wall) and by the CPU seconds of
the sqlferry process (utime + stime from os.wait4). Prints the median of each and the
difference, next to the spread (max - min) of the runs without the log: the log costs
nothing measurable when the difference is within that spread.

Also reports the sync log's size after the run. Needs Python 3 (standard library) and
a built binary (`cargo build --release`, or --bin).
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import mkdb  # noqa: E402


def run(binary, args, env):
    """Runs sqlferry; returns (wall seconds, CPU seconds)."""
    start = time.perf_counter()
    proc = subprocess.Popen([binary] + args, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    err = proc.stderr.read().decode()
    proc.stderr.close()
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit("sqlferry %s failed: %s" % (" ".join(args), err))
    return wall, usage.ru_utime + usage.ru_stime


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size-mb", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=9, help="pushes with the log, and as many without")
    ap.add_argument("--workdir")
    ap.add_argument("--bin")
    args = ap.parse_args()
    root = os.path.dirname(HERE)
    binary = args.bin or os.path.join(root, "target", "release", "sqlferry")
    if not args.bin:
        subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=root, check=True)
    work = args.workdir or tempfile.mkdtemp(prefix="sqlferry-synclog-")
    os.makedirs(work, exist_ok=True)
    for sub in ("state", "data", "cache", "config"):
        shutil.rmtree(os.path.join(work, sub), ignore_errors=True)
    env = dict(os.environ)
    for var in ("SQLFERRY_SERVER", "SQLFERRY_KEY", "SQLFERRY_SYNC_LOG", "RUST_LOG"):
        env.pop(var, None)
    env.update({
        "HOME": work,
        "XDG_STATE_HOME": os.path.join(work, "state"),
        "XDG_DATA_HOME": os.path.join(work, "data"),
        "XDG_CACHE_HOME": os.path.join(work, "cache"),
        "XDG_CONFIG_HOME": os.path.join(work, "config"),
    })
    off = dict(env, SQLFERRY_SYNC_LOG="off")
    db = os.path.join(work, "app.db")
    if not os.path.exists(db):
        mkdb.make(db, args.size_mb * 1024 * 1024)
    push = ["push", db, "--replica", "bench/app.db", "-q"]
    run(binary, push, env)  # the full first version
    with_log, without = [], []
    for i in range(2 * args.rounds):
        mkdb.change(db, "cluster", seed=100 + i)
        on = i % 2 == 0
        (with_log if on else without).append(run(binary, push, env if on else off))
    log = os.path.join(work, "state", "sqlferry", "syncs.sqlite")
    log_bytes = sum(os.path.getsize(log + s) for s in ("", "-wal") if os.path.exists(log + s))

    def med(runs, k):
        return statistics.median(r[k] for r in runs)

    print("1%% cluster push of a %d MB database, %d rounds each, medians" % (args.size_mb, args.rounds))
    print("%-22s %10s %10s" % ("", "wall s", "CPU s"))
    print("%-22s %10.4f %10.4f" % ("sync log on", med(with_log, 0), med(with_log, 1)))
    print("%-22s %10.4f %10.4f" % ("sync log off", med(without, 0), med(without, 1)))
    print("%-22s %10.4f %10.4f" % ("difference", med(with_log, 0) - med(without, 0),
                                   med(with_log, 1) - med(without, 1)))
    spread = lambda k: max(r[k] for r in without) - min(r[k] for r in without)  # noqa: E731
    print("%-22s %10.4f %10.4f" % ("spread without (max-min)", spread(0), spread(1)))
    print("sync log after %d pushes: %d bytes" % (len(with_log) + 1, log_bytes))


if __name__ == "__main__":
    main()
