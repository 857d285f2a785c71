"""ggml's Q8_0 and Q4_0 blocks: quantize, dequantize, and a Linear that keeps its weight in them.

Both formats cut each weight row into blocks of 32 values along the input axis; a block is a little-endian
fp16 scale ``d`` followed by the quantized values (ggml's ``block_q8_0`` / ``block_q4_0``):

  Q8_0  34 bytes: d, then 32 int8 q; value = d·q.                                    1.0625 bytes/weight
  Q4_0  18 bytes: d, then 16 bytes of nibbles; weights 0–15 are the low nibbles of the 16 bytes and
        16–31 the high ones; value = d·(q − 8).                                       0.5625 bytes/weight

A quantized weight of shape (out, in) is stored as a uint8 tensor (out, in/32·bytes-per-block), the
layout of Kijai's GGUF-in-safetensors Mochi files (``<layer>.Q8_0_qweight``) and of a row-major ``.gguf``
tensor's data. Rows stay independent, so fusing or reordering output rows (a key map's ``cat``/``swap``)
works on the bytes directly.

The quantizers reproduce ``gguf.quants`` (ggml's reference rounding) byte for byte, and dequantization
forms d·q in fp32, as ``gguf.quants`` does (exact: an fp16 scale times a small integer), then rounds once
to the compute dtype; ``tests/test_quantize_ggml.py`` checks both against the ``gguf`` package.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from mochi.weights.io import WeightsError

BLOCK = 32
# Block type → bytes per block of 32 weights.
BLOCK_BYTES = {"Q8_0": 2 + BLOCK, "Q4_0": 2 + BLOCK // 2}
# Checkpoint key of a quantized weight: "<layer>.<TYPE>_qweight" (Kijai's naming).
QWEIGHT = re.compile(r"^(?P<layer>.+)\.(?P<kind>[A-Za-z0-9_]+?)_qweight$")


def check_kind(kind: str, where: str = "") -> str:
    """``kind`` if it is a supported block type, else a one-line WeightsError naming it."""
    if kind not in BLOCK_BYTES:
        at = f" ({where})" if where else ""
        raise WeightsError(
            f"GGUF block type {kind!r}{at} is not supported; mochi reads {', '.join(BLOCK_BYTES)} "
            "(requantize the file to Q8_0 or Q4_0, e.g. with mochi convert --quantize q8_0)"
        )
    return kind


def byte_shape(shape: tuple[int, int], kind: str) -> tuple[int, int]:
    """(out, in) weight shape → (out, in/32·bytes-per-block) storage shape; ``in`` must divide by 32."""
    out_features, in_features = shape
    if in_features % BLOCK:
        raise ValueError(f"a {kind} weight needs in_features divisible by {BLOCK}, got {in_features}")
    return out_features, in_features // BLOCK * BLOCK_BYTES[kind]


def weight_shape(shape: tuple[int, ...], kind: str) -> tuple[int, int]:
    """Storage shape (out, bytes) → the weight's (out, in); raises WeightsError for a bad byte count."""
    out_features, nbytes = shape
    per = BLOCK_BYTES[check_kind(kind)]
    if nbytes % per:
        raise WeightsError(f"a {kind} tensor's rows must hold whole {per}-byte blocks, got {nbytes} bytes")
    return out_features, nbytes // per * BLOCK


def logical_shapes(shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Tensor shapes with each ``<layer>.<TYPE>_qweight`` replaced by ``<layer>.weight`` and its (out, in)."""
    out = {}
    for key, shape in shapes.items():
        m = QWEIGHT.match(key)
        if m is None:
            out[key] = tuple(shape)
        else:
            out[m["layer"] + ".weight"] = weight_shape(tuple(shape), check_kind(m["kind"], key))
    return out


def block_kinds(keys: Iterable[str]) -> dict[str, str]:
    """Layer → block type of every ``<layer>.<TYPE>_qweight`` key; an unsupported type is a WeightsError."""
    return {m["layer"]: check_kind(m["kind"], k) for k in keys if (m := QWEIGHT.match(k))}


def _roundf(x: torch.Tensor) -> torch.Tensor:
    """Round half away from zero, written as ggml's reference (``gguf.quants.np_roundf``) writes it."""
    a = x.abs()
    floored = a.floor()
    return torch.sign(x) * (floored + (2 * (a - floored)).floor())


def _inverse(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d == 0, torch.zeros_like(d), 1 / d)


def quantize(weight: torch.Tensor, kind: str) -> torch.Tensor:
    """(out, in) float weight → (out, in/32·bytes-per-block) uint8 blocks, as ``gguf.quants.quantize``."""
    out_features, in_features = weight.shape
    shape = byte_shape((out_features, in_features), check_kind(kind))
    blocks = weight.detach().to(torch.float32).reshape(-1, BLOCK)
    if kind == "Q8_0":
        d = blocks.abs().amax(dim=1, keepdim=True) / 127
        qs = _roundf(blocks * _inverse(d)).to(torch.int8).view(torch.uint8)
    else:
        # The signed value of largest magnitude (the first such) maps to −8: d = max / −8.
        imax = blocks.abs().argmax(dim=1, keepdim=True)
        d = blocks.gather(1, imax) / -8
        q = (blocks * _inverse(d) + 8.5).trunc().clamp(0, 15).to(torch.uint8)
        qs = q[:, : BLOCK // 2] | (q[:, BLOCK // 2 :] << 4)
    scale = d.to(torch.float16).view(torch.uint8)  # (n, 2): the fp16 scale's little-endian bytes
    return torch.cat([scale, qs], dim=1).reshape(shape)


def block_scales(qweight: torch.Tensor, kind: str) -> torch.Tensor:
    """The fp16 scale ``d`` of every block of a quantized weight (out, bytes): (out, blocks) float16.
    A NaN or infinite one makes its 32 weights so (``mochi.finite.check_finite`` reads these)."""
    rows = qweight.reshape(qweight.shape[0], -1, BLOCK_BYTES[kind])
    return rows[..., :2].contiguous().view(torch.float16).squeeze(-1)


def dequantize(qweight: torch.Tensor, kind: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(out, bytes) uint8 blocks → (out, in) weight in ``dtype`` (d·q formed in fp32, rounded once)."""
    out_features, in_features = weight_shape(tuple(qweight.shape), kind)
    blocks = qweight.reshape(-1, BLOCK_BYTES[kind])
    d = blocks[:, :2].contiguous().view(torch.float16).to(torch.float32)  # (n, 1)
    qs = blocks[:, 2:]
    if kind == "Q8_0":
        q = qs.contiguous().view(torch.int8).to(torch.float32)
    else:
        q = torch.cat([qs & 0x0F, qs >> 4], dim=1).to(torch.float32) - 8
    return (d * q).reshape(out_features, in_features).to(dtype)


class GgufLinear(nn.Linear):
    """A Linear whose weight stays in ggml blocks and is dequantized to the input's dtype at each call.

    ``<kind>_qweight``: (out, in/32·bytes-per-block) uint8 parameter without gradient, named as Kijai's
    files name the key; bias: (out,) or None. forward: x (..., in) → (..., out) in x's dtype. ``weight``
    reads the uint8 blocks (for their device), so code that needs a float weight must call
    ``dequantized``. The blocks are a parameter, not a buffer, so that FSDP2 shards them by rows (whole
    output channels, whole blocks) like any weight: a buffer would be replicated on every rank.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kind: str,
        bias: bool = True,
        device: torch.device | str | None = None,
        bias_dtype: torch.dtype | None = None,
    ) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features, self.kind = in_features, out_features, check_kind(kind)
        shape = byte_shape((out_features, in_features), kind)
        blocks = torch.empty(shape, dtype=torch.uint8, device=device)
        self.register_parameter(f"{kind}_qweight", nn.Parameter(blocks, requires_grad=False))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=bias_dtype)) if bias else None

    @classmethod
    def like(cls, linear: nn.Linear, kind: str) -> GgufLinear:
        """An empty GgufLinear with ``linear``'s shape, device and bias dtype (meta stays meta)."""
        bias = linear.bias is not None
        return cls(
            linear.in_features,
            linear.out_features,
            kind,
            bias,
            device=linear.weight.device,
            bias_dtype=linear.bias.dtype if bias else None,
        )

    @classmethod
    def from_linear(cls, linear: nn.Linear, kind: str) -> GgufLinear:
        """``linear`` quantized to ``kind`` blocks (its bias kept as it is)."""
        new = cls.like(linear, kind)
        setattr(new, f"{kind}_qweight", nn.Parameter(quantize(linear.weight, kind), requires_grad=False))
        if linear.bias is not None:
            new.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
        return new

    @property
    def qweight(self) -> torch.Tensor:
        return getattr(self, f"{self.kind}_qweight")

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        return self.qweight

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.qweight, self.kind, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized(x.dtype), bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, kind={self.kind}"
        )


def swap_in_gguf(model: nn.Module, kinds: dict[str, str]) -> list[str]:
    """Replace the named ``nn.Linear`` submodules (layer → block type) by empty `GgufLinear`s, in place.

    Raises WeightsError naming a layer that is not a Linear (only Linear weights can be block-quantized).
    """
    for name, kind in kinds.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise WeightsError(
                f"quantized weight {name}.{kind}_qweight names no layer of the model"
            ) from None
        if not isinstance(module, nn.Linear):
            raise WeightsError(
                f"quantized weight {name}.{kind}_qweight belongs to a {type(module).__name__}; "
                "only Linear weights can be stored in ggml blocks"
            )
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, GgufLinear.like(module, kind))
    return list(kinds)
