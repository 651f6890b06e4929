"""``python -m reap_fast.layerwise_prune``: drop-in for upstream ``python -m reap.layerwise_prune``.

Same flags as :mod:`reap_fast.prune` plus upstream's ``LayerwiseArgs`` (``--batch_group_size``,
``--save_intermediate``, ``--low_cpu_mem_usage``, accepted and ignored for now). The pruned model goes to
``pruned_models/layerwise_<method>...`` and, for a plain dataset name, the observation to
``<dataset>/layerwise/<output_file_name>`` as upstream. For now the observation runs on the whole model
in memory, like ``reap_fast.prune`` (streaming one decoder layer at a time is not implemented yet).
"""

from __future__ import annotations

import sys
from typing import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Observe (or reuse the observation), prune and save, with upstream REAP's layerwise flags."""
    from .prune.compat import main as compat_main

    return compat_main(argv, layerwise=True)


if __name__ == "__main__":
    sys.exit(main())
