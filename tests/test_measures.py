"""The coarse-to-fine measure on inputs whose answer is known."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mrdit.measures import (
    addition_bands,
    band_energy,
    band_names,
    band_split,
    enlarge,
    new_detail_shares,
    settle_index,
    settling_curves,
)

GRIDS = [8, 16, 32]


def blocky(grid: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Random content constant on cells of a `grid` x `grid` image, enlarged to `size`."""
    g = torch.Generator().manual_seed(seed)
    return enlarge(torch.randn(2, 3, grid, grid, generator=g), size)


def test_bands_sum_to_the_image_are_orthogonal_and_their_energies_add_up():
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    bands = band_split(x, GRIDS)
    assert torch.allclose(sum(bands), x, atol=1e-6)
    for i in range(3):
        for j in range(i + 1, 3):
            assert abs(float((bands[i] * bands[j]).sum())) < 1e-3
    assert torch.allclose(band_energy(x, GRIDS).sum(), x.pow(2).mean(), rtol=1e-5)


def test_each_band_holds_only_what_its_grid_adds():
    assert band_energy(blocky(8), GRIDS)[1:].abs().max() < 1e-10  # layout only
    detail = blocky(16) - enlarge(F.avg_pool2d(blocky(16), 4), 32)  # 16x16 content with zero 8x8 means
    e = band_energy(detail, GRIDS)
    assert e[0] < 1e-10 and e[2] < 1e-10 and e[1] > 0.1
    checker = (torch.arange(32)[:, None] + torch.arange(32)[None]).remainder(2).float().expand(1, 3, 32, 32) * 2 - 1
    e = band_energy(checker, GRIDS)
    assert e[:2].abs().max() < 1e-10 and abs(float(e[2]) - 1.0) < 1e-6
    assert band_names(GRIDS) == ["8x8 layout", "8-16", "16-32"]


def test_settling_finds_the_step_where_a_late_band_arrives():
    """An image whose layout is right from the start and whose finest detail only arrives at step 7."""
    low = blocky(8, seed=2)
    high = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    high = high - enlarge(F.avg_pool2d(high, 2), 32)  # only the 16-32 band
    final = low + high
    steps = [low + (i >= 7) * high for i in range(10)]
    curves = settling_curves(steps, final, GRIDS)  # (10, 3)
    assert curves.shape == (10, 3)
    assert curves[:, 0].abs().max() < 1e-6 and curves[:, 1].abs().max() < 1e-3  # the 8-16 band is empty in both
    assert torch.allclose(curves[:7, 2], torch.ones(7)) and curves[7:, 2].abs().max() < 1e-6
    assert settle_index(curves[:, 0]) == 0 and settle_index(curves[:, 2]) == 7


def test_settle_index_needs_the_curve_to_stay_below():
    assert settle_index(torch.tensor([1.0, 0.05, 0.3, 0.08, 0.01])) == 3
    assert settle_index(torch.tensor([1.0, 0.5])) is None
    assert settle_index(torch.tensor([0.2, 0.15]), threshold=0.2) == 0


def test_coarse_estimates_are_compared_on_the_final_grid():
    final = blocky(8, seed=4) + blocky(32, seed=5) * 0.1
    coarse = F.avg_pool2d(final, 4)  # an 8x8 estimate that already has the final layout
    curves = settling_curves([coarse], final, GRIDS)
    assert curves[0, 0] < 1e-6 and abs(float(curves[0, 2]) - 1.0) < 1e-6  # no detail yet: a full band away


def test_addition_bands_separate_new_detail_from_corrections():
    coarse = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(6))
    detail = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(7))
    detail = detail - enlarge(F.avg_pool2d(detail, 2), 16)  # nothing the 8x8 grid can hold
    fine_new = enlarge(coarse, 16) + detail
    fine_fix = enlarge(coarse + 0.5, 16)  # only shifts the layout
    e_new = addition_bands([coarse, fine_new])
    e_fix = addition_bands([coarse, fine_fix])
    assert e_new.shape == (1, 2)
    assert e_new[0, 0] < 1e-10 and e_new[0, 1] > 0.1
    assert abs(float(e_fix[0, 0]) - 0.25) < 1e-6 and e_fix[0, 1] < 1e-10
    three = addition_bands([coarse, fine_new, enlarge(fine_new, 32)])
    assert three.shape == (2, 3) and three[1].abs().max() < 1e-10  # branch 2 added nothing


def test_bad_grids_are_refused():
    x = torch.zeros(1, 3, 32, 32)
    for grids in ([], [16, 8, 32], [8, 16]):
        with pytest.raises(ValueError):
            band_split(x, grids)
    with pytest.raises(ValueError):
        band_split(x, [12, 32])


def test_new_detail_shares_read_the_addition_bands():
    coarse = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(8))
    detail = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(9))
    detail = detail - enlarge(F.avg_pool2d(detail, 2), 16)
    assert new_detail_shares([coarse, enlarge(coarse, 16) + detail]) == pytest.approx([1.0])
    assert new_detail_shares([coarse, enlarge(coarse + 0.5, 16)]) == pytest.approx([0.0], abs=1e-9)
