"""Checkpoint faults: foreign code in a checkpoint folder never runs; (more cases below)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llmtrain.checkpointing.convert import convert_checkpoint, convert_to_universal
from llmtrain.checkpointing.hf import export_hf
from llmtrain.checkpointing.readers import CheckpointError
from llmtrain.training.strategy import ZeroStrategy


class Payload:
    """Unpickling this creates `marker`: what a planted checkpoint would do instead of touching a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def zero_strategy() -> ZeroStrategy:
    """ZeroStrategy as the Trainer sets it up on one process, for its load path (no engine is built)."""
    strategy = ZeroStrategy(stage=2)
    strategy.parallel_devices = [torch.device("cpu")]
    return strategy


def plant(folder: Path, tag: str, marker: Path) -> Path:
    """A ZeRO-shaped folder whose `latest` names `tag`: benign tensors under `tag` (what a check of that path reads)
    and, where DeepSpeed would look when handed the tag's last part, files that run Payload when unpickled."""
    benign, armed = folder / tag, folder / Path(tag).name
    for where, value in ((benign, torch.zeros(1)), (armed, Payload(marker))):
        where.mkdir(parents=True, exist_ok=True)
        torch.save({"module": value}, where / "mp_rank_00_model_states.pt")
        torch.save({"state": value}, where / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    (folder / "latest").write_text(tag)
    return folder


@pytest.mark.parametrize("tag", ["decoy/checkpoint", "../checkpoint", "/abs/checkpoint", ".", ""])
@pytest.mark.parametrize("action", ["convert", "export", "universal", "resume"])
def test_a_latest_that_is_not_a_plain_folder_name_is_refused_before_anything_is_unpickled(
        tmp_path: Path, tag: str, action: str) -> None:
    marker = tmp_path / "payload-ran"
    folder = plant(tmp_path / "run" / "step0000002.ckpt", tag, marker) if tag not in ("", ".") else None
    if folder is None:  # nothing to plant at an empty or "." tag: the armed files sit in the folder itself
        folder = plant(tmp_path / "run" / "step0000002.ckpt", "checkpoint", marker)
        (folder / "latest").write_text(tag)
    run = {"convert": lambda: convert_checkpoint(str(folder), str(tmp_path / "out.ckpt")),
           "export": lambda: export_hf(str(folder), str(tmp_path / "hf")),
           "universal": lambda: convert_to_universal(str(folder), str(tmp_path / "universal.ckpt")),
           # `llmtrain fit --ckpt_path FOLDER` under ZeRO: the strategy's load, before DeepSpeed's engine is touched.
           "resume": lambda: zero_strategy().load_checkpoint(str(folder))}[action]
    with pytest.raises(CheckpointError, match="not a plain folder name|is no folder|is a link"):
        run()
    assert not marker.exists(), "the planted payload ran"


def test_a_tag_folder_that_links_out_of_the_checkpoint_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "payload-ran"
    elsewhere = plant(tmp_path / "elsewhere", "checkpoint", marker) / "checkpoint"
    folder = tmp_path / "run.ckpt"
    folder.mkdir()
    (folder / "checkpoint").symlink_to(elsewhere, target_is_directory=True)
    (folder / "latest").write_text("checkpoint")
    with pytest.raises(CheckpointError, match="is a link"):
        convert_checkpoint(str(folder), str(tmp_path / "out.ckpt"))
    assert not marker.exists()


def test_a_payload_anywhere_in_the_tag_folder_stops_a_resume_before_deepspeed_reads_it(tmp_path: Path) -> None:
    marker = tmp_path / "payload-ran"
    folder = plant(tmp_path / "run.ckpt", "checkpoint", marker)
    for file in (folder / "checkpoint").glob("*.pt"):  # make the expected files benign ...
        torch.save({"module": torch.zeros(1)}, file)
    torch.save({"x": Payload(marker)}, folder / "checkpoint" / "extra_states.pt")  # ... and plant one more
    with pytest.raises(CheckpointError, match="extra_states.pt: refused"):
        zero_strategy().load_checkpoint(str(folder))
    assert not marker.exists()
