"""A sentencepiece BPE model as a Hugging Face tokenizer that encodes and decodes exactly as sentencepiece does.

transformers' own conversion (LlamaTokenizer) assumes Llama's sentencepiece settings: it prepends "▁" to every
input and strips a leading space on decode. llmtrain trains with no dummy prefix and identity normalization
(llmtrain/data/tokenizer.py), so that conversion gave other ids for nearly every text. This module builds the
`tokenizers` pipeline from the settings stored in the model itself (its normalizer_spec):

  normalizer     [charsmap]  [extra spaces removed]  " " -> "▁"  ["▁" prepended]   (each only where the model says)
  pre-tokenizer  none: sentencepiece's BPE merges over the whole text (no piece crosses a "▁" inside it)
  model          BPE: sentencepiece's pieces and ids, merges ranked by the merged piece's score, byte fallback
  decoder        <unk> -> " ⁇ ", "▁" -> " ", bytes -> UTF-8, [one leading space stripped when a dummy prefix was added]

and `tokenizer_mismatches` checks the result against sentencepiece itself; export refuses on any difference.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any, Optional

from llmtrain.checkpointing.readers import CheckpointError

SPACE = "\u2581"  # sentencepiece's escaped space, "▁"

# What the check encodes and decodes: prose, code, whitespace runs at every position, tabs and newlines, unicode
# (precomposed and combining), characters the vocabulary lacks (byte fallback), the special tokens' own spellings.
PROBE_TEXTS: tuple[str, ...] = (
    "The king doth speak.",
    "Hello world, this is a test of 42 tokens! 3.14159 and 1,000,000.",
    "def add(a, b):\n    return a + b\n\n\nclass Foo:\n\tpass\n",
    "for (int i = 0; i < n; ++i) { sum += x[i]; }  // comment\r\n",
    "    four leading spaces", "trailing spaces   ", " one leading space", "two  inner   spaces",
    " ", "  ", "\t", "\n", "\n\n\n", " \t \n ", "a\tb\t\tc", "line one\nline two\r\nline three\n",
    "héllo wörld ∑ 東京 — “quotes” naïve café", "cafe\u0301 (combining accent)", "ｆｕｌｌｗｉｄｔｈ ①②③",
    "emoji 🦙🤗 and rare 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 and 䶵", "\u00a0non-breaking\u00a0space\u200bzero-width",
    "<s> not a bos </s> not an eos <unk> <0x41>", "▁already▁escaped", "x" * 300, "ab" * 150, "1234567890" * 20,
    "",
)
RANDOM_DECODE_SEQUENCES = 200  # random id sequences (no special ids) decoded by both, also mid-UTF-8 byte pieces


def hf_tokenizer_from_sentencepiece(model_file: Path) -> Any:
    """A `tokenizers.Tokenizer` equivalent to the sentencepiece BPE model in `model_file`."""
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_file.read_bytes())
    if proto.trainer_spec.model_type != sentencepiece_model_pb2.TrainerSpec.BPE:
        raise CheckpointError(f"tokenizer {model_file}: a sentencepiece "
                              f"{sentencepiece_model_pb2.TrainerSpec.ModelType.Name(proto.trainer_spec.model_type)} "
                              "model; only BPE models (what `llmtrain tokenizer train` makes) can be exported")
    if proto.trainer_spec.treat_whitespace_as_suffix:
        raise CheckpointError(f"tokenizer {model_file}: treat_whitespace_as_suffix=true has no Hugging Face "
                              "equivalent here; only prefix whitespace (the default) can be exported")
    types = sentencepiece_model_pb2.ModelProto.SentencePiece
    vocab = {piece.piece: i for i, piece in enumerate(proto.pieces)}
    unk = next(p.piece for p in proto.pieces if p.type == types.UNKNOWN)
    spec = proto.normalizer_spec

    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=_merges(proto), unk_token=unk, fuse_unk=True,
                                     byte_fallback=proto.trainer_spec.byte_fallback))
    steps = []
    if spec.precompiled_charsmap:  # nmt_nfkc and the other named rules: sentencepiece's compiled character map
        steps.append(normalizers.Precompiled(spec.precompiled_charsmap))
    if spec.remove_extra_whitespaces:  # only U+0020 counts as whitespace there, after the charsmap
        steps += [normalizers.Replace(Regex("^ +| +$"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if spec.escape_whitespaces:
        steps.append(normalizers.Replace(" ", SPACE))
    if spec.add_dummy_prefix:
        steps.append(normalizers.Prepend(SPACE))
    tokenizer.normalizer = normalizers.Sequence(steps)
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace(unk, " \u2047 "), decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
        + ([decoders.Strip(" ", 1, 0)] if spec.add_dummy_prefix else []))
    specials = [p.piece for p in proto.pieces if p.type in (types.CONTROL, types.UNKNOWN)]
    tokenizer.add_special_tokens(specials)
    return tokenizer


def _merges(proto: Any) -> list[tuple[str, str]]:
    """BPE merges as sentencepiece applies them: a pair of pieces merges into the piece they spell, the pair whose
    piece scores highest first. Every split of every normal piece into two vocabulary pieces is a merge."""
    from sentencepiece import sentencepiece_model_pb2

    normal = sentencepiece_model_pb2.ModelProto.SentencePiece.NORMAL
    scores = {p.piece: (p.score, -i) for i, p in enumerate(proto.pieces) if p.type == normal}
    ranked = []
    for piece, score in scores.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in scores and right in scores:
                ranked.append((score, scores[left], scores[right], left, right))
    ranked.sort(reverse=True)
    return [(left, right) for *_, left, right in ranked]


def write_hf_tokenizer(model_file: Path, out: Path, vocab_size: int) -> dict[str, Optional[int]]:
    """Writes tokenizer.model (the sentencepiece original), tokenizer.json and tokenizer_config.json to `out`, after
    checking that the Hugging Face tokenizer encodes and decodes every probe exactly as sentencepiece; returns the
    bos/eos/pad ids for config.json. Refuses (CheckpointError) on any difference."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    if sp.vocab_size() > vocab_size:
        raise CheckpointError(f"tokenizer {model_file} has {sp.vocab_size()} pieces, more than the model's "
                              f"vocab_size={vocab_size}: its ids would index past the embedding")
    shutil.copyfile(model_file, out / "tokenizer.model")
    hf_tokenizer_from_sentencepiece(model_file).save(str(out / "tokenizer.json"))
    ids = {"bos": sp.bos_id(), "eos": sp.eos_id(), "pad": sp.pad_id(), "unk": sp.unk_id()}  # -1 = none
    config = {
        # The generic class reads tokenizer.json as written; LlamaTokenizer would rebuild Llama's own pipeline.
        "tokenizer_class": "TokenizersBackend",
        # The special tokens' spellings in a text are text, as they are to sentencepiece ("<s>" is "<", "s", ">").
        "split_special_tokens": True,
        "clean_up_tokenization_spaces": False,  # "a ." stays "a ." on decode
        "add_bos_token": False, "add_eos_token": False,  # llmtrain's shards have no bos; eos ends each document
        "model_max_length": None,
        **{f"{name}_token": sp.id_to_piece(i) for name, i in ids.items() if i >= 0},
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    problems = tokenizer_mismatches(sp, AutoTokenizer.from_pretrained(str(out)))
    if problems:
        raise CheckpointError(f"the Hugging Face tokenizer built from {model_file} differs from sentencepiece on "
                              f"{len(problems)} probe(s), e.g. " + "; ".join(problems[:3])
                              + "; nothing exported (export without it: --tokenizer none)")
    return {f"{name}_token_id": (i if i >= 0 else None) for name, i in ids.items() if name != "unk"}


def tokenizer_mismatches(sp: Any, hf_tokenizer: Any, texts: tuple[str, ...] = PROBE_TEXTS,
                         seed: int = 0) -> list[str]:
    """Every difference between sentencepiece `sp` and a transformers tokenizer: ids of each text (no special tokens
    added), decode of those ids, and decode of random sequences of non-special pieces and whole characters' byte
    pieces. Empty when they agree."""
    problems = []
    for text in texts:
        expected, got = sp.encode(text), hf_tokenizer.encode(text, add_special_tokens=False)
        if got != expected:
            problems.append(f"encode({text[:40]!r}) gave {got[:12]} where sentencepiece gives {expected[:12]}")
        elif hf_tokenizer.decode(expected) != sp.decode(expected):
            problems.append(f"decode(encode({text[:40]!r})) gave {hf_tokenizer.decode(expected)[:40]!r} where "
                            f"sentencepiece gives {sp.decode(expected)[:40]!r}")
    # sentencepiece writes control ids (bos, eos) as nothing, transformers as their names: left out.
    # Byte pieces come whole characters at a time: on an invalid UTF-8 run transformers' ByteFallback writes U+FFFD
    # for every byte, sentencepiece only for the invalid ones (a model that samples half a character shows it).
    pieces = [[i] for i in range(sp.vocab_size()) if not (sp.is_control(i) or sp.is_byte(i))]
    rng = random.Random(seed)
    for _ in range(RANDOM_DECODE_SEQUENCES):
        ids = [i for _ in range(rng.randint(1, 24)) for i in (rng.choice(pieces) if rng.random() < 0.8
                                                               else _byte_ids(sp, _random_character(rng)))]
        if hf_tokenizer.decode(ids) != sp.decode(ids):
            problems.append(f"decode({ids[:12]}) gave {hf_tokenizer.decode(ids)[:40]!r} where sentencepiece gives "
                            f"{sp.decode(ids)[:40]!r}")
    return problems


def _random_character(rng: random.Random) -> str:
    """A character of 1 to 4 UTF-8 bytes (no surrogates)."""
    low, high = rng.choice([(0x01, 0x7F), (0x80, 0x7FF), (0x800, 0xD7FF), (0xE000, 0xFFFD), (0x10000, 0x10FFFF)])
    return chr(rng.randint(low, high))


def _byte_ids(sp: Any, character: str) -> list[int]:
    """The byte pieces (<0xNN>) of `character`'s UTF-8 bytes; none where the model has no byte fallback."""
    ids = [sp.piece_to_id(f"<0x{b:02X}>") for b in character.encode()]
    return [] if sp.unk_id() in ids else ids
