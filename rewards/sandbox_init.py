"""First program inside the sandbox (rewards/sandbox.py): set the limits, then run the untrusted program.

Runs under the system python, standard library only, never imports this project: bubblewrap copies
this file into the sandbox as /sandbox/init.py and starts

    python3 -I /sandbox/init.py '<limits as JSON>' /sandbox/main.py

It closes every inherited descriptor above stderr, lowers its priority (`nice`), sets every rlimit
soft = hard (an unprivileged process cannot raise a hard limit again), then runs the program as
`__main__` in this same interpreter (`runpy.run_path`, with `sys.argv = [program]`): one interpreter
start instead of two (an `execv` of a second python cost ~15 ms per execution). A traceback is
printed from the program's first frame on, so it reads as if the program had been run directly.

RLIMIT_NPROC is set here, inside the sandbox's user namespace, and not before bubblewrap starts: the
kernel counts processes per (user namespace, uid), so the limit bounds this sandbox alone; set outside,
it would also count every other process of the host uid (a trainer's threads included).
"""
import json
import os
import resource
import runpy
import sys
import traceback


def main() -> None:
    limits, program = json.loads(sys.argv[1]), sys.argv[2]
    os.closerange(3, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    os.nice(limits["nice"])
    for name, value in limits["rlimits"].items():
        resource.setrlimit(getattr(resource, name), (value, value))
    sys.argv = [program]
    try:
        runpy.run_path(program, run_name="__main__")
    except SystemExit:
        raise
    except BaseException as exc:  # print it without our frames, as python would for the program alone
        tb = exc.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename != program:
            tb = tb.tb_next
        traceback.print_exception(type(exc), exc, tb)
        sys.exit(1)


if __name__ == "__main__":
    main()
