"""The observation progress bars' tokens-per-second figure, written once for every observation loop."""

from __future__ import annotations

import time
from typing import Any, Callable


class TokenRate:
    """Tokens counted since the last :meth:`restart`, and their rate per second of ``clock`` time."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self._clock = clock
        self.restart()

    def restart(self) -> None:
        """Start counting again from zero tokens, now."""
        self.began = self._clock()
        self.tokens = 0

    def elapsed(self) -> float:
        """Seconds since the last restart (never zero, so rates stay finite)."""
        return max(self._clock() - self.began, 1e-9)

    def per_second(self) -> float:
        return self.tokens / self.elapsed()

    def advance(self, bar: Any, tokens: int, **postfix: str) -> None:
        """Count ``tokens`` more, show the rate (``tok_s``) and ``postfix`` on the tqdm ``bar``, step it by one."""
        self.tokens += int(tokens)
        bar.set_postfix(**postfix, tok_s=f"{self.per_second():,.0f}")
        bar.update(1)
