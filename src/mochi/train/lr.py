"""The learning-rate schedule every training loop here uses: linear warmup, then cosine decay."""

from __future__ import annotations

import math


def warmup_cosine(step: int, warmup: int, total: int, floor: float = 0.0) -> float:
    """LR multiplier of step ``step`` (0-based): linear warmup to 1 over ``warmup`` steps, then a cosine
    down to ``floor`` at step ``total`` (held there after it)."""
    if step < warmup:
        return (step + 1) / warmup
    span = max(total - warmup, 1)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(step - warmup, span) / span))
    return cosine if floor == 0.0 else floor + (1.0 - floor) * cosine
