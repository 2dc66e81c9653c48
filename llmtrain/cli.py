"""The `llmtrain` console script: Lightning's fit/validate/test on LightningCLI, plus the tool commands.

Errors of the user's making (a bad config value, a missing data folder, a checkpoint that does not fit) end in one
`error: ...` line and exit code 1 (2 for a bad command line); LLMTRAIN_DEBUG=1 shows their traceback as well.
"""

from __future__ import annotations

import difflib
import importlib
import os
import re
import shutil
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, NoReturn, Optional

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.strategies import DeepSpeedStrategy

from llmtrain.checkpointing.resume import newest_checkpoint, refuse_checkpoint_of_another_strategy
from llmtrain.compat import parser_options
from llmtrain.config_files import expand_config_arguments

DEBUG_VARIABLE = "LLMTRAIN_DEBUG"

# Tool commands: name -> (module, function taking argv[1:] and returning an exit code). Imported lazily so
# that `llmtrain fit` does not pay for them.
TOOL_COMMANDS: dict[str, tuple[str, str]] = {
    "tokenizer": ("llmtrain.data.commands", "tokenizer_main"),
    "prepare": ("llmtrain.data.commands", "prepare_main"),
    "verify": ("llmtrain.data.commands", "verify_main"),
    "generate": ("llmtrain.generate", "main"),
    "report": ("llmtrain.report", "report_main"),
    "sweep": ("llmtrain.sweep", "sweep_main"),
    "submit": ("llmtrain.launch", "submit_main"),
    "convert": ("llmtrain.checkpointing.convert", "convert_main"),
    "export": ("llmtrain.checkpointing.hf", "export_main"),
    "import": ("llmtrain.checkpointing.hf_import", "import_main"),
}
LIGHTNING_COMMANDS = ("fit", "validate", "test")
# One line per command for `llmtrain --help` (tests/test_cli.py checks that every command has one).
PURPOSES: dict[str, str] = {
    "fit": "train a model from a config, or resume a run (--ckpt_path last)",
    "validate": "validation loss of a checkpoint (--ckpt_path) on the data's validation split",
    "test": "the same on the test split",
    "tokenizer": "train a sentencepiece BPE tokenizer on a corpus (llmtrain tokenizer train ...)",
    "prepare": "tokenize a corpus into the token shards that fit reads",
    "verify": "check every shard of a prepared folder against the sha256 that prepare recorded",
    "generate": "sample text from a checkpoint",
    "report": "PNG curves and a summary table from runs' TensorBoard logs (and sweep verdicts)",
    "sweep": "expand an ablation spec into runs and run them, locally or as a SLURM array",
    "submit": "submit a fit to SLURM for N nodes x G GPUs (requeued and resumed on preemption)",
    "convert": "a ZeRO folder or DDP checkpoint -> one fp32 file, or a universal checkpoint",
    "export": "a checkpoint -> a Hugging Face folder (Llama, or Qwen3 with qk_norm; safetensors + tokenizer)",
    "import": "a local Hugging Face Llama or Qwen3 folder -> an llmtrain weights file to continue pretraining",
}
# The subcommand parser's usage line: jsonargparse's own lists all ~300 options before the help even starts.
FIT_USAGE = "llmtrain {command} [--config FILE ...] [--SECTION.FIELD VALUE ...] [--print_config]"


class UsageError(Exception):
    """A command line the parser refused; main() prints it as one line with a suggestion."""


class LLMTrainParser(LightningArgumentParser):
    """Raises UsageError instead of printing the whole usage (hundreds of lines) above the one line that matters."""

    def error(self, message: str, ex: Optional[Exception] = None) -> NoReturn:
        if not self.exit_on_error:  # jsonargparse catches these itself (e.g. trying each type of a Union)
            super().error(message, ex)
        raise UsageError(_usage_message(message, getattr(ex, "subcommand_parser", None) or self)) from ex


def _usage_message(message: str, parser: LightningArgumentParser) -> str:
    """jsonargparse's message in one line; a did-you-mean for an unknown option, the choices for a bad one."""
    literal = re.search(r"Expected a typing\.Literal\[(.*?)\]\. Got value: ([^\n]*)", message)
    if literal:
        choices, value = literal.groups()
        # Nested groups name their part of the key each ('Parser key "model.optim": ... Parser key "schedule"').
        key = ".".join(re.findall(r'Parser key "([^"]+)"', message[:literal.start()]))
        names = re.findall(r"'([^']*)'", choices)
        return f"{key}={value.strip()!r} is invalid: choose one of {', '.join(names)}"
    unknown = re.match(r"unrecognized arguments: (.*)", message, re.S)
    if unknown:
        options = parser_options(parser)
        hints = []
        for given in unknown.group(1).split():
            if given.startswith("--"):
                close = difflib.get_close_matches(given.split("=")[0], options, n=1, cutoff=0.75)
                if close:
                    hints.append(f"did you mean {close[0]}?")
        return " ".join([f"unrecognized arguments: {unknown.group(1)}", *hints])
    return " ".join(message.split())


class _TrainingWatch(Callback):
    """Notes whether the fit loop started at all: Lightning skips it silently when a resumed run is finished."""

    started = False

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.started = True


class LLMTrainCLI(LightningCLI):
    """LightningCLI for LanguageModel + TokenDataModule, with the run config stored in every checkpoint."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """fit, validate, test: LanguageModel has no predict_step, so `predict` is not offered."""
        return {name: skip for name, skip in LightningCLI.subcommands().items() if name in LIGHTNING_COMMANDS}

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """LightningCLI's parsing, with every `--config` file that has a `base` handed over resolved
        (llmtrain.config_files). sys.argv stays as the user typed it: the resume command that a preemption prints
        names the user's config files, not the temporary resolved ones."""
        if isinstance(args, dict) or (args is not None and not isinstance(args, list)):
            super().parse_arguments(parser, args)
            return
        self.config = parser.parse_args(expand_config_arguments(sys.argv[1:] if args is None else args))

    def before_instantiate_classes(self) -> None:
        """A GPU config on a machine without one fails here, in one line, not deep inside the Trainer."""
        accelerator = self.config.get(str(self.subcommand), self.config).get("trainer", {}).get("accelerator")
        if accelerator in ("gpu", "cuda") and not _has_cuda():
            from llmtrain.model.config import ConfigError

            raise ConfigError(f"trainer.accelerator={accelerator!r} needs a CUDA GPU, and this machine has none: "
                              "on CPU use configs/quickstart.yaml, or add --trainer.accelerator cpu "
                              "--trainer.precision 32-true --trainer.devices 1")

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """Progress in optimizer steps (StepProgress) unless the config turns the bar off or brings its own."""
        from llmtrain.callbacks.progress import StepProgress

        trainer_config = self.config_init.get(str(self.subcommand), self.config_init).get("trainer", {})
        configured = trainer_config.get("callbacks") or []
        if trainer_config.get("enable_progress_bar") is not False and not any(
                isinstance(c, ProgressBar) for c in configured):
            kwargs["callbacks"] = [*configured, StepProgress()]
        return super().instantiate_trainer(**kwargs)

    def fit(self, model: LightningModule, **kwargs: Any) -> None:
        """trainer.fit, removing the run folder a failed start created, and saying when a resume had nothing to do."""
        run_dir = Path(self.trainer.log_dir) if self.trainer.log_dir else None
        created = _first_missing(run_dir) if run_dir is not None else None
        watch = _TrainingWatch()
        self.trainer.callbacks.append(watch)
        try:
            self.trainer.fit(model, **kwargs)
        except Exception:
            if created is not None and self.trainer.global_step == 0 and self.trainer.is_global_zero:
                _remove_empty_run(run_dir, created)
            raise
        if kwargs.get("ckpt_path") and not watch.started and self.trainer.is_global_zero:
            self._say_the_run_is_finished(kwargs["ckpt_path"])

    def _say_the_run_is_finished(self, ckpt_path: str) -> None:
        trainer = self.trainer
        if not 0 < trainer.max_steps <= trainer.global_step:
            return
        schedules = [getattr(c.scheduler, "lr_lambdas", [None])[0] for c in trainer.lr_scheduler_configs]
        length = getattr(schedules[0], "total_steps", None) if schedules else None
        keep = (f"; the LR schedule keeps its length of {length} steps (at its floor past it) unless "
                "--model.optim.total_steps sets another" if length else "")
        print(f"llmtrain: nothing to train: {ckpt_path} is at step {trainer.global_step} and trainer.max_steps is "
              f"{trainer.max_steps}. To train further, raise it, e.g. --trainer.max_steps {2 * trainer.max_steps}"
              f"{keep}.", file=sys.stderr)

    def before_fit(self) -> None:
        fit_args = self.config_init[self.subcommand]
        if fit_args.get("ckpt_path") == "last":
            fit_args["ckpt_path"] = self._newest_checkpoint()
        elif fit_args.get("ckpt_path") is None:
            self._refuse_overwriting_a_run()
        if fit_args.get("ckpt_path") is not None:
            self._refuse_a_checkpoint_of_another_strategy(Path(fit_args["ckpt_path"]))
        # Our checkpoints hold only tensors and plain data: never unpickle anything else, whatever torch's default.
        fit_args["weights_only"] = True
        # The resolved YAML travels inside every checkpoint (config.yaml beside the logs is written by Lightning).
        self.model.run_config = self._parser(self.subcommand).dump(self.config[self.subcommand], skip_none=False)

    def _checkpoint_dirs(self) -> list[Path]:
        """Where the checkpoint callbacks will write (Lightning resolves a missing dirpath to log_dir/checkpoints)."""
        return [Path(cb.dirpath or Path(self.trainer.log_dir or ".") / "checkpoints")
                for cb in self.trainer.checkpoint_callbacks]

    def _newest_checkpoint(self) -> Optional[str]:
        newest = newest_checkpoint(self._checkpoint_dirs())
        if newest is None:
            print(f"--ckpt_path last: no checkpoint under {', '.join(map(str, self._checkpoint_dirs()))}; "
                  "starting a fresh run", file=sys.stderr)
        return None if newest is None else str(newest)

    def _refuse_a_checkpoint_of_another_strategy(self, path: Path) -> None:
        refuse_checkpoint_of_another_strategy(path, isinstance(self.trainer.strategy, DeepSpeedStrategy),
                                              type(self.trainer.strategy).__name__)

    def _refuse_overwriting_a_run(self) -> None:
        """A fresh run into a folder that holds checkpoints would mix two runs: ask for resume or a new name."""
        for folder in self._checkpoint_dirs():
            if folder.is_dir() and any(folder.glob("*.ckpt")):
                raise SystemExit(
                    f"error: {folder} already holds checkpoints of an earlier run. Resume it with "
                    "`--ckpt_path last`, or start a new run under another name "
                    "(--trainer.logger.init_args.name NAME).")


def run_lightning(args: Optional[list[str]] = None) -> LLMTrainCLI:
    # Imported here: the data and model packages pull torch, which the tool commands may not need.
    from llmtrain.data.datamodule import TokenDataModule
    from llmtrain.training.module import LanguageModel

    return LLMTrainCLI(
        LanguageModel,
        TokenDataModule,
        seed_everything_default=1234,
        save_config_kwargs={"overwrite": True},
        parser_class=LLMTrainParser,
        parser_kwargs={command: {"usage": FIT_USAGE.format(command=command), "description": PURPOSES[command]}
                       for command in LIGHTNING_COMMANDS},
        # LanguageModel builds its own AdamW and schedule (model.optim): no --optimizer/--lr_scheduler to ignore.
        auto_configure_optimizers=False,
        args=args,
    )


# What a fit writes before its first step: the resolved config and TensorBoard's (still empty) event file.
_SETUP_FILES = ("config.yaml", "hparams.yaml", "events.out.tfevents.*")


def _remove_empty_run(run_dir: Path, created: Path) -> None:
    """Removes a run folder that holds only what setup wrote, then the empty folders above it up to `created`
    (only emptied ones: a sweep may be starting another run beside it)."""
    files = [f for f in run_dir.rglob("*") if f.is_file()] if run_dir.is_dir() else []
    if any(not any(f.match(pattern) for pattern in _SETUP_FILES) for f in files):
        return
    shutil.rmtree(run_dir, ignore_errors=True)
    folder = run_dir.parent
    while created in (folder, *folder.parents) and folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
        folder = folder.parent


def _first_missing(folder: Path) -> Optional[Path]:
    """The outermost folder on the way to `folder` that does not exist yet (None if it exists)."""
    if folder.exists():
        return None
    while not folder.parent.exists():
        folder = folder.parent
    return folder


def _tool(name: str) -> Callable[[list[str]], int]:
    module, function = TOOL_COMMANDS[name]
    return getattr(importlib.import_module(module), function)


def main(argv: Optional[list[str]] = None) -> int:
    given, argv = argv, sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(top_level_help())
        return 0 if argv else 2
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if _has_cuda() else "cpu")
    if argv[0] not in (*LIGHTNING_COMMANDS, *TOOL_COMMANDS):
        close = difflib.get_close_matches(argv[0], [*LIGHTNING_COMMANDS, *TOOL_COMMANDS], n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        print(f"error: unknown command {argv[0]!r}{hint}; commands: {', '.join((*LIGHTNING_COMMANDS, *TOOL_COMMANDS))}"
              " (llmtrain --help says what each does)", file=sys.stderr)
        return 2
    try:
        if argv[0] in TOOL_COMMANDS:
            return _tool(argv[0])(argv[1:])
        try:
            run_lightning(given)  # None: LightningCLI reads sys.argv itself (and warns if given both)
        finally:
            _destroy_process_group()
        return 0
    except UsageError as err:
        if _debug():
            raise
        print(f"error: {err} (llmtrain {argv[0]} --help lists the options)", file=sys.stderr)
        return 2
    except Exception as exc:
        cause = user_error(exc)
        if _debug() or cause is None:
            raise
        print(f"error: {cause}", file=sys.stderr)
        return 1


def top_level_help() -> str:
    width = max(map(len, PURPOSES))
    lines = ["usage: llmtrain COMMAND [options]        (llmtrain COMMAND --help: that command's options)", "",
             "Training (Lightning; a YAML config plus dotted overrides, e.g. --model.config.n_layer 8):"]
    lines += [f"  {name:<{width}}  {PURPOSES.get(name, '')}" for name in LIGHTNING_COMMANDS]
    lines += ["", "Tools:"]
    lines += [f"  {name:<{width}}  {PURPOSES.get(name, '')}" for name in TOOL_COMMANDS]
    lines += ["", "Start: llmtrain fit --config configs/quickstart.yaml (the README's quickstart prepares its data).",
              f"A mistake in the input ends in one 'error: ...' line; {DEBUG_VARIABLE}=1 adds the traceback."]
    return "\n".join(lines)


# Lightning's own check of a user's settings (e.g. a GPU accelerator where there is none); its message says it.
_LIGHTNING_CONFIG_ERRORS = ("MisconfigurationException",)
# Raised by our own code (the innermost frame is in llmtrain/), these are validation, not bugs.
_VALIDATION_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError)
_PACKAGE = str(Path(__file__).resolve().parent)


def is_user_error(exc: BaseException) -> bool:
    """An error in the user's input, to print as one line: an exception class of ours (ConfigError, ShardError,
    CheckpointError, ...), Lightning's MisconfigurationException, or a ValueError/missing-file error raised by our
    code. Anything else (TypeError, a ValueError from inside torch, ...) is a bug and keeps its traceback."""
    for cls in type(exc).__mro__:
        if cls.__module__.startswith("llmtrain.") or cls.__name__ in _LIGHTNING_CONFIG_ERRORS:
            return True
    frames = traceback.extract_tb(exc.__traceback__)
    return isinstance(exc, _VALIDATION_ERRORS) and bool(frames) and \
        str(Path(frames[-1].filename).resolve()).startswith(_PACKAGE)


def user_error(exc: BaseException) -> Optional[BaseException]:
    """The user error `exc` is, or was raised from (`raise ... from`: jsonargparse wraps a dataclass's own error in
    its own); None for a bug. Not an error raised while handling another (__context__): that one is a bug."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if is_user_error(exc):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__
    return None


def _debug() -> bool:
    return os.environ.get(DEBUG_VARIABLE, "") not in ("", "0")


def _destroy_process_group() -> None:
    """Without this, gloo ranks abort at interpreter exit ~40% of the time (measured: 5 of 12 bare 2-task jobs)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
