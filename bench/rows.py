"""Row diffs: `sqlferry diff` next to `sqldiff` on the same two databases, same run.

    python3 bench/rows.py [--bin PATH] [--size-mb 200] [--repeats 3] [--dir DIR]
                          [--modes scatter,cluster]

Makes the benchmark database (`bench/mkdb.py make`, --size-mb MiB), then for each change
mode a copy with 1% of its rows changed (`mkdb.py change COPY MODE`), and runs on the pair
(A = original, B = changed), in turn:

  sqlferry diff A B                   the summary (counts per table)
  sqlferry diff A B --changeset X     the changes as a SQLite changeset
  sqlferry diff A B --sql             equivalent SQL
  sqldiff --summary A B               the reference summary
  sqldiff --changeset X A B           the reference changeset

For each: wall seconds, CPU seconds (user + system) and peak RSS (VmHWM sampled while
it runs, `bench/rss.py`), medians of --repeats runs after one untimed warm-up of each
command (files in the page cache). The changeset sizes are printed too, and `sqlferry
apply` of sqlferry's changeset onto a copy of A must give B's rows (checked once per
mode: a benchmark that measured a wrong answer would mean nothing). Wall times mean something only on a quiet machine.

Disk: about 4x --size-mb under DIR (a temporary directory by default), removed at the end.
"""

import argparse
import os
import shutil
import statistics
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import mkdb  # noqa: E402
import rss  # noqa: E402


def same_rows(x, y):
    """Whether the tables `t` of databases x and y hold the same rows (in SQL, so this
    script stays small and its size does not leak into the next command's figures)."""
    import sqlite3

    db = sqlite3.connect(x)
    try:
        db.execute("ATTACH ? AS y", (y,))
        n = db.execute(
            "SELECT (SELECT count(*) FROM (SELECT * FROM main.t EXCEPT SELECT * FROM y.t))"
            " + (SELECT count(*) FROM (SELECT * FROM y.t EXCEPT SELECT * FROM main.t))"
        ).fetchone()[0]
        return n == 0
    finally:
        db.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bin", default=os.path.join(HERE, "..", "target", "release", "sqlferry"))
    ap.add_argument("--size-mb", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default=None)
    ap.add_argument("--modes", default="scatter,cluster")
    args = ap.parse_args()
    sqldiff = shutil.which("sqldiff")
    if sqldiff is None:
        sys.exit("sqldiff not found: install Debian's sqlite3-tools")
    work = tempfile.mkdtemp(prefix="sqlferry-rows-", dir=args.dir)
    try:
        a = os.path.join(work, "a.db")
        print(f"making a {args.size_mb} MiB database with bench/mkdb.py", flush=True)
        print("  rows %d pages %d page_size %d" % mkdb.make(a, args.size_mb << 20), flush=True)
        mkdb.checkpoint(a)
        for mode in args.modes.split(","):
            b = os.path.join(work, f"b-{mode}.db")
            mkdb.copy_db(a, b)
            print(f"{mode}: {mkdb.change(b, mode)} rows changed", flush=True)
            mkdb.checkpoint(b)
            ours, theirs = os.path.join(work, "ours.cs"), os.path.join(work, "theirs.cs")
            cases = [
                ("sqlferry diff A B", [args.bin, "diff", a, b]),
                ("sqlferry diff A B --changeset X", [args.bin, "diff", a, b, "--changeset", ours]),
                ("sqlferry diff A B --sql", [args.bin, "diff", a, b, "--sql"]),
                ("sqldiff --summary A B", [sqldiff, "--summary", a, b]),
                ("sqldiff --changeset X A B", [sqldiff, "--changeset", theirs, a, b]),
            ]
            for name, cmd in cases:
                rss.run_ok(cmd)  # warm-up
                got = [rss.run_ok(cmd) for _ in range(args.repeats)]
                wall = statistics.median(g.wall_s for g in got)
                cpu = statistics.median(g.cpu_s for g in got)
                peak = max(g.peak_kib for g in got) / 1024
                print(f"  {name:34s} wall {wall:6.3f} s  cpu {cpu:6.3f} s  rss {peak:6.1f} MiB", flush=True)
            print(f"  changeset bytes: sqlferry {os.path.getsize(ours)}, sqldiff {os.path.getsize(theirs)}")
            c = os.path.join(work, "c.db")
            mkdb.copy_db(a, c)
            rss.run_ok([args.bin, "apply", ours, c])
            if not same_rows(c, b):
                sys.exit(f"{mode}: applying sqlferry's changeset to A did not give B's rows")
            print("  check: apply of sqlferry's changeset onto A gives B's rows", flush=True)
            for p in (b, c):
                mkdb.remove_db(p)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
