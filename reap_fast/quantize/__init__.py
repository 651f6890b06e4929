"""W4A16 quantization of a (pruned) MoE checkpoint with AutoRound.

The heavy lifting is done by the ``auto-round`` library (``pip install 'reap-fast[quant]'``); this
package adds what a pruning pipeline needs around it:

* ``checks``: pre-checks that fail fast with a one-line error *before* AutoRound is constructed: a
  :class:`QuantizationError` (library missing, model folder missing, layer in-features not divisible by
  the group size, calibration texts too short for ``seqlen``), or the shared checks' own errors
  (``ModelFolderError``, ``OutputError`` for an output folder already holding a model, ``MemoryPlanError``);
* ``autoround``: the run itself, routers (``mlp.gate``) and shared-expert gates (``shared_expert_gate``)
  kept in 16 bit, written into a hidden sibling folder that is renamed into place only once complete;
* ``output``: the saved checkpoint checked (quantization_config, 16-bit routers) and
  ``reap_fast_quant.json`` (settings, versions, sha256 of each weight file), so a pipeline can tell a
  complete output from an interrupted one;
* ``child`` / ``worker``: process isolation: constructing ``AutoRound`` patches transformers' MoE block
  classes for the whole process, so :func:`run_quantize_subprocess` runs the quantization in a child;
* ``reload``: :func:`load_quantized`.

Nothing here imports ``auto_round`` at module import time. The command line is ``reap-fast quantize``.
"""

from __future__ import annotations

from .autoround import quantize_w4a16
from .checks import (
    INSTALL_HINT,
    QuantizationError,
    auto_round_version,
    check_group_size,
    check_model_dir,
    check_output_dir,
    check_texts,
    quantize_texts,
    token_lengths,
)
from .child import EXIT_QUANT_ERROR, run_quantize_subprocess
from .output import MARKER_FILE, MARKER_FORMAT, PACKING_FORMAT, is_complete_output, read_marker, verify_saved
from .reload import load_quantized

__all__ = [
    "EXIT_QUANT_ERROR",
    "INSTALL_HINT",
    "MARKER_FILE",
    "MARKER_FORMAT",
    "PACKING_FORMAT",
    "QuantizationError",
    "auto_round_version",
    "check_group_size",
    "check_model_dir",
    "check_output_dir",
    "check_texts",
    "is_complete_output",
    "load_quantized",
    "quantize_texts",
    "quantize_w4a16",
    "read_marker",
    "run_quantize_subprocess",
    "token_lengths",
    "verify_saved",
]
