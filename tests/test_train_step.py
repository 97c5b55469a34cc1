"""The training step against a hand computation: a linear model, a closed-form loss, plain SGD."""
import pytest
import torch

from ssm_tread.train.ema import EMA
from ssm_tread.train.step import TrainStep, lr_factor


class SquaredError:
    """A stand-in objective: loss = mean over elements of (model(x) - y)^2, per sample."""

    def training_losses(self, model, x, model_kwargs, loss_type="full", noise=None, t=None):
        return {"loss": ((model(x) - model_kwargs["y"]) ** 2).mean(dim=1)}


@pytest.mark.parametrize("clip", [0.0, 0.5])
def test_one_step_is_sgd_on_the_averaged_gradient_then_the_ema(clip):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2, bias=False)
    w0 = model.weight.detach().clone()
    ema = EMA(model, decay=0.9)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    step = TrainStep(model, SquaredError(), optimizer, ema=ema, grad_clip=clip)
    batches = [(torch.randn(4, 3), torch.randn(4, 2), None, None) for _ in range(2)]

    loss, grad_norm = step(batches)

    # by hand: d/dW mean((W x - y)^2) over 2 outputs = 2/2 * (W x - y) x^T, averaged over samples and micro-batches
    grads = [((x @ w0.T - y).T @ x) / len(x) for x, y, _, _ in batches]
    grad = sum(grads) / len(grads)
    losses = [((x @ w0.T - y) ** 2).mean() for x, y, _, _ in batches]
    assert loss.item() == pytest.approx(sum(losses).item() / 2, rel=1e-6)
    assert grad_norm.item() == pytest.approx(grad.norm().item(), rel=1e-5)
    if clip:
        assert grad.norm() > clip  # the case clips
        grad = grad * clip / grad.norm()
    w1 = w0 - 0.1 * grad
    torch.testing.assert_close(model.weight.detach(), w1, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ema.model.weight, 0.9 * w0 + 0.1 * w1, rtol=1e-5, atol=1e-6)
    assert model.weight.grad is None  # zeroed for the next step


def test_schedule_warms_up_linearly_then_decays_by_the_cosine():
    optim = {"warmup_steps": 4, "schedule": "cosine", "lr": 1.0, "min_lr": 0.1}
    assert [lr_factor(s, optim, 14) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(9, optim, 14) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the decay
    assert lr_factor(14, optim, 14) == pytest.approx(0.1)
    assert lr_factor(7, {**optim, "schedule": "constant"}, 14) == 1.0
