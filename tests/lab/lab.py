#!/usr/bin/env python3
"""ftpgate lab: real FTP servers and clients in network namespaces, behind a real
nftables edge, comparing targets (none, kernel, suse, ftpgate) case by case.

Run as root. See tests/lab/README.md for the topology and the commands.
"""

import argparse
import concurrent.futures
import os
import sys
import threading

sys.dont_write_bytecode = True  # keep the source tree clean when run from a checkout
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import certs  # noqa: E402
import clients  # noqa: E402
import prologue  # noqa: E402
import servers  # noqa: E402
import targets  # noqa: E402
import topology  # noqa: E402

SCENARIOS = ("outbound", "inbound")
# FTPS is reverse mode only (the gateway's TLS listeners name their upstream), and
# SuSE's ftp-proxy has no TLS.
FTPS_SCENARIOS = ("inbound",)
FTPS_TARGETS = ("none", "kernel", "ftpgate")
# Pairs left out of the FTPS matrix for every target, for a bug of theirs: curl
# starts data TLS before it sends the transfer command, and Debian's pyftpdlib
# 1.5.7 resets such a data connection (pyftpdlib #604, fixed in 1.5.8).
FTPS_SERVER_BUGS = {("pyftpdlib", "curl")}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    csv = lambda s: [x for x in s.split(",") if x]  # noqa: E731
    p.add_argument("--targets", type=csv, default=None)
    p.add_argument("--scenarios", type=csv, default=None)
    p.add_argument("--servers", type=csv, default=None)
    p.add_argument("--ftps", action="store_true",
                   help="the FTPS cases: servers in TLS mode, FTPS clients, inbound, targets none/kernel/ftpgate")
    p.add_argument("--clients", type=csv, default=[], help="tools (curl,lftp,python) or variants (curl-epsv)")
    p.add_argument("--ipv6", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--backend", choices=("relay", "nftables"), default="relay")
    p.add_argument("--ftpgate-bin", default=os.environ.get("FTPGATE_BIN"))
    p.add_argument("-j", "--jobs", type=int, default=4, help="cases run at once")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("--cleanup", action="store_true", help="delete namespaces left by earlier runs, then exit")
    p.add_argument("--cleanup-all", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--check", action="store_true", help="report missing prerequisites, then exit")
    args = p.parse_args(argv)
    if args.ftps:
        known = (FTPS_TARGETS, FTPS_SCENARIOS, servers.ALL_SERVERS)
    else:
        known = (targets.TARGETS, SCENARIOS, servers.SERVERS)
    for kind, known_ in zip(("targets", "scenarios", "servers"), known):
        if getattr(args, kind) is None:
            setattr(args, kind, list(known_))
        unknown = [x for x in getattr(args, kind) if x not in known_]
        if unknown:
            p.error(f"unknown {kind}{' with --ftps' if args.ftps else ''}: {', '.join(unknown)}")
    args.variants = clients.select(args.clients, args.ftps)
    args.pki = None  # FTPS: the run's certs.Pki, made once the work directory exists
    return args


def missing_prerequisites(args):
    missing = prologue.missing_basics(("ip", "nft", "ss", "curl", "lftp"))
    missing += servers.missing_prerequisites()
    if args.ftps:
        missing += certs.missing_prerequisites() + servers.missing_tls_prerequisites()
    missing += targets.missing_prerequisites(args.targets)
    if "ftpgate" in args.targets and not prologue.has_binary(args.ftpgate_bin):
        missing.append("ftpgate binary (FTPGATE_BIN)")
    return missing


def cases_for(args, target):
    for scenario in args.scenarios:
        for server in args.servers:
            for v in args.variants:
                # Implicit-TLS clients meet implicit servers, explicit ones the others.
                if v.implicit != (server in servers.IMPLICIT_SERVERS):
                    continue
                if args.ftps and (server, v.tool) in FTPS_SERVER_BUGS:
                    continue
                for family in v.families:
                    if family == 6 and not args.ipv6:
                        continue
                    yield scenario, server, v, family


def run_target(args, lab, workdir, target, payload_digest, up_src):
    results = []
    try:
        target.setup()
    except Exception as exc:
        print(f"lab: {target.name}: setup failed: {exc}", flush=True)
        target.teardown()
        lab.flush_target_chains()
        for scenario, server, v, family in cases_for(args, target):
            label = f"{target.name} {scenario} {server} {v.name} v{family}"
            print(f"{label}: FAIL {target.name} setup failed", flush=True)
            results.append((label, "setup failed"))
        return results

    # Debian's pyftpdlib (one asyncore loop) stalls for seconds when several
    # sessions transfer at once, whatever sits in the path (the kernel helper
    # shows it too), so its cases run one at a time per server instance.
    serial = {key: threading.Lock() for key in
              [(sc, "pyftpdlib") for sc in ("inbound", "outbound")]}

    def one(case):
        scenario, server, v, family = case
        label = f"{target.name} {scenario} {server} {v.name} v{family}"
        client, addr, port = target.endpoint(scenario, server, family)
        slug = label.replace(" ", "_")
        outdir = os.path.join(workdir, "cases", slug)
        lock = serial.get((scenario, server))
        if lock:
            lock.acquire()
        try:
            mark = target.log_mark()
            ca = args.pki.ca if args.pki else None
            reason = clients.run_case(lab, client, v, addr, port, outdir, payload_digest, up_src, slug + ".bin", ca)
        finally:
            if lock:
                lock.release()
        log = target.log_tail(mark) if reason is not None and target.gating else ""
        return label, reason, log

    try:
        cases = list(cases_for(args, target))
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            for label, reason, log in pool.map(one, cases):
                results.append((label, reason))
                if reason is None:
                    print(f"{label}: ok", flush=True)
                else:
                    print(f"{label}: FAIL {reason}", flush=True)
                    if log:
                        print("    | " + log.replace("\n", "\n    | "), flush=True)
    finally:
        target.teardown()
        lab.flush_target_chains()
    return results


def main(argv):
    args = parse_args(argv)
    if args.cleanup or args.cleanup_all:
        removed = topology.cleanup_stale(all_runs=args.cleanup_all)
        print(f"lab: removed {len(removed)} namespaces" + (f": {' '.join(removed)}" if removed else ""))
        return 0
    code = prologue.verdict("lab", missing_prerequisites(args), args.check)
    if code is not None:
        return code
    prologue.absolute_bin(args)
    teardown, workdir, lab = prologue.start("lab", keep=args.keep)
    summaries = []
    gating_failed = 0
    try:
        lab.up()
        print(f"lab: namespaces {lab.prefix}*, work dir {workdir}", flush=True)
        payload, digest = servers.new_payload()
        hosts = ("lans", "wans")
        if args.ftps:
            args.pki = certs.make(os.path.join(workdir, "pki"))
            hosts = ("lans",) if args.scenarios == ["inbound"] else hosts
        running = servers.start_all(lab, workdir, args.servers, payload, args.pki, hosts)
        teardown.actions.append(lambda: [s.stop() for s in running.values()])
        up_src = os.path.join(workdir, "upload-src.bin")
        with open(up_src, "wb") as f:
            f.write(os.urandom(256 * 1024))
        os.chmod(up_src, 0o644)
        for name in args.targets:
            target = targets.TARGETS[name](lab, workdir, args)
            results = run_target(args, lab, workdir, target, digest, up_src)
            failed = sum(1 for _, r in results if r is not None)
            summaries.append(f"{name}: {len(results) - failed} passed, {failed} failed")
            if target.gating:
                gating_failed += failed
    finally:
        teardown()
    for line in summaries:
        print(line)
    return 1 if gating_failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
