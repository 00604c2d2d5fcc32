"""First program inside the sandbox (rewards/sandbox.py): set the limits, then run the untrusted program.

Runs under the system python, standard library only, never imports this project: bubblewrap copies
this file into the sandbox as /sandbox/init.py and starts

    python3 -I /sandbox/init.py 'nice=5,RLIMIT_CPU=11,RLIMIT_AS=...' /sandbox/main.py

It closes every inherited descriptor above stderr, lowers its priority (`nice`), sets every rlimit
soft = hard (an unprivileged process cannot raise a hard limit again), then runs the program as
`__main__` in this same interpreter (compiled from its file and executed in a fresh `__main__`
module, `sys.argv = [program]`): one interpreter start instead of two (an `execv` of a second python
cost ~15 ms per execution). Only modules the interpreter has already loaded at start are imported on
the way (no json, runpy or traceback: they cost ~10-20 ms of imports per execution, a third of the
sandbox's overhead); a traceback is formatted only when the program fails, from its first frame on,
so it reads as if the program had been run directly.

RLIMIT_NPROC is set here, inside the sandbox's user namespace, and not before bubblewrap starts: the
kernel counts processes per (user namespace, uid), so the limit bounds this sandbox alone; set outside,
it would also count every other process of the host uid (a trainer's threads included).
"""
import os
import resource
import sys


def main() -> None:
    limits = dict(item.split("=") for item in sys.argv[1].split(","))
    program = sys.argv[2]
    os.closerange(3, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    os.nice(int(limits.pop("nice")))
    for name, value in limits.items():
        resource.setrlimit(getattr(resource, name), (int(value), int(value)))
    sys.argv = [program]
    module = type(sys)("__main__")  # a fresh module, as `python program.py` gives the program
    module.__file__ = program
    module.__builtins__ = __builtins__
    sys.modules["__main__"] = module
    try:
        with open(program, "rb") as f:
            code = compile(f.read(), program, "exec")
        exec(code, module.__dict__)
    except SystemExit:
        raise
    except BaseException as exc:  # print it without our frames, as python would for the program alone
        import traceback

        tb = exc.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename != program:
            tb = tb.tb_next
        traceback.print_exception(type(exc), exc, tb)
        sys.exit(1)


if __name__ == "__main__":
    main()
