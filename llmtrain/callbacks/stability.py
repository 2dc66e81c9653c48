"""Stability metrics, as small independent callbacks: output logits, attention logits and entropy, residual-stream
RMS, and weight / gradient / update norms (tags in DESIGN.md, method in docs/stability.md).

Each callback has its own `every_n_steps` and can be left out of the config on its own. They compute on the
device only on their steps, move everything they log to the host in one transfer on those steps, and log from
rank 0 straight to the loggers at Lightning's own logging step (the step `self.log` uses, so their points line
up with train/loss whatever log_every_n_steps is).

Probe batch. LogitMonitor and AttentionMonitor run an extra forward (no grad, in the run's precision, compiled
code run eagerly) on the first `probe_sequences` sequences of the current training batch, at the start of the
step, i.e. with the weights that step's training forward uses. The current batch rather than a fixed one: the
values then follow the data stream, so a resumed run logs the same values as an uninterrupted one, and DDP and
ZeRO runs (which give rank 0 the same batch) log the same values. The probe is needed because the fused
attention (and the compiled loss) of the training step never materialize attention logits or output logits.
Probe monitors due on the same step with the same `probe_sequences` share one probe forward, and it batches the
sequences up to PROBE_BYTES of fp32 probe tensors: an eager forward is bound by its kernel launches, so the
forward count, not the sequence count, sets a monitored step's cost (docs/stability.md).

Under DeepSpeed ZeRO the probe forward and DeepSpeed's safe_get_full_* helpers are collectives (ZeRO-3 gathers
parameters, ZeRO-1/2 all-reduce fragments): every rank runs them, in the same order; only rank 0 logs.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import DeepSpeedStrategy
from torch import Tensor, nn

from llmtrain.checkpointing.readers import unwrapped_name
from llmtrain.compat import foreach_norm
from llmtrain.model.attention import Attention, allowed_mask
from llmtrain.training.loss import IGNORE_INDEX
from llmtrain.training.step_log import log_step, log_values

PREFIX = "stability"


# ---------------------------------------------------------------------------------------------- shared helpers


def is_deepspeed(trainer: pl.Trainer) -> bool:
    return isinstance(trainer.strategy, DeepSpeedStrategy)


def decoder_parameters(pl_module: pl.LightningModule) -> list[tuple[str, nn.Parameter]]:
    """(clean name, parameter) of the decoder, each tensor once (a tied head shares tok_embeddings.weight)."""
    return [(unwrapped_name(name), p) for name, p in pl_module.model.named_parameters() if p.requires_grad]


def first_micro_batch(trainer: pl.Trainer, batch_idx: int) -> bool:
    return batch_idx % trainer.accumulate_grad_batches == 0


def check_interval(owner: str, every_n_steps: int) -> None:
    if not isinstance(every_n_steps, int) or every_n_steps < 1:
        raise ValueError(f"{owner}: every_n_steps={every_n_steps!r} is invalid: must be an int >= 1")


def probe_batch(batch: dict[str, Tensor], n: int) -> dict[str, Tensor]:
    """The first n sequences of every (B, T) tensor of the batch."""
    return {key: value[:n] for key, value in batch.items() if isinstance(value, Tensor)}


@contextlib.contextmanager
def probe_context(trainer: pl.Trainer) -> Iterator[None]:
    """No grad, the run's precision (autocast under *-mixed), and compiled modules run eagerly: the probe's
    batch shape and hooks must not trigger recompiles of the training graphs (compile="blocks")."""
    with torch.no_grad(), torch.compiler.set_stance("force_eager"), trainer.precision_plugin.forward_context():
        yield


def forward_probe(pl_module: pl.LightningModule, probe: dict[str, Tensor]) -> Tensor:
    """Decoder logits (P, T, V) of the probe sequences."""
    return pl_module.model(probe["input_ids"], probe.get("document_ids"), probe.get("position_ids"))


# ------------------------------------------------------------------------------------------------ output logits


# Bytes of fp32 probe tensors one probe forward may hold at a time (a layer's attention logits and probabilities,
# or the output logits and their temporaries): sequences are batched up to it, and run one by one beyond it.
PROBE_BYTES = 2 * 2**30


def logit_moments(logits: Tensor, labels: Optional[Tensor] = None) -> dict[str, Tensor]:
    """Combinable fp32 statistics of logits (B, T, V) over the target positions (labels != -100; all when labels
    is None): element count, mean, sum of squared deviations, max |logit|; row count, sum, max and sum of squares
    of log Z = logsumexp over the vocabulary (the softmax normaliser)."""
    x = logits.float()
    x = x.flatten(0, 1) if labels is None else x[labels != IGNORE_INDEX]  # (N, V)
    lse = torch.logsumexp(x, dim=-1)  # (N,)
    var, mean = torch.var_mean(x, correction=0)
    return {"n": torch.tensor(float(x.numel()), device=x.device), "mean": mean, "m2": var * x.numel(),
            "max_abs": x.abs().amax(), "rows": torch.tensor(float(lse.numel()), device=x.device),
            "lse_sum": lse.sum(), "lse_max": lse.amax(), "lse_sq_sum": lse.square().sum()}


def combine_logit_moments(parts: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """logit_moments of several chunks as if of one (Chan et al.'s pairwise update for mean and variance)."""
    total = dict(parts[0])
    for part in parts[1:]:
        n = total["n"] + part["n"]
        delta = part["mean"] - total["mean"]
        total["m2"] = total["m2"] + part["m2"] + delta.square() * total["n"] * part["n"] / n
        total["mean"] = total["mean"] + delta * part["n"] / n
        total["n"] = n
        for key in ("rows", "lse_sum", "lse_sq_sum"):
            total[key] = total[key] + part[key]
        for key in ("max_abs", "lse_max"):
            total[key] = torch.maximum(total[key], part[key])
    return total


def logit_stats(moments: dict[str, Tensor]) -> dict[str, Tensor]:
    """max |logit|, mean, std, mean and max log Z, and z_loss = mean log²Z, the quantity the z-loss term
    penalises (PaLM §5), whatever its coefficient."""
    return {"max_abs": moments["max_abs"], "mean": moments["mean"], "std": (moments["m2"] / moments["n"]).sqrt(),
            "logsumexp_mean": moments["lse_sum"] / moments["rows"], "logsumexp_max": moments["lse_max"],
            "z_loss": moments["lse_sq_sum"] / moments["rows"]}


def run_probe(pl_module: pl.LightningModule, probe: dict[str, Tensor], monitors: list[_ProbeMonitor]
              ) -> list[dict[str, Tensor]]:
    """The probe forward that serves every monitor in `monitors`, on as many sequences at a time as the most
    memory-hungry of them allows: each hooks in with `begin`, reads each chunk's logits in `observe`, unhooks in
    `end` and returns its metrics from `finish`. Call it under probe_context."""
    n, seq_len = probe["input_ids"].shape
    chunk = max(1, min(monitor.sequences_per_forward(pl_module.model.config, seq_len) for monitor in monitors))
    states = [monitor.begin(pl_module) for monitor in monitors]
    try:
        for start in range(0, n, chunk):
            part = {key: value[start:start + chunk] for key, value in probe.items()}
            logits = forward_probe(pl_module, part)
            for monitor, state in zip(monitors, states):
                monitor.observe(state, logits, part)
    finally:
        for monitor, state in zip(monitors, states):
            monitor.end(state)
    return [monitor.finish(state, n) for monitor, state in zip(monitors, states)]


class _ProbeMonitor(pl.Callback):
    """A monitor that reads a probe forward on the first `probe_sequences` sequences of every `every_n_steps`-th
    step. The first due monitor runs the forward for every due monitor with the same probe_sequences."""

    def __init__(self, every_n_steps: int, probe_sequences: int) -> None:
        check_interval(type(self).__name__, every_n_steps)
        if probe_sequences < 1:
            raise ValueError(f"{type(self).__name__}: probe_sequences={probe_sequences!r} must be >= 1")
        self.every_n_steps, self.probe_sequences = every_n_steps, probe_sequences
        self.last_metrics: dict[str, float] = {}
        self._measured_step = -1  # the step whose probe forward (this monitor's or another's) measured it

    def due(self, trainer: pl.Trainer, batch_idx: int) -> bool:
        return log_step(trainer) % self.every_n_steps == 0 and first_micro_batch(trainer, batch_idx)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        step = log_step(trainer)
        if not self.due(trainer, batch_idx) or self._measured_step == step:
            return
        group = [monitor for monitor in trainer.callbacks if isinstance(monitor, _ProbeMonitor)
                 and monitor.probe_sequences == self.probe_sequences and monitor.due(trainer, batch_idx)]
        with probe_context(trainer):
            results = run_probe(pl_module, probe_batch(batch, self.probe_sequences), group)
        logged = log_values(trainer, {key: value for metrics in results for key, value in metrics.items()}, step)
        for monitor, metrics in zip(group, results):
            monitor._measured_step = step
            monitor.last_metrics = {key: logged[key] for key in metrics if key in logged}

    def measure(self, pl_module: pl.LightningModule, probe: dict[str, Tensor]) -> dict[str, Tensor]:
        """This monitor's metrics on `probe` from a probe forward of its own (under probe_context or no_grad)."""
        return run_probe(pl_module, probe, [self])[0]

    # What run_probe calls; the defaults read nothing.
    def sequences_per_forward(self, config: Any, seq_len: int) -> int:
        raise NotImplementedError

    def begin(self, pl_module: pl.LightningModule) -> Any:
        return None

    def observe(self, state: Any, logits: Tensor, probe: dict[str, Tensor]) -> None:
        pass

    def end(self, state: Any) -> None:
        pass

    def finish(self, state: Any, n: int) -> dict[str, Tensor]:
        raise NotImplementedError


class LogitMonitor(_ProbeMonitor):
    """Output-logit statistics on the probe batch every `every_n_steps` steps: stability/logits/{max_abs, mean,
    std, logsumexp_mean, logsumexp_max, z_loss}. Logit growth precedes the output-logit divergence that z-loss
    prevents (Wortsman et al. 2023, §3.2). The probe's fp32 logits take about 3·T·V·4 bytes per sequence for a
    moment (T=2048, V=32000: 0.8 GB), at the start of the step, when the training activations are freed."""

    def __init__(self, every_n_steps: int = 100, probe_sequences: int = 2) -> None:
        super().__init__(every_n_steps, probe_sequences)

    def sequences_per_forward(self, config: Any, seq_len: int) -> int:
        return PROBE_BYTES // (3 * 4 * seq_len * config.vocab_size)

    def begin(self, pl_module: pl.LightningModule) -> list[dict[str, Tensor]]:
        return []  # logit_moments of each chunk

    def observe(self, state: list[dict[str, Tensor]], logits: Tensor, probe: dict[str, Tensor]) -> None:
        state.append(logit_moments(logits, probe.get("labels")))

    def finish(self, state: list[dict[str, Tensor]], n: int) -> dict[str, Tensor]:
        stats = logit_stats(combine_logit_moments(state))
        return {f"{PREFIX}/logits/{key}": value for key, value in stats.items()}


# --------------------------------------------------------------------------- attention logits and activations


def attention_stats(logits: Tensor, allowed: Tensor) -> tuple[Tensor, Tensor]:
    """Max |logit| over the allowed (query, key) pairs and the mean attention entropy in nats, of fp32
    pre-softmax logits (B, H, T, T) with -inf where masked; allowed (B|1, 1, T, T) bool."""
    low, high = torch.aminmax(logits.masked_fill(~allowed, 0.0))
    entropy = torch.special.entr(logits.softmax(dim=-1)).sum(dim=-1)  # (B, H, T): -Σ p log p, 0·log 0 = 0
    return torch.maximum(high, -low), entropy.mean()


class _ProbeRecorder:
    """Hooks on each layer's attention (pre-forward: its input and positions) and block (forward: the
    residual stream it outputs), accumulating per-layer statistics over the probe forwards."""

    def __init__(self, blocks: nn.ModuleList, activations: bool) -> None:
        n = len(blocks)
        self.max_abs: list[Optional[Tensor]] = [None] * n
        self.entropy_sum: list[Optional[Tensor]] = [None] * n
        self.square_sum: list[Optional[Tensor]] = [None] * n
        self.handles = []
        for i, block in enumerate(blocks):
            attn = next(m for m in block.modules() if isinstance(m, Attention))
            self.handles.append(attn.register_forward_pre_hook(self._attention_hook(i)))
            if activations:
                self.handles.append(block.register_forward_hook(self._block_hook(i)))

    @staticmethod
    def _add(acc: Optional[Tensor], value: Tensor, op: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
        return value if acc is None else op(acc, value)

    def _attention_hook(self, i: int) -> Callable[..., None]:
        def hook(attn: Attention, args: tuple) -> None:
            x, positions = args  # Block calls self.attn(h, positions) positionally
            max_abs, entropy = attention_stats(attn.attention_logits(x, positions), allowed_mask(positions))
            self.max_abs[i] = self._add(self.max_abs[i], max_abs, torch.maximum)
            self.entropy_sum[i] = self._add(self.entropy_sum[i], entropy * x.shape[0], torch.add)
        return hook

    def _block_hook(self, i: int) -> Callable[..., None]:
        def hook(block: nn.Module, args: tuple, output: Tensor) -> None:  # output (B, T, d_model)
            self.square_sum[i] = self._add(self.square_sum[i], output.float().square().mean() * output.shape[0],
                                           torch.add)
        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class AttentionMonitor(_ProbeMonitor):
    """Per layer, on the probe batch every `every_n_steps` steps:

    stability/attn_logit_max/layer_{i:02d}  max |q·k|/sqrt(head_dim) over allowed pairs, as softmax sees it
                                            (after qk-norm, RoPE, soft-cap and ALiBi): its growth is the
                                            attention-logit instability of Wortsman et al. 2023 (§3.1).
    stability/attn_entropy/layer_{i:02d}    mean over heads and queries of the attention entropy (nats); its
                                            collapse towards 0 is the same failure seen from the softmax side.
    stability/act_rms/layer_{i:02d}         RMS of the residual stream after block i (with `activations`).

    A layer's fp32 logits and probabilities take 2·H·T² floats per sequence (T=2048, H=16: 0.5 GB), freed before
    the next layer; the probe forward batches as many sequences as PROBE_BYTES holds.
    """

    def __init__(self, every_n_steps: int = 100, probe_sequences: int = 2, activations: bool = True) -> None:
        super().__init__(every_n_steps, probe_sequences)
        self.activations = activations

    def sequences_per_forward(self, config: Any, seq_len: int) -> int:
        return PROBE_BYTES // (3 * 4 * config.n_head * seq_len * seq_len)

    def begin(self, pl_module: pl.LightningModule) -> _ProbeRecorder:
        return _ProbeRecorder(pl_module.model.blocks, self.activations)

    def end(self, recorder: _ProbeRecorder) -> None:
        recorder.remove()

    def finish(self, recorder: _ProbeRecorder, n: int) -> dict[str, Tensor]:
        metrics: dict[str, Tensor] = {}
        for i in range(len(recorder.max_abs)):
            metrics[f"{PREFIX}/attn_logit_max/layer_{i:02d}"] = recorder.max_abs[i]
            metrics[f"{PREFIX}/attn_entropy/layer_{i:02d}"] = recorder.entropy_sum[i] / n
            if self.activations:
                metrics[f"{PREFIX}/act_rms/layer_{i:02d}"] = (recorder.square_sum[i] / n).sqrt()
        return metrics


# ------------------------------------------------------------------------------ weights, gradients, updates


def full_fp32_param(trainer: pl.Trainer, p: nn.Parameter) -> Tensor:
    """The whole parameter in fp32: DeepSpeed's fp32 master (gathered from the ZeRO partitions), else p itself."""
    if is_deepspeed(trainer):
        from deepspeed.utils import safe_get_full_fp32_param

        return safe_get_full_fp32_param(p)
    return p.detach().float()


def full_grad(trainer: pl.Trainer, p: nn.Parameter) -> Optional[Tensor]:
    """The whole (reduced, unclipped) gradient, or None where the parameter got none."""
    if is_deepspeed(trainer):
        from deepspeed.utils import safe_get_full_grad

        return safe_get_full_grad(p)
    return None if p.grad is None else p.grad.detach()


def full_optimizer_state(trainer: pl.Trainer, optimizer: Any, p: nn.Parameter, key: str) -> Tensor:
    if is_deepspeed(trainer):
        from deepspeed.utils import safe_get_full_optimizer_state

        value = safe_get_full_optimizer_state(p, key)
    else:
        value = optimizer.state.get(p, {}).get(key)
    if value is None:
        raise ValueError(f"WeightMonitor(adam_stats=True): the optimizer ({type(optimizer).__name__}) holds no "
                         f"{key!r} state; adam_stats needs Adam/AdamW")
    return value


class WeightMonitor(pl.Callback):
    """Every `every_n_steps` steps, per decoder parameter tensor and over all of them ("global"):

    stability/weight_rms/{param}    RMS of the weights before the step
    stability/grad_norm/{param}     L2 norm of the gradient fed to the optimizer, before clipping
    stability/update_ratio/{param}  ||Δw|| / ||w|| of the step (0 on a skipped step)
    stability/adam_v_rms/{param}    sqrt(mean exp_avg_sq) after the step (with `adam_stats`): the gradient scale
                                    Adam divides by; an update shrinks once it nears eps (Wortsman et al. §3.4)

    The update needs the weights before the step: one fp32 copy of the model is held from
    on_before_optimizer_step to the end of the batch, on the monitored steps only.
    """

    def __init__(self, every_n_steps: int = 100, per_tensor: bool = True, adam_stats: bool = False) -> None:
        check_interval("WeightMonitor", every_n_steps)
        self.every_n_steps, self.per_tensor, self.adam_stats = every_n_steps, per_tensor, adam_stats
        # Held from on_before_optimizer_step to the end of the batch, on monitored steps only:
        self._before: Optional[list[Tensor]] = None  # fp32 weights before the step, per tensor
        self._names: list[str] = []
        self._w_norm: Optional[Tensor] = None  # (N,) ||w|| per tensor
        self._metrics: dict[str, Tensor] = {}
        self._step = 0
        self.last_metrics: dict[str, float] = {}

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        step = log_step(trainer)
        if step % self.every_n_steps:
            return
        self._step = step
        names, weights, grad_names, grads = [], [], [], []
        for name, p in decoder_parameters(pl_module):
            w = full_fp32_param(trainer, p)
            weights.append(w.clone() if w.data_ptr() == p.data_ptr() else w)  # a snapshot, not a view
            names.append(name)
            g = full_grad(trainer, p)
            if g is not None:
                grad_names.append(name)
                grads.append(g.float())
        # Multi-tensor norms: a few kernels for all ~10·n_layer tensors, where a norm per tensor launched ~5 each
        w_norm = norms(weights)
        numel = torch.tensor([w.numel() for w in weights], dtype=torch.float32, device=w_norm.device)
        self._names, self._before, self._w_norm = names, weights, w_norm
        metrics = {f"{PREFIX}/weight_rms/global": (w_norm.square().sum() / numel.sum()).sqrt()}
        g_norm = norms(grads) if grads else None
        if g_norm is not None:
            metrics[f"{PREFIX}/grad_norm/global"] = g_norm.square().sum().sqrt()
        if self.per_tensor:
            metrics.update(zip((f"{PREFIX}/weight_rms/{name}" for name in names), w_norm / numel.sqrt()))
            if g_norm is not None:
                metrics.update(zip((f"{PREFIX}/grad_norm/{name}" for name in grad_names), g_norm))
        self._metrics = metrics

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._before is None:
            return
        metrics = self._metrics
        params = [p for _, p in decoder_parameters(pl_module)]
        # The snapshot becomes w_before - w_after in place: no second fp32 copy of the model
        torch._foreach_sub_(self._before, [full_fp32_param(trainer, p) for p in params])
        d_norm = norms(self._before)
        metrics[f"{PREFIX}/update_ratio/global"] = (d_norm.square().sum() / self._w_norm.square().sum()).sqrt()
        if self.per_tensor:
            metrics.update(zip((f"{PREFIX}/update_ratio/{name}" for name in self._names), d_norm / self._w_norm))
        if self.adam_stats:
            optimizer = trainer.optimizers[0]
            v_sum, v_count = [], 0
            for name, p in zip(self._names, params):
                v = full_optimizer_state(trainer, optimizer, p, "exp_avg_sq").float()
                v_sum.append(v.sum())
                v_count += v.numel()
                if self.per_tensor:
                    metrics[f"{PREFIX}/adam_v_rms/{name}"] = v.mean().sqrt()
            metrics[f"{PREFIX}/adam_v_rms/global"] = (torch.stack(v_sum).sum() / v_count).sqrt()
        self._before, self._metrics, self._w_norm = None, {}, None
        self.last_metrics = log_values(trainer, metrics, self._step)


def norms(tensors: list[Tensor]) -> Tensor:
    """(N,) L2 norm of each tensor, in torch's multi-tensor kernels."""
    return torch.stack(foreach_norm(tensors))
