"""The FTP clients and their variants, and one case: list, download, maybe upload."""

import hashlib
import os
import subprocess
import sys

from servers import DATA_FILE, LISTING, UPLOAD_DIR
from topology import url_host

CMD_TIMEOUT = 20  # seconds for any one client command: a broken case fails, never hangs
HERE = os.path.dirname(os.path.abspath(__file__))


class Variant:
    def __init__(self, tool, variant, families, upload, args, implicit=False):
        self.tool = tool
        self.variant = variant
        self.families = families
        self.upload = upload
        self.args = args
        # FTPS from the first byte (ftps://): meets implicit servers only.
        self.implicit = implicit

    @property
    def name(self):
        return f"{self.tool}-{self.variant}"


# curl over IPv6 always uses EPSV/EPRT, so PASV/PORT variants are IPv4 only; the same
# holds for lftp's and ftplib's IPv4-only flavours.
VARIANTS = [
    Variant("curl", "epsv", (4, 6), True, []),
    Variant("curl", "pasv", (4,), False, ["--disable-epsv"]),
    Variant("curl", "pasvip", (4,), False, ["--disable-epsv", "--no-ftp-skip-pasv-ip"]),
    Variant("curl", "eprt", (4, 6), False, ["-P", "-"]),
    Variant("curl", "port", (4,), True, ["-P", "-", "--disable-eprt"]),
    Variant("lftp", "passive", (4,), True, ["set ftp:passive-mode on", "set ftp:prefer-epsv off"]),
    Variant("lftp", "epsv", (4, 6), False, ["set ftp:passive-mode on", "set ftp:prefer-epsv on"]),
    Variant("lftp", "active", (4, 6), True, ["set ftp:passive-mode off"]),
    Variant("python", "passive", (4, 6), True, ["passive"]),
    Variant("python", "pasvtrust", (4,), False, ["passive-trust"]),
    Variant("python", "active", (4, 6), True, ["active"]),
]
TOOLS = sorted({v.tool for v in VARIANTS})

# FTPS (lab.py --ftps): every variant requires TLS on control and data (PROT P) and
# verifies the certificate it meets against the lab CA. curl's active mode never
# starts TLS on its data connection (curl #10666), so active FTPS is lftp's and ftplib's.
LFTP_TLS = ["set ftp:ssl-allow yes", "set ftp:ssl-force yes", "set ftp:ssl-protect-data yes",
            "set ftp:ssl-protect-list yes", "set ftp:ssl-allow-anonymous yes"]
FTPS_VARIANTS = [
    Variant("curl", "tls-epsv", (4, 6), True, ["--ssl-reqd"]),
    Variant("curl", "tls-pasv", (4,), False, ["--ssl-reqd", "--disable-epsv"]),
    Variant("curl", "tls-implicit", (4, 6), True, [], implicit=True),
    Variant("lftp", "tls-passive", (4,), True, LFTP_TLS + ["set ftp:passive-mode on", "set ftp:prefer-epsv off"]),
    Variant("lftp", "tls-epsv", (4, 6), False, LFTP_TLS + ["set ftp:passive-mode on", "set ftp:prefer-epsv on"]),
    Variant("lftp", "tls-active", (4, 6), True, LFTP_TLS + ["set ftp:passive-mode off"]),
    Variant("python", "tls-passive", (4, 6), True, ["passive"]),
    Variant("python", "tls-active", (4, 6), True, ["active"]),
]


def select(names, ftps=False):
    """Variants whose tool or full name is listed (all when names is empty); the
    FTPS ones with ftps."""
    variants = FTPS_VARIANTS if ftps else VARIANTS
    if not names:
        return list(variants)
    chosen = [v for v in variants if v.tool in names or v.name in names]
    unknown = [n for n in names if n not in TOOLS and n not in {v.name for v in variants}]
    if unknown:
        raise SystemExit(f"unknown clients: {', '.join(unknown)}")
    return chosen


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 16), b""):
            h.update(chunk)
    return h.hexdigest()


class CaseFailed(Exception):
    pass


def _exec(lab, host, argv, step):
    try:
        proc = lab.run(host, argv, check=False, timeout=CMD_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise CaseFailed(f"{step}: timed out after {CMD_TIMEOUT}s")
    if proc.returncode != 0:
        err = (proc.stderr.strip() or proc.stdout.strip()).splitlines()
        reason = f"{step}: exit {proc.returncode}: {err[-1] if err else ''}".strip()
        hint = _curl_hint(err)
        raise CaseFailed(f"{reason} ({hint})" if hint else reason)
    return proc.stdout


def _curl_hint(lines):
    """From curl -v output, the last FTP error reply or failed data connect: curl's
    own error message names the control connection even when the data one failed."""
    for line in reversed(lines):
        if line.startswith(("< 4", "< 5")) or ("connect to" in line and "failed" in line):
            return line.lstrip("*< ").strip()
    return ""


def _curl(lab, client, v, base, outdir, up_src, up_name, ca):
    common = ["curl", "-sS", "-v", "--connect-timeout", "5", "-m", str(CMD_TIMEOUT - 2)] + v.args
    if ca:
        common += ["--cacert", ca]
    listing = _exec(lab, client, common + [base + "/"], "list")
    _exec(lab, client, common + ["-o", os.path.join(outdir, "data.bin"), f"{base}/{DATA_FILE}"], "download")
    if up_name:
        _exec(lab, client, common + ["-T", up_src, f"{base}/{UPLOAD_DIR}/{up_name}"], "upload")
        _exec(lab, client, common + ["-o", os.path.join(outdir, "back.bin"), f"{base}/{UPLOAD_DIR}/{up_name}"], "readback")
    return listing


def _lftp(lab, client, v, base, outdir, up_src, up_name, ca):
    script = [
        "set cmd:fail-exit yes",
        "set net:timeout 5",
        "set net:max-retries 1",
        "set net:persist-retries 0",
        "set net:reconnect-interval-base 1",
        "set xfer:clobber on",
        "set ftp:ssl-allow no",
        # lftp switches passive mode after a failed data connection; a case tests one mode.
        "set ftp:auto-passive-mode off",
    ] + ([f"set ssl:ca-file {ca}", "set ssl:verify-certificate yes"] if ca else []) + v.args + [
        f"open -u anonymous,lab@ {base}",
        "cls -1",
        f"get {DATA_FILE} -o {os.path.join(outdir, 'data.bin')}",
    ]
    if up_name:
        script += [
            f"put {up_src} -o {UPLOAD_DIR}/{up_name}",
            f"get {UPLOAD_DIR}/{up_name} -o {os.path.join(outdir, 'back.bin')}",
        ]
    return _exec(lab, client, ["lftp", "-c", "; ".join(script)], "lftp")


def _python(lab, client, v, host, port, outdir, up_src, up_name, ca):
    argv = [sys.executable, os.path.join(HERE, "ftpcase.py")] + (["--ca", ca] if ca else [])
    argv += [host, str(port), v.args[0], outdir]
    if up_name:
        argv += [up_src, up_name]
    _exec(lab, client, argv, "ftplib")
    with open(os.path.join(outdir, "listing.txt")) as f:
        return f.read()


def run_case(lab, client, v, host, port, outdir, digest, up_src, up_name, ca=None):
    """Runs one case; returns None on success or the reason it failed. With ca
    (FTPS), certificates are verified against that CA file."""
    os.makedirs(outdir, exist_ok=True)
    base = f"{'ftps' if v.implicit else 'ftp'}://{url_host(host)}:{port}"
    up_name = up_name if v.upload else None
    try:
        if v.tool == "curl":
            listing = _curl(lab, client, v, base, outdir, up_src, up_name, ca)
        elif v.tool == "lftp":
            listing = _lftp(lab, client, v, base, outdir, up_src, up_name, ca)
        else:
            listing = _python(lab, client, v, host, port, outdir, up_src, up_name, ca)
        missing = [n for n in LISTING if n not in listing]
        if missing:
            return f"listing lacks {', '.join(missing)}"
        got = sha256_file(os.path.join(outdir, "data.bin"))
        if got != digest:
            return f"download digest {got[:12]} != {digest[:12]}"
        if up_name:
            if sha256_file(os.path.join(outdir, "back.bin")) != sha256_file(up_src):
                return "upload read back differs"
    except CaseFailed as exc:
        return str(exc)
    except FileNotFoundError as exc:
        return f"missing output: {exc.filename}"
    return None
