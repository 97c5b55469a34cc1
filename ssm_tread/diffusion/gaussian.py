"""Gaussian diffusion (DDPM) as in the DiT protocol.

The model predicts the noise (eps). With 2C output channels the second half is the learned variance
``v`` in [-1, 1] (ADM's interpolation): ``log_var = frac * log(beta_t) + (1 - frac) * log(posterior_var_t)``
with ``frac = (v + 1) / 2``, trained with the VLB term on a stop-gradient mean ("hybrid" loss: mse + vb).
With C output channels the variance is fixed ("large": beta_t, DiT's default; "small": the posterior's).

Timesteps: the model receives the original integer timestep 0..T-1 (0 = nearly clean) as a float
tensor, also when sampling with fewer, respaced steps. Schedule tables are float64 and cast at use.
"""

from __future__ import annotations

import math

import torch
from ssm_tread.progress import progress_bar

from ssm_tread.diffusion.common import check_choice, model_forward, randint, randn, reduce_loss
from ssm_tread.diffusion.dpm_solver import DiscreteSchedule, dpm_solver_sample
from ssm_tread.diffusion.guidance import Guidance


def linear_betas(num_timesteps: int) -> torch.Tensor:
    """DDPM's linear schedule 1e-4..0.02 for 1000 steps, rescaled so other step counts match it."""
    scale = 1000 / num_timesteps
    return torch.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=torch.float64)


def cosine_betas(num_timesteps: int, max_beta: float = 0.999) -> torch.Tensor:
    """Improved DDPM's cosine schedule: alpha_bar(s) = cos((s + 0.008) / 1.008 * pi / 2)^2."""
    s = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    alpha_bar = torch.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
    return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=max_beta)


def scaled_linear_betas(num_timesteps: int) -> torch.Tensor:
    """Latent diffusion's "scaled linear" schedule (DiM, U-ViT): sqrt(beta) linear from sqrt(0.00085) to sqrt(0.012)."""
    return torch.linspace(0.00085**0.5, 0.012**0.5, num_timesteps, dtype=torch.float64) ** 2


BETA_SCHEDULES = {"linear": linear_betas, "cosine": cosine_betas, "scaled_linear": scaled_linear_betas}


def space_timesteps(num_timesteps: int, spec: str | int) -> list[int]:
    """The original timesteps kept by a respacing ``spec``, sorted.

    "250" (or 250): 250 steps evenly spaced over 0..T-1, both ends included. "10,15,20": the range is
    cut into 3 equal sections with 10, 15 and 20 evenly spaced steps. "ddim50": the stride that gives
    exactly 50 steps, starting at 0 (DDIM's spacing).
    """
    spec = str(spec)
    if spec.startswith("ddim"):
        count = int(spec[len("ddim"):])
        for stride in range(1, num_timesteps):
            if len(range(0, num_timesteps, stride)) == count:
                return list(range(0, num_timesteps, stride))
        raise ValueError(f"no integer stride gives {count} steps out of {num_timesteps}")
    counts = [int(c) for c in spec.split(",")]
    size, extra = divmod(num_timesteps, len(counts))
    kept, start = [], 0
    for i, count in enumerate(counts):
        section = size + (1 if i < extra else 0)
        if not 1 <= count <= section:
            raise ValueError(f"cannot take {count} steps from a section of {section} timesteps")
        stride = (section - 1) / (count - 1) if count > 1 else 1
        kept += [start + round(k * stride) for k in range(count)]
        start += section
    return sorted(set(kept))


def normal_kl(mean1, log_var1, mean2, log_var2) -> torch.Tensor:
    """KL(N(mean1, exp(log_var1)) || N(mean2, exp(log_var2))), elementwise, in nats."""
    return 0.5 * (log_var2 - log_var1 - 1 + torch.exp(log_var1 - log_var2) + (mean1 - mean2) ** 2 / torch.exp(log_var2))


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """log P(bin of x) under N(mean, exp(log_scale)^2), elementwise, for x in [-1, 1] quantised to 8 bits.

    Bins have width 2/255 around x; the two end bins extend to -inf and +inf.
    """
    inv_std = torch.exp(-log_scale)
    upper = inv_std * (x - mean + 1 / 255)
    lower = inv_std * (x - mean - 1 / 255)
    log_cdf_upper = torch.special.log_ndtr(upper)
    log_sf_lower = torch.special.log_ndtr(-lower)
    log_bin = torch.log((torch.special.ndtr(upper) - torch.special.ndtr(lower)).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_upper, torch.where(x > 0.999, log_sf_lower, log_bin))


def _extract(table: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """table [T] at timesteps t [B] -> [B, 1, ..., 1], broadcastable against x, in x's dtype."""
    return table.to(t.device)[t].to(x.dtype).view(-1, *([1] * (x.dim() - 1)))


class GaussianDiffusion:
    """DDPM with ``betas`` [T]; ``timestep_map`` gives each step's original timestep (respacing).

    ``timestep_offset`` is added to the timestep the model receives: 1 for models trained on n = 1..T
    (DiM, U-ViT) rather than 0..T-1."""

    samplers = ("ddpm", "ddim", "dpm_solver")
    default_sampler = "ddpm"
    default_steps = {"ddpm": 250, "ddim": 50, "dpm_solver": 50}

    def __init__(
        self,
        betas: torch.Tensor,
        fixed_variance: str = "large",
        clip_denoised: bool = False,
        ddim_eta: float = 0.0,
        timestep_map: torch.Tensor | None = None,
        original_num_timesteps: int | None = None,
        timestep_offset: int = 0,
    ):
        check_choice("fixed_variance", fixed_variance, ("large", "small"))
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.dim() != 1 or len(betas) < 2 or not ((betas > 0) & (betas < 1)).all():
            raise ValueError("betas must be a 1-D table of at least 2 values in (0, 1)")
        self.fixed_variance = fixed_variance
        self.clip_denoised = clip_denoised
        self.ddim_eta = ddim_eta
        self.num_timesteps = len(betas)
        self.timestep_map = torch.arange(len(betas)) if timestep_map is None else torch.as_tensor(timestep_map)
        self.original_num_timesteps = original_num_timesteps or self.num_timesteps
        self.timestep_offset = timestep_offset

        self.betas = betas
        alphas = 1 - betas
        self.alphas_cumprod = torch.cumprod(alphas, dim=0)
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1 - self.alphas_cumprod).sqrt()
        self.sqrt_recip_alphas_cumprod = (1 / self.alphas_cumprod).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1 / self.alphas_cumprod - 1).sqrt()

        # q(x_{t-1} | x_t, x_0); its variance is 0 at t=0, so the log is clipped to the value at t=1.
        self.posterior_variance = betas * (1 - self.alphas_cumprod_prev) / (1 - self.alphas_cumprod)
        self.posterior_log_variance_clipped = torch.log(
            torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]])
        )
        self.posterior_mean_coef1 = betas * self.alphas_cumprod_prev.sqrt() / (1 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1 - self.alphas_cumprod_prev) * alphas.sqrt() / (1 - self.alphas_cumprod)
        self.log_betas = torch.log(betas)
        if fixed_variance == "large":
            self.fixed_log_variance = torch.log(torch.cat([self.posterior_variance[1:2], betas[1:]]))
        else:
            self.fixed_log_variance = self.posterior_log_variance_clipped

    def respace(self, spec: str | int) -> "GaussianDiffusion":
        """The diffusion restricted to the timesteps ``space_timesteps(T, spec)`` keeps.

        New betas ``1 - abar[k_i] / abar[k_{i-1}]`` keep alphas_cumprod at the kept steps unchanged.
        """
        kept = torch.tensor(space_timesteps(self.num_timesteps, spec))
        alphas_cumprod = self.alphas_cumprod[kept]
        betas = 1 - alphas_cumprod / torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        return GaussianDiffusion(
            betas, self.fixed_variance, self.clip_denoised, self.ddim_eta,
            timestep_map=self.timestep_map[kept], original_num_timesteps=self.original_num_timesteps,
            timestep_offset=self.timestep_offset,
        )

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        """Step indices [B] -> the original timesteps (+ ``timestep_offset``) the model receives, float32 [B]."""
        return (self.timestep_map.to(t.device)[t] + self.timestep_offset).float()

    def normalised_time(self, i: int) -> float:
        """Step ``i`` in [0, 1] (0 = data, 1 = noise): what a guidance interval refers to."""
        return self.timestep_map[i].item() / (self.original_num_timesteps - 1)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise."""
        signal, sigma = _extract(self.sqrt_alphas_cumprod, t, x0), _extract(self.sqrt_one_minus_alphas_cumprod, t, x0)
        return signal * x0 + sigma * noise

    def q_posterior(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """Mean, variance and clipped log variance of q(x_{t-1} | x_t, x0)."""
        mean = _extract(self.posterior_mean_coef1, t, x_t) * x0 + _extract(self.posterior_mean_coef2, t, x_t) * x_t
        return mean, _extract(self.posterior_variance, t, x_t), _extract(self.posterior_log_variance_clipped, t, x_t)

    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar)."""
        recip = _extract(self.sqrt_recip_alphas_cumprod, t, x_t)
        recipm1 = _extract(self.sqrt_recipm1_alphas_cumprod, t, x_t)
        return recip * x_t - recipm1 * eps

    def predict_eps(self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`predict_x0`."""
        recip = _extract(self.sqrt_recip_alphas_cumprod, t, x_t)
        recipm1 = _extract(self.sqrt_recipm1_alphas_cumprod, t, x_t)
        return (recip * x_t - x0) / recipm1

    def p_mean_variance(self, out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, clip_denoised=False) -> dict:
        """p(x_{t-1} | x_t) from the model output ``out`` [B, C or 2C, ...]: mean, log_var, x0, eps."""
        channels = x_t.shape[1]
        if out.shape[1] == 2 * channels:
            eps, v = out.split(channels, dim=1)
            frac = (v + 1) / 2
            max_log, min_log = _extract(self.log_betas, t, x_t), _extract(self.posterior_log_variance_clipped, t, x_t)
            log_var = frac * max_log + (1 - frac) * min_log
        elif out.shape[1] == channels:
            eps, log_var = out, _extract(self.fixed_log_variance, t, x_t)
        else:
            raise ValueError(f"model output has {out.shape[1]} channels; expected {channels} or {2 * channels}")
        x0 = self.predict_x0(x_t, t, eps)
        if clip_denoised:
            x0 = x0.clamp(-1, 1)
        mean, _, _ = self.q_posterior(x0, x_t, t)
        return {"mean": mean, "log_var": log_var, "x0": x0, "eps": eps}

    def vb_terms(self, out: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The VLB term per element, in bits: KL(q(x_{t-1}|x_t,x0) || p) for t > 0, -log p(x0|x1) at t = 0."""
        true_mean, _, true_log_var = self.q_posterior(x0, x_t, t)
        pred = self.p_mean_variance(out, x_t, t)
        kl = normal_kl(true_mean, true_log_var, pred["mean"], pred["log_var"])
        nll = -discretized_gaussian_log_likelihood(x0, pred["mean"], 0.5 * pred["log_var"])
        first = (t == 0).view(-1, *([1] * (x0.dim() - 1)))
        return torch.where(first, nll, kl) / math.log(2.0)

    def sample_time(self, x0: torch.Tensor, generator=None) -> torch.Tensor:
        """Training step indices t [B], uniform over 0..T-1."""
        return randint(self.num_timesteps, x0.shape[0], generator, x0.device)

    def training_losses(
        self, model, x0, model_kwargs=None, loss_type="full", noise=None, t=None, generator=None
    ) -> dict:
        """Per-sample losses [B]: "mse" (eps), "vb" (learned-sigma models only) and their sum "loss".

        t: step indices [B] (default :meth:`sample_time`); vb is scaled by T / 1000 as in ADM (1 for T = 1000).
        """
        channels = x0.shape[1]
        if t is None:
            t = self.sample_time(x0, generator)
        if noise is None:
            noise = randn(x0.shape, generator, x0)
        x_t = self.q_sample(x0, t, noise)
        out, masks = model_forward(model, x_t, self.model_time(t), model_kwargs, loss_type)
        terms = {"mse": (noise - out[:, :channels]) ** 2}
        if out.shape[1] == 2 * channels:
            frozen = torch.cat([out[:, :channels].detach(), out[:, channels:]], dim=1)  # vb trains the variance only
            terms["vb"] = self.vb_terms(frozen, x0, x_t, t) * (self.num_timesteps / 1000)
        losses = {name: reduce_loss(value, masks) for name, value in terms.items()}
        losses["loss"] = sum(losses.values())
        return losses

    @torch.no_grad()
    def sample(
        self, model, noise, model_kwargs=None, sampler=None, steps=None, guidance=None, progress=False, generator=None
    ) -> torch.Tensor:
        """Denoise ``noise`` [B, C, H, W] into x0 with ``sampler`` ("ddpm" ancestral, "ddim", or "dpm_solver":
        DPM-Solver++ as in the official DiM evaluation, see :mod:`ssm_tread.diffusion.dpm_solver`).

        steps: for ddpm and ddim a respacing spec for :func:`space_timesteps` (an int N or "N": N evenly
        spaced steps; "ddimN": DDIM's strided spacing); for dpm_solver the number of model evaluations;
        default ``default_steps[sampler]``.
        """
        sampler = sampler or self.default_sampler
        check_choice("sampler", sampler, self.samplers)
        model_kwargs = model_kwargs or {}
        guidance = guidance or Guidance()  # the default: a plain model call
        if sampler == "dpm_solver":
            return self.dpm_solver(model, noise, model_kwargs, steps or self.default_steps[sampler], guidance)
        spaced = self.respace(steps or self.default_steps[sampler])
        x = noise
        indices = range(spaced.num_timesteps - 1, -1, -1)
        for i in progress_bar(indices, enabled=progress):
            t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
            out = guidance(model, x, spaced.model_time(t), model_kwargs, spaced.normalised_time(i))
            pred = spaced.p_mean_variance(out, x, t, self.clip_denoised)
            if sampler == "ddpm":
                x = pred["mean"]
                if i > 0:
                    x = x + torch.exp(0.5 * pred["log_var"]) * randn(x.shape, generator, x)
            else:
                x = spaced.ddim_step(x, t, pred, generator)
        return x

    def dpm_solver(self, model, noise: torch.Tensor, model_kwargs: dict, steps: int, guidance: Guidance) -> torch.Tensor:
        """DPM-Solver++ with ``steps`` model evaluations from ``noise`` [B, C, H, W] at t = 1 to x0.

        At continuous time t the model receives the timestep ``T t - 1`` (+ ``timestep_offset``) and
        predicts the noise (a learned-variance model's first C channels)."""
        if not isinstance(steps, int):
            raise ValueError(f"dpm_solver takes a number of model evaluations, got steps={steps!r}")
        if len(self.timestep_map) != self.original_num_timesteps:
            raise ValueError("dpm_solver needs the full schedule, not a respaced one")
        schedule, last = DiscreteSchedule(self.alphas_cumprod), self.num_timesteps - 1

        def data_prediction(x: torch.Tensor, t: float) -> torch.Tensor:
            timestep = self.num_timesteps * t - 1  # the training timestep, continuous: 0..T-1
            model_t = torch.full((x.shape[0],), timestep + self.timestep_offset, device=x.device)
            out = guidance(model, x, model_t, model_kwargs, timestep / last)
            return (x - schedule.sigma(t) * out[:, :x.shape[1]]) / schedule.alpha(t)

        return dpm_solver_sample(data_prediction, noise, schedule, steps)

    def ddim_step(self, x_t: torch.Tensor, t: torch.Tensor, pred: dict, generator=None) -> torch.Tensor:
        """x_{t-1} = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma^2) eps + sigma z, sigma scaled by ddim_eta."""
        eps = self.predict_eps(x_t, t, pred["x0"])
        abar = _extract(self.alphas_cumprod, t, x_t)
        abar_prev = _extract(self.alphas_cumprod_prev, t, x_t)
        sigma = self.ddim_eta * ((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)).sqrt()
        x = pred["x0"] * abar_prev.sqrt() + (1 - abar_prev - sigma**2).sqrt() * eps
        if self.ddim_eta > 0:
            x = x + sigma * randn(x.shape, generator, x)
        return x


def create_gaussian_diffusion(num_timesteps: int = 1000, schedule: str = "linear", **kwargs) -> GaussianDiffusion:
    """DDPM with a named beta schedule (a key of BETA_SCHEDULES: "linear", "cosine", "scaled_linear"); kwargs go
    to :class:`GaussianDiffusion`."""
    check_choice("schedule", schedule, tuple(BETA_SCHEDULES))
    return GaussianDiffusion(BETA_SCHEDULES[schedule](num_timesteps), **kwargs)
