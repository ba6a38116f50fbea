"""What the source check costs a push: `PRAGMA quick_check` before every push.

    python3 bench/quickcheck.py [--size-mb 200] [--workdir DIR]

`push` runs `PRAGMA quick_check` on LOCAL before it sends anything, so a corrupt source
never replaces a good backup (`--allow-corrupt` skips it). This measures, in one run,
on a WAL database of about --size-mb made by bench/mkdb.py, with a warm page cache:

  quick_check alone      python3's sqlite3 running `PRAGMA quick_check` on the file
  full copy              `sqlferry push SRC NEW` with the check, and with --allow-corrupt
  no change              `sqlferry push SRC UP-TO-DATE` with and without the check
  1% cluster change      the same after bench/mkdb.py's cluster change
  .backup                `sqlite3 SRC ".backup DEST"` (Debian's sqlite3), for reference

Each figure is the median of 3 runs, wall clock around the whole command. Uses
target/release/sqlferry (run `cargo build --release` first).
"""

import argparse
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.dont_write_bytecode = True
sys.path.insert(0, str(Path(__file__).resolve().parent))
import mkdb  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SQLFERRY = REPO / "target" / "release" / "sqlferry"
REPEATS = 3


def timed(fn):
    runs = []
    for _ in range(REPEATS):
        prepare = fn()
        started = time.perf_counter()
        prepare()
        runs.append(time.perf_counter() - started)
    return statistics.median(runs)


def run(cmd, env):
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(map(str, cmd))}: exit {proc.returncode}: {proc.stderr}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-mb", type=int, default=200)
    p.add_argument("--workdir", default=None)
    args = p.parse_args()
    if not SQLFERRY.exists():
        sys.exit("no target/release/sqlferry: run cargo build --release first")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="sqlferry-quickcheck-"))
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    for var, sub in (("HOME", "home"), ("XDG_CACHE_HOME", "cache"),
                     ("XDG_STATE_HOME", "state"), ("XDG_CONFIG_HOME", "config"),
                     ("XDG_DATA_HOME", "data")):
        env[var] = str(work / sub)
    src = work / "src.db"
    if not src.exists():
        print(f"making a {args.size_mb} MB database", flush=True)
        mkdb.make(str(src), args.size_mb * 1024 * 1024)
    size = os.path.getsize(src)
    rows = []

    def quick_check():
        def go():
            db = sqlite3.connect(src)
            (result,) = db.execute("PRAGMA quick_check").fetchone()
            db.close()
            assert result == "ok", result
        return go
    rows.append(("quick_check alone", timed(quick_check), None))

    def full(extra):
        def prep():
            dest = work / "full.db"
            mkdb.remove_db(str(dest))
            shutil.rmtree(work / "cache", ignore_errors=True)
            return lambda: run([SQLFERRY, "push", src, dest, *extra], env)
        return prep
    rows.append(("full copy", timed(full([])), timed(full(["--allow-corrupt"]))))

    replica = work / "replica.db"
    mkdb.copy_db(str(src), str(replica))
    run([SQLFERRY, "push", src, replica, "--allow-corrupt"], env)

    def same(extra):
        return lambda: (lambda: run([SQLFERRY, "push", src, replica, *extra], env))
    rows.append(("no change", timed(same([])), timed(same(["--allow-corrupt"]))))

    before = work / "before.db"
    mkdb.copy_db(str(replica), str(before))
    changed = work / "changed.db"
    mkdb.copy_db(str(src), str(changed))
    mkdb.change(str(changed), "cluster")

    def cluster(extra):
        def prep():
            mkdb.copy_db(str(before), str(replica))
            return lambda: run([SQLFERRY, "push", changed, replica, *extra], env)
        return prep
    rows.append(("1% cluster change", timed(cluster([])), timed(cluster(["--allow-corrupt"])))
                )

    def backup():
        dest = work / "backup.db"
        mkdb.remove_db(str(dest))
        return lambda: run(["sqlite3", src, f".backup {dest}"], env)
    rows.append((".backup (reference)", timed(backup), None))

    print(f"\n{size / 1e6:.0f} MB WAL database, median of {REPEATS}, seconds")
    print(f"{'case':24} {'checked':>9} {'--allow-corrupt':>16} {'cost':>8}")
    for name, checked, unchecked in rows:
        cost = f"{checked - unchecked:+.3f}" if unchecked is not None else ""
        other = f"{unchecked:.3f}" if unchecked is not None else ""
        print(f"{name:24} {checked:9.3f} {other:>16} {cost:>8}")


if __name__ == "__main__":
    main()
