"""Quantization in a child process: AutoRound patches transformers' MoE classes for the whole process, so
:func:`run_quantize_subprocess` runs :func:`~reap_fast.quantize.autoround.quantize_w4a16` in
``python -m reap_fast.quantize.worker REQUEST.json`` and this process's classes stay untouched.

The request (:func:`reap_fast.children.write_request`) is a JSON file written into a scratch folder beside
the output (model, output, texts file, the :class:`~reap_fast.config.QuantConfig` as a dictionary); a failure
comes back through the child-process error protocol (:func:`reap_fast.children.call_child`): a
:class:`QuantizationError` (exit code :data:`EXIT_QUANT_ERROR`) as one line, anything else as
:class:`~reap_fast.children.ChildCrashed`.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from ..children import call_child, child_argv, write_request
from ..config.quantize import QuantConfig
from ..fileio import atomic_write_json
from ..outputs import work_prefix
from .checks import QuantizationError

# Exit code of the worker for a QuantizationError (the same as the CLI's for a usage error).
EXIT_QUANT_ERROR = 2
WORKER_MODULE = "reap_fast.quantize.worker"


def run_quantize_subprocess(
    model_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    texts: Sequence[str] | None = None,
    config: QuantConfig | None = None,
    *,
    texts_file: str | os.PathLike | None = None,
    python: str | None = None,
    timeout: float | None = None,
    capture_output: bool = False,
) -> Path:
    """Run :func:`quantize_w4a16` in a child process (see the module docstring).

    Give either ``texts`` (a list, written to a temporary JSON file) or ``texts_file`` (a JSON list of
    strings, or an object with a ``"texts"`` list). Settings: ``config`` (default:
    :class:`~reap_fast.config.QuantConfig`'s defaults), checked when built, before the child starts. ``python`` is the
    interpreter of the child (default: this one). A :class:`QuantizationError` in the child is raised again
    here with its message; any other failure raises :class:`~reap_fast.children.ChildCrashed` (a
    ``RuntimeError``) with the child's exit code and the last lines of its stderr.
    """
    config = QuantConfig() if config is None else config
    if (texts is None) == (texts_file is None):
        raise QuantizationError("give exactly one of texts or texts_file")
    output_path = Path(output_dir).expanduser().absolute()
    output_path.parent.mkdir(parents=True, exist_ok=True)
    # Beside the output, named with this pid: a run killed with SIGKILL leaves it to the next run's cleanup.
    with tempfile.TemporaryDirectory(prefix=work_prefix(output_path, "scratch"), dir=output_path.parent) as scratch:
        scratch_path = Path(scratch)
        if texts is not None:
            if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
                raise QuantizationError("calibration texts must be a list of strings")
            texts_file = atomic_write_json(list(texts), scratch_path / "texts.json")
        request = {
            "model_dir": str(model_dir),
            "output_dir": str(output_dir),
            "texts_file": str(texts_file),
            "config": asdict(config),
        }
        argv = child_argv(WORKER_MODULE, write_request(scratch_path, request), python)
        child_env = dict(os.environ)
        package_root = str(Path(__file__).resolve().parents[2])
        child_env["PYTHONPATH"] = os.pathsep.join(
            [package_root] + [p for p in child_env.get("PYTHONPATH", "").split(os.pathsep) if p]
        )
        call_child(argv, QuantizationError, f"quantization of {model_dir}", env=child_env, timeout=timeout,
                   capture_output=capture_output)
        return Path(output_dir)

