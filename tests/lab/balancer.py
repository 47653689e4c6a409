#!/usr/bin/env python3
"""Scale-out lab: a real HAProxy in front of three ftpgate instances and one LAN
server, with WAN clients on many addresses.

    wanc 198.51.100.2, .10-.33 ── edge (lab firewall) ── bal: HAProxy on VIP 192.0.2.10
                                                              ├── gw1 192.0.2.11 ─┐
                                                              ├── gw2 192.0.2.12 ─┼─ (edge) ── lans vsftpd
                                                              └── gw3 192.0.2.13 ─┘

HAProxy's control frontend (VIP:21) balances by source address (consistent hash)
over the three instances' reverse listeners, with `send-proxy-v2` and health checks
that send a PROXY header too; each listener trusts PROXY headers from the
balancer's address only. Each instance owns a disjoint slice of `client_ports`.

Data, per variant:
- a: each instance announces its own address; lftp and trusting clients connect
  there straight through the edge. curl and ftplib ignore the 227 address and
  EPSV names none, so they connect to the VIP: the balancer's kernel DNATs each
  slice on the VIP to its instance (the client's address is kept, so the
  instance's peer check sees the real client).
- b: every instance announces the VIP; HAProxy has one frontend per slice
  (`bind VIP:LO-HI`, server without port, `send-proxy-v2`), so data connections
  arrive from the balancer with a PROXY header naming the real client.

Phases, per variant: `mixed` (N sessions of curl, lftp and ftplib in passive,
EPSV and active modes; each lists and downloads a file whose SHA-256 is checked;
sessions per instance counted from the instances' logs), `limit`
(max_sessions_per_client on the real client through the balancer), `kill` (one
instance SIGKILLed mid-run; only its open sessions may fail, HAProxy marks it
DOWN, every later session passes), `restart` (one instance replaced under load:
a second process with the same file beside it, then SIGTERM to the old one; 0
failed sessions). Each phase prints `balancer <variant> <phase>: ...` lines and
one verdict, `balancer <variant> <phase>: ok` or `... FAIL <why>`; the run ends
with `balancer: N phases ok, M failed`.

Run as root: tests/lab/balancer.py --ftpgate-bin target/debug/ftpgate [--sessions 1000]
"""

import argparse
import concurrent.futures
import contextlib
import ctypes
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import clients  # noqa: E402
import prologue  # noqa: E402
import servers  # noqa: E402
import topology  # noqa: E402
from topology import FW_TABLE, host_addr  # noqa: E402

VIP = "192.0.2.10"
CTL_PORT = 21
BAL_UP_EDGE = "10.72.0.1"  # the edge's end of the balancer's uplink
BALANCER = "10.72.0.2"  # the balancer's address: HAProxy connects from it
INSTANCES = ("gw1", "gw2", "gw3")
# Instance -> (its own address, its link's balancer end, its link's own end).
GW = {name: (f"192.0.2.{11 + i}", f"10.72.{1 + i}.1", f"10.72.{1 + i}.2") for i, name in enumerate(INSTANCES)}
SLICE = 300  # client_ports per instance
CLIENT_PORTS = {name: (40000 + i * SLICE, 40000 + (i + 1) * SLICE - 1) for i, name in enumerate(INSTANCES)}
SERVER_PORTS = (41000, 41999)
WAN_CLIENTS = [f"198.51.100.{10 + i}" for i in range(24)]
PER_CLIENT = 2  # max_sessions_per_client: each worker holds one session per address at a time
PASV_RANGE = (30000, 30999)
SERVER = "vsftpd"  # forks per session; pyftpdlib stalls with several transfers at once
RATE = 2 << 20  # bytes/s per anonymous transfer: the 1 MiB download takes about 0.5 s
GRACE = 20  # seconds: --grace for the restart's old process
CHECK_INTER_MS = 500
STATE_WAIT = 30.0  # seconds for HAProxy to see an instance go DOWN or come UP
CLONE_NEWNET = 0x40000000
CONTROL_BACKEND = "ftp-ftp"  # what `ftpgate balancer` names listener `ftp`'s backend

# The mix: (tool, variant name, per-tool arguments). lftp-passive, curl-pasvip and
# python-pasvtrust connect to the address in the 227; the rest to the VIP.
MIX = [
    ("curl", "epsv", []),
    ("lftp", "active", ["set ftp:passive-mode off"]),
    ("python", "passive", "passive"),
    ("curl", "pasv", ["--disable-epsv"]),
    ("lftp", "passive", ["set ftp:passive-mode on", "set ftp:prefer-epsv off"]),
    ("python", "active", "active"),
    ("curl", "port", ["-P", "-", "--disable-eprt"]),
    ("lftp", "epsv", ["set ftp:passive-mode on", "set ftp:prefer-epsv on"]),
    ("curl", "eprt", ["-P", "-"]),
    ("python", "pasvtrust", "passive-trust"),
    ("curl", "pasvip", ["--disable-epsv", "--no-ftp-skip-pasv-ip"]),
]

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
            _libc.setns(home.fileno(), CLONE_NEWNET)


# ---- topology ----------------------------------------------------------------


def build(lab):
    """The balancer and instance namespaces, the WAN client addresses, and the
    edge's rules for them (the lab's base firewall stays as it is)."""
    lab.up(ipv6=False)
    for a in WAN_CLIENTS:
        lab.run("wanc", ["ip", "addr", "add", f"{a}/24", "dev", "eth0"])
    lab.add_host("bal")
    lab.link("edge", "bal", f"{BAL_UP_EDGE}/24", "bal", "eth0", f"{BALANCER}/24")
    lab.run("bal", ["sysctl", "-qw", "net.ipv4.ip_forward=1"])
    lab.run("bal", ["ip", "addr", "add", f"{VIP}/32", "dev", "lo"])
    lab.run("bal", ["ip", "route", "add", "default", "via", BAL_UP_EDGE])
    lab.run("edge", ["ip", "route", "add", "192.0.2.8/29", "via", BALANCER])
    lab.run("edge", ["ip", "route", "add", "10.72.0.0/16", "via", BALANCER])
    for name, (own, bal_end, gw_end) in GW.items():
        lab.add_host(name)
        lab.link("bal", name, f"{bal_end}/24", name, "eth0", f"{gw_end}/24")
        lab.run(name, ["ip", "addr", "add", f"{own}/32", "dev", "lo"])
        lab.run(name, ["ip", "route", "add", "default", "via", bal_end])
        # HAProxy connects from the balancer's one address, the one the
        # instances trust, whichever link it leaves by.
        lab.run("bal", ["ip", "route", "add", f"{own}/32", "via", gw_end, "src", BALANCER])
        # A request still in the old process's accept queue moves to the new
        # process's listener when the old one closes (the restart phase).
        lab.run(name, ["sysctl", "-qw", "net.ipv4.tcp_migrate_req=1"])
    slices = ", ".join(f"{lo}-{hi}" for lo, hi in CLIENT_PORTS.values())
    rules = [
        # The DMZ opens connections to the LAN server and, in active mode, to clients.
        f'add rule inet {FW_TABLE} tgt_forward iifname "bal" ct state new accept',
        f'add rule inet {FW_TABLE} tgt_forward iifname "wanc" ip daddr {VIP} tcp dport {{ {CTL_PORT}, {slices} }} accept',
    ]
    for name, (own, _, _) in GW.items():
        lo, hi = CLIENT_PORTS[name]
        rules.append(f'add rule inet {FW_TABLE} tgt_forward iifname "wanc" ip daddr {own} tcp dport {lo}-{hi} accept')
    lab.nft("\n".join(rules) + "\n")


def data_dnat(lab, on):
    """Variant a: the balancer's kernel forwards each slice on the VIP to its
    instance, keeping the client's address (EPSV and 227-ignoring clients)."""
    if not on:
        lab.run("bal", ["nft", "delete", "table", "ip", "lbdata"], check=False)
        return
    lines = ["table ip lbdata {", "  chain pre {", "    type nat hook prerouting priority dstnat; policy accept;"]
    for name, (own, _, _) in GW.items():
        lo, hi = CLIENT_PORTS[name]
        lines.append(f"    ip daddr {VIP} tcp dport {lo}-{hi} dnat to {own}")
    lines += ["  }", "}"]
    topology.run(lab.cmd("bal", ["nft", "-f", "-"]), input_text="\n".join(lines) + "\n")


# ---- processes ---------------------------------------------------------------


class Proc:
    """A process in one namespace; its output goes to a log file, and `word`
    lines (e.g. ftpgate's `listening`) are counted as they arrive."""

    def __init__(self, lab, host, argv, log_path, word=None):
        self.host, self.log_path, self.word = host, log_path, word
        self.count = 0
        self.cond = threading.Condition()
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(
            lab.cmd(host, argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True, text=True, errors="replace",
        )
        self.pid = self.proc.pid  # `ip netns exec` and `env` exec, so this is the program
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.log.write(line)
            self.log.flush()
            if self.word and re.search(rf"\b{self.word}\b", line):
                with self.cond:
                    self.count += 1
                    self.cond.notify_all()
        self.log.close()
        with self.cond:
            self.cond.notify_all()

    def wait_word(self, n, timeout):
        deadline = time.monotonic() + timeout
        with self.cond:
            while self.count < n:
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    if self.proc.poll() is not None:
                        self.cond.release()  # the reader takes it on the way out
                        self.reader.join(2)
                        self.cond.acquire()
                    raise RuntimeError(
                        f"{self.host}: {self.count}/{n} '{self.word}' lines"
                        f"{'' if self.proc.poll() is None else f', exited {self.proc.returncode}'}: {self.tail()}"
                    )
                self.cond.wait(min(left, 0.2))

    def tail(self, n=15):
        with open(self.log_path, errors="replace") as f:
            return "".join(f.readlines()[-n:]).rstrip()

    def text(self):
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def signal(self, sig):
        if self.proc.poll() is None:
            os.kill(self.pid, sig)

    def wait_exit(self, timeout):
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self):
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=GRACE + 5)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            except ProcessLookupError:
                pass
        self.reader.join(2)


class Instance:
    """One ftpgate instance in its namespace: its rule file and its processes
    (more than one during a restart), each with its own log."""

    def __init__(self, lab, workdir, name, variant, binary):
        self.lab, self.name, self.binary = lab, name, binary
        self.dir = os.path.join(workdir, variant, name)
        os.makedirs(self.dir, exist_ok=True)
        self.own = GW[name][0]
        self.conf = os.path.join(self.dir, "ftpgate.yaml")
        lo, hi = CLIENT_PORTS[name]
        announce = f"    announce: {VIP}\n" if variant == "b" else ""
        table = lab.prefix.rstrip("-").replace("-", "_") + "_" + name
        with open(self.conf, "w") as f:
            f.write(
                f"""instance: {name}
listeners:
  - name: ftp
    listen: {self.own}:{CTL_PORT}
    mode: reverse
    upstream: {host_addr("lans", 4)}:{servers.SERVERS[SERVER][0]}
{announce}    proxy_protocol:
      from: [{BALANCER}]
data:
  backend: relay
  client_ports: {lo}-{hi}
  server_ports: {SERVER_PORTS[0]}-{SERVER_PORTS[1]}
  pinhole_timeout: 30s
  nftables_table: {table}
limits:
  max_sessions: 1000
  max_sessions_per_client: {PER_CLIENT}
  idle_timeout: 2m
  connect_timeout: 5s
rules:
  - name: lab
    action: allow
    modes: [passive, active]
    server_mode: same
    data_ports: 1024-65535
    tls: refuse
"""
            )
        self.procs = []

    def start(self):
        log = os.path.join(self.dir, f"ftpgate.{len(self.procs) + 1}.log")
        argv = ["env", "RUST_LOG=" + os.environ.get("RUST_LOG", "info"), self.binary, "run",
                "--reuse-port", "--config", self.conf, "--grace", str(GRACE)]
        p = Proc(self.lab, self.name, argv, log, "listening")
        self.procs.append(p)
        p.wait_word(1, 15)
        return p

    @property
    def current(self):
        return self.procs[-1]

    def logs(self):
        return "".join(p.text() for p in self.procs)

    def stop(self):
        for p in self.procs:
            p.stop()


def haproxy_config(workdir, variant, instances, binary):
    """HAProxy's configuration: for variant b, what `ftpgate balancer --format
    haproxy` prints for the three instance files; for variant a (which that
    command does not cover: its instances announce their own addresses), the
    control part written here. Either way the lab adds a stats socket and a
    log to stderr. Checked with `haproxy -c`."""
    sock = os.path.join(workdir, f"haproxy-{variant}.sock")
    if variant == "b":
        argv = [binary, "balancer", "--format", "haproxy"]
        for inst in instances.values():
            argv += ["-c", inst.conf]
        gen = subprocess.run(argv, capture_output=True, text=True)
        if gen.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)}: exit {gen.returncode}: {gen.stderr.strip()}")
        text = gen.stdout
    else:
        servers_ = "\n".join(f"    server {n} {GW[n][0]}:{CTL_PORT}" for n in INSTANCES)
        text = f"""global

defaults
    mode tcp
    timeout connect 5s
    timeout client 2m
    timeout server 2m
    # A connection refused by a dead instance before its check fails goes to
    # another one.
    retries 2
    option redispatch

frontend ftp_control
    bind {VIP}:{CTL_PORT}
    default_backend ftp-ftp

backend ftp-ftp
    balance source
    hash-type consistent
    default-server send-proxy-v2 check check-send-proxy inter {CHECK_INTER_MS}ms fall 2 rise 2
{servers_}
"""
    lab_global = f"    stats socket {sock} mode 600 level admin\n    log stderr format raw local0 info\n"
    lab_defaults = "    log global\n    option tcplog\n"
    if text.count("\nglobal\n") + text.startswith("global\n") != 1 or text.count("\ndefaults\n") != 1:
        raise RuntimeError(f"no single global and defaults section in:\n{text}")
    text = re.sub(r"(^|\n)global\n", lambda m: f"{m.group(1)}global\n{lab_global}", text, count=1)
    text = text.replace("\ndefaults\n", f"\ndefaults\n{lab_defaults}", 1)
    path = os.path.join(workdir, f"haproxy-{variant}.cfg")
    with open(path, "w") as f:
        f.write(text)
    check = subprocess.run(["haproxy", "-c", "-f", path], capture_output=True, text=True)
    if check.returncode != 0:
        raise RuntimeError(f"haproxy -c: {check.stdout}{check.stderr}")
    return path, sock


def haproxy_states(sock):
    """Server name -> status (UP, DOWN, ...) of the control backend, from the stats socket."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(sock)
    s.sendall(b"show stat\n")
    data = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    s.close()
    lines = data.decode().splitlines()
    header = lines[0].lstrip("# ").split(",")
    states = {}
    for line in lines[1:]:
        row = dict(zip(header, line.split(",")))
        if row.get("pxname") == CONTROL_BACKEND and row.get("svname") in INSTANCES:
            states[row["svname"]] = row["status"]
    return states


def wait_state(sock, name, want, timeout=STATE_WAIT):
    """Polls the stats socket until `name` has status `want`; returns when it did."""
    deadline = time.monotonic() + timeout
    states = {}
    while time.monotonic() < deadline:
        try:
            states = haproxy_states(sock)
        except OSError:  # HAProxy not up yet
            states = {}
        if states.get(name, "").startswith(want):
            return time.monotonic()
        time.sleep(0.05)
    raise RuntimeError(f"HAProxy: {name} not {want} after {timeout}s: {states}")


# ---- sessions ----------------------------------------------------------------


class SlowVsftpd(servers.Server):
    """vsftpd with a wider passive range and a rate limit on anonymous
    transfers, so a download lasts long enough for a kill or a restart to
    land inside sessions."""

    def __init__(self, lab, workdir, payload):
        super().__init__(lab, "lans", SERVER, workdir, payload)
        self.pasv = PASV_RANGE

    def argv(self):
        argv = super().argv()
        with open(argv[-1], "a") as f:
            f.write(f"anon_max_rate={RATE}\n")
        return argv


class Session:
    def __init__(self, index, addr, tool, variant):
        self.index, self.addr, self.tool, self.variant = index, addr, tool, variant
        self.start = self.end = None
        self.reason = None

    @property
    def label(self):
        return f"#{self.index} {self.tool}-{self.variant} from {self.addr}"


# ftplib with a source address: ftpcase.py itself, run with FTP's constructor
# defaulting source_address to the session's address.
PY_WRAPPER = (
    "import ftplib, functools, runpy, sys; "
    "ftplib.FTP.__init__ = functools.partialmethod(ftplib.FTP.__init__, source_address=(sys.argv[1], 0)); "
    "sys.argv = sys.argv[2:]; runpy.run_path(sys.argv[0], run_name='__main__')"
)


def one_session(lab, s, outdir, digest):
    """Runs one client session from address s.addr to the VIP: a listing and a
    download, in one control connection. Returns None or why it failed."""
    os.makedirs(outdir, exist_ok=True)
    listing_path = os.path.join(outdir, "listing.txt")
    data_path = os.path.join(outdir, servers.DATA_FILE)
    args = dict((v, a) for t, v, a in MIX if t == s.tool)[s.variant]
    base = f"ftp://{VIP}:{CTL_PORT}"
    try:
        if s.tool == "curl":
            # Two URLs in one invocation share the control connection.
            argv = ["curl", "-sS", "-v", "--connect-timeout", "5", "-m", str(clients.CMD_TIMEOUT - 2),
                    "--interface", s.addr] + args + [
                f"{base}/", "-o", listing_path, f"{base}/{servers.DATA_FILE}", "-o", data_path]
            clients._exec(lab, "wanc", argv, "curl")
        elif s.tool == "lftp":
            script = [
                "set cmd:fail-exit yes", "set net:timeout 5", "set net:max-retries 1",
                "set net:persist-retries 0", "set xfer:clobber on", "set ftp:ssl-allow no",
                "set ftp:auto-passive-mode off", f"set net:socket-bind-ipv4 {s.addr}",
            ] + args + [
                f"open -u anonymous,lab@ {base}",
                f"cls -1 > {listing_path}",
                f"get {servers.DATA_FILE} -o {data_path}",
            ]
            clients._exec(lab, "wanc", ["lftp", "-c", "; ".join(script)], "lftp")
        else:
            ftpcase = os.path.join(clients.HERE, "ftpcase.py")
            argv = [sys.executable, "-c", PY_WRAPPER, s.addr, ftpcase, VIP, str(CTL_PORT), args, outdir]
            clients._exec(lab, "wanc", argv, "ftplib")
        with open(listing_path) as f:
            listing = f.read()
        missing = [n for n in servers.LISTING if n not in listing]
        if missing:
            return f"listing lacks {', '.join(missing)}"
        got = clients.sha256_file(data_path)
        if got != digest:
            return f"download digest {got[:12]} != {digest[:12]}"
    except clients.CaseFailed as exc:
        return str(exc)
    except FileNotFoundError as exc:
        return f"missing output: {exc.filename}"
    finally:
        shutil.rmtree(outdir, ignore_errors=True)  # 1 MiB each: keep the work dir small
    return None


class Run:
    """Sessions run by `jobs` workers; worker w uses only addresses w, w+jobs, ...,
    so no address ever has two sessions at once (the per-client limit stays
    out of the way). `on_progress` is called after each session."""

    def __init__(self, lab, workdir, digest, jobs, count, first=0):
        self.lab, self.workdir, self.digest, self.jobs = lab, workdir, digest, jobs
        self.sessions = []
        self.lock = threading.Lock()
        self.active = set()
        self.done = 0
        self.stop = threading.Event()  # set: workers start no further session
        for i in range(first, first + count):
            tool, variant, _ = MIX[i % len(MIX)]
            self.sessions.append(Session(i, None, tool, variant))
        self.count = count

    def _worker(self, w):
        addrs = WAN_CLIENTS[w::self.jobs]
        for k, s in enumerate(self.sessions[w::self.jobs]):
            if self.stop.is_set():
                return
            s.addr = addrs[k % len(addrs)]
            s.start = time.monotonic()
            with self.lock:
                self.active.add(s)
            s.reason = one_session(self.lab, s, os.path.join(self.workdir, "s", str(s.index)), self.digest)
            s.end = time.monotonic()
            with self.lock:
                self.active.discard(s)
                self.done += 1

    def run(self, during=None):
        """Runs every session; `during` (if given) runs in this thread meanwhile."""
        with concurrent.futures.ThreadPoolExecutor(max_workers=self.jobs) as pool:
            futures = [pool.submit(self._worker, w) for w in range(self.jobs)]
            error = None
            if during:
                try:
                    during(self)
                except Exception as exc:  # the sessions still finish; the phase reports it
                    error = exc
            for f in futures:
                f.result()
        if error:
            raise error

    def wait_until(self, pred, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if pred(self):
                    return True
            time.sleep(0.02)
        return False

    def ran(self):
        return [s for s in self.sessions if s.end is not None]

    def failed(self):
        return [s for s in self.ran() if s.reason is not None]


SESSION_START = re.compile(r"session start.*?\bclient=([\d.]+):(\d+)")


def starts_by_client(text):
    """(client address, port) of every `session start` line from a WAN client
    (the balancer's own health checks name the balancer)."""
    return [(a, int(p)) for a, p in SESSION_START.findall(text) if a != BALANCER]


def mapping(instances, marks):
    """WAN address -> the instance whose log shows its sessions since marks."""
    out = {}
    for name, inst in instances.items():
        for a, _ in starts_by_client(inst.logs()[marks.get(name, 0):]):
            out.setdefault(a, set()).add(name)
    return out


# ---- phases ------------------------------------------------------------------


class PhaseFailed(Exception):
    pass


def report_failures(run, limit=10):
    for s in run.failed()[:limit]:
        print(f"    | {s.label}: {s.reason}", flush=True)


def phase_mixed(ctx, count):
    marks = {n: len(i.logs()) for n, i in ctx.instances.items()}
    run = Run(ctx.lab, ctx.workdir, ctx.digest, ctx.jobs, count, ctx.next_index(count))
    t0 = time.monotonic()
    run.run()
    took = time.monotonic() - t0
    per = {n: len(starts_by_client(i.logs()[marks[n]:])) for n, i in ctx.instances.items()}
    failed = run.failed()
    by_kind = {}
    for s in run.sessions:
        by_kind.setdefault(f"{s.tool}-{s.variant}", [0, 0])[0 if s.reason is None else 1] += 1
    p = f"balancer {ctx.variant} mixed"
    print(f"{p}: {count} sessions in {took:.0f}s, {len(failed)} failed; per instance "
          + ", ".join(f"{n} {c}" for n, c in per.items()), flush=True)
    took_each = sorted(s.end - s.start for s in run.sessions)
    print(f"{p}: session time median {took_each[len(took_each) // 2]:.2f}s, max {took_each[-1]:.2f}s", flush=True)
    print(f"{p}: per client " + ", ".join(f"{k} {v[0]}/{sum(v)}" for k, v in sorted(by_kind.items())), flush=True)
    report_failures(run)
    ctx.addr_map = mapping(ctx.instances, marks)
    split = {a: ns for a, ns in ctx.addr_map.items() if len(ns) > 1}
    if failed:
        raise PhaseFailed(f"{len(failed)} of {count} sessions failed")
    if sum(per.values()) != count:
        raise PhaseFailed(f"the instances logged {sum(per.values())} sessions for {count} run")
    if min(per.values()) == 0:
        raise PhaseFailed(f"an instance served no session: {per}")
    if split:
        raise PhaseFailed(f"balance source sent one address to several instances: {split}")


def phase_limit(ctx):
    """PER_CLIENT + 1 control connections from one address held open: the last
    is refused by its instance, which names the real client; meanwhile another
    address on the same instance runs a full session."""
    target = max(INSTANCES, key=lambda n: sum(1 for ns in ctx.addr_map.values() if n in ns))
    addrs = [a for a, ns in ctx.addr_map.items() if ns == {target}]
    if len(addrs) < 2:
        raise PhaseFailed(f"fewer than two WAN addresses map to {target}: {ctx.addr_map}")
    hog, other = addrs[0], addrs[1]
    inst = ctx.instances[target]
    mark = len(inst.logs())
    held, codes = [], []
    try:
        for _ in range(PER_CLIENT + 1):
            with in_netns(ctx.lab.ns("wanc")):
                c = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            c.settimeout(10)
            c.bind((hog, 0))
            c.connect((VIP, CTL_PORT))
            held.append(c)
            codes.append(read_code(c))
        s = Session(ctx.next_index(1), other, "curl", "epsv")
        s.reason = one_session(ctx.lab, s, os.path.join(ctx.workdir, "s", "limit"), ctx.digest)
    finally:
        for c in held:
            c.close()
    log = inst.logs()[mark:]
    refusal = [ln for ln in log.splitlines() if f"too many sessions from {hog} (max_sessions_per_client {PER_CLIENT})" in ln]
    p = f"balancer {ctx.variant} limit"
    print(f"{p}: {PER_CLIENT + 1} sessions from {hog} on {target}: replies {codes}; "
          f"a session from {other} on {target}: {'ok' if s.reason is None else s.reason}", flush=True)
    if refusal:
        print(f"{p}: {target} logged: {refusal[0].strip()}", flush=True)
    if codes != [220] * PER_CLIENT + [421]:
        raise PhaseFailed(f"replies {codes}, want {PER_CLIENT} x 220 then 421")
    if not refusal:
        raise PhaseFailed(f"{target} logged no refusal naming {hog}: {inst.current.tail()}")
    if f"client={hog}:" not in refusal[0] or f"client={BALANCER}" in refusal[0]:
        raise PhaseFailed(f"the refusal does not name the real client: {refusal[0]}")
    if s.reason is not None:
        raise PhaseFailed(f"the other address's session failed: {s.reason}")


def read_code(sock):
    """The code of the next reply on a raw control connection (None if closed)."""
    buf = b""
    while b"\n" not in buf:
        try:
            data = sock.recv(4096)
        except OSError:
            return None
        if not data:
            return None
        buf += data
    m = re.match(rb"(\d{3})", buf)
    return int(m.group(1)) if m else None


def transfers_open(lab, name, pid=None):
    """Data connections established on the instance's client_ports slice now
    (of process `pid` only, if given)."""
    lo, hi = CLIENT_PORTS[name]
    out = lab.run(name, ["ss", "-Htnp", "state", "established", f"( sport >= :{lo} and sport <= :{hi} )"], check=False)
    return sum(1 for line in out.stdout.splitlines() if pid is None or f"pid={pid}," in line)


SESSION_LINE = re.compile(r"session\{id=(\d+) [^}]*\}: \S+ (session start|session end)(?:.*?\bclient=([\d.]+):)?")


def open_sessions(text):
    """Client addresses of the sessions a log shows started and not ended."""
    started, ended = {}, set()
    for sid, what, addr in SESSION_LINE.findall(text):
        if what == "session start" and addr and addr != BALANCER:
            started[sid] = addr
        elif what == "session end":
            ended.add(sid)
    return [a for sid, a in started.items() if sid not in ended]


def drained_after_term(text):
    """Client sessions a log shows ending after the process began shutting down."""
    head, sep, tail = text.partition("shutting down")
    if not sep:
        return 0
    clients_ = {sid for sid, what, addr in SESSION_LINE.findall(text)
                if what == "session start" and addr and addr != BALANCER}
    return sum(1 for sid, what, _ in SESSION_LINE.findall(tail) if what == "session end" and sid in clients_)


def phase_kill(ctx, count):
    """SIGKILL one instance while it relays a download: count/4 sessions
    before, then sessions until HAProxy marks it DOWN, then count/2 more."""
    victim = "gw2"
    inst = ctx.instances[victim]
    victim_addrs = {a for a, ns in ctx.addr_map.items() if victim in ns}
    # Room for the sessions while the health check decides (up to 30 s).
    run = Run(ctx.lab, ctx.workdir, ctx.digest, ctx.jobs, count + 3000, ctx.next_index(count + 3000))
    when = {}

    def during(r):
        try:
            ok = r.wait_until(lambda r: r.done >= count // 4, 300)
            deadline = time.monotonic() + 60
            while ok and transfers_open(ctx.lab, victim) == 0:
                ok = time.monotonic() < deadline
            if not ok:
                raise PhaseFailed(f"{victim} relayed no download to kill it in")
            with r.lock:
                when["active"] = list(r.active)
                when["kill"] = time.monotonic()
                inst.current.signal(signal.SIGKILL)
            when["down"] = t_down = wait_state(ctx.sock, victim, "DOWN")
            r.wait_until(lambda r: sum(1 for s in r.sessions if s.start and s.start >= t_down) >= count // 2, 300)
        finally:
            r.stop.set()

    run.run(during)
    t_kill, t_down = when["kill"], when["down"]
    inst.current.reader.join(5)  # its log is complete once the pipe closed
    # The victim's sessions: balance source sends an address to one instance,
    # and each address runs one session at a time. Its log shows those that
    # got as far as `session start` (the rest were still being set up).
    open_logged = set(open_sessions(inst.current.text()))
    open_at_kill = {s for s in when["active"] if s.addr in victim_addrs}
    ran = run.ran()
    failed = run.failed()
    window = {s for s in ran if t_kill <= s.start < t_down and s.addr in victim_addrs}
    failed_open = [s for s in failed if s in open_at_kill]
    failed_window = [s for s in failed if s in window]
    stray = [s for s in failed if s not in open_at_kill and s not in window]
    later = [s for s in ran if s.start >= t_down]
    later_failed = [s for s in later if s.reason is not None]
    log_down = [ln for ln in ctx.haproxy.text().splitlines() if f"{CONTROL_BACKEND}/{victim} is DOWN" in ln]
    p = f"balancer {ctx.variant} kill"
    print(f"{p}: {len(ran)} sessions; {victim} SIGKILLed with {len(open_at_kill)} sessions open "
          f"({len(open_logged)} of them past `session start` in its log), {len(failed_open)} of them failed", flush=True)
    print(f"{p}: HAProxy marked {victim} DOWN {t_down - t_kill:.2f}s after the kill; in between "
          f"{len(window)} sessions went to it, {len(failed_window)} failed", flush=True)
    print(f"{p}: {len(failed)} failed in all, {len(stray)} of them elsewhere; "
          f"{len(later)} sessions started after DOWN, {len(later_failed)} failed", flush=True)
    for s in sorted(open_at_kill, key=lambda s: s.index):
        print(f"{p}: open on {victim} at the kill: {s.label}: {s.reason or 'passed'}", flush=True)
    if log_down:
        print(f"{p}: HAProxy logged: {log_down[0].strip()}", flush=True)
    report_failures(run, 5)
    # Bring it back for the phases after this one.
    inst.start()
    wait_state(ctx.sock, victim, "UP")
    if stray:
        raise PhaseFailed(f"{len(stray)} sessions failed that were not {victim}'s: {stray[0].label}: {stray[0].reason}")
    if not open_logged:
        raise PhaseFailed(f"the kill did not land inside a session of {victim}")
    if not open_logged <= victim_addrs:
        raise PhaseFailed(f"{victim} had sessions of addresses balanced elsewhere: {open_logged - victim_addrs}")
    if later_failed or len(later) < count // 2:
        raise PhaseFailed(f"sessions after DOWN: {len(later_failed)} of {len(later)} failed")
    if not log_down:
        raise PhaseFailed("HAProxy logged no DOWN line for the killed instance")


def phase_restart(ctx, count):
    """Replace one instance's process under load: the new process binds beside
    the old one, then the old one gets SIGTERM and drains."""
    name = "gw1"
    inst = ctx.instances[name]
    run = Run(ctx.lab, ctx.workdir, ctx.digest, ctx.jobs, count, ctx.next_index(count))
    info = {}

    def during(r):
        ok = r.wait_until(lambda r: r.done >= count // 4, 300)
        deadline = time.monotonic() + 60
        while ok and transfers_open(ctx.lab, name) == 0:
            ok = time.monotonic() < deadline
        if not ok:
            raise PhaseFailed(f"no session of {name} was running to restart under")
        old = inst.current
        info["old"] = old
        new = inst.start()  # raises when the new process cannot bind beside the old one
        info["new"] = new
        # SIGTERM while the old process relays a download: it must finish it.
        deadline = time.monotonic() + 60
        while transfers_open(ctx.lab, name, old.pid) == 0:
            if time.monotonic() > deadline:
                raise PhaseFailed(f"the old process of {name} relayed no download to stop it in")
        info["open"] = open_sessions(old.text())
        info["term"] = time.monotonic()
        old.signal(signal.SIGTERM)
        code = old.wait_exit(GRACE + 10)
        info["exit"] = (code, time.monotonic() - info["term"])

    try:
        run.run(during)
    except RuntimeError as exc:
        old = info.get("old")
        if "new" not in info and old is not None and old.proc.poll() is None:
            # The binary cannot run two processes on one listener.
            raise Skipped(f"a second process could not start beside the first: {str(exc)[-300:]}")
        raise
    failed = run.failed()
    new_starts = len(starts_by_client(info["new"].text()))
    drained = drained_after_term(info["old"].text())
    code, took = info["exit"]
    p = f"balancer {ctx.variant} restart"
    print(f"{p}: {count} sessions; {name} replaced with {len(info['open'])} of its sessions open; "
          f"old process ended {drained} sessions after SIGTERM and exited {code} {took:.1f}s after it; "
          f"new process served {new_starts}; "
          f"{len(failed)} failed", flush=True)
    report_failures(run)
    if failed:
        raise PhaseFailed(f"{len(failed)} of {count} sessions failed across the restart")
    if code is None:
        raise PhaseFailed(f"the old process had not exited {GRACE + 10}s after SIGTERM")
    if new_starts == 0:
        raise PhaseFailed("the new process served no session")
    if drained == 0:
        raise PhaseFailed("the old process ended no session after SIGTERM: nothing drained")
    ctx.restart_figures = (count, len(failed))


class Skipped(Exception):
    pass


class Ctx:
    def __init__(self, lab, workdir, digest, jobs, variant):
        self.lab, self.workdir, self.digest, self.jobs, self.variant = lab, workdir, digest, jobs, variant
        self.instances = {}
        self.index = 0
        self.addr_map = {}

    def next_index(self, n):
        i = self.index
        self.index += n
        return i


def run_variant(args, lab, workdir, digest, variant):
    """Runs every phase of one data variant; returns the verdict lines."""
    ctx = Ctx(lab, workdir, digest, args.jobs, variant)
    verdicts = []
    data_dnat(lab, variant == "a")
    for name in INSTANCES:
        ctx.instances[name] = Instance(lab, workdir, name, variant, args.ftpgate_bin)
    ctx.haproxy = None
    try:
        cfg, ctx.sock = haproxy_config(workdir, variant, ctx.instances, args.ftpgate_bin)
        print(f"balancer {variant}: HAProxy configuration {cfg}", flush=True)
        for inst in ctx.instances.values():
            inst.start()
        ctx.haproxy = Proc(lab, "bal", ["haproxy", "-db", "-f", cfg], os.path.join(workdir, f"haproxy-{variant}.log"))
        for name in INSTANCES:
            wait_state(ctx.sock, name, "UP")
        phases = [
            ("mixed", lambda: phase_mixed(ctx, args.sessions)),
            ("limit", lambda: phase_limit(ctx)),
            ("kill", lambda: phase_kill(ctx, args.kill_sessions)),
            ("restart", lambda: phase_restart(ctx, args.restart_sessions)),
        ]
        for phase, fn in phases:
            if phase not in args.phases:
                continue
            if phase != "mixed" and not ctx.addr_map:
                verdicts.append((f"balancer {variant} {phase}", "FAIL the mixed phase gave no address map"))
                continue
            try:
                fn()
                verdicts.append((f"balancer {variant} {phase}", "ok"))
            except Skipped as exc:
                verdicts.append((f"balancer {variant} {phase}", f"skipped ({exc})"))
            except (PhaseFailed, RuntimeError) as exc:
                verdicts.append((f"balancer {variant} {phase}", f"FAIL {exc}"))
                for name, inst in ctx.instances.items():
                    print(f"    | {name}: {inst.current.tail(6)}".replace("\n", "\n    |   "), flush=True)
            print(f"{verdicts[-1][0]}: {verdicts[-1][1]}", flush=True)
    finally:
        for inst in ctx.instances.values():
            inst.stop()
        if ctx.haproxy:
            ctx.haproxy.stop()
        data_dnat(lab, False)
    return verdicts


def missing_prerequisites(args):
    missing = prologue.missing_basics(("ip", "nft", "ss", "curl", "lftp", "haproxy"))
    missing += servers.missing_prerequisites()
    if not prologue.has_binary(args.ftpgate_bin):
        missing.append("ftpgate binary (FTPGATE_BIN)")
    return missing


def main(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    csv = lambda s: [x for x in s.split(",") if x]  # noqa: E731
    p.add_argument("--ftpgate-bin", default=os.environ.get("FTPGATE_BIN"))
    p.add_argument("--sessions", type=int, default=1000, help="sessions in the mixed phase")
    p.add_argument("--kill-sessions", type=int, help="sessions in the kill phase (default: sessions/4, at least 40)")
    p.add_argument("--restart-sessions", type=int, help="sessions in the restart phase (default: as kill)")
    p.add_argument("--variants", type=csv, default=["a", "b"], help="a (own addresses), b (VIP and slices)")
    p.add_argument("--phases", type=csv, default=["mixed", "limit", "kill", "restart"])
    p.add_argument("-j", "--jobs", type=int, default=8, help="sessions at once")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("--check", action="store_true", help="report missing prerequisites, then exit")
    args = p.parse_args(argv)
    args.kill_sessions = args.kill_sessions or max(40, args.sessions // 4)
    args.restart_sessions = args.restart_sessions or args.kill_sessions
    if args.jobs > len(WAN_CLIENTS) // 2:
        p.error(f"--jobs at most {len(WAN_CLIENTS) // 2} (each worker needs two WAN addresses)")
    code = prologue.verdict("balancer", missing_prerequisites(args), args.check)
    if code is not None:
        return code
    prologue.absolute_bin(args)
    teardown, workdir, lab = prologue.start("balancer", keep=args.keep)
    verdicts = []
    try:
        build(lab)
        print(f"balancer: namespaces {lab.prefix}*, work dir {workdir}", flush=True)
        payload, digest = servers.new_payload()
        srv = SlowVsftpd(lab, workdir, payload)
        srv.start()
        teardown.actions.append(srv.stop)
        srv.wait_ready()
        for variant in args.variants:
            verdicts += run_variant(args, lab, workdir, digest, variant)
    finally:
        teardown()
    ok = sum(1 for _, v in verdicts if v == "ok")
    failed = sum(1 for _, v in verdicts if v.startswith("FAIL"))
    skipped = sum(1 for _, v in verdicts if v.startswith("skipped"))
    print(f"balancer: {ok} phases ok, {failed} failed, {skipped} skipped")
    return 1 if failed or not verdicts else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
