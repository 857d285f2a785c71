"""Where does a held-out composition go wrong: the text encoder's context, or the DiT? (issue 6)

For each prompt, generates ``--seeds`` videos (noise seeds 1000 + i, so not the adherence benchmark's) and
prints how the judge reads them: colour, shape and direction counts. With ``--context OTHER`` it also
generates them from hybrid text features: the positions of the longest common prefix of the prompt and
OTHER (byte tokens: one per character) take OTHER's features. For "a green triangle moving left" with
context "a green circle moving left", "a green " is then encoded as T5 encodes it beside "circle", a
composition it was trained on; if the colour comes back, the T5's context mixing was the cause.
``--suffix-context OTHER`` does the same for the longest common suffix (" triangle moving left" from "a blue
triangle moving left"); with both, every token is encoded as in some trained caption.

    PYTHONPATH=src python benchmarks/binding_probe.py "a green triangle moving left" \\
        --context "a green circle moving left" [--suffix-context "a blue triangle moving left"]
        [--model BUNDLE] [--seeds 8]
"""

from __future__ import annotations

import argparse
from collections import Counter

import torch

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


if __name__ == "__main__":
    main()
