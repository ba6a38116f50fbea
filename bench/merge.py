"""Merging a push made from an older version: `push --merge` next to a plain push of the
same change, same run.

    python3 bench/merge.py [--bin PATH] [--sizes-mb 50,200] [--repeats 3] [--dir DIR]

For each size (`bench/mkdb.py make`) and each change (scatter: 1% of the rows anywhere;
cluster: 1% of the rows in one range), two machines edit one replica of the embedded
store from version 1: A changes 1% of the rows with even ids (or the first half's range)
and pushes (version 2); B changes 1% of the rows with odd ids (or the second half's
range), so no row is changed on both sides, and then:

  plain   B's change pushed onto a replica that is still at version 1 (what the push
          would cost if nobody had pushed in between)
  merge   `push --merge` of B onto the replica at version 2: the rows of both sides
          diffed against version 1, B's applied onto a copy of version 2, checked,
          stored as version 3, and B brought to version 3

Each is timed on its own copy of the store and of B (copied before the timer starts),
--repeats times; medians of wall seconds, CPU seconds (user + system of the command)
and peak RSS (VmHWM sampled while it runs, `bench/rss.py`). After each merge the script
checks B holds both sides' changes (2% of the rows upper-cased) and `PRAGMA
integrity_check` is ok.
"""

import argparse
import os
import random
import shutil
import sqlite3
import statistics
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import mkdb  # noqa: E402
import rss  # noqa: E402


def edit(path, mode, side, seed):
    """Upper-cases 1% of the rows of `path`: side 0 the even ids (or the first half's
    range), side 1 the odd ids (or the second half's). Returns the ids changed."""
    db = sqlite3.connect(path, isolation_level=None)
    n = db.execute("SELECT max(id) FROM t").fetchone()[0] + 1
    count = n // 100
    rnd = random.Random(seed)
    if mode == "scatter":
        ids = rnd.sample(range(side, n, 2), count)
    else:
        half = n // 2
        start = side * half + rnd.randrange(half - count)
        ids = list(range(start, start + count))
    db.execute("BEGIN")
    db.executemany("UPDATE t SET payload=upper(payload) WHERE id=?", ((i,) for i in ids))
    db.execute("COMMIT")
    db.close()
    return ids


def upper_rows(path):
    db = sqlite3.connect(path)
    try:
        return db.execute("SELECT count(*) FROM t WHERE payload = upper(payload)").fetchone()[0]
    finally:
        db.close()


def integrity(path):
    db = sqlite3.connect(path)
    try:
        return db.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        db.close()


def copy_tree(src, dest):
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(src, dest)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bin", default=os.path.join(HERE, "..", "target", "release", "sqlferry"))
    ap.add_argument("--sizes-mb", default="50,200")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default=None)
    args = ap.parse_args()
    sqlferry = os.path.abspath(args.bin)
    work = tempfile.mkdtemp(prefix="sqlferry-merge-", dir=args.dir)
    try:
        print(f"{'size':>6} {'change':8} {'what':6} {'wall s':>8} {'cpu s':>8} {'rss MiB':>8}")
        for size in (int(s) for s in args.sizes_mb.split(",")):
            base = os.path.join(work, f"base-{size}.db")
            mkdb.make(base, size << 20)
            mkdb.checkpoint(base)
            for mode in ("scatter", "cluster"):
                # The starting states, made once: B's edited file with its history
                # (base v1) and the replica at v1 (plain) or at A's v2 (merge).
                # Everything is built and run at one path (`live`): the history and the
                # hash lists are keyed by the database's absolute path.
                states = {w: os.path.join(work, f"state-{w}") for w in ("plain", "merge")}
                state = os.path.join(work, "live")
                for d in list(states.values()) + [state]:
                    shutil.rmtree(d, ignore_errors=True)
                os.makedirs(state)
                env = dict(os.environ)
                for x in ("DATA", "STATE", "CACHE", "CONFIG"):
                    env[f"XDG_{x}_HOME"] = os.path.join(state, x.lower())
                a, b = os.path.join(state, "a.db"), os.path.join(state, "b.db")
                mkdb.copy_db(base, a)
                rss.run_ok([sqlferry, "push", a, "ns/r"], env)
                rss.run_ok([sqlferry, "pull", "ns/r", b], env)
                edit(b, mode, 1, 2)
                mkdb.checkpoint(b)
                shutil.copytree(state, states["plain"])
                edit(a, mode, 0, 1)
                rss.run_ok([sqlferry, "push", a, "ns/r"], env)
                want = upper_rows(a) + upper_rows(b)
                shutil.copytree(state, states["merge"])
                results = {"plain": [], "merge": []}
                for _ in range(args.repeats):
                    for what in ("plain", "merge"):
                        copy_tree(states[what], state)
                        cmd = [sqlferry, "push", b, "ns/r"] + (["--merge"] if what == "merge" else [])
                        results[what].append(rss.run_ok(cmd, env))
                        if what == "merge":
                            got, ok = upper_rows(b), integrity(b)
                            if got != want or ok != "ok":
                                sys.exit(f"{size} MiB {mode}: after the merge B has {got} "
                                         f"changed rows (want {want}), integrity {ok}")
                for what, got in results.items():
                    wall = statistics.median(g.wall_s for g in got)
                    cpu = statistics.median(g.cpu_s for g in got)
                    peak = max(g.peak_kib for g in got) / 1024
                    print(f"{size:>4}MB {mode:8} {what:6} {wall:8.3f} {cpu:8.3f} {peak:8.1f}", flush=True)
                for d in list(states.values()) + [state]:
                    shutil.rmtree(d)
            mkdb.remove_db(base)
        print("checked: every merge left B with both sides' rows and integrity_check ok")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
