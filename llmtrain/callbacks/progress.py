"""StepProgress: progress in optimizer steps out of max_steps, with loss and tokens/s; plain lines when not a TTY.

Lightning's bar counts batches of an epoch, which means nothing for a step-bounded pretraining run on an
iterable dataset ("Epoch 0/-2", "650/49"), and a tqdm bar written to a file shows nothing until the end.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Optional

import lightning.pytorch as pl
from lightning.pytorch.callbacks import TQDMProgressBar


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def _rate(tokens_per_sec: float) -> str:
    return f"{tokens_per_sec / 1e3:.1f}k" if tokens_per_sec < 1e6 else f"{tokens_per_sec / 1e6:.2f}M"


class StepProgress(TQDMProgressBar):
    """A bar over optimizer steps (on a terminal), or one line every `every_n_steps` steps and after each
    validation (anywhere else: a log file, a SLURM job), flushed at once.

    Reads only host values, so it adds no device synchronization: the module's `tokens_seen` counter, and the loss
    of its logging steps once their values are on the host (LanguageModel.step_log, a step or two later). A line
    is for a logging step and shows that step's loss.
    """

    def __init__(self, every_n_steps: Optional[int] = None, refresh_rate: int = 1, process_position: int = 0,
                 leave: bool = False, terminal: Optional[bool] = None) -> None:
        """
        Args:
            every_n_steps: steps between two lines when not on a terminal: a line for the first logging step at or
                after each multiple; None = trainer.log_every_n_steps (a line for every logging step).
            refresh_rate: steps between two redraws of the terminal bar.
            terminal: draw a bar (True) or print lines (False); None = a bar when stdout is a terminal.
        """
        super().__init__(refresh_rate=refresh_rate, process_position=process_position, leave=leave)
        if every_n_steps is not None and every_n_steps <= 0:
            raise ValueError(f"StepProgress: every_n_steps={every_n_steps!r} is invalid: must be a positive integer")
        self.every_n_steps = every_n_steps
        self.terminal = terminal
        self._last_step = -1
        self._shown_step = -1  # the newest logged step shown (the bar's postfix, or a line)
        self._next_line = 0  # lines are for logged steps from this one on
        self._start: tuple[float, int, int] = (0.0, 0, 0)  # (time, step, tokens) when training (re)started
        self._mark: tuple[float, int] = (0.0, 0)  # (time, tokens) at the last rate measurement
        self._tokens_per_sec: Optional[float] = None

    # -- mode -------------------------------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.terminal is None:
            self.terminal = sys.stdout.isatty()
        if not self.terminal:
            self.disable()  # every tqdm bar of the base class becomes a dummy; lines come from the hooks below

    def _lines(self, trainer: pl.Trainer) -> bool:
        return not self.terminal and trainer.is_global_zero

    # -- training -----------------------------------------------------------------------------------------------
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        tokens = int(getattr(pl_module, "tokens_seen", 0))
        now = time.monotonic()
        self._start, self._mark = (now, trainer.global_step, tokens), (now, tokens)
        self._last_step = self._shown_step = trainer.global_step
        self._next_line = self._line_after(trainer, trainer.global_step)
        total = trainer.max_steps if trainer.max_steps > 0 else None
        self.train_progress_bar = self.init_train_tqdm()  # a dummy when disabled: the base class closes it at the end
        if self.terminal:
            self.train_progress_bar.reset(total=total)
            self.train_progress_bar.initial = trainer.global_step
            self.train_progress_bar.n = trainer.global_step
            self.train_progress_bar.set_description("step")
        elif self._lines(trainer):
            resumed = f", resuming at step {trainer.global_step}" if trainer.global_step else ""
            print(f"training to step {total or '(no max_steps)'}{resumed}", flush=True)

    def on_train_epoch_start(self, trainer: pl.Trainer, *_: Any) -> None:
        """One bar for the whole run: an epoch of an iterable dataset is no unit of progress here."""

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if step == self._last_step:  # a micro-batch of gradient accumulation: no optimizer step yet
            return
        if step < self._last_step:  # SpikeDetector rolled back to a checkpoint: count from there
            self._shown_step, self._next_line = step - 1, self._line_after(trainer, step - 1)
        self._last_step = step
        logged = self._new_logged(pl_module)
        if self.terminal:
            if step % self.refresh_rate == 0:
                self.train_progress_bar.n = step
                if logged is not None:
                    self._shown_step = logged[0]
                    self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
                self.train_progress_bar.refresh()
        elif self._lines(trainer):
            if not self._logged_line(trainer, pl_module) and not trainer.log_every_n_steps \
                    and step % (self.every_n_steps or 1) == 0:  # no logging: lines without a loss
                self._print_line(trainer, pl_module, step)

    def _logged_line(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
        """Prints the line of a newly logged step if one is due."""
        logged = self._new_logged(pl_module)
        if logged is None or logged[0] < self._next_line:
            return False
        self._print_line(trainer, pl_module, logged[0])
        self._next_line = self._line_after(trainer, logged[0])
        return True

    def _line_after(self, trainer: pl.Trainer, step: int) -> int:
        """The multiple of every_n_steps after `step`: the next line is for the first logged step from there."""
        every = self.every_n_steps or trainer.log_every_n_steps or 1
        return (step // every + 1) * every

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The last step, with its loss where it was logged (the module writes a last logging step at once)."""
        step = trainer.global_step
        if self.terminal:
            self.train_progress_bar.n = step
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
            self.train_progress_bar.refresh()
        elif self._lines(trainer) and self._shown_step < step:
            self._print_line(trainer, pl_module, step)
        super().on_train_end(trainer, pl_module)

    @staticmethod
    def _logged(pl_module: pl.LightningModule) -> Optional[tuple[int, dict[str, float]]]:
        step_log = getattr(pl_module, "step_log", None)
        return getattr(step_log, "last", None)

    def _new_logged(self, pl_module: pl.LightningModule) -> Optional[tuple[int, dict[str, float]]]:
        logged = self._logged(pl_module)
        return logged if logged is not None and logged[0] > self._shown_step else None

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The bar outlives epochs (see on_train_epoch_start); on_train_end closes it."""

    def _measure(self, pl_module: pl.LightningModule) -> Optional[float]:
        """tokens/s since the previous measurement, from the module's host-side token counter."""
        tokens = getattr(pl_module, "tokens_seen", None)
        if tokens is None:
            return None
        now = time.monotonic()
        then, tokens_then = self._mark
        if now > then and tokens > tokens_then:
            self._tokens_per_sec = (tokens - tokens_then) / (now - then)
            self._mark = (now, tokens)
        return self._tokens_per_sec

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        metrics = {k: v for k, v in super().get_metrics(trainer, pl_module).items() if k != "v_num"}
        logged = self._logged(pl_module)
        if logged is not None and "train/loss" in logged[1]:
            metrics["loss"] = f"{logged[1]['train/loss']:.4f}"
        rate = self._measure(pl_module)
        if rate is not None:
            metrics["tok/s"] = _rate(rate)
        return metrics

    def _print_line(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        """A line for `step`: its loss if it was logged, tokens/s since the last line, time elapsed and left."""
        self._shown_step = step
        total = trainer.max_steps
        parts = [f"step {step}/{total} ({100 * step / total:.0f}%)" if total > 0 else f"step {step}"]
        logged = self._logged(pl_module)
        if logged is not None and logged[0] == step and "train/loss" in logged[1]:
            parts.append(f"loss {logged[1]['train/loss']:.4f}")
        rate = self._measure(pl_module)
        if rate is not None:
            parts.append(f"{_rate(rate)} tok/s")
        start_time, start_step, _ = self._start
        elapsed = time.monotonic() - start_time
        timing = f"{_duration(elapsed)} elapsed"
        if total > 0 and step > start_step:
            timing += f", ~{_duration(elapsed / (step - start_step) * (total - step))} left"
        parts.append(timing)
        print(" | ".join(parts), flush=True)

    # -- validation -------------------------------------------------------------------------------------------------
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        # Inside a fit only: `llmtrain validate` prints Lightning's table of the same values.
        if self._lines(trainer) and not trainer.sanity_checking and trainer.state.fn == "fit":
            self._logged_line(trainer, pl_module)  # the step's own line first (the module wrote it at this start)
            values = {k: v for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
            shown = " | ".join(f"{k} {float(v):.4f}" for k, v in sorted(values.items()))
            print(f"step {trainer.global_step} validation: {shown or 'no metrics'}", flush=True)
