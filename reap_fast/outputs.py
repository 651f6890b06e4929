"""Output folders and files: the contract every stage follows before writing, one lock per output,
and the cleanup of what killed runs left behind.

The contract (:func:`check_output`):

* an output never is, contains or lies inside one of the run's inputs (the model folder, the
  observation file), so replacing it can never touch them;
* an existing non-empty folder is replaced only with ``--overwrite`` and only when reap-fast wrote it
  (it carries :data:`MARKER_FILE`, or the metadata file of an earlier reap-fast version); a folder
  holding anything else is never deleted, with or without ``--overwrite``.

Locks (:class:`OutputLock`) are ``flock``-ed files beside the output (``.<name>.reap-fast.lock``)
holding the owner's pid: a second process is refused at once with "in use by pid N"; the kernel drops
the lock when its owner dies, so a stale lock file is simply taken over.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import re
import shutil
from contextlib import nullcontext
from pathlib import Path
from typing import Mapping

from .errors import ReapFastError

logger = logging.getLogger(__name__)

MARKER_FILE = ".reap-fast-output.json"
# Files that reap-fast versions before the marker wrote into their output folders.
LEGACY_MARKERS = ("reap_fast_quant.json", "pruned_experts.json", "pipeline.json")
OVERWRITE_FLAG = "--overwrite"
LOCK_SUFFIX = ".reap-fast.lock"
# Hidden working names made by work_prefix(): ".<output>.<kind>-p<pid>-<random>".
LEFTOVER_PATTERN = re.compile(r"^\.(?P<output>.+)\.(?:tmp|partial|ar-work|old|scratch)-p(?P<pid>\d+)-[\w.-]*$")


class OutputError(ReapFastError, FileExistsError):
    """An output that may not be written (it overlaps an input, or holds files reap-fast must keep)."""


class OutputInUseError(ReapFastError):
    """Another live reap-fast process holds the output's lock."""


def _resolved(path: str | os.PathLike) -> Path:
    return Path(path).expanduser().resolve()


def _is_within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_not_overlapping(output: str | os.PathLike, inputs: Mapping[str, str | os.PathLike | None]) -> None:
    """Refuse an output that is, contains or lies inside an existing input (``{"model folder": path}``)."""
    target = _resolved(output)
    for label, source in inputs.items():
        if source is None or not Path(source).expanduser().exists():
            continue  # a hub name, or a path checked elsewhere
        source_path = _resolved(source)
        if target == source_path:
            raise OutputError(f"the output {output} is the {label} {source}; choose another output")
        if _is_within(source_path, target):
            raise OutputError(f"the output {output} contains the {label} {source}; choose another output")
        if source_path.is_dir() and _is_within(target, source_path):
            raise OutputError(f"the output {output} is inside the {label} {source}; choose another output")


def written_by_reap_fast(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` carries reap-fast's marker (or an earlier version's metadata file)."""
    folder = Path(folder)
    return any((folder / name).is_file() for name in (MARKER_FILE, *LEGACY_MARKERS))


def check_output(
    output: str | os.PathLike,
    inputs: Mapping[str, str | os.PathLike | None] | None = None,
    overwrite: bool = False,
    flag: str = OVERWRITE_FLAG,
) -> Path:
    """Check that the folder ``output`` may be (re)written; returns it. See the module docstring."""
    path = Path(output).expanduser()
    check_not_overlapping(path, inputs or {})
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise OutputError(f"the output {output} exists and is not a folder; choose another output")
    if not path.is_dir() or not any(entry for entry in path.iterdir() if entry.name != MARKER_FILE):
        return path
    if not written_by_reap_fast(path):
        raise OutputError(
            f"the output folder {output} is not empty and was not written by reap-fast; "
            "it is never replaced (choose another output)"
        )
    if not overwrite:
        what = "a model" if any(path.glob("*.safetensors")) or (path / "config.json").exists() else "reap-fast output"
        raise OutputError(f"the output folder {output} already holds {what}; pass {flag} to replace it")
    return path


def check_output_file(
    output: str | os.PathLike,
    inputs: Mapping[str, str | os.PathLike | None] | None = None,
    overwrite: bool = False,
    flag: str = OVERWRITE_FLAG,
) -> Path:
    """The contract for a single output file (an observation ``.pt``)."""
    path = Path(output).expanduser()
    check_not_overlapping(path, inputs or {})
    if path.is_dir():
        raise OutputError(f"the output {output} is a folder; give a file name such as {path / 'observation.pt'}")
    if path.exists() and not overwrite:
        raise OutputError(f"{output} already exists; pass {flag} to replace it")
    return path


def write_marker(folder: str | os.PathLike, kind: str) -> None:
    """Mark ``folder`` as written by reap-fast (so ``--overwrite`` may replace it later)."""
    record = {"tool": "reap-fast", "kind": kind}  # no timestamp: equal runs give byte-identical folders
    (Path(folder) / MARKER_FILE).write_text(json.dumps(record) + "\n")
    apply_umask(Path(folder) / MARKER_FILE)


# --------------------------------------------------------------------------------------------------
# Locks
# --------------------------------------------------------------------------------------------------


def lock_path(output: str | os.PathLike) -> Path:
    """Where the lock of ``output`` lives: a hidden file beside it."""
    path = Path(output).expanduser().absolute()
    return path.parent / f".{path.name}{LOCK_SUFFIX}"


class OutputLock:
    """An exclusive, non-blocking lock on one output (``with OutputLock(path): ...``)."""

    def __init__(self, output: str | os.PathLike) -> None:
        self.output = Path(output)
        self.path = lock_path(output)
        self._fd: int | None = None

    def acquire(self) -> OutputLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                raise OutputInUseError(
                    f"{self.output} is in use by pid {self._owner() or 'unknown'} (another reap-fast process); "
                    "wait for it to finish or choose another output"
                ) from None
            # The previous owner may have removed the file between our open and flock: retry on the new one.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def _owner(self) -> int | None:
        try:
            return int(self.path.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc_info: object) -> None:
        self.release()


def output_lock(output: str | os.PathLike) -> OutputLock | nullcontext:
    """The output's lock; under torchrun only rank 0 (the writer) takes it, the other ranks share its work."""
    return OutputLock(output) if os.environ.get("RANK", "0") == "0" else nullcontext()


# --------------------------------------------------------------------------------------------------
# Leftovers of killed runs, permissions
# --------------------------------------------------------------------------------------------------


def work_prefix(output: str | os.PathLike, kind: str) -> str:
    """Name prefix of a hidden working file or folder of ``output`` (for mkstemp/mkdtemp): it names the
    owner's pid, so a later run can tell a killed run's leftover from a live run's work."""
    return f".{Path(output).name}.{kind}-p{os.getpid()}-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_leftovers(output: str | os.PathLike) -> list[Path]:
    """Remove the hidden working files and folders of ``output`` that killed reap-fast runs left; returns them.

    Only entries named by :func:`work_prefix` for this output whose owner process is gone are removed;
    anything else is left alone. Call it while holding the output's lock.
    """
    target = Path(output).expanduser().absolute()
    return _remove_leftovers(target.parent, target.name)


def clean_folder_leftovers(folder: str | os.PathLike) -> list[Path]:
    """:func:`clean_leftovers` for every output inside ``folder`` (a run's output folder)."""
    return _remove_leftovers(Path(folder).expanduser().absolute(), None)


def _remove_leftovers(folder: Path, name: str | None) -> list[Path]:
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        match = LEFTOVER_PATTERN.match(entry.name)
        if not match or (name is not None and match.group("output") != name):
            continue
        owner = int(match.group("pid"))
        if owner == os.getpid() or _pid_alive(owner):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        logger.info("removed %s, left by an interrupted run (pid %d)", entry, owner)
        removed.append(entry)
    return removed


def current_umask() -> int:
    """The process umask (read without changing it for longer than one call)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path: str | os.PathLike, recursive: bool = False) -> None:
    """Give ``path`` the permissions a plain ``open``/``mkdir`` would have had (mkstemp/mkdtemp use 0600/0700)."""
    mask = current_umask()
    root = Path(path)
    paths = [root, *root.rglob("*")] if recursive and root.is_dir() else [root]
    for entry in paths:
        if entry.is_symlink():
            continue
        base = 0o777 if entry.is_dir() else 0o666
        try:
            os.chmod(entry, base & ~mask)
        except OSError:
            pass
