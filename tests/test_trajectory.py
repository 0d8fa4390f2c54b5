"""Trajectories within a byte budget, and bundles: round trip, reproducible bytes, hostile files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save as save_bytes

from mrdit.trajectory import (
    BUNDLE_FORMAT,
    MAX_BUNDLE_BYTES,
    BundleError,
    Frame,
    Trajectory,
    from_bytes,
    kept_indices,
    load_bundle,
    save_bundle,
    to_bytes,
)


def frame(step: int, B: int = 2, seed: int = 0) -> Frame:
    g = torch.Generator().manual_seed(seed * 1000 + step)
    r = lambda *s: (torch.rand(*s, generator=g) * 2 - 1).half()  # noqa: E731
    return Frame(step=step, t=1 - step / 10, log_snr=float(step), nfe=step, x_t=r(B, 3, 16, 16),
                 branches=[r(B, 3, 4, 4), r(B, 3, 8, 8), r(B, 3, 16, 16)], x=r(B, 3, 16, 16))


def run(total: int, budget: int, B: int = 2, seed: int = 0) -> Trajectory:
    traj = Trajectory(total=total, budget_bytes=budget, planned_t=[1 - (i + 1) / total for i in range(total)],
                      planned_log_snr=[float(i) for i in range(total - 1)] + [float("inf")],
                      meta={"model": "tiny", "settings": {"seeds": [1, 2]}, "headers": ["x_t", "b0", "b1", "b2"]})
    for i in range(total):
        traj.add(i, frame(i + 1, B, seed))
    traj.final = np.full((B, 16, 16, 3), 7, dtype=np.uint8)
    return traj


def test_kept_steps_are_evenly_spaced_and_hold_the_ends():
    assert kept_indices(5, 10) == [0, 1, 2, 3, 4]
    k = kept_indices(1000, 50)
    assert k[0] == 0 and k[-1] == 999 and len(k) == 50
    gaps = np.diff(k)
    assert gaps.max() - gaps.min() <= 1


def test_a_thousand_steps_stay_within_the_budget_and_end_at_the_last_step():
    size = frame(1).nbytes
    traj = run(1000, budget=100 * size)
    assert traj.nbytes <= 100 * size and len(traj.frames) == 100
    assert traj.frames[0].step == 1 and traj.frames[-1].step == 1000
    assert traj.position(1000) == len(traj.frames) - 1 and traj.frames[traj.position(500)].step <= 500
    small = run(8, budget=100 * size)
    assert [f.step for f in small.frames] == list(range(1, 9))


def test_bundle_round_trip_and_reproducible_bytes(tmp_path):
    traj = run(12, budget=5 * frame(1).nbytes)
    data = to_bytes(traj)
    assert data == to_bytes(run(12, budget=5 * frame(1).nbytes))  # same content, same bytes
    back = from_bytes(data)
    assert [f.step for f in back.frames] == [f.step for f in traj.frames] and back.total == 12
    for a, b in zip(back.frames, traj.frames):
        assert torch.equal(a.x_t, b.x_t) and torch.equal(a.x, b.x)
        assert all(torch.equal(p, q) for p, q in zip(a.branches, b.branches))
    assert back.meta == traj.meta and (back.final == traj.final).all()
    assert back.planned_log_snr[-1] == float("inf") and back.planned_t == pytest.approx(traj.planned_t)
    path = save_bundle(traj, tmp_path / "run.safetensors")
    assert load_bundle(path).frames[-1].step == 12
    assert [p.name for p in tmp_path.iterdir()] == ["run.safetensors"]  # no temporary file left
    other = run(12, budget=5 * frame(1).nbytes, seed=1)
    assert to_bytes(other) != data


def test_unfinished_runs_cannot_be_exported():
    traj = run(3, budget=10**9)
    traj.final = None
    with pytest.raises(BundleError, match="finished"):
        to_bytes(traj)


def _tensors(data: bytes) -> tuple[dict, dict]:
    from safetensors.torch import load

    n = int.from_bytes(data[:8], "little")
    return load(data), json.loads(data[8 : 8 + n])["__metadata__"]


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t, m: t.pop("x_t"), "missing 'x_t'"),
        (lambda t, m: t.update(x_t=t["x_t"].float()), "float16"),
        (lambda t, m: t.update(x_t=t["x_t"][:, :1].contiguous()), "must be"),
        (lambda t, m: t.update(branch_1=t["branch_1"][:2].contiguous()), "must be"),
        (lambda t, m: t.update(x=t["x"].clone().fill_(float("nan"))), "non-finite"),
        (lambda t, m: t.update(step=t["step"].flip(0).contiguous()), "increase"),
        (lambda t, m: t.update(final=t["final"][:1].contiguous()), "final"),
        (lambda t, m: t.update(planned_t=t["planned_t"][:3].contiguous()), "planned"),
        (lambda t, m: t.update(nfe=t["nfe"][:1].contiguous()), "one entry"),
        (lambda t, m: m.update({BUNDLE_FORMAT: json.dumps({"format": BUNDLE_FORMAT, "version": 99})}), "version"),
        (lambda t, m: m.update({BUNDLE_FORMAT: "not json"}), "header"),
        (lambda t, m: m.clear(), "header"),
    ],
)
def test_inconsistent_bundles_are_refused_with_a_message(edit, message):
    tensors, meta = _tensors(to_bytes(run(6, budget=10**9)))
    edit(tensors, meta)
    with pytest.raises(BundleError, match=message):
        from_bytes(save_bytes(tensors, metadata=meta or None))


def test_hostile_files_are_refused(tmp_path):
    data = to_bytes(run(6, budget=10**9))
    for bad in (b"", b"\x00" * 4, data[: len(data) // 2], b"\xff" * 64, (10**12).to_bytes(8, "little") + b"{}"):
        with pytest.raises(BundleError):
            from_bytes(bad)
    pickled = tmp_path / "evil.safetensors"
    torch.save({"x": torch.zeros(2)}, pickled)  # a pickle renamed: never unpickled
    with pytest.raises(BundleError):
        load_bundle(pickled)
    wrong = tmp_path / "run.pt"
    wrong.write_bytes(data)
    with pytest.raises(BundleError, match="safetensors"):
        load_bundle(wrong)
    big = tmp_path / "big.safetensors"
    with open(big, "wb") as f:
        f.truncate(MAX_BUNDLE_BYTES + 1)
    with pytest.raises(BundleError, match="limit"):
        load_bundle(big)
    with pytest.raises(BundleError):
        load_bundle(tmp_path / "missing.safetensors")


@pytest.mark.parametrize("steps", [1, 4, 7])
def test_the_planned_schedule_is_the_one_the_samplers_take(steps):
    from mrdit import build_model, get_preset
    from mrdit.sampling import SAMPLERS, iterate, planned_times
    from mrdit.schedule import NoiseSchedule

    torch.manual_seed(0)
    model = build_model(get_preset("tiny")).eval()
    c = model.config
    for sampler in SAMPLERS:
        noise = torch.randn(1, c.channels, c.image_size, c.image_size)
        taken = [s.t for s in iterate(model, noise, torch.tensor([0]), sampler=sampler, steps=steps)]
        assert taken == planned_times(sampler, steps, NoiseSchedule(c.schedule)), sampler
