#!/usr/bin/env python3
"""Tuple reuse: active-mode data from a server that sends from a fixed port.

vsftpd with `connect_from_port_20=YES` (Debian's default) makes every active-mode
data connection from port 20, so every data connection to one gateway port has the
same 4-tuple, and conntrack keeps the last one's entry (TIME_WAIT, 120 s) after it
ends. The gateway (`backend: nftables`, `server_ports` of two ports) reuses its ports
well within that time: when its pool wraps, and after a restart. A new connection with
the old tuple makes the kernel destroy the old entry and create a new one (one batch
of events); a gateway that mistakes the new entry for the old one never hands it to
its plan, and holds the server's 226 until pinhole_timeout.

Inbound, IPv4: a raw control connection from wanc through the reverse listener to
vsftpd on lans. Each transfer: the client listens, sends PORT, then RETR; vsftpd
connects from port 20 to the gateway's server-side pinhole; the client checks the
SHA-256 of what arrived and the time from RETR to the 226. The gateway restarts
between runs of --transfers transfers (--runs runs: the first start, then restarts).

A transfer is `on time` with the right digest and the 226 within ON_TIME seconds
(pinhole_timeout is PINHOLE_TIMEOUT); `late` otherwise. The run gates on every
transfer being on time, every data connection coming from port 20 (or the test would
not test reuse), and at least one port reused within a run and one after a restart.

Run as root: tests/lab/reuse.py --ftpgate-bin target/debug/ftpgate
"""

import argparse
import os
import socket
import sys
import time

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import prologue  # noqa: E402
import servers  # noqa: E402
import targets  # noqa: E402
import topology  # noqa: E402
from pinholes import (  # noqa: E402
    REPLY_WAIT, Control, conntrack_source, in_netns, kernel_active_endpoint, read_all, transfer_bytes,
)

PINHOLE_TIMEOUT = 20  # seconds, written into the run's rule file
ON_TIME = 5  # seconds from RETR to 226
FIXED_PORT = 20
CLIENT = "wanc"
SERVER_HOST = "lans"


class ReuseTarget(targets.FtpgateTarget):
    """ftpgate with the nftables backend and a two-port server_ports pool."""

    SERVER_PORTS = (41000, 41001)
    pinhole_timeout = f"{PINHOLE_TIMEOUT}s"

    def restart(self, run):
        """Stops the gateway and starts it again with the same rule file and a fresh
        log. Its conntrack entries stay in the kernel."""
        self.daemon.stop()
        self.log = os.path.join(self.dir, f"ftpgate-{run}.log")
        argv = [
            "env", "RUST_LOG=" + os.environ.get("RUST_LOG", "info"),
            self.opts.ftpgate_bin, "run", "--config", os.path.join(self.dir, "ftpgate.yaml"),
        ]
        self.daemon = targets.Daemon(self.lab, argv, self.log, "listening", self.listeners)
        self.daemon.wait_ready(15)


def transfer(lab, target, digest):
    """One active-mode RETR: (outcome text, on time?, gateway port, data source port)."""
    mark = target.log_mark()
    _, addr, port = target.endpoint("inbound", "vsftpd", 4)
    c = Control(lab, CLIENT, addr, port)
    c.login()
    caddr = topology.host_addr(CLIENT, 4)
    with in_netns(lab.ns(CLIENT)):
        lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        lsock.bind((caddr, 0))
        lsock.listen(1)
        cport = lsock.getsockname()[1]
        c.active(4, caddr, cport)
        ep = kernel_active_endpoint(lab, target.table, 4, caddr, cport)
        if ep is None:
            raise RuntimeError("no dnat element for the client's PORT endpoint")
        gw_port = ep[1]
        # Long enough to see a 226 held until the pinhole timeout.
        c.sock.settimeout(PINHOLE_TIMEOUT + 10)
        start = time.monotonic()
        c.expect(f"RETR {servers.DATA_FILE}", 150, 125)
        lsock.settimeout(REPLY_WAIT)
        data, peer = lsock.accept()
        got = read_all(data)
        data.close()
        c.expect(None, 226)
        took = time.monotonic() - start
    finally:
        lsock.close()
    c.close()
    if got != digest:
        return f"FAIL digest mismatch ({took:.2f} s)", False, gw_port, peer[1]
    if took >= ON_TIME:
        return f"late ({took:.2f} s to the 226)", False, gw_port, peer[1]
    # The audit counts the connection the plan followed: the kernel's IP-level
    # count of this download, not of an earlier one's entry.
    counted = transfer_bytes(target, mark)
    size = servers.DATA_SIZE
    if counted is None or not size <= counted <= size * 1.1:
        return f"FAIL transfer line to_client={counted}, want {size}..{int(size * 1.1)}", False, gw_port, peer[1]
    return f"on time ({took:.2f} s, {counted} bytes counted)", True, gw_port, peer[1]


def never_made(target_dir):
    count = 0
    for name in os.listdir(target_dir):
        if name.startswith("ftpgate") and name.endswith(".log"):
            with open(os.path.join(target_dir, name), errors="replace") as f:
                count += f.read().count("data connection never made")
    return count


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ftpgate-bin", default=os.environ.get("FTPGATE_BIN"))
    p.add_argument("--runs", type=int, default=4, help="gateway lifetimes: the first start, then restarts")
    p.add_argument("--transfers", type=int, default=3, help="transfers per run (3 wraps a two-port pool)")
    p.add_argument("--check", action="store_true", help="report missing prerequisites, then exit")
    args = p.parse_args(argv)
    args.backend = "nftables"
    args.ipv6 = False
    return args


def missing_prerequisites(args):
    missing = prologue.missing_basics()
    if not os.access(servers.binaries()["vsftpd"], os.X_OK):
        missing.append("vsftpd")
    if not prologue.has_binary(args.ftpgate_bin):
        missing.append("ftpgate binary (FTPGATE_BIN)")
    return missing


def main(argv):
    args = parse_args(argv)
    code = prologue.verdict("reuse", missing_prerequisites(args), args.check)
    if code is not None:
        return code
    prologue.absolute_bin(args)
    teardown, workdir, lab = prologue.start("reuse")
    on_time = total = 0
    sources = set()
    wrapped = restarted = 0
    failures = []
    try:
        lab.up(ipv6=False)
        print(f"lab: namespaces {lab.prefix}*, work dir {workdir}", flush=True)
        payload, digest = servers.new_payload()
        server = servers.FixedPortVsftpd(lab, SERVER_HOST, workdir, payload)
        teardown.actions.append(server.stop)
        server.start()
        server.wait_ready()
        target = ReuseTarget(lab, workdir, args)
        teardown.actions.append(target.teardown)
        target.setup()
        print(f"reuse conntrack: {conntrack_source(target)}", flush=True)
        used_before = set()
        for run in range(1, args.runs + 1):
            if run > 1:
                target.restart(run)
            used = set()
            for n in range(1, args.transfers + 1):
                total += 1
                label = f"reuse run {run} transfer {n}"
                try:
                    text, ok, gw_port, sport = transfer(lab, target, digest)
                except Exception as exc:  # one broken transfer must not hide the others
                    print(f"{label}: FAIL {type(exc).__name__}: {exc}", flush=True)
                    failures.append(label)
                    continue
                sources.add(sport)
                wrapped += gw_port in used
                restarted += gw_port in used_before and gw_port not in used
                used.add(gw_port)
                on_time += ok
                print(f"{label} port {gw_port} from {sport}: {text}", flush=True)
            used_before |= used
        print(f"reuse: ports reused within a run {wrapped}, after a restart {restarted}", flush=True)
        print(f"reuse: 'data connection never made' logged {never_made(target.dir)} times", flush=True)
    finally:
        teardown()
    print(f"reuse: {on_time} of {total} on time")
    if sources != {FIXED_PORT}:
        print(f"reuse: FAIL data came from ports {sorted(sources)}, not only {FIXED_PORT}")
        return 1
    if not wrapped or (args.runs > 1 and not restarted):
        print("reuse: FAIL no port was reused")
        return 1
    return 0 if total and on_time == total else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
