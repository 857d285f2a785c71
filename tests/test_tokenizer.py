import io
import warnings

import pytest
import torch

from mochi.models.prompts import encode_prompts
from mochi.models.t5 import T5_PRESETS, T5Encoder
from mochi.models.tokenizer import (
    ByteTokenizer,
    JsonTokenizer,
    PromptTruncatedWarning,
    SentencePieceTokenizer,
    load_tokenizer,
    tokenize_prompts,
)

CORPUS = [
    "a red triangle moves left over a blue circle",
    "the quick brown fox jumps over the lazy dog",
    "A cat walks, slowly; then runs!",
    "café naïve 東京 and a yellow square",
]
TEXTS = ["A cat walks", "a red triangle moves left", "the lazy dog, then a fox!", "café 東京"]


@pytest.fixture(scope="module")
def spiece(tmp_path_factory):
    """A tiny SentencePiece model laid out like T5's: pad 0, </s> 1, <unk> 2, nmt_nfkc, dummy prefix on."""
    import sentencepiece

    buf = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 20),
        model_writer=buf,
        vocab_size=48,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        character_coverage=1.0,
        minloglevel=2,
    )
    folder = tmp_path_factory.mktemp("t5_tokenizer")
    (folder / "spiece.model").write_bytes(buf.getvalue())
    return folder


def test_byte_tokenizer():
    tok = ByteTokenizer()
    assert tok.vocab_size == 259 and (tok.pad_id, tok.eos_id) == (0, 1)
    assert tok.encode("Aé") == [0x41 + 3, 0xC3 + 3, 0xA9 + 3]
    assert tok.decode([*tok.encode("héllo 🙂"), 1, 0]) == "héllo 🙂"


def test_tokenize_pads_appends_end_token_and_masks():
    ids, mask = tokenize_prompts(["ab", "c"], ByteTokenizer())
    assert ids.shape == mask.shape == (2, 256)
    assert ids.dtype == torch.int64 and mask.dtype == torch.bool
    assert ids[0, :4].tolist() == [ord("a") + 3, ord("b") + 3, 1, 0]
    assert mask.sum(1).tolist() == [3, 2]
    assert not ids[0, 3:].any()


def test_empty_prompt_has_no_tokens():
    ids, mask = tokenize_prompts(["", "x"], ByteTokenizer())
    assert not mask[0].any() and not ids[0].any()
    assert mask[1].sum() == 2
    # A space is not empty (Genmo compares with "" exactly): its byte and the end token.
    assert tokenize_prompts([" "], ByteTokenizer())[1].sum() == 2


def test_truncation_warns_with_the_count():
    prompt = "x" * 300
    with pytest.warns(PromptTruncatedWarning) as record:
        ids, mask = tokenize_prompts(["ok", prompt], ByteTokenizer())
    assert len(record) == 1
    assert str(record[0].message) == (
        "prompt 1 is 301 tokens long (with the end token) but the text encoder takes 256: "
        "the last 45 tokens were dropped (prompt starts 'xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx')"
    )
    assert mask[1].all()
    assert ids[1, 254].item() == ord("x") + 3 and ids[1, 255].item() == 1  # first 255 kept, then </s>
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert tokenize_prompts(["y" * 255], ByteTokenizer())[1].all()  # exactly fits: no warning
    with pytest.raises(ValueError, match="wrap it"):
        tokenize_prompts("a prompt", ByteTokenizer())
    with pytest.raises(TypeError, match=r"^prompts must be a list of strings, but prompt 1 is 3 \(int\)$"):
        tokenize_prompts(["a prompt", 3], ByteTokenizer())  # was int's AttributeError from the tokenizer


def test_truncation_warnings_are_kept_in_no_registry():
    # Under the "default" action the caller's __warningregistry__ kept every distinct message it showed, for
    # the life of the process; each names its prompt, so a server grew by one entry per long prompt.
    registry = globals().setdefault("__warningregistry__", {})
    registry.clear()
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("default")
        for i in range(20):
            tokenize_prompts([f"{i} " + "x" * 300], ByteTokenizer())
        tokenize_prompts(["0 " + "x" * 300], ByteTokenizer())  # the same prompt again is shown again
    assert [w.category for w in shown] == [PromptTruncatedWarning] * 21
    assert {w.filename for w in shown} == {__file__}  # attributed to the caller, as stacklevel=2 was
    assert [k for k in registry if k != "version"] == []


def test_sentencepiece_tokenizer(spiece):
    import sentencepiece

    tok = load_tokenizer(spiece)
    assert isinstance(tok, SentencePieceTokenizer)
    assert (tok.pad_id, tok.eos_id, tok.vocab_size) == (0, 1, 48)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(spiece / "spiece.model"))
    for text in TEXTS:
        # For text not starting with whitespace, legacy=False and plain SentencePiece agree.
        assert tok.encode(text) == sp.encode(text)
    # legacy=False keeps a literal "▁" at the start as a space and does not add a second dummy prefix.
    assert tok.encode("▁A cat") == sp.encode(" A cat")
    assert tok.encode("") == []
    ids, mask = tokenize_prompts(["A cat walks"], tok)
    n = len(sp.encode("A cat walks"))
    assert ids[0, : n + 1].tolist() == [*sp.encode("A cat walks"), 1] and mask[0].sum() == n + 1


def test_tokenizer_json(spiece, tmp_path):
    """A tokenizer.json as T5TokenizerFast saves it (Unigram + Metaspace, post-processor appending </s>)."""
    import sentencepiece
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import Unigram

    sp = sentencepiece.SentencePieceProcessor(model_file=str(spiece / "spiece.model"))
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    tok = Tokenizer(Unigram(vocab, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    folder = tmp_path / "tokenizer"
    folder.mkdir(parents=True)
    tok.save(str(folder / "tokenizer.json"))

    loaded = load_tokenizer(tmp_path)  # found in the tokenizer/ subfolder, as in a diffusers pipeline folder
    assert isinstance(loaded, JsonTokenizer) and (loaded.pad_id, loaded.eos_id) == (0, 1)
    spm_tok = SentencePieceTokenizer(spiece / "spiece.model")
    for text in TEXTS:
        assert loaded.encode(text) == spm_tok.encode(text)
    ids, mask = tokenize_prompts(["A cat walks"], loaded)
    assert (ids[0] == 1).sum() == 1  # the post-processor's </s> is not doubled


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(
        ValueError, match=r"no T5 tokenizer found; looked for .*spiece.model, .*tokenizer.json"
    ):
        load_tokenizer(tmp_path)
    (tmp_path / "vocab.txt").write_text("x")
    with pytest.raises(ValueError, match="neither a tokenizer.json nor a spiece.model"):
        load_tokenizer(tmp_path / "vocab.txt")


def test_encode_prompts_zeroes_empty_prompts():
    torch.manual_seed(0)
    encoder = T5Encoder(T5_PRESETS["t5-tiny"]).eval()
    encoder.initialize_weights(torch.Generator().manual_seed(0))
    tok = ByteTokenizer()
    feats, mask = encode_prompts(["a red square", "", "blue"], tok, encoder)
    assert feats.shape == (3, 256, 32) and feats.dtype == torch.float32
    assert mask.shape == (3, 256) and mask.dtype == torch.bool
    assert not mask[1].any() and not feats[1].any()
    assert mask.sum(1).tolist() == [13, 0, 5]
    ids, m = tokenize_prompts(["blue"], tok)
    with torch.no_grad():
        alone = encoder(ids, m)
    torch.testing.assert_close(feats[2:3], alone, rtol=0, atol=1e-6)  # independent of the batch
    assert feats[0].abs().sum() > 0

    half = T5Encoder(T5_PRESETS["t5-tiny"]).to(torch.bfloat16)
    assert encode_prompts(["x"], tok, half, max_length=16)[0].dtype == torch.float32


def _without_dummy_prefix(proto: bytes) -> bytes:
    """The model proto with normalizer_spec.add_dummy_prefix = False, as HF's legacy=False loads it.

    Protobuf wire format by hand (no protobuf package needed): field 3 of ModelProto is normalizer_spec, and
    appending field 3 (varint 0) to it overrides add_dummy_prefix, since the last value read wins.
    """

    def varint(data, i):
        shift = value = 0
        while True:
            byte = data[i]
            value |= (byte & 0x7F) << shift
            i += 1
            if byte < 0x80:
                return value, i
            shift += 7

    def encode_varint(value):
        out = bytearray()
        while True:
            byte, value = value & 0x7F, value >> 7
            out.append(byte | (0x80 if value else 0))
            if not value:
                return bytes(out)

    out, i = bytearray(), 0
    while i < len(proto):
        start = i
        tag, i = varint(proto, i)
        wire = tag & 7
        if wire == 0:
            _, i = varint(proto, i)
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        else:
            length, j = varint(proto, i)
            i = j + length
            if tag >> 3 == 3:
                body = proto[j:i] + b"\x18\x00"
                out += encode_varint(tag) + encode_varint(len(body)) + body
                continue
        out += proto[start:i]
    return bytes(out)


def test_sentencepiece_matches_hf_legacy_false_algorithm(spiece):
    """HF's T5Tokenizer(legacy=False): '▁' + text, encoded as '<unk>' + that on a model without the dummy
    prefix, the '<unk>' pieces dropped (transformers' SentencePieceBackend._tokenize)."""
    import sentencepiece

    nodummy = sentencepiece.SentencePieceProcessor()
    nodummy.LoadFromSerializedProto(_without_dummy_prefix((spiece / "spiece.model").read_bytes()))
    assert nodummy.encode("A cat") != SentencePieceTokenizer(spiece / "spiece.model").sp.encode("A cat")

    def hf_legacy_false(text):
        text = "▁" + text.replace("▁", " ")
        return nodummy.encode("<unk>" + text)[len(nodummy.encode("<unk>")) :]

    tok = SentencePieceTokenizer(spiece / "spiece.model")
    for text in [
        *TEXTS,
        " A cat",
        "  two  spaces  ",
        "▁lead",
        "a▁b",
        "trailing ",
        "\tTab\nnewline",
        "!?",
        "x",
    ]:
        assert tok.encode(text) == hf_legacy_false(text), text
