"""One Python ftplib case, run inside a client namespace by the lab.

Usage: ftpcase.py [--ca CA.pem] HOST PORT MODE OUTDIR [UPLOAD_SRC UPLOAD_NAME]
MODE: passive | passive-trust | active. With --ca: explicit FTPS (AUTH TLS, PROT P),
the server's certificate verified against CA.pem. Writes listing.txt, data.bin and,
with an upload, back.bin into OUTDIR; exits non-zero with the error on stderr.
"""

import ftplib
import os
import ssl
import sys


class ReusingFTP_TLS(ftplib.FTP_TLS):
    """FTP_TLS whose data connections resume the control connection's TLS session:
    ftplib does not by default, and strict servers (vsftpd, ProFTPD) refuse that."""

    def ntransfercmd(self, cmd, rest=None):
        conn, size = ftplib.FTP.ntransfercmd(self, cmd, rest)
        if self._prot_p:
            conn = self.context.wrap_socket(conn, server_hostname=self.host, session=self.sock.session)
        return conn, size


def main():
    argv = sys.argv[1:]
    ca = None
    if argv[:1] == ["--ca"]:
        ca, argv = argv[1], argv[2:]
    host, port, mode, outdir = argv[0], int(argv[1]), argv[2], argv[3]
    upload = argv[4:6]
    if ca:
        ftp = ReusingFTP_TLS(context=ssl.create_default_context(cafile=ca), timeout=8)
    else:
        ftp = ftplib.FTP(timeout=8)
    if mode == "passive-trust":
        ftp.trust_server_pasv_ipv4_address = True
    ftp.connect(host, port)
    ftp.login()
    if ca:
        ftp.prot_p()
    ftp.set_pasv(mode != "active")
    names = []
    ftp.retrlines("LIST", names.append)
    with open(os.path.join(outdir, "listing.txt"), "w") as f:
        f.write("\n".join(names) + "\n")
    with open(os.path.join(outdir, "data.bin"), "wb") as f:
        ftp.retrbinary("RETR data.bin", f.write)
    if upload:
        src, name = upload
        with open(src, "rb") as f:
            ftp.storbinary(f"STOR upload/{name}", f)
        with open(os.path.join(outdir, "back.bin"), "wb") as f:
            ftp.retrbinary(f"RETR upload/{name}", f.write)
    ftp.quit()


if __name__ == "__main__":
    try:
        main()
    except Exception as exc:  # the lab reports the reason, not a traceback
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        sys.exit(1)
