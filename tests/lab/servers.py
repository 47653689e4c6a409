"""The FTP servers: one of each kind on each server host, each with its own control
port and passive range, anonymous download and upload, the same content."""

import hashlib
import os
import shutil
import subprocess
import time

PKG_DIR = os.environ.get("LAB_PKG_DIR", "/opt/ftpgate-lab")

# name -> (control port, passive range)
SERVERS = {
    "vsftpd": (2121, (30000, 30099)),
    "proftpd": (2122, (30100, 30199)),
    "pure-ftpd": (2123, (30200, 30299)),
    "pyftpdlib": (2124, (30300, 30399)),
}
# FTPS runs only (lab.py --ftps): vsftpd with implicit TLS, for curl's ftps:// cases.
IMPLICIT_SERVERS = {
    "vsftpd-implicit": (2125, (30400, 30499)),
}
ALL_SERVERS = {**SERVERS, **IMPLICIT_SERVERS}
CONTROL_PORTS = [port for port, _ in ALL_SERVERS.values()]
DATA_FILE = "data.bin"
DATA_SIZE = 1 << 20
LISTING = ("data.bin", "readme.txt", "notes")
UPLOAD_DIR = "upload"


def binaries():
    return {
        "vsftpd": os.path.join(PKG_DIR, "vsftpd/usr/sbin/vsftpd"),
        "proftpd": shutil.which("proftpd") or "/usr/sbin/proftpd",
        "pure-ftpd": os.path.join(PKG_DIR, "pure-ftpd/usr/sbin/pure-ftpd"),
        "pyftpdlib": "/usr/bin/python3",
    }


def missing_prerequisites():
    """Names what is missing to run every server, or an empty list."""
    missing = [f"{name} ({path})" for name, path in binaries().items() if not os.access(path, os.X_OK)]
    probe = subprocess.run(["/usr/bin/python3", "-c", "import pyftpdlib"], capture_output=True)
    if probe.returncode != 0:
        missing.append("python3-pyftpdlib")
    try:
        import pwd

        pwd.getpwnam("ftp")
    except KeyError:
        missing.append("user ftp")
    return missing


def missing_tls_prerequisites():
    """What the servers' TLS modes need beyond the servers themselves."""
    missing = []
    if not os.path.exists("/usr/lib/proftpd/mod_tls.so"):
        missing.append("proftpd-mod-crypto (mod_tls)")
    probe = subprocess.run(["/usr/bin/python3", "-c", "import OpenSSL"], capture_output=True)
    if probe.returncode != 0:
        missing.append("python3-openssl")
    return missing


def make_content(root, payload):
    """Lays out one server's root: the data file, a listing, a writable upload dir."""
    os.makedirs(os.path.join(root, "notes"), exist_ok=True)
    with open(os.path.join(root, DATA_FILE), "wb") as f:
        f.write(payload)
    with open(os.path.join(root, "readme.txt"), "w") as f:
        f.write("ftpgate lab\n")
    up = os.path.join(root, UPLOAD_DIR)
    os.makedirs(up, exist_ok=True)
    # Anonymous sessions write as user ftp; the root itself must stay unwritable
    # (vsftpd refuses a writable chroot).
    os.chmod(up, 0o777)
    os.chmod(root, 0o755)


def new_payload():
    payload = os.urandom(DATA_SIZE)
    return payload, hashlib.sha256(payload).hexdigest()


class Server:
    """One running server process in one server namespace."""

    # vsftpd only: whether active-mode data comes from port 20 (see FixedPortVsftpd).
    connect_from_port_20 = False

    def __init__(self, lab, host, name, workdir, payload, pki=None):
        self.lab = lab
        self.host = host
        self.name = name
        # FTPS (a certs.Pki): TLS required on control and data, sessions reused.
        self.pki = pki
        self.implicit = name in IMPLICIT_SERVERS
        self.port, self.pasv = ALL_SERVERS[name]
        self.dir = os.path.join(workdir, host, name)
        self.root = os.path.join(self.dir, "root")
        self.log = os.path.join(self.dir, "server.log")
        os.makedirs(self.dir, exist_ok=True)
        os.chmod(self.dir, 0o755)
        make_content(self.root, payload)
        self.proc = None

    def argv(self):
        lo, hi = self.pasv
        d = self.dir
        if self.name.startswith("vsftpd"):
            empty = os.path.join(d, "empty")
            os.makedirs(empty, exist_ok=True)
            conf = os.path.join(d, "vsftpd.conf")
            with open(conf, "w") as f:
                f.write(
                    "\n".join(
                        [
                            "listen=NO",
                            "listen_ipv6=YES",
                            f"listen_port={self.port}",
                            "background=NO",
                            "seccomp_sandbox=NO",
                            f"secure_chroot_dir={empty}",
                            "anonymous_enable=YES",
                            "local_enable=NO",
                            "no_anon_password=YES",
                            f"anon_root={self.root}",
                            "write_enable=YES",
                            "anon_upload_enable=YES",
                            "anon_mkdir_write_enable=YES",
                            "anon_umask=022",
                            f"pasv_min_port={lo}",
                            f"pasv_max_port={hi}",
                            f"connect_from_port_20={'YES' if self.connect_from_port_20 else 'NO'}",
                            "xferlog_enable=YES",
                            f"vsftpd_log_file={self.log}",
                        ]
                        + self.vsftpd_tls()
                        + [""]
                    )
                )
            return [binaries()["vsftpd"], conf]
        if self.name == "proftpd":
            run = os.path.join(d, "run")
            os.makedirs(run, mode=0o755, exist_ok=True)
            os.chmod(run, 0o755)
            conf = os.path.join(d, "proftpd.conf")
            with open(conf, "w") as f:
                f.write(
                    f"""ServerName "lab"
ServerType standalone
DefaultServer on
Port {self.port}
UseIPv6 on
Umask 022
User nobody
Group nogroup
MaxInstances 100
PassivePorts {lo} {hi}
ScoreboardFile {run}/scoreboard
PidFile {run}/proftpd.pid
DelayTable none
WtmpLog off
UseReverseDNS off
SystemLog {self.log}
TransferLog none
AllowOverwrite on
<Anonymous {self.root}>
  User ftp
  Group nogroup
  UserAlias anonymous ftp
  RequireValidShell off
  <Directory *>
    <Limit WRITE>
      AllowAll
    </Limit>
  </Directory>
</Anonymous>
"""
                    + self.proftpd_tls()
                )
            return [binaries()["proftpd"], "-n", "-c", conf]
        if self.name == "pure-ftpd":
            # pure-ftpd serves the home of user ftp to anonymous sessions: bind-mount this
            # server's root there. `ip netns exec` runs in a private mount namespace, so
            # the mount is not seen by the host or by the other server host.
            import pwd

            home = pwd.getpwnam("ftp").pw_dir
            bin_ = binaries()["pure-ftpd"]
            script = (
                f"mkdir -p {home} && mount --bind {self.root} {home} && "
                f"exec {bin_} -S ,{self.port} -e -M -H -A -U 133:022 -c 100 -C 100 -p {lo}:{hi}"
            )
            if self.pki:
                # -Y 3: TLS required on the control and the data connections.
                script += f" -Y 3 -2 {self.pki.server_cert},{self.pki.server_key}"
            return ["sh", "-c", script]
        if self.name == "pyftpdlib" and self.pki:
            script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pyftpd_tls.py")
            return [
                "/usr/bin/python3", script, str(self.port), self.root, str(lo), str(hi),
                self.pki.server_cert, self.pki.server_key,
            ]
        if self.name == "pyftpdlib":
            return [
                "/usr/bin/python3", "-m", "pyftpdlib", "-i", "::", "-p", str(self.port),
                "-w", "-d", self.root, "-r", f"{lo}-{hi}",
            ]
        raise ValueError(self.name)

    def vsftpd_tls(self):
        if not self.pki:
            return []
        lines = [
            "ssl_enable=YES",
            "allow_anon_ssl=YES",
            "force_anon_logins_ssl=YES",
            "force_anon_data_ssl=YES",
            "require_ssl_reuse=YES",
            # Debian's default list (DES-CBC3-SHA) is disabled in OpenSSL 3.
            "ssl_ciphers=HIGH",
            f"rsa_cert_file={self.pki.server_cert}",
            f"rsa_private_key_file={self.pki.server_key}",
            "debug_ssl=YES",
        ]
        if self.implicit:
            lines.append("implicit_ssl=YES")
        return lines

    def proftpd_tls(self):
        if not self.pki:
            return ""
        # mod_tls (proftpd-mod-crypto) requires session reuse on data connections
        # unless `TLSOptions NoSessionReuseRequired` says otherwise: left unset.
        return f"""ModulePath /usr/lib/proftpd
LoadModule mod_tls.c
<IfModule mod_tls.c>
  TLSEngine on
  TLSRequired on
  TLSProtocol TLSv1.2 TLSv1.3
  TLSRSACertificateFile {self.pki.server_cert}
  TLSRSACertificateKeyFile {self.pki.server_key}
  TLSVerifyClient off
  TLSLog {self.dir}/tls.log
</IfModule>
"""

    def start(self):
        out = open(os.path.join(self.dir, "stdout.log"), "w+b")
        # vsftpd writes its startup errors ("500 OOPS") to fd 0: give it the log there.
        stdin = out if self.name.startswith("vsftpd") else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            self.lab.cmd(self.host, self.argv()), stdout=out, stderr=subprocess.STDOUT,
            stdin=stdin, start_new_session=True,
        )
        out.close()

    def wait_ready(self, timeout=10.0):
        """Waits until the control port listens (polling the socket table)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} on {self.host} exited: {self.tail()}")
            ss = self.lab.run(self.host, ["ss", "-Hltn", f"sport = :{self.port}"], check=False)
            if ss.stdout.strip():
                return
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} on {self.host} not listening after {timeout}s: {self.tail()}")

    def tail(self, n=20):
        out = []
        for name in ("stdout.log", "server.log"):
            path = os.path.join(self.dir, name)
            if os.path.exists(path):
                with open(path, errors="replace") as f:
                    out += f.readlines()[-n:]
        return "".join(out).strip()

    def stop(self):
        if self.proc and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, 15)
                self.proc.wait(timeout=5)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.proc.pid, 9)
                except ProcessLookupError:
                    pass


class FixedPortVsftpd(Server):
    """vsftpd as Debian ships it: active-mode data from port 20, so every data
    connection to one gateway port has the same 4-tuple (tests/lab/reuse.py)."""

    connect_from_port_20 = True

    def __init__(self, lab, host, workdir, payload):
        super().__init__(lab, host, "vsftpd", workdir, payload)


def start_all(lab, workdir, names, payload, pki=None, hosts=("lans", "wans")):
    """Starts names on hosts (in TLS mode with a certs.Pki) and waits for each."""
    servers = {}
    for host in hosts:
        for name in names:
            srv = Server(lab, host, name, workdir, payload, pki)
            srv.start()
            servers[(host, name)] = srv
    for srv in servers.values():
        srv.wait_ready()
    return servers
