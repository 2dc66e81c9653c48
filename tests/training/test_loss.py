import math

import torch
import torch.nn.functional as F

from llmtrain.training.loss import IGNORE_INDEX, cross_entropy_and_z


def test_cross_entropy_matches_torch_and_ignores_padding():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11) * 3
    labels = torch.randint(0, 11, (2, 5))
    labels[1, 3:] = IGNORE_INDEX
    ce, _ = cross_entropy_and_z(logits, labels)
    expected = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(ce, expected)


def test_z_loss_is_mean_squared_log_normaliser_by_hand():
    logits = torch.tensor([[[0.0, 0.0], [1.0, 2.0], [5.0, -1.0]]])  # (1, 3, 2)
    labels = torch.tensor([[0, 1, IGNORE_INDEX]])
    _, z = cross_entropy_and_z(logits, labels)
    lse = [math.log(2.0), math.log(math.exp(1) + math.exp(2))]  # third token ignored
    assert math.isclose(z.item(), (lse[0] ** 2 + lse[1] ** 2) / 2, rel_tol=1e-6)


def test_bf16_logits_are_reduced_in_fp32():
    torch.manual_seed(0)
    logits = (torch.randn(1, 8, 300) * 20).to(torch.bfloat16)
    labels = torch.randint(0, 300, (1, 8))
    ce, z = cross_entropy_and_z(logits, labels)
    assert ce.dtype == z.dtype == torch.float32
    expected = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
    torch.testing.assert_close(ce, expected)


def test_compiled_loss_matches_eager_in_value_and_gradient():
    # Compiled, the target logit is a masked sum (no dense scatter in the backward); eager, a gather.
    torch.manual_seed(0)
    logits = torch.randn(2, 16, 257, dtype=torch.bfloat16) * 4
    labels = torch.randint(0, 257, (2, 16))
    labels[0, :3] = IGNORE_INDEX
    grads = []
    for fn in (cross_entropy_and_z, torch.compile(cross_entropy_and_z)):
        x = logits.clone().requires_grad_()
        ce, z = fn(x, labels)
        (ce + 1e-2 * z).backward()
        grads.append((ce.detach(), z.detach(), x.grad.float()))
    for eager, compiled in zip(*grads):
        torch.testing.assert_close(compiled, eager)
