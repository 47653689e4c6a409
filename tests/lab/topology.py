"""Network namespaces, links, addresses and the edge firewall of the lab.

Every namespace name starts with a per-run prefix (``fgl<pid>x<random>-``) so that
concurrent runs never collide; ``cleanup_stale`` removes what interrupted runs left.
Links are routed veth pairs, one per host, created straight inside the namespaces
(no interface ever exists in the host's namespace, so their names cannot collide).
"""

import os
import re
import secrets
import signal
import subprocess
import time

PREFIX_FAMILY = "fgl"
PREFIX_RE = re.compile(r"^fgl(\d+)x([0-9a-f]+)-")

# Host -> (edge interface, edge v4, host v4, edge v6, host v6, prefix lengths 24 / 64).
LINKS = {
    "lanc": ("lanc", "10.71.1.1", "10.71.1.2", "fd71:1::1", "fd71:1::2"),
    "lans": ("lans", "10.71.2.1", "10.71.2.2", "fd71:2::1", "fd71:2::2"),
    "wanc": ("wanc", "198.51.100.1", "198.51.100.2", "2001:db8:100::1", "2001:db8:100::2"),
    "wans": ("wans", "203.0.113.1", "203.0.113.2", "2001:db8:113::1", "2001:db8:113::2"),
}
LAN_IFS = ("lanc", "lans")
WAN_IFS = ("wanc", "wans")
# The edge's one public address, on its loopback: DNAT target for WAN clients and
# the source address of everything the LAN sends to the WAN (source NAT).
PUBLIC_V4 = "192.0.2.1"
PUBLIC_V6 = "2001:db8::1"
LAN_V4_NET = "10.71.0.0/16"
LAN_V6_NET = "fd71::/16"
FW_TABLE = "lab"


def run(cmd, check=True, timeout=30, input_text=None):
    """Runs a command, returns CompletedProcess; raises with stderr on failure."""
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, input=input_text)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: exit {proc.returncode}: {proc.stderr.strip()}")
    return proc


def host_addr(host, family):
    link = LINKS[host]
    return link[2] if family == 4 else link[4]


def edge_addr(host, family):
    link = LINKS[host]
    return link[1] if family == 4 else link[3]


def public_addr(family):
    return PUBLIC_V4 if family == 4 else PUBLIC_V6


def url_host(addr):
    return f"[{addr}]" if ":" in addr else addr


def netns_list():
    proc = run(["ip", "netns", "list"], check=False)
    return [line.split()[0] for line in proc.stdout.splitlines() if line.strip()]


def kill_netns_pids(ns):
    """Kills every process left inside a namespace (deleting it would not)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = [int(p) for p in run(["ip", "netns", "pids", ns], check=False).stdout.split()]
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            if not run(["ip", "netns", "pids", ns], check=False).stdout.split():
                return
            time.sleep(0.05)


def delete_netns(ns):
    kill_netns_pids(ns)
    run(["ip", "netns", "del", ns], check=False)


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cleanup_stale(all_runs=False):
    """Deletes lab namespaces whose run is gone (or all of them with all_runs)."""
    removed = []
    for ns in netns_list():
        m = PREFIX_RE.match(ns)
        if not m:
            continue
        if not all_runs and _pid_alive(int(m.group(1))) and int(m.group(1)) != os.getpid():
            continue
        delete_netns(ns)
        removed.append(ns)
    return removed


class Lab:
    """The namespaces of one run and the commands to act inside them."""

    HOSTS = ("edge", "lanc", "lans", "wanc", "wans")

    def __init__(self):
        self.prefix = f"{PREFIX_FAMILY}{os.getpid()}x{secrets.token_hex(3)}-"
        self.created = []

    def ns(self, host):
        return self.prefix + host

    def cmd(self, host, argv):
        return ["ip", "netns", "exec", self.ns(host)] + list(argv)

    def run(self, host, argv, **kw):
        return run(self.cmd(host, argv), **kw)

    def nft(self, script):
        """Loads an nft script into the edge namespace."""
        return run(self.cmd("edge", ["nft", "-f", "-"]), input_text=script)

    def up(self, ipv6=True):
        for host in self.HOSTS:
            run(["ip", "netns", "add", self.ns(host)])
            self.created.append(self.ns(host))
            self.run(host, ["ip", "link", "set", "lo", "up"])
        edge = self.ns("edge")
        self.run("edge", ["sysctl", "-qw", "net.ipv4.ip_forward=1"])
        self.run("edge", ["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"])
        self.run("edge", ["ip", "addr", "add", f"{PUBLIC_V4}/32", "dev", "lo"])
        self.run("edge", ["ip", "-6", "addr", "add", f"{PUBLIC_V6}/128", "dev", "lo", "nodad"])
        for host, (eif, e4, h4, e6, h6) in LINKS.items():
            hns = self.ns(host)
            run(["ip", "-n", edge, "link", "add", eif, "type", "veth", "peer", "name", "eth0", "netns", hns])
            self.run("edge", ["ip", "addr", "add", f"{e4}/24", "dev", eif])
            self.run("edge", ["ip", "-6", "addr", "add", f"{e6}/64", "dev", eif, "nodad"])
            self.run("edge", ["ip", "link", "set", eif, "up"])
            self.run(host, ["ip", "addr", "add", f"{h4}/24", "dev", "eth0"])
            self.run(host, ["ip", "-6", "addr", "add", f"{h6}/64", "dev", "eth0", "nodad"])
            self.run(host, ["ip", "link", "set", "eth0", "up"])
            self.run(host, ["ip", "route", "add", "default", "via", e4])
            self.run(host, ["ip", "-6", "route", "add", "default", "via", e6])
        self.nft(firewall_script())

    def add_host(self, host):
        """One more namespace of this run (beyond HOSTS), torn down with the rest."""
        run(["ip", "netns", "add", self.ns(host)])
        self.created.append(self.ns(host))
        self.run(host, ["ip", "link", "set", "lo", "up"])

    def link(self, a, a_if, a_addr, b, b_if, b_addr):
        """A routed veth pair between two of this run's namespaces: `a_if` in `a`
        with `a_addr` (CIDR), `b_if` in `b` with `b_addr`, both up. Made inside
        `a`, so no name ever exists in the host's namespace."""
        run(["ip", "-n", self.ns(a), "link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", self.ns(b)])
        for host, ifname, addr in ((a, a_if, a_addr), (b, b_if, b_addr)):
            self.run(host, ["ip", "addr", "add", addr, "dev", ifname])
            self.run(host, ["ip", "link", "set", ifname, "up"])

    def down(self):
        for ns in reversed(self.created):
            delete_netns(ns)
        self.created = []

    def flush_target_chains(self):
        self.nft("".join(f"flush chain inet {FW_TABLE} {c}\n" for c in TARGET_CHAINS))


TARGET_CHAINS = ("tgt_mangle", "tgt_dnat", "tgt_input", "tgt_forward")


def nft_set(items):
    return "{ " + ", ".join(f'"{i}"' if isinstance(i, str) and not i[0].isdigit() else str(i) for i in items) + " }"


def firewall_script():
    """The edge's base firewall; targets add rules to the tgt_* chains only.

    The ct helper object lives here because a rule can only reference objects of its
    own table. Rejecting (instead of silently dropping) at the end of input and
    forward makes a blocked case fail at once rather than after a timeout; the
    policies stay drop.
    """
    from servers import CONTROL_PORTS

    ctl = ", ".join(str(p) for p in CONTROL_PORTS)
    lan = nft_set(LAN_IFS)
    wan = nft_set(WAN_IFS)
    lans_v4 = LINKS["lans"][2]
    lans_v6 = LINKS["lans"][4]
    return f"""
table inet {FW_TABLE} {{
    ct helper ftp-standard {{
        type "ftp" protocol tcp
        l3proto inet
    }}
    set ctl_ports {{ type inet_service; elements = {{ {ctl} }} }}
    chain tgt_mangle {{ }}
    chain tgt_dnat {{ }}
    chain tgt_input {{ }}
    chain tgt_forward {{ }}
    chain mangle_pre {{
        type filter hook prerouting priority mangle; policy accept;
        jump tgt_mangle
    }}
    chain nat_pre {{
        type nat hook prerouting priority dstnat; policy accept;
        jump tgt_dnat
        iifname {wan} ip daddr {PUBLIC_V4} tcp dport @ctl_ports dnat ip to {lans_v4}
        iifname {wan} ip6 daddr {PUBLIC_V6} tcp dport @ctl_ports dnat ip6 to {lans_v6}
    }}
    chain nat_post {{
        type nat hook postrouting priority srcnat; policy accept;
        oifname {wan} ip saddr {LAN_V4_NET} snat ip to {PUBLIC_V4}
        oifname {wan} ip6 saddr {LAN_V6_NET} snat ip6 to {PUBLIC_V6}
    }}
    chain input {{
        type filter hook input priority filter; policy drop;
        iif lo accept
        ct state established,related accept
        ct state invalid drop
        meta l4proto {{ icmp, ipv6-icmp }} accept
        jump tgt_input
        meta l4proto tcp reject with tcp reset
    }}
    chain forward {{
        type filter hook forward priority filter; policy drop;
        ct state established,related accept
        ct state invalid drop
        meta l4proto {{ icmp, ipv6-icmp }} accept
        iifname {lan} ct state new accept
        iifname {wan} oifname "lans" ct status dnat tcp dport @ctl_ports accept
        jump tgt_forward
        meta l4proto tcp reject with tcp reset
    }}
}}
"""
