"""LogitMonitor, AttentionMonitor and WeightMonitor against hand computations (numpy, float64) on tiny decoders
trained for a few steps by a real Lightning Trainer."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from llmtrain.callbacks import AttentionMonitor, LogitMonitor, WeightMonitor
from llmtrain.checkpointing.readers import unwrapped_name
from llmtrain.training.loss import cross_entropy_and_z
from llmtrain.training.module import LanguageModel
from llmtrain.training.optim import OptimConfig
from tests.callbacks import ModelTape, fit, random_batches, tiny_config

OPTIM = OptimConfig(lr=1e-2, warmup_steps=1, total_steps=20)


def np64(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def logsumexp(x: np.ndarray) -> np.ndarray:
    m = x.max(axis=-1, keepdims=True)
    return (m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True)))[..., 0]


def assert_close(logged: dict[int, float], expected: float, step: int, rtol: float = 1e-5) -> None:
    assert step in logged, f"step {step} not logged: {sorted(logged)}"
    assert logged[step] == pytest.approx(expected, rel=rtol, abs=1e-7)


# ------------------------------------------------------------------------------------------------ LogitMonitor


def test_logit_monitor_matches_hand_computation():
    torch.manual_seed(0)
    batches = random_batches(6)
    for b in batches:
        b["labels"][:, :3] = -100  # ignored positions are left out of every statistic
    tape = ModelTape()
    model = LanguageModel(tiny_config(), OPTIM)
    _, logger = fit(model, batches, [tape, LogitMonitor(every_n_steps=2, probe_sequences=3)], max_steps=5)
    logged = logger.scalars
    for step in (0, 2, 4):
        batch = batches[step]
        logits = np64(tape.decoders[step](batch["input_ids"][:3]))  # (3, T, V)
        x = logits[np64(batch["labels"][:3]) != -100]  # (N, V)
        lse = logsumexp(x)
        expected = {"max_abs": np.abs(x).max(), "mean": x.mean(), "std": x.std(), "logsumexp_mean": lse.mean(),
                    "logsumexp_max": lse.max(), "z_loss": (lse ** 2).mean()}
        for key, value in expected.items():
            assert_close(logged[f"stability/logits/{key}"], value, step)
    assert sorted(logged["stability/logits/max_abs"]) == [0, 2, 4]


def test_logit_monitor_z_loss_equals_the_training_z_loss_on_the_whole_batch():
    torch.manual_seed(0)
    model = LanguageModel(tiny_config(), OPTIM, z_loss_coef=0.0)  # z is watched even with coefficient 0
    _, logger = fit(model, random_batches(4), [LogitMonitor(every_n_steps=1, probe_sequences=4)], max_steps=4)
    probe, train = logger.scalars["stability/logits/z_loss"], logger.scalars["train/z_loss"]
    assert sorted(probe) == [0, 1, 2, 3]
    for step in probe:  # same weights, same sequences, same step on the TensorBoard axis
        assert probe[step] == pytest.approx(train[step], rel=1e-5)


def test_logit_moments_of_chunks_combine_to_the_whole_batchs():
    from llmtrain.callbacks.stability import combine_logit_moments, logit_moments, logit_stats

    torch.manual_seed(0)
    logits, labels = torch.randn(5, 7, 11) * 3 + 1, torch.randint(0, 11, (5, 7))
    labels[1, :4] = -100
    whole = logit_stats(logit_moments(logits, labels))
    chunks = logit_stats(combine_logit_moments([logit_moments(logits[i:i + 2], labels[i:i + 2]) for i in (0, 2, 4)]))
    for key, value in whole.items():
        assert float(chunks[key]) == pytest.approx(float(value), rel=1e-5), key


def test_probe_monitors_share_one_forward_and_chunking_changes_no_value(monkeypatch):
    """Due on the same step with the same probe_sequences, LogitMonitor and AttentionMonitor read one probe
    forward; with PROBE_BYTES too small for two sequences it runs one per sequence, and the values stay."""
    import llmtrain.callbacks.stability as stability

    def run(probe_bytes: int) -> tuple[dict, int]:
        monkeypatch.setattr(stability, "PROBE_BYTES", probe_bytes)
        forward_probe, calls = stability.forward_probe, []

        def counted(pl_module, probe):
            calls.append(probe["input_ids"].shape[0])
            return forward_probe(pl_module, probe)

        monkeypatch.setattr(stability, "forward_probe", counted)
        torch.manual_seed(0)
        _, logger = fit(LanguageModel(tiny_config(), OPTIM), random_batches(3),
                        [LogitMonitor(every_n_steps=2, probe_sequences=3),
                         AttentionMonitor(every_n_steps=2, probe_sequences=3)], max_steps=3)
        return logger.scalars, calls

    batched, forwards = run(2**30)
    assert forwards == [3, 3]  # steps 0 and 2: one forward of the 3 probe sequences serves both monitors
    chunked, forwards = run(1)
    assert forwards == [1, 1, 1, 1, 1, 1]
    tags = [tag for tag in batched if tag.startswith("stability/")]
    assert any("logits" in tag for tag in tags) and any("attn_entropy" in tag for tag in tags)
    for tag in tags:
        for step, value in batched[tag].items():
            assert chunked[tag][step] == pytest.approx(value, rel=1e-5, abs=1e-7), (tag, step)


# -------------------------------------------------------------------------------------------- AttentionMonitor


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt((x ** 2).mean(axis=-1, keepdims=True) + eps) * weight


def hand_attention(decoder: torch.nn.Module, input_ids: torch.Tensor, document_ids, config) -> dict[str, list]:
    """Per layer: max |logit| over allowed pairs, mean entropy, RMS of the block output, computed from the
    weights; the residual stream entering each layer is taken from the decoder's own blocks."""
    outputs = []
    hooks = [block.register_forward_hook(lambda m, a, out: outputs.append(np64(out))) for block in decoder.blocks]
    decoder(input_ids, document_ids)
    for h in hooks:
        h.remove()
    B, T = input_ids.shape
    H, hd, eps, cap = config.n_head, config.head_dim, config.norm_eps, config.attn_logit_softcap
    allowed = np.tril(np.ones((T, T), dtype=bool))[None]
    if document_ids is not None:
        d = np64(document_ids)
        allowed = allowed & (d[:, :, None] == d[:, None, :])
    allowed = np.broadcast_to(allowed[:, None], (B, H, T, T))
    stream = [np64(decoder.tok_embeddings.weight)[np64(input_ids).astype(int)]] + outputs[:-1]
    result = {"max": [], "entropy": [], "act_rms": []}
    for i, block in enumerate(decoder.blocks):
        attn = block.attn
        a = rms_norm(stream[i], np64(block.attn_norm.weight), eps)
        q = (a @ np64(attn.q_proj.weight).T).reshape(B, T, H, hd)
        k = (a @ np64(attn.k_proj.weight).T).reshape(B, T, H, hd)
        if config.qk_norm:
            q, k = rms_norm(q, np64(attn.q_norm.weight), eps), rms_norm(k, np64(attn.k_norm.weight), eps)
        q, k = q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3)  # (B, H, T, hd)
        s = q @ k.transpose(0, 1, 3, 2) / math.sqrt(hd)
        if cap is not None:
            s = cap * np.tanh(s / cap)
        result["max"].append(np.abs(s[allowed]).max())
        s = np.where(allowed, s, -np.inf)
        p = np.exp(s - s.max(axis=-1, keepdims=True))
        p /= p.sum(axis=-1, keepdims=True)
        plogp = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
        result["entropy"].append(-plogp.sum(axis=-1).mean())
        result["act_rms"].append(np.sqrt((outputs[i] ** 2).mean()))
    return result


@pytest.mark.parametrize("variant", ["plain", "qk_norm_softcap", "documents"])
def test_attention_monitor_matches_hand_computation(variant):
    torch.manual_seed(0)
    overrides = {"plain": {}, "qk_norm_softcap": {"qk_norm": True, "attn_logit_softcap": 5.0},
                 "documents": {}}[variant]
    # position "none" keeps the hand computation free of RoPE; init_std 0.5 gives logits large enough for the
    # soft-cap to matter and the entropy to be far from uniform.
    config = tiny_config(position="none", init_std=0.5, **overrides)
    batches = random_batches(4)
    if variant == "documents":
        for b in batches:
            b["document_ids"] = (torch.arange(16) >= 6).long().expand(4, 16) + (torch.arange(16) >= 11).long()
    tape = ModelTape()
    _, logger = fit(LanguageModel(config, OPTIM), batches, [tape, AttentionMonitor(every_n_steps=2, probe_sequences=3)],
                    max_steps=3)
    logged = logger.scalars
    for step in (0, 2):
        docs = batches[step].get("document_ids")
        expected = hand_attention(tape.decoders[step], batches[step]["input_ids"][:3],
                                  None if docs is None else docs[:3], config)
        for i in range(config.n_layer):
            assert_close(logged[f"stability/attn_logit_max/layer_{i:02d}"], expected["max"][i], step, rtol=1e-4)
            assert_close(logged[f"stability/attn_entropy/layer_{i:02d}"], expected["entropy"][i], step, rtol=1e-4)
            assert_close(logged[f"stability/act_rms/layer_{i:02d}"], expected["act_rms"][i], step, rtol=1e-4)
    # the soft-cap bounds the logits; without it they are large at this init
    largest = max(logged["stability/attn_logit_max/layer_00"].values())
    assert largest < 5.0 if variant == "qk_norm_softcap" else largest > 5.0


def test_monitors_see_through_activation_checkpointing():
    """Wrapped blocks: same values, and parameter names without the wrapper's prefix."""
    runs = {}
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = LanguageModel(tiny_config(), OPTIM, activation_checkpointing=checkpointing)
        callbacks = [AttentionMonitor(every_n_steps=2), WeightMonitor(every_n_steps=2)]
        _, logger = fit(model, random_batches(4), callbacks, max_steps=3)
        runs[checkpointing] = {k: v for k, v in logger.scalars.items() if k.startswith("stability/")}
    assert "stability/weight_rms/blocks.0.attn.q_proj.weight" in runs[True]
    assert sorted(runs[True]) == sorted(runs[False])
    for tag, values in runs[False].items():
        for step, value in values.items():
            assert runs[True][tag][step] == pytest.approx(value, rel=1e-5, abs=1e-8), tag


@pytest.mark.skipif(not os.environ.get("LLMTRAIN_TEST_COMPILE"), reason="compiles blocks (~20 s on CPU); "
                    "set LLMTRAIN_TEST_COMPILE=1")
def test_monitors_run_compiled_blocks_eagerly_with_the_same_values():
    runs = {}
    for scope in ("off", "blocks"):
        torch.manual_seed(0)
        callbacks = [LogitMonitor(every_n_steps=2), AttentionMonitor(every_n_steps=2)]
        _, logger = fit(LanguageModel(tiny_config(), OPTIM, compile=scope), random_batches(4), callbacks, max_steps=4)
        runs[scope] = {k: v for k, v in logger.scalars.items() if k.startswith("stability/")}
    assert sorted(runs["blocks"]) == sorted(runs["off"])
    for tag, values in runs["off"].items():
        for step, value in values.items():  # the training steps in between ran compiled: close, not bitwise
            assert runs["blocks"][tag][step] == pytest.approx(value, rel=1e-4, abs=1e-6), tag


def test_unwrapped_name_strips_wrapper_prefixes():
    assert unwrapped_name("blocks.3._checkpoint_wrapped_module._orig_mod.attn.q_proj.weight") == \
        "blocks.3.attn.q_proj.weight"


# ----------------------------------------------------------------------------------------------- WeightMonitor


def test_weight_monitor_matches_hand_computation():
    torch.manual_seed(0)
    batches = random_batches(2)
    optim = OptimConfig(lr=1e-2, weight_decay=0.1, warmup_steps=1, total_steps=20)
    model = LanguageModel(tiny_config(tie_embeddings=True), optim)
    tape = ModelTape()
    _, logger = fit(model, batches, [tape, WeightMonitor(every_n_steps=1, adam_stats=True)], max_steps=1)
    logged = logger.scalars

    before = tape.decoders[0]
    ce, z = cross_entropy_and_z(before(batches[0]["input_ids"]), batches[0]["labels"])
    (ce + model.z_loss_coef * z).backward()  # the gradient of the step, by hand on the copy
    params = dict(before.named_parameters())  # a tied head appears once, as tok_embeddings.weight
    after = dict(model.model.named_parameters())
    assert "lm_head.weight" not in params
    total_w, total_g, total_d, total_v, count = 0.0, 0.0, 0.0, 0.0, 0
    for name, p in params.items():
        w, g, d = np64(p), np64(p.grad), np64(after[name]) - np64(p)
        v = (1 - optim.beta2) * g ** 2  # exp_avg_sq after Adam's first step
        assert_close(logged[f"stability/weight_rms/{name}"], np.sqrt((w ** 2).mean()), 0)
        assert_close(logged[f"stability/grad_norm/{name}"], np.sqrt((g ** 2).sum()), 0)
        assert_close(logged[f"stability/update_ratio/{name}"], np.sqrt((d ** 2).sum() / (w ** 2).sum()), 0, rtol=1e-4)
        assert_close(logged[f"stability/adam_v_rms/{name}"], np.sqrt(v.mean()), 0, rtol=1e-4)
        total_w, total_g, total_d = total_w + (w ** 2).sum(), total_g + (g ** 2).sum(), total_d + (d ** 2).sum()
        total_v, count = total_v + v.sum(), count + w.size
    assert_close(logged["stability/weight_rms/global"], np.sqrt(total_w / count), 0)
    assert_close(logged["stability/grad_norm/global"], np.sqrt(total_g), 0)
    assert_close(logged["stability/update_ratio/global"], np.sqrt(total_d / total_w), 0, rtol=1e-4)
    assert_close(logged["stability/adam_v_rms/global"], np.sqrt(total_v / count), 0, rtol=1e-4)


def test_monitors_log_once_per_optimizer_step_under_gradient_accumulation():
    torch.manual_seed(0)
    callbacks = [LogitMonitor(every_n_steps=1), AttentionMonitor(every_n_steps=2), WeightMonitor(every_n_steps=1)]
    _, logger = fit(LanguageModel(tiny_config(), OPTIM), random_batches(8), callbacks, max_steps=4,
                    accumulate_grad_batches=2)
    logged_steps = [step for step, metrics in logger.rows if "stability/weight_rms/global" in metrics]
    assert logged_steps == [0, 1, 2, 3]
    assert sorted(logger.scalars["stability/logits/max_abs"]) == [0, 1, 2, 3]
    assert sorted(logger.scalars["stability/attn_logit_max/layer_00"]) == [0, 2]
    # the monitors' steps are the steps train/loss is logged at
    assert set(logger.scalars["train/loss"]) == {0, 1, 2, 3}


def test_invalid_intervals_are_refused():
    with pytest.raises(ValueError, match="every_n_steps=0"):
        LogitMonitor(every_n_steps=0)
    with pytest.raises(ValueError, match="probe_sequences"):
        AttentionMonitor(probe_sequences=0)


def test_log_to_writes_tensorboard_values_as_one_event_that_reads_back_and_keeps_prefixed_loggers_exact(tmp_path):
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    from llmtrain.events import read_scalars
    from llmtrain.training.step_log import log_to

    values = {"stability/weight_rms/global": 0.5, "stability/grad_norm/blocks.0.attn.wq.weight": 2.25}
    plain = TensorBoardLogger(str(tmp_path), name="plain", version="")
    prefixed = TensorBoardLogger(str(tmp_path), name="prefixed", version="", prefix="p")
    csv = CSVLogger(str(tmp_path), name="csv", version="")
    for logger in (plain, prefixed, csv):
        log_to(logger, values, step=7)
        logger.save()
    plain.experiment.flush()
    prefixed.experiment.flush()
    assert read_scalars(tmp_path / "plain") == {tag: {7: value} for tag, value in values.items()}
    events = [e for f in (tmp_path / "plain").glob("events.out.tfevents.*") for e in EventFileLoader(str(f)).Load()
              if e.HasField("summary")]
    assert [len(e.summary.value) for e in events] == [2]  # one event holds both values
    assert set(read_scalars(tmp_path / "prefixed")) == {f"p-{tag}" for tag in values}
    assert "stability/grad_norm/blocks.0.attn.wq.weight" in (tmp_path / "csv" / "metrics.csv").read_text()
