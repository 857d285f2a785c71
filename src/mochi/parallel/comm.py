"""Differentiable collectives for context parallelism, counting the bytes each rank sends.

Gradient convention: a tensor held by every rank ("replicated") carries, on each rank, that rank's share of
its gradient; the true gradient is the sum over ranks. Hence the adjoint of an all-gather is a reduce-scatter
(sum), the adjoint of an all-to-all is the inverse all-to-all, and a replicated tensor may be sliced locally
with no communication in backward. Parameter gradients are then summed (or averaged, when every rank computed
the same loss) over ranks once, after backward (``mochi.parallel.grads``).
"""

from __future__ import annotations

from collections import Counter

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

# Bytes this rank sent through each kind of collective since the last ``reset_traffic``.
traffic: Counter[str] = Counter()


def reset_traffic() -> None:
    traffic.clear()


def _size(group) -> int:  # noqa: ANN001 - a ProcessGroup or None
    return dist.get_world_size(group)


def all_to_all_raw(x: torch.Tensor, group=None) -> torch.Tensor:  # noqa: ANN001
    """x: (G, …), chunk g sent to rank g → (G, …), chunk s received from rank s."""
    g = _size(group)
    x = x.contiguous()
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=group)
    traffic["all_to_all"] += x.numel() * x.element_size() * (g - 1) // g
    return out


def all_gather_raw(x: torch.Tensor, group=None) -> torch.Tensor:  # noqa: ANN001
    """x: (…) on every rank → (G, …) stacked in rank order."""
    g = _size(group)
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(g)]
    dist.all_gather(parts, x, group=group)
    traffic["all_gather"] += x.numel() * x.element_size() * (g - 1)
    return torch.stack(parts)


def reduce_scatter_raw(x: torch.Tensor, group=None) -> torch.Tensor:  # noqa: ANN001
    """x: (G, …) on every rank → the sum over ranks of chunk [rank] (gloo: by all-reduce)."""
    g = _size(group)
    x = x.contiguous()
    if dist.get_backend(group) == "nccl":
        out = torch.empty_like(x[0])
        dist.reduce_scatter_tensor(out, x, group=group)
        traffic["reduce_scatter"] += x.numel() * x.element_size() * (g - 1) // g
        return out
    dist.all_reduce(x, group=group)
    traffic["all_reduce"] += 2 * x.numel() * x.element_size() * (g - 1) // g
    return x[dist.get_rank(group)]


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:  # noqa: ANN001
        ctx.group = group
        return all_to_all_raw(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN205
        # Chunk s came from rank s, so sending each gradient chunk back where it came from is the inverse.
        return all_to_all_raw(grad, ctx.group), None


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:  # noqa: ANN001
        ctx.group = group
        return all_gather_raw(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN205
        return reduce_scatter_raw(grad, ctx.group), None


def all_to_all(x: torch.Tensor, group=None) -> torch.Tensor:  # noqa: ANN001
    """Differentiable all-to-all over the leading axis (size G): chunk g goes to rank g."""
    return _AllToAll.apply(x, group)


def all_gather(x: torch.Tensor, group=None) -> torch.Tensor:  # noqa: ANN001
    """Differentiable all-gather: (…) → (G, …); backward sums each rank's gradient of its chunk."""
    return _AllGather.apply(x, group)


def average_grads(params, group=None) -> None:  # noqa: ANN001 - iterable of Parameters
    """Average ``.grad`` over ranks in one flat all-reduce (the loss was replicated: each rank has it all).

    Gradients of FSDP-sharded parameters (DTensors) are skipped: FSDP already reduce-scattered and averaged
    them in backward.
    """
    grads = [p.grad for p in params if p.grad is not None and not isinstance(p.grad, DTensor)]
    if not grads or _size(group) == 1:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    g = _size(group)
    traffic["all_reduce"] += 2 * flat.numel() * flat.element_size() * (g - 1) // g
    flat /= g
    offset = 0
    for grad in grads:
        n = grad.numel()
        grad.copy_(flat[offset : offset + n].view_as(grad))
        offset += n
