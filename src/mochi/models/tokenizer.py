"""Prompt tokenizers: T5's SentencePiece vocabulary read from a model folder; a byte tokenizer, no files.

Every tokenizer here gives ids *without* the end token; ``tokenize_prompts`` appends it, truncates, pads and
builds the mask, so truncation and the empty-prompt rule are the same whichever tokenizer is used.
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import torch

SPIECE_UNDERLINE = "▁"


class PromptTruncatedWarning(UserWarning):
    """A prompt was longer than the text encoder's context and its end was dropped."""


@contextlib.contextmanager
def truncations(*more: type[Warning]) -> Iterator[list[str]]:
    """Collect the `PromptTruncatedWarning` messages (and those of the ``more`` categories) raised in the
    block, in the list yielded, filled when the block ends, instead of printing them; other warnings go on as
    they would have."""
    said: list[str] = []
    kinds = (PromptTruncatedWarning, *more)
    with warnings.catch_warnings(record=True) as caught:
        for kind in kinds:
            warnings.simplefilter("always", kind)
        yield said
    for w in caught:
        if issubclass(w.category, kinds):
            said.append(str(w.message))
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def _warn_truncated(message: str) -> None:
    """``warnings.warn(message, PromptTruncatedWarning, stacklevel=2)`` from ``tokenize_prompts``'s caller,
    but shown at every call and kept in no ``__warningregistry__``: under the "default" action that registry
    keeps each distinct text it showed for the life of the process, and each message names its prompt, so a
    long-lived pipeline or server grew by one entry per long prompt (4000 prompts: 4000 entries)."""
    caller = sys._getframe(2)
    warnings.warn_explicit(
        message,
        PromptTruncatedWarning,
        caller.f_code.co_filename,
        caller.f_lineno,
        module=caller.f_globals.get("__name__"),
        module_globals=caller.f_globals,
    )


class Tokenizer(Protocol):
    pad_id: int
    eos_id: int
    vocab_size: int

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without the end token."""
        ...


class ByteTokenizer:
    """UTF-8 bytes shifted by 3 (pad 0, end 1, unknown 2, as in T5/ByT5): vocabulary 259, no files needed.

    Used by the embedded tiny model, whose T5 is trained on this vocabulary.
    """

    pad_id = 0
    eos_id = 1
    unk_id = 2
    offset = 3
    vocab_size = 256 + offset

    def encode(self, text: str) -> list[int]:
        return [b + self.offset for b in text.encode("utf-8")]

    def decode(self, ids: list[int]) -> str:
        """Inverse of ``encode``; special ids are skipped."""
        return bytes(i - self.offset for i in ids if i >= self.offset).decode("utf-8", errors="replace")


class SentencePieceTokenizer:
    """T5's ``spiece.model`` via ``sentencepiece``, reproducing HF's ``T5Tokenizer(legacy=False)`` (Genmo).

    ``legacy=False`` adds a leading "▁" itself and encodes ``"<unk>" + text`` on a model without the dummy
    prefix, dropping the ``<unk>`` pieces, so that text after the first is not given an extra space. The same
    result comes from this model (dummy prefix on) by encoding ``"<unk>▁" + text`` and dropping the pieces of
    ``"<unk>"``: whitespace starts a new piece, so the split point is the same. Special-token strings inside
    a prompt (``"</s>"``) are encoded as plain text, where HF would map them to their ids.
    """

    def __init__(self, model_file: str | os.PathLike) -> None:
        import sentencepiece

        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
        self.pad_id = max(self.sp.pad_id(), 0)
        self.eos_id = self.sp.eos_id()
        self.vocab_size = self.sp.get_piece_size()
        self._prefix = len(self.sp.encode("<unk>"))

    def encode(self, text: str) -> list[int]:
        if not text:
            return []
        text = SPIECE_UNDERLINE + text.replace(SPIECE_UNDERLINE, " ")
        return self.sp.encode("<unk>" + text)[self._prefix :]


class JsonTokenizer:
    """A ``tokenizer.json`` (as saved by ``T5TokenizerFast``) through the ``tokenizers`` library."""

    def __init__(self, path: str | os.PathLike) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        self.tok = HFTokenizer.from_file(str(path))
        eos, pad = self.tok.token_to_id("</s>"), self.tok.token_to_id("<pad>")
        if eos is None:
            raise ValueError(
                f"tokenizer {str(path)!r} has no '</s>' token; a T5 tokenizer.json has it at id 1"
            )
        self.eos_id = eos
        self.pad_id = 0 if pad is None else pad
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        # The file's post-processor would append </s>; tokenize_prompts does that for every tokenizer.
        return self.tok.encode(text, add_special_tokens=False).ids


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """The T5 tokenizer of a model folder (or its ``tokenizer/`` subfolder), or a tokenizer file itself.

    ``spiece.model`` is preferred (Genmo uses the SentencePiece tokenizer), then ``tokenizer.json``.
    """
    path = Path(path)
    if path.is_file():
        if path.suffix == ".json":
            return JsonTokenizer(path)
        if path.suffix == ".model":
            return SentencePieceTokenizer(path)
        raise ValueError(f"tokenizer file {str(path)!r} is neither a tokenizer.json nor a spiece.model")
    looked = []
    for folder in (path, path / "tokenizer"):
        for name, cls in (("spiece.model", SentencePieceTokenizer), ("tokenizer.json", JsonTokenizer)):
            looked.append(str(folder / name))
            if (folder / name).is_file():
                return cls(folder / name)
    raise ValueError(f"no T5 tokenizer found; looked for {', '.join(looked)}")


def tokenize_prompts(
    prompts: list[str], tokenizer: Tokenizer, max_length: int = 256, names: list[str] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids (B, max_length) int64 and mask (B, max_length) bool, right-padded, end token appended.

    A prompt longer than ``max_length − 1`` tokens keeps its first ``max_length − 1`` and the end token (HF's
    ``truncation=True``), with a ``PromptTruncatedWarning`` saying how many were dropped and naming the prompt
    (``names[row]``, default "prompt {row}"). The empty string
    gets no tokens at all: pad ids and an all-False mask (Genmo, genmo-mochi.md §3.5). Diffusers instead
    gives it one valid end token unless ``force_zeros_for_empty_prompt`` is set (diffusers-mochi.md §4.5).
    """
    if isinstance(prompts, str):
        raise ValueError(
            f"prompts must be a list of strings, got the string {prompts!r}; wrap it: [{prompts!r}]"
        )
    wrong = next(((row, p) for row, p in enumerate(prompts) if not isinstance(p, str)), None)
    if wrong is not None:
        raise TypeError(
            f"prompts must be a list of strings, but prompt {wrong[0]} is {wrong[1]!r} "
            f"({type(wrong[1]).__name__})"
        )
    if max_length < 1:
        raise ValueError(f"max_length must be at least 1 (room for the end token), got {max_length}")
    ids = torch.full((len(prompts), max_length), tokenizer.pad_id, dtype=torch.int64)
    mask = torch.zeros((len(prompts), max_length), dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        if prompt == "":
            continue
        tokens = tokenizer.encode(prompt)
        if len(tokens) > max_length - 1:
            dropped = len(tokens) - (max_length - 1)
            name = names[row] if names else f"prompt {row}"
            _warn_truncated(
                f"{name} is {len(tokens) + 1} tokens long (with the end token) but the text encoder "
                f"takes {max_length}: the last {dropped} tokens were dropped (prompt starts {prompt[:40]!r})"
            )
            tokens = tokens[: max_length - 1]
        tokens = [*tokens, tokenizer.eos_id]
        ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.int64)
        mask[row, : len(tokens)] = True
    return ids, mask
