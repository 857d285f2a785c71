"""The one attention function of the DiT: full (non-causal) softmax attention over packed sequences.

Every sample's joint sequence [visual tokens ‖ its valid text tokens] is laid end to end in one packed
tensor (the flash-attn "varlen" layout), so padding text tokens never exist and never take part in attention.
Backends:

* ``"sdpa"`` (default, everywhere): torch's scaled_dot_product_attention, one call per sequence. Mochi has
  few, long sequences (B ≤ 2 under guidance), so the loop costs nothing; each call runs the fused kernel
  with no mask. Measured on 2 CPU cores (8 heads × 128, 1575 visual + 77/0 text tokens), the loop was
  within noise of one SDPA call on the batch padded to the longest sequence with a key-padding mask (fp32
  0.128 vs 0.119 s, bf16 0.062 vs 0.055 s), while the padded path needs a padded copy of q/k/v and computes
  padded query rows. Each call keeps a batch axis: 3-D (unbatched) inputs miss the fused CPU kernel and ran
  1.6-4× slower.
* ``"flash"``: ``flash_attn_varlen_func`` in one call for the whole batch (CUDA, fp16/bf16).
* ``"sage"``: SageAttention's ``sageattn``, one call per sequence (CUDA, fp16/bf16).

Optional kernels are imported only when asked for. Context parallelism plugs in here, around the kernel call:
while ``context_parallel`` holds a function (set only by ``mochi.parallel.sequence`` for the duration of one
DiT forward), ``attention`` hands it the call together with ``local_attention``, which it runs on its
share of heads after exchanging tokens between ranks. This module itself never imports torch.distributed.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from mochi.errors import MissingPackageError

BACKENDS = ("sdpa", "flash", "sage")
_INSTALL = {
    "flash": ("flash_attn", "pip install flash-attn  (or: pip install 'mochi-video[flash]')"),
    "sage": ("sageattention", "pip install sageattention  (or: pip install 'mochi-video[sage]')"),
}


def check_backend(
    backend: str, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> str:
    """Validate a backend name and that its kernel is installed; returns the name. Given the ``device`` and
    ``dtype`` a model will run in, also that the kernel runs there (flash and sage: CUDA, fp16/bf16), so
    that a run that cannot use it is refused before anything loads.

    Raises ValueError for an unknown name or a device/dtype the kernel does not run on, and
    MissingPackageError (an ImportError saying how to install it) for a missing kernel.
    """
    if backend not in BACKENDS:
        raise ValueError(f"attention backend {backend!r} is not one of {', '.join(map(repr, BACKENDS))}")
    if backend in _INSTALL and device is not None:
        where = torch.device(device)
        if where.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
            kind = str(dtype).removeprefix("torch.") if dtype is not None else "the default dtype"
            raise ValueError(
                f"attention backend {backend!r} runs on CUDA in fp16 or bf16, and this model runs in "
                f"{kind} on {where}; use --attention sdpa (the default)"
            )
    if backend in _INSTALL:
        module, how = _INSTALL[backend]
        try:
            importlib.import_module(module)
        except ImportError as e:
            message = f"attention backend {backend!r} needs the {module!r} package: {how}"
            raise MissingPackageError(message) from e
    return backend


def available_backends() -> list[str]:
    """The backends whose kernels import on this machine ("sdpa" always)."""
    out = []
    for name in BACKENDS:
        with contextlib.suppress(ImportError):
            out.append(check_backend(name))
    return out


# Set by mochi.parallel.sequence during a sequence-parallel forward: fn(q, k, v, cu_seqlens, backend,
# local_attention) -> out, with the same contract as ``attention``. None (always, in one process): no hook.
context_parallel = None


def _needs_cuda_half(backend: str, q: torch.Tensor) -> None:
    if q.device.type != "cuda" or q.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(
            f"attention backend {backend!r} needs fp16/bf16 tensors on CUDA, got {q.dtype} on "
            f"{q.device.type}; use backend 'sdpa' there"
        )


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: Sequence[int],
    *,
    backend: str = "sdpa",
) -> torch.Tensor:
    """softmax(q kᵀ / √D) v within each packed sequence, with no mask, no dropout and no causality.

    q, k, v: (total, H, D), sequences laid end to end. cu_seqlens: the B+1 sequence boundaries as Python ints
    (0, len₀, len₀+len₁, …, total). Returns a new contiguous (total, H, D) tensor in q's dtype.
    """
    if context_parallel is not None:
        return context_parallel(q, k, v, cu_seqlens, backend, local_attention)
    return local_attention(q, k, v, cu_seqlens, backend=backend)


def local_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: Sequence[int],
    *,
    backend: str = "sdpa",
) -> torch.Tensor:
    """``attention`` on this process's tensors only (the kernel call, never the context-parallel hook)."""
    bounds = list(cu_seqlens)
    if backend == "flash":
        _needs_cuda_half(backend, q)
        flash_attn = importlib.import_module("flash_attn")
        cu = torch.tensor(bounds, dtype=torch.int32, device=q.device)
        longest = max(b - a for a, b in zip(bounds[:-1], bounds[1:]))
        return flash_attn.flash_attn_varlen_func(
            q, k, v, cu, cu, longest, longest, dropout_p=0.0, causal=False
        )
    if backend == "sage":
        _needs_cuda_half(backend, q)
        kernel = importlib.import_module("sageattention").sageattn

        def run(qs, ks, vs):
            return kernel(qs, ks, vs, tensor_layout="HND", is_causal=False)
    elif backend == "sdpa":

        def run(qs, ks, vs):
            return F.scaled_dot_product_attention(qs, ks, vs)
    else:
        check_backend(backend)
    out = q.new_empty(q.shape[0], q.shape[1], v.shape[2])
    for a, b in zip(bounds[:-1], bounds[1:]):
        # (S, H, D) → (1, H, S, D): strided views, no copy.
        qs, ks, vs = (t[a:b].transpose(0, 1)[None] for t in (q, k, v))
        out[a:b] = run(qs, ks, vs)[0].transpose(0, 1)
    return out
