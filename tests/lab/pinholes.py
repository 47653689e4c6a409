#!/usr/bin/env python3
"""Pinhole checks: a data pinhole admits its one expected connection and nothing else.

For each scenario (inbound = reverse listener, outbound = transparent), family (v4,
v6) and mode (passive: PASV on v4, EPSV on v6; active: PORT on v4, EPRT on v6), a raw
control connection through ftpgate to vsftpd opens a real pinhole, and:

- intruder: another lab host connects to the announced endpoint first;
- legit:    the expected peer connects and 1 MiB passes (SHA-256 checked);
- second:   the expected peer connects to the same endpoint again;
- behind:   the host behind the pinhole (server in passive, client in active) saw
            exactly one data connection attempt (an nft counter of SYNs there);
- expired:  a second session opens a pinhole, lets it expire (pinhole_timeout is
            short in this run), then the expected peer connects;
- bytes:    the gateway's transfer line counts the download: exactly its size with
            the relay; with nftables the kernel's IP-level count of the server's
            side, so at least the size and at most 10% more (headers);
- empty:    after each session ended, no set or map of the gateway's table holds an
            element (polled for a bounded time: removal is asynchronous).

With --backend nftables one more check, `conntrack`, says how the gateway follows
connections: it must say `netlink` (conntrack's netlink events; there is no other way).

A connect attempt is `connected` (SYN-ACK), `refused` (RST) or `dropped` (no answer
within CONNECT_WAIT). With --backend nftables every attempt but the legit one must be
`dropped`; with --backend relay the outcomes are reported and only legit and empty
gate (the relay accepts and closes a wrong peer in user space).

Run as root: tests/lab/pinholes.py --ftpgate-bin target/debug/ftpgate [--backend relay]
"""

import argparse
import contextlib
import ctypes
import hashlib
import json
import os
import re
import socket
import sys
import time

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import prologue  # noqa: E402
import servers  # noqa: E402
import targets  # noqa: E402
import topology  # noqa: E402

SERVER = "vsftpd"
PINHOLE_TIMEOUT = 4  # seconds, written into the run's rule file
CONNECT_WAIT = 1.5  # seconds without SYN-ACK or RST that count as dropped
REPLY_WAIT = 10  # seconds for any control reply or data read
CLONE_NEWNET = 0x40000000
PROBE_TABLE = "pinprobe"

# Who is the expected peer, who intrudes, who is behind the pinhole. The intruder is
# a host the lab's own firewall would let through to that port (so without the
# gateway's drop it would get an answer).
ROLES = {
    # (scenario, mode): (client host, server host, intruder host, behind host)
    ("inbound", "passive"): ("wanc", "lans", "lanc", "lans"),
    ("inbound", "active"): ("wanc", "lans", "wans", "wanc"),
    ("outbound", "passive"): ("lanc", "wans", "lans", "wans"),
    ("outbound", "active"): ("lanc", "wans", "lans", "lanc"),
}

_libc = ctypes.CDLL(None, use_errno=True)


@contextlib.contextmanager
def in_netns(ns):
    """Runs the block (this thread only) in namespace ns; sockets made there stay there."""
    with open(f"/run/netns/{ns}") as target, open("/proc/thread-self/ns/net") as home:
        if _libc.setns(target.fileno(), CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns {ns}: {os.strerror(err)}")
        try:
            yield
        finally:
            if _libc.setns(home.fileno(), CLONE_NEWNET) != 0:
                raise SystemExit("pinholes: cannot return to the original network namespace")


def family_of(addr):
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


def attempt(lab, host, addr, port, wait=CONNECT_WAIT):
    """One connect from host to (addr, port): connected, refused, dropped or unreachable."""
    with in_netns(lab.ns(host)):
        s = socket.socket(family_of(addr), socket.SOCK_STREAM)
    s.settimeout(wait)
    try:
        s.connect((addr, port))
        return "connected"
    except ConnectionRefusedError:
        return "refused"
    except (socket.timeout, TimeoutError):
        return "dropped"
    except OSError as exc:
        return f"unreachable ({exc.strerror})"
    finally:
        s.close()


class Control:
    """A raw FTP control connection from a lab host."""

    def __init__(self, lab, host, addr, port):
        with in_netns(lab.ns(host)):
            self.sock = socket.socket(family_of(addr), socket.SOCK_STREAM)
        self.sock.settimeout(REPLY_WAIT)
        self.sock.connect((addr, port))
        self.file = self.sock.makefile("rb")
        self.peer = addr
        self.expect(None, 220)

    def reply(self):
        first = self.file.readline().decode(errors="replace")
        if len(first) < 4 or not first[:3].isdigit():
            raise RuntimeError(f"bad reply line {first!r}")
        lines = [first]
        if first[3] == "-":
            while True:
                line = self.file.readline().decode(errors="replace")
                if not line:
                    raise RuntimeError("control connection closed mid-reply")
                lines.append(line)
                if line[:3] == first[:3] and line[3:4] == " ":
                    break
        return int(first[:3]), "".join(lines).strip()

    def expect(self, command, *codes):
        if command is not None:
            self.sock.sendall(command.encode() + b"\r\n")
        code, text = self.reply()
        if code not in codes:
            raise RuntimeError(f"{command or 'greeting'}: {text}")
        return text

    def login(self):
        text = self.expect("USER anonymous", 230, 331)
        if not text.startswith("230"):
            self.expect("PASS lab@", 230)
        self.expect("TYPE I", 200)

    def passive(self, family):
        """(address, port) the client is told to connect to."""
        if family == 4:
            text = self.expect("PASV", 227)
            nums = [int(n) for n in re.search(r"(\d+),(\d+),(\d+),(\d+),(\d+),(\d+)", text).groups()]
            return ".".join(map(str, nums[:4])), nums[4] * 256 + nums[5]
        text = self.expect("EPSV", 229)
        port = int(re.search(r"\((.)\1\1(\d+)\1\)", text).group(2))
        return self.peer, port

    def active(self, family, addr, port):
        if family == 4:
            h = addr.replace(".", ",")
            self.expect(f"PORT {h},{port >> 8},{port & 255}", 200)
        else:
            self.expect(f"EPRT |2|{addr}|{port}|", 200)

    def close(self):
        try:
            self.expect("QUIT", 221)
        finally:
            self.file.close()
            self.sock.close()


def read_all(sock):
    sock.settimeout(REPLY_WAIT)
    h = hashlib.sha256()
    while True:
        chunk = sock.recv(1 << 16)
        if not chunk:
            return h.hexdigest()
        h.update(chunk)


def edge_table(lab, name):
    out = lab.run("edge", ["nft", "-j", "list", "table", "inet", name]).stdout
    return json.loads(out)["nftables"]


def elements_left(lab, name):
    """{set or map name: element count} for every set/map of the table holding any."""
    left = {}
    for obj in edge_table(lab, name):
        for kind in ("set", "map"):
            if kind in obj and obj[kind].get("elem"):
                left[obj[kind]["name"]] = len(obj[kind]["elem"])
    return left


def wait_empty(lab, name, bound=5.0):
    deadline = time.monotonic() + bound
    while True:
        left = elements_left(lab, name)
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.05)


def _values(elem):
    """Flattens an nft JSON key or value into a list of strings/ints."""
    if isinstance(elem, dict):
        if "concat" in elem:
            return [v for e in elem["concat"] for v in _values(e)]
        if "elem" in elem:
            return _values(elem["elem"]["val"])
        if "val" in elem:
            return _values(elem["val"])
    return [elem]


def kernel_active_endpoint(lab, table, family, client_addr, client_port):
    """(address, port) the gateway told the server: from its dnat map, the element
    whose value is the client's PORT/EPRT endpoint, where the plan has one there;
    otherwise from the conntrack expectation the plan made for the server's
    connection, whose NAT (the client's endpoint) conntrack does not print: the
    newest expectation (most time left) to a server_ports port, one active plan at
    a time here."""
    for obj in edge_table(lab, table):
        m = obj.get("map")
        if not m or m["name"] != f"dnat{family}":
            continue
        for key, value in m.get("elem", []):
            if _values(value) == [client_addr, client_port]:
                _peer, dst, port = _values(key)
                return dst, port
    lo, hi = targets.FtpgateTarget.SERVER_PORTS
    out = lab.run("edge", ["conntrack", "-L", "expect", "-f", "ipv4" if family == 4 else "ipv6"], check=False).stdout
    best = None
    for line in out.splitlines():
        fields = line.split()
        # "<seconds left> proto=6 src=S dst=D sport=0 dport=P mask-src=... sport=0 dport=65535
        # master-src=...": the expected tuple is the first of each name.
        tuple_ = {}
        for f in fields[1:]:
            name, _, value = f.partition("=")
            tuple_.setdefault(name, value)
        if not fields or not fields[0].isdigit() or "dport" not in tuple_:
            continue
        port = int(tuple_["dport"])
        if lo <= port <= hi and (best is None or int(fields[0]) > best[0]):
            best = (int(fields[0]), tuple_["dst"], port)
    return best[1:] if best else None


def relay_active_endpoint(lab, family):
    """The relay's listener on a server_ports port (one session at a time here)."""
    lo, hi = targets.FtpgateTarget.SERVER_PORTS
    out = lab.run("edge", ["ss", "-Hltn", f"( sport >= :{lo} and sport <= :{hi} )"]).stdout
    for line in out.splitlines():
        local = line.split()[3]
        addr, port = local.rsplit(":", 1)
        addr = addr.strip("[]")
        if (":" in addr) == (family == 6):
            return addr, int(port)
    return None


def probe_setup(lab):
    """Named SYN counters on every host but the edge: data connection attempts seen."""
    ctl = ", ".join(str(p) for p in servers.CONTROL_PORTS)
    script = f"""
table inet {PROBE_TABLE} {{
    counter syn4 {{ }}
    counter syn6 {{ }}
    chain in {{
        type filter hook input priority -300; policy accept;
        meta nfproto ipv4 tcp flags & (syn | ack) == syn tcp dport != {{ {ctl} }} counter name "syn4"
        meta nfproto ipv6 tcp flags & (syn | ack) == syn tcp dport != {{ {ctl} }} counter name "syn6"
    }}
}}
"""
    for host in ("lanc", "lans", "wanc", "wans"):
        lab.run(host, ["nft", "-f", "-"], input_text=script)


def syns(lab, host, family):
    out = lab.run(host, ["nft", "-j", "list", "counter", "inet", PROBE_TABLE, f"syn{family}"]).stdout
    for obj in json.loads(out)["nftables"]:
        if "counter" in obj:
            return obj["counter"]["packets"]
    raise RuntimeError(f"no counter syn{family} on {host}")


def transfer_bytes(target, mark, bound=5.0):
    """to_client of the first transfer line logged after mark (polled: the line
    follows the data connection's end)."""
    deadline = time.monotonic() + bound
    while True:
        with open(target.log, "rb") as f:
            f.seek(mark)
            text = f.read().decode(errors="replace")
        m = re.search(r"\btransfer\b.*?\bto_client=(\d+)", text)
        if m or time.monotonic() >= deadline:
            return int(m.group(1)) if m else None
        time.sleep(0.05)


def conntrack_source(target):
    with open(target.log, errors="replace") as f:
        text = f.read()
    if "following netlink events" in text:
        return "netlink"
    return "unknown"


def expired_count(target):
    with open(target.log, errors="replace") as f:
        return f.read().count("pinhole expired unused")


class Case:
    def __init__(self, lab, target, table, digest, backend, scenario, family, mode):
        self.lab, self.target, self.table, self.digest = lab, target, table, digest
        self.backend, self.scenario, self.family, self.mode = backend, scenario, family, mode
        self.client, self.server, self.intruder, self.behind = ROLES[(scenario, mode)]
        self.results = []  # (check, outcome, expected or None, ok)

    def label(self, check):
        return f"pinholes {self.backend} {self.scenario} {self.mode} v{self.family} {check}"

    def record(self, check, outcome, want):
        ok = outcome == want if want is not None else True
        self.results.append((check, outcome, want, ok))
        note = "" if want is None else (" (expected " + str(want) + ")" if not ok else "")
        print(f"{self.label(check)}: {outcome}{'' if ok else ' FAIL'}{note}", flush=True)

    def drop_wanted(self):
        return "dropped" if self.backend == "nftables" else None

    def control(self):
        _, addr, port = self.target.endpoint(self.scenario, SERVER, self.family)
        c = Control(self.lab, self.client, addr, port)
        c.login()
        return c

    def open_active(self, c):
        """Client listens, sends PORT/EPRT; returns (listener, endpoint told to the server)."""
        caddr = topology.host_addr(self.client, self.family)
        with in_netns(self.lab.ns(self.client)):
            lsock = socket.socket(family_of(caddr), socket.SOCK_STREAM)
        lsock.bind((caddr, 0))
        lsock.listen(4)
        cport = lsock.getsockname()[1]
        c.active(self.family, caddr, cport)
        if self.backend == "nftables":
            # The gateway connects to the client from the edge; in outbound the
            # client's address is its own (no NAT on the LAN side).
            ep = kernel_active_endpoint(self.lab, self.table, self.family, caddr, cport)
        else:
            ep = relay_active_endpoint(self.lab, self.family)
        if ep is None:
            raise RuntimeError("cannot find the endpoint the gateway announced to the server")
        return lsock, ep

    def run(self):
        try:
            self.session_transfer()
            self.session_expiry()
        except Exception as exc:  # one broken case must not hide the others
            self.record("error", f"{type(exc).__name__}: {exc}", "none")
        return self.results

    def session_transfer(self):
        before = syns(self.lab, self.behind, self.family)
        mark = self.target.log_mark()
        c = self.control()
        if self.mode == "passive":
            addr, port = c.passive(self.family)
            self.record("intruder", attempt(self.lab, self.intruder, addr, port), self.drop_wanted())
            with in_netns(self.lab.ns(self.client)):
                data = socket.socket(family_of(addr), socket.SOCK_STREAM)
            data.settimeout(REPLY_WAIT)
            data.connect((addr, port))
            c.expect(f"RETR {servers.DATA_FILE}", 150, 125)
            got = read_all(data)
            data.close()
            c.expect(None, 226)
            self.record("legit", "digest ok" if got == self.digest else "digest mismatch", "digest ok")
            self.record("second", attempt(self.lab, self.client, addr, port), self.drop_wanted())
        else:
            lsock, (addr, port) = self.open_active(c)
            self.record("intruder", attempt(self.lab, self.intruder, addr, port), self.drop_wanted())
            c.expect(f"RETR {servers.DATA_FILE}", 150, 125)
            lsock.settimeout(REPLY_WAIT)
            data, _ = lsock.accept()
            got = read_all(data)
            data.close()
            c.expect(None, 226)
            self.record("legit", "digest ok" if got == self.digest else "digest mismatch", "digest ok")
            self.record("second", attempt(self.lab, self.server, addr, port), self.drop_wanted())
            lsock.close()
        c.close()
        got = transfer_bytes(self.target, mark)
        size = servers.DATA_SIZE
        if self.backend == "nftables":
            fits = got is not None and size <= got <= size * 1.1
            want = f"{size}..{int(size * 1.1)}"
        else:
            fits, want = got == size, str(size)
        self.record("bytes", "counted" if fits else f"to_client={got}, want {want}", "counted")
        seen = syns(self.lab, self.behind, self.family) - before
        self.record("behind", f"{seen} SYN", "1 SYN" if self.backend == "nftables" else None)
        left = wait_empty(self.lab, self.table)
        self.record("empty", "no elements" if not left else f"left: {left}", "no elements")

    def session_expiry(self):
        before = syns(self.lab, self.behind, self.family)
        expired = expired_count(self.target)
        c = self.control()
        if self.mode == "passive":
            addr, port = c.passive(self.family)
            peer = self.client
        else:
            lsock, (addr, port) = self.open_active(c)
            peer = self.server
        # Waits for the gateway to say the pinhole expired (the event under test).
        deadline = time.monotonic() + PINHOLE_TIMEOUT + 10
        while expired_count(self.target) == expired:
            if time.monotonic() >= deadline:
                raise RuntimeError("the gateway never logged the pinhole's expiry")
            time.sleep(0.05)
        self.record("expired", attempt(self.lab, peer, addr, port), self.drop_wanted())
        if self.mode == "active":
            lsock.close()
        c.close()
        seen = syns(self.lab, self.behind, self.family) - before
        self.record("expired-behind", f"{seen} SYN", "0 SYN" if self.backend == "nftables" else None)
        left = wait_empty(self.lab, self.table)
        self.record("expired-empty", "no elements" if not left else f"left: {left}", "no elements")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", choices=("relay", "nftables"), default="nftables")
    p.add_argument("--ftpgate-bin", default=os.environ.get("FTPGATE_BIN"))
    p.add_argument("--scenarios", default="inbound,outbound")
    p.add_argument("--families", default="4,6")
    p.add_argument("--modes", default="passive,active")
    p.add_argument("--check", action="store_true", help="report missing prerequisites, then exit")
    args = p.parse_args(argv)
    args.ipv6 = True
    return args


def missing_prerequisites(args):
    missing = prologue.missing_basics()
    if not os.access(servers.binaries()[SERVER], os.X_OK):
        missing.append(SERVER)
    if not prologue.has_binary(args.ftpgate_bin):
        missing.append("ftpgate binary (FTPGATE_BIN)")
    return missing


class PinholeTarget(targets.FtpgateTarget):
    pinhole_timeout = f"{PINHOLE_TIMEOUT}s"


def main(argv):
    args = parse_args(argv)
    code = prologue.verdict("pinholes", missing_prerequisites(args), args.check)
    if code is not None:
        return code
    prologue.absolute_bin(args)
    teardown, workdir, lab = prologue.start("pinholes")
    results = []
    try:
        lab.up()
        print(f"lab: namespaces {lab.prefix}*, work dir {workdir}", flush=True)
        payload, digest = servers.new_payload()
        running = servers.start_all(lab, workdir, [SERVER], payload)
        teardown.actions.append(lambda: [s.stop() for s in running.values()])
        probe_setup(lab)
        target = PinholeTarget(lab, workdir, args)
        teardown.actions.append(target.teardown)
        target.setup()
        if args.backend == "nftables":
            # Startup lines are logged before "listening".
            source = conntrack_source(target)
            want = "netlink"
            ok = source == want
            results.append(("conntrack", source, want, ok))
            print(f"pinholes nftables conntrack: {source}{'' if ok else ' FAIL (expected ' + want + ')'}", flush=True)
        for scenario in args.scenarios.split(","):
            for family in (int(f) for f in args.families.split(",")):
                for mode in args.modes.split(","):
                    case = Case(lab, target, target.table, digest, args.backend, scenario, family, mode)
                    results += case.run()
    finally:
        teardown()
    failed = sum(1 for r in results if not r[3])
    print(f"pinholes: {len(results) - failed} passed, {failed} failed")
    return 1 if failed or not results else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
