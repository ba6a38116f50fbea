"""A second process that reads a pull subscriber's database while versions land in it.

Usage: follower.py DB

Each read is one transaction: the row count of table w and its largest id. The writer
(writer.py) adds ids 1, 2, 3... without gaps, so every version has count = max id;
anything else is a mixed state. It prints "ready" after its first read and, when its
stdin closes, one JSON line: reads, errors, mismatches, and the largest id seen.
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
    reads, errors, mismatches, max_seen = 0, [], [], 0
    while not stop.is_set():
        try:
            con.execute("BEGIN")
            count, top = con.execute("SELECT count(*), coalesce(max(id), 0) FROM w").fetchone()
            con.execute("COMMIT")
            reads += 1
            max_seen = max(max_seen, top)
            if count != top and len(mismatches) < 10:
                mismatches.append([count, top])
        except sqlite3.Error as e:
            if len(errors) < 10:
                errors.append(str(e))
            try:
                con.execute("ROLLBACK")
            except sqlite3.Error:
                pass
        if reads == 1:
            print("ready", flush=True)
        stop.wait(0.005)
    con.close()
    print(json.dumps({"reads": reads, "errors": errors, "mismatches": mismatches,
                      "max_seen": max_seen}), flush=True)


if __name__ == "__main__":
    main()
