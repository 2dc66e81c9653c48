"""Hugging Face both ways: export (Llama, Qwen3 for qk-norm) checked against transformers' own models (logits) and
against sentencepiece (token ids and text, on prose, code and whitespace); import back into llmtrain (round trip,
refusals by field) and pretraining continued from the imported weights (model.init_from)."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from safetensors.torch import load_file, save_file

from llmtrain.checkpointing.hf import export_hf, export_main
from llmtrain.checkpointing.hf_import import import_hf, import_main, initial_weights
from llmtrain.checkpointing.readers import CheckpointError, load_decoder
from llmtrain.cli import main as llmtrain_main
from llmtrain.data.datamodule import TokenDataModule
from llmtrain.data.sources import Source
from llmtrain.data.tokenizer import train_tokenizer
from llmtrain.model import ConfigError, Decoder
from llmtrain.training.module import LanguageModel
from llmtrain.training.optim import OptimConfig
from tests.conftest import REPO, write_corpus
from tests.test_checkpoint import random_decoder, save_lightning_style, tiny, zero_checkpoint

ARCHITECTURES = {"llama": dict(), "llama-tied": dict(tie_embeddings=True), "qwen3": dict(qk_norm=True),
                 "qwen3-width": dict(qk_norm=True, d_model=66, head_dim=16)}  # d_model % n_head != 0: Qwen3 only

# What the exported tokenizer is held to: whitespace at every position, tabs, newlines, unicode, characters only
# byte fallback can spell, the special tokens' own spellings, and whole files of code and prose (below).
TEXTS = [
    "def", "def f(x):\n\treturn x  # two spaces\n", "  leading", "trailing  ", "   ", "\t\t", "\n\n", " \n\t ",
    "a  b   c    d", "x\r\ny", "naïve café, façade — “quoted”", "東京 and ∑ and 🦙 and ḁ̈", "<s>hello</s><unk>",
    "mixed\u00a0spaces\u2009and\u3000more", "0123456789 3.14 -1e-9", "",
]


def texts_of_the_repository() -> list[str]:
    """Real code and prose: this repository's Python sources and markdown, whole files and single lines."""
    files = sorted((REPO / "llmtrain").rglob("*.py"))[:30] + sorted((REPO / "docs").glob("*.md"))
    contents = [f.read_text() for f in files]
    return contents + [line for text in contents for line in text.splitlines(keepends=True)[:40]]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    """An llmtrain tokenizer (identity normalization, no dummy prefix, byte fallback) trained on verse and code."""
    root = tmp_path_factory.mktemp("tok")
    texts = write_corpus(root / "texts", n_docs=80)
    for i, f in enumerate(sorted((REPO / "llmtrain").rglob("*.py"))[:20]):
        (texts / f"code{i}.txt").write_text(f.read_text())
    train_tokenizer(Source(str(texts)), root / "tok", vocab_size=400, num_threads=1)
    return root / "tok"


def logits_diff(model: Decoder, hf_dir: Path, vocab: int) -> float:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    input_ids = torch.randint(0, vocab, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return (model.eval()(input_ids) - hf(input_ids).logits).abs().max().item()


# ---------------------------------------------------------------------------------------------------- export


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_export_logits_match_transformers(tmp_path: Path, arch: str) -> None:
    config = tiny(**ARCHITECTURES[arch])
    model = random_decoder(config)
    src = save_lightning_style(tmp_path / "model.ckpt", model)
    out = export_hf(str(src), str(tmp_path / "hf"), tokenizer="none")

    weights = load_file(out / "model.safetensors")
    assert ("lm_head.weight" in weights) is not config.tie_embeddings
    assert ("model.layers.1.self_attn.q_norm.weight" in weights) is config.qk_norm
    assert all(t.dtype == torch.float32 for t in weights.values())
    hf_config = json.loads((out / "config.json").read_text())
    assert hf_config["architectures"] == ["Qwen3ForCausalLM" if config.qk_norm else "LlamaForCausalLM"]
    assert hf_config["num_key_value_heads"] == 2 and hf_config["head_dim"] == 16
    assert hf_config["hidden_size"] == config.d_model
    assert hf_config["tie_word_embeddings"] is config.tie_embeddings
    assert hf_config["rope_parameters"]["rope_theta"] == 500.0 and hf_config["rms_norm_eps"] == 1e-6
    diff = logits_diff(model, out, config.vocab_size)
    print(f"max |logits diff| ({arch}): {diff:.3g}")
    assert diff <= 1e-4


def test_export_tokenizer_encodes_and_decodes_exactly_as_sentencepiece(tmp_path: Path, tokenizer_dir: Path) -> None:
    import sentencepiece as spm
    from transformers import AutoTokenizer

    src = save_lightning_style(tmp_path / "model.ckpt", random_decoder(tiny(vocab_size=400)),
                               tokenizer=str(tokenizer_dir))
    out = export_hf(str(src), str(tmp_path / "hf"))  # the tokenizer the checkpoint records
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_dir / "tokenizer.model"))
    hf = AutoTokenizer.from_pretrained(out)  # as a user loads it: no flag
    texts = TEXTS + texts_of_the_repository()
    encoded = [(text, sp.encode(text)) for text in texts]
    wrong_ids = [text for text, ids in encoded if hf.encode(text, add_special_tokens=False) != ids]
    wrong_text = [text for text, ids in encoded if hf.decode(ids) != sp.decode(ids)]
    # Both read a "▁" in the text as a space (sentencepiece's escape); every other text comes back as it was.
    assert all(hf.decode(ids) == text for text, ids in encoded if "\u2581" not in text)
    print(f"{len(texts)} texts ({sum(map(len, texts))} characters): {len(wrong_ids)} with other ids, "
          f"{len(wrong_text)} decoded differently")
    assert not wrong_ids and not wrong_text, (wrong_ids[:3], wrong_text[:3])
    assert hf.tokenize("def") == sp.encode("def", out_type=str) and not hf.tokenize("def")[0].startswith("\u2581")
    assert sp.piece_to_id("<0xF0>") in hf.encode("🦙", add_special_tokens=False)  # byte fallback is exercised
    config = json.loads((out / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (sp.bos_id(), sp.eos_id())
    assert (out / "tokenizer.model").read_bytes() == (tokenizer_dir / "tokenizer.model").read_bytes()

    # transformers' own conversion of the same file (what export wrote before) differs on these texts.
    from transformers import LlamaTokenizer

    llama = LlamaTokenizer(vocab_file=str(tokenizer_dir / "tokenizer.model"))
    differing = sum(llama.encode(text, add_special_tokens=False) != ids for text, ids in encoded)
    print(f"transformers' LlamaTokenizer conversion: {differing} of {len(texts)} texts with other ids")
    assert differing > len(texts) // 2


def test_export_refuses_a_tokenizer_it_cannot_reproduce(tmp_path: Path) -> None:
    import sentencepiece as spm

    # sentencepiece's defaults (NFKC, dummy prefix): decoding a sequence that starts with a lone "▁" piece drops
    # every leading space there, which no Hugging Face decoder does.
    texts = write_corpus(tmp_path / "texts", n_docs=40)
    spm.SentencePieceTrainer.train(input=[str(p) for p in sorted(texts.glob("*.txt"))], vocab_size=300,
                                   model_prefix=str(tmp_path / "foreign"), model_type="bpe", byte_fallback=True,
                                   minloglevel=2)
    src = save_lightning_style(tmp_path / "model.ckpt", random_decoder(tiny(vocab_size=300)))
    with pytest.raises(CheckpointError, match=r"differs from sentencepiece on \d+ probe.*decode.*--tokenizer none"):
        export_hf(str(src), str(tmp_path / "hf"), tokenizer=str(tmp_path / "foreign.model"))
    assert not (tmp_path / "hf").exists()
    # The checkpoint records a tokenizer folder that no longer exists: named, with the way out.
    gone = save_lightning_style(tmp_path / "gone.ckpt", random_decoder(tiny()), tokenizer=str(tmp_path / "gone"))
    with pytest.raises(FileNotFoundError, match="pass --tokenizer"):
        export_hf(str(gone), str(tmp_path / "hf"))


def test_export_refuses_other_architectures_naming_every_field_and_a_home(tmp_path: Path) -> None:
    config = tiny(norm="layernorm", norm_position="post", position="alibi", ffn="gelu", bias=True, qk_norm=True,
                  attn_logit_softcap=50.0, final_logit_softcap=30.0, scale_embeddings=True)
    src = save_lightning_style(tmp_path / "model.ckpt", random_decoder(config))
    with pytest.raises(CheckpointError) as error:
        export_hf(str(src), str(tmp_path / "hf"), tokenizer="none")
    message = str(error.value)
    for field in ("norm='layernorm'", "norm_position='post'", "position='alibi'", "ffn='gelu'", "bias=True",
                  "attn_logit_softcap=50.0", "final_logit_softcap=30.0", "scale_embeddings=True"):
        assert field in message
    assert "qk_norm" not in message  # Qwen3 holds it
    for home in ("BloomForCausalLM", "Gemma2ForCausalLM", "GemmaForCausalLM scales embeddings",
                 "attention_bias=true and mlp_bias=true"):
        assert home in message
    assert not (tmp_path / "hf").exists()


def test_export_refuses_a_non_empty_output_folder(tmp_path: Path) -> None:
    src = save_lightning_style(tmp_path / "model.ckpt", random_decoder(tiny()))
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "keep.txt").write_text("mine")
    assert export_main([str(src), "--out", str(tmp_path / "hf"), "--tokenizer", "none"]) == 1
    assert os.listdir(tmp_path / "hf") == ["keep.txt"]


@pytest.mark.slow
def test_export_from_zero_folder_matches_llama(tmp_path: Path) -> None:
    folder, engine_weights = zero_checkpoint(tmp_path, 3, 1, tiny(tie_embeddings=True))
    with pytest.warns(UserWarning, match="records no tokenizer"):
        out = export_hf(str(folder), str(tmp_path / "hf"))
    decoder = Decoder(tiny(tie_embeddings=True))
    decoder.load_state_dict({k.removeprefix("model."): v for k, v in engine_weights.items()})
    assert logits_diff(decoder, out, 128) <= 1e-4


# ---------------------------------------------------------------------------------------------------- import


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_import_round_trips_an_export(tmp_path: Path, arch: str, tokenizer_dir: Path) -> None:
    model = random_decoder(tiny(vocab_size=400, **ARCHITECTURES[arch]))
    src = save_lightning_style(tmp_path / "model.ckpt", model, tokenizer=str(tokenizer_dir))
    export_hf(str(src), str(tmp_path / "hf"))
    assert llmtrain_main(["import", str(tmp_path / "hf"), str(tmp_path / "imported.ckpt")]) == 0

    decoder, checkpoint = load_decoder(str(tmp_path / "imported.ckpt"))
    assert replace(decoder.config, ffn_multiple_of=model.config.ffn_multiple_of) == model.config  # d_ff is given
    for key, value in model.state_dict().items():
        assert torch.equal(decoder.state_dict()[key], value), key
    input_ids = torch.randint(0, 400, (2, 48), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(decoder.eval()(input_ids), model(input_ids))
    # ...and back out again, with the tokenizer the HF folder carried.
    out = export_hf(str(tmp_path / "imported.ckpt"), str(tmp_path / "hf2"))
    assert (out / "tokenizer.json").is_file() and checkpoint["llmtrain"]["imported_from"]["architecture"]


def hf_llama_folder(folder: Path, vocab_size: int = 128, **config: Any) -> Path:
    """A Llama model written by transformers itself (random init), not by our export."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    settings = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6,
                    rope_parameters={"rope_type": "default", "rope_theta": 500.0})
    LlamaForCausalLM(LlamaConfig(**{**settings, **config})).save_pretrained(folder)
    return folder


def test_import_a_qwen3_written_by_transformers_matches_its_logits(tmp_path: Path) -> None:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    # Qwen3's published configs carry a sliding_window size with use_sliding_window off: imported as full attention.
    hf = Qwen3ForCausalLM(Qwen3Config(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                                      max_position_embeddings=64, sliding_window=32, use_sliding_window=False,
                                      tie_word_embeddings=True)).eval()
    with torch.no_grad():  # norms away from 1, so a q_norm/k_norm mix-up would show
        for name, param in hf.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    hf.save_pretrained(tmp_path / "hf")
    decoder, _ = load_decoder(str(import_hf(str(tmp_path / "hf"), str(tmp_path / "qwen3.ckpt"))))
    assert decoder.config.qk_norm and decoder.config.tie_embeddings and decoder.config.head_dim == 24
    input_ids = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        diff = (decoder.eval()(input_ids) - hf(input_ids).logits).abs().max().item()
    print(f"max |logits diff| (Qwen3 from transformers, imported): {diff:.3g}")
    assert diff <= 1e-4


def edit_config(folder: Path, **fields: Any) -> Path:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **fields}))
    return folder


@pytest.mark.parametrize("edit, named", [
    (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 500.0}), "'rope_type': 'yarn'"),
    (dict(rope_parameters={"rope_type": "llama3", "factor": 8.0, "rope_theta": 500.0}), "'rope_type': 'llama3'"),
    (dict(attention_bias=True), "attention_bias=True"),
    (dict(mlp_bias=True), "mlp_bias=True"),
    (dict(hidden_act="gelu"), "hidden_act='gelu'"),
    (dict(use_sliding_window=True, sliding_window=16), "use_sliding_window=True"),
    (dict(layer_types=["sliding_attention", "full_attention"]), "layer_types="),
    (dict(model_type="mistral"), "model_type='mistral'"),
    (dict(tie_word_embeddings=True), "tie_word_embeddings=true, but lm_head.weight differs"),
])
def test_import_refuses_what_llmtrain_would_compute_differently(tmp_path: Path, edit: dict, named: str,
                                                                capsys) -> None:
    folder = edit_config(hf_llama_folder(tmp_path / "hf"), **edit)
    assert import_main([str(folder), str(tmp_path / "out.ckpt")]) == 1
    assert named in capsys.readouterr().err
    assert not (tmp_path / "out.ckpt").exists()


def test_import_refuses_an_untied_config_without_a_head(tmp_path: Path) -> None:
    folder = hf_llama_folder(tmp_path / "hf")
    weights = load_file(folder / "model.safetensors")
    del weights["lm_head.weight"]
    save_file(weights, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match="tie_word_embeddings=false, but there is no lm_head.weight"):
        import_hf(str(folder), str(tmp_path / "out.ckpt"))


# ------------------------------------------------------------------------------- continuing from imported weights


class FirstBatch(pl.Callback):
    """The first training batch and its loss, as the module computed it before any optimizer step."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == 0:
            self.batch, self.loss = {k: v.clone() for k, v in batch.items()}, float(outputs["loss"])


def test_fit_continues_from_an_imported_hf_model(tmp_path: Path, prepared_corpus: dict[str, Path]) -> None:
    from transformers import LlamaForCausalLM

    folder = hf_llama_folder(tmp_path / "hf", vocab_size=320)
    import_hf(str(folder), str(tmp_path / "imported.ckpt"))
    config = load_decoder(str(tmp_path / "imported.ckpt"))[0].config
    data = dict(data_dir=str(prepared_corpus["shards"]), seq_len=32, micro_batch_size=4, num_workers=0)

    def trainer(**extra: Any) -> pl.Trainer:
        return pl.Trainer(accelerator="cpu", devices=1, max_steps=3, logger=False, enable_progress_bar=False,
                          enable_model_summary=False, limit_val_batches=0, **extra)

    first = FirstBatch()
    fit = trainer(callbacks=[first], default_root_dir=tmp_path)
    module = LanguageModel(config, OptimConfig(lr=1e-3, warmup_steps=1), z_loss_coef=0.0,
                           init_from=str(tmp_path / "imported.ckpt"))
    fit.fit(module, datamodule=TokenDataModule(**data))
    assert fit.global_step == 3

    hf = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():  # step 1's loss is the HF model's loss on that batch: training started from its weights
        logits = hf(first.batch["input_ids"]).logits
        expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), first.batch["labels"].flatten()).item()
    print(f"first-step loss {first.loss:.6f}, transformers' {expected:.6f}")
    assert abs(first.loss - expected) < 1e-4
    trained = dict(module.model.named_parameters())["tok_embeddings.weight"]
    assert not torch.equal(trained, hf.model.embed_tokens.weight)  # and it trained

    # Resuming from the weights file is refused with the way to do it.
    with pytest.raises(ConfigError, match="--model.init_from PATH instead of --ckpt_path"):
        trainer().fit(LanguageModel(config), datamodule=TokenDataModule(**data),
                      ckpt_path=str(tmp_path / "imported.ckpt"))


def test_init_from_refuses_another_config_naming_every_field(tmp_path: Path) -> None:
    src = save_lightning_style(tmp_path / "model.ckpt", random_decoder(tiny()))
    with pytest.raises(ConfigError) as error:
        initial_weights(str(src), tiny(rope_theta=10000.0, norm_eps=1e-5, attention_backend="eager"))
    message = str(error.value)
    assert "rope_theta: 500.0 in the checkpoint, 10000.0 in the run" in message
    assert "norm_eps: 1e-06 in the checkpoint, 1e-05 in the run" in message
    assert "attention_backend" not in message  # the same function, computed another way
    module = LanguageModel(tiny(n_layer=3), init_from=str(src))
    with pytest.raises(ConfigError, match="n_layer: 2 in the checkpoint, 3 in the run"):
        module.configure_model()


# Under deepspeed.zero.Init (how ZeRO-3 builds the model) parameters are partitioned as they are made: init_from must
# write through the partitions. Each rank gathers every parameter afterwards and compares it with the file.
ZERO3_INIT_FROM = r"""
import sys
import torch, deepspeed
from llmtrain.checkpointing.readers import load_consolidated, model_config
from llmtrain.training.module import LanguageModel

checkpoint = load_consolidated(sys.argv[1])
deepspeed.init_distributed("gloo")
module = LanguageModel(model_config(checkpoint), init_from=sys.argv[1])
with deepspeed.zero.Init(config_dict_or_path={"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}):
    module.configure_model()
assert all(p.numel() == 0 for p in module.model.parameters() if p.ds_numel > 1), "not partitioned"
with deepspeed.zero.GatheredParameters(list(module.parameters())):
    for name, param in module.named_parameters():
        assert torch.equal(param, checkpoint["state_dict"][name]), name
print("loaded", len(checkpoint["state_dict"]))
"""


@pytest.mark.slow
def test_init_from_under_zero3_writes_through_the_partitions(tmp_path: Path) -> None:
    from tests.conftest import run_deepspeed_ranks

    src = save_lightning_style(tmp_path / "model.ckpt", random_decoder(tiny(qk_norm=True)))
    outputs = run_deepspeed_ranks(ZERO3_INIT_FROM, [str(src)], world_size=2)
    assert all("loaded 25" in output for output in outputs), outputs
