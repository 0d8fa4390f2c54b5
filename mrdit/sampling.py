"""Samplers: plain functions with one signature, each a generator that yields its state after every
solver update (k-diffusion's `sample_*`):

    sample_dpmpp_2m(denoise, x, ts, *, generators=None) -> Iterator[StepState]

`denoise` is a `BranchDenoiser`, the guidance closure at continuous time t; `ts` is the time grid, from
`mrdit.schedule`. `SAMPLER_REGISTRY` names them with their grids; `iterate` builds both and runs one:

    for state in iterate(model, noise, labels, sampler="dpm++2m", steps=25, guidance=3.0):
        ...  # state.x, state.x0[k] (branch k's clean estimate at its own resolution), state.nfe
    x = sample(model, noise, labels, sampler="dpm++2m", steps=25, guidance=3.0)

`sample` drains the same generator: there is no second code path. All samplers run in continuous
time t in (0, 1] on the model's noise schedule, from t = 1 down a grid uniform in t, with `steps`
network evaluations.

- `dpm-fast`: the release's sampler, DPM-Solver++ singlestep with orders 3/2/1 mixed (Lu et al. 2022),
  ending at t = 1/N with no extra denoising step.
- `dpm++2m`: multistep DPM-Solver++ (2nd order), one evaluation per step, last step to the clean end.
- `dpm++2m-sde`: the stochastic counterpart of `dpm++2m` (DPM-Solver++(2M) for the reverse SDE, Lu et
  al. 2022b): each step is the DDPM posterior step plus a second-order correction from the previous
  prediction, so it injects fresh noise like `ddpm` but needs far fewer steps. Its `eta` (default 1)
  scales the noise it injects: 0 is `dpm++2m`.
- `ddim` (deterministic with eta = 0) and `ddpm` (ancestral, i.e. DDIM with eta = 1).

Pixel-space models clamp clean-image estimates to [-1, 1] (config `clip_x0`), as DDPM did: near t = 1
the estimate divides by a tiny alpha. Latent models (and the parity runs) never clip.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from .guidance import (
    GUIDANCE_REGISTRY,
    GUIDANCE_SCHEDULES,
    Denoiser,
    guidance_weight_fn,
    guided_denoiser,
    rowwise_guided_denoiser,
)
from .interventions import BranchGuidance, Intervention, InterventionDenoiser, check_intervention
from .schedule import NoiseSchedule, dpm_fast_orders, dpm_fast_update_times, uniform_grid, uniform_grid_to_clean

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


@dataclass(frozen=True)
class Prediction:
    """One network evaluation at time `t`: each branch's (guided) noise prediction and clean estimate,
    coarse to fine."""

    t: float
    eps: list[torch.Tensor]
    x0: list[torch.Tensor]

    @property
    def data(self) -> torch.Tensor:
        """The finest branch's clean estimate: the data prediction D the solvers step with."""
        return self.x0[-1]


@dataclass(frozen=True)
class BranchDenoiser:
    """The `denoise` argument of every sampler: (x, t) -> Prediction at continuous time t, from the
    guidance closure `eps` (x, n) -> per-branch noise predictions at DDPM step n = N t. Estimates are
    clamped to [-1, 1] when `clip` (pixel-space models). It keeps no state; samplers count evaluations."""

    eps: Denoiser
    schedule: NoiseSchedule
    clip: bool = False

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> Prediction:
        alpha, sigma = float(self.schedule.alpha(t)), float(self.schedule.sigma(t))
        eps = [e.float() for e in self.eps(x, self.schedule.network_step(t))]
        x0 = [branch_estimate(x, e, alpha, sigma) for e in eps]
        if self.clip:
            x0 = [v.clamp(-1, 1) for v in x0]
        return Prediction(float(t), eps, x0)


def step_state(
    schedule: NoiseSchedule, index: int, total: int, x: torch.Tensor, t: torch.Tensor, p: Prediction, nfe: int
) -> StepState:
    """The state after update `index` of `total`: x at time t, with the prediction `p` just made."""
    return StepState(
        index=index,
        total=total,
        t=float(t),
        alpha=float(schedule.alpha(t)),
        sigma=float(schedule.sigma(t)),
        log_snr=float(schedule.log_snr(t)),
        x=x,
        eps=p.eps,
        x0=p.x0,
        eval_t=p.t,
        nfe=nfe,
    )


Generators = Sequence[torch.Generator] | None


def sample_dpm_fast(
    denoise: BranchDenoiser, x: torch.Tensor, ts: torch.Tensor, *, generators: Generators = None
) -> Iterator[StepState]:
    """The release's sampler: singlestep DPM-Solver++ (Lu et al. 2022) with orders 3/2/1 mixed, one
    network evaluation per interval of `ts` (`uniform_grid`: ending at t = 1/N, with no extra denoising
    step), an update of order m spanning m intervals (`dpm_fast_orders`). Deterministic: `generators`
    is unused."""
    ns = denoise.schedule
    orders = dpm_fast_orders(len(ts) - 1)
    outer = dpm_fast_update_times(ts)
    nfe = 0
    for i, m in enumerate(orders):
        s, t = outer[i], outer[i + 1]
        lam = ns.log_snr(torch.linspace(float(s), float(t), m + 1))  # lambda at the m + 1 inner points
        h = lam[-1] - lam[0]
        alpha_t, sigma_s, sigma_t = ns.alpha(t), ns.sigma(s), ns.sigma(t)
        phi_1 = torch.expm1(-h)
        p = denoise(x, s)
        d_s = p.data
        if m == 1:  # x_t = (sigma_t / sigma_s) x - alpha_t phi_1 D(s)
            x = (sigma_t / sigma_s) * x - alpha_t * phi_1 * d_s
        else:
            r1 = (lam[1] - lam[0]) / h
            s1 = ns.inverse_log_snr(lam[0] + r1 * h)
            u1 = (ns.sigma(s1) / sigma_s) * x - ns.alpha(s1) * torch.expm1(-r1 * h) * d_s
            p = denoise(u1, s1)
            d_s1 = p.data
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
                p = denoise(u2, s2)
                d_s2 = p.data
                phi_2 = phi_1 / h + 1
                x = (sigma_t / sigma_s) * x - alpha_t * phi_1 * d_s + (1.0 / r2) * alpha_t * phi_2 * (d_s2 - d_s)
        nfe += m
        yield step_state(ns, i, len(orders), x, t, p, nfe)


def _dpmpp_2m(
    denoise: BranchDenoiser,
    x: torch.Tensor,
    ts: torch.Tensor,
    eta: float,
    generators: Generators,
    ode_below: float = 0.0,
    second_order_end: bool = False,
) -> Iterator[StepState]:
    """Multistep DPM-Solver++(2M) in data prediction D, for the ODE (`eta` = 0) or the reverse SDE. With
    h = lambda_t - lambda_s and D_2 = D_s + (h / 2) (D_s - D_prev) / h_prev, the data prediction at the
    middle of the step extrapolated linearly in lambda from the two latest evaluations:

        ODE: x_t = (sigma_t / sigma_s) x_s + alpha_t (1 - e^-h) D_2                    (Lu et al. 2022b, Alg. 2)
        SDE: x_t = (sigma_t / sigma_s) e^-(eta h) x_s + alpha_t (1 - e^-((1 + eta) h)) D_2
                   + sigma_t sqrt(1 - e^-(2 eta h)) z

    `eta` sets the fresh noise: 1 is the SDE of Lu et al. (whose update with D_s in place of D_2 is
    DDPM's posterior step), 0 the ODE, and values between inject less noise per step. The first step
    is first order, and for eta > 0 so is the step to t = 1/N: on a grid uniform in t its lambda-step
    is several times the one before, and extrapolating D, which carries the injected noise, that far
    inflates the final noise (docs/experiments.md, Samplers and guidance). The last step lands on D
    (sigma = 0).

    Two variants of the SDE's tail, for measurement (docs/evaluation.md): steps that start at
    s <= `ode_below` take the ODE update (no fresh noise, and second order to t = 1/N), and
    `second_order_end` keeps the step to t = 1/N second order with the noise."""
    ns = denoise.schedule
    steps = len(ts) - 1
    d_prev, h_prev = None, None
    for i in range(steps):
        s, t = ts[i], ts[i + 1]
        sde = eta > 0 and float(s) > ode_below
        p = denoise(x, s)
        d = p.data
        if float(t) == 0.0:
            x = d  # sigma_t = 0: the first-order update lands on the data prediction exactly
        else:
            h = ns.log_snr(t) - ns.log_snr(s)
            d_use = d
            if d_prev is not None and not (sde and i == steps - 2 and not second_order_end):
                r = h_prev / h
                d_use = (1 + 1 / (2 * r)) * d - (1 / (2 * r)) * d_prev
            if sde:
                signal = -torch.expm1(-(1 + eta) * h)  # 1 - e^-((1 + eta) h)
                fresh = -torch.expm1(-2 * eta * h)  # 1 - e^-(2 eta h)
                x = (ns.sigma(t) / ns.sigma(s)) * torch.exp(-eta * h) * x + ns.alpha(t) * signal * d_use
                x = x + ns.sigma(t) * torch.sqrt(fresh) * _noise_like(x, generators)
            else:
                x = (ns.sigma(t) / ns.sigma(s)) * x - ns.alpha(t) * torch.expm1(-h) * d_use
            h_prev = h
        d_prev = d
        yield step_state(ns, i, steps, x, t, p, i + 1)


def sample_dpmpp_2m(
    denoise: BranchDenoiser, x: torch.Tensor, ts: torch.Tensor, *, generators: Generators = None
) -> Iterator[StepState]:
    """Multistep DPM-Solver++(2M) for the ODE (Lu et al. 2022b, Alg. 2), one evaluation per interval of
    `ts` (`uniform_grid_to_clean`), the last step to the clean end. Deterministic: `generators` is unused."""
    yield from _dpmpp_2m(denoise, x, ts, eta=0.0, generators=None)


def sample_dpmpp_2m_sde(
    denoise: BranchDenoiser,
    x: torch.Tensor,
    ts: torch.Tensor,
    *,
    generators: Generators = None,
    eta: float = 1.0,
    ode_below: float = 0.0,
    second_order_end: bool = False,
) -> Iterator[StepState]:
    """DPM-Solver++(2M) for the reverse SDE (Lu et al. 2022b): each step is the DDPM posterior step plus
    a second-order correction from the previous prediction, so it injects fresh noise like `ddpm` (from
    `generators`, one per image) but needs far fewer steps. `eta` < 1 injects less noise per step (0 is
    `dpm++2m`). `ode_below` (in [0, 1]) makes the steps that start at t <= it deterministic, and
    `second_order_end` keeps the step to t = 1/N second order; the defaults are the sampler as shipped."""
    if not (math.isfinite(eta) and eta >= 0):
        raise ValueError(f"eta must be a finite number >= 0, got {eta!r}")
    if not (math.isfinite(ode_below) and 0.0 <= ode_below <= 1.0):
        raise ValueError(f"ode_below must be a number in [0, 1], got {ode_below!r}")
    yield from _dpmpp_2m(
        denoise, x, ts, eta=float(eta), generators=generators, ode_below=float(ode_below),
        second_order_end=bool(second_order_end),
    )


def sample_ddim(
    denoise: BranchDenoiser, x: torch.Tensor, ts: torch.Tensor, *, generators: Generators = None, eta: float = 0.0
) -> Iterator[StepState]:
    """DDIM (Song et al. 2021) with stochasticity eta, one evaluation per interval of `ts`
    (`uniform_grid_to_clean`); eta = 1 is ancestral DDPM sampling. Fresh noise comes from `generators`."""
    ns = denoise.schedule
    steps = len(ts) - 1
    for i in range(steps):
        s, t = ts[i], ts[i + 1]
        p = denoise(x, s)
        x0 = p.data
        a_s, s_s, a_t = ns.alpha(s), ns.sigma(s), ns.alpha(t)
        eps = (x - a_s * x0) / s_s  # the eps consistent with the data prediction
        abar_s, abar_t = a_s**2, a_t**2
        noise_std = (
            eta * torch.sqrt(((1 - abar_t) / (1 - abar_s)) * (1 - abar_s / abar_t)) if float(t) > 0 else torch.zeros(())
        )
        x = a_t * x0 + torch.sqrt((1 - abar_t - noise_std**2).clamp(min=0)) * eps
        if float(noise_std) > 0:
            x = x + noise_std * _noise_like(x, generators)
        yield step_state(ns, i, steps, x, t, p, i + 1)


def _noise_like(x: torch.Tensor, generators: Generators) -> torch.Tensor:
    if generators is None:
        return torch.randn_like(x)
    return torch.stack([torch.randn(x.shape[1:], generator=g, device=g.device) for g in generators]).to(x)


def _every_time(ts: torch.Tensor) -> torch.Tensor:
    return ts  # one update per interval of the grid


Sampler = Callable[..., Iterator[StepState]]  # (denoise, x, ts, *, generators=None[, eta]) -> states


@dataclass(frozen=True)
class SamplerSpec:
    """A sampler in the registry: its function, the grid `ts` it steps on (`steps` evaluations), whether
    it draws fresh noise by default, and, for the samplers that take DDIM's `eta`, its default."""

    fn: Sampler
    grid: Callable[[NoiseSchedule, int], torch.Tensor]
    stochastic: bool
    eta: float | None = None
    update_times: Callable[[torch.Tensor], torch.Tensor] = _every_time  # ts -> the times the updates reach


SAMPLER_REGISTRY: dict[str, SamplerSpec] = {
    "dpm-fast": SamplerSpec(sample_dpm_fast, uniform_grid, stochastic=False, update_times=dpm_fast_update_times),
    "dpm++2m": SamplerSpec(sample_dpmpp_2m, uniform_grid_to_clean, stochastic=False),
    "dpm++2m-sde": SamplerSpec(sample_dpmpp_2m_sde, uniform_grid_to_clean, stochastic=True, eta=1.0),
    "ddim": SamplerSpec(sample_ddim, uniform_grid_to_clean, stochastic=False, eta=0.0),
    "ddpm": SamplerSpec(sample_ddim, uniform_grid_to_clean, stochastic=True, eta=1.0),
}
SAMPLERS = tuple(SAMPLER_REGISTRY)


def _number(v: object) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


@dataclass(frozen=True)
class SamplerSettings:
    """How to sample: the solver, its number of network evaluations and the guidance, checked on
    construction with messages that name the field. `iterate` checks its keyword arguments through it.

    `guidance` is w in eps_u + w (eps_c - eps_u) (1 = none; the release's "0.4" is 1.4); with
    `guidance_schedule="power-cosine"` w rises from 1 to `guidance` with power `guidance_power`. `eta`
    is DDIM's stochasticity, for the samplers that take it (None: the sampler's default)."""

    sampler: str
    steps: int
    guidance: float = 1.0
    guidance_schedule: str = "constant"
    guidance_power: float = 1.0
    eta: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.sampler, str) or self.sampler not in SAMPLER_REGISTRY:
            raise ValueError(f"sampler must be one of {', '.join(SAMPLER_REGISTRY)}, got {self.sampler!r}")
        steps = self.steps
        if isinstance(steps, float) and steps.is_integer():
            steps = int(steps)
        if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or not 1 <= steps <= MAX_STEPS:
            raise ValueError(f"steps must be an integer in [1, {MAX_STEPS}], got {self.steps!r}")
        object.__setattr__(self, "steps", int(steps))
        for name in ("guidance", "guidance_power"):
            v = getattr(self, name)
            if not _number(v) or not math.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
            object.__setattr__(self, name, float(v))
        if not isinstance(self.guidance_schedule, str) or self.guidance_schedule not in GUIDANCE_REGISTRY:
            raise ValueError(
                f"guidance_schedule must be one of {', '.join(GUIDANCE_SCHEDULES)}, got {self.guidance_schedule!r}"
            )
        if self.eta is not None:
            takes = [name for name, spec in SAMPLER_REGISTRY.items() if spec.eta is not None]
            if self.sampler not in takes or not _number(self.eta) or not math.isfinite(self.eta) or self.eta < 0:
                raise ValueError(
                    f"eta applies to {', '.join(takes[:-1])} and {takes[-1]} only, as a finite number >= 0; "
                    f"got eta={self.eta!r} with {self.sampler}"
                )
            object.__setattr__(self, "eta", float(self.eta))


def _denoiser(
    model: torch.nn.Module, labels: torch.Tensor, opts: SamplerSettings, intervention: Intervention | None
) -> BranchDenoiser:
    """The guidance closure for one run (with the intervention, if any) as a sampler's `denoise`."""
    config = model.config
    schedule = NoiseSchedule(config.schedule)
    weight = guidance_weight_fn(opts.guidance, opts.guidance_schedule, opts.guidance_power, schedule.N)
    if intervention is None:
        eps: Denoiser = guided_denoiser(model, labels, weight, config.null_label)
    else:
        check_intervention(intervention, model, labels.shape[0], opts.steps)  # steps = evaluations
        if opts.guidance_schedule != "constant" and isinstance(intervention, BranchGuidance):
            raise ValueError("guidance_schedule must be 'constant' with BranchGuidance (its weights replace guidance)")
        eps = InterventionDenoiser(model, labels, weight, config.null_label, intervention, opts.guidance != 1.0)
    return BranchDenoiser(eps, schedule, clip=config.clamps_estimates)


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

    The settings are those of `SamplerSettings` (`eta`: default 0 for `ddim`, 1 for `ddpm` and `dpm++2m-sde`;
    the other samplers refuse it). `generators` (one per image) drive the fresh noise of stochastic samplers.
    `intervention` (see `mrdit.interventions`; DiMR networks only, not a compiled wrapper) edits the
    branch hand-offs; `BranchGuidance` replaces `guidance` and needs the constant schedule.
    """
    opts = SamplerSettings(sampler, steps, guidance, guidance_schedule, guidance_power, eta)
    if labels.shape != (noise.shape[0],):
        raise ValueError(f"labels must have shape ({noise.shape[0]},), got {tuple(labels.shape)}")
    yield from _run(_denoiser(model, labels, opts, intervention), noise, opts, generators)


def _run(denoise: BranchDenoiser, noise: torch.Tensor, opts: SamplerSettings, generators: Generators) -> Iterator[StepState]:
    """The registry's sampler for `opts`, on its grid, from `noise`."""
    spec = SAMPLER_REGISTRY[opts.sampler]
    options = {} if spec.eta is None else {"eta": spec.eta if opts.eta is None else opts.eta}
    ts = spec.grid(denoise.schedule, opts.steps)
    yield from spec.fn(denoise, noise.float(), ts, generators=generators, **options)


def iterate_rows(
    model: torch.nn.Module,
    noise: torch.Tensor,
    labels: torch.Tensor,
    opts: SamplerSettings,
    guidance: Sequence[float],
    generators: Sequence[torch.Generator] | None = None,
) -> Iterator[StepState]:
    """`iterate` for a batch whose images share `opts` but each have their own guidance weight (from
    requests batched together, `mrdit.batching`): every row is what `iterate` gives it alone."""
    if labels.shape != (noise.shape[0],) or len(guidance) != noise.shape[0]:
        raise ValueError(f"need one label and one guidance weight per image ({noise.shape[0]})")
    schedule = NoiseSchedule(model.config.schedule)
    rows = [replace(opts, guidance=w) for w in guidance]  # each weight checked as `guidance` is
    weights = [guidance_weight_fn(r.guidance, r.guidance_schedule, r.guidance_power, schedule.N) for r in rows]
    eps = rowwise_guided_denoiser(model, labels, weights, model.config.null_label)
    yield from _run(BranchDenoiser(eps, schedule, clip=model.config.clamps_estimates), noise, opts, generators)


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
    spec = SAMPLER_REGISTRY[sampler]
    return [float(t) for t in spec.update_times(spec.grid(schedule, steps))[1:]]
