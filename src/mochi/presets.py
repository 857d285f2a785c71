"""Named configurations: the released Mochi 1 preview, the embedded tiny model, and test sizes.

Each component's config dataclass lives beside its model; this file only names instances of them.
"""

from __future__ import annotations
