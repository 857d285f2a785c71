"""Stopping a generation mid-stage, from outside the models.

The pipeline reports progress between denoising steps, but one step of a large video (or its VAE decode)
can take minutes. ``stop_checks`` makes every module call of the given models first ask ``should_stop()``
and raise ``Interrupted`` when it says yes: a forward pre-hook on each submodule, so the check runs between
DiT blocks, between the layers inside a block, in the text encoder and between (and inside) the VAE's
decode chunks, while the model files know nothing of it. The longest stretch without a check is then one
leaf module (one attention call or one convolution). The exception unwinds the pipeline like any other,
freeing its tensors; the hooks are removed when the block exits, whichever way.

Single-process only: under torchrun every rank must stop at the same collective, which a per-rank flag
cannot promise.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

from torch import nn


class Interrupted(Exception):
    """Raised inside a model call when ``should_stop()`` said yes."""


@contextmanager
def stop_checks(models: Iterable[nn.Module], should_stop: Callable[[], bool]) -> Iterator[None]:
    """While inside the block, every call of a submodule of ``models`` raises ``Interrupted`` once
    ``should_stop()`` returns True. ``should_stop`` is called very often: make it a flag read."""

    def check(module: nn.Module, args: object) -> None:
        if should_stop():
            raise Interrupted(f"stopped before {type(module).__name__}")

    handles = [m.register_forward_pre_hook(check) for model in models for m in model.modules()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
