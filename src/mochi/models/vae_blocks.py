"""Building blocks of the AsymmVAE (genmo-mochi.md §2.1), written to stream over time.

Every causal module reads and writes a `CausalContext`: the frames (or attention keys and values) it needs
from the previous temporal chunk. Feeding a video chunk by chunk through one context gives the same output
as one pass over the whole video, because nothing in the VAE looks ahead in time: GroupNorm is per frame,
convolutions are causal, attention is causal.

Attribute names are Genmo's checkpoint keys (`stack.0.weight`, `attn_block.attn.qkv.weight`, ...).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

# One SDPA call handles at most this many independent rows (Genmo: larger grids hit a CUDA launch error).
_ATTN_ROWS = 2**15
# cuDNN fails on conv inputs above 2 GiB (counted at 2 bytes per element, as Genmo's SafeConv3d does).
_CONV_SPLIT_BYTES = 2 * 1024**3


class CausalContext:
    """What a causal module carries from one temporal chunk to the next.

    `started` is False for the first chunk: causal convolutions then pad by repeating the first frame and
    depth-to-space-time drops its leading frames. With `carry=False` nothing is kept (one-shot forward).
    """

    def __init__(self, carry: bool = True) -> None:
        self.carry = carry
        self.started = False
        self.tails: dict[nn.Module, object] = {}

    def nbytes(self) -> int:
        """Bytes held by the carried tensors."""
        total = 0
        for v in self.tails.values():
            for t in v if isinstance(v, tuple) else (v,):
                total += t.numel() * t.element_size()
        return total


def empty_like_layout(x: Tensor, *shape: int) -> Tensor:
    """An uninitialised tensor of `shape` in x's memory format (channels-last 3-D or contiguous)."""
    fmt = torch.channels_last_3d if is_channels_last(x) else torch.contiguous_format
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=fmt)


def is_channels_last(x: Tensor) -> bool:
    return x.ndim == 5 and x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous()


class GroupNormSpatial(nn.GroupNorm):
    """GroupNorm(32 groups, eps 1e-5) applied to each frame on its own: (B, C, T, H, W) → same shape.

    Statistics are taken per (sample, group, frame) in place of the input's layout (channels-last or
    not), so no permuted copy is made; low-precision inputs get fp32 statistics and are normalised in
    fp32 a few frames at a time. The output keeps the input's memory format.
    """

    def __init__(self, channels: int, groups: int = 32, eps: float = 1e-5) -> None:
        super().__init__(groups, channels, eps=eps, affine=True)

    def forward(self, x: Tensor) -> Tensor:
        b, c, t, h, w = x.shape
        g = self.num_groups
        if is_channels_last(x):
            xv = x.permute(0, 2, 3, 4, 1).view(b, t, h * w, g, c // g)
            tdim, pshape = 1, (1, 1, 1, g, c // g)

            def back(y: Tensor) -> Tensor:
                return y.view(b, t, h, w, c).permute(0, 4, 1, 2, 3)
        else:
            xv = x.contiguous().view(b, g, c // g, t, h * w)
            tdim, pshape = 3, (1, g, c // g, 1, 1)

            def back(y: Tensor) -> Tensor:
                return y.view(b, c, t, h, w)

        dims = (2, 4)
        weight, bias = self.weight.float().view(pshape), self.bias.float().view(pshape)
        if x.dtype == torch.float32:
            var, mean = torch.var_mean(xv, dim=dims, keepdim=True, correction=0)
            scale = torch.rsqrt(var + self.eps) * weight
            return back(torch.addcmul(bias - mean * scale, xv, scale))
        out = torch.empty_like(xv)
        for t0 in range(0, t, 8):
            xs = xv.narrow(tdim, t0, min(8, t - t0)).float()
            var, mean = torch.var_mean(xs, dim=dims, keepdim=True, correction=0)
            scale = torch.rsqrt(var + self.eps) * weight
            out.narrow(tdim, t0, xs.shape[tdim]).copy_(torch.addcmul(bias - mean * scale, xs, scale))
        return back(out)


class CausalConv3d(nn.Conv3d):
    """Conv3d, causal in time, spatial padding (k−1)//2 by replication (Genmo's ContextParallelConv3d).

    The first chunk is front-padded with k_t−1 copies of its first frame; later chunks are preceded by the
    frames the previous chunk left unconsumed. Strided convs (the encoder's downsampling) keep the remainder
    that did not fill a window. (B, C, T, H, W) → (B, C', T', H', W').
    """

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel: tuple[int, int, int],
        stride: tuple[int, int, int],
        bias: bool = True,
    ) -> None:
        super().__init__(cin, cout, kernel, stride=stride, padding=0, bias=bias)

    def pad(self, x: Tensor, ctx: CausalContext) -> Tensor:
        """The time stream this chunk convolves: carried or repeated frames, then x, spatially padded."""
        kt, kh, kw = self.kernel_size
        ph, pw = (kh - 1) // 2, (kw - 1) // 2
        tail = ctx.tails.pop(self, None) if ctx.started else None
        n_pre = tail.shape[2] if tail is not None else (0 if ctx.started else kt - 1)
        if n_pre == 0 and ph == 0 and pw == 0:
            return x
        b, c, t, h, w = x.shape
        buf = empty_like_layout(x, b, c, n_pre + t, h + 2 * ph, w + 2 * pw)
        body = buf[:, :, n_pre:]
        body[:, :, :, ph : ph + h, pw : pw + w] = x
        if ph:
            body[:, :, :, :ph, pw : pw + w] = x[:, :, :, :1]
            body[:, :, :, ph + h :, pw : pw + w] = x[:, :, :, -1:]
        if pw:
            body[..., :pw] = body[..., pw : pw + 1]
            body[..., pw + w :] = body[..., pw + w - 1 : pw + w]
        if tail is not None:
            buf[:, :, :n_pre] = tail
        elif n_pre:
            buf[:, :, :n_pre] = body[:, :, :1]
        return buf

    def conv(self, buf: Tensor, ctx: CausalContext) -> Tensor:
        """Convolve a padded stream; keep the frames the next chunk still needs."""
        kt, st = self.kernel_size[0], self.stride[0]
        length = buf.shape[2]
        n_out = (length - kt) // st + 1 if length >= kt else 0
        if ctx.carry and length > n_out * st:
            ctx.tails[self] = buf[:, :, n_out * st :].clone()
        if n_out == 0:
            b, _, _, h, w = buf.shape
            return buf.new_empty(b, self.out_channels, 0, h // self.stride[1], w // self.stride[2])
        used = buf[:, :, : (n_out - 1) * st + kt]
        if st == 1 and used.numel() * 2 > _CONV_SPLIT_BYTES:
            return self._split_time(used, n_out)
        return F.conv3d(used, self.weight, self.bias, self.stride)

    def _split_time(self, buf: Tensor, n_out: int) -> Tensor:
        # Same result as one conv: each part sees its k_t−1 preceding frames.
        kt = self.kernel_size[0]
        parts = int(buf.numel() * 2 / _CONV_SPLIT_BYTES) + 1
        first = F.conv3d(buf[:, :, :kt], self.weight, self.bias)
        out = empty_like_layout(first, first.shape[0], first.shape[1], n_out, first.shape[3], first.shape[4])
        for idx in torch.arange(n_out).chunk(parts):
            a, e = int(idx[0]), int(idx[-1]) + 1
            out[:, :, a:e] = F.conv3d(buf[:, :, a : e + kt - 1], self.weight, self.bias)
        return out

    def forward(self, x: Tensor, ctx: CausalContext) -> Tensor:
        return self.conv(self.pad(x, ctx), ctx)


class Conv1x1(nn.Linear):
    """A per-position linear map over channels, stored as Linear (weight (out, in)).

    (B, C, *) → (B, C', *), run as a 1×1 convolution so channels-first inputs are not transposed.
    """

    def forward(self, x: Tensor) -> Tensor:
        kernel = self.weight.view(*self.weight.shape, *([1] * (x.ndim - 2)))
        conv = F.conv3d if x.ndim == 5 else F.conv2d
        return conv(x, kernel, self.bias)


class Attention(nn.Module):
    """Causal temporal self-attention at each spatial position, head_dim 32, L2-normalised q and k.

    (B, C, T, H, W) → (B, C, T, H, W). Positions are independent, so the image is processed in slabs
    of rows: projections, scores and outputs exist for one slab at a time (≤ 1/8 of the frame and ≤ 2^15
    positions, Genmo's CUDA limit). Keys and values of earlier chunks come from the context, per slab.
    """

    def __init__(self, dim: int, head_dim: int = 32) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.heads = dim // head_dim
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=True)

    def forward(self, x: Tensor, ctx: CausalContext) -> Tensor:
        b, c, t, h, w = x.shape
        past = ctx.tails.get(self) if ctx.started else None
        out = empty_like_layout(x, b, c, t, h, w)
        slab = max(1, min(-(-h // 8), _ATTN_ROWS // (b * w)))
        stored = []
        for i, h0 in enumerate(range(0, h, slab)):
            xs = x[:, :, :, h0 : h0 + slab]
            hs = xs.shape[3]
            rows = rearrange(xs, "b c t h w -> (b h w) t c")
            y, kv = self._rows(rows, past[i] if past is not None else None, ctx.carry)
            stored.append(kv)
            out[:, :, :, h0 : h0 + hs] = rearrange(y, "(b h w) t c -> b c t h w", b=b, h=hs, w=w)
        if ctx.carry:
            ctx.tails[self] = stored
        return out

    def _rows(
        self, rows: Tensor, past: tuple[Tensor, Tensor] | None, carry: bool
    ) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        """(rows, t, C) → (rows, t, C), and the keys and values to carry (rows, heads, T_seen, 32)."""
        c, t = rows.shape[2], rows.shape[1]
        if t == 1 and past is None and not carry:
            # A single frame attends only to itself: the output is its value (Genmo's T == 1 branch).
            return self.out(F.linear(rows, self.qkv.weight[2 * c :])), None
        qkv = self.qkv(rows).unflatten(2, (3, self.heads, self.head_dim))
        q, k, v = (u.transpose(1, 2) for u in qkv.unbind(2))  # (rows, heads, t, head_dim)
        q = F.normalize(q, p=2, dim=-1).to(qkv.dtype)
        k = F.normalize(k, p=2, dim=-1).to(qkv.dtype)
        if past is not None:
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)
        kept = (k, v.contiguous()) if carry else None
        n_past = k.shape[2] - t
        if k.shape[2] == 1:
            return self.out(v.transpose(1, 2).flatten(2)), kept
        mask = None
        if n_past:
            # Query i (absolute position n_past + i) sees keys 0 .. n_past + i.
            pos = torch.arange(k.shape[2], device=rows.device)
            mask = pos[None, :] <= pos[n_past:, None]
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, scale=self.head_dim**-0.5
        )
        return self.out(y.transpose(1, 2).flatten(2)), kept


class AttentionBlock(nn.Module):
    """x + Attention(GroupNormSpatial(x))."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = GroupNormSpatial(dim)
        self.attn = Attention(dim)

    def forward(self, x: Tensor, ctx: CausalContext) -> Tensor:
        y = self.attn(self.norm(x), ctx)
        y += x
        return y


class ResBlock(nn.Module):
    """x + [GroupNorm, SiLU, CausalConv3d 3³, GroupNorm, SiLU, CausalConv3d 3³](x), then optional attention.

    Intermediates are released as soon as they are consumed: at most the input, one padded stream and one
    conv output are alive at once.
    """

    def __init__(self, channels: int, attention: bool = False) -> None:
        super().__init__()
        self.stack = nn.ModuleList(
            [
                GroupNormSpatial(channels),
                nn.SiLU(),
                CausalConv3d(channels, channels, (3, 3, 3), (1, 1, 1)),
                GroupNormSpatial(channels),
                nn.SiLU(),
                CausalConv3d(channels, channels, (3, 3, 3), (1, 1, 1)),
            ]
        )
        self.attn_block = AttentionBlock(channels) if attention else nn.Identity()

    def forward(self, x: Tensor, ctx: CausalContext) -> Tensor:
        h = F.silu(self.stack[0](x), inplace=True)
        buf = self.stack[2].pad(h, ctx)
        del h
        h = self.stack[2].conv(buf, ctx)
        del buf
        h = F.silu(self.stack[3](h), inplace=True)
        buf = self.stack[5].pad(h, ctx)
        del h
        h = self.stack[5].conv(buf, ctx)
        del buf
        h += x
        if isinstance(self.attn_block, AttentionBlock):
            h = self.attn_block(h, ctx)
        return h


class CausalUpsampleBlock(nn.Module):
    """ResBlocks, a Conv1x1 to C_out·te·se², then depth-to-space-time (genmo-mochi.md §2.1).

    (B, C_in, T, H, W) → (B, C_out, T·te − d, H·se, W·se), where the first chunk drops d = te−1 leading
    frames (Genmo drops them inside the block; diffusers keeps them and drops five at the very end).
    The projection runs a few frames at a time and writes straight into the output, so the wide
    pre-shuffle tensor never exists whole.
    """

    def __init__(self, cin: int, cout: int, num_res_blocks: int, te: int, se: int) -> None:
        super().__init__()
        self.te, self.se = te, se
        self.blocks = nn.ModuleList([ResBlock(cin) for _ in range(num_res_blocks)])
        self.proj = Conv1x1(cin, cout * te * se * se)

    def forward(self, x: Tensor, ctx: CausalContext) -> Tensor:
        for block in self.blocks:
            x = block(x, ctx)
        te, se = self.te, self.se
        b, _, t, h, w = x.shape
        cout = self.proj.out_features // (te * se * se)
        drop = 0 if ctx.started else te - 1
        out = empty_like_layout(x, b, cout, t * te - drop, h * se, w * se)
        step = max(1, -(-t // 8))
        for t0 in range(0, t, step):
            n = min(step, t - t0)
            y = self.proj(x[:, :, t0 : t0 + n])
            y = y.view(b, cout, te, se, se, n, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4)
            f0 = t0 * te - drop
            if f0 >= 0:
                out[:, :, f0 : f0 + n * te].view(b, cout, n, te, h, se, w, se).copy_(y)
            else:
                out[:, :, : f0 + n * te] = y.reshape(b, cout, n * te, h * se, w * se)[:, :, -f0:]
        return out


class DownsampleBlock(nn.Module):
    """A strided causal conv (kernel = stride = (te, se, se)) then ResBlocks with attention.

    (B, C_in, T, H, W) → (B, C_out, T', H/se, W/se), T' = (T + te − 1)/te for the first chunk.
    """

    def __init__(self, cin: int, cout: int, num_res_blocks: int, te: int, se: int, attention: bool) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            [CausalConv3d(cin, cout, (te, se, se), (te, se, se))]
            + [ResBlock(cout, attention) for _ in range(num_res_blocks)]
        )

    def forward(self, x: Tensor, ctx: CausalContext) -> Tensor:
        for layer in self.layers:
            x = layer(x, ctx)
        return x


def fourier_features(x: Tensor, start: int = 6, stop: int = 8) -> Tensor:
    """RGB in [−1, 1] → 15 channels [x, sin(2π·2^k·x), cos(2π·2^k·x)], k = 6, 7, channel-interleaved.

    (B, 3, T, H, W) → (B, 15, T, H, W) in fp32 (genmo-mochi.md §2.3: lower precision shows artifacts).
    """
    x = x.float()
    freqs = torch.pow(2.0, torch.arange(start, stop, device=x.device, dtype=torch.float32)) * (2 * torch.pi)
    n = freqs.numel()
    h = x.repeat_interleave(n, dim=1) * freqs.repeat(x.shape[1]).view(1, -1, 1, 1, 1)
    return torch.cat([x, torch.sin(h), torch.cos(h)], dim=1)
