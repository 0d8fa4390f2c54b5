"""Samplers: one signature, each a generator that yields its state after every solver update.

    for state in iterate(model, noise, labels, sampler="dpm++2m", steps=25, guidance=3.0):
        ...  # state.x, state.x0[k] (branch k's clean estimate at its own resolution), state.nfe
    x = sample(model, noise, labels, sampler="dpm++2m", steps=25, guidance=3.0)

`sample` drains the same generator: there is no second code path. All samplers run in continuous
time t in (0, 1] on the model's noise schedule, from t = 1 down a grid uniform in t.

- `dpm-fast`: the release's sampler, DPM-Solver++ singlestep with orders 3/2/1 mixed (Lu et al. 2022),
  `steps` network evaluations, ending at t = 1/N with no extra denoising step.
- `dpm++2m`: multistep DPM-Solver++ (2nd order), one evaluation per step, last step to the clean end.
- `dpm++2m-sde`: the stochastic counterpart of `dpm++2m` (DPM-Solver++(2M) for the reverse SDE, Lu et
  al. 2022b): each step is the DDPM posterior step plus a second-order correction from the previous
  prediction, so it injects fresh noise like `ddpm` but needs far fewer steps.
- `ddim` (deterministic with eta = 0) and `ddpm` (ancestral, i.e. DDIM with eta = 1).

Pixel-space models clamp clean-image estimates to [-1, 1] (config `clip_x0`), as DDPM did: near t = 1
the estimate divides by a tiny alpha. Latent models (and the parity runs) never clip.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .guidance import Denoiser, guidance_weight_fn, guided_denoiser
from .interventions import BranchGuidance, Intervention, InterventionDenoiser, check_intervention
from .schedule import NoiseSchedule

SAMPLERS = ("dpm-fast", "dpm++2m", "dpm++2m-sde", "ddim", "ddpm")
MAX_STEPS = 1000


@dataclass
class StepState:
    """What a sampler knows after one update.

    `x` is x_t at the time `t` reached; `eps[k]` and `x0[k]` are branch k's (guided) noise prediction
    and clean-image estimate, coarse to fine, from the last network evaluation of this update, made
    at time `eval_t` (`alpha`, `sigma`, `log_snr` describe `t`).
    """

    index: int
    total: int
    t: float
    alpha: float
    sigma: float
    log_snr: float
    x: torch.Tensor
    eps: list[torch.Tensor]
    x0: list[torch.Tensor]
    eval_t: float
    nfe: int


def branch_estimate(x: torch.Tensor, eps_k: torch.Tensor, alpha: float, sigma: float) -> torch.Tensor:
    """Branch k's clean estimate at its resolution (f times coarser than x):
    x0_k = (avg_pool(x, f) - sigma eps_k / f) / alpha, since avg_pool(x_t) = alpha avg_pool(x0) + sigma avg_pool(eps)
    and eps_k estimates f avg_pool(eps)."""
    f = x.shape[-1] // eps_k.shape[-1]
    pooled = x if f == 1 else F.avg_pool2d(x, f)  # (B, C, g_k, g_k)
    return (pooled - sigma * eps_k / f) / alpha


class _Evaluator:
    """Calls the denoiser at continuous time t, counts evaluations, keeps the last per-branch outputs."""

    def __init__(self, denoise: Denoiser, schedule: NoiseSchedule, clip: bool = False) -> None:
        self.denoise = denoise
        self.schedule = schedule
        self.clip = clip
        self.nfe = 0
        self.eps: list[torch.Tensor] = []
        self.x0: list[torch.Tensor] = []
        self.t = 1.0

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Data prediction of the finest branch, x0 = (x - sigma eps) / alpha (clamped to [-1, 1] if clipping)."""
        alpha, sigma = float(self.schedule.alpha(t)), float(self.schedule.sigma(t))
        self.eps = [e.float() for e in self.denoise(x, self.schedule.network_step(t))]
        self.x0 = [branch_estimate(x, e, alpha, sigma) for e in self.eps]
        if self.clip:
            self.x0 = [x0.clamp(-1, 1) for x0 in self.x0]
        self.nfe += 1
        self.t = float(t)
        return self.x0[-1]

    def state(self, index: int, total: int, x: torch.Tensor, t: torch.Tensor) -> StepState:
        s = self.schedule
        return StepState(
            index=index,
            total=total,
            t=float(t),
            alpha=float(s.alpha(t)),
            sigma=float(s.sigma(t)),
            log_snr=float(s.log_snr(t)),
            x=x,
            eps=self.eps,
            x0=self.x0,
            eval_t=self.t,
            nfe=self.nfe,
        )


def _dpm_fast_orders(steps: int) -> list[int]:
    """Orders of the release's singlestep "fast" variant for `steps` evaluations (they sum to steps)."""
    K = steps // 3 + 1
    if steps % 3 == 0:
        return [3] * (K - 2) + [2, 1]
    if steps % 3 == 1:
        return [3] * (K - 1) + [1]
    return [3] * (K - 1) + [2]


def _dpm_fast(ev: _Evaluator, x: torch.Tensor, steps: int) -> Iterator[StepState]:
    ns = ev.schedule
    grid = torch.linspace(1.0, ns.t_min, steps + 1)  # (steps + 1,) uniform in t
    orders = _dpm_fast_orders(steps)
    outer = grid[torch.cumsum(torch.tensor([0, *orders]), 0)]
    for i, m in enumerate(orders):
        s, t = outer[i], outer[i + 1]
        lam = ns.log_snr(torch.linspace(float(s), float(t), m + 1))  # lambda at the m + 1 inner points
        h = lam[-1] - lam[0]
        alpha_t, sigma_s, sigma_t = ns.alpha(t), ns.sigma(s), ns.sigma(t)
        phi_1 = torch.expm1(-h)
        d_s = ev(x, s)
        if m == 1:  # x_t = (sigma_t / sigma_s) x - alpha_t phi_1 D(s)
            x = (sigma_t / sigma_s) * x - alpha_t * phi_1 * d_s
        else:
            r1 = (lam[1] - lam[0]) / h
            s1 = ns.inverse_log_snr(lam[0] + r1 * h)
            u1 = (ns.sigma(s1) / sigma_s) * x - ns.alpha(s1) * torch.expm1(-r1 * h) * d_s
            d_s1 = ev(u1, s1)
            if m == 2:
                x = (sigma_t / sigma_s) * x - alpha_t * phi_1 * d_s - (0.5 / r1) * alpha_t * phi_1 * (d_s1 - d_s)
            else:
                r2 = (lam[2] - lam[0]) / h
                s2 = ns.inverse_log_snr(lam[0] + r2 * h)
                phi_12 = torch.expm1(-r2 * h)
                phi_22 = phi_12 / (r2 * h) + 1
                u2 = (
                    (ns.sigma(s2) / sigma_s) * x
                    - ns.alpha(s2) * phi_12 * d_s
                    + (r2 / r1) * ns.alpha(s2) * phi_22 * (d_s1 - d_s)
                )
                d_s2 = ev(u2, s2)
                phi_2 = phi_1 / h + 1
                x = (sigma_t / sigma_s) * x - alpha_t * phi_1 * d_s + (1.0 / r2) * alpha_t * phi_2 * (d_s2 - d_s)
        yield ev.state(i, len(orders), x, t)


def _grid_to_clean(ns: NoiseSchedule, steps: int) -> torch.Tensor:
    """`steps` evaluation times uniform in t from 1 to 1/N, then the clean end t = 0."""
    return torch.cat([torch.linspace(1.0, ns.t_min, steps), torch.zeros(1)])


def _dpmpp_2m(
    ev: _Evaluator, x: torch.Tensor, steps: int, sde: bool = False, generators: Sequence[torch.Generator] | None = None
) -> Iterator[StepState]:
    """Multistep DPM-Solver++(2M) in data prediction D, for the ODE or (`sde`) the reverse SDE. With
    h = lambda_t - lambda_s and D_2 = D_s + (h / 2) (D_s - D_prev) / h_prev, the data prediction at the
    middle of the step extrapolated linearly in lambda from the two latest evaluations:

        ODE: x_t = (sigma_t / sigma_s) x_s + alpha_t (1 - e^-h) D_2                    (Lu et al. 2022b, Alg. 2)
        SDE: x_t = (sigma_t / sigma_s) e^-h x_s + alpha_t (1 - e^-2h) D_2 + sigma_t sqrt(1 - e^-2h) z

    The SDE update with D_s in place of D_2 is DDPM's posterior step. The first step is first order,
    and for the SDE so is the step to t = 1/N: on a grid uniform in t its lambda-step is several times
    the one before, and extrapolating D, which carries the injected noise, that far inflates the final
    noise (Gaussian data, 12 steps: +0.24 standard deviation, against -0.02 with it first order). The
    last step lands on D (sigma = 0)."""
    ns = ev.schedule
    ts = _grid_to_clean(ns, steps)
    d_prev, h_prev = None, None
    for i in range(steps):
        s, t = ts[i], ts[i + 1]
        d = ev(x, s)
        if float(t) == 0.0:
            x = d  # sigma_t = 0: the first-order update lands on the data prediction exactly
        else:
            h = ns.log_snr(t) - ns.log_snr(s)
            d_use = d
            if d_prev is not None and not (sde and i == steps - 2):
                r = h_prev / h
                d_use = (1 + 1 / (2 * r)) * d - (1 / (2 * r)) * d_prev
            if sde:
                keep = -torch.expm1(-2 * h)  # 1 - e^-2h
                x = (ns.sigma(t) / ns.sigma(s)) * torch.exp(-h) * x + ns.alpha(t) * keep * d_use
                x = x + ns.sigma(t) * torch.sqrt(keep) * _noise_like(x, generators)
            else:
                x = (ns.sigma(t) / ns.sigma(s)) * x - ns.alpha(t) * torch.expm1(-h) * d_use
            h_prev = h
        d_prev = d
        yield ev.state(i, steps, x, t)


def _ddim(
    ev: _Evaluator, x: torch.Tensor, steps: int, eta: float, generators: Sequence[torch.Generator] | None
) -> Iterator[StepState]:
    """DDIM (Song et al. 2021) with stochasticity eta; eta = 1 is ancestral DDPM sampling."""
    ns = ev.schedule
    ts = _grid_to_clean(ns, steps)
    for i in range(steps):
        s, t = ts[i], ts[i + 1]
        x0 = ev(x, s)
        a_s, s_s, a_t = ns.alpha(s), ns.sigma(s), ns.alpha(t)
        eps = (x - a_s * x0) / s_s  # the eps consistent with the data prediction
        abar_s, abar_t = a_s**2, a_t**2
        noise_std = (
            eta * torch.sqrt(((1 - abar_t) / (1 - abar_s)) * (1 - abar_s / abar_t)) if float(t) > 0 else torch.zeros(())
        )
        x = a_t * x0 + torch.sqrt((1 - abar_t - noise_std**2).clamp(min=0)) * eps
        if float(noise_std) > 0:
            x = x + noise_std * _noise_like(x, generators)
        yield ev.state(i, steps, x, t)


def _noise_like(x: torch.Tensor, generators: Sequence[torch.Generator] | None) -> torch.Tensor:
    if generators is None:
        return torch.randn_like(x)
    return torch.stack([torch.randn(x.shape[1:], generator=g, device=g.device) for g in generators]).to(x)


def validate_sampling_args(
    sampler: str,
    steps: int,
    guidance: float,
    guidance_schedule: str,
    guidance_power: float,
    eta: float | None = None,
) -> None:
    """Clear errors for out-of-range settings (shared by the API, CLI and app)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}; got {sampler!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
        raise ValueError(f"steps must be an integer in [1, {MAX_STEPS}], got {steps!r}")
    if eta is not None and (sampler not in ("ddim", "ddpm") or not math.isfinite(eta) or eta < 0):
        raise ValueError(f"eta applies to ddim and ddpm only, as a finite number >= 0; got eta={eta!r} with {sampler}")
    for name, v in (("guidance", guidance), ("guidance_power", guidance_power)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
    if guidance_schedule not in ("constant", "power-cosine"):
        raise ValueError(f"guidance_schedule must be 'constant' or 'power-cosine', got {guidance_schedule!r}")


def iterate(
    model: torch.nn.Module,
    noise: torch.Tensor,
    labels: torch.Tensor,
    *,
    sampler: str,
    steps: int,
    guidance: float = 1.0,
    guidance_schedule: str = "constant",
    guidance_power: float = 1.0,
    eta: float | None = None,
    generators: Sequence[torch.Generator] | None = None,
    intervention: Intervention | None = None,
) -> Iterator[StepState]:
    """Yield a StepState after every solver update, starting from `noise` (x at t = 1).

    `guidance` is w in eps_u + w (eps_c - eps_u) (1 = none; the release's "0.4" is 1.4). With
    `guidance_schedule="power-cosine"`, w rises from 1 to `guidance` (= w_max) with power `guidance_power`.
    `generators` (one per image) drive the fresh noise of stochastic samplers. `eta` is DDIM's
    stochasticity (default 0 for `ddim`, 1 for `ddpm`); the other samplers refuse it.
    `intervention` (see `mrdit.interventions`; DiMR networks only, not a compiled wrapper) edits the
    branch hand-offs; `BranchGuidance` replaces `guidance` and needs the constant schedule.
    """
    validate_sampling_args(sampler, steps, guidance, guidance_schedule, guidance_power, eta)
    config = model.config
    if labels.shape != (noise.shape[0],):
        raise ValueError(f"labels must have shape ({noise.shape[0]},), got {tuple(labels.shape)}")
    schedule = NoiseSchedule(config.schedule)
    weight = guidance_weight_fn(float(guidance), guidance_schedule, float(guidance_power), schedule.N)
    if intervention is None:
        denoise: Denoiser = guided_denoiser(model, labels, weight, config.null_label)
    else:
        check_intervention(intervention, model, noise.shape[0], steps)  # steps = evaluations
        if guidance_schedule != "constant" and isinstance(intervention, BranchGuidance):
            raise ValueError("guidance_schedule must be 'constant' with BranchGuidance (its weights replace guidance)")
        denoise = InterventionDenoiser(model, labels, weight, config.null_label, intervention, float(guidance) != 1.0)
    ev = _Evaluator(denoise, schedule, clip=config.clips_x0)
    x = noise.float()
    if sampler == "dpm-fast":
        yield from _dpm_fast(ev, x, steps)
    elif sampler == "dpm++2m":
        yield from _dpmpp_2m(ev, x, steps)
    elif sampler == "dpm++2m-sde":
        yield from _dpmpp_2m(ev, x, steps, sde=True, generators=generators)
    elif sampler == "ddim":
        yield from _ddim(ev, x, steps, 0.0 if eta is None else eta, generators)
    else:
        yield from _ddim(ev, x, steps, 1.0 if eta is None else eta, generators)


def sample(model: torch.nn.Module, noise: torch.Tensor, labels: torch.Tensor, **kwargs) -> torch.Tensor:
    """The final x of `iterate(model, noise, labels, **kwargs)`."""
    last = None
    for last in iterate(model, noise, labels, **kwargs):  # noqa: B007 - draining the generator is the point
        pass
    assert last is not None
    return last.x


def noise_for_seeds(
    seeds: Sequence[int], shape: tuple[int, ...], device: str | torch.device = "cpu"
) -> tuple[torch.Tensor, list[torch.Generator]]:
    """Starting noise with one generator per image, so a seed gives the same image in any batch.

    Returns the noise (B, *shape) and the generators (advanced past it) for any later noise.
    """
    gens = []
    xs = []
    for s in seeds:
        g = torch.Generator(device="cpu").manual_seed(int(s))
        xs.append(torch.randn(shape, generator=g))
        gens.append(g)
    return torch.stack(xs).to(device), gens


def planned_times(sampler: str, steps: int, schedule: NoiseSchedule) -> list[float]:
    """The time t each solver update of `iterate` reaches, known before the first one: the whole
    planned schedule (one entry per yielded StepState; `dpm-fast` yields fewer updates than `steps`)."""
    if sampler == "dpm-fast":
        grid = torch.linspace(1.0, schedule.t_min, steps + 1)
        outer = grid[torch.cumsum(torch.tensor([0, *_dpm_fast_orders(steps)]), 0)]
        return [float(t) for t in outer[1:]]
    return [float(t) for t in _grid_to_clean(schedule, steps)[1:]]
