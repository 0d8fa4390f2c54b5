"""Coarse-to-fine measures over a sampling trajectory: frequency bands on the model's own grids.

A band is what an image holds at one grid and not at the next coarser one. With P_g the projection
onto images that are constant on g x g cells (average pooling to g, then nearest upsampling back),
and the branch grids g_0 < g_1 < ... < g_{K-1} = S,

    band_0 = P_{g_0} x,     band_j = P_{g_j} x - P_{g_{j-1}} x   (j = 1 .. K-1),

so band 0 is the layout visible at the coarsest grid and the last band the finest detail. The
projections are nested and orthogonal, so the bands are orthogonal and their energies add up to the
image's. A branch's estimate at grid g_k, enlarged to S by nearest upsampling, has no energy above
band k: every estimate and the final image can be compared on one grid, band by band.

Two views: `settling_curves` (per step, how far each band of the current estimate still is from the
final image's band, relative to that band's size) and `addition_bands` (the energy, per band, of what
each finer branch added to the coarser one's estimate).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def band_names(grids: Sequence[int]) -> list[str]:
    """Readable names of the bands of `grids`, e.g. ['8x8 layout', '8-16', '16-32']."""
    names = [f"{grids[0]}x{grids[0]} layout"]
    names += [f"{a}-{b}" for a, b in zip(grids[:-1], grids[1:])]
    return names


def project(x: torch.Tensor, grid: int) -> torch.Tensor:
    """P_grid x: average over grid x grid cells, enlarged back to x's size (nearest). x: (B, C, S, S)."""
    S = x.shape[-1]
    if grid == S:
        return x
    if S % grid:
        raise ValueError(f"grid {grid} does not divide the image size {S}")
    return F.interpolate(F.avg_pool2d(x, S // grid), size=(S, S), mode="nearest")  # (B, C, S, S)


def _check_grids(grids: Sequence[int], size: int) -> list[int]:
    grids = [int(g) for g in grids]
    if not grids or any(b <= a for a, b in zip(grids[:-1], grids[1:])):
        raise ValueError(f"grids must be a non-empty increasing sequence, got {grids}")
    if grids[-1] != size:
        raise ValueError(f"the finest grid must be the image size {size}, got {grids}")
    return grids


def band_split(x: torch.Tensor, grids: Sequence[int]) -> list[torch.Tensor]:
    """The bands of x (B, C, S, S) for increasing `grids` ending at S; they sum to x exactly."""
    grids = _check_grids(grids, x.shape[-1])
    proj = [project(x.float(), g) for g in grids]  # len(grids) x (B, C, S, S)
    return [proj[0]] + [proj[j] - proj[j - 1] for j in range(1, len(proj))]


def band_energy(x: torch.Tensor, grids: Sequence[int]) -> torch.Tensor:
    """Mean square of each band of x (B, C, S, S) over the batch: (len(grids),); sums to mean(x^2)."""
    return torch.stack([b.pow(2).mean() for b in band_split(x, grids)])


def enlarge(x: torch.Tensor, size: int) -> torch.Tensor:
    """A branch's estimate (B, C, g, g) to (B, C, size, size) by nearest upsampling (integer factor)."""
    g = x.shape[-1]
    if size % g:
        raise ValueError(f"estimate size {g} does not divide {size}")
    return x if g == size else F.interpolate(x.float(), size=(size, size), mode="nearest")


def settling_curves(estimates: Sequence[torch.Tensor], final: torch.Tensor, grids: Sequence[int]) -> torch.Tensor:
    """(T, len(grids)): for each step's estimate (B, C, g, g), enlarged to the final image's size, and
    each band j, ||band_j(estimate) - band_j(final)|| / ||band_j(final)|| over the batch.

    0 means the band has reached its final content; 0.1 reads "within 10% of its final value". A band
    that is (nearly) empty in the final image is measured against a thousandth of the image's norm."""
    S = final.shape[-1]
    target = band_split(final.float(), grids)
    floor = 1e-3 * float(final.float().norm()) + 1e-12
    scale = torch.stack([b.pow(2).sum() for b in target]).sqrt().clamp_min(floor)  # (nb,)
    rows = []
    for est in estimates:
        bands = band_split(enlarge(est.float(), S), grids)
        rows.append(torch.stack([(b - t).pow(2).sum() for b, t in zip(bands, target)]).sqrt() / scale)
    return torch.stack(rows) if rows else torch.zeros(0, len(grids))


def settle_index(curve: torch.Tensor, threshold: float = 0.1) -> int | None:
    """The first index from which `curve` (T,) stays at or below `threshold`; None if it never does."""
    above = (curve > threshold).nonzero()
    if above.numel() == 0:
        return 0
    first = int(above[-1]) + 1
    return first if first < curve.numel() else None


def addition_bands(branches: Sequence[torch.Tensor]) -> torch.Tensor:
    """(K - 1, K): the energy (mean square over the batch) of what branch k added, per band.

    Branch k's addition is its estimate minus branch k-1's enlarged to its grid (the "branch k added"
    panel), measured on branch k's grid with the bands of the grids up to it; entries above band k are 0.
    Energy in bands 0..k-1 is where the finer branch disagrees with what the coarser grid could
    already hold; energy in band k is detail the coarser grid cannot hold."""
    grids = [b.shape[-1] for b in branches]
    K = len(branches)
    out = torch.zeros(max(K - 1, 0), K)
    for k in range(1, K):
        added = branches[k].float() - enlarge(branches[k - 1].float(), grids[k])  # (B, C, g_k, g_k)
        out[k - 1, : k + 1] = band_energy(added, grids[: k + 1])
    return out


def new_detail_shares(branches: Sequence[torch.Tensor]) -> list[float]:
    """For each finer branch k, the share of its addition's energy in the band branch k-1's grid
    cannot hold (`addition_bands`): 1 = only new detail, 0 = only changes to the coarser layout."""
    energy = addition_bands(branches)  # (K-1, K)
    return [float(energy[k, k + 1] / energy[k].sum().clamp_min(1e-12)) for k in range(energy.shape[0])]
