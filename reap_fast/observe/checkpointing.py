"""Resumable observation: periodic and on-signal checkpoints of the partial REAP statistics.

A checkpoint folder holds one ``state.pt`` (written with :func:`~reap_fast.metrics.atomic_torch_save`,
so it is always either the previous or the new state, never half of one) and, in layer-streaming
mode, one raw hidden-states snapshot ``hidden-<n>.bin`` that ``state.pt`` names. The state records:

* ``fingerprint``: the run settings (model path, dataset spec, samples, seed, lengths, batch size,
  engine, renormalisation, dtype, streaming or not, rank and world size) and a digest of the
  calibration tokens; resuming a different run is refused with the list of differences;
* ``accumulators``: every layer's :meth:`LayerAccumulator.state_tensors` (CPU copies);
* ``batches_done``: batches of the current pass already folded in (the whole model in memory, or the
  current layer in streaming mode);
* streaming only: ``layers_done`` (decoder layers finished), ``layer`` (the one in progress) and
  ``hidden`` (file, shape, dtype of the hidden-states buffer: rows of finished batches hold the
  layer's outputs, the other rows its inputs).

Checkpoints are written at batch boundaries only: every ``every`` seconds, and when SIGINT or SIGTERM
arrives (the signal sets a flag; the batch in flight finishes, the state is saved, then the process
stops: ``KeyboardInterrupt`` for SIGINT, ``SystemExit(128 + signum)`` for SIGTERM). The folder is
removed after a successful run. The environment variable ``REAP_FAST_TEST_SIGTERM_AFTER_BATCHES=N``
makes a process send itself SIGTERM after its N-th batch (tests use it to interrupt a run at a
known point through the real signal path).

The folder is reap-fast's scratch (:func:`reap_fast.outputs.claim_scratch_dir`): an existing folder
that reap-fast did not make is refused before any work, the folder is marked when created, and
:meth:`ObservationCheckpointer.clear` removes only a marked folder and only its own entries
(:data:`OWN_NAMES`), so a ``--checkpoint-dir`` naming a model or the current folder never deletes it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch

from ..config import ObserveConfig
from ..errors import ReapFastError
from ..metrics import LayerAccumulator, atomic_torch_save, describe_load_error
from ..outputs import CHECKPOINT_NAMES, claim_scratch_dir, remove_scratch_dir

logger = logging.getLogger(__name__)

STATE_FILE = "state.pt"
FORMAT_VERSION = 1
TEST_SIGNAL_ENV = "REAP_FAST_TEST_SIGTERM_AFTER_BATCHES"
OWN_NAMES = CHECKPOINT_NAMES  # what a checkpoint folder of reap-fast holds


class CheckpointMismatchError(ReapFastError, ValueError):
    """A checkpoint exists but belongs to another run (or resume was not asked for)."""


def calibration_digest(calibration) -> str:
    """SHA-256 of the calibration tokens and masks (a resumed run must see the same sequences)."""
    digest = hashlib.sha256()
    for tensor in (calibration.input_ids, calibration.attention_mask, calibration.stats_mask):
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


def run_fingerprint(
    model_path: str,
    dataset: str,
    settings: ObserveConfig,
    calibration=None,
    rank: int = 0,
    world_size: int = 1,
) -> dict[str, Any]:
    """The settings a checkpoint must match to be resumed (plain Python values).

    ``settings`` are the process's resolved ones (:func:`~reap_fast.observe.settings.process_settings`:
    engine and dtype named, not 'auto'); ``dataset`` is the spec, or a label for a built calibration set.
    The keys and values are those of format version 1, so earlier checkpoints stay resumable.
    """
    local = Path(model_path).expanduser()
    renormalize = settings.renormalize
    merging = {"merging_statistics": True} if settings.merging_statistics else {}  # absent: format 1's runs
    return {
        "model": str(local.resolve()) if local.exists() else model_path,
        "dataset": dataset,
        "samples_per_category": settings.samples_per_category,
        "model_max_length": int(settings.model_max_length),
        "batch_size": int(settings.batch_size),
        "seed": int(settings.seed),
        "engine": settings.engine,
        "renormalize": renormalize if isinstance(renormalize, str) else bool(renormalize),
        "dtype": f"torch.{settings.dtype}",  # as str(torch.dtype)
        "layerwise": bool(settings.layerwise),
        "rank": int(rank),
        "world_size": int(world_size),
        "calibration": None if calibration is None else calibration_digest(calibration),
        **merging,
    }


def accumulator_states(accumulators: dict[int, LayerAccumulator]) -> dict[int, dict[str, torch.Tensor]]:
    """CPU copies of every accumulator's raw state (safe to save while the run continues)."""
    return {
        index: {key: value.detach().cpu().clone() for key, value in acc.state_tensors().items()}
        for index, acc in accumulators.items()
    }


def restore_accumulators(accumulators: dict[int, LayerAccumulator], states: dict[int, dict[str, torch.Tensor]]) -> None:
    """Load saved states into ``accumulators`` (the layer sets must agree)."""
    if sorted(states) != sorted(accumulators):
        raise CheckpointMismatchError(
            f"checkpoint has statistics of layers {sorted(states)}, the model has MoE layers {sorted(accumulators)}"
        )
    for index, acc in accumulators.items():
        acc.load_state_tensors(states[index])


class ObservationCheckpointer:
    """Writes and reads the checkpoint of one observation run (one process) in ``directory``.

    Use as a context manager around the observation loop (it installs the SIGINT/SIGTERM handlers),
    call :meth:`start` once to get the state to resume from (or None), :meth:`after_batch` after every
    batch, and :meth:`clear` after success.
    """

    def __init__(self, directory: str | os.PathLike, fingerprint: dict[str, Any], every: float) -> None:
        self.directory = Path(directory)
        self.fingerprint = fingerprint
        self.every = float(every)
        self.last_save = time.monotonic()
        self.saves = 0
        self.batches_run = 0
        self.interrupted: int | None = None
        self._previous_handlers: dict[int, Any] = {}
        self._hidden_file: Path | None = None
        fail_after = os.environ.get(TEST_SIGNAL_ENV)
        self._signal_after = int(fail_after) if fail_after else None

    @property
    def state_path(self) -> Path:
        return self.directory / STATE_FILE

    # --- signals -------------------------------------------------------------------------------

    def __enter__(self) -> "ObservationCheckpointer":
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous_handlers[signum] = signal.signal(signum, self._on_signal)
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers.clear()

    def _on_signal(self, signum, frame) -> None:
        if self.interrupted is not None and signum == signal.SIGINT:
            # A second Ctrl-C stops at once (the last periodic checkpoint stays valid).
            raise KeyboardInterrupt
        self.interrupted = signum
        name = signal.Signals(signum).name
        logger.warning("received %s: finishing the current batch, then saving a checkpoint", name)

    # --- reading -------------------------------------------------------------------------------

    def start(self, resume: bool) -> dict[str, Any] | None:
        """The state to continue from (``resume=True``), or None for a fresh run.

        Refuses a checkpoint of another run, and an existing checkpoint when ``resume`` is False
        (so that an interrupted long run is never overwritten by accident).
        """
        if not self.state_path.is_file():
            if resume:
                logger.info("no checkpoint in %s: starting from the beginning", self.directory)
            return None
        if not resume:
            raise CheckpointMismatchError(
                f"{self.directory} holds a checkpoint of an interrupted observation: pass --resume to continue it, "
                "or delete the folder to start over"
            )
        try:
            state = torch.load(self.state_path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a corrupt or foreign file
            raise CheckpointMismatchError(f"cannot read checkpoint {self.state_path}: {describe_load_error(exc)}") from None
        if not isinstance(state, dict) or state.get("version") != FORMAT_VERSION:
            raise CheckpointMismatchError(f"{self.state_path} is not a reap-fast observation checkpoint")
        theirs = state.get("fingerprint", {})
        differences = [
            f"{key} {theirs.get(key)!r} -> {value!r}"
            for key, value in self.fingerprint.items()
            if theirs.get(key) != value
        ]
        if differences:
            raise CheckpointMismatchError(
                f"checkpoint in {self.directory} belongs to a different run ({'; '.join(differences)}); "
                "rerun with the original settings, or delete the folder / choose another --checkpoint-dir"
            )
        hidden = state.get("hidden")
        if hidden is not None:
            self._hidden_file = self.directory / hidden["file"]
            if not self._hidden_file.is_file():
                raise CheckpointMismatchError(f"checkpoint names {self._hidden_file}, which is missing")
        logger.info(
            "resuming from %s: %d layers done, %d batches of the current pass done",
            self.state_path, len(state.get("layers_done", [])), state["batches_done"],
        )
        return state

    def hidden_path(self, state: dict[str, Any]) -> Path:
        """Where the hidden-states snapshot of ``state`` is."""
        return self.directory / state["hidden"]["file"]

    # --- writing -------------------------------------------------------------------------------

    def due(self) -> bool:
        return self.interrupted is not None or time.monotonic() - self.last_save >= self.every

    def after_batch(
        self, make_state: Callable[[], dict[str, Any]], snapshot: Callable[[Path], dict] | None = None
    ) -> None:
        """Call after each finished batch: save when due or signalled, stop when signalled.

        ``make_state`` returns the state without fingerprint/version; ``snapshot(path)`` (streaming)
        writes the hidden-states buffer to ``path`` and returns its description.
        """
        self.batches_run += 1
        if self._signal_after is not None and self.batches_run == self._signal_after:
            os.kill(os.getpid(), signal.SIGTERM)  # the handler only sets a flag
        if not self.due():
            return
        self.save(make_state(), snapshot)
        if self.interrupted is not None:
            signum = self.interrupted
            logger.warning(
                "observation interrupted by %s; partial statistics saved in %s: rerun the same command with --resume",
                signal.Signals(signum).name, self.directory,
            )
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(128 + signum)

    def save(self, state: dict[str, Any], snapshot: Callable[[Path], dict] | None = None) -> Path:
        """Write the state atomically (and the hidden-states snapshot first, under a new name)."""
        claim_scratch_dir(self.directory, own_names=OWN_NAMES)
        state = dict(state, version=FORMAT_VERSION, fingerprint=self.fingerprint)
        previous_hidden = self._hidden_file
        if snapshot is not None:
            name = f"hidden-{os.getpid()}-{self.saves}.bin"
            state["hidden"] = dict(snapshot(self.directory / name), file=name)
        atomic_torch_save(state, self.state_path)
        if snapshot is not None:
            self._hidden_file = self.directory / state["hidden"]["file"]
            if previous_hidden is not None and previous_hidden != self._hidden_file:
                previous_hidden.unlink(missing_ok=True)
        self.saves += 1
        self.last_save = time.monotonic()
        logger.info("checkpoint %d saved in %s", self.saves, self.directory)
        return self.state_path

    def clear(self) -> None:
        """Remove the checkpoint folder after a successful run: only a folder reap-fast marked as its scratch,
        and only the entries it wrote there (anything else stays, and so does the folder)."""
        remove_scratch_dir(self.directory, OWN_NAMES)
        if self.directory.name.startswith("rank"):
            # the shared folder of a multi-process run, once every rank cleared its own
            remove_scratch_dir(self.directory.parent, OWN_NAMES)
