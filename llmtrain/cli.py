"""The `llmtrain` console script: Lightning's fit/validate/test on LightningCLI, plus the tool commands."""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import Callable, Optional

from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.strategies import DeepSpeedStrategy

from llmtrain.checkpointing.resume import newest_checkpoint, refuse_checkpoint_of_another_strategy

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


class LLMTrainCLI(LightningCLI):
    """LightningCLI for LanguageModel + TokenDataModule, with the run config stored in every checkpoint."""

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
        args=args,
    )


def _tool(name: str) -> Callable[[list[str]], int]:
    module, function = TOOL_COMMANDS[name]
    return getattr(importlib.import_module(module), function)


def main(argv: Optional[list[str]] = None) -> int:
    given, argv = argv, sys.argv[1:] if argv is None else argv
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if _has_cuda() else "cpu")
    if argv and argv[0] in TOOL_COMMANDS:
        return _tool(argv[0])(argv[1:])
    if argv and argv[0] not in LIGHTNING_COMMANDS and not argv[0].startswith("-"):
        commands = ", ".join((*LIGHTNING_COMMANDS, *TOOL_COMMANDS))
        print(f"llmtrain: unknown command {argv[0]!r}; commands: {commands}", file=sys.stderr)
        return 2
    try:
        run_lightning(given)  # None: LightningCLI reads sys.argv itself (and warns if given both)
    finally:
        _destroy_process_group()
    return 0


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
