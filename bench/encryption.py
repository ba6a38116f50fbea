#!/usr/bin/env python3
"""What end-to-end encryption costs: the same pushes and pulls with and without a key,
in the same run (issue 15's "≤ 1.3×, memory flat").

    python3 bench/encryption.py [--size-mb 200] [--bin PATH] [--workdir DIR] [--repeats 3]

The database is bench/mkdb.py's `make` (200 MiB by default, WAL mode), and a copy of it
with 1% of its rows rewritten as one contiguous range. For each mode, `plain` and
`encrypted` (`--encryption-key-file`, a key from `sqlferry keygen`), alternating repeat
by repeat so that a drift of the machine hits both, each repeat in a fresh embedded
store (its own XDG directories: a machine of its own):

  push full     the database onto a new replica
  push 1%       the changed copy over the same local path, pushed (the base is known)
  pull full     version 1 into a new file
  pull 1%       version 2 into the file that holds version 1

Per operation, medians: wall seconds of the whole command, CPU seconds (user + system,
from wait4), and peak RSS (VmHWM sampled while it runs, bench/rss.py), then the
encrypted / plain ratio of each. Every pulled file must have the digest of the state
pushed (`sqlferry verify`), keyed or not.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.dont_write_bytecode = True
sys.path.insert(0, str(Path(__file__).resolve().parent))
import mkdb  # noqa: E402
import rss  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
OPERATIONS = ["push full", "push 1%", "pull full", "pull 1%"]


def fail(message):
    sys.exit(f"bench/encryption.py: {message}")


def xdg_env(root):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SQLFERRY_")}
    for var, sub in (("HOME", "home"), ("XDG_CONFIG_HOME", "config"),
                     ("XDG_DATA_HOME", "data"), ("XDG_STATE_HOME", "state"),
                     ("XDG_CACHE_HOME", "cache")):
        env[var] = str(Path(root) / sub)
    return env


def digest(bin, path):
    out = subprocess.run([str(bin), "verify", str(path), "--json"], capture_output=True,
                         text=True)
    if out.returncode != 0:
        fail(f"sqlferry verify {path} exited with {out.returncode}:\n{out.stderr}")
    report = json.loads(out.stdout)
    if report.get("integrity") != ["ok"]:
        fail(f"{path}: integrity check says {report.get('integrity')}")
    return report["digest"]


def one_repeat(bin, root, origin, changed, key, expected):
    """The four operations in a fresh store under `root`, with `key` (a key file) or
    without; returns {operation: rss.Run}."""
    root.mkdir(parents=True)
    env = xdg_env(root)
    keyed = ["--encryption-key-file", str(key)] if key else []
    local, pulled = root / "app.db", root / "pulled.db"
    mkdb.copy_db(origin, str(local))
    runs = {}

    def timed(name, args):
        run = rss.run([str(bin), *args, *keyed, "--json"], env)
        if run.returncode != 0:
            fail(f"{name} ({'encrypted' if key else 'plain'}) exited with "
                 f"{run.returncode}:\n{run.stderr.decode(errors='replace')}")
        runs[name] = run

    timed("push full", ["push", str(local), "--replica", "bench/app.db"])
    mkdb.copy_db(changed, str(local))
    timed("push 1%", ["push", str(local), "--replica", "bench/app.db"])
    timed("pull full", ["pull", "--replica", "bench/app.db@1", str(pulled)])
    if digest(bin, pulled) != expected[1]:
        fail(f"pull full ({'encrypted' if key else 'plain'}): not version 1 as pushed")
    timed("pull 1%", ["pull", "--replica", "bench/app.db@2", str(pulled)])
    if digest(bin, pulled) != expected[2]:
        fail(f"pull 1% ({'encrypted' if key else 'plain'}): not version 2 as pushed")
    shutil.rmtree(root)
    return runs


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
    work = Path(tempfile.mkdtemp(prefix="sqlferry-encbench-", dir=args.workdir))
    try:
        origin, changed = str(work / "origin.db"), str(work / "changed.db")
        print(f"making a {args.size_mb} MiB database with bench/mkdb.py", flush=True)
        mkdb.make(origin, args.size_mb * 1024 * 1024)
        mkdb.copy_db(origin, changed)
        mkdb.change(changed, "cluster")
        expected = {1: digest(args.bin, origin), 2: digest(args.bin, changed)}
        key = work / "bench.key"
        out = subprocess.run([str(args.bin), "keygen", str(key)], capture_output=True,
                             text=True)
        if out.returncode != 0:
            fail(f"sqlferry keygen exited with {out.returncode}:\n{out.stderr}")
        results = {"plain": [], "encrypted": []}
        for i in range(args.repeats):
            for mode in ("plain", "encrypted"):
                print(f"  repeat {i + 1}: {mode}", flush=True)
                results[mode].append(one_repeat(
                    args.bin, work / f"{mode}-{i}", origin, changed,
                    key if mode == "encrypted" else None, expected))
        size = os.path.getsize(origin)
        print()
        print(f"sqlferry {args.bin}, database {size:,} bytes, embedded store, medians of "
              f"{args.repeats}; load {os.getloadavg()[0]:.2f}")
        print()
        print("| operation | plain wall s | encrypted wall s | × | plain CPU s | "
              "encrypted CPU s | × | plain peak RSS MiB | encrypted peak RSS MiB |")
        print("|:--|--:|--:|--:|--:|--:|--:|--:|--:|")
        figures = {}
        for op in OPERATIONS:
            m = {mode: {f: statistics.median(getattr(r[op], f) for r in results[mode])
                        for f in ("wall_s", "cpu_s", "peak_kib")}
                 for mode in results}
            figures[op] = m
            p, e = m["plain"], m["encrypted"]
            print(f"| {op} | {p['wall_s']:.3f} | {e['wall_s']:.3f} | "
                  f"{e['wall_s'] / p['wall_s']:.2f} | {p['cpu_s']:.3f} | {e['cpu_s']:.3f} | "
                  f"{e['cpu_s'] / max(p['cpu_s'], 1e-9):.2f} | {p['peak_kib'] / 1024:.1f} | "
                  f"{e['peak_kib'] / 1024:.1f} |")
        (work / "results.json").write_text(json.dumps(figures, indent=1))
        print(f"\nall figures: {work / 'results.json'}")
    finally:
        for db in ("origin.db", "changed.db"):
            mkdb.remove_db(str(work / db))


if __name__ == "__main__":
    main()
