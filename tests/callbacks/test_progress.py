"""StepProgress's lines: one for each logging step due, with that step's own loss (written by the module a step or
two after the step), and the last step's at the end."""

from __future__ import annotations

import re

import pytest

from llmtrain.callbacks import StepProgress
from llmtrain.training.module import LanguageModel
from llmtrain.training.optim import OptimConfig
from tests.callbacks import fit, random_batches, tiny_config


def test_a_line_for_the_first_logging_step_from_each_multiple_with_that_steps_loss(capsys) -> None:
    module = LanguageModel(tiny_config(), OptimConfig(lr=1e-2, warmup_steps=1, total_steps=9))
    _, logger = fit(module, random_batches(9), [StepProgress(every_n_steps=3, terminal=False)], max_steps=9,
                    log_every_n_steps=2, enable_progress_bar=True)
    lines = re.findall(r"^step (\d+)/9 \(\d+%\) \| (.*)$", capsys.readouterr().out, flags=re.M)
    # Logging steps 2, 4, 6, 8; multiples of 3: a line for 4 (the first from 3) and 6; the last step, 9, at the end.
    assert [step for step, _ in lines] == ["4", "6", "9"]
    losses = logger.scalars["train/loss"]  # on Lightning's axis: optimizer step - 1
    for step, rest in lines[:2]:
        assert rest.startswith("loss ") and float(rest.split()[1]) == pytest.approx(losses[int(step) - 1], abs=1e-4)
    assert not lines[2][1].startswith("loss ")  # step 9 is no logging step: no loss of its own to show
