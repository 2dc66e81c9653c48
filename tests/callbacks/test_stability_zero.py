"""The stability monitors under DeepSpeed ZeRO-2 and ZeRO-3 over 2 ranks (CPU, gloo) give the values of the same
monitors on a plain model trained on the same global batches: weights, gradients and updates through DeepSpeed's
safe_get_full_* helpers, output and attention logits and activations through a probe forward that gathers the
partitioned parameters. (Lightning refuses DeepSpeed on CPU, so the hooks are driven by hand around DeepSpeed's
engine, as Lightning calls them.)"""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_deepspeed_ranks

pytestmark = pytest.mark.slow

SCRIPT = r"""
import json, os, sys
from types import SimpleNamespace
import torch, deepspeed
from lightning.pytorch.strategies import DeepSpeedStrategy
from llmtrain.callbacks import AttentionMonitor, LogitMonitor, WeightMonitor
from llmtrain.model import Decoder, ModelConfig
from llmtrain.training.module import LanguageModel

config = ModelConfig(vocab_size=96, max_seq_len=16, d_model=32, n_layer=2, n_head=4, n_kv_head=2)
rank, world, stage = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(sys.argv[1])
# gradient_clipping 0, as Lightning writes it when gradient_clip_val is unset (DeepSpeed's own default clips at 1.0).
ds_config = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": stage}, "gradient_clipping": 0.0,
             "zero_allow_untested_optimizer": True}
torch.manual_seed(0)
module = LanguageModel(config, z_loss_coef=0.0)
with deepspeed.zero.Init(config_dict_or_path=ds_config) if stage == 3 else torch.device("cpu"):
    module.configure_model()
with deepspeed.zero.GatheredParameters(list(module.model.parameters())):
    plain = Decoder(config)
    plain.load_state_dict(module.model.state_dict())
# SGD: its update is linear in the gradient, so both runs stay within rounding of each other (Adam's first steps move
# every weight by about +-lr whatever its gradient, and turn rounding in near-zero gradients into visible updates).
engine, optimizer, *_ = deepspeed.initialize(model=module, optimizer=torch.optim.SGD(module.parameters(), lr=0.5),
                                             config=ds_config)
plain_optimizer = torch.optim.SGD(plain.parameters(), lr=0.5)

class Logger:
    def __init__(self): self.rows = []
    def log_metrics(self, metrics, step): self.rows.append((step, metrics))

def trainer(strategy, optimizer, logger):
    loop = SimpleNamespace(epoch_loop=SimpleNamespace(_batches_that_stepped=0))
    return SimpleNamespace(strategy=strategy, fit_loop=loop, is_global_zero=rank == 0, loggers=[logger],
                           optimizers=[optimizer])

zero_logger, plain_logger = Logger(), Logger()
zero = trainer(DeepSpeedStrategy.__new__(DeepSpeedStrategy), optimizer, zero_logger)
ref = trainer(None, plain_optimizer, plain_logger)
plain_module = SimpleNamespace(model=plain)
monitors = {name: (cls(every_n_steps=1), cls(every_n_steps=1)) for name, cls in
            (("logits", LogitMonitor), ("attention", AttentionMonitor), ("weights", WeightMonitor))}

def loss_of(model, ids):
    logits = model(ids[:, :-1])
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())

for step in range(2):
    # The global batch: rank r trains on rows 2r, 2r+1; the plain model on all of them (the DP mean).
    ids = torch.randint(0, config.vocab_size, (2 * world, config.max_seq_len + 1),
                        generator=torch.Generator().manual_seed(step))
    mine = ids[2 * rank: 2 * rank + 2]
    with torch.no_grad():  # the probe monitors measure rank 0's batch on every rank (collectives under ZeRO-3)
        for name in ("logits", "attention"):
            z, p = monitors[name]
            probe = {"input_ids": ids[:2, :-1], "labels": ids[:2, 1:]}
            z.last_metrics = {k: float(v) for k, v in z.measure(module, probe).items()}
            p.last_metrics = {k: float(v) for k, v in p.measure(plain_module, probe).items()}
    engine.backward(loss_of(module.model, mine))
    plain_optimizer.zero_grad()
    loss_of(plain, ids).backward()
    z, p = monitors["weights"]
    z.on_before_optimizer_step(zero, module, optimizer)
    p.on_before_optimizer_step(ref, plain_module, plain_optimizer)
    engine.step()
    plain_optimizer.step()
    z.on_train_batch_end(zero, module, None, None, 0)
    p.on_train_batch_end(ref, plain_module, None, None, 0)
    for t in (zero, ref):
        t.fit_loop.epoch_loop._batches_that_stepped += 1
    if rank == 0:
        print(json.dumps({"step": step, **{name: [z.last_metrics, p.last_metrics] for name, (z, p) in monitors.items()}}))
"""


@pytest.mark.parametrize("stage", [2, 3])
def test_monitors_under_zero_on_two_ranks_match_a_plain_model(stage: int):
    out = run_deepspeed_ranks(SCRIPT, [str(stage)], world_size=2)[0]
    steps = [json.loads(line) for line in out.splitlines() if line.startswith('{"step"')]
    assert [s["step"] for s in steps] == [0, 1]
    checked = 0
    for record in steps:
        for name in ("logits", "attention", "weights"):
            zero, plain = record[name]
            assert zero.keys() == plain.keys() and zero, (name, sorted(zero), sorted(plain))
            for tag, value in plain.items():
                assert zero[tag] == pytest.approx(value, rel=1e-4, abs=1e-6), (record["step"], tag)
                checked += 1
    # weights: 3 families x (global + one per tensor); attention: 3 per layer; logits: 6.
    assert checked > 2 * (6 + 3 * 2 + 3 * 10)
