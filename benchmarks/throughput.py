r"""Training throughput on one GPU: a plain-PyTorch loop, litgpt, torchtitan and OLMo-core in the same loop, and
`llmtrain fit`, each row at the same shape, micro-batch and precision (the same recipe). With --devices N the llmtrain
rows train on N GPUs under DDP (the loops stay on one; such rows have no 'vs loop'), e.g. to measure the lever
hostreads: the per-step host reads of distributed runs that llmtrain.training.agreement removed, put back.

Rows, per shape (124m 768/12/12 mb16, 350m 1024/24/16 mb8, 1b 2048/16/16 mb4; vocab 32000, sequence 2048):
  baseline    the reference loop, written out below (Llama-style decoder in plain PyTorch: RMSNorm, SwiGLU, RoPE, no
              biases, untied LM head, SDPA is_causal, bf16 autocast, fused AdamW); model and cross-entropy compiled
              together as one function, so no fp32 logits are materialized eagerly; trains on windows of the
              llmtrain rows' shards (--loop_tokens shards, the default) or on random tokens.
  litgpt      litgpt's `GPT` at the same shape in the same loop.
  torchtitan  torchtitan's `Llama3Model` with their compile, loss and float8 functions (benchmarks/peers.py).
  olmo_core   OLMo-core's `TransformerConfig.llama_like` model with its compile and float8 methods (peers.py).
  llmtrain    a real `llmtrain fit` of configs/llama-<shape>.yaml in a subprocess, on the shards of --data_dir, with
              the config's callbacks at their default intervals (stability monitors every 100 steps, SpikeDetector
              every step), validation off, and PeriodicCheckpoint moved past the end of the run (no checkpoint in the
              timed window). tokens/s is the Throughput callback's one window over steps warmup+1..steps.
A loop row whose framework does not import (or fails) is reported with its error line. Loop-row levers
(--baseline_variants): mb2x/mb4x/mb6x, fp8 (each framework's own float8 path), sdpa (torchtitan's maskless attention),
clip (gradient clipping at norm 1.0, which llmtrain's configs do and the plain loop rows do not).
'vs loop' is always against the baseline row of the same shape, micro-batch, precision and gradient clipping
(llmtrain's configs clip: its rows compare with a `clip` baseline); a lever that changes the micro-batch is its own
row against the loop at that micro-batch. With --repeat_reference the baseline rows run again after the others: the
spread of the two runs (printed under the table) is the drift over the call, and the ratios are against their mean.
With --profile N, every row also profiles N steps after its timed window (StepProfiler's report, the loop rows
through the same function: profile_<row>.md), so the rows' kernel time can be compared category by category, and
traces N more with kernel activity only for the report's device timeline (where the GPU waits for the host).
Every row runs in its own subprocess (fresh compile caches, its own peak-memory counter). The first --warmup steps
(compile, allocator) are excluded; the timed window is steps warmup+1..steps. Under the table, each row's SM clock,
temperature and power over its timed window (nvidia-smi in the background, benchmarks/gpu_state.py).
SIGTERM (e.g. `timeout 540`) ends the script early but still writes the table of the rows done, and keeps an
interrupted llmtrain row whose timed window its run had already logged.
MFU = tokens/s x (6*N_matmul + 12*n_layer*d_model*seq) / peak for every row (ModelConfig.flops_per_token; N_matmul
is every parameter but the input embedding), against the 989 TFLOP/s H100/H200 SXM dense bf16 datasheet peak and
against a bf16 matmul (8192^3) measured at the start of the run.

GPU run (the packages the frameworks need beyond torch: litgpt 0.5.13, psutil, torchao 0.18, torchtitan 0.3.0 with
spmd_types 0.2.3, tyro, typeguard, docstring-parser, torchdata, torch_checkpointing, ai2-olmo-core 3.0.0 with
dataclass-extensions, bettermap, dill; llmtrain's own: jsonargparse, deepspeed; the 32000-token shards of
docs/benchmarks.md):
    python3 benchmarks/throughput.py --shapes 124m --baseline_variants shipped sdpa --profile 3 \
        --data_dir .gpu_data/shards --out benchmark_out/throughput
CPU smoke test (tiny shape, few steps, no compile, fp32, no autocast, foreach AdamW; frameworks not installed are
reported as skipped, torchtitan's flex attention has no CPU backward):
    python benchmarks/throughput.py --tiny --data_dir data/shakespeare/shards --vocab_size 4000 \
        --baseline_variants shipped sdpa
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from llmtrain.model.config import ModelConfig  # noqa: E402  (the FLOPs formula and the GLU d_ff rule only)
from llmtrain.config_files import resolved_config  # noqa: E402
from gpu_state import GpuSampler, state_lines, window_summary  # noqa: E402  (benchmarks/, the script's folder)

PEAK_FLOPS = 989e12  # H100/H200 SXM dense bf16 datasheet figure
SEQ = 2048
SHAPES = {  # d_model, n_layer, n_head, micro-batch, llmtrain config
    "124m": (768, 12, 12, 16, "configs/llama-124m.yaml"),
    "350m": (1024, 24, 16, 8, "configs/llama-350m.yaml"),
    "1b": (2048, 16, 16, 4, "configs/llama-1b.yaml"),
    # CPU smoke only (--tiny): the llmtrain row runs configs/llama-124m.yaml with the model overridden to this.
    "tiny": (64, 2, 2, 8, "configs/llama-124m.yaml"),
}
TINY_SEQ = 64
IMPLEMENTATIONS = ("baseline", "litgpt", "torchtitan", "olmo_core", "llmtrain")
LOOP_IMPLEMENTATIONS = IMPLEMENTATIONS[:-1]  # rows timed by loop() in a worker process
# Speed levers of the llmtrain rows, measured one at a time: a variant is "shipped" (the config as it is) or
# levers joined by "+", e.g. "mb2x+fp8".
LEVERS = {
    "mb2x": "micro-batch doubled",
    "mb4x": "micro-batch quadrupled",
    "mb6x": "micro-batch x6 (124m 96, 350m 48: near the largest that fits an H200, ~125 and ~58)",
    "fp8": "float8 matmuls for every Linear but the LM head (model.float8, torchao)",
    "nostab": "without the stability callbacks (LogitMonitor, AttentionMonitor, WeightMonitor, SpikeDetector)",
    "cudagraphs": "compiled region replayed as CUDA graphs (model.compile_mode: reduce-overhead)",
    "layernorm": "LayerNorm (no bias) instead of RMSNorm: what the norm costs, at the same recipe (a model change, "
                 "compared with llmtrain shipped)",
    "nolog": "no per-step scalars logged (trainer.log_every_n_steps 0; tokens/s still is): what logging the step "
             "values at every 10th step costs as shipped (stacked and copied behind the step, written a step later)",
    "synclog": "the two host reads of each logging step put back (benchmarks/host_reads.py): the loss after the "
               "forward and the step's values at its end, as read before they were written a step late",
    "hostreads": "the four collectives each step of a distributed run read on the host up to commit fb33749, put back "
                 "(benchmarks/host_reads.py): what they cost, with --devices > 1 (on one device it changes nothing)",
}
MICRO_BATCH_LEVERS = {"mb2x": 2, "mb4x": 4, "mb6x": 6}  # lever -> factor on the shape's micro-batch
# Levers of the loop rows (--baseline_variants): the micro-batch levers, float8, torchtitan's maskless attention, and
# gradient clipping (llmtrain's configs clip; a loop row without it trains a lighter recipe than the llmtrain row).
LOOP_LEVERS = {**{k: v for k, v in LEVERS.items() if k in MICRO_BATCH_LEVERS}, "fp8": LEVERS["fp8"],
               "sdpa": "torchtitan only: their ScaledDotProductAttention (is_causal) instead of their default flex",
               "clip": "gradients clipped to global 2-norm 1.0 every step (torch clip_grad_norm_), as llmtrain's "
                       "configs do (gradient_clip_val 1.0)"}
DATASHEET_BF16 = PEAK_FLOPS
STABILITY_CALLBACKS = ("LogitMonitor", "AttentionMonitor", "WeightMonitor", "SpikeDetector")
MONITOR_INTERVAL = 100  # the monitors' every_n_steps in configs/llama-*.yaml


class Stopped(Exception):
    """SIGTERM, e.g. from `timeout` ahead of a device call's time limit: the rows done so far are still reported."""


def raise_stopped(signum: int, frame: object) -> None:
    raise Stopped()


def parse_variant(variant: str, known: Optional[dict] = None, option: str = "--variants") -> tuple[str, ...]:
    known = LEVERS if known is None else known
    levers = () if variant == "shipped" else tuple(variant.split("+"))
    unknown = [lever for lever in levers if lever not in known]
    if unknown:
        raise SystemExit(f"{option} {variant!r}: unknown lever(s) {unknown}; use 'shipped' or levers from "
                         f"{sorted(known)} joined by '+'")
    return levers


def row_levers(r: dict) -> tuple[str, ...]:
    if r["impl"] == "llmtrain":
        return parse_variant(r["variant"])
    return parse_variant(r["variant"], LOOP_LEVERS, "--baseline_variants")


def recipe(r: dict) -> tuple:
    """What a row trains per step, on how many devices, at what precision and whether it clips its gradients (an
    extra pass over them: llmtrain's configs clip, a loop row does with the clip lever); rows of one recipe are
    compared."""
    clips = r["impl"] == "llmtrain" or "clip" in row_levers(r)
    return r["shape"], r["micro_batch"], "fp8" in row_levers(r), r.get("devices", 1), clips


def micro_batch_factor(levers: tuple[str, ...]) -> int:
    return math.prod(MICRO_BATCH_LEVERS.get(lever, 1) for lever in levers)


def model_config(shape: str, vocab_size: int, seq: int) -> ModelConfig:
    d, layers, heads, _, _ = SHAPES[shape]
    return ModelConfig(vocab_size=vocab_size, max_seq_len=seq, d_model=d, n_layer=layers, n_head=heads,
                       ffn_multiple_of=64 if shape == "tiny" else 256)


# ----------------------------------------------------------------------------------------------------------------
# (a) The reference model: plain PyTorch, self-contained (nothing from llmtrain.model).
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rope_tables(head_dim: int, seq: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)  # (seq, head_dim), rotate-half layout
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


class Block(nn.Module):
    def __init__(self, d: int, heads: int, d_ff: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = RMSNorm(d), RMSNorm(d)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)
        self.gate = nn.Linear(d, d_ff, bias=False)
        self.up = nn.Linear(d, d_ff, bias=False)
        self.down = nn.Linear(d_ff, d, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        h = self.norm2(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class Reference(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg.d_model, cfg.n_head, cfg.d_ff) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        cos, sin = rope_tables(cfg.d_model // cfg.n_head, cfg.max_seq_len)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        for p in self.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        x = self.embed(idx)
        for block in self.blocks:
            x = block(x, self.cos[:t], self.sin[:t])
        return self.head(self.norm(x))


# (b) litgpt's GPT at the same shape.
def litgpt_model(cfg: ModelConfig) -> nn.Module:
    from litgpt import GPT, Config

    return GPT(Config(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.d_model, block_size=cfg.max_seq_len,
                      vocab_size=cfg.vocab_size, padded_vocab_size=cfg.vocab_size, bias=False,
                      norm_class_name="RMSNorm", norm_eps=cfg.norm_eps, mlp_class_name="LLaMAMLP",
                      intermediate_size=cfg.d_ff, rotary_percentage=1.0, rope_base=int(cfg.rope_theta),
                      parallel_residual=False, n_query_groups=cfg.n_head))


def loop_model(impl: str, cfg: ModelConfig, device: torch.device, levers: tuple[str, ...],
               compile: bool) -> tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor], str]:
    """The row's model, its `loss(tokens)` (forward and cross-entropy; compiled together for the reference and litgpt,
    so no fp32 logits are materialized eagerly; the peers through their own compile functions) and its settings."""
    float8 = "fp8" in levers
    if impl in ("torchtitan", "olmo_core"):
        from peers import olmo_core_peer, torchtitan_peer

        peer = (torchtitan_peer(cfg, device, compile, float8, "sdpa" if "sdpa" in levers else "flex")
                if impl == "torchtitan" else olmo_core_peer(cfg, device, compile, float8))
        return peer.model, peer.loss, f"{peer.version}: {peer.settings}"
    model = (litgpt_model(cfg) if impl == "litgpt" else Reference(cfg)).to(device)
    if float8:  # torchao float8 training of every Linear but the LM head, as model.float8 does in llmtrain
        from torchao.float8 import convert_to_float8_training

        convert_to_float8_training(model, module_filter_fn=lambda module, fqn: fqn not in ("head", "lm_head"))

    def loss(tokens: torch.Tensor) -> torch.Tensor:
        logits = model(tokens[:, :-1])
        return F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())

    version = "litgpt " + __import__("importlib.metadata").metadata.version("litgpt") if impl == "litgpt" else "torch"
    return model, torch.compile(loss) if compile else loss, (
        f"{version}: model and cross-entropy compiled together" + (", torchao float8" if float8 else ""))


def shard_tokens(data_dir: str, vocab_size: int, limit: int = 1 << 24) -> torch.Tensor:
    """Up to `limit` training tokens of the prepared shards in `data_dir` (the llmtrain rows' data), as one int64
    tensor: what the loop rows sample their sequences from with --loop_tokens shards."""
    from llmtrain.data.shards import open_split, read_metadata

    meta = read_metadata(data_dir)
    if meta["settings"]["vocab_size"] != vocab_size:
        raise SystemExit(f"--data_dir {data_dir}: its tokenizer has {meta['settings']['vocab_size']} tokens, "
                         f"--vocab_size is {vocab_size}; make them agree")
    parts, count = [], 0
    for shard in open_split(data_dir, meta, "train"):
        parts.append(np.asarray(shard.tokens[:limit - count], dtype=np.int64))
        count += len(parts[-1])
        if count >= limit:
            break
    return torch.from_numpy(np.concatenate(parts))


def sample_windows(data: torch.Tensor, micro_batch: int, offsets: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """`micro_batch` windows of consecutive tokens of `data` at random starts (`offsets`: arange(window length) on
    data's device), gathered there (no host copy per step): sequences as llmtrain's DataModule packs them, from the
    same text."""
    starts = torch.randint(0, data.numel() - len(offsets) + 1, (micro_batch, 1), device=data.device, generator=gen)
    return data[starts + offsets]


def loop(impl: str, shape: str, micro_batch: int, steps: int, warmup: int, vocab_size: int, tiny: bool,
         profile: int = 0, profile_path: Optional[Path] = None, levers: tuple[str, ...] = (),
         data: Optional[torch.Tensor] = None) -> dict:
    """The reference training loop on `data`'s tokens (shard_tokens; None: uniformly random tokens); returns tokens/s,
    step time and peak memory over steps warmup+1..steps, and with `profile` writes StepProfiler's report of that
    many more steps to `profile_path`."""
    seq = TINY_SEQ if tiny else SEQ
    cfg = model_config(shape, vocab_size, seq)
    cuda = torch.cuda.is_available() and not tiny
    device = torch.device("cuda" if cuda else "cpu")
    torch.manual_seed(1234)
    try:
        model, loss_fn, settings = loop_model(impl, cfg, device, levers, compile=not tiny)
    except ImportError as err:
        return {"skipped": f"import failed: {err}"}
    n_params = sum(p.numel() for p in model.parameters())
    if n_params != cfg.num_params():
        raise SystemExit(f"{impl}: {n_params} parameters, but ModelConfig counts {cfg.num_params()}")
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1,
                                  **({"fused": True} if cuda else {"foreach": True}))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda)
    gen = torch.Generator(device=device).manual_seed(0)
    clip, params = "clip" in levers, [p for p in model.parameters() if p.requires_grad]

    data = None if data is None else data.to(device)
    offsets = torch.arange(seq + 1, device=device)  # a window's positions, made once

    def step() -> torch.Tensor:
        tokens = (torch.randint(0, vocab_size, (micro_batch, seq + 1), device=device, generator=gen) if data is None
                  else sample_windows(data, micro_batch, offsets, gen))
        with autocast:
            loss = loss_fn(tokens)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    def clock() -> float:
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for _ in range(warmup):
        step()
    start = clock()
    window_start = time.time()
    for _ in range(steps - warmup):
        loss = step()
    elapsed = clock() - start
    timed = steps - warmup
    result = {"tokens_per_sec": timed * micro_batch * seq / elapsed, "step_ms": 1e3 * elapsed / timed,
              "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
              "final_loss": loss.item(), "params": n_params, "settings": settings,
              "window": [window_start, time.time()]}
    if profile and profile_path is not None:  # after the timed window, as the llmtrain rows' StepProfiler
        from llmtrain.callbacks.profile import profile_report, timeline_lines

        def traced(activities: list) -> tuple[torch.profiler.profile, float]:
            shapes = torch.profiler.ProfilerActivity.CPU in activities
            with torch.profiler.profile(activities=activities, record_shapes=shapes) as prof:
                start = clock()
                for _ in range(profile):
                    step()
                return prof, (clock() - start) * 1e6

        cuda_activity = torch.profiler.ProfilerActivity.CUDA
        prof, wall_us = traced([torch.profiler.ProfilerActivity.CPU] + ([cuda_activity] if cuda else []))
        timeline = None
        if cuda:  # the next steps traced with kernel activity only, as StepProfiler's second window
            kernel_trace, kernel_wall_us = traced([cuda_activity])
            timeline = timeline_lines(kernel_trace, profile, kernel_wall_us)
        profile_path.write_text(profile_report(prof.key_averages(), profile, wall_us, cuda,
                                               by_shape=prof.key_averages(group_by_input_shape=True),
                                               timeline=timeline))
    return result


def matmul_ceiling(n: int = 8192, repeats: int = 50) -> float:
    """Measured bf16 matmul rate (FLOP/s) on random n x n operands: the median of `repeats` timed products, each
    on one of four operand pairs in turn (so no run reads the last one's output from L2)."""
    pairs = [(torch.randn(n, n, device="cuda", dtype=torch.bfloat16),
              torch.randn(n, n, device="cuda", dtype=torch.bfloat16)) for _ in range(4)]
    for a, b in pairs:
        a @ b
    times = []
    for i in range(repeats):
        a, b = pairs[i % 4]
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(begin.elapsed_time(end) / 1e3)
    del pairs
    torch.cuda.empty_cache()
    return 2 * n**3 / sorted(times)[len(times) // 2]


# ----------------------------------------------------------------------------------------------------------------
# (c) llmtrain fit.
def row_name(shape: str, levers: tuple[str, ...]) -> str:
    """An llmtrain row's name: its config, run folder and profile are named after it."""
    return f"llmtrain_{shape}_{'+'.join(levers) or 'shipped'}"


def llmtrain_config(shape: str, args: argparse.Namespace, levers: tuple[str, ...]) -> Path:
    import yaml

    steps, warmup, name = args.steps, args.warmup, row_name(shape, levers)
    config = resolved_config(REPO / SHAPES[shape][4])
    callbacks = []
    for entry in config["trainer"].get("callbacks") or []:
        callback = entry["class_path"].rsplit(".", 1)[-1]
        init = entry.setdefault("init_args", {})
        if callback in STABILITY_CALLBACKS and "nostab" in levers:
            continue
        if callback == "PeriodicCheckpoint":  # no checkpoint inside the run: one step interval past its end
            init.update(every_n_steps=10 * total_steps(args), every_minutes=None)
        if callback == "Throughput":  # one window: steps warmup+1..steps
            init.update(window=steps - warmup, warmup_steps=warmup)
        callbacks.append(entry)
    if args.profile:  # after the timed window: where the time of a step goes
        callbacks.append({"class_path": "llmtrain.callbacks.StepProfiler", "init_args": {
            "start_step": profile_start(args), "num_steps": args.profile,
            "output": str(args.out / f"profile_{name}.md")}})
    if "hostreads" in levers:  # importable from the fit's subprocess: run_llmtrain puts benchmarks/ on its path
        callbacks.append({"class_path": "host_reads.PerStepHostReads"})
    if "synclog" in levers:
        callbacks.append({"class_path": "host_reads.LoggingStepReads"})
    if args.profile_monitored and "nostab" not in levers:  # first in the list: its window takes in the probes
        callbacks.insert(0, {"class_path": "llmtrain.callbacks.StepProfiler", "init_args": {
            "start_step": monitored_step(args), "num_steps": 1,
            "output": str(args.out / f"profile_{name}_monitored.md")}})
    config["trainer"]["callbacks"] = callbacks
    # The loop's recipe: one micro-batch per optimizer step (the configs' global batch would accumulate).
    config["data"]["global_batch_size"] = None
    path = args.out / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def profiled_steps(args: argparse.Namespace) -> int:
    """The steps StepProfiler takes after the timed window: --profile steps, and as many again traced for its device
    timeline (on a GPU)."""
    return 0 if not args.profile else args.profile * (1 if args.tiny else 2)


def profile_start(args: argparse.Namespace) -> int:
    """StepProfiler's first step: the first after the timed window whose profiled steps hold no monitored step (a
    global_step that is a multiple of MONITOR_INTERVAL, where WeightMonitor's per-tensor statistics and the probes
    run), so the profile shows the steps the timed window measured; --profile_monitored profiles one on its own."""
    start = args.steps
    while any(step % MONITOR_INTERVAL == 0 for step in range(start, start + profiled_steps(args))):
        start += 1
    return start


def monitored_step(args: argparse.Namespace) -> int:
    """The first step the stability monitors run at (every MONITOR_INTERVAL) after the timed and profiled steps."""
    end = profile_start(args) + profiled_steps(args)
    return -(-end // MONITOR_INTERVAL) * MONITOR_INTERVAL


def total_steps(args: argparse.Namespace) -> int:
    return monitored_step(args) + 1 if args.profile_monitored else profile_start(args) + profiled_steps(args)


def run_llmtrain(shape: str, micro_batch: int, levers: tuple[str, ...], args: argparse.Namespace) -> dict:
    config = llmtrain_config(shape, args, levers)
    runs = args.out / "runs"
    name = row_name(shape, levers)
    total = total_steps(args)
    cmd = [sys.executable, "-m", "llmtrain.cli", "fit", "--config", str(config),
           "--trainer.max_steps", str(total), "--model.optim.total_steps", str(total),
           "--model.optim.warmup_steps", str(max(1, min(20, args.steps // 4))),
           "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false",
           "--trainer.logger.init_args.save_dir", str(runs), "--trainer.logger.init_args.name", name,
           "--data.data_dir", args.data_dir, "--data.micro_batch_size", str(micro_batch),
           "--model.config.vocab_size", str(args.vocab_size)]
    if "fp8" in levers:
        cmd += ["--model.float8", "true"]
    if "cudagraphs" in levers:
        cmd += ["--model.compile_mode", "reduce-overhead"]
    if "layernorm" in levers:
        cmd += ["--model.config.norm", "layernorm"]
    cmd += ["--trainer.devices", str(args.devices), *(["--trainer.strategy", "ddp"] if args.devices > 1 else [])]
    if args.tiny:
        d, layers, heads, _, _ = SHAPES["tiny"]
        cmd += ["--trainer.accelerator", "cpu", "--trainer.precision", "32-true",
                "--model.config.d_model", str(d), "--model.config.n_layer", str(layers),
                "--model.config.n_head", str(heads), "--model.config.ffn_multiple_of", "64",
                "--model.config.max_seq_len", str(TINY_SEQ), "--data.seq_len", str(TINY_SEQ),
                "--model.compile", "off", "--data.num_workers", "0", "--trainer.log_every_n_steps", "1"]
    if "nolog" in levers:  # after --tiny's interval, which it overrides
        cmd += ["--trainer.log_every_n_steps", "0"]
    run_dir = runs / name
    if run_dir.exists():  # a fresh run each time (a fit into an existing run folder is refused)
        import shutil

        shutil.rmtree(run_dir)
    log = args.out / "log.txt"
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        try:
            code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=fit_env()).returncode
        except Stopped:  # the fit may have written its timed window before the signal: keep it if so
            result = llmtrain_result(run_dir, micro_batch, args)
            if "failed" in result:
                result = {"failed": "stopped (SIGTERM) before its timed window was written"}
            return {**result, "stopped": True}
    if code != 0:
        return {"failed": f"llmtrain fit exited with {code}; see {log}"}
    return llmtrain_result(run_dir, micro_batch, args)


def fit_env() -> dict[str, str]:
    """The environment of an llmtrain row's fit: this one, with benchmarks/ importable (the callbacks of the
    hostreads and synclog levers)."""
    path = os.pathsep.join(p for p in (str(REPO / "benchmarks"), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path}


def llmtrain_result(run_dir: Path, micro_batch: int, args: argparse.Namespace) -> dict:
    """An llmtrain row's figures, from the TensorBoard events of its run."""
    from llmtrain.events import read_scalars

    scalars = read_scalars(run_dir) if run_dir.is_dir() else {}
    tps = scalars.get("train/tokens_per_sec", {})
    if not tps:
        return {"failed": f"no train/tokens_per_sec in {run_dir}; raise --steps"}
    tokens_per_sec = tps[max(tps)]
    seq = TINY_SEQ if args.tiny else SEQ
    mem = scalars.get("train/gpu_mem_peak_gib", {})
    loss = scalars.get("train/loss", {})
    step_ms = 1e3 * micro_batch * seq * args.devices / tokens_per_sec
    # The window's end: when its tokens/s was logged (once the GPU had passed it, within a step or two).
    end = logged_at(run_dir, "train/tokens_per_sec")
    return {"tokens_per_sec": tokens_per_sec, "step_ms": step_ms,
            "peak_gib": max(mem.values()) if mem else None, "final_loss": loss[max(loss)] if loss else None,
            "window": [end - (args.steps - args.warmup) * step_ms / 1e3, end]}


def logged_at(run_dir: Path, tag: str) -> float:
    """The wall time (time.time()) at which `tag` was last logged in the run."""
    from llmtrain.events import accumulators

    return max(event.wall_time for accumulator in accumulators(run_dir)
               if tag in accumulator.Tags()["scalars"] for event in accumulator.Scalars(tag))


# ----------------------------------------------------------------------------------------------------------------
def run_worker(impl: str, shape: str, micro_batch: int, variant: str, args: argparse.Namespace,
               profile: int) -> dict:
    """One loop row in its own process (fresh dynamo caches and peak-memory counter), profiling `profile` steps after
    its timed window; the result is its last line. A row that fails or outlasts --row_timeout is reported with the
    last line of its error."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_worker", impl, "--shapes", shape,
           "--baseline_variants", variant, "--micro_batch_size", str(micro_batch),
           "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--vocab_size", str(args.vocab_size), "--profile", str(profile), "--out", str(args.out),
           "--data_dir", args.data_dir, "--loop_tokens", args.loop_tokens,
           *(["--tiny"] if args.tiny else [])]
    log = args.out / "log.txt"
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=args.row_timeout)
        except subprocess.TimeoutExpired as err:
            f.write(f"{err.stderr or ''}\n")
            return {"failed": f"{impl}: no result within --row_timeout {args.row_timeout} s"}
        f.write(proc.stderr + proc.stdout)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        errors = [line for line in proc.stderr.splitlines() if "Error" in line or "error" in line]
        return {"failed": f"{impl} exited with {proc.returncode}: {(errors or ['see log.txt'])[-1].strip()[:300]}"}
    return json.loads(lines[-1])


def rows(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(implementation, variant) per row: the loops with --baseline_variants, llmtrain with --variants."""
    out = []
    for impl in args.only:
        variants = args.variants if impl == "llmtrain" else args.baseline_variants
        if impl != "torchtitan":  # the sdpa lever is torchtitan's attention switch alone
            variants = [v for v in variants if impl == "llmtrain" or "sdpa" not in parse_variant(v, LOOP_LEVERS)]
        out += [(impl, variant) for variant in variants]
    return out


def planned_rows(shapes: list[str], args: argparse.Namespace) -> list[tuple[str, str, str, bool]]:
    """(shape, implementation, variant, repeat) in the order they run: each shape's rows, then, with
    --repeat_reference, its baseline rows again."""
    planned = []
    for shape in shapes:
        planned += [(shape, impl, variant, False) for impl, variant in rows(args)]
        if args.repeat_reference:
            planned += [(shape, impl, variant, True) for impl, variant in rows(args) if impl == "baseline"]
    return planned


def fmt(value: Optional[float], spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def same_recipe_ratios(results: list[dict]) -> dict[int, float]:
    """Row index -> tokens/s over the baseline loop's at the same shape, micro-batch, precision (bf16 or float8) and
    clipping, i.e. the same tokens per step, numerics class and passes over the gradients; rows with no such
    baseline get none."""
    base = {key: sum(runs) / len(runs) for key, runs in reference_runs(results).items()}
    return {i: r["tokens_per_sec"] / base[recipe(r)] for i, r in enumerate(results)
            if "tokens_per_sec" in r and recipe(r) in base}


def reference_runs(results: list[dict]) -> dict[tuple, list[float]]:
    """Recipe -> tokens/s of each run of its baseline loop row (two with --repeat_reference), in the order run."""
    runs: dict[tuple, list[float]] = {}
    for r in results:
        reference = r["impl"] == "baseline" and set(row_levers(r)) <= {"fp8", "clip", *MICRO_BATCH_LEVERS}
        if reference and "tokens_per_sec" in r:
            runs.setdefault(recipe(r), []).append(r["tokens_per_sec"])
    return runs


def drift_notes(results: list[dict]) -> list[str]:
    """A line per reference loop that ran twice: both runs and their spread, the error bar of its rows' ratios."""
    notes = []
    for (shape, micro_batch, fp8, _, clips), runs in reference_runs(results).items():
        if len(runs) > 1:
            what = ", ".join([f"micro-batch {micro_batch}"] + ["float8"] * fp8 + ["clipping"] * clips)
            notes.append(f"Reference loop ({shape}, {what}) run first and last: {runs[0]:,.0f} and {runs[-1]:,.0f} "
                         f"tokens/s ({100 * (runs[-1] / runs[0] - 1):+.1f}%); its rows' 'vs loop' is against the "
                         "mean.")
    return notes


def table(results: list[dict], args: argparse.Namespace) -> str:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() and not args.tiny else "CPU"
    ceiling = getattr(args, "ceiling", None)
    lines = result_rows(results, ceiling, args.tiny)
    seq = TINY_SEQ if args.tiny else SEQ
    versions = sorted({r["settings"].split(":")[0] for r in results if r.get("settings")})
    lines += ["", f"Device: {device}; torch {torch.__version__}; {', '.join(versions)}. Sequence {seq}, vocab "
              f"{args.vocab_size}; {args.steps} steps, the first {args.warmup} excluded (tokens/s over steps "
              f"{args.warmup + 1}-{args.steps}).",
              "MFU = tokens/s x (6*N_matmul + 12*n_layer*d_model*seq) / peak (N_matmul: every parameter but the input "
              "embedding), against the 989 TFLOP/s H100/H200 SXM dense bf16 datasheet peak and against the measured "
              f"bf16 matmul ceiling ({fmt(ceiling and ceiling / 1e12, '.0f')} TFLOP/s: an 8192^3 product, median of "
              "50, same call); float8 rows are counted against the bf16 peaks too" +
              (" - not given on CPU." if args.tiny else "."),
              "Loop rows (baseline, litgpt, torchtitan, olmo_core): "
              + ("windows of --data_dir's training tokens (the llmtrain rows' text)" if args.loop_tokens == "shards"
                 else "uniformly random tokens") + ", fused torch AdamW, bf16 autocast, "
              "peak memory = torch.cuda.max_memory_allocated over the run; llmtrain: `llmtrain fit` on --data_dir "
              "shards, the Throughput callback's window and peak memory. 'vs loop': against the baseline loop row of "
              "the same micro-batch, precision and gradient clipping (same recipe; llmtrain's configs clip).",
              *drift_notes(results),
              *[f"Row {r['label']}: {r['settings']}." for r in results if r.get("settings") and not r.get("repeat")],
              *[f"Lever {name}: {what}." for name, what in {**LEVERS, **LOOP_LEVERS}.items()
                if any(name in row_levers(r) for r in results)]]
    memory = torch.cuda.get_device_properties(0).total_memory / 2**30 if torch.cuda.is_available() else None
    return "\n".join(lines + state_lines(results) + largest_micro_batch(results, memory))


def result_rows(results: list[dict], ceiling: Optional[float], tiny: bool) -> list[str]:
    """The table's header and one line per row; MFU against the datasheet peak and the measured `ceiling`."""
    lines = ["| shape | implementation | micro-batch | precision | tokens/s | MFU (989) | MFU (measured peak) "
             "| step time (ms) | peak GPU memory (GiB) | vs loop (same recipe) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    ratios = same_recipe_ratios(results)
    for i, r in enumerate(results):
        precision = "float8" if "fp8" in row_levers(r) else "bf16"
        head = f"| {r['shape']} | {r['label']} | {r['micro_batch']} | {precision} |"
        if "tokens_per_sec" not in r:
            lines.append(f"{head} {r.get('skipped') or r.get('failed')} | | | | | |")
            continue
        flops = r["tokens_per_sec"] * r["flops_per_token"] / r.get("devices", 1)  # per device
        mfu = None if tiny else 100 * flops / DATASHEET_BF16
        measured = None if tiny or not ceiling else 100 * flops / ceiling
        lines.append(f"{head} {r['tokens_per_sec']:,.0f} | {fmt(mfu, '.1f')}{'%' if mfu else ''} "
                     f"| {fmt(measured, '.1f')}{'%' if measured else ''} | {r['step_ms']:.1f} "
                     f"| {fmt(r['peak_gib'], '.1f')} | {fmt(ratios.get(i), '.3f')} |")
    return lines


def largest_micro_batch(results: list[dict], memory_gib: Optional[float]) -> list[str]:
    """Largest micro-batch that fits, from rows that differ only in the micro-batch: peak memory is affine in the
    micro-batch (weights, gradients and optimizer state, plus activations per sequence), so two measured points
    give the line (each row against its group's smallest micro-batch), and the estimate is where it meets 95% of
    the GPU's memory (`memory_gib`; None: no GPU)."""
    if memory_gib is None:
        return []
    capacity = 0.95 * memory_gib

    def other_levers(r: dict) -> tuple:
        return r["shape"], r["impl"], tuple(sorted(set(row_levers(r)) - set(MICRO_BATCH_LEVERS)))

    smallest: dict[tuple, dict] = {}
    for r in results:
        if r.get("peak_gib") and r["micro_batch"] < smallest.get(other_levers(r), {}).get("micro_batch", math.inf):
            smallest[other_levers(r)] = r
    lines = []
    for r in results:
        small = smallest.get(other_levers(r))
        if not r.get("peak_gib") or small is None or small["micro_batch"] == r["micro_batch"] or r.get("repeat"):
            continue
        per_sequence = (r["peak_gib"] - small["peak_gib"]) / (r["micro_batch"] - small["micro_batch"])
        fixed = small["peak_gib"] - per_sequence * small["micro_batch"]
        fits = int((capacity - fixed) / per_sequence) if per_sequence > 0 else None
        lines.append(f"| {r['shape']} | {r['label']} | {fixed:.1f} | {per_sequence:.2f} | {fits} |")
    if not lines:
        return []
    return ["", f"Largest micro-batch (estimate: the line through the two measured peaks, at 95% of "
                f"{capacity / 0.95:.0f} GiB):", "",
            "| shape | rows | fixed (GiB) | per sequence (GiB) | largest micro-batch |", "|---|---|---|---|---|", *lines]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["124m"], choices=list(SHAPES),
                        help="124m 350m 1b ('tiny' only with --tiny)")
    parser.add_argument("--steps", type=int, default=None, help="total steps per row (default 150; 12 with --tiny)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed first steps (default 30; 4 with --tiny)")
    parser.add_argument("--micro_batch_size", type=int, default=None, help="override the shape's micro-batch")
    parser.add_argument("--data_dir", default=".gpu_data/shards", help="prepared shards for the llmtrain rows")
    parser.add_argument("--vocab_size", type=int, default=32000, help="must match the shards' tokenizer")
    parser.add_argument("--out", default="benchmark_out/throughput", help="throughput.md, throughput.json, logs")
    parser.add_argument("--only", nargs="+", default=list(IMPLEMENTATIONS), choices=IMPLEMENTATIONS)
    parser.add_argument("--variants", nargs="+", default=["shipped"],
                        help=f"llmtrain rows: 'shipped' or levers joined by '+' ({', '.join(LEVERS)})")
    parser.add_argument("--baseline_variants", nargs="+", default=["shipped"],
                        help=f"loop rows (baseline, litgpt, torchtitan, olmo_core): 'shipped' or levers joined by '+' "
                             f"({', '.join(LOOP_LEVERS)})")
    parser.add_argument("--devices", type=int, default=1,
                        help="llmtrain rows: train on this many devices (DDP; tokens/s counts all of them, MFU is per "
                             "device); the loop rows stay on one")
    parser.add_argument("--row_timeout", type=float, default=None, help="seconds one loop row may take (default: none)")
    parser.add_argument("--no_ceiling", action="store_true", help="skip measuring the bf16 matmul ceiling")
    parser.add_argument("--loop_tokens", choices=["shards", "random"], default="shards",
                        help="what the loop rows train on: windows of --data_dir's shards (the llmtrain rows' text, so "
                             "data-dependent kernels such as the embedding's backward see the same tokens) or "
                             "uniformly random tokens")
    parser.add_argument("--repeat_reference", action="store_true",
                        help="run each shape's baseline loop rows again after its other rows: the spread of the two "
                             "runs shows the drift over the call, and 'vs loop' is against their mean")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="profile N steps after the timed window of every row (StepProfiler's report; profile_*.md)")
    parser.add_argument("--profile_monitored", action="store_true",
                        help="llmtrain rows: also profile the first monitored step after the window (runs on to it; "
                             "profile_*_monitored.md)")
    parser.add_argument("--tiny", action="store_true",
                        help="CPU smoke test: tiny shape, few steps, no compile, fp32, no autocast, no fused AdamW")
    parser.add_argument("--_worker", choices=LOOP_IMPLEMENTATIONS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.steps = args.steps if args.steps is not None else (12 if args.tiny else 150)
    args.warmup = args.warmup if args.warmup is not None else (4 if args.tiny else 30)
    if not 0 < args.warmup < args.steps - 1:
        parser.error(f"need 0 < --warmup ({args.warmup}) < --steps - 1 ({args.steps - 1})")
    for variant in args.variants:
        parse_variant(variant)
    for variant in args.baseline_variants:
        parse_variant(variant, LOOP_LEVERS, "--baseline_variants")
    if args.devices < 1:
        parser.error(f"--devices {args.devices}: must be at least 1")
    if "tiny" in args.shapes and not args.tiny:
        parser.error("shape 'tiny' is the CPU smoke test: use --tiny")
    shapes = ["tiny"] if args.tiny else args.shapes

    if args._worker:
        torch.backends.cuda.matmul.allow_tf32 = True
        variant = args.baseline_variants[0]
        profile_path = Path(args.out) / f"profile_{args._worker}_{shapes[0]}_{variant}_mb{args.micro_batch_size}.md"
        data = shard_tokens(args.data_dir, args.vocab_size) if args.loop_tokens == "shards" else None
        result = loop(args._worker, shapes[0], args.micro_batch_size, args.steps, args.warmup, args.vocab_size,
                      args.tiny, args.profile, profile_path, parse_variant(variant, LOOP_LEVERS), data)
        print(json.dumps(result))
        return

    if not args.tiny and not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU, or use --tiny for the CPU smoke test")
    args.out = Path(args.out).resolve()
    args.data_dir = str(Path(args.data_dir).resolve())  # the rows' subprocesses run in the repository
    args.out.mkdir(parents=True, exist_ok=True)
    loops_on_shards = args.loop_tokens == "shards" and any(impl != "llmtrain" for impl in args.only)
    if ("llmtrain" in args.only or loops_on_shards) and not (Path(args.data_dir) / "metadata.json").is_file():
        parser.error(f"--data_dir {args.data_dir}: no prepared shards (metadata.json) there"
                     + (" (the loop rows train on them: --loop_tokens random for random tokens)"
                        if loops_on_shards else ""))
    signal.signal(signal.SIGTERM, raise_stopped)
    if not args.tiny and not args.no_ceiling:
        args.ceiling = matmul_ceiling()
        print(f"[throughput] bf16 matmul 8192^3: {args.ceiling / 1e12:.0f} TFLOP/s (median of 50)", flush=True)
    results = []
    for shape, impl, variant, repeat in planned_rows(shapes, args):
        cfg = model_config(shape, args.vocab_size, TINY_SEQ if args.tiny else SEQ)
        levers = parse_variant(variant) if impl == "llmtrain" else parse_variant(variant, LOOP_LEVERS)
        micro_batch = (args.micro_batch_size or SHAPES[shape][3]) * micro_batch_factor(levers)
        devices = args.devices if impl == "llmtrain" else 1
        label = impl if variant == "shipped" else f"{impl} ({variant})"
        label += f", {devices} devices" if devices > 1 else ""
        label += ", repeated last" if repeat else ""
        print(f"[throughput] {shape} {label} (micro-batch {micro_batch}, {args.steps} steps)...", flush=True)
        start = time.time()
        with GpuSampler() as sampler:
            try:
                r = (run_llmtrain(shape, micro_batch, levers, args) if impl == "llmtrain"
                     else run_worker(impl, shape, micro_batch, variant, args, 0 if repeat else args.profile))
            except Stopped:  # an llmtrain row that logged its timed window is kept by run_llmtrain
                r = {"failed": "stopped (SIGTERM) before the row finished", "stopped": True}
        if r.get("window"):
            r["gpu_state"] = window_summary(sampler.samples, *r["window"])
        r.update(shape=shape, impl=impl, variant=variant, label=label, micro_batch=micro_batch, devices=devices,
                 repeat=repeat,
                 wall_s=round(time.time() - start, 1), flops_per_token=cfg.flops_per_token(cfg.max_seq_len))
        print(f"[throughput]   {json.dumps(r)}", flush=True)
        results.append(r)
        (args.out / "throughput.json").write_text(json.dumps(results, indent=2))
        if r.get("stopped"):
            print("[throughput] stopped by SIGTERM: the rows not yet run are left out", flush=True)
            break
    text = table(results, args)
    print(text)
    (args.out / "throughput.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
