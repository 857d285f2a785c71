"""LoRA files: Genmo's format and the diffusers/PEFT format, read with auto-detection, written in either.

**Genmo** (genmo-mochi.md §6.3): keys ``blocks.{i}.attn.qkv_x.lora_A`` (r, in) and ``….lora_B`` (out, r);
safetensors metadata ``{"kwargs": json}`` with ``qkv_proj_lora_{rank,alpha,dropout}`` (qkv_x, qkv_y) and
``out_proj_lora_{rank,alpha,dropout}`` (proj_x, proj_y), which Genmo's loader merges into the model args. We
add ``mochi_lora`` (rank, alpha per target, targets) so other targets keep their alpha.

**diffusers/PEFT**: keys ``transformer.transformer_blocks.{i}.attn1.to_q.lora_A.weight`` … (the
``transformer.`` prefix optional; ``base_model.model.``, ``lora_down/lora_up`` and kohya ``.alpha`` keys are
read too). Alpha comes from ``.alpha`` keys, diffusers' ``lora_adapter_metadata`` header or a PEFT
``adapter_config.json`` beside the file (``alpha_pattern`` and ``use_rslora`` read as PEFT reads them), and
defaults to the rank (scaling 1), as diffusers assumes. We write
with the scaling folded into B and no alpha, which every loader reads the same way.

Layer names follow ``mochi.weights.keymaps.dit_diffusers``: Genmo's fused ``qkv_x`` is diffusers'
``to_q``/``to_k``/``to_v``. One Genmo qkv LoRA (A (r, in), B (3D, r)) becomes three PEFT LoRAs that share A,
each with a third of B's rows. Back: three LoRAs with equal A fuse into one of rank r (a shared alpha
kept); otherwise into one of rank r_q+r_k+r_v with A stacked and B block-diagonal, which computes exactly the
sum of the three. ``swap`` rules (SwiGLU w1, final mod) exchange B's two row halves.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mochi.errors import listing
from mochi.files import safetensors_in
from mochi.finite import NonFiniteError, check_finite
from mochi.models.dit import DIT_PRESETS
from mochi.models.lora import BLOCK_LINEARS, LoraLayer, target_of
from mochi.weights.io import WeightsError, json_object, read_metadata, read_state_dict, save_state_dict
from mochi.weights.keymaps.dit_diffusers import BLOCK_RULES, TOP_RULES

FORMATS = ("genmo", "diffusers")
GENMO_GROUPS = {"qkv_proj": ("qkv_x", "qkv_y"), "out_proj": ("proj_x", "proj_y")}
_PREFIXES = ("transformer.", "base_model.model.", "model.diffusion_model.", "diffusion_model.", "dit.")
_KEY = re.compile(r"^(?P<module>.+?)\.(?P<kind>lora_A|lora_B|lora_down|lora_up)(?:\.default)?(?:\.weight)?$")
_BLOCK = re.compile(r"^(?P<prefix>blocks|transformer_blocks)\.(?P<i>\d+)\.(?P<rel>.+)$")


@dataclass
class LoraFile:
    """A LoRA read from disk: factors by Genmo module path (``blocks.0.attn.qkv_x``), the detected format.

    ``stored`` holds the factors as the file does, by its module path without a prefix (for diffusers'
    format ``transformer_blocks.0.attn1.to_q``: q, k and v apart, before ``from_diffusers`` fuses them).
    """

    layers: dict[str, LoraLayer]
    format: str
    metadata: dict = field(default_factory=dict)
    stored: dict[str, LoraLayer] = field(default_factory=dict)

    @property
    def targets(self) -> tuple[str, ...]:
        found = {target_of(n) or n for n in self.layers}
        return tuple(t for t in BLOCK_LINEARS if t in found) + tuple(sorted(found - set(BLOCK_LINEARS)))

    @property
    def ranks(self) -> set[int]:
        return {layer.rank for layer in self.layers.values()}


# -- the key map, derived from the DiT's Genmo ⇄ diffusers table -------------------------------------------


def _module_rules() -> list[tuple[str, tuple[str, ...], str, str, bool]]:
    """(genmo module, diffusers modules, op, blocks, is_block_rule) for every rule on a ``.weight``."""
    out = []
    for is_block, table in ((False, TOP_RULES), (True, BLOCK_RULES)):
        for r in table:
            if r.genmo.endswith(".weight"):
                mods = tuple(d.removesuffix(".weight") for d in r.diffusers)
                out.append((r.genmo.removesuffix(".weight"), mods, r.op, r.blocks, is_block))
    return out


def _swap(t: torch.Tensor) -> torch.Tensor:
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a])


def _check_rows(name: str, layer: LoraLayer, op: str) -> None:
    """A LoRA on a layer whose output is stacked parts (``split``: q, k and v; ``swap``: two halves that the
    formats store in opposite order) has B rows that divide into them: chunking them otherwise dropped or
    shifted rows, and the file was written without a word."""
    parts = {"split": 3, "swap": 2}.get(op)
    rows = layer.B.shape[0]
    if parts and rows % parts:
        what = "q, k and v stacked" if op == "split" else "two halves that Genmo and diffusers store swapped"
        raise WeightsError(
            f"LoRA layer {name!r} has B with {rows} rows; its layer outputs {what}, so B's rows must be a "
            f"multiple of {parts}: the LoRA was not made for Mochi's DiT"
        )


def _folded(layer: LoraLayer) -> torch.Tensor:
    """B with the scaling alpha/r multiplied in (computed in fp32, stored in B's dtype)."""
    if layer.scaling == 1.0:
        return layer.B
    return (layer.B.float() * layer.scaling).to(layer.B.dtype)


def _text_width(layers: Mapping[str, LoraLayer]) -> int | None:
    """hidden_size_y as the LoRA's own shapes show it, or None: the inputs of ``qkv_y`` and ``mlp_y.w1``,
    the outputs of ``proj_y`` and ``mlp_y.w2``, or ``mod_y`` layers of two row counts, one 4 times the
    other."""
    widths = set()
    for name, layer in layers.items():
        target = target_of(name)
        if target in ("qkv_y", "mlp_y.w1"):
            widths.add(layer.A.shape[1])
        elif target in ("proj_y", "mlp_y.w2"):
            widths.add(layer.B.shape[0])
    rows = {layer.B.shape[0] for name, layer in layers.items() if target_of(name) == "mod_y"}
    if len(rows) == 2 and max(rows) == 4 * min(rows):
        widths.add(min(rows))
    return widths.pop() if len(widths) == 1 else None


def _mod_y_is_last(name: str, layer: LoraLayer, width: int | None) -> bool | None:
    """Whether ``mod_y`` LoRA ``layer`` sits in the DiT's last block, told by B's rows (genmo-mochi.md §1.2):
    4·hidden_y in the blocks that update the text stream, hidden_y (scale only) in the last; None if they do
    not tell. hidden_y is ``width`` (the LoRA's own shapes), else that of the presets of A's visual width."""
    rows, dx = layer.B.shape[0], layer.A.shape[1]
    if width is not None and rows not in (width, 4 * width):
        raise WeightsError(
            f"LoRA layer {name!r} has B with {rows} rows; mod_y has {4 * width} (4·hidden_size_y) or, in the "
            f"last block, {width} (hidden_size_y, as the LoRA's text-stream layers show it)"
        )
    if width is None:
        widths = {c.hidden_size_y for c in DIT_PRESETS.values() if c.hidden_size_x == dx}
        if len(widths) == 1 and rows in (known := widths.pop(), 4 * known):
            width = known
    if width is not None:
        return rows == width
    return True if rows % 4 else None  # 4·hidden_y is a multiple of 4


def to_diffusers(layers: Mapping[str, LoraLayer], depth: int | None = None) -> dict[str, torch.Tensor]:
    """Genmo module paths → diffusers PEFT keys (``transformer.`` prefix), scaling folded into B.

    Two block layers are named by whether their block is the DiT's last, which the indices a LoRA covers do
    not tell: ``proj_y`` and ``mlp_y.*`` exist only in the other blocks; ``mod_y`` (``norm1_context.linear``,
    ``linear_1`` in the last block) is told by B's rows (see ``_mod_y_is_last``). ``depth`` (the DiT's block
    count) is needed only where those rows do not tell; when given, every layer must fit it.
    """
    if depth is not None and depth < 1:
        raise ValueError(f"DiT depth {depth} must be a positive number of blocks, e.g. 48 for Mochi 1")
    rules = _module_rules()
    width = _text_width(layers)
    out: dict[str, torch.Tensor] = {}
    for name, layer in layers.items():
        m = _BLOCK.match(name)
        rel, head = (m.group("rel"), f"transformer_blocks.{m.group('i')}.") if m else (name, "")
        found = [r for r in rules if r[0] == rel and r[4] == bool(m)]
        if not found:
            raise WeightsError(f"LoRA layer {name!r} has no diffusers equivalent in the DiT key map")
        i = int(m.group("i")) if m else -1
        if depth is not None and i >= depth:
            raise WeightsError(
                f"LoRA layer {name!r} is in block {i}, but a DiT of depth {depth} has blocks 0 to "
                f"{depth - 1}; give the depth of the DiT the LoRA was trained for (48 for Mochi 1)"
            )
        last = depth is not None and i == depth - 1
        if any(r[3] == "last" for r in found):  # mod_y, whose rows tell
            told = _mod_y_is_last(name, layer, width)
            if told is None and depth is None:
                raise WeightsError(
                    f"cannot tell whether LoRA layer {name!r} (B with {layer.B.shape[0]} rows) is in the "
                    "DiT's last block, where mod_y has hidden_size_y rows, or another, where it has "
                    "4·hidden_size_y; give the DiT's depth (convert-lora --depth, 48 for Mochi 1)"
                )
            if told is not None and depth is not None and told != last:
                where = "the last block" if told else "a block but the last"
                raise WeightsError(
                    f"LoRA layer {name!r} has the shape of mod_y in {where}, but block {i} is "
                    f"{'' if last else 'not '}the last of a DiT of depth {depth}; give the depth of the DiT "
                    "the LoRA was trained for, or leave --depth out"
                )
            last = told if told is not None else last
        rule = next((r for r in found if r[3] in ("all", "last" if last else "update_y")), None)
        if rule is None:
            raise WeightsError(
                f"LoRA layer {name!r} is in the last block of a DiT of depth {depth}, which has no {rel} "
                "(only the blocks before it have one); give the depth of the DiT the LoRA was trained for"
            )
        _, mods, op, _, _ = rule
        _check_rows(name, layer, op)
        b = _folded(layer)
        if op == "split":
            parts = list(zip(mods, b.chunk(3, dim=0)))
        else:
            parts = [(mods[0], _swap(b) if op == "swap" else b)]
        for mod, b_part in parts:
            out[f"transformer.{head}{mod}.lora_A.weight"] = layer.A.clone()
            out[f"transformer.{head}{mod}.lora_B.weight"] = b_part.clone()
    return out


def _fuse(parts: list[LoraLayer]) -> LoraLayer:
    """Fuse the q, k, v LoRAs into one on the concatenated output: with one A and one alpha (what
    ``to_diffusers`` writes, and PEFT trainers give a file with alpha metadata) B concatenated and that alpha
    kept, exactly; otherwise each scaling folded into its B."""
    if all(torch.equal(p.A, parts[0].A) and p.alpha == parts[0].alpha for p in parts):
        return LoraLayer(parts[0].A, torch.cat([p.B for p in parts]), parts[0].alpha)
    bs = [_folded(p).float() for p in parts]
    if all(torch.equal(p.A, parts[0].A) for p in parts):
        a, b = parts[0].A, torch.cat(bs)
    else:  # rank r_q + r_k + r_v: A stacked, B block-diagonal, so B·A is the three deltas stacked
        a, b = torch.cat([p.A for p in parts]), torch.block_diag(*bs)
    return LoraLayer(a, b.to(parts[0].B.dtype), float(a.shape[0]))


def foreign_layers(layers: Mapping[str, LoraLayer]) -> list[str]:
    """The Genmo-named layers of ``layers`` that Mochi's DiT does not have (not in the DiT key map)."""
    known = {(rule[0], rule[4]) for rule in _module_rules()}  # (module, in a block)
    out = []
    for name in layers:
        m = _BLOCK.match(name)
        where = (m.group("rel"), True) if m else (name, False)
        if where not in known:
            out.append(name)
    return out


def check_stacked_rows(layers: Mapping[str, LoraLayer]) -> None:
    """``_check_rows`` for every Genmo-named layer of ``layers`` on a layer with stacked outputs."""
    rules = _module_rules()
    for name, layer in layers.items():
        m = _BLOCK.match(name)
        rel = m.group("rel") if m else name
        ops = {r[2] for r in rules if r[0] == rel and r[4] == bool(m)}
        if len(ops) == 1:
            _check_rows(name, layer, ops.pop())


def from_diffusers(layers: Mapping[str, LoraLayer]) -> dict[str, LoraLayer]:
    """diffusers module paths (no prefix) → Genmo module paths; q/k/v fused as the module docstring says."""
    rules = _module_rules()
    out: dict[str, LoraLayer] = {}
    pending: dict[str, tuple[tuple[str, ...], dict[str, LoraLayer]]] = {}
    for name, layer in layers.items():
        m = _BLOCK.match(name)
        rel, head = (m.group("rel"), f"blocks.{m.group('i')}.") if m else (name, "")
        rule = next((r for r in rules if rel in r[1] and r[4] == bool(m)), None)
        if rule is None:
            raise WeightsError(f"LoRA layer {name!r} has no Genmo equivalent in the DiT key map")
        genmo, mods, op, _, _ = rule
        if op == "split":
            pending.setdefault(head + genmo, (mods, {}))[1][rel] = layer
        else:
            _check_rows(name, layer, op)
            b = _swap(layer.B) if op == "swap" else layer.B
            out[head + genmo] = LoraLayer(layer.A, b, layer.alpha)
    for name, (mods, parts) in pending.items():
        # A part the LoRA leaves out (PEFT's common target_modules=["to_q", "to_v"]) changes nothing: a zero
        # B of the width of those present (q, k and v are equally wide: the key map splits them in three),
        # on their shared A, so that a LoRA of one A and alpha still fuses exactly.
        present = next(iter(parts.values()))
        if (
            len({(p.A.shape[1], p.B.shape[0]) for p in parts.values()}) > 1
        ):  # torch.cat failed, or fused wrong
            head = f"transformer_blocks.{_BLOCK.match(name).group('i')}."  # q, k and v are block layers
            shapes = ", ".join(f"{head}{m} (in {p.A.shape[1]}, out {p.B.shape[0]})" for m, p in parts.items())
            raise WeightsError(
                f"LoRA layers {shapes} adapt the q, k and v of one Linear of Mochi's DiT ({name}), which are "
                "equally wide and read one input; these differ, so the LoRA was not made for Mochi's DiT"
            )
        zero = LoraLayer(present.A, torch.zeros_like(present.B), present.alpha)
        out[name] = _fuse([parts.get(mod, zero) for mod in mods])
    return out


# -- reading ---------------------------------------------------------------------------------------------


def _lora_file(path: Path) -> Path:
    if not path.is_dir():
        return path
    for name in ("adapter_model.safetensors", "pytorch_lora_weights.safetensors"):
        if (path / name).is_file():
            return path / name
    files = safetensors_in(path)
    if len(files) != 1:
        # A train-lora run folder holds lora.safetensors, its result, beside each checkpoint's LoRA.
        pick = (
            path / "lora.safetensors"
            if (path / "lora.safetensors").is_file()
            else files[-1]
            if files
            else None
        )
        listed = (
            f" ({', '.join(f.name for f in files[:4])}{', …' if len(files) > 4 else ''})" if files else ""
        )
        hint = f", e.g. {str(pick)!r}" if pick else ""
        raise WeightsError(
            f"folder {str(path)!r} holds {len(files)} .safetensors files{listed}; name the LoRA file{hint}"
        )
    if files[0].name.startswith("lora-step-"):  # a train-lora run cut short after its first checkpoint
        raise WeightsError(
            f"folder {str(path)!r} is a train-lora run that has not finished (no lora.safetensors yet); name "
            f"its checkpoint's LoRA to use it, {str(files[0])!r}, or resume the run"
        )
    return files[0]


def is_lora_shaped(path: str | os.PathLike) -> bool:
    """Whether every key of the safetensors file at ``path`` (a LoRA folder's file) is named as a LoRA's
    (factors and alphas, any prefix), whether or not its tensors are usable; False for anything unreadable."""
    from mochi.weights.io import read_keys

    try:
        keys = [_strip(k) for k in read_keys(_lora_file(Path(path)))]
    except (WeightsError, OSError, ValueError):
        return False
    return any(_KEY.match(k) for k in keys) and all(k.endswith(".alpha") or _KEY.match(k) for k in keys)


def lora_stamp(path: str | os.PathLike) -> tuple:
    """What identifies the current content of the LoRA at ``path`` without reading it: device, inode, size and
    modification time of its file (and of a PEFT ``adapter_config.json`` beside it, which may hold its
    alpha). A file replaced (train-lora writes a temporary, then renames it) or written over has another
    stamp; () when there is no such file."""
    try:
        file = _lora_file(Path(path))
    except WeightsError:
        return ()
    stamp = []
    for f in (file, file.parent / "adapter_config.json"):
        with contextlib.suppress(OSError):
            st = f.stat()
            stamp.append((str(f), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(stamp)


def _strip(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for p in _PREFIXES:
            if key.startswith(p):
                key, changed = key[len(p) :], True
    return key


def _alpha(value: object, where: str) -> float:
    """A LoRA alpha read from metadata (a number, or a string holding one); WeightsError naming ``where``."""
    if isinstance(value, (int, float, str)) and not isinstance(value, bool):
        with contextlib.suppress(ValueError):
            return float(value)
    raise WeightsError(f"{where} is {value!r}; a LoRA alpha must be a number such as 16")


def _alpha_map(value: object, where: str) -> dict[str, float]:
    """A JSON object of name → alpha (None for none); WeightsError naming ``where`` otherwise."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise WeightsError(f"{where} is {value!r}; it must be a JSON object of layer name → alpha")
    return {k: _alpha(v, f"{where}[{k!r}]") for k, v in value.items()}


FOLDED_KEY = "mochi_lora_scaling_folded"  # header key of a diffusers-format file whose B holds its scaling


def _peft_alphas(file: Path, metadata: Mapping[str, str]) -> tuple[float | None, dict[str, float], bool]:
    """(global alpha, per-module alpha pattern, use_rslora) from diffusers' header metadata or
    adapter_config.json."""
    conf: dict = {}
    where = ""
    config = file.parent / "adapter_config.json"
    if metadata.get(FOLDED_KEY) == "true":  # written by save_lora: scaling in B, whatever lies beside it
        return None, {}, False
    if "lora_adapter_metadata" in metadata:
        where = f"{str(file)!r}: metadata 'lora_adapter_metadata'"
        raw = json_object(metadata["lora_adapter_metadata"], where)
        conf = {k.split(".", 1)[1] if k.startswith("transformer.") else k: v for k, v in raw.items()}
    elif config.is_file():
        where = f"PEFT config {str(config)!r}"
        conf = json_object(config.read_bytes(), where)
    alpha = conf.get("lora_alpha")
    alpha = _alpha(alpha, f"{where} field 'lora_alpha'") if alpha is not None else None
    pattern = _alpha_map(conf.get("alpha_pattern"), f"{where} field 'alpha_pattern'")
    for key in pattern:
        try:
            re.compile(key)
        except re.error as e:
            raise WeightsError(
                f"{where} field 'alpha_pattern' has key {key!r}, which is not a regular expression ({e}); "
                "PEFT matches each key as one against the module names, e.g. 'to_q'"
            ) from None
    rslora = conf.get("use_rslora", False)
    if not isinstance(rslora, bool):
        raise WeightsError(f"{where} field 'use_rslora' is {rslora!r}; it must be true or false")
    return alpha, pattern, rslora


def _pattern_alpha(name: str, pattern: Mapping[str, float]) -> float | None:
    """The alpha PEFT's ``alpha_pattern`` gives module ``name``: that of the first key matching the whole name
    or its end after a dot, the key read as a regular expression (``peft.utils.other.get_pattern_key``):
    'proj' is ff.net.0.proj's and not add_q_proj's."""
    return next((v for k, v in pattern.items() if re.match(rf"(.*\.)?({k})$", name)), None)


def check_lora_path(path: object, source: str = "LoRA path") -> str | os.PathLike:
    """``path`` when it names something: a string or path-like, not empty. "" was Path(""), the current
    folder, whose one .safetensors file (a model, say) was read as the LoRA; 3 failed in pathlib."""
    if not isinstance(path, str | os.PathLike):
        raise WeightsError(f"{source} {path!r} must be a path (a string), not {type(path).__name__}")
    if not os.fspath(path).strip():
        raise WeightsError(f"{source} {os.fspath(path)!r} is empty; name the LoRA file (or its PEFT folder)")
    return path


def read_lora(path: str | os.PathLike) -> LoraFile:
    """Read a LoRA in Genmo's or the diffusers/PEFT format (detected from its keys) as Genmo-named layers."""
    file = _lora_file(Path(check_lora_path(path)))
    if not file.exists():  # else read_state_dict's "checkpoint ... does not exist" (convert-lora, info)
        raise WeightsError(f"LoRA {str(file)!r} does not exist")
    if file.suffix.lower() == ".gguf":  # it was "damaged, truncated or of another format"
        raise WeightsError(
            f"{str(file)!r} is a GGUF file, a quantized model (mochi info describes it); a LoRA is a "
            ".safetensors file (or a PEFT folder)"
        )
    # Copies, not views of the file's memory map: a LoRA is small, and one applied unmerged is read again at
    # every step, so a file written over in place (cp onto it) changed the next video or, cut short, killed
    # the process with SIGBUS.
    sd = {k: v.clone() for k, v in read_state_dict(file).items()}
    check_finite(sd, f"LoRA {str(file)!r}")
    metadata = read_metadata(file)
    factors: dict[str, dict[str, torch.Tensor]] = {}
    alphas: dict[str, float] = {}
    unknown = []
    seen: dict[str, str] = {}  # stripped key → file key: two names for one tensor would be a silent choice
    for key, t in sd.items():
        k = _strip(key)
        if k in seen:
            raise WeightsError(
                f"{str(file)!r} holds {seen[k]!r} and {key!r}, two names for one tensor ({k!r}); "
                "keep one of them"
            )
        seen[k] = key
        if not k.endswith(".alpha") and not t.is_floating_point():
            raise WeightsError(
                f"{str(file)!r}: {key!r} is {str(t.dtype).removeprefix('torch.')}; LoRA factors are "
                "floating point (float32, bfloat16 or float16)"
            )
        if k.endswith(".alpha"):
            if t.numel() != 1:
                raise WeightsError(
                    f"{str(file)!r}: {key!r} holds {t.numel()} values (shape {tuple(t.shape)}); "
                    "a LoRA alpha is one number"
                )
            alphas[k.removesuffix(".alpha")] = float(t.float().item())
        elif m := _KEY.match(k):
            kind = "A" if m.group("kind") in ("lora_A", "lora_down") else "B"
            factors.setdefault(m.group("module"), {})[kind] = t
        else:
            unknown.append(key)
    if unknown or not factors:
        raise WeightsError(
            f"{str(file)!r} is not a Mochi DiT LoRA: {len(unknown)} keys that are not LoRA factors "
            f"({', '.join(sorted(unknown)[:5])}) and {len(factors)} LoRA layers"
        )
    names = list(factors)
    fmt = "diffusers" if any(n.startswith("transformer_blocks.") for n in names) else "genmo"
    incomplete = sorted(n for n, f in factors.items() if len(f) != 2)
    if incomplete:
        raise WeightsError(f"{str(file)!r}: LoRA layers without both A and B: {incomplete[:5]}")
    if stray := sorted(set(alphas) - set(factors)):  # was ignored: a cut file, or factors under other names
        raise WeightsError(
            f"{str(file)!r}: alpha for {len(stray)} layer{'s' if len(stray) > 1 else ''} without A and B "
            f"({listing(stray, 3)}); every .alpha key goes with the lora_A and lora_B of its layer"
        )
    if fmt == "genmo":
        group_alpha = _genmo_alphas(file, metadata)
    else:
        peft_alpha, pattern, rslora = _peft_alphas(file, metadata)
    layers: dict[str, LoraLayer] = {}
    for name, f in factors.items():
        a, b = f["A"], f["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise WeightsError(
                f"{str(file)!r}: LoRA layer {name!r} has A {tuple(a.shape)} and B {tuple(b.shape)}; "
                "need A (r, in) and B (out, r)"
            )
        if a.shape[0] == 0:
            raise WeightsError(
                f"{str(file)!r}: LoRA layer {name!r} has rank 0 (A {tuple(a.shape)}, B {tuple(b.shape)}); "
                "a LoRA layer needs rank 1 or more"
            )
        if name in alphas:
            alpha = alphas[name]
        elif fmt == "genmo":
            alpha = group_alpha.get(target_of(name) or name, float(a.shape[0]))
        else:
            alpha = _pattern_alpha(name, pattern)
            alpha = (peft_alpha or float(a.shape[0])) if alpha is None else alpha
            if rslora:  # PEFT scales such a LoRA by alpha/√r; ours is alpha/r, so alpha·√r gives the same
                alpha *= math.sqrt(a.shape[0])
        if not math.isfinite(alpha):
            raise NonFiniteError(f"LoRA {str(file)!r}: layer {name!r} has alpha {alpha}; it must be finite")
        layers[name] = LoraLayer(a, b, alpha)
    genmo = from_diffusers(layers) if fmt == "diffusers" else layers
    return LoraFile(genmo, fmt, dict(metadata), stored=layers)


def _genmo_alphas(file: Path, metadata: Mapping[str, str]) -> dict[str, float]:
    """Alpha per target from our ``mochi_lora`` entry, else from Genmo's group kwargs."""
    out: dict[str, float] = {}
    where = f"{str(file)!r}: metadata 'kwargs'"
    kwargs = json_object(metadata.get("kwargs", "{}") or "{}", where)
    for group, targets in GENMO_GROUPS.items():
        key = f"{group}_lora_alpha"
        if kwargs.get(key) is not None:
            out.update(dict.fromkeys(targets, _alpha(kwargs[key], f"{where} field {key!r}")))
    where = f"{str(file)!r}: metadata 'mochi_lora'"
    ours = json_object(metadata.get("mochi_lora", "{}") or "{}", where)
    out.update(_alpha_map(ours.get("alpha"), f"{where} field 'alpha'"))
    return out


# -- writing ---------------------------------------------------------------------------------------------


def _group(target: str) -> str:
    return next((g for g, targets in GENMO_GROUPS.items() if target in targets), target)


def genmo_metadata(layers: Mapping[str, LoraLayer], dropout: float = 0.0, extra: dict | None = None) -> dict:
    """Genmo's ``kwargs`` (group rank/alpha/dropout) and our ``mochi_lora`` entry: safetensors metadata."""
    per_target: dict[str, tuple[int, float]] = {}
    for name, layer in layers.items():
        per_target.setdefault(target_of(name) or name, (layer.rank, layer.alpha))
    kwargs = {}
    for group, targets in GENMO_GROUPS.items():
        found = [per_target[t] for t in targets if t in per_target]
        if found:
            kwargs[f"{group}_lora_rank"], kwargs[f"{group}_lora_alpha"] = found[0]
            kwargs[f"{group}_lora_dropout"] = dropout
    ranks = sorted({layer.rank for layer in layers.values()})
    ours = {
        "rank": ranks[0] if len(ranks) == 1 else ranks,
        "alpha": {t: a for t, (_, a) in per_target.items()},
        "targets": list(per_target),
        **(extra or {}),
    }
    return {"kwargs": json.dumps(kwargs), "mochi_lora": json.dumps(ours)}


def save_lora(
    layers: Mapping[str, LoraLayer],
    path: str | os.PathLike,
    format: str = "genmo",
    dropout: float = 0.0,
    extra: dict | None = None,
    depth: int | None = None,
) -> Path:
    """Write ``layers`` (Genmo module paths) as one safetensors file, atomically, in ``format``.

    Genmo's format holds one alpha per target in the metadata and each layer's as ``<layer>.alpha`` (what
    ComfyUI reads); diffusers' holds none (scaling folded into B).
    ``depth``, the DiT's block count, names the last block's layers in diffusers' format (``to_diffusers``).
    """
    if format not in FORMATS:
        raise ValueError(f"LoRA format {format!r} is unknown; choose one of {list(FORMATS)}")
    path = Path(path)
    if format == "diffusers":
        # The scaling is folded into B (no alpha); the header says so, so that an adapter_config.json beside
        # the file (a PEFT folder converted in place) is not read as its alpha, scaling it twice.
        save_state_dict(to_diffusers(layers, depth), path, {"format": "pt", FOLDED_KEY: "true"})
        return path
    # Genmo's loader uses one alpha per group (qkv_x and qkv_y; proj_x and proj_y), ours one per target; a
    # layer with another alpha than its group's first non-zero one (files converted from elsewhere, or trained
    # with per-target alphas) gets the ratio folded into its B, so both loaders compute the same delta. (A
    # group's first alpha of 0 divided by 0: ZeroDivisionError.)
    alpha: dict[str, float] = {}
    for name, layer in layers.items():
        group = _group(target_of(name) or name)
        if not alpha.get(group):
            alpha[group] = layer.alpha
    fixed: dict[str, LoraLayer] = {}
    for name, layer in layers.items():
        want = alpha[_group(target_of(name) or name)]
        if layer.alpha != want:
            b = (layer.B.float() * (layer.alpha / want)).to(layer.B.dtype)
            layer = LoraLayer(layer.A, b, want)
        fixed[name] = layer
    sd = {}
    for name, layer in fixed.items():
        sd[f"{name}.lora_A"], sd[f"{name}.lora_B"] = layer.A, layer.B
        # ComfyUI reads a LoRA's alpha only from "<layer>.alpha" tensors (Genmo's metadata is read by Genmo
        # and by us): without them a file whose alpha is not its rank ran there at rank/alpha times its
        # strength. Genmo's loader ignores them (it loads the LoRA non-strict).
        sd[f"{name}.alpha"] = torch.tensor(float(layer.alpha))
    save_state_dict(sd, path, genmo_metadata(fixed, dropout, extra))
    return path


def convert_lora(
    src: str | os.PathLike, dst: str | os.PathLike, to: str, overwrite: bool = False, depth: int | None = None
) -> tuple[Path, LoraFile]:
    """Read a LoRA in either format and write it in ``to``; returns the path written and what was read.

    ``depth`` (the DiT's block count) is needed only for a diffusers LoRA on ``mod_y`` whose shapes do not
    tell which block is the last (see ``to_diffusers``)."""
    if to not in FORMATS:
        raise ValueError(f"LoRA format {to!r} is unknown; choose one of {list(FORMATS)}")
    dst = Path(dst)
    if dst.is_dir():
        dst = dst / ("pytorch_lora_weights.safetensors" if to == "diffusers" else "lora.safetensors")
    if dst.suffix.lower() != ".safetensors":  # as convert accepts OUT.SAFETENSORS
        raise ValueError(f"LoRA output {str(dst)!r} must end in .safetensors, e.g. {dst.stem}.safetensors")
    source = _lora_file(Path(src))
    if dst.exists() and source.exists() and os.path.samefile(dst, source):  # a link to it as well
        raise ValueError(
            f"LoRA output {str(dst)!r} is the source {str(source)!r}; converting in place would lose the "
            "original, so choose another DST (--overwrite does not allow this)"
        )
    if dst.exists() and not overwrite:
        raise ValueError(f"{str(dst)!r} exists; pass --overwrite to replace it")
    lora = read_lora(src)
    foreign = foreign_layers(lora.layers) if to == "genmo" else []  # diffusers' names fail to_diffusers
    if foreign:
        raise WeightsError(
            f"{str(source)!r} holds {len(foreign)} layer{'s' if len(foreign) > 1 else ''} that Mochi's DiT "
            "does not have "
            f"({', '.join(sorted(foreign)[:3])}); a Genmo LoRA names Linear layers such as "
            "blocks.0.attn.qkv_x or t5_y_embedder.to_kv (nothing was written)"
        )
    if to == "genmo":  # to_diffusers checks these rows on the way; a Genmo file was copied unchecked
        check_stacked_rows(lora.layers)
    save_lora(lora.layers, dst, to, depth=depth)
    return dst, lora
