"""The lab's own PKI for FTPS, made at run time with the openssl CLI in the run's
work directory: a CA, one certificate for the FTP servers and one for the gateway.

The servers' certificate names every address a client or the gateway reaches them
at: their own LAN/WAN addresses and the edge's public address (behind the DNAT of
`none` and `kernel`, clients meet the server itself there). The gateway's names the
public address, where its reverse listeners are.
"""

import os
import shutil
import subprocess

from topology import PUBLIC_V4, PUBLIC_V6, host_addr


class Pki:
    """Paths of the lab CA and of the server and gateway pairs (PEM)."""

    def __init__(self, directory):
        self.dir = directory
        self.ca = os.path.join(directory, "ca.pem")
        self.server_cert = os.path.join(directory, "server.pem")
        self.server_key = os.path.join(directory, "server.key")
        self.gateway_cert = os.path.join(directory, "gateway.pem")
        self.gateway_key = os.path.join(directory, "gateway.key")


def missing_prerequisites():
    return [] if shutil.which("openssl") else ["openssl"]


def _openssl(*argv):
    proc = subprocess.run(["openssl", *argv], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise RuntimeError(f"openssl {argv[0]}: {proc.stderr.strip()}")


def _leaf(d, name, cn, sans, ca_cert, ca_key):
    key, csr, cert = (os.path.join(d, f"{name}.{ext}") for ext in ("key", "csr", "pem"))
    ext = os.path.join(d, f"{name}.ext")
    with open(ext, "w") as f:
        f.write(
            "basicConstraints=critical,CA:FALSE\n"
            "keyUsage=critical,digitalSignature,keyEncipherment\n"
            "extendedKeyUsage=serverAuth\n"
            f"subjectAltName={','.join(sans)}\n"
        )
    # RSA: vsftpd's and ProFTPD's `rsa_cert_file`/`TLSRSACertificateFile` take RSA keys.
    _openssl("req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-subj", f"/CN={cn}", "-out", csr)
    _openssl("x509", "-req", "-in", csr, "-CA", ca_cert, "-CAkey", ca_key, "-CAcreateserial",
             "-days", "2", "-sha256", "-extfile", ext, "-out", cert)
    # Servers drop privileges (ProFTPD reads its key as root, pyftpdlib runs as root,
    # but keep them readable for every server's own way).
    os.chmod(key, 0o644)
    os.chmod(cert, 0o644)


def make(directory):
    """Makes the CA and both leaf pairs under directory; returns a Pki."""
    os.makedirs(directory, exist_ok=True)
    os.chmod(directory, 0o755)
    pki = Pki(directory)
    ca_key = os.path.join(directory, "ca.key")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key, "-subj", "/CN=ftpgate lab CA",
             "-days", "2", "-sha256", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", "-out", pki.ca)
    os.chmod(pki.ca, 0o644)
    server_ips = [host_addr(h, fam) for h in ("lans", "wans") for fam in (4, 6)] + [PUBLIC_V4, PUBLIC_V6]
    _leaf(directory, "server", "ftp.lab", ["DNS:ftp.lab"] + [f"IP:{a}" for a in server_ips], pki.ca, ca_key)
    _leaf(directory, "gateway", "gateway.lab", ["DNS:gateway.lab", f"IP:{PUBLIC_V4}", f"IP:{PUBLIC_V6}"], pki.ca, ca_key)
    return pki
