"""Peak activation memory of a forward, measured on the meta device: shapes only, nothing allocated.

``LiveBytes`` is a dispatch mode that sees every operator's outputs. A new storage counts as allocated
until the last tensor referring to it dies (a weak reference on each tensor; PyTorch keeps a tensor's
Python object alive while C++ still holds the tensor, so the release is seen when the memory would really
be freed). Views and in-place results share their input's storage and add nothing; storages that existed
before the mode (weights, inputs) are never counted. The peak of the live total is the forward's peak
activation memory on any device whose kernels allocate only their outputs, which holds for the matmuls,
norms and element-wise ops of these models. Attention is the exception (the fused kernels' workspaces,
the math path's score matrix), so the DiT's attention call is replaced during a trace by ``meta_attention``,
which allocates what the fused kernels allocate.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveBytes(TorchDispatchMode):
    """Tracks bytes of storages created inside the mode: ``now`` live, ``peak`` the most at once."""

    def __init__(self) -> None:
        super().__init__()
        self.now = self.peak = 0
        self._sizes: dict[int, int] = {}
        self._refs: dict[int, int] = {}

    def _release(self, key: int) -> None:
        self._refs[key] -= 1
        if self._refs[key] == 0:
            del self._refs[key]
            self.now -= self._sizes.pop(key)

    def _track(self, t: torch.Tensor, known: set[int]) -> None:
        key = t.untyped_storage()._cdata
        if key in known and key not in self._sizes:
            return  # a view of, or an in-place result on, a tensor made outside the mode
        if key not in self._sizes:
            self._sizes[key] = t.untyped_storage().nbytes()
            self._refs[key] = 0
            self.now += self._sizes[key]
            self.peak = max(self.peak, self.now)
        self._refs[key] += 1
        weakref.finalize(t, self._release, key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 - torch's hook
        kwargs = kwargs or {}
        known = {
            a.untyped_storage()._cdata for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)
        }
        out = func(*args, **kwargs)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t, known)
        return out


def meta_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: list[int], *, backend: str = "sdpa"
) -> torch.Tensor:
    """What ``mochi.ops.attention.local_attention`` allocates with a fused (flash or memory-efficient)
    kernel: the packed output, and per sequence the kernel's output and its fp32 log-sum-exp row.

    q, k, v: (total, H, D) → (total, H, D) of q's dtype (empty).
    """
    out = q.new_empty(q.shape[0], q.shape[1], v.shape[2])
    for a, b in zip(cu_seqlens[:-1], cu_seqlens[1:], strict=True):
        part = q.new_empty(1, q.shape[1], b - a, v.shape[2])
        lse = torch.empty(1, q.shape[1], b - a, dtype=torch.float32, device=q.device)
        out[a:b] = part[0].transpose(0, 1)
        del part, lse
    return out
