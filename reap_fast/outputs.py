"""Output folders and files: the contract every stage follows before writing, one lock per output,
and the cleanup of what killed runs left behind.

The contract (:func:`check_output`):

* an output never is, contains or lies inside one of the run's inputs (the model folder, the
  observation file), so replacing it can never touch them;
* an existing non-empty folder is replaced only with ``--overwrite`` and only when reap-fast wrote it
  (it carries :data:`MARKER_FILE`); a folder holding anything else is never deleted, with or without
  ``--overwrite``;
* a folder reap-fast wrote that holds files the user added afterwards (names its marker does not list)
  is refused, with or without ``--overwrite``: those files are never deleted;
* an existing file is replaced only with ``--overwrite`` and only when it is one reap-fast writes (the
  caller says how to recognise it: an observation, a picture carrying :data:`PNG_SOFTWARE`, a results
  JSON carrying ``"written_by": "reap-fast"``).

Every path a command writes is one of :data:`OUTPUT_KINDS` and is checked by :func:`claim_output`
before any long work (``tests/test_reliability.py`` holds one test per kind). A scratch folder
(the observation's checkpoints) is claimed with :func:`claim_scratch_dir`, which marks it; only a
marked folder is ever removed (:func:`remove_scratch_dir`), and only the entries reap-fast put there.

Locks (:class:`OutputLock`) are ``flock``-ed files beside the output (``.<name>.reap-fast.lock``)
holding the owner's pid: a second process is refused at once with "in use by pid N"; the kernel drops
the lock when its owner dies, so a stale lock file is simply taken over.
"""

from __future__ import annotations

import errno
import fcntl
import fnmatch
import json
import logging
import os
import re
import shutil
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Mapping

from .errors import ReapFastError

logger = logging.getLogger(__name__)

MARKER_FILE = ".reap-fast-output.json"
OVERWRITE_FLAG = "--overwrite"
LOCK_SUFFIX = ".reap-fast.lock"
# Hidden working names made by work_prefix(): ".<output>.<kind>-p<pid>-<random>".
LEFTOVER_PATTERN = re.compile(r"^\.(?P<output>.+)\.(?:tmp|partial|ar-work|old|scratch)-p(?P<pid>\d+)-[\w.-]*$")


class OutputError(ReapFastError, FileExistsError):
    """An output that may not be written (it overlaps an input, or holds files reap-fast must keep)."""


class OutputInUseError(ReapFastError, RuntimeError):
    """Another live reap-fast process holds the output's lock."""


class OutputLocationError(ReapFastError, RuntimeError):
    """An output location that cannot be written or has no room for the stage's files."""


# Every kind of path a command writes: a folder (True) or a file (False). tests/test_reliability.py has
# one test per kind, and tests/test_layout.py checks that claim_output is only called with these names.
OUTPUT_KINDS: dict[str, bool] = {
    "observation": False,  # observe --output, run's observation.pt
    "checkpoint dir": True,  # observe --checkpoint-dir (scratch: claim_scratch_dir)
    "pruned folder": True,  # prune --output, run's pruned/, the drop-in's pruned model folder
    "picture": False,  # <pruned folder>.png
    "quantized folder": True,  # quantize --output, run's w4a16/
    "eval json": False,  # eval --output
    "run folder": True,  # run --output: observation, pruned/, w4a16/, eval.json, lm-eval outputs inside
}
FILE_KINDS_SHOWN = {"observation": "an observation file", "picture": "a pruning picture reap-fast drew",
                    "eval json": "a results file reap-fast wrote"}
PNG_SOFTWARE = "reap-fast"  # the "Software" text chunk of the pictures reap-fast draws
RESULTS_TAG = {"written_by": "reap-fast"}  # the key every results JSON of reap-fast carries


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
    """Whether ``folder`` carries reap-fast's marker."""
    return (Path(folder) / MARKER_FILE).is_file()


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
    foreign = foreign_entries(path)
    if foreign:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise OutputError(
            f"the output folder {output} was written by reap-fast but now also holds files it did not write "
            f"({shown}); they are never deleted: move them out or choose another output"
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
    ours: Callable[[Path], bool] | None = None,
    what: str = "a file reap-fast wrote",
) -> Path:
    """The contract for a single output file; ``ours(path)`` tells whether an existing file is ``what`` reap-fast
    writes (only those are replaced, and only with ``flag``)."""
    path = Path(output).expanduser()
    if str(output).endswith(("/", os.sep)):
        raise OutputError(f"the output {output} names a folder; give a file name such as {path / 'observation.pt'}")
    check_not_overlapping(path, inputs or {})
    if path.is_dir():
        raise OutputError(
            f"{output} is a folder, where reap-fast writes a file; it is never replaced (choose another output)"
        )
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise OutputError(f"the output {output} exists and is not a regular file; choose another output")
    if path.exists():
        if ours is not None and not ours(path):
            raise OutputError(
                f"{output} already exists and is not {what}; {flag} replaces only those (choose another output)"
            )
        if not overwrite:
            raise OutputError(f"{output} already exists; pass {flag} to replace it")
    return path


def read_head(path: str | os.PathLike, size: int) -> bytes:
    """The first ``size`` bytes of a file (fewer if it is shorter); b"" when it cannot be read."""
    try:
        with open(path, "rb") as handle:
            return handle.read(size)
    except OSError:
        return b""


def is_reap_fast_picture(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a PNG that reap-fast drew (its "Software" text chunk)."""
    head = read_head(path, 4096)
    return head.startswith(b"\x89PNG") and b"Software\x00" + PNG_SOFTWARE.encode() in head


def is_reap_fast_results(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a results JSON that reap-fast wrote (it carries :data:`RESULTS_TAG`)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(data, dict):
        return False
    return all(data.get(key) == value for key, value in RESULTS_TAG.items())


def claim_output(
    output: str | os.PathLike,
    kind: str,
    inputs: Mapping[str, str | os.PathLike | None] | None = None,
    overwrite: bool = False,
    flag: str = OVERWRITE_FLAG,
    ours: Callable[[Path], bool] | None = None,
) -> Path:
    """The one rule for every path a command writes (``kind``: one of :data:`OUTPUT_KINDS`); returns it.

    Folders follow :func:`check_output`, files :func:`check_output_file` (pictures and results JSON are
    recognised here; an observation's ``ours`` comes from the caller). Call it before any long work.
    """
    if kind not in OUTPUT_KINDS:
        raise ValueError(f"unknown output kind {kind!r}; add it to OUTPUT_KINDS (and its test)")
    if kind == "checkpoint dir":
        return check_scratch_dir(output, inputs, CHECKPOINT_NAMES)
    if OUTPUT_KINDS[kind]:
        return check_output(output, inputs, overwrite, flag)
    recognise = {"picture": is_reap_fast_picture, "eval json": is_reap_fast_results}.get(kind, ours)
    return check_output_file(output, inputs, overwrite, flag, recognise, FILE_KINDS_SHOWN.get(kind, kind))


# --------------------------------------------------------------------------------------------------
# Scratch folders
# --------------------------------------------------------------------------------------------------

SCRATCH_KIND = "scratch"
# The entries of an observation's checkpoint folder (a torchrun run: one rank<r>-of-<n> folder per process).
CHECKPOINT_NAMES = ("state.pt", "hidden-*.bin", "reap-fast-hidden-*.bin", "rank*-of-*")  # + the disk tier's buffer


def check_scratch_dir(
    folder: str | os.PathLike,
    inputs: Mapping[str, str | os.PathLike | None] | None = None,
    own_names: tuple[str, ...] = (),
) -> Path:
    """Check that ``folder`` may serve as reap-fast's scratch folder (it is removed after the work); returns it.

    Refused: a folder that is, contains or lies inside an input; an existing non-empty folder that is
    not marked as reap-fast's scratch (``own_names``: patterns of the entries an unmarked folder of an
    earlier version may hold, e.g. ``("state.pt", "hidden-*.bin")``); a path that is not a folder.
    """
    path = Path(folder).expanduser()
    try:
        check_not_overlapping(path, inputs or {})
    except OutputError as exc:
        message = str(exc).replace("the output", "the checkpoint folder")
        message = message.replace("another output", "another --checkpoint-dir")
        raise OutputError(message) from None
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise OutputError(f"the checkpoint folder {folder} exists and is not a folder; choose another --checkpoint-dir")
    if path.is_dir() and not is_scratch_dir(path, own_names):
        raise OutputError(
            f"the checkpoint folder {folder} is not empty and was not made by reap-fast; it would be removed "
            "after the run, so choose a new folder for --checkpoint-dir"
        )
    return path


def claim_scratch_dir(
    folder: str | os.PathLike,
    inputs: Mapping[str, str | os.PathLike | None] | None = None,
    own_names: tuple[str, ...] = (),
) -> Path:
    """:func:`check_scratch_dir`, then create ``folder`` and mark it as reap-fast's scratch; returns it."""
    path = check_scratch_dir(folder, inputs, own_names)
    path.mkdir(parents=True, exist_ok=True)
    if not (path / MARKER_FILE).is_file():
        record = {"tool": "reap-fast", "kind": SCRATCH_KIND}
        (path / MARKER_FILE).write_text(json.dumps(record) + "\n")
        apply_umask(path / MARKER_FILE)
    return path


def is_scratch_dir(folder: str | os.PathLike, own_names: tuple[str, ...] = ()) -> bool:
    """Whether ``folder`` is empty, marked as reap-fast's scratch, or holds only ``own_names`` entries."""
    folder = Path(folder)
    try:
        record = json.loads((folder / MARKER_FILE).read_text())
        if isinstance(record, dict) and record.get("kind") == SCRATCH_KIND:
            return True
    except (OSError, ValueError):
        pass
    entries = [entry for entry in folder.iterdir() if not LEFTOVER_PATTERN.match(entry.name)]
    return all(any(fnmatch.fnmatch(entry.name, pattern) for pattern in own_names) for entry in entries)


def remove_scratch_dir(folder: str | os.PathLike, own_names: tuple[str, ...]) -> bool:
    """Remove a marked scratch folder's own entries (``own_names`` patterns, the marker) and the folder once
    empty; an unmarked folder, and anything else inside, is left alone. Returns whether it is gone."""
    folder = Path(folder)
    if not folder.is_dir() or not is_scratch_dir(folder, own_names):
        return not folder.exists()
    for entry in folder.iterdir():
        if entry.name == MARKER_FILE or any(fnmatch.fnmatch(entry.name, pattern) for pattern in own_names):
            if entry.is_dir() and not entry.is_symlink():
                remove_scratch_dir(entry, own_names)
            else:
                entry.unlink(missing_ok=True)
    try:
        folder.rmdir()
    except OSError:
        logger.info("kept %s: it holds files reap-fast did not write", folder)
        return False
    return True


def write_marker(folder: str | os.PathLike, kind: str, names: list[str] | None = None) -> None:
    """Mark ``folder`` as written by reap-fast (so ``--overwrite`` may replace it later).

    ``names``: the entries reap-fast writes there (default: what the folder holds now); anything else
    found in it later is the user's and stops ``--overwrite``.
    """
    folder = Path(folder)
    if names is None:
        names = [entry.name for entry in folder.iterdir() if entry.name != MARKER_FILE]
    # no timestamp: equal runs give byte-identical folders
    record = {"tool": "reap-fast", "kind": kind, "files": sorted(set(names))}
    (folder / MARKER_FILE).write_text(json.dumps(record) + "\n")
    apply_umask(folder / MARKER_FILE)


def foreign_entries(folder: str | os.PathLike) -> list[str]:
    """Entries of a reap-fast folder that its marker does not list (files the user added); [] when the marker
    has no list (a scratch folder's) or cannot be read."""
    folder = Path(folder)
    try:
        record = json.loads((folder / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return []
    names = record.get("files") if isinstance(record, dict) else None
    if not isinstance(names, list):
        return []
    allowed = set(names) | {MARKER_FILE}
    return sorted(
        entry.name for entry in folder.iterdir()
        if entry.name not in allowed and not entry.name.endswith(LOCK_SUFFIX) and not LEFTOVER_PATTERN.match(entry.name)
    )


# --------------------------------------------------------------------------------------------------
# Locks
# --------------------------------------------------------------------------------------------------


# Errors of the place written to (not of reap-fast): shown as one line, never as a traceback.
LOCATION_ERRNOS = (errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EFBIG, errno.ENOTDIR)


def describe_os_error(exc: OSError) -> str:
    """One line for a failed write or access: what the system said, in words, and on which path."""
    reasons = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
               errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
               errno.EPERM: "operation not permitted", errno.EFBIG: "the file is too large for the file system",
               errno.ENOTDIR: "a part of the path is not a folder"}
    reason = reasons.get(exc.errno, exc.strerror or str(exc))
    where = f" ({exc.filename})" if exc.filename else ""
    return f"{reason}{where}"


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
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            return self._acquire()
        except OSError as exc:
            if exc.errno not in LOCATION_ERRNOS:
                raise
            raise OutputLocationError(f"cannot write {self.output}: {describe_os_error(exc)}") from None

    def _acquire(self) -> OutputLock:
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
