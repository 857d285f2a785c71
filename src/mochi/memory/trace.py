"""Peak activation memory of a forward, measured on the meta device: shapes only, nothing allocated.

``LiveBytes`` is a dispatch mode that sees every operator's outputs. A new storage counts as allocated
until it is freed (a weak reference to the storage itself, checked at every operator, so a storage kept
alive by another tensor, e.g. a parameter whose ``.data`` it became, still counts). Views and in-place
results share their input's storage and add nothing; storages that existed before the mode (weights,
inputs) are never counted. The peak of the live total is the forward's peak
activation memory on any device whose kernels allocate only their outputs, which holds for the matmuls,
norms and element-wise ops of these models. Attention is the exception (the fused kernels' workspaces,
the math path's score matrix), so the DiT's attention call is replaced during a trace by ``meta_attention``,
which allocates what the fused kernels allocate.
"""

from __future__ import annotations

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveBytes(TorchDispatchMode):
    """Tracks bytes of storages created inside the mode: ``now`` live, ``peak`` the most at once.

    device: count only storages on this device type ("cpu": a real load, whose meta model is not memory).
    """

    def __init__(self, device: str | None = None) -> None:
        super().__init__()
        self.device = device
        self.now = self.peak = 0
        self._live: dict[int, tuple[StorageWeakRef, int]] = {}

    def _purge(self) -> None:
        for key, (ref, size) in list(self._live.items()):
            if ref.expired():
                del self._live[key]
                self.now -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 - torch's hook
        kwargs = kwargs or {}
        tensors = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
        known = {t.untyped_storage()._cdata for t in tensors}
        del tensors
        out = func(*args, **kwargs)
        self._purge()
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or (self.device and t.device.type != self.device):
                continue
            storage = t.untyped_storage()
            key = storage._cdata
            if key in known or key in self._live:
                continue  # a view of, or an in-place result on, a tensor seen already or made outside
            self._live[key] = (StorageWeakRef(storage), storage.nbytes())
            self.now += storage.nbytes()
        self.peak = max(self.peak, self.now)
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
