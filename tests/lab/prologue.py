"""The start every lab script shares: the prerequisite check (and --check), the
ftpgate binary's path, and a teardown that runs on every way out (finally, atexit,
SIGINT/SIGTERM/SIGHUP) for the work directory and the lab's namespaces.
"""

import atexit
import os
import shutil
import signal
import sys
import tempfile

import topology


def missing_basics(tools=("ip", "nft", "ss")):
    """What every namespace run needs: root and the command-line tools `tools`."""
    missing = [] if os.geteuid() == 0 else ["root"]
    return missing + [tool for tool in tools if not shutil.which(tool)]


def has_binary(path):
    """Whether `path` (an --ftpgate-bin value, perhaps None) is an executable."""
    return bool(path and os.access(path, os.X_OK))


def verdict(name, missing, check_only):
    """With --check or anything missing, prints the verdict and returns the exit
    code (2: missing, 0: all present); None when the run goes on."""
    if not (check_only or missing):
        return None
    if missing:
        print(f"{name}: missing prerequisites: {', '.join(missing)}")
        return 2
    print(f"{name}: prerequisites present")
    return 0


def absolute_bin(args):
    """Makes args.ftpgate_bin absolute: targets run it from other directories."""
    if args.ftpgate_bin:
        args.ftpgate_bin = os.path.abspath(args.ftpgate_bin)


class Teardown:
    """Runs once, whichever of finally, atexit or a signal gets there first."""

    def __init__(self):
        self.actions = []
        self.done = False

    def __call__(self, *_):
        if self.done:
            return
        self.done = True
        for action in reversed(self.actions):
            try:
                action()
            except Exception as exc:  # keep tearing down the rest
                print(f"lab: teardown: {exc}", file=sys.stderr)


def on_signal(teardown):
    def handler(signum, _frame):
        teardown()
        print(f"lab: interrupted by signal {signum}", file=sys.stderr)
        os._exit(128 + signum)

    return handler


def start(name, keep=False, tmp_dir=None):
    """Arms the teardown, makes the work directory ftpgate-<name>-* (kept with
    `keep`; under `tmp_dir` if given) and the lab, not yet up, whose namespaces
    the teardown removes. Returns (teardown, workdir, lab)."""
    teardown = Teardown()
    atexit.register(teardown)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal(teardown))
    workdir = tempfile.mkdtemp(prefix=f"ftpgate-{name}-", dir=tmp_dir)
    os.chmod(workdir, 0o755)  # server processes run as ftp/nobody and need to enter it
    if not keep:
        teardown.actions.append(lambda: shutil.rmtree(workdir, ignore_errors=True))
    lab = topology.Lab()
    teardown.actions.append(lab.down)
    return teardown, workdir, lab
