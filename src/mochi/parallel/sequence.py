"""Ulysses sequence parallelism for the DiT, applied from outside the model (hooks; the model is unchanged).

With ``enable_sequence_parallel(dit, group)``, every forward of the DiT on the G ranks of ``group`` runs as:

1. The patch embedding's output (B, N, D) is padded to G·M tokens (M = ⌈N/G⌉) and each rank keeps its M
   (rank r: tokens [r·M, (r+1)·M)); the RoPE table each block receives is sliced the same way. Every
   per-token layer (modulation, q/k/v, MLPs, projections, final layer) then runs on local tokens only.
   Text tokens are few: every rank holds all valid text tokens and runs the text stream in full.
2. In ``mochi.ops.attention.attention`` (the model's one attention call), one all-to-all turns
   (local tokens, all H heads) into (all N tokens, H/G heads) for q, k and v at once; padding rows are dropped
   there, so they never take part in attention. Each rank slices its H/G heads out of the (replicated) text
   q/k/v and runs the unchanged kernel over [N visual ‖ valid text] per sample. A second all-to-all brings
   the visual output back to (local tokens, H heads); the text output is all-gathered over heads.
3. The final layer's output is all-gathered and unpadded, so the model returns the full (B, C, T, H, W) on
   every rank, identical to one process.

Every exchange is a differentiable ``mochi.parallel.comm`` collective, so training works: after backward,
average parameter gradients over the ranks (``comm.average_grads``).
"""

from __future__ import annotations

import itertools
import math
import weakref
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mochi.ops import attention as attention_ops
from mochi.parallel.comm import all_gather, all_to_all


@dataclass(frozen=True)
class _Split:
    group: object  # ProcessGroup
    size: int  # G
    rank: int  # r within the group
    tokens: int  # N, visual tokens of the current forward
    local: int  # M = ⌈N/G⌉ tokens per rank (the last ranks hold padding rows when G ∤ N)


_active: _Split | None = None


def check_heads(num_heads: int, size: int) -> None:
    """ValueError unless ``size`` ranks can split ``num_heads`` attention heads evenly."""
    if size < 1 or num_heads % size:
        valid = [d for d in range(1, num_heads + 1) if num_heads % d == 0]
        raise ValueError(
            f"sequence-parallel size {size} cannot split the DiT's {num_heads} attention heads: it must "
            f"divide {num_heads}; valid sizes: {valid}"
        )


def _pad_tokens(t: torch.Tensor, dim: int, total: int) -> torch.Tensor:
    extra = total - t.shape[dim]
    if not extra:
        return t
    pad = [0, 0] * (t.ndim - 1 - dim) + [0, extra]
    return F.pad(t, pad)


def _local_slice(t: torch.Tensor, dim: int, s: _Split) -> torch.Tensor:
    """Pad the token axis ``dim`` to G·M and keep this rank's M (no communication).

    Contiguous, not a strided view: a compiled block specialises on its input's strides, and block 0 would
    otherwise see other strides than the blocks after it, and compile twice.
    """
    return _pad_tokens(t, dim, s.size * s.local).narrow(dim, s.rank * s.local, s.local).contiguous()


# Eager even inside a compiled block (mochi.accel.compile): the collectives and their traffic counts, and the
# split of the current forward, which is a new object at every forward, must not become a compiled graph's
# guards (each call would recompile, up to dynamo's recompile_limit).
@torch.compiler.disable
def _sp_attention(q, k, v, cu_seqlens, backend, local_attention):  # noqa: ANN001, ANN202 - as attention()
    """``attention`` on packed [M local visual ‖ all text] per sample, by the Ulysses exchange."""
    s = _active
    assert s is not None
    G, r, M, N = s.size, s.rank, s.local, s.tokens
    bounds = list(cu_seqlens)
    text_lengths = [b - a - M for a, b in zip(bounds[:-1], bounds[1:])]
    B, H, D = len(text_lengths), q.shape[1], q.shape[2]
    h = H // G

    vis = torch.stack([torch.stack([t[a : a + M] for a in bounds[:-1]]) for t in (q, k, v)])  # (3,B,M,H,D)
    send = vis.view(3, B, M, G, h, D).permute(3, 0, 1, 2, 4, 5)  # (G, 3, B, M, h, D): heads g → rank g
    got = all_to_all(send, s.group)  # (G, 3, B, M, h, D): tokens of rank g, my heads
    full = got.permute(1, 2, 0, 3, 4, 5).reshape(3, B, G * M, h, D)[:, :, :N]  # drop padding rows

    heads = slice(r * h, (r + 1) * h)
    texts = [[t[a + M : b, heads] for a, b in zip(bounds[:-1], bounds[1:])] for t in (q, k, v)]
    packed = [torch.cat([p for i in range(B) for p in (full[j, i], texts[j][i])]) for j in range(3)]
    local_bounds = [0, *itertools.accumulate(N + n for n in text_lengths)]
    out = local_attention(*packed, local_bounds, backend=backend)  # (Σ N + n, h, D)

    pieces = out.split([m for n in text_lengths for m in (N, n)])
    vis_out = _pad_tokens(torch.stack(pieces[0::2]), 1, G * M)  # (B, G·M, h, D)
    back = all_to_all(vis_out.view(B, G, M, h, D).transpose(0, 1), s.group)  # (G, B, M, h, D): heads of g
    vis_out = back.permute(1, 2, 0, 3, 4).reshape(B, M, H, D)
    txt = torch.cat(pieces[1::2])  # (L_total, h, D)
    txt_out = all_gather(txt, s.group).permute(1, 0, 2, 3).reshape(-1, H, D)  # (L_total, H, D)
    txt_parts = txt_out.split(text_lengths)
    return torch.cat([p for i in range(B) for p in (vis_out[i], txt_parts[i])]).to(q.dtype)


class SequenceParallel:
    """Handle of the hooks ``enable_sequence_parallel`` installed; ``remove()`` takes them off."""

    def __init__(self, dit: nn.Module, group=None) -> None:  # noqa: ANN001 - ProcessGroup or None
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        check_heads(dit.config.num_heads, self.size)
        self.patch = dit.config.patch_size
        self._handles = [
            dit.register_forward_pre_hook(self._begin, with_kwargs=True),
            dit.register_forward_hook(self._end, always_call=True),
            dit.x_embedder.register_forward_hook(self._shard_tokens),
            dit.final_layer.register_forward_hook(self._gather_tokens),
            *(block.register_forward_pre_hook(self._shard_rope) for block in dit.blocks),
        ]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _begin(self, module, args, kwargs):  # noqa: ANN001, ANN202 - torch hook signature
        global _active
        x = args[0] if args else kwargs["x"]
        p = self.patch
        n = x.shape[2] * (x.shape[3] // p) * (x.shape[4] // p)
        _active = _Split(self.group, self.size, self.rank, n, math.ceil(n / self.size))
        attention_ops.context_parallel = _sp_attention

    def _end(self, module, args, output):  # noqa: ANN001, ANN202
        # With autograd on, backward may recompute blocks (gradient checkpointing) after this forward has
        # returned: the split then stays in place until the next forward begins.
        global _active
        if not torch.is_grad_enabled():
            _active = None
            attention_ops.context_parallel = None

    def _shard_tokens(self, module, args, output):  # noqa: ANN001, ANN202
        return _local_slice(output, 1, _active)  # (B, N, D) → (B, M, D)

    def _shard_rope(self, module, args):  # noqa: ANN001, ANN202
        rope = args[3]
        if rope.shape[0] == _active.tokens:  # (N, H, F) → (M, H, F)
            return (*args[:3], _local_slice(rope, 0, _active), *args[4:])
        return None

    def _gather_tokens(self, module, args, output):  # noqa: ANN001, ANN202
        s = _active
        full = all_gather(output, s.group)  # (G, B, M, C)
        return full.transpose(0, 1).reshape(output.shape[0], s.size * s.local, -1)[:, : s.tokens]


_enabled: weakref.WeakKeyDictionary[nn.Module, SequenceParallel] = weakref.WeakKeyDictionary()


def enable_sequence_parallel(dit: nn.Module, group=None) -> SequenceParallel:  # noqa: ANN001
    """Split every forward of ``dit`` over the ranks of ``group`` (default: all). Raises ValueError at once
    when the group's size does not divide the number of heads. Returns the handle (``.remove()``); a DiT
    already split over the same group keeps its hooks (splitting twice would slice the tokens twice)."""
    current = _enabled.get(dit)
    if current is not None and current._handles:
        if current.group is not group:
            raise ValueError("this DiT is already sequence-parallel over another group; remove() that first")
        return current
    handle = SequenceParallel(dit, group)
    _enabled[dit] = handle
    return handle
