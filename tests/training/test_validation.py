"""LanguageModel's validation metrics: val/ppl is exp of the mean val loss (not the mean of per-batch exp(loss)),
checked against a hand computation on batches whose losses differ widely."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F

from llmtrain.training.module import LanguageModel
from tests.callbacks import CaptureLogger, random_batches, tiny_config


def test_val_ppl_is_exp_of_the_mean_val_loss_weighted_by_batch_size():
    torch.manual_seed(0)
    module = LanguageModel(tiny_config())
    module.configure_model()
    with torch.no_grad():
        module.model.lm_head.weight.mul_(20.0)  # confident logits: per-batch losses far apart
    easy, hard, small = random_batches(2, batch_size=4, seed=1) + random_batches(1, batch_size=2, seed=2)
    with torch.no_grad():
        easy["labels"] = module(easy["input_ids"]).argmax(-1)  # the model's own guesses: a low loss
    batches = [easy, hard, small]

    logger = CaptureLogger()
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=logger, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.validate(module, torch.utils.data.DataLoader(batches, batch_size=None))
    logged = {tag: values for _, row in logger.rows for tag, values in row.items()}

    with torch.no_grad():  # by hand: each batch's mean token loss, then the mean over sequences
        losses = [F.cross_entropy(module(b["input_ids"]).flatten(0, 1), b["labels"].flatten()).item()
                  for b in batches]
    sizes = [b["input_ids"].shape[0] for b in batches]
    mean_loss = sum(l * n for l, n in zip(losses, sizes)) / sum(sizes)
    biased = sum(math.exp(l) * n for l, n in zip(losses, sizes)) / sum(sizes)  # what val/ppl used to be
    assert max(losses) - min(losses) > 1.0, losses  # the test needs batches that differ
    assert logged["val/loss"] == pytest.approx(mean_loss, rel=1e-5)
    assert logged["val/ppl"] == pytest.approx(math.exp(mean_loss), rel=1e-5)
    assert logged["val/ppl"] == pytest.approx(math.exp(logged["val/loss"]), rel=1e-6)
    assert biased > 1.5 * logged["val/ppl"]
    assert module._val_loss_sums is None  # reset for the next validation
