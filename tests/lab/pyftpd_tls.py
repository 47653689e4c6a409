"""pyftpdlib's TLS_FTPHandler as the lab's FTPS server (TLS required on control and
data), run by servers.py with /usr/bin/python3 (it needs python3-openssl).

Usage: pyftpd_tls.py PORT ROOT PASV_LO PASV_HI CERT KEY
"""

import sys

from pyftpdlib.authorizers import DummyAuthorizer
from pyftpdlib.handlers import TLS_FTPHandler
from pyftpdlib.servers import FTPServer


def main():
    port, root, lo, hi, cert, key = sys.argv[1:7]
    auth = DummyAuthorizer()
    auth.add_anonymous(root, perm="elradfmw")
    handler = TLS_FTPHandler
    handler.authorizer = auth
    handler.certfile = cert
    handler.keyfile = key
    handler.tls_control_required = True
    handler.tls_data_required = True
    handler.passive_ports = range(int(lo), int(hi) + 1)
    FTPServer(("::", int(port)), handler).serve_forever()


if __name__ == "__main__":
    main()
