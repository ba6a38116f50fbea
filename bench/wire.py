"""Compression on the wire: bytes and time of full pushes and pulls through
`sqlferry serve`, with `--compress off`, `zstd` and `auto`, on links of several speeds.

    python3 bench/wire.py [--bin PATH] [--size BYTES] [--repeats N] [--dir DIR]
                          [--kinds text,apptext,blob] [--links direct,1000,100]

Databases of about --size bytes (64 MiB by default), made by bench/mkdb.py: `text`
(`mkdb.py make`, the benchmark's rows of uniformly random letters), `apptext`
(`mkdb.py text`, application-like messages: Zipf-distributed words, names, timestamps,
JSON) and `blob` (`mkdb.py blob`, random 1000-byte blobs, which do not compress);
`--kinds` picks some.

Links (`--links`): `direct` is the client talking to the server on 127.0.0.1 (a
loopback peer: `auto` sends plain from the start); a number N is a TCP proxy limited to
N Mbit/s each way (a token bucket, this script run as `--proxy`, its own process), which
the client reaches on this machine's non-loopback address (so `auto` sees a peer that
is not on this machine, as over a LAN); `0` is that proxy without a limit.

For each link and each mode, a server of its own (a store keeps a page in the form it
first arrived in, so a shared store would serve one mode the pages of another); after
one untimed warm-up push (so the client's page-hash cache is warm, as in
bench/server.py), each repeat runs, the modes in turn:

  push full   the database onto a new replica (admin key)
  pull full   that version into a new file

and records the wall time of the command, the client's CPU (user + system, from
wait4), the server's CPU over the command (/proc/PID/stat utime + stime), and the bytes
the command reports (`bytes_sent` of a push, `bytes_received` of a pull: the protocol
frames as they went on the wire, compressed pages compressed, without WebSocket
framing). Medians of --repeats runs (3). Every pull's digest must equal the pushed
database's. Wall times mean something only on a quiet machine; CPU and bytes do anyway.

Disk: about 4x --size under DIR (a temporary directory by default), deleted at the end.
"""

import argparse
import contextlib
import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.dont_write_bytecode = True
sys.path.insert(0, str(Path(__file__).resolve().parent))
import mkdb  # noqa: E402
import server as srv  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")


def fail(message):
    sys.exit(f"bench/wire.py: {message}")


def proc_cpu(pid):
    """User + system CPU seconds of process `pid` so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


class Client:
    """One machine (its own XDG directories) running sqlferry against the server, with
    `--compress MODE` (through SQLFERRY_COMPRESS, which older builds read as on/off)."""

    def __init__(self, root, server, mode):
        self.server = server
        self.env = dict(srv.xdg_env(root), SQLFERRY_KEY=server.key, SQLFERRY_COMPRESS=mode)

    def run(self, args):
        """Runs sqlferry ARGS: (wall s, client CPU s, server CPU s, JSON output)."""
        cmd = [str(srv.SQLFERRY), *args]
        server_before = proc_cpu(self.server.proc.pid)
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, env=self.env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        out, err = proc.communicate()
        wall = time.perf_counter() - started
        # communicate() reaped it: its CPU is in the children's rusage, by difference.
        if proc.returncode != 0:
            fail(f"{' '.join(cmd)} exited with {proc.returncode}:\n{err}")
        server_cpu = proc_cpu(self.server.proc.pid) - server_before
        return wall, server_cpu, json.loads(out) if out.strip() else None


def children_cpu():
    r = os.times()
    return r.children_user + r.children_system


def timed(client, args):
    """(wall, client CPU, server CPU, report) of one command."""
    before = children_cpu()
    wall, server_cpu, report = client.run(args)
    return wall, children_cpu() - before, server_cpu, report


MODES = ("off", "zstd", "auto")


def run_kind(root, servers, urls, kind, db, repeats):
    """Rows of (bytes, wall, client CPU, server CPU) by (operation, mode) on one link."""
    clients = {mode: Client(root / f"client-{kind}-{mode}", servers[mode], mode)
               for mode in MODES}
    _, _, _, v = timed(clients["zstd"], ["verify", str(db), "--json"])
    digest = v["digest"]
    for mode, c in clients.items():
        timed(c, ["push", str(db), f"warm/{kind}-{mode}", "--server", urls[mode], "--json"])
    rows = {}
    for r in range(repeats):
        order = MODES[r % len(MODES):] + MODES[:r % len(MODES)]
        for mode in order:
            c, url = clients[mode], urls[mode]
            replica = f"wire/{kind}-{mode}-{r}"
            push = timed(c, ["push", str(db), replica, "--server", url, "--json"])
            out = root / f"pulled-{kind}-{mode}-{r}.db"
            pull = timed(c, ["pull", replica, str(out), "--server", url, "--json"])
            if pull[3]["digest"] != digest:
                fail(f"pull {replica}: digest {pull[3]['digest']}, pushed {digest}")
            os.remove(out)
            rows.setdefault(("push full", mode), []).append(
                (push[3]["bytes_sent"], push[0], push[1], push[2]))
            rows.setdefault(("pull full", mode), []).append(
                (pull[3]["bytes_received"], pull[0], pull[1], pull[2]))
    return rows


# The proxy: a token bucket each way, the limit in bytes a second.

PROXY_CHUNK = 64 * 1024
# The proxy's socket buffers: small, so a sender that outruns the limit is held back
# by TCP as by a real link, not by megabytes of loopback buffers.
PROXY_SOCKET_BUFFER = 256 * 1024


async def pipe(reader, writer, rate):
    """Copies `reader` to `writer` at most `rate` bytes a second (0: no limit)."""
    loop = asyncio.get_running_loop()
    tokens, last = float(PROXY_CHUNK), loop.time()
    try:
        while True:
            data = await reader.read(PROXY_CHUNK)
            if not data:
                break
            if rate:
                now = loop.time()
                tokens = min(float(PROXY_CHUNK), tokens + (now - last) * rate)
                last = now
                tokens -= len(data)
                if tokens < 0:
                    await asyncio.sleep(-tokens / rate)
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


async def proxy_main(listen_host, upstream_port, rate):
    async def handle(reader, writer):
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", upstream_port)
        except OSError:
            writer.close()
            return
        for w in (writer, up_writer):
            sock = w.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, PROXY_SOCKET_BUFFER)
        await asyncio.gather(pipe(reader, up_writer, rate), pipe(up_reader, writer, rate))

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Set before listening: accepted sockets inherit it.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, PROXY_SOCKET_BUFFER)
    sock.bind((listen_host, 0))
    server = await asyncio.start_server(handle, sock=sock)
    print(f"proxy {listen_host}:{sock.getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


def outside_address():
    """This machine's address on its default route (not loopback), or None."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.connect(("10.255.255.255", 9))  # no packet is sent: UDP connect only routes
        addr = s.getsockname()[0]
    except OSError:
        return None
    finally:
        s.close()
    return None if addr.startswith("127.") else addr


class Proxy:
    """This script as `--proxy`, in a process of its own, in front of `upstream`."""

    def __init__(self, host, upstream_url, mbit):
        self.host, self.mbit = host, mbit
        self.upstream_port = int(upstream_url.rsplit(":", 1)[1])

    def __enter__(self):
        rate = int(self.mbit * 1e6 / 8)
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--proxy", self.host, str(self.upstream_port),
             str(rate)], stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline().split()
        if len(line) != 2 or line[0] != "proxy":
            fail(f"the proxy did not start: {line}")
        self.url = f"ws://{line[1]}"
        return self

    def __exit__(self, *exc):
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(10)
        return False


def median(runs, i):
    return statistics.median(run[i] for run in runs)


def main():
    if len(sys.argv) == 5 and sys.argv[1] == "--proxy":
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        asyncio.run(proxy_main(sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bin", type=Path, default=srv.SQLFERRY)
    p.add_argument("--size", type=int, default=64 * 1024 * 1024)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dir", type=Path)
    p.add_argument("--kinds", default="text,apptext,blob",
                   help="databases to measure, comma-separated (text, apptext, blob)")
    p.add_argument("--links", default="direct,1000,100",
                   help="direct (127.0.0.1), or a proxy's limit in Mbit/s (0: none), "
                        "comma-separated")
    args = p.parse_args()
    srv.SQLFERRY = args.bin.resolve()
    if not srv.SQLFERRY.exists():
        fail(f"{srv.SQLFERRY} does not exist: build it (cargo build --release) or pass --bin")
    links = args.links.split(",")
    for link in links:
        if link != "direct" and not link.replace(".", "", 1).isdigit():
            fail(f"unknown link {link!r}: direct or a number of Mbit/s")
    host = outside_address()
    if host is None and links != ["direct"]:
        print("bench/wire.py: no address but loopback: the proxy listens on 127.0.0.1, "
              "so auto sees a loopback peer (plain)", file=sys.stderr)
        host = "127.0.0.1"
    root = Path(tempfile.mkdtemp(prefix="sqlferry-wire-", dir=args.dir))
    try:
        makers = {"text": mkdb.make, "apptext": mkdb.make_text, "blob": mkdb.make_blob}
        kinds = args.kinds.split(",")
        for kind in kinds:
            if kind not in makers:
                fail(f"unknown kind {kind!r}: text, apptext or blob")
        dbs = {kind: root / f"{kind}.db" for kind in kinds}
        for kind, db in dbs.items():
            makers[kind](str(db), args.size)
        results = []
        for link in links:
            with contextlib.ExitStack() as stack:
                servers = {m: stack.enter_context(srv.Server(root / f"server-{link}-{m}"))
                           for m in MODES}
                if link == "direct":
                    urls = {m: s.url for m, s in servers.items()}
                else:
                    urls = {m: stack.enter_context(Proxy(host, s.url, float(link))).url
                            for m, s in servers.items()}
                for kind, db in dbs.items():
                    rows = run_kind(root, servers, urls, kind, db, args.repeats)
                    results.append((link, kind, os.path.getsize(db), rows))
                    for m in MODES:
                        shutil.rmtree(root / f"client-{kind}-{m}", ignore_errors=True)
        print(f"sqlferry {srv.SQLFERRY}, medians of {args.repeats}; wall / client CPU / "
              "server CPU in seconds; bytes as reported by --json; × is wall of the mode "
              "/ wall of off")
        print(f"{'link':<8} {'database':<16} {'operation':<10} "
              + "  ".join(f"{m + ' bytes':>12} {m + ' wall/cli/srv':>20}" for m in MODES)
              + "  " + " ".join(f"{m + ' ×':>7}" for m in MODES[1:]))
        for link, kind, size, rows in results:
            for op in ("push full", "pull full"):
                cells, walls = [], {}
                for m in MODES:
                    runs = rows[(op, m)]
                    b = median(runs, 0)
                    t = [median(runs, i) for i in (1, 2, 3)]
                    walls[m] = t[0]
                    cells.append(f"{b:>12.0f} {t[0]:>6.2f} {t[1]:>6.2f} {t[2]:>6.2f}")
                label = "direct" if link == "direct" else f"{link} Mb"
                print(f"{label:<8} {kind + ' ' + str(round(size / 2**20)) + ' MiB':<16} "
                      f"{op:<10} " + "  ".join(cells) + "  "
                      + " ".join(f"{walls[m] / walls['off']:>7.2f}" for m in MODES[1:]))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
