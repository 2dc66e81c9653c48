"""Shared fixtures: a small real corpus, a sentencepiece tokenizer and prepared shards, made once per session."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

WORDS = ("the king queen lord lady sword crown night day love death fair foul speak hear thou thee thy "
         "doth hath shall will not what where when why how good ill sweet sour heaven earth fire water").split()


def write_corpus(folder: Path, n_docs: int = 400, seed: int = 0) -> Path:
    """Documents of pseudo-verse with enough structure for a model to learn quickly."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for shard in range(4):
        lines = []
        for _ in range(n_docs // 4):
            n_lines = rng.randint(2, 8)
            doc = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 9))).capitalize() + "."
                   for _ in range(n_lines)]
            lines.append("\n".join(doc))
        (folder / f"part{shard}.txt").write_text("\n\n".join(lines) + "\n")
    return folder


def llmtrain(*args: str, cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Runs the real console entry point in a subprocess and fails with its output if it fails."""
    result = subprocess.run([sys.executable, "-m", "llmtrain.cli", *args], cwd=cwd, capture_output=True,
                            text=True, timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(f"llmtrain {' '.join(args)} failed ({result.returncode}):\n"
                             f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    return result


# DeepSpeed's CPU comm threads sometimes abort interpreter teardown ("terminate called without an active
# exception", exit -6). Every rank waits until all have finished their work, then exits without teardown.
RANKS_EPILOGUE = """
import os, sys, torch.distributed
if torch.distributed.is_initialized():
    torch.distributed.barrier()
sys.stdout.flush()
os._exit(0)
"""


def run_deepspeed_ranks(script: str, args: list[str], world_size: int, timeout: int = 300) -> list[str]:
    """Runs `script` (Python source) as `world_size` DeepSpeed CPU processes over gloo, as a launcher would set
    them up, and fails with a rank's output if any rank fails; returns each rank's output."""
    folder = Path(tempfile.mkdtemp(prefix="ds_ranks_"))
    (folder / "script.py").write_text(script + RANKS_EPILOGUE)
    port = str(29500 + random.Random().randrange(2000))
    procs = []
    for rank in range(world_size):
        env = {**os.environ, "DS_ACCELERATOR": "cpu", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
               "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
               "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
        procs.append(subprocess.Popen([sys.executable, str(folder / "script.py"), *args], env=env, cwd=REPO,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    for rank, (p, output) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"rank {rank} failed:\n{output[-4000:]}"
    return outputs


# Slow tests whose property a faster default test also checks: marked `extended` and left out of the default run
# (pyproject.toml: -m "not extended"); `python -m pytest -m extended` runs them. Each names what covers it.
EXTENDED = {
    # ~110 s: a DDP checkpoint resumed on 1 rank. A DDP checkpoint holds whole tensors (the 2-rank fits of
    # test_fit and test_slurm write them) and the data position is global (tests/data/test_resume.py).
    "tests/training/test_fit.py::test_ddp_checkpoint_resumes_on_another_world_size",
    # ~150 s: bitwise resume under DDP (3 fits of 2 ranks). Bitwise resume is checked on one process by
    # tests/test_cli.py, 2-rank DDP training and a requeued 2-task job's resume by tests/launch/test_slurm.py.
    "tests/training/test_fit.py::test_resume_under_ddp_is_bitwise_equal_to_uninterrupted",
    # ~60 s + ~30 s + ~15 s: whole tiny ablation suites; the sweep end to end is tests/test_sweep.py's, the
    # suite's planning and reports the other tests of test_ablation_suite.py.
    "tests/test_ablation_suite.py::test_tiny_suite_runs_two_at_once_and_packs_the_reports",
    "tests/test_ablation_suite.py::test_a_first_wave_that_all_fails_stops_the_suite",
    "tests/test_ablation_suite.py::test_runs_still_going_at_the_time_budget_are_stopped_and_reported_pending",
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    collected = {item.nodeid.split("[")[0] for item in items}
    files = {name.split("::")[0] for name in collected}
    stale = [name for name in EXTENDED if name.split("::")[0] in files and name not in collected]
    if stale:  # a renamed test would otherwise silently come back into the default run
        raise pytest.UsageError(f"tests/conftest.py EXTENDED names tests that do not exist: {stale}")
    for item in items:
        if item.nodeid.split("[")[0] in EXTENDED:
            item.add_marker(pytest.mark.extended)


@pytest.fixture(scope="session")
def prepared_corpus(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("corpus")
    texts = write_corpus(root / "texts")
    llmtrain("tokenizer", "train", "--input", str(texts), "--vocab_size", "320", "--output", str(root / "tok"))
    llmtrain("prepare", "--source", str(texts), "--tokenizer", str(root / "tok"), "--output", str(root / "shards"),
             "--val_fraction", "0.05")
    return {"texts": texts, "tokenizer": root / "tok", "shards": root / "shards"}


@pytest.fixture(scope="session")
def zero_folders(tmp_path_factory):
    """get(stage, world_size, precision="fp32") -> (folder, engine weights): a ZeRO checkpoint of the tiny test
    model (tests/test_checkpoint.py), written once per session by real DeepSpeed ranks and shared by the tests
    that only read it; the engine's fp32 masters and Adam moments are in `folder.parent / "engine_weights.pt.adam"`."""
    from tests.test_checkpoint import tiny, zero_checkpoint

    cache: dict[tuple, tuple] = {}

    def get(stage: int, world_size: int, precision: str = "fp32") -> tuple:
        key = (stage, world_size, precision)
        if key not in cache:
            root = tmp_path_factory.mktemp(f"zero{stage}_ranks{world_size}_{precision}")
            cache[key] = zero_checkpoint(root, stage, world_size, tiny(), precision)
        return cache[key]

    return get
