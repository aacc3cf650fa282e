"""The learning-rate schedule the world builders share."""

from __future__ import annotations

import math
from collections.abc import Callable


def warmup_cosine(steps: int, warmup_fraction: float = 0.05) -> Callable[[int], float]:
    """A LambdaLR factor: linear warm-up over the first ``warmup_fraction`` of ``steps``, then cosine decay
    to zero at ``steps``."""
    warmup = max(1, int(steps * warmup_fraction))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    return factor
