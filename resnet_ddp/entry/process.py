"""Process-level behaviour every launch mode shares: how a stop signal ends a process before training, dying
with the launcher, starting a helper process, and a quick exit.

Before any rank is running, SIGTERM and SIGINT end the process at once with
128 + the signal (nothing needs saving yet). A handler is installed, not left to
the default action, because a process that is PID 1 of a container (the launcher,
in a pod) ignores a signal it has no handler for. A training rank, which is never
PID 1, leaves them at the default action until its stop agreement takes over, so
that a signal also ends it inside a blocking call (a rendezvous that waits in C++).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import threading
from typing import List, NoReturn, Optional

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_PR_SET_PDEATHSIG = 1
_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _exit_at_once(signum, _frame) -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(128 + signum)


def exit_on_stop_signals() -> None:
    """From here until a launcher or a stop agreement takes over: a stop signal ends this process at once."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, _exit_at_once)


def default_stop_signals() -> None:
    """A rank before its stop agreement: the kernel ends it on a stop signal, wherever it is; one that came while
    the launcher started it (stop_signals_held) ends it now."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


@contextlib.contextmanager
def stop_signals_held():
    """Stop signals wait inside: they are blocked, and a process started inside starts with them blocked too.

    A signal forwarded to a rank while Python starts it would meet Python's own SIGINT handler (a
    KeyboardInterrupt traceback) or go unforwarded (the launcher does not know the rank's pid yet). Held, the
    launcher forwards it as soon as the start returns, and the rank takes it in default_stop_signals().
    """
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def stop_signal_pending() -> bool:
    """Whether a stop signal waits here, held (stop_signals_held)."""
    return bool(signal.sigpending() & set(STOP_SIGNALS))


def die_with_parent(expected_parent: Optional[int] = None) -> None:
    """Have the kernel SIGKILL this process when its parent dies (Linux), so that no rank, and no DataLoader
    worker, outlives a launcher that was killed. The parent may have died before this call: then exit now."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: nothing to set
        return
    if expected_parent is not None and os.getppid() != expected_parent:
        os._exit(128 + signal.SIGKILL)


def die_with_elastic_agent() -> None:
    """die_with_parent for a worker of torchrun (or another elastic agent), as early as its first line.

    The worker cannot know the agent's pid. One whose parent is now PID 1, and PID 1 is no Python process
    (torchrun and every elastic agent are), was left by an agent that died before this call: it ends, where it
    would otherwise wait on the dead agent's store for --dist-timeout, holding the save dir.
    """
    die_with_parent()
    if os.getppid() == 1 and not may_be_an_agent(_command_line(1)):
        sys.stderr.write("resnet-ddp: torchrun, which started this worker, has died: ending\n")
        os._exit(128 + signal.SIGKILL)


def _command_line(pid: int) -> Optional[bytes]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return None


def may_be_an_agent(command_line: Optional[bytes]) -> bool:
    """Whether a process with this command line (NUL-separated, as /proc gives it) may be torchrun or another
    elastic agent: any Python process, or one we cannot see (then we assume the parent lives)."""
    if command_line is None:
        return True
    return any(b"python" in arg or b"torch" in arg for arg in command_line.split(b"\0")[:2])


def start_helper(module: str, args: List[str], environ, stdin: Optional[bytes] = None) -> subprocess.Popen:
    """`python -m module args...` beside this process, with `stdin` written to it. This package is importable
    there wherever the job was started from (train.py beside it, not installed); its output is dropped (a
    helper's failure shows in its exit code). OSError where it cannot start."""
    path = os.pathsep.join(p for p in (environ.get("PYTHONPATH"), _PACKAGE_ROOT) if p)
    helper = subprocess.Popen(
        [sys.executable, "-m", module, *args],
        env={**environ, "PYTHONPATH": path},
        stdin=subprocess.DEVNULL if stdin is None else subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    if stdin is not None:
        with helper.stdin:
            helper.stdin.write(stdin)  # far less than a pipe holds: never blocks
    return helper


def exit_process(code: int) -> NoReturn:
    """End this process once its work is done, without the interpreter's teardown.

    What a normal exit does for us still happens: other threads are waited for,
    atexit handlers run (multiprocessing's ends DataLoader workers) and output is
    flushed. Skipped is the clean-up of every module and object, which takes about
    a second per process once torch and torchvision are loaded: at the end of each
    rank, and again of the launcher.
    """
    # What the interpreter runs first at exit (not public): threading's exit hooks, which stop the idle
    # workers of every concurrent.futures pool (torch.compile keeps one), then a join of the other threads.
    # Joining them without those hooks waited forever on the pool's workers.
    threading._shutdown()
    atexit._run_exitfuncs()  # not public either, but the one way to run them before os._exit
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # closed, or a broken pipe: nothing more can be said
            stream.flush()
    os._exit(code)
