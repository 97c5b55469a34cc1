"""TREAD's routed loss against a masked average written out with loops."""

import pytest
import torch

from ssm_tread.diffusion import create_diffusion


class MaskedModel:
    """Returns a fixed output, and fixed route masks [R, B, H, W] when asked for them."""

    def __init__(self, out, masks):
        self.out, self.masks = out, masks
        self.asked = []

    def __call__(self, x, t, return_masks=False):
        self.asked.append(return_masks)
        return (self.out, self.masks) if return_masks else self.out


def masked_average(err, masks):
    """err [B, C, H, W], masks [R, B, H, W] -> per sample: mean over routes of the mean over processed pixels."""
    batch, channels, height, width = err.shape
    result = []
    for b in range(batch):
        route_means = []
        for r in range(masks.shape[0]):
            total, count = 0.0, 0
            for c in range(channels):
                for i in range(height):
                    for j in range(width):
                        if masks[r, b, i, j]:
                            total += err[b, c, i, j].item()
                            count += 1
            route_means.append(total / count)
        result.append(sum(route_means) / len(route_means))
    return torch.tensor(result)


def toy(batch=2, channels=3, out_channels=3, routes=2, size=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.randn(batch, channels, size, size, generator=gen)
    noise = torch.randn(batch, channels, size, size, generator=gen)
    out = torch.randn(batch, out_channels, size, size, generator=gen)
    masks = torch.rand(routes, batch, size, size, generator=gen) < 0.5
    masks[:, :, 0, 0] = True  # every route processes at least one pixel
    return x0, noise, out, masks


def test_routed_flow_loss_averages_over_processed_pixels_per_route():
    x0, noise, out, masks = toy()
    model = MaskedModel(out, masks)
    losses = create_diffusion("flow").training_losses(model, x0, {}, "routed", noise=noise, t=torch.tensor([0.2, 0.7]))
    assert model.asked == [True]
    torch.testing.assert_close(losses["loss"], masked_average((x0 - noise - out) ** 2, masks))


def test_routed_ddpm_loss_on_eps_and_vb():
    x0, noise, out, masks = toy(out_channels=6)
    model = MaskedModel(out, masks)
    d = create_diffusion("ddpm")
    t = torch.tensor([0, 300])
    losses = d.training_losses(model, x0, {}, "routed", noise=noise, t=t)
    torch.testing.assert_close(losses["mse"], masked_average((noise - out[:, :3]) ** 2, masks))
    x_t = d.q_sample(x0, t, noise)
    torch.testing.assert_close(losses["vb"], masked_average(d.vb_terms(out, x0, x_t, t), masks))
    torch.testing.assert_close(losses["loss"], losses["mse"] + losses["vb"])


def test_routed_loss_without_routes_is_the_full_loss():
    x0, noise, out, _ = toy()
    model = MaskedModel(out, torch.zeros(0, 2, 4, 4, dtype=torch.bool))
    losses = create_diffusion("ddpm").training_losses(model, x0, {}, "routed", noise=noise, t=torch.tensor([5, 50]))
    torch.testing.assert_close(losses["loss"], ((noise - out) ** 2).mean(dim=(1, 2, 3)))


@pytest.mark.parametrize("objective", ["ddpm", "flow"])
def test_full_loss_does_not_ask_for_masks(objective):
    x0, noise, out, masks = toy()
    model = MaskedModel(out, masks)
    create_diffusion(objective).training_losses(model, x0, {}, noise=noise)
    assert model.asked == [False]
