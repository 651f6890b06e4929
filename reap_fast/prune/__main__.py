"""``python -m reap_fast.prune``: drop-in for upstream ``python -m reap.prune`` (see :mod:`reap_fast.upstream`)."""

from __future__ import annotations

import sys
from typing import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Observe (or reuse the observation), prune and save, with upstream REAP's flags."""
    from ..upstream.main import main as upstream_main

    return upstream_main(argv, layerwise=False)


if __name__ == "__main__":
    sys.exit(main())
