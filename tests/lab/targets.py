"""The targets compared side by side: what makes FTP work through the edge.

A target adds rules to the tgt_* chains of the edge's firewall (flushed between
targets), may run a process in the edge, and tells each case where to connect.
"""

import os
import re
import shutil
import subprocess
import time

from servers import ALL_SERVERS, CONTROL_PORTS, IMPLICIT_SERVERS, SERVERS
from topology import LAN_IFS, LINKS, PUBLIC_V4, PUBLIC_V6, WAN_IFS, FW_TABLE, host_addr, nft_set, public_addr

LAN = nft_set(LAN_IFS)
WAN = nft_set(WAN_IFS)
CTL = "{ " + ", ".join(str(p) for p in CONTROL_PORTS) + " }"


def server_index(name):
    return list(ALL_SERVERS).index(name)


class Target:
    name = "?"
    gating = False

    def __init__(self, lab, workdir, opts):
        self.lab = lab
        self.dir = os.path.join(workdir, "target-" + self.name)
        os.makedirs(self.dir, exist_ok=True)
        self.opts = opts

    def setup(self):
        pass

    def teardown(self):
        pass

    def endpoint(self, scenario, server, family):
        """(client host, address, port) a case connects to."""
        port = ALL_SERVERS[server][0]
        if scenario == "outbound":
            return "lanc", host_addr("wans", family), port
        return "wanc", public_addr(family), port

    def log_mark(self):
        """A position in the target's log, so a failed case shows what it caused."""
        return 0

    def log_tail(self, mark=0):
        return ""


class NoneTarget(Target):
    """The firewall alone."""

    name = "none"


class KernelTarget(Target):
    """The kernel's conntrack FTP helper, assigned before DNAT (priority mangle)."""

    name = "kernel"

    def setup(self):
        self.lab.nft(
            f"""
add rule inet {FW_TABLE} tgt_mangle iifname {LAN} tcp dport {CTL} ct state new ct helper set "ftp-standard"
add rule inet {FW_TABLE} tgt_mangle iifname {WAN} ip daddr {PUBLIC_V4} tcp dport {CTL} ct state new ct helper set "ftp-standard"
add rule inet {FW_TABLE} tgt_mangle iifname {WAN} ip6 daddr {PUBLIC_V6} tcp dport {CTL} ct state new ct helper set "ftp-standard"
"""
        )


class Daemon:
    """A process in the edge namespace whose stderr/stdout go straight to a log
    file (no reader in this process: a benchmark's gateway logs without
    costing the harness CPU the servers and clients share)."""

    def __init__(self, lab, argv, log_path, ready_word=None, ready_count=0):
        self.log_path = log_path
        self.ready_word = ready_word
        self.ready_count = ready_count
        self.count = 0
        with open(log_path, "w") as log:
            self.proc = subprocess.Popen(
                lab.cmd("edge", argv), stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )

    def _ready_lines(self):
        try:
            with open(self.log_path, errors="replace") as f:
                text = f.read()
        except OSError:
            return 0
        return len(re.findall(rf"\b{self.ready_word}\b", text))

    def wait_ready(self, timeout):
        """Until the log has ready_count lines with ready_word: read every 50 ms
        (the process writes the file; nothing here is told when it does)."""
        deadline = time.monotonic() + timeout
        while True:
            self.count = self._ready_lines()
            if self.count >= self.ready_count:
                return
            if self.proc.poll() is not None:
                log = tail(self.log_path) or "(empty)"
                raise RuntimeError(
                    f"exited with {self.proc.returncode} after {self.count}/{self.ready_count} "
                    f"'{self.ready_word}' lines; log: {log}"
                )
            if time.monotonic() >= deadline:
                raise RuntimeError(f"saw {self.count}/{self.ready_count} '{self.ready_word}' lines in {timeout}s: {tail(self.log_path)}")
            time.sleep(0.05)

    def stop(self):
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, 15)
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait()
            except ProcessLookupError:
                pass


def tail(path, n=25):
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:]).rstrip()
    except FileNotFoundError:
        return "(no log)"


def wait_listening(lab, port, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if lab.run("edge", ["ss", "-Hltn", f"sport = :{port}"], check=False).stdout.strip():
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on edge port {port} after {timeout}s")


class SuseTarget(Target):
    """SuSE's ftp-proxy: one reverse instance per LAN server (inbound) and one
    transparent instance (outbound). It speaks IPv4 only and has no EPSV."""

    name = "suse"
    OUT_PORT = 2300
    IN_BASE = 2320  # + server index
    PASV = (42000, 42999)
    SRV = (44000, 44999)  # its own ports toward servers, control and data

    def conf(self, path, listen, port, dest, dest_port, transparent, pasv):
        lines = [
            "ServerType standalone",
            f"Listen {listen}",
            f"Port {port}",
            f"DestinationAddress {dest}",
            f"DestinationPort {dest_port}",
            "DestinationTransferMode client",
            f"DestinationMinPort {self.SRV[0]}",
            f"DestinationMaxPort {self.SRV[1]}",
            f"PassiveMinDataPort {pasv[0]}",
            f"PassiveMaxDataPort {pasv[1]}",
            "SockBindRand yes",
            f"LogDestination {path}.log",
            "LogLevel INF",
            "MaxClients 256",
            # The default of 40 new connections a minute is far below what the lab makes.
            "ForkLimit 100000",
            f"PidFile {path}.pid",
        ]
        if transparent:
            lines.append("AllowTransProxy yes")
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")
        return path

    def setup(self):
        self.daemons = []
        self.logs = []
        lan_srv = host_addr("lans", 4)
        out_conf = self.conf(
            os.path.join(self.dir, "out.conf"), "0.0.0.0", self.OUT_PORT, host_addr("wans", 4), 21, True,
            (self.PASV[0], self.PASV[0] + 199),
        )
        confs = [(out_conf, self.OUT_PORT)]
        for name, (ctl, _) in SERVERS.items():
            i = server_index(name)
            port = self.IN_BASE + i
            lo = self.PASV[0] + 200 * (i + 1)
            confs.append(
                (self.conf(os.path.join(self.dir, f"in-{name}.conf"), PUBLIC_V4, port, lan_srv, ctl, False, (lo, lo + 199)), port)
            )
        for conf, port in confs:
            self.logs.append(conf + ".log")
            self.daemons.append(Daemon(self.lab, ["ftp-proxy", "-d", "-n", "-f", conf], conf + ".out"))
        for _, port in confs:
            wait_listening(self.lab, port)
        in_ports = f"{self.IN_BASE}-{self.IN_BASE + len(SERVERS) - 1}"
        self.lab.nft(
            f"""
add rule inet {FW_TABLE} tgt_dnat iifname {LAN} ip daddr {host_addr("wans", 4)} tcp dport {CTL} redirect to :{self.OUT_PORT}
add rule inet {FW_TABLE} tgt_dnat iifname {LAN} ip6 daddr {host_addr("wans", 6)} tcp dport {CTL} redirect to :{self.OUT_PORT}
add rule inet {FW_TABLE} tgt_input iifname {LAN} tcp dport {{ {self.OUT_PORT}, {self.PASV[0]}-{self.PASV[1]} }} accept
add rule inet {FW_TABLE} tgt_input iifname {WAN} tcp dport {{ {in_ports}, {self.PASV[0]}-{self.PASV[1]} }} accept
add rule inet {FW_TABLE} tgt_input tcp dport {self.SRV[0]}-{self.SRV[1]} accept
"""
        )

    def endpoint(self, scenario, server, family):
        client, addr, port = super().endpoint(scenario, server, family)
        if scenario == "inbound":
            port = self.IN_BASE + server_index(server)
        return client, addr, port

    def teardown(self):
        for d in self.daemons:
            d.stop()

    def log_tail(self, mark=0):
        return "\n".join(tail(p, 8) for p in self.logs if os.path.exists(p))


class FtpgateTarget(Target):
    """ftpgate in the edge: transparent listeners for outbound, reverse for inbound."""

    name = "ftpgate"
    gating = True
    OUT_PORT = 2400
    IN_BASE = 2420
    CLIENT_PORTS = (40000, 40999)
    SERVER_PORTS = (41000, 41999)
    pinhole_timeout = "30s"

    def tls_lines(self, name):
        """A reverse listener's `tls` and `upstream_tls` under --ftps: the gateway's
        pair toward the client, the server's certificate verified against the lab CA
        (by the upstream's IP, the default name). Implicit servers get implicit
        listeners and an implicit server leg."""
        pki = self.opts.pki
        mode = "implicit" if name in IMPLICIT_SERVERS else "explicit"
        return [
            "    tls:",
            f"      cert: {pki.gateway_cert}",
            f"      key: {pki.gateway_key}",
            f"      implicit: {'true' if mode == 'implicit' else 'false'}",
            "      require_resumption: true",
            "    upstream_tls:",
            f"      mode: {mode}",
            f"      ca: {pki.ca}",
        ]

    def rule_file(self):
        lan_srv4, lan_srv6 = host_addr("lans", 4), host_addr("lans", 6)
        ftps = getattr(self.opts, "ftps", False)
        listeners = [] if ftps else [
            ("out-v4", f"0.0.0.0:{self.OUT_PORT}", "transparent", None, None, None),
            ("out-v6", f"'[::]:{self.OUT_PORT}'", "transparent", None, None, None),
        ]
        # Under --ftps: the FTPS servers, each behind a TLS listener.
        names = ALL_SERVERS if ftps else SERVERS
        for name, (ctl, _) in names.items():
            port = self.IN_BASE + server_index(name)
            listeners.append((f"in-{name}-v4", f"{PUBLIC_V4}:{port}", "reverse", f"{lan_srv4}:{ctl}", PUBLIC_V4, name))
            if self.opts.ipv6:
                listeners.append(
                    (f"in-{name}-v6", f"'[{PUBLIC_V6}]:{port}'", "reverse", f"'[{lan_srv6}]:{ctl}'", f"'{PUBLIC_V6}'",
                     name)
                )
        out = ["listeners:"]
        for name, listen, mode, upstream, announce, server in listeners:
            out += [f"  - name: {name}", f"    listen: {listen}", f"    mode: {mode}"]
            if upstream:
                out += [f"    upstream: {upstream}", f"    announce: {announce}"]
            if ftps:
                out += self.tls_lines(server)
        self.listeners = len(listeners)
        self.in_ports = f"{self.IN_BASE}-{self.IN_BASE + len(names) - 1}"
        # nft table names take no '-': unique per run so concurrent runs never share one.
        self.table = f"{self.lab.prefix.rstrip('-').replace('-', '_')}_gw"
        out += [
            "data:",
            f"  backend: {self.opts.backend}",
            f"  client_ports: {self.CLIENT_PORTS[0]}-{self.CLIENT_PORTS[1]}",
            f"  server_ports: {self.SERVER_PORTS[0]}-{self.SERVER_PORTS[1]}",
            f"  pinhole_timeout: {self.pinhole_timeout}",
            f"  nftables_table: {self.table}",
            "limits:",
            "  max_sessions: 1000",
            "  max_sessions_per_client: 200",
            "  idle_timeout: 2m",
            "  connect_timeout: 5s",
            "rules:",
            "  - name: lab",
            "    action: allow",
            "    modes: [passive, active]",
            "    server_mode: same",
            "    data_ports: 1024-65535",
        ]
        if ftps:
            out += ["    tls: terminate", "    require_tls: true", "    require_prot_p: true"]
        else:
            out += ["    tls: refuse"]
        path = os.path.join(self.dir, "ftpgate.yaml")
        with open(path, "w") as f:
            f.write("\n".join(out) + "\n")
        return path

    def setup(self):
        self.daemon = None
        binary = self.opts.ftpgate_bin
        if not binary or not os.access(binary, os.X_OK):
            raise RuntimeError(f"ftpgate binary not found: {binary!r} (set FTPGATE_BIN or --ftpgate-bin)")
        conf = self.rule_file()
        self.log = os.path.join(self.dir, "ftpgate.log")
        env_argv = ["env", "RUST_LOG=" + os.environ.get("RUST_LOG", "info")]
        # FTPGATE_THREADS=N runs the gateway with --threads N (default: its own choice).
        threads = ["--threads", os.environ["FTPGATE_THREADS"]] if os.environ.get("FTPGATE_THREADS") else []
        self.daemon = Daemon(self.lab, env_argv + [binary, "run", "--config", conf] + threads, self.log, "listening", self.listeners)
        self.daemon.wait_ready(15)
        if self.opts.backend == "nftables":
            # The operator's firewall as ftpgate prints it, and nothing broader:
            # its data connections must pass as RELATED, as the kernel helper's do.
            printed = self.printed_rules(conf)
            self.lab.nft(printed)
            count = sum(1 for line in printed.splitlines() if line.startswith("add rule "))
            print(f"lab: {self.name}: the edge has the {count} rules `ftpgate nft --into` printed, nothing else", flush=True)
            return
        cp = f"{self.CLIENT_PORTS[0]}-{self.CLIENT_PORTS[1]}"
        sp = f"{self.SERVER_PORTS[0]}-{self.SERVER_PORTS[1]}"
        # Subclasses with their own rule file (hostile.py) keep the plain listeners' range.
        in_ports = getattr(self, "in_ports", f"{self.IN_BASE}-{self.IN_BASE + len(SERVERS) - 1}")
        rules = f"""
add rule inet {FW_TABLE} tgt_dnat iifname {LAN} ip daddr {host_addr("wans", 4)} tcp dport {CTL} redirect to :{self.OUT_PORT}
add rule inet {FW_TABLE} tgt_dnat iifname {LAN} ip6 daddr {host_addr("wans", 6)} tcp dport {CTL} redirect to :{self.OUT_PORT}
add rule inet {FW_TABLE} tgt_input iifname "lanc" tcp dport {{ {self.OUT_PORT}, {cp} }} accept
add rule inet {FW_TABLE} tgt_input iifname "wans" tcp dport {sp} accept
add rule inet {FW_TABLE} tgt_input iifname "wanc" tcp dport {{ {in_ports}, {cp} }} accept
add rule inet {FW_TABLE} tgt_input iifname "lans" tcp dport {sp} accept
"""
        self.lab.nft(rules)

    def printed_rules(self, conf):
        """What `ftpgate nft --into` prints for the edge's target chains."""
        argv = [
            self.opts.ftpgate_bin, "nft", "--config", conf, "--into", f"inet/{FW_TABLE}",
            "--input", "tgt_input", "--forward", "tgt_forward", "--dstnat", "tgt_dnat",
            "--control-ports", ",".join(str(p) for p in CONTROL_PORTS),
        ]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        if proc.returncode != 0:
            raise RuntimeError(f"ftpgate nft --into: exit {proc.returncode}: {proc.stderr.strip()}")
        self.printed = proc.stdout
        with open(os.path.join(self.dir, "operator-rules.nft"), "w") as f:
            f.write(self.printed)
        return self.printed

    def endpoint(self, scenario, server, family):
        client, addr, port = super().endpoint(scenario, server, family)
        if scenario == "inbound":
            port = self.IN_BASE + server_index(server)
        return client, addr, port

    def teardown(self):
        if self.daemon:
            self.daemon.stop()

    def log_mark(self):
        try:
            return os.path.getsize(self.log)
        except (AttributeError, OSError):
            return 0

    def log_tail(self, mark=0):
        """The last lines ftpgate logged since mark (other cases may interleave with -j)."""
        if not self.daemon:
            return ""
        with open(self.log, "rb") as f:
            f.seek(mark)
            lines = f.read().decode(errors="replace").splitlines()
        return "\n".join(lines[-15:]) or "(ftpgate logged nothing during this case)"


TARGETS = {t.name: t for t in (NoneTarget, KernelTarget, SuseTarget, FtpgateTarget)}


def missing_prerequisites(names):
    missing = []
    if "suse" in names and not shutil.which("ftp-proxy"):
        missing.append("ftp-proxy")
    return missing
