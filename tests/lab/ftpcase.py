"""One Python ftplib case, run inside a client namespace by the lab.

Usage: ftpcase.py HOST PORT MODE OUTDIR [UPLOAD_SRC UPLOAD_NAME]
MODE: passive | passive-trust | active. Writes listing.txt, data.bin and, with an
upload, back.bin into OUTDIR; exits non-zero with the error on stderr.
"""

import ftplib
import os
import sys


def main():
    host, port, mode, outdir = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    upload = sys.argv[5:7]
    ftp = ftplib.FTP(timeout=8)
    if mode == "passive-trust":
        ftp.trust_server_pasv_ipv4_address = True
    ftp.connect(host, port)
    ftp.login()
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
