#!/usr/bin/env python3
"""Hostile peers through the lab edge: the kernel's FTP helper next to ftpgate.

Each case plays a hostile client or a hostile server (scripted here, no real FTP
server) through the edge, once per target, and records the reply code the hostile
peer saw and whether anything was opened:

- expectations: new lines in the edge's /proc/net/nf_conntrack_expect;
- pinholes: listening sockets in ftpgate's data port ranges in the edge;
- reached: an actual connection attempt through the edge (the scripted server
  follows every PORT/EPRT it receives; the client connects to what a 227/229 told
  it and to the public address) arriving at a listener on the named address and
  port (a third-party host `thrd` this script adds, port 22, 1023, ...).

Prints one table (case x target), then one line per ftpgate case
(`hostile ftpgate <case>: held` or `...: FAIL <why>`) and `ftpgate: N held, M failed`.
Only ftpgate's results gate (exit 1 on a failure); the kernel's are reported.
Run as root: tests/lab/hostile.py --ftpgate-bin target/debug/ftpgate
"""

import argparse
import ctypes
import os
import re
import socket
import sys
import threading
import time

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import prologue  # noqa: E402
import targets  # noqa: E402
import topology  # noqa: E402
from topology import FW_TABLE, PUBLIC_V4, host_addr  # noqa: E402

CTL_PORT = 2121  # one of the lab's control ports: the kernel helper and the DNAT apply
LANC = host_addr("lanc", 4)
LANC_TLS = "10.71.1.3"  # a second address of lanc: the rule with tls: passthrough
LANS = host_addr("lans", 4)
WANS = host_addr("wans", 4)
THIRD = "10.71.3.2"  # the third-party host, namespace <prefix>thrd
THIRD_EDGE = "10.71.3.1"

# ftpgate's settings for this run: short timers so the cases stay short.
PINHOLE_TIMEOUT = 1.0
IDLE_TIMEOUT = 5.0
PER_CLIENT = 4
DATA_PORTS = (1024, 60999)
REPLY_WAIT = 4.0

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


class NetNs:
    """Moves the calling thread into a namespace (setns is per thread) and back."""

    def __init__(self, name):
        self.name = name

    def __enter__(self):
        self.home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        target = os.open(f"/run/netns/{self.name}", os.O_RDONLY)
        try:
            if _libc.setns(target, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), f"setns {self.name}")
        finally:
            os.close(target)

    def __exit__(self, *_):
        try:
            if _libc.setns(self.home, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back")
        finally:
            os.close(self.home)


def sock_in(lab, host):
    with NetNs(lab.ns(host)):
        return socket.socket(socket.AF_INET, socket.SOCK_STREAM)


class Listener:
    """A listener on host:addr:port that counts who connected (and closes them)."""

    def __init__(self, lab, host, addr, port):
        self.where = f"{addr}:{port}"
        self.peers = []
        self.sock = sock_in(lab, host)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((addr, port))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, peer = self.sock.accept()
            except OSError:
                return
            self.peers.append(peer[0])
            conn.close()

    def close(self):
        # shutdown wakes the thread blocked in accept; close alone would not.
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


def attempt(lab, host, addr, port, src=None, timeout=2.0):
    """One TCP connection attempt from host; returns 'connected' or the error."""
    s = sock_in(lab, host)
    s.settimeout(timeout)
    try:
        if src:
            s.bind((src, 0))
        s.connect((addr, port))
        return "connected"
    except OSError as e:
        return type(e).__name__ if not e.strerror else e.strerror
    finally:
        s.close()


def addr_of_port_arg(arg):
    """(addr, port) named by a PORT/227 argument or an EPRT/229 one, or None."""
    m = re.search(r"(\d+),(\d+),(\d+),(\d+),(\d+),(\d+)", arg)
    if m:
        n = [int(x) for x in m.groups()]
        if all(0 <= x <= 255 for x in n):
            return ".".join(map(str, n[:4])), n[4] * 256 + n[5]
        return None
    m = re.search(r"\|1\|([\d.]+)\|(\d+)\|", arg)
    if m:
        return m.group(1), int(m.group(2))
    m = re.search(r"\|\|\|(\d+)\|", arg)
    if m:
        return None, int(m.group(1))
    return None


def strip_telnet(line):
    return re.sub(rb"\xff[\xf0-\xfe]", b"", line)


class HostileServer:
    """A scripted FTP-ish server on host:2121. It answers USER/PASS/NOOP/SYST/TYPE,
    follows every PORT/EPRT it receives (also inside a "TLS" stream after AUTH: an
    attacker's server cooperates), answers PASV/EPSV with `pasv_reply`, and sends
    `after_greeting` right after its 220. What it received is kept per session."""

    def __init__(self, lab, host):
        self.lab, self.host = lab, host
        self.sock = sock_in(lab, host)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host_addr(host, 4), CTL_PORT))
        self.sock.listen(64)
        self.reset()
        threading.Thread(target=self._accept, daemon=True).start()

    def reset(self, pasv_reply=None, after_greeting=b""):
        self.pasv_reply = pasv_reply
        self.after_greeting = after_greeting
        self.received = []  # lines, all sessions
        self.follows = []  # (addr, port, result)

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._session, args=(conn,), daemon=True).start()

    def _follow(self, arg):
        target = addr_of_port_arg(arg)
        if target and target[0]:
            self.follows.append((target[0], target[1], attempt(self.lab, self.host, *target)))

    def _session(self, conn):
        conn.settimeout(30)
        try:
            conn.sendall(b"220 hostile\r\n")
            if self.after_greeting:
                # A segment of its own: the kernel helper only reads a reply at a
                # segment's start.
                time.sleep(0.2)
                conn.sendall(self.after_greeting)
            buf = b""
            tls = False
            while True:
                data = conn.recv(65536)
                if not data:
                    return
                buf += data
                if len(buf) > 65536 and b"\n" not in buf:
                    conn.sendall(b"500 line too long\r\n")
                    return
                while b"\n" in buf:
                    raw, buf = buf.split(b"\n", 1)
                    line = strip_telnet(raw.rstrip(b"\r"))
                    self.received.append(line)
                    text = line.decode("latin-1")
                    verb = text.split(" ", 1)[0].upper()
                    if tls:
                        # Opaque after AUTH: no replies, but a PORT line is followed.
                        m = re.search(r"(PORT|EPRT) (.*)$", text)
                        if m:
                            self._follow(m.group(2))
                        continue
                    reply = {
                        "USER": b"331 any password\r\n",
                        "PASS": b"230 in\r\n",
                        "NOOP": b"200 noop\r\n",
                        "SYST": b"215 UNIX\r\n",
                        "TYPE": b"200 type\r\n",
                        "QUIT": b"221 bye\r\n",
                        "AUTH": b"234 go ahead\r\n",
                    }.get(verb, b"500 unknown\r\n")
                    if verb in ("PORT", "EPRT"):
                        reply = b"200 port ok\r\n"
                        threading.Thread(target=self._follow, args=(text[5:],), daemon=True).start()
                    elif verb in ("PASV", "EPSV") and self.pasv_reply:
                        reply = self.pasv_reply
                    conn.sendall(reply)
                    if verb == "QUIT":
                        return
                    if verb == "AUTH":
                        tls = True
        except OSError:
            pass
        finally:
            conn.close()


class Control:
    """The hostile client's control connection."""

    def __init__(self, lab, host, addr, port, src=None):
        self.s = sock_in(lab, host)
        self.s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if src:
            self.s.bind((src, 0))
        self.s.settimeout(REPLY_WAIT)
        self.s.connect((addr, port))
        self.buf = b""

    def send(self, data):
        self.s.sendall(data)

    def reply(self, wait=REPLY_WAIT):
        """(code, text) of the next reply; (None, 'closed'|'timeout') otherwise."""
        self.s.settimeout(wait)
        first = None
        lines = []
        while True:
            while b"\n" not in self.buf:
                try:
                    data = self.s.recv(65536)
                except socket.timeout:
                    return None, "timeout"
                except OSError as e:
                    return None, f"closed ({e.strerror or e})"
                if not data:
                    return None, "closed"
                self.buf += data
            raw, self.buf = self.buf.split(b"\n", 1)
            line = raw.rstrip(b"\r").decode("latin-1")
            lines.append(line)
            if first is None:
                if not re.match(r"^\d{3}", line):
                    continue
                first = line[:3]
            if line.startswith(first + " ") or line == first:
                return int(first), "\n".join(lines)

    def cmd(self, line):
        self.send(line.encode("latin-1") + b"\r\n")
        return self.reply()

    def closed_within(self, wait):
        """True when the peer closes the connection within wait seconds."""
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            self.s.settimeout(max(0.05, deadline - time.monotonic()))
            try:
                data = self.s.recv(65536)
            except socket.timeout:
                return False
            except OSError:
                return True
            if not data:
                return True
        return False

    def close(self):
        self.s.close()


def server_view(srv):
    """The PORT/EPRT lines the scripted server received, and where following them led."""
    got = [ln.decode("latin-1") for ln in srv.received if re.search(rb"(PORT|EPRT) ", ln)]
    follows = "; ".join(f"{a}:{p} {r}" for a, p, r in srv.follows)
    return f"server received {got or 'no PORT/EPRT'}" + (f", followed: {follows}" if follows else "")


def pasv_v4(addr, port):
    return "227 Entering Passive Mode ({},{},{})".format(addr.replace(".", ","), port >> 8, port & 255)


def port_arg(addr, port):
    return "{},{},{}".format(addr.replace(".", ","), port >> 8, port & 255)


class Outcome:
    def __init__(self):
        self.reply = "-"
        self.expects = []
        self.pinholes = []
        self.reached = []  # "addr:port <- peer"
        self.note = ""
        self.error = None

    def opened(self):
        return bool(self.expects or self.pinholes or self.reached)


class Env:
    """What a case needs: the lab, the target, the two scripted servers."""

    def __init__(self, lab, target, srv_out, srv_in):
        self.lab, self.target = lab, target
        self.srv_out, self.srv_in = srv_out, srv_in
        self.listeners = []
        self.expect_before = set()

    def client(self, scenario, src=None):
        host, addr, port = self.target.endpoint(scenario, "vsftpd", 4)
        return Control(self.lab, host, addr, port, src)

    def login(self, scenario, src=None):
        c = self.client(scenario, src)
        code, text = c.reply()
        if code != 220:
            raise RuntimeError(f"greeting: {text}")
        for line in ("USER anonymous", "PASS x@"):
            code, text = c.cmd(line)
            if code not in (230, 331):
                raise RuntimeError(f"{line}: {text}")
        return c

    def listen(self, host, addr, port):
        lst = Listener(self.lab, host, addr, port)
        self.listeners.append(lst)
        return lst

    def expectations(self):
        out = self.lab.run("edge", ["cat", "/proc/net/nf_conntrack_expect"], check=False).stdout
        # Each line starts with its remaining lifetime: drop it, or every read differs.
        return set(line.split(None, 1)[1] for line in out.splitlines() if len(line.split(None, 1)) == 2)

    def pinholes(self):
        out = self.lab.run("edge", ["ss", "-Hltn"], check=False).stdout
        ports = []
        for line in out.splitlines():
            cols = line.split()
            port = cols[3].rsplit(":", 1)[1] if len(cols) > 3 else ""
            if port.isdigit() and 40000 <= int(port) <= 41999:
                ports.append(int(port))
        return ports

    def snapshot(self, out, expects=True, pinholes=True, settle=False):
        """Records new expectations and open pinholes. With settle, a pinhole of the
        case's own that is closing (its session just ended) gets 2 s to go."""
        if expects:
            out.expects = sorted(self.expectations() - self.expect_before)
        if pinholes:
            if settle:
                wait_for(lambda: not self.pinholes(), 2)
            out.pinholes = self.pinholes()

    def finish(self, out):
        for lst in self.listeners:
            out.reached += [f"{lst.where}<-{p}" for p in lst.peers]
            lst.close()
        self.listeners = []


def wait_for(pred, timeout):
    """Polls pred until it holds or timeout passes; returns its last value."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v or time.monotonic() >= deadline:
            return v
        time.sleep(0.05)


# ---- cases -----------------------------------------------------------------
# Each returns nothing; it fills `out`. `want` on the decorator is what ftpgate
# must show: the set of acceptable reply codes and whether a connection may reach.

CASES = []


def case(name, want_codes, reach_ok=False, gating=True, kernel_na=None):
    def deco(fn):
        CASES.append((name, fn, set(want_codes), reach_ok, gating, kernel_na))
        return fn

    return deco


def bounce(env, out, line, host, addr, port):
    """Client sends one PORT/EPRT-like line; the server follows what it gets."""
    env.listen(host, addr, port)
    c = env.login("outbound")
    code, text = c.cmd(line)
    out.reply = code if code else text
    env.snapshot(out)
    # The scripted server follows (in a thread); give it its attempt.
    wait_for(lambda: env.srv_out.follows, 2.5)
    out.note = server_view(env.srv_out)
    c.close()


@case("PORT third-party", {501})
def c_port_third(env, out):
    bounce(env, out, f"PORT {port_arg(THIRD, 50001)}", "thrd", THIRD, 50001)


@case("EPRT third-party", {501, 522})
def c_eprt_third(env, out):
    bounce(env, out, f"EPRT |1|{THIRD}|50002|", "thrd", THIRD, 50002)


@case("PORT port 22", {501})
def c_port_22(env, out):
    bounce(env, out, f"PORT {port_arg(LANC, 22)}", "lanc", LANC, 22)


@case("EPRT port 1023", {501})
def c_eprt_1023(env, out):
    bounce(env, out, f"EPRT |1|{LANC}|1023|", "lanc", LANC, 1023)


@case("PORT outside data_ports (61000)", {501})
def c_port_outside(env, out):
    bounce(env, out, f"PORT {port_arg(LANC, 61000)}", "lanc", LANC, 61000)


@case("PORT octet 256", {500, 501})
def c_port_octet(env, out):
    bounce(env, out, "PORT 10,71,1,256,195,83", "lanc", LANC, 50003)


@case("PORT port 0", {500, 501})
def c_port_zero(env, out):
    bounce(env, out, f"PORT {port_arg(LANC, 0)}", "lanc", LANC, 50004)


def legit_port_then_follow(env, out, send):
    """The client's own PORT, sent by `send`; the data connection must arrive."""
    lst = env.listen("lanc", LANC, 50005)
    c = env.login("outbound")
    send(c, f"PORT {port_arg(LANC, 50005)}\r\n".encode())
    code, text = c.reply()
    out.reply = code if code else text
    wait_for(lambda: env.srv_out.follows and lst.peers, 3)
    out.note = server_view(env.srv_out)
    c.close()
    env.snapshot(out, settle=True)


@case("PORT split in 2 segments", {200}, reach_ok=True)
def c_split2(env, out):
    def send(c, data):
        c.send(data[:9])
        time.sleep(0.2)  # two segments: the point of the case
        c.send(data[9:])

    legit_port_then_follow(env, out, send)


@case("PORT split at every byte", {200}, reach_ok=True)
def c_split_every(env, out):
    def send(c, data):
        for i in range(len(data)):
            c.send(data[i:i + 1])
            time.sleep(0.02)

    legit_port_then_follow(env, out, send)


@case("PORT pipelined after NOOP", {200}, reach_ok=True)
def c_pipelined(env, out):
    def send(c, data):
        c.send(b"NOOP\r\n" + data)
        code, _ = c.reply()
        if code != 200:
            raise RuntimeError(f"NOOP got {code}")

    legit_port_then_follow(env, out, send)


@case("227 line sent by the client", range(500, 600))
def c_client_227(env, out):
    bounce(env, out, pasv_v4(THIRD, 50006), "thrd", THIRD, 50006)


@case("229 line sent by the client", range(500, 600))
def c_client_229(env, out):
    bounce(env, out, "229 Entering Extended Passive Mode (|||50007|)", "lanc", LANC, 50007)


@case("NUL in PORT argument", {500})
def c_nul(env, out):
    env.listen("lanc", LANC, 50008)
    c = env.login("outbound")
    c.send(f"PORT {port_arg(LANC, 0)[:-4]}".encode() + b"\x00195,88\r\n")
    code, text = c.reply()
    out.reply = code if code else text
    env.snapshot(out)
    wait_for(lambda: env.srv_out.follows, 2)
    out.note = server_view(env.srv_out)
    c.close()


@case("Telnet IAC IP/DM before PORT third-party", {501})
def c_iac(env, out):
    env.listen("thrd", THIRD, 50009)
    c = env.login("outbound")
    c.send(b"\xff\xf4\xff\xf2" + f"PORT {port_arg(THIRD, 50009)}\r\n".encode())
    code, text = c.reply()
    out.reply = code if code else text
    env.snapshot(out)
    wait_for(lambda: env.srv_out.follows, 2)
    out.note = server_view(env.srv_out)
    c.close()


@case("PORT third-party behind Telnet IAC LF", {500})
def c_iac_lf(env, out):
    # A server that frames on LF alone reads the PORT as a line of its own.
    env.listen("thrd", THIRD, 50017)
    c = env.login("outbound")
    c.send(b"NOOP\xff\n" + f"PORT {port_arg(THIRD, 50017)}\r\n".encode())
    code, text = c.reply()
    out.reply = code if code else text
    env.snapshot(out)
    wait_for(lambda: env.srv_out.follows, 2)
    out.note = server_view(env.srv_out)
    c.close()


@case("1 MiB line without CRLF", {500})
def c_megabyte(env, out):
    c = env.client("outbound")
    c.reply()

    def flood():
        try:
            c.s.sendall(b"A" * (1 << 20))
        except OSError:
            pass

    threading.Thread(target=flood, daemon=True).start()
    code, text = c.reply(8)
    out.reply = code if code else text
    closed = c.closed_within(5)
    out.note = "then closed" if closed else "connection stays open"
    if not closed:
        out.error = "not closed after the 500"
    env.snapshot(out)
    c.close()


def passive_case(env, out, reply, then):
    """Inbound: client asks PASV; the server answers `reply`; `then(c, addr, port)`."""
    env.srv_in.reset(pasv_reply=reply.encode() + b"\r\n")
    c = env.login("inbound")
    code, text = c.cmd("PASV")
    out.reply = code if code else text
    env.snapshot(out, pinholes=False)
    got = addr_of_port_arg(text) if code == 227 else None
    if got:
        then(c, got[0], got[1])
    c.close()
    env.snapshot(out, expects=False, settle=True)


@case("227 naming a third party", {227})
def c_227_third(env, out):
    env.listen("thrd", THIRD, 50010)

    def then(c, addr, port):
        r = [attempt(env.lab, "wanc", addr, port)]
        if addr != PUBLIC_V4:
            r.append(attempt(env.lab, "wanc", PUBLIC_V4, port))
        out.note = f"client got {addr}:{port}; tried it ({'; '.join(r)})"

    passive_case(env, out, pasv_v4(THIRD, 50010), then)


@case("pinhole: another host first", {227})
def c_other_host(env, out):
    lst = env.listen("lans", LANS, 50011)

    def then(c, addr, port):
        r = attempt(env.lab, "wans", addr, port)
        wait_for(lambda: lst.peers, 0.5)
        out.note = f"wans -> {addr}:{port}: {r}"

    passive_case(env, out, pasv_v4(LANS, 50011), then)


@case("pinhole: second connection", {227}, reach_ok=True)
def c_second(env, out):
    lst = env.listen("lans", LANS, 50012)

    def then(c, addr, port):
        r1 = attempt(env.lab, "wanc", addr, port)
        wait_for(lambda: lst.peers, 2)
        n1 = len(lst.peers)
        r2 = attempt(env.lab, "wanc", addr, port)
        wait_for(lambda: len(lst.peers) > n1, 1)
        out.note = f"first: {r1}; second: {r2}; server accepted {len(lst.peers)}"
        if len(lst.peers) != 1:
            out.error = f"server accepted {len(lst.peers)} data connections, not 1"

    passive_case(env, out, pasv_v4(LANS, 50012), then)


@case("pinhole: after its timeout", {227})
def c_after_timeout(env, out):
    env.listen("lans", LANS, 50013)

    def then(c, addr, port):
        time.sleep(PINHOLE_TIMEOUT + 1.0)  # the timeout is what is tested
        r = attempt(env.lab, "wanc", addr, port)
        out.note = f"after {PINHOLE_TIMEOUT + 1.0:.0f} s (ftpgate pinhole_timeout {PINHOLE_TIMEOUT:.0f}s; " \
            f"the kernel helper's expectation timeout is 300 s): {r}"

    passive_case(env, out, pasv_v4(LANS, 50013), then)


def unsolicited(env, out, line, port):
    lst = env.listen("lans", LANS, port)
    env.srv_in.reset(after_greeting=line.encode() + b"\r\n")
    c = env.client("inbound")
    c.reply()
    # The unsolicited line arrives unasked (a second after the greeting at most);
    # a gateway that drops it leaves the NOOP's answer as the first reply.
    code, text = c.reply(1.0)
    if code is None:
        code, text = c.cmd("NOOP")
    out.reply = code if code else text
    env.snapshot(out)
    got = addr_of_port_arg(text) if code in (227, 229) else None
    addr = (got[0] or PUBLIC_V4) if got else PUBLIC_V4
    p = got[1] if got else port
    r = [f"{addr}:{p} {attempt(env.lab, 'wanc', addr, p)}"]
    if addr != PUBLIC_V4:
        r.append(f"{PUBLIC_V4}:{p} {attempt(env.lab, 'wanc', PUBLIC_V4, p)}")
    wait_for(lambda: lst.peers, 0.5)
    out.note = f"first reply {text!r}; wanc -> {'; '.join(r)}"
    c.close()


@case("unsolicited 227 from server", {200})
def c_unsol_227(env, out):
    unsolicited(env, out, pasv_v4(LANS, 50014), 50014)


@case("unsolicited 229 from server", {200})
def c_unsol_229(env, out):
    unsolicited(env, out, "229 Entering Extended Passive Mode (|||50015|)", 50015)


@case("session flood (10 from one client)", {421}, kernel_na="no per-client limit in a helper")
def c_flood(env, out):
    held, codes = [], []
    for _ in range(10):
        c = env.client("outbound")
        code, _ = c.reply()
        codes.append(code)
        held.append(c)
    for c in held:
        c.close()
    n220 = codes.count(220)
    n421 = codes.count(421)
    out.reply = 421 if n421 else (codes[-1] or "-")
    out.note = f"{n220}x220, {n421}x421 (max_sessions_per_client {PER_CLIENT} for ftpgate)"
    if n220 != PER_CLIENT and env.target.name == "ftpgate":
        out.error = f"{n220} sessions admitted, want {PER_CLIENT}"


@case("slowloris: half a command, then silence", {421}, kernel_na="no idle timeout in a helper")
def c_slow_half(env, out):
    c = env.client("outbound")
    c.reply()
    c.send(b"US")
    t0 = time.monotonic()
    code, text = c.reply(IDLE_TIMEOUT + 4)
    out.reply = code if code else text
    out.note = f"after {time.monotonic() - t0:.1f} s"
    c.close()


@case("slowloris: one byte a second", {421}, kernel_na="no idle timeout in a helper")
def c_slow_trickle(env, out):
    c = env.client("outbound")
    c.reply()
    t0 = time.monotonic()
    data = b"NOOP" * 100
    i = 0
    while time.monotonic() - t0 < 2 * IDLE_TIMEOUT:
        try:
            c.send(data[i:i + 1])
        except OSError:
            break
        i += 1
        code, text = c.reply(1.0)
        if code or text != "timeout":
            out.reply = code if code else text
            break
    out.note = f"after {time.monotonic() - t0:.1f} s ({i} bytes)"
    if out.reply == "-":
        out.reply = f"open after {2 * IDLE_TIMEOUT:.0f} s"
    c.close()


@case("AUTH TLS under tls: refuse", {534}, kernel_na="no TLS policy in a helper")
def c_tls_refuse(env, out):
    c = env.login("outbound")
    code, text = c.cmd("AUTH TLS")
    out.reply = code if code else text
    code2, _ = c.cmd("NOOP")
    out.note = f"NOOP after it: {code2}"
    env.snapshot(out)
    c.close()


@case("AUTH TLS under tls: passthrough, clear PORT after", {234})
def c_tls_pass(env, out):
    env.listen("lanc", LANC_TLS, 50016)
    c = env.client("outbound", src=LANC_TLS)
    c.reply()
    code, text = c.cmd("AUTH TLS")
    out.reply = code if code else text
    # A fake ClientHello, then in its own segment a PORT that would be acted on if parsed.
    c.send(b"\x16\x03\x01\x00\x05hello\r\n")
    time.sleep(0.2)
    c.send(f"PORT {port_arg(LANC_TLS, 50016)}\r\n".encode())
    wait_for(lambda: env.srv_out.follows, 2.5)
    env.snapshot(out)
    out.note = server_view(env.srv_out)
    c.close()


# ---- targets ---------------------------------------------------------------


class HostileFtpgate(targets.FtpgateTarget):
    """ftpgate with one transparent and one reverse listener and short timers."""

    def rule_file(self):
        self.listeners = 2
        table = self.lab.prefix.rstrip("-").replace("-", "_") + "_gw"
        text = f"""listeners:
  - name: out-v4
    listen: 0.0.0.0:{self.OUT_PORT}
    mode: transparent
  - name: in-v4
    listen: {PUBLIC_V4}:{self.IN_BASE}
    mode: reverse
    upstream: {LANS}:{CTL_PORT}
    announce: {PUBLIC_V4}
data:
  backend: {self.opts.backend}
  client_ports: {self.CLIENT_PORTS[0]}-{self.CLIENT_PORTS[1]}
  server_ports: {self.SERVER_PORTS[0]}-{self.SERVER_PORTS[1]}
  pinhole_timeout: {PINHOLE_TIMEOUT:.0f}s
  nftables_table: {table}
limits:
  max_sessions: 1000
  max_sessions_per_client: {PER_CLIENT}
  idle_timeout: {IDLE_TIMEOUT:.0f}s
  connect_timeout: 3s
rules:
  - name: tls-passthrough
    clients: [{LANC_TLS}/32]
    data_ports: {DATA_PORTS[0]}-{DATA_PORTS[1]}
    tls: passthrough
  - name: lab
    data_ports: {DATA_PORTS[0]}-{DATA_PORTS[1]}
    tls: refuse
"""
        path = os.path.join(self.dir, "ftpgate.yaml")
        with open(path, "w") as f:
            f.write(text)
        return path


def add_third_party(lab):
    """A third host, thrd (10.71.3.2), routed by the edge like the others."""
    ns = lab.ns("thrd")
    topology.run(["ip", "netns", "add", ns])
    lab.created.append(ns)
    lab.run("thrd", ["ip", "link", "set", "lo", "up"])
    topology.run(["ip", "-n", lab.ns("edge"), "link", "add", "thrd", "type", "veth", "peer", "name", "eth0", "netns", ns])
    lab.run("edge", ["ip", "addr", "add", f"{THIRD_EDGE}/24", "dev", "thrd"])
    lab.run("edge", ["ip", "link", "set", "thrd", "up"])
    lab.run("thrd", ["ip", "addr", "add", f"{THIRD}/24", "dev", "eth0"])
    lab.run("thrd", ["ip", "link", "set", "eth0", "up"])
    lab.run("thrd", ["ip", "route", "add", "default", "via", THIRD_EDGE])
    lab.run("lanc", ["ip", "addr", "add", f"{LANC_TLS}/24", "dev", "eth0"])


def run_target(lab, target, srv_out, srv_in, only):
    results = {}
    target.setup()
    try:
        for name, fn, _codes, _reach, _gating, _na in CASES:
            if only and not any(o.lower() in name.lower() for o in only):
                continue
            env = Env(lab, target, srv_out, srv_in)
            srv_out.reset()
            srv_in.reset()
            env.expect_before = env.expectations()
            out = Outcome()
            mark = target.log_mark()
            try:
                fn(env, out)
            except Exception as exc:  # one case's failure is reported, the rest go on
                out.error = f"{type(exc).__name__}: {exc}"
            env.finish(out)
            out.log = target.log_tail(mark) if target.name == "ftpgate" else ""
            results[name] = out
            print(f"  {target.name} {name}: {out.reply} opened={'yes' if out.opened() else 'no'}", flush=True)
    finally:
        target.teardown()
        lab.flush_target_chains()
    return results


def opened_text(out):
    parts = []
    if out.expects:
        parts.append(f"{len(out.expects)} expect")
    if out.pinholes:
        parts.append(f"pinhole {','.join(map(str, out.pinholes))}")
    if out.reached:
        parts.append("reached " + ",".join(out.reached))
    return "yes: " + "; ".join(parts) if parts else "no"


def judge(name, out, codes, reach_ok):
    """Why ftpgate did not hold on this case, or None."""
    if out.error:
        return out.error
    if out.reply not in codes:
        return f"reply {out.reply}, want {sorted(codes)[:3]}{'...' if len(codes) > 3 else ''}"
    if out.expects or out.pinholes:
        return "left open: " + opened_text(out)
    if out.reached and not reach_ok:
        return "a connection reached " + ",".join(out.reached)
    if reach_ok and name.startswith("PORT") and not out.reached:
        return "the legitimate data connection did not arrive"
    return None


def main(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--targets", default="kernel,ftpgate")
    p.add_argument("--backend", choices=("relay", "nftables"), default="relay")
    p.add_argument("--ftpgate-bin", default=os.environ.get("FTPGATE_BIN"))
    p.add_argument("--cases", default="", help="substrings of case names (default: all)")
    p.add_argument("--check", action="store_true", help="report missing prerequisites, then exit")
    args = p.parse_args(argv)
    args.ipv6 = False
    names = [t for t in args.targets.split(",") if t]
    missing = prologue.missing_basics()
    if "ftpgate" in names and not prologue.has_binary(args.ftpgate_bin):
        missing.append("ftpgate binary (FTPGATE_BIN)")
    code = prologue.verdict("hostile", missing, args.check)
    if code is not None:
        return code
    prologue.absolute_bin(args)
    teardown, workdir, lab = prologue.start("hostile")
    only = [c for c in args.cases.split(",") if c]
    results = {}
    try:
        lab.up(ipv6=False)
        add_third_party(lab)
        print(f"hostile: namespaces {lab.prefix}*", flush=True)
        srv_out = HostileServer(lab, "wans")
        srv_in = HostileServer(lab, "lans")
        for name in names:
            cls = HostileFtpgate if name == "ftpgate" else targets.TARGETS[name]
            results[name] = run_target(lab, cls(lab, workdir, args), srv_out, srv_in, only)
    finally:
        teardown()

    width = max(len(c[0]) for c in CASES)
    print()
    print(f"| {'case':<{width}} | " + " | ".join(f"{t}: reply | {t}: opened" for t in names) + " |")
    print(f"|{'-' * (width + 2)}|" + "|".join("---|---" for _ in names) + "|")
    for name, _fn, _codes, _reach, _gating, na in CASES:
        if not all(name in results[t] for t in names):
            continue
        cells = []
        for t in names:
            out = results[t][name]
            if t == "kernel" and na:
                cells.append(f"n/a ({na}): {out.reply} | {opened_text(out)}")
            else:
                cells.append(f"{out.reply} | {opened_text(out)}")
        print(f"| {name:<{width}} | " + " | ".join(cells) + " |")
    print()
    for t in names:
        for name, out in results[t].items():
            if out.note or out.error:
                print(f"note {t} {name}: {out.note}{' ERROR ' + out.error if out.error else ''}")
    held = failed = 0
    if "ftpgate" in results:
        print()
        for name, _fn, codes, reach_ok, gating, _na in CASES:
            out = results["ftpgate"].get(name)
            if out is None:
                continue
            why = judge(name, out, codes, reach_ok)
            if why is None:
                print(f"hostile ftpgate {name}: held")
                held += 1
            elif not gating:
                print(f"hostile ftpgate {name}: GAP (not gating) {why}")
            else:
                print(f"hostile ftpgate {name}: FAIL {why}")
                print("    | " + (out.log or "").replace("\n", "\n    | "))
                failed += 1
        print(f"ftpgate: {held} held, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
