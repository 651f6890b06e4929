"""Child processes (quantization, evaluation, generation) that never outlive the reap-fast process
that started them.

Each child runs in its own process group, which is terminated when the parent leaves the call for any
reason (error, Ctrl-C, SIGTERM turned into ``SystemExit``). On Linux the child also asks the kernel for
SIGTERM when its parent dies (``prctl(PR_SET_PDEATHSIG)``), which covers a parent killed with SIGKILL.
A child started here turns SIGTERM into ``SystemExit`` (:func:`exit_on_sigterm`), so its ``finally``
blocks remove its temporary files.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import subprocess
import sys
from typing import Any, Callable, Sequence

PR_SET_PDEATHSIG = 1
PARENT_ENV = "REAP_FAST_PARENT_PID"
TERMINATE_GRACE_SECONDS = 10.0


def _parent_death_hook() -> Callable[[], None] | None:
    """A function for ``preexec_fn`` that sets PR_SET_PDEATHSIG (resolved here, before any fork)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def hook() -> None:
        prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the request took effect
            os._exit(1)

    return hook


def _terminate_group(process: subprocess.Popen) -> None:
    """SIGTERM the child's process group, then SIGKILL it if it lingers."""
    if process.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, TERMINATE_GRACE_SECONDS), (signal.SIGKILL, None)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_child(
    argv: Sequence[str], env: dict[str, str] | None = None, timeout: float | None = None, capture_output: bool = False
) -> subprocess.CompletedProcess:
    """``subprocess.run`` for a child that dies with this process (see the module docstring)."""
    child_env = dict(os.environ if env is None else env)
    child_env[PARENT_ENV] = str(os.getpid())
    pipe = subprocess.PIPE if capture_output else None
    process = subprocess.Popen(
        list(argv), env=child_env, stdout=pipe, stderr=pipe, text=True, start_new_session=True,
        preexec_fn=_parent_death_hook(),
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except BaseException:
        _terminate_group(process)
        raise
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def exit_on_sigterm() -> None:
    """Turn SIGTERM into ``SystemExit(143)`` so cleanup code runs (call at a child's start)."""

    def handler(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)
