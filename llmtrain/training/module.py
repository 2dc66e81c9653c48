"""LanguageModel: the LightningModule around the plain-torch Decoder (loss, optimizer, schedule, logging)."""

from __future__ import annotations

import math
import random
from dataclasses import asdict, fields
from typing import Any, Literal, Optional, Union, get_args

import lightning.pytorch as pl
import torch

from llmtrain.checkpointing.hf_import import load_initial_weights
from llmtrain.checkpointing.save import refuse_nonfinite_weights
from llmtrain.compat import (checkpoint_wrapper, compile_mode_options, ddp_wrapper_kwargs, set_grad_scale,
                             should_accumulate, takes_step_tensors, torch_optimizer)
from llmtrain.model import ConfigError, Decoder, ModelConfig
from llmtrain.training.loss import cross_entropy_and_z
from llmtrain.training.optim import OptimConfig, ScheduleLR, build_optimizer
from llmtrain.training.step_log import DeferredStepLog, FlushStepLog, log_step

CompileScope = Literal["off", "model", "blocks"]
# torch.compile's modes; "reduce-overhead" replays the compiled graphs as CUDA graphs (one launch per graph: for
# steps whose GPU waits on the host's kernel launches, as StepProfiler showed at 124M).
CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]

# Fields that change parameter shapes: a checkpoint that differs in any of them cannot be loaded.
SHAPE_FIELDS = ("vocab_size", "d_model", "n_layer", "n_head", "n_kv_head", "head_dim", "d_ff", "bias", "ffn",
                "norm", "norm_position", "qk_norm", "tie_embeddings", "position", "max_seq_len")


class LanguageModel(pl.LightningModule):
    """Next-token prediction with cross-entropy + z-loss, AdamW groups and a warmup schedule."""

    def __init__(
        self,
        config: ModelConfig,
        optim: Optional[OptimConfig] = None,
        z_loss_coef: float = 1e-4,
        compile: CompileScope = "off",
        compile_mode: CompileMode = "default",
        activation_checkpointing: bool = False,
        float8: bool = False,
        init_from: Optional[str] = None,
    ) -> None:
        """
        Args:
            config: the decoder architecture (every switch in ModelConfig).
            optim: AdamW hyper-parameters and the LR schedule.
            z_loss_coef: weight of the z-loss term coef·log²Z (PaLM uses 1e-4); 0 turns it off (still logged).
            compile: torch.compile scope: "model" compiles decoder and loss together (fastest on one device),
                "blocks" compiles each block and the loss apart (works under DeepSpeed ZeRO-3), "off" runs eagerly.
            compile_mode: torch.compile's mode for that scope (default, reduce-overhead = CUDA graphs,
                max-autotune, max-autotune-no-cudagraphs).
            activation_checkpointing: recompute each block's activations in backward (saves memory, ~30% compute).
            float8: train every Linear but the LM head with float8 matmuls (torchao's dynamic tensorwise
                scaling; needs a GPU of compute capability >= 8.9 and `pip install torchao`). Pays at ~1B
                parameters and above, costs at 124M (docs/benchmarks.md).
            init_from: a checkpoint (file or ZeRO folder; `llmtrain import` makes one from Hugging Face) whose
                weights the model starts from, loaded after it is built; optimizer, schedule and step start fresh.
                Its model config must equal this one (every differing field is named). To resume a run, use
                `fit --ckpt_path` instead.
        """
        super().__init__()
        # Plain dicts in the checkpoint, so it loads with torch.load(weights_only=True).
        if isinstance(config, dict):
            config = ModelConfig(**config)
        if isinstance(optim, dict):
            optim = OptimConfig(**optim)
        if z_loss_coef < 0:
            raise ConfigError(f"model: z_loss_coef={z_loss_coef!r} is invalid: must be >= 0")
        if compile not in get_args(CompileScope):
            raise ConfigError(f"model: compile={compile!r} is invalid: choose one of "
                              f"{', '.join(get_args(CompileScope))}")
        if compile_mode not in get_args(CompileMode):
            raise ConfigError(f"model: compile_mode={compile_mode!r} is invalid: choose one of "
                              f"{', '.join(get_args(CompileMode))}")
        self.config = config
        self.optim_config = optim or OptimConfig()
        self.z_loss_coef = z_loss_coef
        self.compile_scope = compile
        self.compile_mode = compile_mode
        self.activation_checkpointing = activation_checkpointing
        self.float8 = float8
        self.init_from = init_from
        self.save_hyperparameters({"config": asdict(config), "optim": asdict(self.optim_config),
                                   "z_loss_coef": z_loss_coef, "compile": compile, "compile_mode": compile_mode,
                                   "activation_checkpointing": activation_checkpointing, "float8": float8,
                                   "init_from": init_from})
        self.model: Optional[Decoder] = None
        self._loss_fn = self._forward_loss
        self._cross_entropy = cross_entropy_and_z  # compiled on its own under compile: blocks (configure_model)
        self._grad_norm: Optional[torch.Tensor] = None  # this step's, see gradient_norm()
        # This step's train/* scalars, written at logging steps (see training_step): sums over its micro-batches,
        # other device values, host values.
        self._step_sums: dict[str, torch.Tensor] = {}
        self._micro_batches = 0
        self._step_values: dict[str, torch.Tensor] = {}
        self._step_host: dict[str, float] = {}
        self.step_log = DeferredStepLog()  # the values of the last logging step, until the next step boundary
        self._scaled_optimizer: Optional[torch.optim.Optimizer] = None  # holds a clipping grad_scale this step
        self.tokens_seen = 0  # global count of trained tokens, restored on resume
        self.run_config: Optional[str] = None  # the resolved YAML, set by the CLI and stored in checkpoints

    # -- model construction -------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        """Builds the decoder inside the strategy's init context, so ZeRO-3 shards parameters from the start."""
        if self.model is not None:
            return
        self.model = Decoder(self.config)
        if any(hasattr(p, "ds_id") for p in self.model.parameters()):  # built under deepspeed.zero.Init (ZeRO-3)
            import deepspeed

            # The init in Decoder.__init__ wrote into already-partitioned (empty) parameters: redo it gathered.
            self.model.reset_parameters(gather=lambda params: deepspeed.zero.GatheredParameters(params, modifier_rank=0))
        if self.init_from is not None:  # before any wrapper renames the parameters
            load_initial_weights(self.model, self.init_from)
        if self.float8:
            convert_to_float8(self.model)
        if self.activation_checkpointing:
            for i, block in enumerate(self.model.blocks):
                self.model.blocks[i] = checkpoint_wrapper(block)
        if self.compile_scope == "blocks":
            options = self._compile_options()
            for block in self.model.blocks:
                block.compile(options=options)
            # The loss has no parameters (nothing of ZeRO-3's hooks to trace): compiled, it reads the head's logits
            # once, with no fp32 (B, T, V) copy and no eager softmax buffers (8192 tokens x 32000 on CPU: forward +
            # backward 4.7x faster, peak memory 1.3 against 5.7 GiB; benchmarks/loss_target.py, docs/benchmarks.md).
            self._cross_entropy = torch.compile(cross_entropy_and_z, options=options)
        elif self.compile_scope == "model":
            # Loss inside the compiled region: no eager fp32 (B, T, V) logits (measured 1.15x at 124M on H100).
            self._loss_fn = torch.compile(self._forward_loss, options=self._compile_options())

    def _compile_options(self) -> dict[str, Any]:
        """Inductor options of the compile mode (torch.compile takes a mode or options, not both)."""
        return compile_mode_options(self.compile_mode)

    def _forward_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(batch["input_ids"], batch.get("document_ids"), batch.get("position_ids"))
        return self._cross_entropy(logits, batch["labels"])

    def forward(self, input_ids: torch.Tensor, document_ids: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.model(input_ids, document_ids, position_ids)

    # -- steps ----------------------------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        ce, z = self._loss_fn(batch)
        loss = ce + self.z_loss_coef * z
        # The per-step scalars stay on the device until on_train_batch_end queues them, at Lightning's logging steps,
        # for one transfer written a step later (DeferredStepLog; the progress bar shows them from there). Not
        # through self.log: its bookkeeping took a third of the host time of a step on the CI machine (6 calls per
        # step), and a host read every step stalls the CPU's lead over the GPU (measured 10% at 124M on an H100).
        # Under gradient accumulation, the mean over the step's micro-batches: the loss the optimizer step followed.
        self._micro_batches += 1
        for tag, value in (("train/loss", loss), ("train/ce_loss", ce), ("train/z_loss", z)):  # z: mean log²Z,
            self._step_sums[tag] = self._step_sums.get(tag, 0.0) + value.detach()  # logged even at coef 0
        # Counted here, not at batch end: checkpoint callbacks run before the module's batch-end hook.
        self.tokens_seen += batch["input_ids"].numel() * self.trainer.world_size
        # Host values as they are at this step (the scheduler steps before the batch-end hook)
        self._step_host = {"train/lr": self.trainer.optimizers[0].param_groups[0]["lr"],
                           "train/tokens": float(self.tokens_seen)}
        return loss

    def _logging_step(self) -> bool:
        """Lightning's rule for writing a step's values (LoggerConnector.should_update_logs): every
        log_every_n_steps-th optimizer step, and the step training stops at; on the step's last micro-batch."""
        trainer = self.trainer
        if should_accumulate(trainer) or not trainer.log_every_n_steps:
            return False
        step = log_step(trainer) + 1  # the optimizer step this batch completes
        return step % trainer.log_every_n_steps == 0 or trainer.should_stop or bool(trainer.fast_dev_run)

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer,
                                    gradient_clip_val: Optional[Union[int, float]] = None,
                                    gradient_clip_algorithm: Optional[str] = None) -> None:
        """Clips by global norm and logs that norm (train/grad_norm) from the same pass over the gradients; with
        torch's fused AdamW the scaling itself happens inside its step (_clip_in_optimizer_step).

        Replaces Lightning's clipping, which refuses torch's fused AdamW under bf16-mixed (it assumes a grad
        scaler that bf16 does not use). Under DDP the gradients are already all-reduced here, so the norm is
        global. DeepSpeed clips inside its engine, and Lightning still calls this hook there with every `p.grad`
        already moved into ZeRO's partitions: nothing to do, and a norm of no gradients would log 0 as
        train/grad_norm (the engine's norm is logged in on_train_batch_end).
        """
        if self._deepspeed_engine() is not None:
            return
        if gradient_clip_algorithm == "value":
            torch.nn.utils.clip_grad_value_(self.parameters(), gradient_clip_val)
            return
        norm = self.gradient_norm()
        if gradient_clip_val and not self._clip_in_optimizer_step(optimizer, float(gradient_clip_val), norm):
            torch.nn.utils.clip_grads_with_norm_(self.parameters(), float(gradient_clip_val), norm, foreach=True)
        self._step_values["train/grad_norm"] = norm

    def _clip_in_optimizer_step(self, optimizer: Optional[torch.optim.Optimizer], max_norm: float,
                                norm: torch.Tensor) -> bool:
        """Clips inside torch's fused AdamW: GradScaler's `grad_scale`, which its kernel divides every gradient by
        as it reads them, set to the inverse of clip_grads_with_norm_'s coefficient (max_norm / (norm + 1e-6), at
        most 1). That spares clipping its own read and write of every gradient; the update is the same up to
        rounding. False where the optimizer takes no grad_scale, or a GradScaler (fp16) sets its own."""
        if optimizer is None:
            return False
        optimizer = torch_optimizer(optimizer)
        if not takes_step_tensors(optimizer, self._trainer):
            return False
        set_grad_scale(optimizer, torch.clamp((norm.float() + 1e-6) / max_norm, min=1.0))
        self._scaled_optimizer = optimizer  # the divisor is for this step only: removed at the next batch start
        return True

    def gradient_norm(self) -> torch.Tensor:
        """Global L2 norm of this step's gradients before clipping, computed once per step and shared by clipping
        and SpikeDetector (one pass over the gradients, not two). Under DDP they are all-reduced by now."""
        if self._grad_norm is None:
            grads = [p.grad for p in self.parameters() if p.grad is not None]
            self._grad_norm = torch.nn.utils.get_total_norm(grads, foreach=True)
        return self._grad_norm

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._grad_norm = None
        if self._scaled_optimizer is not None:
            set_grad_scale(self._scaled_optimizer, None)
            self._scaled_optimizer = None

    def _deepspeed_engine(self) -> Optional[Any]:
        return getattr(getattr(self._trainer, "strategy", None), "deepspeed_engine", None)

    def on_train_batch_end(self, outputs: Any, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        engine = self._deepspeed_engine()
        if engine is not None:
            norm = engine.get_global_grad_norm()  # the last norm DeepSpeed's own clipping pass computed
            if isinstance(norm, torch.Tensor):  # a device tensor stays one (float() would sync every step)
                self._step_values["train/grad_norm"] = norm.float()
            elif norm is not None:
                # DeepSpeed also returns Python floats (0 before the first step, inf on overflow): a host value,
                # not a CPU tensor that the step log would stack with the device ones.
                self._step_host["train/grad_norm"] = float(norm)
        trainer = self.trainer
        if not self._logging_step():  # the module's hook runs after the callbacks', as Lightning's own logging does
            self.step_log.flush(trainer)  # the previous logging step's values, a step boundary after their submit
        else:
            means = {tag: total / self._micro_batches for tag, total in self._step_sums.items()}
            self.step_log.submit(trainer, {**means, **self._step_values}, log_step(trainer), host=self._step_host)
            if trainer.should_stop or 0 < trainer.max_steps <= trainer.global_step:
                self.step_log.flush(trainer)  # the run's last step: nothing is queued behind it to wait for
        if not should_accumulate(trainer):
            self._step_values, self._step_sums, self._micro_batches = {}, {}, 0

    def on_validation_start(self) -> None:
        self.step_log.flush(self.trainer)  # the step's values before validation's: in order in the logs and lines

    def configure_callbacks(self) -> list[pl.Callback]:
        return [FlushStepLog(self.step_log)]  # the last logging step's values, at the end of training or an error

    # This validation's (sum of batch loss x batch size, sum of batch sizes) on this rank, for val/ppl.
    _val_loss_sums: Optional[torch.Tensor] = None

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        ce, _ = self._loss_fn(batch)
        self.log("val/loss", ce, sync_dist=True, prog_bar=True)
        # Weighted by batch size as Lightning weights val/loss, so that val/ppl = exp(val/loss) exactly. Not the mean
        # of per-batch exp(loss): exp is convex, so that mean is above exp of the mean (Jensen).
        size = batch["input_ids"].shape[0]
        sums = torch.stack([ce.detach().float() * size, ce.new_tensor(float(size), dtype=torch.float32)])
        self._val_loss_sums = sums if self._val_loss_sums is None else self._val_loss_sums + sums
        bytes_per_token = self._bytes_per_token()
        if bytes_per_token is not None:  # bits per byte: comparable across tokenizers
            self.log("val/bpb", ce / math.log(2) / bytes_per_token, sync_dist=True)
        return ce

    def on_validation_epoch_end(self) -> None:
        """val/ppl = exp(mean val loss over every rank's batches), from the sums validation_step kept."""
        sums, self._val_loss_sums = self._val_loss_sums, None
        if sums is None:  # no validation batch ran
            return
        total = self.trainer.strategy.reduce(sums, reduce_op="sum")
        # Every rank holds the same value now; sync_dist only keeps Lightning from asking for it.
        self.log("val/ppl", torch.exp(total[0] / total[1]), sync_dist=True)

    def _bytes_per_token(self) -> Optional[float]:
        datamodule = getattr(self.trainer, "datamodule", None)
        fn = getattr(datamodule, "bytes_per_token", None)
        return fn("val") if fn is not None else None

    # -- optimizer --------------------------------------------------------------------------------------------------
    def configure_optimizers(self) -> dict:
        optimizer = build_optimizer(self.model, self.optim_config)
        total = self.optim_config.total_steps or self.trainer.max_steps
        if total is None or total <= 0:
            raise ConfigError("optim.total_steps is unset and trainer.max_steps is -1: set one of them, "
                              "the LR schedule needs the run length")
        # On resume the checkpoint's schedule length wins unless optim.total_steps asks for another (ScheduleLR).
        scheduler = ScheduleLR(optimizer, self.optim_config, total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- start-of-run checks and checkpoint contents --------------------------------------------------------------
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        check = getattr(datamodule, "check_vocab", None)
        if check is not None:
            check(self.config.vocab_size)
        ddp = ddp_wrapper_kwargs(self.trainer.strategy)
        if ddp is not None:  # before the strategy wraps the model; what a config sets (init_args) is kept
            # Gradients as views into DDP's all-reduce buckets: no copy of every gradient into the buckets and back
            # each step, and no second gradient-sized buffer (4 bytes per parameter in memory).
            ddp.setdefault("gradient_as_bucket_view", True)
            # The buffers (RoPE tables, ALiBi slopes) are computed from the config on every rank: nothing to
            # broadcast from rank 0 before every forward.
            ddp.setdefault("broadcast_buffers", False)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        refuse_nonfinite_weights(self.trainer, self.model)  # before anything is written, on every rank
        datamodule = getattr(self.trainer, "datamodule", None)
        checkpoint["llmtrain"] = {
            "tokens_seen": self.tokens_seen,
            "run_config": self.run_config,
            "tokenizer": getattr(datamodule, "tokenizer_path", None),
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate()[1],
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # fit --ckpt_path on a weights file (convert, import, save_weights_only) would fail later in Lightning with a
        # KeyError about optimizer states: say what to do instead. DeepSpeed keeps its optimizer outside this dict;
        # without a Trainer (load_from_checkpoint) the weights are all that is needed.
        try:
            fitting = self.trainer.state.fn == "fit"
        except RuntimeError:  # not attached to a Trainer
            fitting = False
        if fitting and "optimizer_states" not in checkpoint and self._deepspeed_engine() is None:
            raise ConfigError("fit --ckpt_path: the checkpoint holds weights only (no optimizer state), so there is no "
                              "run to resume. To start training from its weights with a fresh optimizer and "
                              "schedule, pass it as --model.init_from PATH instead of --ckpt_path.")
        saved = checkpoint.get("hyper_parameters", {}).get("config")
        if saved is not None:
            check_compatible(saved, self.config)
        state = checkpoint.get("llmtrain")
        if state is None:
            return
        self.tokens_seen = state["tokens_seen"]
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate((3, tuple(state["rng"]["python"]), None))
        if state["rng"]["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])


def convert_to_float8(model: Decoder) -> None:
    """Swaps every Linear but the LM head for torchao's Float8Linear (bf16 weights and master copy unchanged; the
    matmuls run in float8 with dynamic per-tensor scales). The head stays bf16: its logits feed the loss directly,
    and float8 there is what the torchao and torchtitan recipes also leave out."""
    try:
        from torchao.float8 import convert_to_float8_training
    except ImportError as err:
        raise ConfigError(f"model.float8=true needs torchao (pip install torchao): {err}") from err
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
        raise ConfigError("model.float8=true needs a CUDA GPU of compute capability >= 8.9 (H100, L40S, RTX 4090); "
                          "this machine has " + (torch.cuda.get_device_name() if torch.cuda.is_available() else "none"))

    convert_to_float8_training(model, module_filter_fn=float8_eligible)


def float8_eligible(module: torch.nn.Module, name: str) -> bool:
    """Which Linears convert_to_float8 swaps: all but the LM head, and only where float8 matmuls can run (both
    dimensions divisible by 16)."""
    return name != "lm_head" and module.in_features % 16 == 0 and module.out_features % 16 == 0


def check_compatible(saved: dict[str, Any], current: ModelConfig) -> None:
    """Refuses a checkpoint whose architecture differs in parameter shapes, naming every mismatch."""
    known = {f.name for f in fields(ModelConfig)}
    saved_config = ModelConfig(**{k: v for k, v in saved.items() if k in known})
    mismatches = [f"{name}: checkpoint {getattr(saved_config, name)!r} vs config {getattr(current, name)!r}"
                  for name in SHAPE_FIELDS if getattr(saved_config, name) != getattr(current, name)]
    if mismatches:
        raise ConfigError("checkpoint does not match the model config (" + "; ".join(mismatches) + ")")
