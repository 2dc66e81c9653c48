"""What is written into a checkpoint, and how: never non-finite weights; files made whole before they get their name.

Every save of a fit (periodic, preemption, end of fit) goes through Lightning's `trainer.save_checkpoint`, which
calls LanguageModel.on_save_checkpoint (the finiteness check, before anything is written) and then the strategy's
CheckpointIO (AtomicCheckpointIO for single files; ZeroStrategy writes a staging folder on every rank and rank 0
moves it into place with replace_folder).
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from fsspec.utils import get_protocol
from lightning.fabric.plugins import TorchCheckpointIO
from torch import nn
from torch.nn.utils import get_total_norm

from llmtrain.files import fsync_folder, write_atomically


class NonFiniteWeights(RuntimeError):
    """A save was refused: the weights hold NaN/inf; the checkpoints already written are untouched."""


def refuse_nonfinite_weights(trainer: "pl.Trainer", model: nn.Module) -> None:
    """Raises NonFiniteWeights, on every rank, when any rank's weights hold a NaN or inf.

    Called at every save, before anything is written: a NaN checkpoint saved as `last` would be what a resume, a
    rollback and an export all pick, and rotation would then delete the good ones. Under ZeRO-3 a rank holds its
    partition (`ds_tensor`) of each parameter; the decision is all-reduced so that no rank writes alone.
    """
    tensors = [getattr(p, "ds_tensor", p).detach() for p in model.parameters()]
    tensors = [t for t in tensors if t.numel()]  # the max-abs norm of an empty tensor is undefined
    # One foreach reduction per device and dtype: the largest |w| is finite iff every weight is (NaN propagates,
    # and unlike a 2-norm it cannot overflow), with no mask the size of the model.
    finite = bool(torch.isfinite(get_total_norm(tensors, norm_type=math.inf))) if tensors else True
    if not trainer.strategy.reduce_boolean_decision(finite, all=True):
        bad = [name for name, p in model.named_parameters()
               if not torch.isfinite(getattr(p, "ds_tensor", p).detach()).all()][:5]
        where = f" (this rank: {', '.join(bad)})" if bad else " (on another rank)"
        raise NonFiniteWeights(
            f"not saving a checkpoint at step {trainer.global_step}: the weights hold NaN/inf{where}. The newest "
            "checkpoint already written is the last finite one and was kept. Add SpikeDetector to the callbacks "
            "(it skips non-finite steps), lower the learning rate, and resume with --ckpt_path last.")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint file under a temporary name beside its target, fsyncs it, renames it into place and fsyncs
    the folder: a kill at any instant leaves the old file or the new one, whole, and nothing elsewhere.

    Lightning's own writer stages the file through fsspec in $TMPDIR; with TMPDIR on another filesystem (node-local
    /tmp, shared checkpoint storage) its final move is a copy, which a kill leaves truncated under the real name,
    with an orphan in $TMPDIR.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        if get_protocol(str(path)) != "file":  # s3://, gs://, ...: an object store's put is already all-or-nothing
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        if storage_options is not None:
            raise TypeError(f"AtomicCheckpointIO takes no storage_options for a local path (got {storage_options!r})")
        write_atomically(Path(str(path).removeprefix("file://")), lambda f: torch.save(checkpoint, f))

    def load_checkpoint(self, path: Any, map_location: Optional[Any] = None,
                        weights_only: Optional[bool] = None) -> dict[str, Any]:
        # Our checkpoints hold tensors and plain data only: unpickle nothing else, whatever the caller left unset.
        return super().load_checkpoint(path, map_location=map_location, weights_only=True)


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
    fsync_folder(final.parent)
    if previous.exists():
        shutil.rmtree(previous)
