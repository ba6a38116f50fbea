"""A second process that writes to an origin database while sqlferry syncs it.

Usage: writer.py DB INTERVAL_MS WAL_AUTOCHECKPOINT

Every INTERVAL_MS it commits one row to table w (BEGIN IMMEDIATE; INSERT id n+1;
COMMIT), ids 1, 2, 3... without gaps. It prints "ready" after its first commit and,
when its stdin closes, one JSON line: commits, errors, and the longest commit in ms.
"""

import json
import sqlite3
import sys
import threading
import time


def main():
    db, interval_ms, autocheckpoint = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
    con = sqlite3.connect(db, timeout=30, isolation_level=None)
    # No fsync: a stall here must come from locks, not from the disk under a busy CI.
    con.execute("PRAGMA synchronous = OFF")
    con.execute(f"PRAGMA wal_autocheckpoint = {autocheckpoint}")
    stop = threading.Event()

    def wait_for_eof():
        sys.stdin.read()
        stop.set()

    threading.Thread(target=wait_for_eof, daemon=True).start()
    commits, errors, max_ms = 0, [], 0.0
    while not stop.is_set():
        started = time.monotonic()
        try:
            con.execute("BEGIN IMMEDIATE")
            con.execute("INSERT INTO w(id, at) VALUES (?, ?)", (commits + 1, time.time()))
            con.execute("COMMIT")
            commits += 1
        except sqlite3.Error as e:
            errors.append(f"commit {commits + 1}: {e}")
            try:
                con.execute("ROLLBACK")
            except sqlite3.Error:
                pass
        max_ms = max(max_ms, (time.monotonic() - started) * 1000)
        if commits == 1 and not errors:
            print("ready", flush=True)
        stop.wait(interval_ms / 1000)
    con.close()
    print(json.dumps({"commits": commits, "errors": errors, "max_commit_ms": max_ms}), flush=True)


if __name__ == "__main__":
    main()
