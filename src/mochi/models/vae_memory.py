"""Peak-memory estimates for tiled, chunked VAE decoding and encoding.

The estimate walks the model's layers with the shapes one (tile, chunk) step sees and takes the largest
set of tensors that are alive together in our implementation (`vae_blocks`): in a ResBlock the input, a
padded stream and a conv output; in an upsampling block its input, its output and one projected group.
To that it adds the causal context carried between chunks (in the first chunk only what earlier layers
have stored so far, in later chunks all of it), the float32 output accumulators and the blend-weight
map. Weights are not counted, nor backend workspaces: with channels-last activations and weights,
oneDNN allocates none of note on CPU (benchmarks/vae_vs_diffusers.py checks the estimate against
measured runs); cuDNN's workspace on GPU is not included. The exception, counted with ``cpu=True``:
small fp32 convs of one video, which PyTorch runs on the CPU with its own kernel and a column buffer 27
times their output (tests/memory_probe.py measures one such decode and encode).
"""

from __future__ import annotations

import torch

from mochi.models.vae import SPATIAL_FACTOR, DecoderConfig, EncoderConfig, num_frames_for_latents


def _resblock(c: int, t: int, h: int, w: int, b: int = 1, cpu_fp32: bool = False) -> tuple[int, int]:
    """(peak elements per sample inside one ResBlock, elements of the context its two convs carry)."""
    n = c * t * h * w
    padded = c * (t + 2) * (h + 2) * (w + 2)
    # Measured on CPU: below 128 channels oneDNN copies the conv input into its blocked layout.
    reorder = padded if c < 128 else 0
    # On CPU PyTorch runs an fp32 conv of one sample whose input has C·T·H ≤ 20480 elements with its own
    # kernel rather than oneDNN's (aten's use_mkldnn heuristic; a batch above 1 always takes oneDNN): a
    # contiguous copy of the input and a 27·C·t·h·w column matrix, 27 times the output (short chunks of
    # narrow models and small tiles).
    if cpu_fp32 and b == 1 and c * (t + 2) * (h + 2) <= 20480:
        reorder = padded + 27 * n
    return 2 * n + padded + reorder, 2 * c * 2 * (h + 2) * (w + 2)


def _decoder_step(
    cfg: DecoderConfig, b: int, n: int, h: int, w: int, first: bool, carry: bool, total: int, cpu_fp32: bool
) -> tuple[int, int]:
    """(peak elements, carried-context elements) for one chunk of n latents on an h×w tile.

    `total` is the context all layers carry; it is alive throughout a later chunk, while in the first
    chunk only the part stored by layers already run is.
    """
    ch, nrb = cfg.channels, cfg.num_res_blocks
    carried = 0

    def alive() -> int:
        return 0 if not carry else carried if first else total

    peak = b * (cfg.latent_dim + ch[-1]) * n * h * w
    t = n

    def resblocks(c: int, count: int) -> None:
        nonlocal peak, carried
        for _ in range(count):
            p, k = _resblock(c, t, h, w, b, cpu_fp32)
            peak = max(peak, b * p + alive())
            carried += b * k

    resblocks(ch[-1], nrb[-1])
    for i in range(len(ch) - 1):
        cin, cout = ch[-i - 1], ch[-i - 2]
        te, se = cfg.temporal_expansions[-i - 1], cfg.spatial_expansions[-i - 1]
        resblocks(cin, nrb[-i - 2])
        t_out = t * te - (te - 1 if first else 0)
        n_in, n_out = cin * t * h * w, cout * t_out * h * w * se * se
        group = 2 * cout * te * se * se * -(-t // 8) * h * w
        peak = max(peak, b * (n_in + n_out + group) + alive())
        t, h, w = t_out, h * se, w * se
    resblocks(ch[0], nrb[0])
    peak = max(peak, b * (ch[0] + cfg.out_channels) * t * h * w + alive())
    return peak, carried


def estimate_decode_memory(
    cfg: DecoderConfig,
    latent_shape: tuple[int, int, int, int],
    tile: tuple[int, int],
    chunk: int,
    dtype: torch.dtype = torch.float32,
    cpu: bool = False,
) -> int:
    """Bytes of peak memory, weights excluded, to decode a (B, t, h, w) latent with this split.

    Includes the float32 output (B, 3, 6t−5, 8h, 8w) and the blend-weight map. cpu: on the CPU, where
    small fp32 convs take PyTorch's own kernel and its column buffer.
    """
    b, t, h, w = latent_shape
    th, tw = min(tile[0], h), min(tile[1], w)
    chunk = min(chunk, t)
    size = torch.tensor([], dtype=dtype).element_size()
    carry = chunk < t
    cpu_fp32 = cpu and dtype == torch.float32
    total = _decoder_step(cfg, b, 1, th, tw, True, False, 0, cpu_fp32)[1]
    step = _decoder_step(cfg, b, chunk, th, tw, True, carry, total, cpu_fp32)[0]
    if carry:
        step = max(step, _decoder_step(cfg, b, chunk, th, tw, False, True, total, cpu_fp32)[0])
    s = SPATIAL_FACTOR
    output = 4 * (b * cfg.out_channels * num_frames_for_latents(t) * h * w * s * s + h * w * s * s)
    return step * size + output


def _encoder_step(
    cfg: EncoderConfig,
    b: int,
    n: int,
    t_all: int,
    h: int,
    w: int,
    first: bool,
    carry: bool,
    total: int,
    cpu_fp32: bool,
) -> tuple[int, int]:
    """(peak elements, carried-context elements) for one chunk of n latents (6n−5 or 6n frames).

    The carried context includes every attention layer's keys and values for all frames seen (counted
    at the whole video's length, which the last chunk reaches); `total` is as in `_decoder_step`.
    """
    ch, nrb, att = cfg.channels, cfg.num_res_blocks, cfg.has_attentions
    s = SPATIAL_FACTOR
    t = 6 * n - 5 if first else 6 * n
    t_all = 6 * t_all - 5
    hh, ww = h * s, w * s
    carried = 0

    def alive() -> int:
        return 0 if not carry else carried if first else total

    # Fourier features: input, the interleaved copy, its scaled copy, sines, cosines, the 15 channels.
    peak = b * t * hh * ww * (3 + 6 + 6 + 6 + 6 + 15)

    def resblocks(c: int, count: int, attention: bool) -> None:
        nonlocal peak, carried
        for _ in range(count):
            p, k = _resblock(c, t, hh, ww, b, cpu_fp32)
            peak = max(peak, b * p + alive())
            carried += b * k
            if attention:
                # Input, its norm and the output whole; projections, scores and copies for one slab.
                n_el = b * c * t * hh * ww
                slab = min(-(-hh // 8), max(1, 2**15 // (b * ww))) / hh
                peak = max(peak, int(3 * n_el + 10 * n_el * slab) + alive())
                carried += b * 2 * c * t_all * hh * ww

    resblocks(ch[0], nrb[0], att[0])
    for i in range(len(ch) - 1):
        te, se = cfg.temporal_reductions[i], cfg.spatial_reductions[i]
        t_in = t + (te - 1 if first else 0)
        conv = 2 * ch[i] * t_in * hh * ww + ch[i + 1] * t * hh * ww // (te * se * se)
        peak = max(peak, b * conv + alive())
        t, t_all, hh, ww = t_in // te, (t_all + te - 1) // te, hh // se, ww // se
        resblocks(ch[i + 1], nrb[i + 1], att[i + 1])
    resblocks(ch[-1], nrb[-1], att[-1])
    return peak, carried


def estimate_encode_memory(
    cfg: EncoderConfig,
    latent_shape: tuple[int, int, int, int],
    tile: tuple[int, int],
    chunk: int,
    dtype: torch.dtype = torch.float32,
    cpu: bool = False,
) -> int:
    """Bytes of peak memory, weights and the input video excluded, to encode to a (B, t, h, w) latent.
    cpu: as for ``estimate_decode_memory``.

    Includes the carried attention keys and values of the whole video (per tile) and the float32 mean
    and log-variance outputs.
    """
    b, t, h, w = latent_shape
    th, tw = min(tile[0], h), min(tile[1], w)
    chunk = min(chunk, t)
    size = torch.tensor([], dtype=dtype).element_size()
    carry = chunk < t
    cpu_fp32 = cpu and dtype == torch.float32
    total = _encoder_step(cfg, b, 1, t, th, tw, True, False, 0, cpu_fp32)[1]
    step = _encoder_step(cfg, b, chunk, t, th, tw, True, carry, total, cpu_fp32)[0]
    if carry:
        step = max(step, _encoder_step(cfg, b, chunk, t, th, tw, False, True, total, cpu_fp32)[0])
    output = 4 * (2 * b * cfg.latent_dim * t * h * w + h * w)
    return step * size + output
