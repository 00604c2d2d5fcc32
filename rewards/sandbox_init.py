"""First program inside the sandbox (rewards/sandbox.py): set the limits, then exec the untrusted program.

Runs under the system python (`python3 -I -S`, standard library only, never imports this project):
bubblewrap copies this file into the sandbox as /sandbox/init.py and starts

    python3 -I -S /sandbox/init.py '<limits as JSON>' /usr/bin/python3 /sandbox/main.py

It lowers its priority (`nice`), sets every rlimit soft = hard (an unprivileged process cannot raise
a hard limit again), closes every inherited descriptor above stderr, and `execv`s the program, which
so starts in a fresh interpreter with all limits in force and nothing of this launcher left.

RLIMIT_NPROC is set here, inside the sandbox's user namespace, and not before bubblewrap starts: the
kernel counts processes per (user namespace, uid), so the limit bounds this sandbox alone; set outside,
it would also count every other process of the host uid (a trainer's threads included).
"""
import json
import os
import resource
import sys


def main() -> None:
    limits = json.loads(sys.argv[1])
    os.closerange(3, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    os.nice(limits["nice"])
    for name, value in limits["rlimits"].items():
        resource.setrlimit(getattr(resource, name), (value, value))
    os.execv(sys.argv[2], sys.argv[2:])


if __name__ == "__main__":
    main()
