"""DeepSpeed ZeRO from config: a unit-tested config builder and a strategy whose folder checkpoints are atomic.

DDP needs nothing of ours: `trainer.strategy: ddp` (gloo on CPU, NCCL on GPU). ZeRO is
`trainer.strategy: {class_path: llmtrain.training.strategy.ZeroStrategy, init_args: {stage: 2}}`
(configs/deepspeed/zero{1,2,3}.yaml). Lightning adds bf16, micro-batch size, gradient accumulation and
gradient clipping to the DeepSpeed config from the Trainer's own arguments.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any, Optional

from lightning.pytorch.strategies import DeepSpeedStrategy

from llmtrain.checkpoint import zero_world_size

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
        logging_level: int = logging.WARN,
    ) -> None:
        config = zero_config(stage, overlap_comm, contiguous_gradients, reduce_bucket_size, allgather_bucket_size,
                             prefetch_bucket_size, param_persistence_threshold, offload_optimizer,
                             offload_parameters)
        super().__init__(config=config, logging_level=logging_level)

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
        check_world_size(Path(checkpoint_path), self.world_size)
        return super().load_checkpoint(checkpoint_path, weights_only)


def check_world_size(folder: Path, world_size: int) -> None:
    """Refuses, before DeepSpeed loads anything, a ZeRO checkpoint written by another number of ranks: its
    optimizer state is partitioned per rank, and DeepSpeed cannot re-partition it (it raises only after loading
    the model states; ZeRO-3 fails on missing shard files). A DDP checkpoint holds whole tensors and resumes on
    any world size."""
    saved = zero_world_size(folder)
    if saved is not None and saved != world_size:
        raise ValueError(
            f"{folder}: this ZeRO checkpoint was written by {saved} ranks, this run has {world_size}. ZeRO "
            f"partitions the optimizer state per rank and cannot resume on another world size: resume with "
            f"trainer.devices x trainer.num_nodes = {saved}. `llmtrain convert {folder} model.ckpt` gives its fp32 "
            "weights in one file (without optimizer state), which validate, test and generate read on any world "
            "size; DeepSpeed's universal checkpoint "
            "(deepspeed.checkpoint.ds_to_universal) re-partitions optimizer state, which llmtrain does not load yet.")


def replace_folder(staging: Path, final: Path) -> None:
    """Moves `staging` to `final`; at every instant one whole version exists under `final` or `.old.<final>`."""
    previous = final.with_name(f".old.{final.name}")
    if previous.exists():
        shutil.rmtree(previous)
    if final.is_symlink():
        final.unlink()
    elif final.exists():
        os.replace(final, previous)
    os.replace(staging, final)
    if previous.exists():
        shutil.rmtree(previous)
