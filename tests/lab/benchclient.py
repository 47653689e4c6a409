"""The benchmark's FTP clients for session rate and control latency, run inside a
client namespace by bench.py. Python 3 standard library only; prints one JSON object.

Usage:
  benchclient.py rate HOST PORT DIR ENTRIES --workers N --procs P (--sessions N | --seconds S)
  benchclient.py latency HOST PORT --count N

rate: N concurrent workers (asyncio, split over P forked processes), each repeating
connect, USER/PASS anonymous, EPSV (PASV when EPSV is refused), LIST DIR, QUIT. A
session counts as done only with every reply code expected and exactly ENTRIES
entries listed; anything else is an error (the first few are reported).

latency: one logged-in session sends NOOP N times, one at a time, and times each
round trip (send to complete 200 reply).
"""

import argparse
import asyncio
import json
import os
import re
import resource
import socket
import sys
import time

SESSION_TIMEOUT = 10.0
PASV_RE = re.compile(rb"(\d+),(\d+),(\d+),(\d+),(\d+),(\d+)")
EPSV_RE = re.compile(rb"\(\|\|\|(\d+)\|\)")


class Failed(Exception):
    pass


async def read_reply(reader):
    """One reply, multi-line or not: (code, text)."""
    line = await reader.readline()
    if len(line) < 4:
        raise Failed(f"connection closed or short reply {line!r}")
    code = line[:3]
    text = line
    if line[3:4] == b"-":
        while True:
            line = await reader.readline()
            if not line:
                raise Failed("connection closed in a multi-line reply")
            text += line
            if line[:3] == code and line[3:4] == b" ":
                break
    return int(code), text


async def command(reader, writer, cmd, expect):
    writer.write(cmd + b"\r\n")
    code, text = await read_reply(reader)
    if code not in expect:
        raise Failed(f"{cmd.split()[0].decode()}: {text.strip().decode(errors='replace')[:80]}")
    return code, text


async def session(host, port, directory, entries, name_re, where):
    """One session; `where` (a one-element list) names the step it is at, so a
    timeout can say which step hung."""
    where[0] = "connect"
    reader, writer = await asyncio.open_connection(host, port)
    data_writer = None
    try:
        code, text = await read_reply(reader)
        if code != 220:
            raise Failed(f"greeting: {text.strip().decode(errors='replace')[:80]}")
        where[0] = "login"
        code, _ = await command(reader, writer, b"USER anonymous", (230, 331))
        if code == 331:
            await command(reader, writer, b"PASS bench@", (230,))
        where[0] = "EPSV/PASV"
        writer.write(b"EPSV\r\n")
        code, text = await read_reply(reader)
        if code == 229:
            m = EPSV_RE.search(text)
            if not m:
                raise Failed(f"EPSV: unparsable {text.strip()!r}")
            data_host, data_port = host, int(m.group(1))
        elif 500 <= code < 600:
            # SuSE's ftp-proxy has no EPSV: fall back to PASV, as curl does.
            _, text = await command(reader, writer, b"PASV", (227,))
            m = PASV_RE.search(text)
            if not m:
                raise Failed(f"PASV: unparsable {text.strip()!r}")
            n = [int(x) for x in m.groups()]
            data_host, data_port = ".".join(map(str, n[:4])), n[4] * 256 + n[5]
        else:
            raise Failed(f"EPSV: {text.strip().decode(errors='replace')[:80]}")
        where[0] = f"data connect to {data_host}:{data_port}"
        data_reader, data_writer = await asyncio.open_connection(data_host, data_port)
        where[0] = f"LIST over {data_host}:{data_port} from port {data_writer.get_extra_info('sockname')[1]}"
        await command(reader, writer, b"LIST " + directory.encode(), (125, 150))
        where[0] += ", reading the listing"
        listing = await data_reader.read(-1)
        where[0] = "LIST end reply"
        data_writer.close()
        data_writer = None
        code, text = await read_reply(reader)
        if code not in (226, 250):
            raise Failed(f"LIST end: {text.strip().decode(errors='replace')[:80]}")
        got = len(name_re.findall(listing))
        if got != entries:
            raise Failed(f"LIST: {got} entries, expected {entries}")
        await command(reader, writer, b"QUIT", (221,))
    finally:
        if data_writer is not None:
            data_writer.close()
        writer.close()


async def rate_proc(args, workers, quota, start_at, deadline):
    name_re = re.compile(rb"entry-\d{3}\b")
    done = 0
    errors = 0
    samples = []
    remaining = [quota]

    async def worker():
        nonlocal done, errors
        while True:
            if deadline is not None and time.monotonic() >= deadline:
                return
            if deadline is None:
                if remaining[0] <= 0:
                    return
                remaining[0] -= 1
            where = ["start"]
            try:
                await asyncio.wait_for(session(args.host, args.port, args.dir, args.entries, name_re, where), SESSION_TIMEOUT)
                done += 1
            except (Failed, OSError, asyncio.TimeoutError, asyncio.IncompleteReadError) as exc:
                errors += 1
                if len(samples) < 5:
                    samples.append(f"{type(exc).__name__} at {where[0]}: {exc}")

    delay = start_at - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)
    await asyncio.gather(*(worker() for _ in range(workers)))
    return {"sessions": done, "errors": errors, "samples": samples, "end": time.monotonic()}


def rate(args):
    procs = max(1, min(args.procs, args.workers))
    start_at = time.monotonic() + 0.3  # every process starts at once
    deadline = start_at + args.seconds if args.seconds else None
    children = []
    for i in range(procs):
        workers = args.workers // procs + (1 if i < args.workers % procs else 0)
        quota = 0
        if args.sessions:
            quota = args.sessions // procs + (1 if i < args.sessions % procs else 0)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            try:
                out = asyncio.run(rate_proc(args, workers, quota, start_at, deadline))
            except BaseException as exc:  # reported, never a silent child death
                out = {"sessions": 0, "errors": workers, "samples": [f"worker process: {exc!r}"], "end": time.monotonic()}
            os.write(w, json.dumps(out).encode())
            os._exit(0)
        os.close(w)
        children.append((pid, r))
    results = []
    for pid, r in children:
        with os.fdopen(r, "rb") as f:
            results.append(json.loads(f.read() or b'{"sessions":0,"errors":1,"samples":["no output"],"end":0}'))
        os.waitpid(pid, 0)
    end = max(x["end"] for x in results)
    elapsed = max(end - start_at, 1e-9)
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    sessions = sum(x["sessions"] for x in results)
    return {
        "sessions": sessions,
        "errors": sum(x["errors"] for x in results),
        "elapsed": elapsed,
        "rate": sessions / elapsed,
        "client_cpu": (ru.ru_utime + ru.ru_stime) / elapsed,
        "samples": [s for x in results for s in x["samples"]][:5],
    }


def latency(args):
    sock = socket.create_connection((args.host, args.port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    f = sock.makefile("rb")

    def reply():
        line = f.readline()
        if len(line) < 4:
            raise Failed(f"connection closed or short reply {line!r}")
        code = line[:3]
        if line[3:4] == b"-":
            while True:
                more = f.readline()
                if not more:
                    raise Failed("connection closed in a multi-line reply")
                if more[:3] == code and more[3:4] == b" ":
                    break
        return int(code), line

    def cmd(text, expect):
        sock.sendall(text + b"\r\n")
        code, line = reply()
        if code not in expect:
            raise Failed(f"{text.decode()}: {line.strip()!r}")
        return code

    if reply()[0] != 220:
        raise Failed("no 220 greeting")
    if cmd(b"USER anonymous", (230, 331)) == 331:
        cmd(b"PASS bench@", (230,))
    for _ in range(min(50, args.count)):  # warm-up, not counted
        cmd(b"NOOP", (200,))
    samples = []
    clock = time.perf_counter_ns
    for _ in range(args.count):
        t0 = clock()
        sock.sendall(b"NOOP\r\n")
        code, line = reply()
        samples.append(clock() - t0)
        if code != 200:
            raise Failed(f"NOOP: {line.strip()!r}")
    cmd(b"QUIT", (221,))
    sock.close()
    samples.sort()
    n = len(samples)
    return {
        "count": n,
        "p50_us": samples[n // 2] / 1000,
        "p99_us": samples[min(n - 1, (n * 99) // 100)] / 1000,
        "mean_us": sum(samples) / n / 1000,
    }


def main(argv):
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="mode", required=True)
    r = sub.add_parser("rate")
    r.add_argument("host")
    r.add_argument("port", type=int)
    r.add_argument("dir")
    r.add_argument("entries", type=int)
    r.add_argument("--workers", type=int, default=16)
    r.add_argument("--procs", type=int, default=2)
    r.add_argument("--sessions", type=int, default=0)
    r.add_argument("--seconds", type=float, default=0)
    lt = sub.add_parser("latency")
    lt.add_argument("host")
    lt.add_argument("port", type=int)
    lt.add_argument("--count", type=int, default=2000)
    args = p.parse_args(argv)
    try:
        if args.mode == "rate":
            if bool(args.sessions) == bool(args.seconds):
                p.error("give exactly one of --sessions and --seconds")
            out = rate(args)
        else:
            out = latency(args)
    except (Failed, OSError) as exc:
        out = {"error": f"{type(exc).__name__}: {exc}"}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
