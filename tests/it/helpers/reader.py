"""A second process that reads a replica while sqlferry syncs into it.

Usage: reader.py DB

Each read is one transaction: the generation every row of t carries (min and max of
t.g), the row count, and the meta row (g, n) the origin wrote with them. A
self-consistent state has min = max = meta.g and count = meta.n; anything else is a
mixed state. Every tenth read also runs PRAGMA quick_check. It prints "ready" after
its first read and, when its stdin closes, one JSON line: reads, the generations
seen, errors and mismatches.
"""

import json
import sqlite3
import sys
import threading


def main():
    db = sys.argv[1]
    con = sqlite3.connect(db, timeout=30, isolation_level=None)
    stop = threading.Event()

    def wait_for_eof():
        sys.stdin.read()
        stop.set()

    threading.Thread(target=wait_for_eof, daemon=True).start()
    reads, seen, errors, mismatches = 0, set(), [], []
    while not stop.is_set():
        try:
            con.execute("BEGIN")
            lo, hi, count = con.execute("SELECT min(g), max(g), count(*) FROM t").fetchone()
            g, n = con.execute("SELECT g, n FROM meta").fetchone()
            check = "ok"
            if reads % 10 == 0:
                check = con.execute("PRAGMA quick_check").fetchone()[0]
            con.execute("COMMIT")
        except sqlite3.Error as e:
            errors.append(f"read {reads + 1}: {e}")
            try:
                con.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            if len(errors) > 20:
                break
            continue
        reads += 1
        seen.add(g)
        if not (lo == hi == g and count == n and check == "ok"):
            mismatches.append(
                {"min": lo, "max": hi, "meta": g, "count": count, "n": n, "check": check}
            )
        if reads == 1:
            print("ready", flush=True)
    con.close()
    print(
        json.dumps(
            {
                "reads": reads,
                "generations": sorted(seen),
                "errors": errors,
                "mismatches": mismatches[:20],
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
