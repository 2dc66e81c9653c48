"""launch/torchrun.sh: two "nodes" on localhost meet through the c10d rendezvous and train one model with DDP."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch

from llmtrain.events import read_scalars
from tests.launch.conftest import REPO, tiny_config

SCRIPT = REPO / "launch" / "torchrun.sh"


def env(**values: str) -> dict[str, str]:
    return {**os.environ, "PYTHON": sys.executable, **values}


@pytest.mark.slow
def test_two_nodes_rendezvous_and_train(prepared_corpus, tmp_path):
    steps = 10
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    config = tiny_config(tmp_path, prepared_corpus["shards"], steps)
    args = [str(SCRIPT), "--config", str(config), "--trainer.accelerator", "cpu",
            "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"), "--trainer.logger.init_args.name", "tr"]
    nodes = [subprocess.Popen(args, env=env(NNODES="2", NPROC_PER_NODE="1", MASTER_PORT=port, RUN_ID="test"),
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    for node, output in zip(nodes, outputs):
        assert node.returncode == 0, output[-5000:]
    assert "MEMBER: 2/2" in "".join(outputs)
    run = tmp_path / "runs" / "tr"
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == steps
    assert read_scalars(run)["train/tokens"][steps - 1] == steps * 2 * 4 * 32  # 2 ranks x 4 samples x 32 tokens


@pytest.mark.parametrize("name, value", [("NNODES", "0"), ("NPROC_PER_NODE", "-1"), ("MASTER_PORT", "x")])
def test_bad_counts_are_refused(name, value):
    result = subprocess.run([str(SCRIPT), "--config", "configs/quickstart.yaml"], env=env(**{name: value}),
                            cwd=REPO, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and f"{name}={value}: must be a whole number >= 1" in result.stderr
