"""What 200 idle databases cost one `sqlferry daemon`, next to one subscriber process each.

    python3 bench/daemon.py [--databases 200] [--minutes 1] [--server] [--no-reference]
                            [--workdir DIR] [--bin PATH]

Makes --databases small WAL databases in one directory and a daemon configuration with
a [[directory]] entry pushing each to tenants/<file name> (the embedded store, or with
--server a `sqlferry serve` on 127.0.0.1 started by the script). Starts the daemon,
waits until every database's start push is done, lets it settle for 10 s, then samples
the daemon's RSS (VmRSS, VmHWM) and its CPU seconds (utime + stime from
/proc/PID/stat) over --minutes of idleness. One database then gets a commit, to show
the daemon still pushes (the line's latency from the commit is printed).

The reference, in the same run: the same databases with one `sqlferry push
--subscribe` process each (what a user had before the daemon), the same idle time,
their RSS and CPU summed. At most --reference-processes (100) run, since the 129th
process of one user fails on Linux's default limit of 128 inotify instances; their
sum is also scaled to --databases. --no-reference skips it.

Targets (issue 12): under 64 MiB RSS and under 0.5 s CPU per minute for 200 idle
databases. Needs Python 3 (standard library) and a built binary (`cargo build
--release`, or --bin).
"""

import argparse
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid):
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # utime and stime are fields 14 and 15; after the ")" split, 12 and 13.
    return (int(fields[11]) + int(fields[12])) / TICK


def rss_kib(pid, field="VmRSS"):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def threads(pid):
    return len(os.listdir("/proc/%d/task" % pid))


def make_db(path):
    c = sqlite3.connect(path)
    c.execute("PRAGMA journal_mode=WAL")
    c.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)")
    c.executemany("INSERT INTO t(v) VALUES (?)", [("row %d" % i * 8,) for i in range(200)])
    c.commit()
    c.close()


class Lines:
    """A process's stdout and stderr lines, counted as they come."""

    def __init__(self, proc):
        self.lines = []
        self.cond = threading.Condition()
        for stream in (proc.stdout, proc.stderr):
            threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream):
        for raw in stream:
            with self.cond:
                self.lines.append(raw.decode(errors="replace").rstrip("\n"))
                self.cond.notify_all()

    def wait(self, pred, timeout):
        deadline = time.monotonic() + timeout
        with self.cond:
            while not pred(self.lines):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.cond.wait(left)
        return True


def idle_figures(pids, minutes):
    """RSS (sum, KiB) and CPU seconds per minute of `pids` over `minutes` idle."""
    before = sum(cpu_seconds(p) for p in pids)
    time.sleep(minutes * 60)
    after = sum(cpu_seconds(p) for p in pids)
    rss = sum(rss_kib(p) for p in pids)
    hwm = sum(rss_kib(p, "VmHWM") for p in pids)
    return rss, hwm, (after - before) / minutes


def start_server(binary, work, env):
    data = os.path.join(work, "server-data")
    proc = spawn([binary, "serve", "--data", data, "--listen", "127.0.0.1:0"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    lines = Lines(proc)
    if not lines.wait(lambda ls: any("listening on" in l for l in ls)
                      and any(l.startswith("sfk_") or "admin key" in l for l in ls), 30):
        sys.exit("the server did not start: %s" % "\n".join(lines.lines))
    text = "\n".join(lines.lines)
    url = next(w for w in text.split() if w.startswith("ws://"))
    key = next(w for w in text.split() if w.startswith("sfk_"))
    return proc, url.rstrip(".,"), key


STARTED = []


def spawn(*args, **kw):
    """Popen, remembered: every process the script starts is stopped when it ends,
    however it ends (a benchmark must not leave 100 subscribers holding inotify)."""
    p = subprocess.Popen(*args, **kw)
    STARTED.append(p)
    return p


def main():
    try:
        run()
    finally:
        for p in STARTED:
            if p.poll() is None:
                p.kill()
                p.wait()


def run():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--databases", type=int, default=200)
    ap.add_argument("--minutes", type=float, default=1.0)
    ap.add_argument("--server", action="store_true", help="push to a local sqlferry serve")
    ap.add_argument("--no-reference", action="store_true")
    ap.add_argument("--reference-processes", type=int, default=100)
    ap.add_argument("--workdir")
    ap.add_argument("--bin")
    args = ap.parse_args()
    root = os.path.dirname(HERE)
    binary = args.bin or os.path.join(root, "target", "release", "sqlferry")
    if not args.bin:
        subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=root, check=True)
    work = args.workdir or tempfile.mkdtemp(prefix="sqlferry-daemon-")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    env = dict(os.environ)
    for sub in ("state", "data", "cache", "config"):
        env["XDG_%s_HOME" % sub.upper()] = os.path.join(work, "xdg", sub)
    env.pop("SQLFERRY_SERVER", None)
    env.pop("RUST_LOG", None)
    tenants = os.path.join(work, "tenants")
    os.makedirs(tenants)
    for i in range(args.databases):
        make_db(os.path.join(tenants, "t%04d.db" % i))
    server = None
    store = ""
    if args.server:
        server, url, key = start_server(binary, work, env)
        env["SQLFERRY_KEY"] = key
        store = 'server = "%s"\nkey_env = "SQLFERRY_KEY"\n' % url
    config = os.path.join(work, "daemon.toml")
    with open(config, "w") as f:
        f.write('[defaults]\nwait_idle = "10s"\n%s\n[[directory]]\npath = "%s"\n'
                'namespace = "tenants"\n' % (store, tenants))
    n = args.databases
    print("%d idle WAL databases in one directory, pushed to %s; %.1f min idle"
          % (n, "a local sqlferry serve" if server else "the embedded store", args.minutes))

    started = time.monotonic()
    daemon = spawn([binary, "daemon", "--config", config], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    lines = Lines(daemon)
    done = lambda ls: sum("push (start)" in l for l in ls) >= n
    if not lines.wait(done, 600):
        sys.exit("the daemon did not push every database: %s" % "\n".join(lines.lines[-20:]))
    print("daemon: %d start pushes in %.1f s" % (n, time.monotonic() - started))
    time.sleep(10)
    d_rss, d_hwm, d_cpu = idle_figures([daemon.pid], args.minutes)
    d_threads = threads(daemon.pid)
    # Still alive: one commit is pushed after --wait-idle.
    db = os.path.join(tenants, "t0000.db")
    c = sqlite3.connect(db)
    c.execute("INSERT INTO t(v) VALUES ('after idle')")
    c.commit()
    c.close()
    committed = time.monotonic()
    seen = len(lines.lines)
    pushed = lines.wait(lambda ls: any("t0000.db" in l and "version 2" in l
                                       for l in ls[seen:]), 60)
    latency = time.monotonic() - committed
    daemon.send_signal(signal.SIGTERM)
    code = daemon.wait(120)
    errors = [l for l in lines.lines if "failed" in l or "error" in l]

    ref = None
    if not args.no_reference:
        procs = []
        ref_n = min(n, args.reference_processes)
        for i in range(ref_n):
            db = os.path.join(tenants, "t%04d.db" % i)
            p = spawn([binary, "push", db, "--replica", "ref/t%04d.db" % i, "--subscribe",
                                  "--wait-idle", "10s"] +
                                 (["--server", url] if server else []),
                                 env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            procs.append((p, Lines(p)))
        for p, l in procs:
            if not l.wait(lambda ls: any("push (start)" in x for x in ls), 600):
                sys.exit("a reference subscriber did not start: %s" % "\n".join(l.lines))
        time.sleep(10)
        ref = idle_figures([p.pid for p, _ in procs], args.minutes)
        for p, _ in procs:
            p.send_signal(signal.SIGTERM)
        for p, _ in procs:
            p.wait(120)
    if server:
        server.send_signal(signal.SIGTERM)
        server.wait(30)

    mib = lambda k: k / 1024.0
    print()
    print("| %d idle databases | RSS | peak RSS | CPU per minute | threads |" % n)
    print("|---|---:|---:|---:|---:|")
    print("| one `sqlferry daemon` | %.1f MiB | %.1f MiB | %.3f s | %d |"
          % (mib(d_rss), mib(d_hwm), d_cpu, d_threads))
    if ref:
        print("| %d `push --subscribe` processes (sum) | %.1f MiB | %.1f MiB | %.3f s | |"
              % (ref_n, mib(ref[0]), mib(ref[1]), ref[2]))
        if ref_n < n:
            k = float(n) / ref_n
            print("| the same, scaled to %d (the 129th process would fail: inotify limit) "
                  "| %.1f MiB | %.1f MiB | %.3f s | |" % (n, mib(ref[0]) * k, mib(ref[1]) * k, ref[2] * k))
    print()
    ok_rss = mib(d_rss) < 64
    ok_cpu = d_cpu < 0.5
    print("target: RSS under 64 MiB: %s; CPU under 0.5 s/min: %s"
          % ("PASS" if ok_rss else "FAIL", "PASS" if ok_cpu else "FAIL"))
    print("a commit after the idle time pushed in %.1f s (wait-idle 10s): %s"
          % (latency, "yes" if pushed else "NO"))
    print("daemon exit code after SIGTERM: %d; failure lines: %d" % (code, len(errors)))
    for e in errors[:5]:
        print("  " + e)
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
