#!/usr/bin/env python3
"""Writes the seed corpus (fuzz/seeds/<target>/) from typical session
transcripts: login, PASV/227, EPSV/229, PORT, RETR/STOR/LIST, multi-line
FEAT, ABOR, AUTH. Run from fuzz/; the output is committed."""
import os

C, S, OPEN = "c", "s", "open"  # client line, server line, open answered ok

SESSIONS = {
    "login_pasv_retr": [
        (S, "220 ProFTPD ready"), (C, "USER anonymous"), (S, "331 Password required"),
        (C, "PASS x@"), (S, "230 Logged in"), (C, "TYPE I"), (S, "200 Type set to I"),
        (C, "PASV"), (S, "227 Entering Passive Mode (10,0,0,3,195,80).", OPEN),
        (C, "RETR file.bin"), (S, "150 Opening BINARY mode data connection"),
        (S, "226 Transfer complete"), (C, "QUIT"), (S, "221 Goodbye"),
    ],
    "epsv_stor": [
        (S, "220 vsFTPd 3.0.3"), (C, "USER u"), (S, "331 Please specify the password."),
        (C, "PASS p"), (S, "230 Login successful."), (C, "EPSV"),
        (S, "229 Entering Extended Passive Mode (|||50123|)", OPEN),
        (C, "STOR up.txt"), (S, "150 Ok to send data."), (S, "226 Transfer complete."),
    ],
    "port_list": [
        (S, "220 hi"), (C, "USER a"), (S, "230 ok"),
        (C, "PORT 198,51,100,7,200,10", OPEN), (S, "200 PORT command successful"),
        (C, "LIST -la"), (S, "150 Here comes the directory listing."),
        (S, "226 Directory send OK."),
        (C, "EPRT |1|198.51.100.7|51211|", OPEN), (S, "200 EPRT command successful"),
        (C, "NLST"), (S, "125 Data connection already open"), (S, "226 ok"),
    ],
    "feat_multiline": [
        (S, "220-Welcome"), (S, " to the server"), (S, "220 ready"), (C, "FEAT"),
        (S, "211-Features:"), (S, " EPRT"), (S, " EPSV"), (S, " MDTM"), (S, " PASV"),
        (S, " AUTH TLS"), (S, " UTF8"), (S, "211 End"), (C, "SYST"), (S, "215 UNIX Type: L8"),
    ],
    "abor": [
        (S, "220 hi"), (C, "USER a"), (S, "230 ok"), (C, "PASV"),
        (S, "227 Entering Passive Mode (10,0,0,3,200,1)", OPEN), (C, "RETR big"),
        (S, "150 Opening"), (C, "\xff\xf4\xff\xf2ABOR"), (S, "426 Transfer aborted"),
        (S, "226 Abort successful"),
    ],
    "auth_tls": [
        (S, "220 hi"), (C, "AUTH TLS"), (S, "234 Proceed with negotiation."),
        (C, "\x16\x03\x01\x00\x05hello"),
    ],
}

def line(t):
    return t.encode("latin-1") + b"\r\n"

def write(target, name, data):
    d = os.path.join("seeds", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)

for name, steps in SESSIONS.items():
    client = b"".join(line(s[1]) for s in steps if s[0] == C)
    server = b"".join(line(s[1]) for s in steps if s[0] == S)
    write("command", name, bytes([6]) + client)
    write("command", name + "_bytewise", bytes([0]) + client)
    write("reply", name, server)
    for setup in (0, 1, 2, 4, 8):
        out = bytearray([setup])
        for step in steps:
            b = line(step[1])[:255]
            out += bytes([0 if step[0] == C else 2, len(b)]) + b
            if len(step) > 2:
                out.append(1)
        # A data connection that completes, then idle.
        out += bytes([4, 0, 5, 0, 0, 200, 7, 2])
        write("session", f"{name}_{setup}", bytes(out))

# differential: the same transcripts as the session target's (client op 0,
# server op 3), then lines that hide a second line behind IAC LF, a bare CR
# or a NUL.
SMUGGLE = {
    "smuggle_dele": [
        (S, "220 hi"), (C, "NOOP\xff\nDELE x"), (C, "NOOP\xff\xfd\nDELE x"),
        (C, "NOOP\rDELE x"), (S, "200 ok"),
    ],
    "smuggle_port": [
        (S, "220 hi"), (C, "NOOP\xff\nPORT 198,51,100,9,200,1"),
        (C, "NOOP\xff\xfb\nEPRT |1|198.51.100.9|51201|"), (C, "NOOP"), (S, "200 ok"),
    ],
    "smuggle_227": [
        (S, "220 hi"), (C, "NOOP"), (S, "200 ok\xff\n227 Entering Passive Mode (10,0,0,9,1,1)"),
        (C, "NOOP"), (S, "200-a\xff\n227 Entering Passive Mode (10,0,0,9,1,1)"), (S, "200 end"),
        (C, "NOOP"), (S, "200 a\r227 Entering Passive Mode (10,0,0,9,1,1)\x00"),
    ],
    "auth_answered_227": [
        (S, "220 hi"), (C, "AUTH TLS"), (S, "227 Entering Passive Mode (1,2,3,4,200,1)"),
    ],
}

for name, steps in list(SESSIONS.items()) + list(SMUGGLE.items()):
    for setup in (0, 1, 2, 4, 8):
        out = bytearray([setup])
        for step in steps:
            b = line(step[1])[:255]
            out += bytes([0 if step[0] == C else 3, len(b)]) + b
            if len(step) > 2:
                out.append(1)
        # The data connection connects and completes.
        out += bytes([6, 0, 7, 0])
        write("differential", f"{name}_{setup}", bytes(out))

# ctnetlink: conntrack messages as the kernel sends them (nlmsghdr in host
# byte order, x86), after linux/netfilter/nfnetlink_conntrack.h.
import ipaddress
import struct


def nla(kind, payload, nested=False):
    head = struct.pack("=HH", 4 + len(payload), kind | (0x8000 if nested else 0))
    return head + payload + b"\0" * (-len(payload) % 4)


def ct_tuple(src, dst, sport, dport):
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    base = 1 if s.version == 4 else 3
    ip = nla(base, s.packed) + nla(base + 1, d.packed)
    proto = nla(1, bytes([6])) + nla(2, struct.pack(">H", sport)) + nla(3, struct.pack(">H", dport))
    return nla(1, ip, True) + nla(2, proto, True)


def ct_msg(msg, seq, orig, reply, state=None, counters=None, flags=0, ct_id=None):
    family = 2 if ipaddress.ip_address(orig[0]).version == 4 else 10
    body = struct.pack("=BBH", family, 0, 0)
    body += nla(1, ct_tuple(*orig), True) + nla(2, ct_tuple(*reply), True)
    if state is not None:
        body += nla(4, nla(1, nla(1, bytes([state])), True), True)
    for kind, n in zip((9, 10), counters or ()):
        body += nla(kind, nla(1, struct.pack(">Q", 3)) + nla(2, struct.pack(">Q", n)), True)
    if ct_id is not None:
        body += nla(12, struct.pack(">I", ct_id))  # CTA_ID
    return struct.pack("=IHHII", 16 + len(body), (1 << 8) | msg, flags, seq, 0) + body


def nl_msg(kind, seq, payload):
    return struct.pack("=IHHII", 16 + len(payload), kind, 0, seq, 0) + payload


V4 = (("198.51.100.2", "192.0.2.1", 50000, 40001), ("10.71.2.2", "10.71.2.1", 30000, 50000))
V6 = (("2001:db8:100::2", "2001:db8::1", 50001, 40002), ("fd71:2::2", "fd71:2::1", 30000, 50001))
write("ctnetlink", "new_v4", ct_msg(0, 0, *V4, state=1))
write("ctnetlink", "update_destroy_v6", ct_msg(0, 0, *V6, state=4) + ct_msg(2, 0, *V6, state=7, counters=(180, 1050000)))
write("ctnetlink", "dump_done", ct_msg(0, 9, *V4, state=3, counters=(60, 60)) + nl_msg(3, 9, b"\0" * 4))
# A SYN from a fixed port 20 reuses a TIME_WAIT entry's tuple: the kernel's
# destroy of the old entry, then the NEW event (NLM_F_CREATE | NLM_F_EXCL).
FIXED = (("10.71.2.2", "10.71.2.1", 20, 41000), ("198.51.100.2", "192.0.2.1", 50000, 20))
write("ctnetlink", "reuse_destroy_new_v4",
      ct_msg(2, 0, *FIXED, state=7, counters=(1050000, 180), ct_id=0xDEADBEEF)
      + ct_msg(0, 0, *FIXED, state=1, flags=0x600, ct_id=0xDEADBEEF))
write("ctnetlink", "error_enoent", nl_msg(2, 4, struct.pack("=i", -2) + b"\0" * 16))
