"""Start one process per GPU of this machine for a script that builds ``NcclComm.from_env()``::

    python -m cupyflash.distributed.launch --nproc 2 script.py args...

Process r runs ``python script.py args...`` with ``RANK=r``, ``LOCAL_RANK=r``, ``WORLD_SIZE=N``
and ``CUPYFLASH_RENDEZVOUS`` (the ``host:port`` of a key-value server this launcher holds for the
job on 127.0.0.1), and shares this terminal. When a process fails, the others are stopped (they
would wait for it for ever inside NCCL); the exit status is that of the first failure, 0 when all
succeed. Stopping the launcher (Ctrl-C, SIGTERM as from ``timeout``) stops every process first.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time

from . import _rendezvous


def _stop(procs):
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _exit_status(code):
    """A process killed by signal N (Popen gives -N) exits as a shell reports it, 128 + N."""
    return code if code > 0 else 128 - code


def _supervise(procs, stopped_by):
    """Wait for every process; stop the rest at the first failure. Returns the exit status: the first
    failure's, 0 when all succeed, or 128 + N once the launcher has received signal N (stopped_by)."""
    while True:
        if stopped_by:
            return 128 + stopped_by[0]
        codes = [p.poll() for p in procs]
        failures = [c for c in codes if c not in (None, 0)]
        if failures:
            _stop(procs)
            return _exit_status(failures[0])
        if all(c == 0 for c in codes):
            return 0
        time.sleep(0.05)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cupyflash.distributed.launch",
                                     description="Start one process per GPU for a script using NcclComm.from_env().")
    parser.add_argument("--nproc", type=int, required=True, help="number of processes (GPUs 0 ... N-1)")
    parser.add_argument("script", help="the Python script each process runs")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments of the script")
    args = parser.parse_args(argv)
    if args.nproc < 1:
        parser.error(f"--nproc must be at least 1, got {args.nproc}")
    server = _rendezvous.Server()
    procs = []
    # Ctrl-C and SIGTERM (as from `timeout`) are noted, not raised: an exception raised wherever the signal
    # lands (inside Popen.poll, holding its wait lock) could leave the ranks unreaped or the cleanup hung.
    stopped_by = []
    main_thread = threading.current_thread() is threading.main_thread()  # where signal handlers go
    previous = {s: signal.signal(s, lambda signum, frame: stopped_by.append(signum))
                for s in (signal.SIGINT, signal.SIGTERM)} if main_thread else {}
    try:
        for rank in range(args.nproc):
            env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(args.nproc))
            env[_rendezvous.ENV] = server.address
            procs.append(subprocess.Popen([sys.executable, args.script, *args.args], env=env))
        return _supervise(procs, stopped_by)
    finally:
        _stop(procs)
        server.close()
        for s, handler in previous.items():
            if handler is not None:  # None: a handler not installed from Python, which cannot be restored
                signal.signal(s, handler)


if __name__ == "__main__":
    sys.exit(main())
