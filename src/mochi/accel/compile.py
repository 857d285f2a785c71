"""Regional ``torch.compile`` of the DiT: the repeated block and the final layer, not the whole model.

Why regional: the 48 joint blocks are one class with one structure (the last, which skips the text
update, is a second), so dynamo traces one graph and every block reuses it with its own weights as
inputs (``inline_inbuilt_nn_modules``, on by default since torch 2.5); compile time is that of one block,
not 48, and the embedding, text packing and step caching around the blocks stay eager Python, free to
change per call. Graphs are specialised to shapes (``dynamic=False``): a new video size or prompt length
recompiles once, as does a change of the hooks on the layers inside the blocks (hooked LoRAs). Only
``forward`` is compiled, not the module call: hooks put on the blocks from outside run eager, and so does the
sequence split's exchange (``mochi.parallel.sequence``).
Where no compiler works (no C++ toolchain for inductor on CPU, no triton on CUDA) ``compile_dit`` prints
one line and leaves the model eager.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch import nn


def compiler_problem(device: str | torch.device = "cpu") -> str | None:
    """Why torch.compile's default backend cannot run on ``device`` here (one line), or None.

    A cheap check (no compilation): inductor needs a C++ compiler on CPU and triton on CUDA. A failure
    that only shows when compiling is caught at the first call (``CallTimer``).
    """
    kind = torch.device(device).type
    try:
        if kind == "cuda":
            from torch.utils._triton import has_triton

            return None if has_triton() else "triton is not installed"
        if kind == "cpu":
            from torch._inductor.cpp_builder import get_cpp_compiler

            get_cpp_compiler()
            return None
    except Exception as e:  # noqa: BLE001 - any failure means "no working compiler"; say which
        return _one_line(e)
    return f"no torch.compile backend is known to work on {kind}"


def _one_line(e: BaseException) -> str:
    """``Type: first line`` of the exception that caused ``e``, at most 160 characters of message.

    A compiler failure wraps the cause: ``BackendCompilerFailed``'s own first line is only the header
    "backend='inductor' raised:", and its ``__cause__`` is cut (short tracebacks); the cause is kept as
    ``inner_exception``.
    """
    while (inner := getattr(e, "inner_exception", None) or e.__cause__) is not None:
        e = inner
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[0][:160]}" if lines else type(e).__name__


def is_compiler_failure(e: BaseException) -> bool:
    """Whether ``e`` is torch.compile failing, rather than the model's code raising.

    Only dynamo's own verdicts count: the backend (inductor) failed to compile a graph, dynamo cannot trace
    a construct (raised only where it is not allowed to fall back to Python), or dynamo itself broke.
    Anything else raised during a compiled call (a shape error, ``mochi.interrupt.Interrupted``, running out
    of memory) is the same error eager would raise.
    """
    from torch._dynamo.exc import BackendCompilerFailed, InternalTorchDynamoError, Unsupported

    return isinstance(e, (BackendCompilerFailed, Unsupported, InternalTorchDynamoError))


def compile_dit(dit: nn.Module, device: str | torch.device = "cpu", mode: str | None = None) -> bool:
    """Compile ``dit``'s blocks and final layer in place (regionally); True when compiled.

    Returns False, after one line on stderr, where no compiler works; the model then runs eager.
    """
    problem = compiler_problem(device)
    if problem is not None:
        print(f"mochi: --compile unavailable here ({problem}); running uncompiled", file=sys.stderr)
        return False
    for module in [*dit.blocks, dit.final_layer]:
        # forward, not the module call (Module.compile): hooks put on the blocks from outside (sequence
        # parallelism, offloading, stop checks) run eager around the graphs, so their per-call state never
        # becomes a guard that fails at the next call.
        module.forward = _with_hook_guards(torch.compile(module.forward, dynamic=False, mode=mode))
    return True


def _with_hook_guards(compiled: Callable) -> Callable:
    """``compiled`` called with dynamo guarding on the hooks of the layers it traces through.

    By default it does not: a LoRA hooked into the blocks' Linears after the first compiled call (a later
    request's, ``MochiPipeline.generate``), taken off or applied at another scale ran the graph traced
    before, silently without it or with the old one. With hook guards a change of hooks recompiles once
    (the graphs of each set of hooks are kept). The setting is read while a graph is traced and its guards
    built, so it is set around these calls only: other code compiled in the same process keeps torch's
    default (setting it process-wide put hook guards on a user's own compiled models too).
    """

    def forward(*args: object, **kwargs: object) -> object:
        with torch._dynamo.config.patch(skip_nnmodule_hook_guards=False):
            return compiled(*args, **kwargs)

    forward.mochi_compiled = compiled
    return forward


def uncompile_dit(dit: nn.Module) -> None:
    """Undo ``compile_dit``: the modules run eager again."""
    for module in [*dit.blocks, dit.final_layer]:
        if _compiled_forward(module):
            del module.forward


def is_compiled(dit: nn.Module) -> bool:
    return _compiled_forward(dit.final_layer)


def _compiled_forward(module: nn.Module) -> bool:
    return hasattr(vars(module).get("forward"), "mochi_compiled")


class CallTimer:
    """A denoiser wrapper timing every call; ``compile_seconds`` estimates the compile time as the first
    call's wall time minus the median of the others (the first call traces and compiles).

    With ``dit`` given (compiled by ``compile_dit``), a first call whose compilation fails
    (``is_compiler_failure``) prints one line naming the cause, puts the model back to eager, runs it again
    and keeps the cause in ``fell_back``, so a missing toolchain never ends a generation. Any other error
    (an ``Interrupted`` job among them) propagates with the model still compiled: the next call compiles.
    """

    def __init__(self, model: Callable, dit: nn.Module | None = None) -> None:
        self.model, self.dit, self.seconds = model, dit, []
        self.fell_back: str | None = None  # why compiling failed, once the model went back to eager

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        try:
            out = self.model(*args)
        except Exception as e:
            if self.seconds or self.dit is None or not is_compiled(self.dit) or not is_compiler_failure(e):
                raise
            self.fell_back = _one_line(e)
            print(f"mochi: compiling failed ({self.fell_back}); running uncompiled", file=sys.stderr)
            uncompile_dit(self.dit)
            out = self.model(*args)
        self.seconds.append(time.perf_counter() - t0)
        return out

    @property
    def compile_seconds(self) -> float | None:
        """Estimated compile time; None after fewer than 2 calls or when compiling failed (eager)."""
        if len(self.seconds) < 2 or self.fell_back is not None:
            return None
        return max(0.0, self.seconds[0] - statistics.median(self.seconds[1:]))
