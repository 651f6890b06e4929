"""``python -m reap_fast.layerwise_prune``: drop-in for upstream ``python -m reap.layerwise_prune``.

Same flags as :mod:`reap_fast.prune` plus upstream's ``LayerwiseArgs`` (``--batch_group_size``,
``--save_intermediate``, ``--low_cpu_mem_usage``, accepted and ignored: reap-fast streams every calibration
batch through one layer at a time by itself). Observation streams one decoder layer at a time from the
checkpoint's safetensors shards (see :mod:`reap_fast.observe.streaming`, :mod:`reap_fast.upstream`) and resumes after an interruption;
the full model is loaded only for slicing. The pruned model goes to ``pruned_models/layerwise_<method>...``
and, for a plain dataset name, the observation to ``<dataset>/layerwise/<output_file_name>`` as upstream.
"""

from __future__ import annotations

import sys
from typing import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Observe (or reuse the observation), prune and save, with upstream REAP's layerwise flags."""
    from .upstream.main import main as upstream_main

    return upstream_main(argv, layerwise=True)


if __name__ == "__main__":
    sys.exit(main())
