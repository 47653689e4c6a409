#!/usr/bin/env python3
"""ftpgate lab benchmark: throughput, session rate and control latency through the
lab's edge, for several targets side by side in one run.

All measurements are inbound (the lab's WAN client `wanc` to the LAN server `lans`,
IPv4, passive mode), the one direction in which every target carries passive FTP:

  direct            wanc -> 10.71.2.2 (the server's own address): the edge routes and
                    forwards with its firewall (conntrack, the lab's filter chains)
                    but no NAT, no FTP helper, no proxy. The baseline.
  kernel            wanc -> 192.0.2.1, DNAT to the server, nf_conntrack_ftp +
                    nf_nat_ftp rewriting the replies and opening the data flows.
  suse              wanc -> SuSE ftp-proxy's reverse instance on the edge.
  ftpgate-relay     wanc -> ftpgate's reverse listener, data.backend: relay.
  ftpgate-nftables  the same with data.backend: nftables.

With --ftps the servers run in TLS mode (tests/lab/lab.py --ftps; a lab CA made at run
time) and curl transfers under PROT P (`--ssl-reqd`): `direct` is then FTPS between
the client and the server, `ftpgate-relay` the gateway terminating TLS on both legs.

Targets run round-robin within each repetition (set up, measure, torn down), so
noise on the shared machine hits all of them alike; the table shows medians over
the repetitions and ratios between targets. Run as root; Python 3 stdlib only.
See tests/lab/README.md ("Benchmark") for what each figure means.
"""

import argparse
import hashlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time

sys.dont_write_bytecode = True
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import certs  # noqa: E402
import prologue  # noqa: E402
import servers  # noqa: E402
import targets  # noqa: E402
from topology import FW_TABLE, host_addr  # noqa: E402

TESTS = ("throughput", "rate", "latency")
LIST_DIR = "list50"
LIST_ENTRIES = 50
BENCH_SERVERS = ("vsftpd", "proftpd", "pure-ftpd", "pyftpdlib")
# Chosen by measurement (tests/lab/README.md, "Benchmark"): the server that is not
# the bottleneck for each test.
DEFAULT_XFER_SERVER = "vsftpd"
DEFAULT_RATE_SERVER = "pyftpdlib"


class DirectTarget(targets.Target):
    """The edge routing and filtering only: the client addresses the LAN server
    itself; the forward chain admits new connections from wanc to it."""

    name = "direct"

    def setup(self):
        self.lab.nft(
            f'add rule inet {FW_TABLE} tgt_forward iifname "wanc" oifname "lans" '
            f'ip daddr {host_addr("lans", 4)} tcp dport 1024-65535 accept\n'
        )

    def endpoint(self, scenario, server, family):
        return "wanc", host_addr("lans", family), servers.SERVERS[server][0]


class FtpgateRelay(targets.FtpgateTarget):
    name = "ftpgate-relay"
    backend = "relay"


class FtpgateNftables(targets.FtpgateTarget):
    name = "ftpgate-nftables"
    backend = "nftables"


BENCH_TARGETS = {
    "direct": DirectTarget,
    "kernel": targets.KernelTarget,
    "suse": targets.SuseTarget,
    "ftpgate-relay": FtpgateRelay,
    "ftpgate-nftables": FtpgateNftables,
}
# Their sporadic session errors under load are theirs (the kernel helper: a refused
# data connection about once in 1000-2500 sessions; ftp-proxy: "425 Can't open data
# connection" about once in 300): counted and shown, but they do not fail the run.
REFERENCE_TARGETS = ("kernel", "suse")
# Under --ftps: the others cannot carry FTPS through the NAT (kernel), speak no TLS
# (suse), or send TLS plans through the relay anyway (ftpgate-nftables).
FTPS_TARGETS = ("direct", "ftpgate-relay")
RATIOS = (
    ("ftpgate-relay", "kernel"),
    ("ftpgate-relay", "suse"),
    ("ftpgate-nftables", "kernel"),
    ("ftpgate-nftables", "ftpgate-relay"),
)


def parse_size(text):
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = t[-1] if t and t[-1] in units else ""
    try:
        value = int(t[: len(t) - len(unit)] if unit else t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (e.g. 1G, 64M, 1048576)")
    if value <= 0:
        raise argparse.ArgumentTypeError("size must be positive")
    return value * units[unit]


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    csv = lambda s: [x for x in s.split(",") if x]  # noqa: E731
    p.add_argument("--targets", type=csv, default=None)
    p.add_argument("--tests", type=csv, default=None)
    p.add_argument("--ftps", action="store_true",
                   help="throughput under PROT P: servers in TLS mode, targets direct and ftpgate-relay")
    p.add_argument("--reps", type=int, default=None, help="repetitions (default 3; 1 with --smoke)")
    p.add_argument("--size", type=parse_size, default=None, help="transfer size (default 1G; 8M with --smoke)")
    p.add_argument("--server", default=DEFAULT_XFER_SERVER, choices=BENCH_SERVERS, help="server for throughput and latency")
    p.add_argument("--rate-server", default=DEFAULT_RATE_SERVER, choices=BENCH_SERVERS, help="server for the session rate")
    p.add_argument("--rate-workers", type=int, default=16)
    p.add_argument("--rate-procs", type=int, default=2, help="client processes the workers are spread over")
    p.add_argument("--rate-seconds", type=float, default=None, help="per target and repetition (default 10)")
    p.add_argument("--rate-sessions", type=int, default=None, help="instead of --rate-seconds")
    p.add_argument(
        "--gateway-hook", metavar="CMD",
        help="shell command run during each ftpgate rate test with FTPGATE_PID set "
        "(e.g. 'perf record -g -p $FTPGATE_PID -o f.data'); sent SIGINT when the test ends",
    )
    p.add_argument(
        "--netlink-sessions", type=int, default=0, metavar="N",
        help="after each ftpgate rate test, run N more sessions under strace and count the "
        "gateway's netlink syscalls per session (not part of the rate)",
    )
    p.add_argument("--noops", type=int, default=None, help="NOOP round trips per target and repetition (default 2000)")
    p.add_argument("--smoke", action="store_true", help="quick correctness run: --size 8M --reps 1 --rate-sessions 64 --noops 200")
    p.add_argument("--ftpgate-bin", default=os.environ.get("FTPGATE_BIN"))
    p.add_argument("--json", metavar="FILE", help="write every measurement as JSON ('-' for stdout)")
    p.add_argument("--tmpfs", default="/dev/shm", help="tmpfs directory for the work dir (file, server roots)")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("--check", action="store_true", help="report missing prerequisites, then exit")
    args = p.parse_args(argv)
    if args.targets is None:
        args.targets = list(FTPS_TARGETS if args.ftps else BENCH_TARGETS)
    if args.tests is None:
        args.tests = ["throughput"] if args.ftps else list(TESTS)
    if args.ftps:
        if any(t not in FTPS_TARGETS for t in args.targets):
            p.error(f"--ftps measures {', '.join(FTPS_TARGETS)} only")
        if args.tests != ["throughput"]:
            p.error("--ftps measures throughput only")
    args.pki = None  # FTPS: the run's certs.Pki
    for kind, chosen, known in (("targets", args.targets, BENCH_TARGETS), ("tests", args.tests, TESTS)):
        unknown = [x for x in chosen if x not in known]
        if unknown:
            p.error(f"unknown {kind}: {', '.join(unknown)} (known: {', '.join(known)})")
    smoke = args.smoke
    if args.reps is None:
        args.reps = 1 if smoke else 3
    if args.size is None:
        args.size = (8 << 20) if smoke else (1 << 30)
    if args.noops is None:
        args.noops = 200 if smoke else 2000
    if args.rate_sessions is None and args.rate_seconds is None:
        if smoke:
            args.rate_sessions = 64
        else:
            args.rate_seconds = 10.0
    if args.rate_sessions is not None and args.rate_seconds is not None:
        p.error("give --rate-seconds or --rate-sessions, not both")
    if args.netlink_sessions < 0:
        p.error("--netlink-sessions must be 0 or more")
    if args.reps < 1:
        p.error("--reps must be at least 1")
    if args.ftpgate_bin:
        args.ftpgate_bin = os.path.abspath(args.ftpgate_bin)
    return args


def servers_needed(args):
    names = []
    if "throughput" in args.tests or "latency" in args.tests:
        names.append(args.server)
    if "rate" in args.tests and args.rate_server not in names:
        names.append(args.rate_server)
    return names


def missing_prerequisites(args):
    missing = prologue.missing_basics(("ip", "nft", "ss", "curl"))
    if args.ftps:
        missing += certs.missing_prerequisites() + servers.missing_tls_prerequisites()
    bins = servers.binaries()
    for name in servers_needed(args):
        if not os.access(bins[name], os.X_OK):
            missing.append(f"{name} ({bins[name]})")
    missing += targets.missing_prerequisites(args.targets)
    if any(t.startswith("ftpgate") for t in args.targets) and not prologue.has_binary(args.ftpgate_bin):
        missing.append("ftpgate binary (FTPGATE_BIN or --ftpgate-bin)")
    if not os.path.isdir(args.tmpfs):
        missing.append(f"tmpfs directory {args.tmpfs}")
    return missing


def target_opts(args, cls):
    return argparse.Namespace(
        backend=getattr(cls, "backend", "relay"), ipv6=False, ftpgate_bin=args.ftpgate_bin,
        ftps=args.ftps, pki=args.pki,
    )


def write_payload(path, size):
    """A random file of size bytes; returns its SHA-256."""
    h = hashlib.sha256()
    block = os.urandom(1 << 20)
    with open(path, "wb") as f:
        left = size
        i = 0
        while left:
            # Vary each MiB so a stuck or repeated block shows up in the digest.
            chunk = (i.to_bytes(8, "big") + block[8:])[: min(left, len(block))]
            f.write(chunk)
            h.update(chunk)
            left -= len(chunk)
            i += 1
    os.chmod(path, 0o644)
    return h.hexdigest()


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def start_servers(lab, workdir, names, payload_path, pki=None):
    """The chosen servers on lans only (in TLS mode with pki), serving payload_path
    (hard-linked, so the file exists once on the tmpfs) and a directory of
    LIST_ENTRIES entries."""
    running = {}
    for name in names:
        srv = servers.Server(lab, "lans", name, workdir, b"", pki)
        data = os.path.join(srv.root, servers.DATA_FILE)
        os.unlink(data)
        os.link(payload_path, data)
        listdir = os.path.join(srv.root, LIST_DIR)
        os.makedirs(listdir, exist_ok=True)
        os.chmod(listdir, 0o755)
        for i in range(LIST_ENTRIES):
            with open(os.path.join(listdir, f"entry-{i:03d}.txt"), "w") as f:
                f.write(f"{i}\n")
        srv.start()
        running[name] = srv
    for srv in running.values():
        srv.wait_ready()
    return running


class Recorder:
    """Every measurement and every failure, per target."""

    def __init__(self, names):
        self.data = {n: {"retr": [], "stor": [], "rate": [], "latency": [], "netlink": [], "failures": []}
                     for n in names}

    def fail(self, target, what):
        self.data[target]["failures"].append(what)
        print(f"  {target}: FAIL {what}", flush=True)


def curl_transfer(lab, target, server, direction, args, payload_path, name):
    """One RETR or STOR with curl in wanc; returns (bytes, seconds) or raises."""
    client, addr, port = target.endpoint("inbound", server, 4)
    base = f"ftp://{addr}:{port}"
    limit = 60 + args.size // (4 << 20)
    argv = ["curl", "-sS", "--connect-timeout", "5", "-m", str(limit)]
    if args.pki:
        argv += ["--ssl-reqd", "--cacert", args.pki.ca]
    if direction == "retr":
        argv += ["-o", "/dev/null", "-w", "%{size_download} %{time_total}", f"{base}/{servers.DATA_FILE}"]
    else:
        argv += ["-T", payload_path, "-w", "%{size_upload} %{time_total}", f"{base}/{servers.UPLOAD_DIR}/{name}"]
    try:
        proc = lab.run(client, argv, check=False, timeout=limit + 10)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{direction}: curl timed out after {limit + 10}s")
    if proc.returncode != 0:
        raise RuntimeError(f"{direction}: curl exit {proc.returncode}: {proc.stderr.strip()[-200:]}")
    size, seconds = proc.stdout.split()
    return int(size), float(seconds)


def bench_throughput(lab, target, args, srv, payload_path, digest, rec, rep):
    for direction in ("retr", "stor"):
        name = f"bench-{target.name}-{rep}.bin"
        gw_pid = gateway_pid(target)
        cpu_before = process_cpu(gw_pid)
        try:
            size, seconds = curl_transfer(lab, target, args.server, direction, args, payload_path, name)
            cpu_after = process_cpu(gw_pid)
            if size != args.size:
                raise RuntimeError(f"{direction}: curl moved {size} bytes, expected {args.size}")
            if direction == "stor":
                stored = os.path.join(srv.root, servers.UPLOAD_DIR, name)
                got = os.path.getsize(stored)
                if got != args.size:
                    raise RuntimeError(f"stor: server holds {got} bytes, expected {args.size}")
                if sha256_file(stored) != digest:
                    raise RuntimeError("stor: stored file's SHA-256 differs from the source")
                os.unlink(stored)
        except (RuntimeError, OSError, ValueError) as exc:
            rec.fail(target.name, str(exc))
            continue
        mibs = size / seconds / (1 << 20)
        entry = {"bytes": size, "seconds": seconds, "mib_s": mibs}
        gw = ""
        if cpu_before is not None and cpu_after is not None:
            # The gateway's utime+stime over the transfer, per GiB moved.
            entry["gateway_cpu_s_per_gib"] = (cpu_after - cpu_before) / (size / (1 << 30))
            gw = f", gateway CPU {entry['gateway_cpu_s_per_gib']:.2f} s/GiB"
        rec.data[target.name][direction].append(entry)
        print(f"  {target.name} {direction.upper()}: {size} bytes in {seconds:.3f}s = {mibs:.0f} MiB/s{gw}", flush=True)


def run_client(lab, argv, timeout):
    full = [sys.executable, os.path.join(HERE, "benchclient.py")] + argv
    try:
        proc = lab.run("wanc", full, check=False, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"benchclient timed out after {timeout}s"}
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        return {"error": f"benchclient exit {proc.returncode}: {proc.stderr.strip()[-300:]}"}


def bench_rate(lab, target, args, rec):
    _, addr, port = target.endpoint("inbound", args.rate_server, 4)
    argv = ["rate", addr, str(port), LIST_DIR, str(LIST_ENTRIES),
            "--workers", str(args.rate_workers), "--procs", str(args.rate_procs)]
    if args.rate_sessions:
        argv += ["--sessions", str(args.rate_sessions)]
        timeout = 60 + args.rate_sessions // 10
    else:
        argv += ["--seconds", str(args.rate_seconds)]
        timeout = 60 + args.rate_seconds
    gw_pid = gateway_pid(target)
    hook = None
    if gw_pid and args.gateway_hook:
        hook = subprocess.Popen(["sh", "-c", args.gateway_hook], env=dict(os.environ, FTPGATE_PID=str(gw_pid)),
                                start_new_session=True)
    cpu_before = process_cpu(gw_pid)
    try:
        out = run_client(lab, argv, timeout)
    finally:
        cpu_after = process_cpu(gw_pid)
        if hook:
            stop_hook(hook)
    if "error" in out:
        rec.fail(target.name, f"rate: {out['error']}")
        return
    gw = ""
    if cpu_before is not None and cpu_after is not None and out["sessions"]:
        # The gateway's CPU per completed session (utime+stime), the figure its rate is bounded by.
        out["gateway_cpu_us_per_session"] = (cpu_after - cpu_before) * 1e6 / out["sessions"]
        gw = f", gateway CPU {out['gateway_cpu_us_per_session']:.0f} us/session"
    rec.data[target.name]["rate"].append(out)
    print(
        f"  {target.name} rate: {out['sessions']} sessions, {out['errors']} errors in {out['elapsed']:.2f}s"
        f" = {out['rate']:.0f}/s (client CPU {out['client_cpu']:.2f} cores{gw})", flush=True,
    )
    if out["errors"]:
        what = f"rate: {out['errors']} session errors, e.g. {'; '.join(out['samples'][:3])}"
        if target.name in REFERENCE_TARGETS:
            print(f"  {target.name}: {what}", flush=True)
        else:
            rec.fail(target.name, what)
    if args.rate_sessions and out["sessions"] + out["errors"] != args.rate_sessions:
        rec.fail(target.name, f"rate: {out['sessions'] + out['errors']} sessions run, expected {args.rate_sessions}")


def gateway_pid(target):
    """The pid of the target's gateway process, when it runs one (ftpgate)."""
    daemon = getattr(target, "daemon", None)
    return daemon.proc.pid if daemon and daemon.proc.poll() is None else None


def process_cpu(pid):
    """utime+stime of pid in seconds, or None."""
    if not pid:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    # Fields 14 and 15 of proc(5), counted after the command name's ')'.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def stop_hook(proc):
    """SIGINT to the hook's process group (perf writes its file on SIGINT), then wait."""
    try:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=30)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


# std's datagram sockets send with write(2) and receive with recvfrom(2).
NETLINK_CALLS = "sendmsg,sendto,write,writev,recvmsg,recvfrom,read,readv"
NETLINK_CALL = re.compile(r"^(\w+)\(\d+<NETLINK:.*\)\s+= (-?\d+)")


def count_netlink(trace_dir):
    """(sends, receives) of netlink messages in strace -ff -yy output files: calls that
    sent, and calls that read a message (not those that found the socket empty)."""
    sends = receives = 0
    for name in os.listdir(trace_dir):
        with open(os.path.join(trace_dir, name), errors="replace") as f:
            for line in f:
                m = NETLINK_CALL.match(line)
                if not m or int(m.group(2)) < 0:
                    continue
                if m.group(1).startswith(("send", "write")):
                    sends += 1
                elif int(m.group(2)) > 0:
                    receives += 1
    return sends, receives


def bench_netlink(lab, target, args, rec, rep):
    """N sessions with strace attached to the gateway: its netlink messages per session."""
    pid = gateway_pid(target)
    if not pid or not args.netlink_sessions:
        return
    if not shutil.which("strace"):
        rec.fail(target.name, "netlink: strace not found")
        return
    trace_dir = os.path.join(target.dir, f"strace-{rep}")
    os.makedirs(trace_dir, exist_ok=True)
    tracer = subprocess.Popen(
        ["strace", "-f", "-ff", "-yy", "-e", f"trace={NETLINK_CALLS}",
         "-o", os.path.join(trace_dir, "t"), "-p", str(pid)],
        stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    # strace attaches to every thread of the gateway, then says "attached": tracing has begun.
    attached = threading.Event()

    def watch():
        for line in tracer.stderr:
            if "attached" in line:
                attached.set()

    threading.Thread(target=watch, daemon=True).start()
    if not attached.wait(10):
        stop_hook(tracer)
        rec.fail(target.name, "netlink: strace did not attach to the gateway")
        return
    _, addr, port = target.endpoint("inbound", args.rate_server, 4)
    argv = ["rate", addr, str(port), LIST_DIR, str(LIST_ENTRIES), "--workers", "4", "--procs", "1",
            "--sessions", str(args.netlink_sessions)]
    try:
        out = run_client(lab, argv, 120 + args.netlink_sessions // 5)
    finally:
        stop_hook(tracer)
    if "error" in out:
        rec.fail(target.name, f"netlink: {out['error']}")
        return
    sends, receives = count_netlink(trace_dir)
    if not args.keep:
        shutil.rmtree(trace_dir, ignore_errors=True)
    n = out["sessions"]
    if not n:
        rec.fail(target.name, "netlink: no session completed under strace")
        return
    got = {"sessions": n, "errors": out["errors"], "samples": out.get("samples", [])[:3], "sends": sends,
           "receives": receives, "sends_per_session": sends / n, "receives_per_session": receives / n}
    rec.data[target.name]["netlink"].append(got)
    print(f"  {target.name} netlink: {sends} sent, {receives} received over {n} sessions"
          f" ({out['errors']} errors) = {sends / n:.2f} sent + {receives / n:.2f} received per session", flush=True)
    if out["errors"]:
        # Under strace the gateway is slower; these sessions are not in the rate, but show what failed.
        print(f"  {target.name} netlink: session errors under strace, e.g. {'; '.join(got['samples'])}", flush=True)


def bench_latency(lab, target, args, rec):
    _, addr, port = target.endpoint("inbound", args.server, 4)
    out = run_client(lab, ["latency", addr, str(port), "--count", str(args.noops)], 60 + args.noops // 50)
    if "error" in out:
        rec.fail(target.name, f"latency: {out['error']}")
        return
    rec.data[target.name]["latency"].append(out)
    print(f"  {target.name} NOOP: p50 {out['p50_us']:.0f} us, p99 {out['p99_us']:.0f} us over {out['count']}", flush=True)


def run_rep(lab, workdir, args, rec, rep, running, payload_path, digest):
    for name in args.targets:
        cls = BENCH_TARGETS[name]
        # The edge's conntrack table is not flushed between targets: its
        # TIME_WAIT entries are what keeps NAT from reusing a 4-tuple that the
        # server still holds in TIME_WAIT. After a flush, a translated data
        # connection could get such a tuple; the server then answers its SYN
        # with an ACK for the old connection, conntrack finds that invalid,
        # the edge resets it, and the client's SYN is never answered (about 1
        # session in 1,000 through the nftables backend timed out that way).
        target = cls(lab, workdir, target_opts(args, cls))
        try:
            target.setup()
        except Exception as exc:
            rec.fail(name, f"setup: {exc}")
            target.teardown()
            lab.flush_target_chains()
            continue
        try:
            if "latency" in args.tests:
                bench_latency(lab, target, args, rec)
            if "throughput" in args.tests:
                bench_throughput(lab, target, args, running[args.server], payload_path, digest, rec, rep)
            if "rate" in args.tests:
                bench_rate(lab, target, args, rec)
                bench_netlink(lab, target, args, rec, rep)
        finally:
            target.teardown()
            lab.flush_target_chains()


def median(values):
    return statistics.median(values) if values else None


def summary(rec):
    out = {}
    for name, d in rec.data.items():
        out[name] = {
            "retr_mib_s": median([x["mib_s"] for x in d["retr"]]),
            "retr_gw_cpu_s_gib": median([x["gateway_cpu_s_per_gib"] for x in d["retr"] if "gateway_cpu_s_per_gib" in x]),
            "stor_mib_s": median([x["mib_s"] for x in d["stor"]]),
            "sessions_s": median([x["rate"] for x in d["rate"]]),
            "session_errors": sum(x["errors"] for x in d["rate"]),
            "noop_p50_us": median([x["p50_us"] for x in d["latency"]]),
            "noop_p99_us": median([x["p99_us"] for x in d["latency"]]),
            "gw_cpu_us": median([x["gateway_cpu_us_per_session"] for x in d["rate"]
                                 if "gateway_cpu_us_per_session" in x]),
            "netlink_sent": median([x["sends_per_session"] for x in d["netlink"]]),
            "netlink_recv": median([x["receives_per_session"] for x in d["netlink"]]),
        }
    return out


COLUMNS = (
    ("retr_mib_s", "RETR MiB/s", "{:.0f}"),
    ("retr_gw_cpu_s_gib", "gwCPU s/GiB", "{:.2f}"),
    ("stor_mib_s", "STOR MiB/s", "{:.0f}"),
    ("sessions_s", "sessions/s", "{:.0f}"),
    ("noop_p50_us", "NOOP p50 us", "{:.0f}"),
    ("noop_p99_us", "NOOP p99 us", "{:.0f}"),
    ("gw_cpu_us", "gw CPU us/s.", "{:.0f}"),
    ("netlink_sent", "nl sent/s.", "{:.2f}"),
    ("netlink_recv", "nl recv/s.", "{:.2f}"),
)


def ratio(a, b):
    return a / b if a is not None and b else None


def ratio_rows(med, names):
    pairs = [p for p in RATIOS if p[0] in names and p[1] in names]
    if "direct" in names:
        pairs += [(n, "direct") for n in names if n != "direct"]
    return [(f"{a}/{b}", {k: ratio(med[a][k], med[b][k]) for k, _, _ in COLUMNS}) for a, b in pairs]


def print_table(args, med, rows, ratios):
    def fmt(v, f):
        return "-" if v is None else f.format(v)

    w = max([len(n) for n in med] + [len(r) for r, _ in ratios] + [6])
    head = f"{'target':<{w}}" + "".join(f"  {h:>11}" for _, h, _ in COLUMNS) + "  sess.errors  failures"
    print()
    print(f"medians over {args.reps} repetition(s); {args.size} bytes per transfer"
          f"{' under PROT P (FTPS)' if args.ftps else ''}; "
          f"throughput/latency server {args.server}, rate server {args.rate_server}")
    print(head)
    for name in med:
        m = med[name]
        print(f"{name:<{w}}" + "".join(f"  {fmt(m[k], f):>11}" for k, _, f in COLUMNS)
              + f"  {m['session_errors']:>11}  {rows[name]:>8}")
    if ratios:
        print()
        print(f"{'ratio':<{w}}" + "".join(f"  {h:>11}" for _, h, _ in COLUMNS))
        for label, r in ratios:
            print(f"{label:<{w}}" + "".join(f"  {fmt(r[k], '{:.2f}'):>11}" for k, _, _ in COLUMNS))


def checks(args, rec):
    """One line per target saying whether every transfer, session and NOOP ran;
    returns the number of targets that did not."""
    bad = 0
    for name, d in rec.data.items():
        parts = []
        if "throughput" in args.tests:
            n = len(d["retr"]) + len(d["stor"])
            parts.append(f"transfers {n}/{2 * args.reps} of {args.size} bytes")
        if "rate" in args.tests:
            errors = sum(x["errors"] for x in d["rate"])
            note = " (reference target: not gating)" if errors and name in REFERENCE_TARGETS else ""
            parts.append(f"sessions {sum(x['sessions'] for x in d['rate'])}, session errors {errors}{note}")
        if "latency" in args.tests:
            parts.append(f"noops {sum(x['count'] for x in d['latency'])}/{args.noops * args.reps}")
        ok = not d["failures"]
        if "throughput" in args.tests:
            ok = ok and len(d["retr"]) + len(d["stor"]) == 2 * args.reps
        if "rate" in args.tests:
            ok = ok and len(d["rate"]) == args.reps
        if "latency" in args.tests:
            ok = ok and len(d["latency"]) == args.reps
        bad += not ok
        print(f"check {name}: {'ok' if ok else 'FAIL'}: {', '.join(parts)}")
    return bad


def git_commit():
    try:
        out = subprocess.run(["git", "-C", HERE, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run(["git", "-C", HERE, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else None
    except OSError:
        return None


def main(argv):
    args = parse_args(argv)
    code = prologue.verdict("bench", missing_prerequisites(args), args.check)
    if code is not None:
        return code
    teardown, workdir, lab = prologue.start("bench", keep=args.keep, tmp_dir=args.tmpfs)
    rec = Recorder(args.targets)
    started = time.monotonic()
    try:
        lab.up()
        print(f"bench: namespaces {lab.prefix}*, work dir {workdir}", flush=True)
        payload_path = os.path.join(workdir, "payload.bin")
        digest = write_payload(payload_path, args.size)
        if args.ftps:
            args.pki = certs.make(os.path.join(workdir, "pki"))
        running = start_servers(lab, workdir, servers_needed(args), payload_path, args.pki)
        teardown.actions.append(lambda: [s.stop() for s in running.values()])
        for rep in range(1, args.reps + 1):
            print(f"bench: repetition {rep}/{args.reps}", flush=True)
            run_rep(lab, workdir, args, rec, rep, running, payload_path, digest)
    finally:
        teardown()
    med = summary(rec)
    ratios = ratio_rows(med, args.targets)
    errors = {n: len(d["failures"]) for n, d in rec.data.items()}
    print_table(args, med, errors, ratios)
    print()
    bad = checks(args, rec)
    print(f"bench: {time.monotonic() - started:.0f}s")
    if args.json:
        doc = {
            "commit": git_commit(),
            "kernel": os.uname().release,
            "ftpgate_bin": args.ftpgate_bin,
            "options": {k: v for k, v in vars(args).items() if k not in ("json", "pki")},
            "medians": med,
            "ratios": dict(ratios),
            "runs": rec.data,
        }
        text = json.dumps(doc, indent=2)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w") as f:
                f.write(text + "\n")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
