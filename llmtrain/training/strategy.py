"""DeepSpeed ZeRO from config: a unit-tested config builder and a strategy whose folder checkpoints are atomic.

DDP needs no class of ours: `trainer.strategy: ddp` (gloo on CPU, NCCL on GPU; LanguageModel.setup gives its wrapper
gradient bucket views and no buffer broadcast). ZeRO is
`trainer.strategy: {class_path: llmtrain.training.strategy.ZeroStrategy, init_args: {stage: 2}}`
(configs/deepspeed/zero{1,2,3}.yaml). Lightning adds bf16, micro-batch size, gradient accumulation and
gradient clipping to the DeepSpeed config from the Trainer's own arguments.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.pytorch.strategies import DeepSpeedStrategy
from lightning.pytorch.utilities import rank_zero_warn

from llmtrain.checkpointing.convert import convert_to_universal
from llmtrain.checkpointing.readers import (UNIVERSAL_LATEST, CheckpointError, is_universal, verify_deepspeed_folder,
                                            zero_world_size)
from llmtrain.checkpointing.resume import check_stage, check_world_size, universal_path
from llmtrain.checkpointing.save import replace_folder
from llmtrain.compat import deepspeed_loads_universal

ZERO_STAGES = (1, 2, 3)


def zero_config(
    stage: int = 2,
    overlap_comm: bool = True,
    contiguous_gradients: bool = True,
    reduce_bucket_size: int = 500_000_000,
    allgather_bucket_size: int = 500_000_000,
    prefetch_bucket_size: int = 50_000_000,
    param_persistence_threshold: int = 100_000,
    offload_optimizer: bool = False,
    offload_parameters: bool = False,
) -> dict[str, Any]:
    """The `zero_optimization` part of a DeepSpeed config, validated; sizes are in elements, as DeepSpeed counts."""
    if stage not in ZERO_STAGES:
        raise ValueError(f"ZeroStrategy: stage={stage!r} is invalid: choose 1, 2 or 3")
    for name, value in (("reduce_bucket_size", reduce_bucket_size), ("allgather_bucket_size", allgather_bucket_size),
                        ("prefetch_bucket_size", prefetch_bucket_size)):
        if int(value) <= 0:
            raise ValueError(f"ZeroStrategy: {name}={value!r} is invalid: must be a positive number of elements")
    if offload_parameters and stage != 3:
        raise ValueError(f"ZeroStrategy: offload_parameters needs stage 3 (got stage={stage})")
    zero: dict[str, Any] = {
        "stage": stage,
        "overlap_comm": overlap_comm,
        "contiguous_gradients": contiguous_gradients,
        "reduce_bucket_size": int(reduce_bucket_size),
        "reduce_scatter": True,
    }
    if stage < 3:
        zero["allgather_partitions"] = True
        zero["allgather_bucket_size"] = int(allgather_bucket_size)
    else:
        zero["stage3_prefetch_bucket_size"] = int(prefetch_bucket_size)
        zero["stage3_param_persistence_threshold"] = int(param_persistence_threshold)
        # Shards stay shards on save; `llmtrain convert` gathers them offline (no 16-bit full copy per save).
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if offload_parameters:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    # torch's (fused) AdamW is not on DeepSpeed's list of tested optimizers, but works with ZeRO 1-3.
    return {"zero_optimization": zero, "zero_allow_untested_optimizer": True}


class ZeroStrategy(DeepSpeedStrategy):
    """DeepSpeed ZeRO stage 1/2/3 with checkpoints that a kill during saving cannot corrupt.

    A checkpoint folder is written under a hidden temporary name and renamed into place once every rank has
    written its shards, so `last` and the k newest checkpoints are always whole.
    """

    def __init__(
        self,
        stage: int = 2,
        overlap_comm: bool = True,
        contiguous_gradients: bool = True,
        reduce_bucket_size: int = 500_000_000,
        allgather_bucket_size: int = 500_000_000,
        prefetch_bucket_size: int = 50_000_000,
        param_persistence_threshold: int = 100_000,
        offload_optimizer: bool = False,
        offload_parameters: bool = False,
        reshard_on_resume: bool = False,
        logging_level: int = logging.WARN,
    ) -> None:
        """Args as in zero_config, and `reshard_on_resume`: a ZeRO folder written by another number of ranks is
        converted once to DeepSpeed's universal checkpoint beside it (`<step>-universal.ckpt`, about 3x the fp32
        model on disk; reused if there) and resumed from that, instead of being refused."""
        config = zero_config(stage, overlap_comm, contiguous_gradients, reduce_bucket_size, allgather_bucket_size,
                             prefetch_bucket_size, param_persistence_threshold, offload_optimizer,
                             offload_parameters)
        super().__init__(config=config, logging_level=logging_level)
        self.reshard_on_resume = reshard_on_resume

    def _auto_select_batch_size(self) -> int:
        # Lightning reads batch_sampler.batch_size, which an iterable DataLoader (ours) does not have.
        datamodule = self.lightning_module.trainer.datamodule
        micro_batch_size = getattr(datamodule, "micro_batch_size", None)
        return micro_batch_size if micro_batch_size is not None else super()._auto_select_batch_size()

    def save_checkpoint(self, checkpoint: dict, filepath: Any, storage_options: Optional[Any] = None) -> None:
        final = Path(self.broadcast(str(filepath)))
        staging = final.with_name(f".tmp.{final.name}")
        if self.is_global_zero and staging.exists():
            shutil.rmtree(staging)  # left by an earlier kill
        self.barrier("zero_save_start")
        super().save_checkpoint(checkpoint, staging, storage_options)
        self.barrier("zero_save_written")
        if self.is_global_zero:
            replace_folder(staging, final)
        self.barrier("zero_save_done")

    def load_checkpoint(self, checkpoint_path: Any, weights_only: Optional[bool] = None) -> dict[str, Any]:
        path = Path(checkpoint_path)
        previous = path.with_name(f".old.{path.name}")
        if not path.exists() and previous.exists():  # killed between the two renames of replace_folder
            checkpoint_path = previous
        folder = Path(checkpoint_path)
        check_stage(folder, self.config["zero_optimization"]["stage"])
        if self.reshard_on_resume and zero_world_size(folder) not in (None, self.world_size):
            folder = checkpoint_path = self._universal_copy(folder)
        universal = is_universal(folder)
        if not universal:
            check_world_size(folder, self.world_size)
        self._verify(folder)
        with deepspeed_loads_universal(self.deepspeed_engine, universal):
            # weights_only reaches torch only on Lightning's single-file path (load_full_weights); DeepSpeed's engine
            # unpickles the folder itself, which is why _verify ran first.
            checkpoint = super().load_checkpoint(checkpoint_path, weights_only=True)
        if universal:
            place_adam_steps(getattr(self.deepspeed_engine.optimizer, "optimizer", None))
        return checkpoint

    def _verify(self, folder: Path) -> None:
        """Every file DeepSpeed's engine will unpickle (with weights_only=False) is first loaded weights_only, the
        files split over the ranks; a refusal on any rank stops every rank before DeepSpeed reads anything."""
        error = None
        try:
            verify_deepspeed_folder(folder, self.global_rank, self.world_size)
        except CheckpointError as exc:
            error = exc
        if not self.reduce_boolean_decision(error is None, all=True):
            raise error or CheckpointError(f"{folder}: another rank refused a file of this checkpoint (its error "
                                           "names it); nothing was loaded")

    def _universal_copy(self, folder: Path) -> Path:
        """Rank 0 converts `folder` to a universal checkpoint beside it (or finds the one made before), the other
        ranks wait; a failure is raised on every rank, not left as a hang at the barrier."""
        folder = folder.resolve()  # `last.ckpt` is a link: name the copy after the step it points to
        target = universal_path(folder)
        error = None
        if self.is_global_zero and is_universal(target) and _older(target / UNIVERSAL_LATEST, folder / "latest"):
            shutil.rmtree(target)  # made from an earlier save of this step (saved again after a rollback)
        if self.is_global_zero and not is_universal(target):
            rank_zero_warn(f"ZeroStrategy: {folder} was written by {zero_world_size(folder)} ranks, this run has "
                           f"{self.world_size}: converting it to a universal checkpoint, {target}")
            try:
                # One process: a pool forked from a process that holds a CUDA context must not touch CUDA.
                convert_to_universal(str(folder), str(target), workers=1)
            except Exception as exc:  # every rank must hear of it
                error = f"{type(exc).__name__}: {exc}"
        error = self.broadcast(error)
        if error is not None:
            raise RuntimeError(f"ZeroStrategy(reshard_on_resume=True): converting {folder} failed: {error}")
        return target


def place_adam_steps(optimizer: Optional[torch.optim.Optimizer]) -> None:
    """DeepSpeed's universal loader puts each group's `step` back as it was saved, on the CPU; torch's fused and
    capturable AdamW keep it as an fp32 tensor on the parameter's device and refuse it elsewhere (measured on an
    H200: "state_steps is on cpu, different from other tensors on cuda:0" at the first step after resuming)."""
    if optimizer is None:
        return
    for group in optimizer.param_groups:
        if not (group.get("fused") or group.get("capturable")):
            continue
        for param in group["params"]:
            step = optimizer.state.get(param, {}).get("step")
            if torch.is_tensor(step) and step.device != param.device:
                optimizer.state[param]["step"] = step.to(device=param.device, dtype=torch.float32)


def _older(a: Path, b: Path) -> bool:
    return a.stat().st_mtime_ns < b.stat().st_mtime_ns
