"""Where does a held-out composition go wrong: the text encoder's context, or the DiT? (issue 6)

For each prompt, generates ``--seeds`` videos (noise seeds 1000 + i, so not the adherence benchmark's) and
prints how the judge reads them: colour, shape and direction counts. With ``--context OTHER`` it also
generates them from hybrid text features: the positions of the longest common prefix of the prompt and
OTHER (byte tokens: one per character) take OTHER's features. For "a green triangle moving left" with
context "a green circle moving left", "a green " is then encoded as T5 encodes it beside "circle", a
composition it was trained on; if the colour comes back, the T5's context mixing was the cause.
``--suffix-context OTHER`` does the same for the longest common suffix (" triangle moving left" from "a blue
triangle moving left"); with both, every token is encoded as in some trained caption.

``--pooled "A + B - C"`` replaces only the DiT's pooled caption vector (``t5_y_embedder``, added to the
timestep embedding that modulates every block) by the sum and difference of the trained captions' vectors,
the tokens staying the prompt's: "a green circle moving left + a blue triangle moving left - a blue circle
moving left" asks whether a vector composed from trained captions brings the colour back; a single
caption, or "" (the empty prompt's vector), shows what the tokens alone carry.

    PYTHONPATH=src python benchmarks/binding_probe.py "a green triangle moving left" \\
        --context "a green circle moving left" [--suffix-context "a blue triangle moving left"]
        [--pooled "a green circle moving left + a blue triangle moving left - a blue circle moving left"]
        [--model BUNDLE] [--seeds 8]
"""

from __future__ import annotations

import argparse
import re
from collections import Counter

import torch

from mochi.models.dit import PackedText
from mochi.models.prompts import encode_prompts
from mochi.models.tokenizer import ByteTokenizer
from mochi.train.evaluate import generate_from_text
from mochi.train.judge import judge
from mochi.weights.bundle import load_bundle, load_embedded


def verdicts(components, text: tuple[torch.Tensor, torch.Tensor], seeds: int) -> list:
    features, mask = text
    repeated = (features.expand(seeds, -1, -1), mask.expand(seeds, -1))
    videos = generate_from_text(components, repeated, [1000 + i for i in range(seeds)])
    return [judge(video) for video in videos]


def pooled_vector(components, caption: str) -> torch.Tensor:
    """The DiT's pooled caption vector (hidden_size_x,) for ``caption``."""
    features, mask = encode_prompts([caption], components.tokenizer, components.text_encoder)
    packed = PackedText.from_mask(mask.bool())
    dit = components.dit
    return dit.t5_y_embedder(features.flatten(0, 1)[packed.index], packed, dit.dtype)[0].detach()


def composed_vector(components, expression: str) -> torch.Tensor:
    """``"A + B - C"``: the sum of those captions' pooled vectors ("" alone: the empty prompt's)."""
    terms = re.split(r"\s+([+-])\s+", " + " + expression.strip()) if expression.strip() else ["", "+", ""]
    total = 0
    for sign, caption in zip(terms[1::2], terms[2::2]):
        total = total + (1 if sign == "+" else -1) * pooled_vector(components, caption)
    return total


def with_pooled(components, prompt: str, vector: torch.Tensor):
    """A forward hook on the pooling that puts ``vector`` in every row that holds ``prompt``'s own vector
    (the conditional half of classifier-free guidance), leaving the empty prompt's rows alone."""
    own = pooled_vector(components, prompt)

    def hook(module, inputs, out):
        rows = (out - own).abs().amax(dim=-1) < 1e-5
        return torch.where(rows[:, None], vector.to(out.dtype), out)

    return components.dit.t5_y_embedder.register_forward_hook(hook)


def counts(vs: list) -> str:
    return "  ".join(
        f"{field}: " + ", ".join(f"{k} {n}" for k, n in Counter(getattr(v, field) for v in vs).most_common())
        for field in ("color", "shape", "direction")
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("prompts", nargs="+")
    parser.add_argument("--context", help="take the features of the common prefix from this prompt")
    parser.add_argument("--suffix-context", help="take the features of the common suffix from this prompt")
    parser.add_argument(
        "--pooled", help='replace the pooled caption vector by "A + B - C" of trained captions\' vectors'
    )
    parser.add_argument("--model", help="a mochi bundle (default: the embedded model)")
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    c = load_bundle(args.model) if args.model else load_embedded()
    if not isinstance(c.tokenizer, ByteTokenizer):
        raise SystemExit("binding_probe needs a byte-tokenizer model (one token per character)")
    for prompt in args.prompts:
        features, mask = encode_prompts([prompt], c.tokenizer, c.text_encoder)
        print(f"{prompt!r}\n  as is:        {counts(verdicts(c, (features, mask), args.seeds))}")
        hybrid, taken = features.clone(), []
        if args.context:
            other, _ = encode_prompts([args.context], c.tokenizer, c.text_encoder)
            n = next((i for i, (a, b) in enumerate(zip(prompt, args.context)) if a != b), len(prompt))
            hybrid[:, :n] = other[:, :n]
            taken.append(repr(prompt[:n]))
        if args.suffix_context:
            other, _ = encode_prompts([args.suffix_context], c.tokenizer, c.text_encoder)
            pairs = zip(reversed(prompt), reversed(args.suffix_context))
            n = next((i for i, (a, b) in enumerate(pairs) if a != b), len(prompt))
            lo, lo_other = len(prompt) - n, len(args.suffix_context) - n
            hybrid[:, lo : len(prompt)] = other[:, lo_other : len(args.suffix_context)]
            taken.append(repr(prompt[lo:]))
        if taken:
            label = " and ".join(taken) + " from the contexts"
            print(f"  {label}: {counts(verdicts(c, (hybrid, mask), args.seeds))}")
        if args.pooled is not None:
            handle = with_pooled(c, prompt, composed_vector(c, args.pooled))
            try:
                print(f"  pooled vector {args.pooled!r}: {counts(verdicts(c, (features, mask), args.seeds))}")
            finally:
                handle.remove()


if __name__ == "__main__":
    main()
