"""``python -m reap_fast.prune``: drop-in for upstream ``python -m reap.prune`` (see :mod:`reap_fast.prune.compat`)."""

from __future__ import annotations

import sys
from typing import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Observe (or reuse the observation), prune and save, with upstream REAP's flags."""
    from .compat import main as compat_main

    return compat_main(argv, layerwise=False)


if __name__ == "__main__":
    sys.exit(main())
