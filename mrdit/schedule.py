"""Noise schedules: a discrete DDPM schedule (N steps) and its continuous-time extension.

Training uses the discrete form: x_n = sqrt(abar_n) x0 + sqrt(1 - abar_n) eps, n in {1..N}.
Sampling uses continuous time t in (0, 1] (t = n / N) exactly as DPM-Solver's "discrete" VP schedule
does: log alpha is piecewise linear in t over the grid t_n = n / N (float32, as released), and
lambda = log(alpha / sigma) is inverted by interpolating t against the log-alpha table.
"""

from __future__ import annotations

import math

import torch

from .config import ScheduleConfig


def betas_for(config: ScheduleConfig) -> torch.Tensor:
    """The N betas of a schedule, float64, with its signal-to-noise ratio scaled by `snr_scale`."""
    betas = base_betas(config)
    if config.snr_scale == 1:
        return betas
    k = config.snr_scale
    abar = torch.cumprod(1 - betas, dim=0)
    shifted = k * abar / (1 + (k - 1) * abar)  # abar' / (1 - abar') = k abar / (1 - abar)
    return 1 - shifted / torch.cat([shifted.new_ones(1), shifted[:-1]])


def base_betas(config: ScheduleConfig) -> torch.Tensor:
    """The N betas of the schedule's kind, float64, before any `snr_scale`."""
    N = config.num_steps
    if config.kind == "scaled-linear":  # Stable Diffusion: linear in sqrt(beta)
        return torch.linspace(math.sqrt(config.beta_start), math.sqrt(config.beta_end), N, dtype=torch.float64) ** 2
    if config.kind == "linear":  # DDPM
        return torch.linspace(config.beta_start, config.beta_end, N, dtype=torch.float64)
    # Nichol & Dhariwal (2021) cosine alpha-bar, discretised; betas capped at 0.999.
    s = 0.008
    f = lambda u: math.cos((u + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    return torch.tensor([min(1 - f(n / N) / f((n - 1) / N), 0.999) for n in range(1, N + 1)], dtype=torch.float64)


def alphas_cumprod(config: ScheduleConfig) -> torch.Tensor:
    """abar_n = prod_{i <= n} (1 - beta_i) for n = 1..N (index n - 1), float64."""
    return torch.cumprod(1 - betas_for(config), dim=0)


def interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear interpolation of fp(xp) at x (xp increasing), extrapolating the end segments."""
    idx = torch.searchsorted(xp, x.contiguous()).clamp(1, xp.numel() - 1)
    x0, x1 = xp[idx - 1], xp[idx]
    y0, y1 = fp[idx - 1], fp[idx]
    return y0 + (x - x0) * (y1 - y0) / (x1 - x0)


class NoiseSchedule:
    """Continuous-time view of a discrete schedule: alpha(t), sigma(t), lambda(t) and its inverse.

    The clean end, t = 0, is special-cased (alpha = 1, sigma = 0, lambda = +inf) so that samplers can
    finish on the data exactly.
    """

    def __init__(self, config: ScheduleConfig) -> None:
        self.config = config
        self.N = config.num_steps
        betas = betas_for(config).float()
        self.t_grid = torch.linspace(0.0, 1.0, self.N + 1)[1:]  # (N,) t_n = n / N, float32
        self.log_alpha_grid = 0.5 * torch.log(1 - betas).cumsum(0)  # (N,) float32, decreasing
        self.abar = alphas_cumprod(config)  # (N,) float64 for training

    @property
    def t_min(self) -> float:
        return 1.0 / self.N

    def log_alpha(self, t: torch.Tensor) -> torch.Tensor:
        return interp(t.float().reshape(-1), self.t_grid, self.log_alpha_grid).reshape(t.shape)

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        return torch.where(t == 0, torch.ones_like(t, dtype=torch.float32), torch.exp(self.log_alpha(t)))

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        s = torch.sqrt(1.0 - torch.exp(2.0 * self.log_alpha(t)))
        return torch.where(t == 0, torch.zeros_like(s), s)

    def log_snr(self, t: torch.Tensor) -> torch.Tensor:
        """lambda(t) = log(alpha / sigma) (half the log signal-to-noise ratio)."""
        la = self.log_alpha(t)
        lam = la - 0.5 * torch.log(1.0 - torch.exp(2.0 * la))
        return torch.where(t == 0, torch.full_like(lam, math.inf), lam)

    def inverse_log_snr(self, lam: torch.Tensor) -> torch.Tensor:
        """t such that lambda(t) = lam, through the log-alpha table (as DPM-Solver does)."""
        la = -0.5 * torch.logaddexp(torch.zeros_like(lam), -2.0 * lam)
        t = interp(la.float().reshape(-1), self.log_alpha_grid.flip(0), self.t_grid.flip(0))
        return t.reshape(lam.shape)

    def network_step(self, t: torch.Tensor) -> torch.Tensor:
        """The DDPM step the network is conditioned on at continuous time t: n = N t."""
        return t * self.N

    def discrete_coefficients(self, n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """sqrt(abar_n), sqrt(1 - abar_n) for integer steps n in {1..N} (float32)."""
        abar = self.abar.to(n.device)[n.long() - 1]
        return abar.sqrt().float(), (1 - abar).sqrt().float()


def uniform_grid(schedule: NoiseSchedule, steps: int) -> torch.Tensor:
    """`steps` + 1 times uniform in t from 1 down to 1/N: the release's grid for `dpm-fast`."""
    return torch.linspace(1.0, schedule.t_min, steps + 1)


def uniform_grid_to_clean(schedule: NoiseSchedule, steps: int) -> torch.Tensor:
    """`steps` evaluation times uniform in t from 1 down to 1/N, then the clean end t = 0."""
    return torch.cat([torch.linspace(1.0, schedule.t_min, steps), torch.zeros(1)])


def dpm_fast_orders(steps: int) -> list[int]:
    """Orders of the release's singlestep "fast" DPM-Solver++ for `steps` evaluations (they sum to
    `steps`): as many third-order updates as fit, then a second- and/or first-order one."""
    K = steps // 3 + 1
    if steps % 3 == 0:
        return [3] * (K - 2) + [2, 1]
    if steps % 3 == 1:
        return [3] * (K - 1) + [1]
    return [3] * (K - 1) + [2]


def dpm_fast_update_times(ts: torch.Tensor) -> torch.Tensor:
    """The times of `uniform_grid` that `dpm-fast`'s updates start and end on: an update of order m
    spans m intervals of the grid."""
    orders = dpm_fast_orders(len(ts) - 1)
    return ts[torch.cumsum(torch.tensor([0, *orders]), 0)]
