"""mochi: a complete, fast and faithful implementation of Genmo's Mochi 1 text-to-video model.

Importing this package has no side effects and imports nothing heavy; the public API is loaded on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Public name → module that defines it. Resolved lazily so `import mochi` stays fast.
_PUBLIC = {
    "MochiPipeline": "mochi.pipeline",
    "GenerationRequest": "mochi.pipeline",
    "AsymmDiT": "mochi.models.dit",
    "DiTConfig": "mochi.models.dit",
}

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'mochi' has no attribute {name!r}")


def __dir__() -> list[str]:
    # The lazy names too: without this, dir(mochi) and tab completion listed none of the public API.
    return sorted({*globals(), *_PUBLIC})
