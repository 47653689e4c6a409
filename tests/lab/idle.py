#!/usr/bin/env python3
"""Idle control sessions through one ftpgate process: memory per session.

For each N in --sessions, starts a fresh gateway (reverse mode, listener on
127.0.0.1 port 0) in front of one pyftpdlib server, opens N control
connections through it, logs each in (USER anonymous / PASS), leaves them
idle, reads the gateway's VmRSS, then sends NOOP on every session and
counts the 200 answers. Everything is on loopback; no namespaces or root
needed, except that N sessions need about 2N descriptors in the gateway
and N in the server and the client: the script raises RLIMIT_NOFILE for
itself and its children (resource.setrlimit; the hard limit too when it
may, as root).

Prints one line per N:

    idle: sessions=N logged_in=N noop_200=N rss_base_kib=B rss_kib=R per_session_bytes=P

per_session_bytes = (R - B) * 1024 / N, B being the gateway's RSS after one
session has come and gone (so start-up and first-use costs are not counted
per session). Exit status 0 when every session logged in and answered NOOP
with 200, 1 otherwise, 2 when a prerequisite is missing (--check tells).
"""

import argparse
import asyncio
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))

SERVER = r"""
import logging, sys
from pyftpdlib.authorizers import DummyAuthorizer
from pyftpdlib.handlers import FTPHandler
from pyftpdlib.servers import FTPServer
logging.basicConfig(level=logging.WARNING)
root, max_cons = sys.argv[1], int(sys.argv[2])
authorizer = DummyAuthorizer()
authorizer.add_anonymous(root)
FTPHandler.authorizer = authorizer
FTPHandler.timeout = None
server = FTPServer(("127.0.0.1", 0), FTPHandler, backlog=4096)
server.max_cons = max_cons
server.max_cons_per_ip = 0
print(server.socket.getsockname()[1], flush=True)
server.serve_forever(timeout=1.0)
"""


def server_python():
    """A Python that can import pyftpdlib, or None."""
    for py in [sys.executable, "/usr/bin/python3"]:
        if py and os.path.exists(py):
            ok = subprocess.run([py, "-c", "import pyftpdlib"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            if ok.returncode == 0:
                return py
    return None


def raise_nofile(want):
    """Raises RLIMIT_NOFILE to `want` (hard limit too, when allowed);
    returns the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if want > hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
            return want
        except (ValueError, OSError):
            pass
    new = min(max(soft, want), hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    return new


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


async def read_reply(reader, timeout):
    """One whole reply (multi-line aware); returns its code."""
    first = await asyncio.wait_for(reader.readline(), timeout)
    if len(first) < 4 or not first[:3].isdigit():
        raise RuntimeError(f"bad reply line {first!r}")
    code = first[:3]
    if first[3:4] == b"-":
        while True:
            line = await asyncio.wait_for(reader.readline(), timeout)
            if not line:
                raise RuntimeError("closed inside a multi-line reply")
            if line[:3] == code and line[3:4] in (b" ", b"\r", b"\n"):
                break
    return int(code)


async def login(addr, timeout):
    reader, writer = await asyncio.wait_for(asyncio.open_connection(*addr), timeout)
    try:
        if await read_reply(reader, timeout) != 220:
            raise RuntimeError("no 220 greeting")
        writer.write(b"USER anonymous\r\n")
        if await read_reply(reader, timeout) != 331:
            raise RuntimeError("USER not answered 331")
        writer.write(b"PASS idle@example.org\r\n")
        if await read_reply(reader, timeout) != 230:
            raise RuntimeError("PASS not answered 230")
    except BaseException:
        writer.close()
        raise
    return reader, writer


async def noop(session, timeout):
    reader, writer = session
    writer.write(b"NOOP\r\n")
    return await read_reply(reader, timeout)


async def bounded(jobs, limit):
    sem = asyncio.Semaphore(limit)

    async def one(job):
        async with sem:
            try:
                return await job
            except Exception as e:  # counted, and the first few shown
                return e

    return await asyncio.gather(*(one(j) for j in jobs))


def start_gateway(binary, upstream, n, workdir):
    config = os.path.join(workdir, f"idle-{n}.yaml")
    with open(config, "w") as f:
        f.write(
            "listeners:\n"
            "  - name: idle\n"
            "    listen: 127.0.0.1:0\n"
            "    mode: reverse\n"
            f"    upstream: 127.0.0.1:{upstream}\n"
            "limits:\n"
            f"  max_sessions: {n + 16}\n"
            f"  max_sessions_per_client: {n + 16}\n"
            "rules:\n"
            "  - name: loopback\n"
            "    clients: [127.0.0.0/8]\n"
        )
    log_path = os.path.join(workdir, f"gateway-{n}.log")
    log = open(log_path, "w")
    proc = subprocess.Popen(
        [binary, "--log-format", "json", "run", "--config", config],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"gateway exited {proc.returncode}: {open(log_path).read()}")
        with open(log_path) as f:
            for line in f:
                try:
                    ev = json.loads(line)
                except ValueError:
                    continue
                fields = ev.get("fields", {})
                if fields.get("message") == "listening":
                    host, port = fields["addr"].rsplit(":", 1)
                    return proc, (host, int(port)), log_path
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"gateway did not report its listener: {open(log_path).read()}")


async def measure(binary, upstream, n, workdir, idle, timeout, concurrency):
    proc, addr, log_path = start_gateway(binary, upstream, n, workdir)
    try:
        # One session comes and goes first: the baseline then includes what
        # the first session allocates once for the whole process.
        warm = await login(addr, timeout)
        warm[1].write(b"QUIT\r\n")
        await read_reply(warm[0], timeout)
        warm[1].close()
        await asyncio.sleep(0.5)
        base = rss_kib(proc.pid)

        results = await bounded([login(addr, timeout) for _ in range(n)], concurrency)
        sessions = [r for r in results if not isinstance(r, Exception)]
        errors = [r for r in results if isinstance(r, Exception)]
        await asyncio.sleep(idle)
        rss = rss_kib(proc.pid)
        codes = await bounded([noop(s, timeout) for s in sessions], concurrency)
        ok = sum(1 for c in codes if c == 200)
        errors += [c for c in codes if isinstance(c, Exception)]
        for _, writer in sessions:
            writer.close()
        per = (rss - base) * 1024 / n
        print(f"idle: sessions={n} logged_in={len(sessions)} noop_200={ok} "
              f"rss_base_kib={base} rss_kib={rss} per_session_bytes={per:.0f}", flush=True)
        for e in errors[:3]:
            print(f"idle:   error: {type(e).__name__}: {e}", flush=True)
        if proc.poll() is not None:
            print(f"idle:   gateway exited {proc.returncode}", flush=True)
            return False
        return len(sessions) == n and ok == n
    finally:
        stop(proc)


def stop(proc):
    """SIGTERM, then SIGKILL if it has not exited within 10 s; reaped either way."""
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sessions", default="1000,10000",
                    help="comma-separated session counts (default 1000,10000)")
    ap.add_argument("--ftpgate-bin", default=os.environ.get(
        "FTPGATE_BIN", os.path.join(REPO, "target", "release", "ftpgate")))
    ap.add_argument("--idle", type=float, default=2.0,
                    help="seconds the sessions stay idle before RSS is read")
    ap.add_argument("--timeout", type=float, default=60.0,
                    help="seconds allowed for each reply")
    ap.add_argument("--concurrency", type=int, default=200,
                    help="logins and NOOPs in flight at once")
    ap.add_argument("--check", action="store_true",
                    help="only check the prerequisites")
    args = ap.parse_args()
    # Stopped from outside: still stop the gateway and the server.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    counts = [int(x) for x in args.sessions.split(",") if x]

    py = server_python()
    if py is None:
        print("idle: pyftpdlib not found")
        return 2
    if not os.access(args.ftpgate_bin, os.X_OK):
        print(f"idle: no ftpgate binary at {args.ftpgate_bin}")
        return 2
    if args.check:
        print("idle: ready")
        return 0

    # Gateway: 2 per session; client and server: 1 per session each.
    want = 2 * max(counts) + 128
    have = raise_nofile(want)
    if have < want:
        print(f"idle: RLIMIT_NOFILE {have} < {want} needed for {max(counts)} sessions "
              f"(the hard limit cannot be raised here; at most {(have - 128) // 2} sessions)")
        return 2

    workdir = tempfile.mkdtemp(prefix="ftpgate-idle-")
    server = subprocess.Popen([py, "-c", SERVER, workdir, str(max(counts) + 64)],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = server.stdout.readline()
        if not line.strip().isdigit():
            print(f"idle: pyftpdlib did not start (exit {server.poll()})")
            return 1
        upstream = int(line)
        ok = True
        for n in counts:
            ok &= asyncio.run(measure(args.ftpgate_bin, upstream, n, workdir,
                                      args.idle, args.timeout, args.concurrency))
        return 0 if ok else 1
    finally:
        stop(server)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
