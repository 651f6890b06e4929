"""Child processes (quantization, evaluation, generation) that never outlive the reap-fast process
that started them, the one way they are asked for work, and the one way their failures come back.

Each child runs in its own process group, which is terminated when the parent leaves the call for any
reason (error, Ctrl-C, SIGTERM turned into ``SystemExit``). On Linux the child also asks the kernel for
SIGTERM when its parent dies (``prctl(PR_SET_PDEATHSIG)``), which covers a parent killed with SIGKILL.
A child started here turns SIGTERM into ``SystemExit`` (:func:`sigterm_raises_system_exit`, which the
``reap-fast`` command uses too), so its ``finally`` blocks remove its temporary files.

Request: the parent writes what a child is to do as one JSON file (:func:`write_request`) and starts
``python -m MODULE REQUEST.json`` (:func:`child_argv`); the child reads it with :func:`read_request`.

Error protocol (:func:`call_child` in the parent, :func:`child_main` in the child): the parent names a
file in the environment variable ``REAP_FAST_CHILD_ERROR_FILE``; a child that stops on an exception
writes one JSON record there, ``{"kind": "user" | "bug", "type": class name, "message": one line,
"exit_code": N}``, and exits with ``N``. In the parent, a :class:`~reap_fast.errors.ReapFastError` of the child comes back as the
caller's own ReapFastError subclass with the same one line and exit code; anything else (an exception
that is a bug, or a crash that wrote no record) raises :class:`ChildCrashed`: "... crashed with exit N",
followed by the last lines of the child's stderr (its stderr still reaches the terminal as it comes).
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import ctypes.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from .errors import EXIT_CANNOT_WRITE, ReapFastError, one_line
from .fileio import atomic_write_json
from .outputs import LOCATION_ERRNOS, describe_os_error

PR_SET_PDEATHSIG = 1
PARENT_ENV = "REAP_FAST_PARENT_PID"
ERROR_FILE_ENV = "REAP_FAST_CHILD_ERROR_FILE"
TERMINATE_GRACE_SECONDS = 10.0
TEE_DRAIN_SECONDS = 5.0
STDERR_TAIL_LINES = 15
_STDERR_TAIL_BYTES = 16384
EXIT_BUG = 1  # Python's own exit status for an uncaught exception


class ChildCrashed(RuntimeError):
    """A child failed on a bug or crashed: its exit code and the last lines of its stderr (not a user error)."""


@dataclass(frozen=True)
class ErrorRecord:
    """What a failed child writes to the parent's error file.

    ``kind`` is ``"user"`` for a :class:`~reap_fast.errors.ReapFastError` (input or situation) and ``"bug"``
    for any other exception; ``type`` is the exception's class name, ``message`` one line.
    """

    kind: str
    type: str
    message: str
    exit_code: int

    @classmethod
    def read(cls, path: Path) -> "ErrorRecord | None":
        """The record in ``path``; None when the child wrote none (or died while writing it)."""
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return cls(str(data["kind"]), str(data["type"]), str(data["message"]), int(data["exit_code"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def write(self, path: str | os.PathLike) -> None:
        """Write the record atomically (a reader never sees half of it)."""
        atomic_write_json(asdict(self), path)


# `python -m package.module` of a module its package already imported warns "found in sys.modules" (runpy):
# harmless for our children, which are always started that way.
QUIET_RUNPY = ("-W", "ignore::RuntimeWarning:runpy")


def write_request(folder: str | os.PathLike, request: dict[str, Any]) -> Path:
    """Write a child's request as ``folder/request.json`` (atomically); returns the file's path."""
    return atomic_write_json(request, Path(folder) / "request.json")


def child_argv(module: str, request_file: str | os.PathLike, python: str | None = None) -> list[str]:
    """The command line ``python -m module REQUEST.json`` (``python``: this interpreter by default)."""
    return [python or sys.executable, *QUIET_RUNPY, "-m", module, str(request_file)]


def read_request(argv: Sequence[str] | None, prog: str, description: str) -> dict[str, Any]:
    """The request of a child: its one argument names the JSON file :func:`write_request` wrote."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("request", help="the JSON request file written by the parent process")
    return json.loads(Path(parser.parse_args(argv).request).read_text(encoding="utf-8"))


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


class _StderrTee(threading.Thread):
    """Copies a child's stderr to this process's stderr (fd 2) as it comes, keeping its last bytes."""

    def __init__(self, stream: Any) -> None:
        super().__init__(daemon=True)
        self.stream = stream
        self.tail: collections.deque[bytes] = collections.deque()
        self.kept = 0

    def run(self) -> None:
        fd = self.stream.fileno()
        while chunk := os.read(fd, 8192):
            try:
                os.write(2, chunk)
            except OSError:
                pass
            self.tail.append(chunk)
            self.kept += len(chunk)
            while self.kept - len(self.tail[0]) >= _STDERR_TAIL_BYTES:
                self.kept -= len(self.tail.popleft())

    def text(self) -> str:
        return b"".join(self.tail).decode("utf-8", errors="replace")


def run_child(
    argv: Sequence[str], env: dict[str, str] | None = None, timeout: float | None = None, capture_output: bool = False
) -> subprocess.CompletedProcess:
    """``subprocess.run`` for a child that dies with this process (see the module docstring).

    Without ``capture_output`` the child's stdout is this process's and its stderr is copied to this
    process's stderr as it comes; the returned ``stderr`` then holds its last 16 KiB.
    """
    child_env = dict(os.environ if env is None else env)
    child_env[PARENT_ENV] = str(os.getpid())
    process = subprocess.Popen(
        list(argv), env=child_env, stdout=subprocess.PIPE if capture_output else None, stderr=subprocess.PIPE,
        text=capture_output, start_new_session=True, preexec_fn=_parent_death_hook(),
    )
    tee = None if capture_output else _StderrTee(process.stderr)
    try:
        if tee is None:
            stdout, stderr = process.communicate(timeout=timeout)
        else:
            tee.start()
            process.wait(timeout=timeout)
            tee.join(timeout=TEE_DRAIN_SECONDS)  # a grandchild may still hold the pipe open
            stdout, stderr = None, tee.text()
    except BaseException:
        _terminate_group(process)
        raise
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def call_child(
    argv: Sequence[str],
    error_type: type[ReapFastError],
    what: str,
    *,
    env: dict[str, str] | None = None,
    timeout: float | None = None,
    capture_output: bool = False,
) -> subprocess.CompletedProcess:
    """:func:`run_child` with the error protocol (module docstring); returns the child's result on exit 0.

    A ReapFastError of the child is raised here as ``error_type(f"{what} failed: {message}")`` with the
    child's exit code; any other failure raises :class:`ChildCrashed` naming ``what``.
    """
    child_env = dict(os.environ if env is None else env)
    with tempfile.TemporaryDirectory(prefix="reap-fast-child-") as scratch:
        error_file = Path(scratch) / "error.json"
        child_env[ERROR_FILE_ENV] = str(error_file)
        completed = run_child(argv, env=child_env, timeout=timeout, capture_output=capture_output)
        record = ErrorRecord.read(error_file)
    if completed.returncode == 0:
        return completed
    if record is not None and record.kind == "user":
        error = error_type(f"{what} failed: {record.message}")
        error.exit_code = record.exit_code
        raise error
    raise ChildCrashed(_crash_report(what, completed, record))


def _crash_report(what: str, completed: subprocess.CompletedProcess, record: ErrorRecord | None) -> str:
    code = completed.returncode
    status = f"signal {-code}" if code < 0 else f"exit {code}"
    lines = [f"{what} crashed with {status}" + (f": {record.message}" if record else "")]
    tail = [line for line in (completed.stderr or "").splitlines() if line.strip()][-STDERR_TAIL_LINES:]
    if tail:
        lines.append("last lines of its stderr:")
        lines.extend(f"  {line}" for line in tail)
    return "\n".join(lines)


def child_main(work: Callable[[], int | None], prog: str) -> int:
    """Run a child's ``work`` under the error protocol; returns the exit code for ``sys.exit``.

    SIGTERM becomes ``SystemExit`` (cleanup runs). A :class:`ReapFastError`, or an ``OSError`` of a full or
    read-only disk, is recorded (kind ``user``, its line and exit code), printed as ``PROG: error: LINE`` and
    its exit code returned; any other
    exception is recorded (kind ``bug``, exit code 1) and raised again, so its traceback reaches stderr.
    """
    restore_sigterm = sigterm_raises_system_exit()
    try:
        return work() or 0
    except ReapFastError as error:
        _record(ErrorRecord("user", type(error).__name__, str(error), error.exit_code))
        print(f"{prog}: error: {error}", file=sys.stderr)
        return error.exit_code
    except OSError as error:  # a full or read-only disk: the machine's state, reported as one line
        if error.errno not in LOCATION_ERRNOS:
            _record(ErrorRecord("bug", type(error).__name__, f"{type(error).__name__}: {one_line(error)}", EXIT_BUG))
            raise
        line = describe_os_error(error)
        _record(ErrorRecord("user", type(error).__name__, line, EXIT_CANNOT_WRITE))
        print(f"{prog}: error: {line}", file=sys.stderr)
        return EXIT_CANNOT_WRITE
    except Exception as error:
        _record(ErrorRecord("bug", type(error).__name__, f"{type(error).__name__}: {one_line(error)}", EXIT_BUG))
        raise
    finally:
        restore_sigterm()


def _record(record: ErrorRecord) -> None:
    path = os.environ.get(ERROR_FILE_ENV)
    if path:
        record.write(path)


def _raise_system_exit(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def sigterm_raises_system_exit() -> Callable[[], None]:
    """Turn SIGTERM into ``SystemExit(143)``, so ``finally`` blocks run (locks released, children stopped,
    temporary files removed); returns the function that puts the previous handler back."""
    previous = signal.signal(signal.SIGTERM, _raise_system_exit)
    return lambda: signal.signal(signal.SIGTERM, previous)
