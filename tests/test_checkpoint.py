"""Model directories: round trips, storage dtypes, shards, the Hub path, and clear errors for bad files."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import mrdit.checkpoint as ckpt
from mrdit import CheckpointError, build_model, get_preset, load_model, save_model
from mrdit.convert import convert
from mrdit.convert import main as convert_main


def _inputs(cfg, B=2):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, cfg.channels, cfg.image_size, cfg.image_size, generator=g)
    return x, torch.tensor([10.0, 900.0][:B]), torch.tensor([0, 1][:B])


def _copy(src, tmp_path, name="m"):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def test_round_trip_identical_outputs(tiny_model_dir):
    m1 = load_model(tiny_model_dir)
    x, t, y = _inputs(m1.config)
    m2 = load_model(tiny_model_dir)
    with torch.no_grad():
        for a, b in zip(m1(x, t, y), m2(x, t, y), strict=True):
            assert torch.equal(a, b)


def test_config_json_has_tool_readable_fields(tiny_model_dir):
    d = json.loads((tiny_model_dir / "config.json").read_text())
    for k in ("channels", "image_size", "num_classes", "schedule", "null_label"):
        assert k in d
    assert d["num_classes"] == 3 and d["null_label"] == 2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reduced_precision_storage(tiny_model_dir, tmp_path, dtype):
    m = load_model(tiny_model_dir)
    save_model(m, tmp_path / "h", dtype=dtype)
    stored = load_file(str(tmp_path / "h" / "model.safetensors"))
    assert all(v.dtype == dtype for v in stored.values())
    m2 = load_model(tmp_path / "h")
    x, t, y = _inputs(m.config)
    with torch.no_grad():
        a, b = m(x, t, y)[-1], m2(x, t, y)[-1]
    assert float((a - b).norm() / a.norm()) < 2e-2


def test_sharded_round_trip(tiny_model_dir, tmp_path):
    m = load_model(tiny_model_dir)
    out = save_model(m, tmp_path / "s", max_shard_bytes=20_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and not (out / "model.safetensors").exists()
    m2 = load_model(out)
    for (k, a), (_, b) in zip(m.state_dict().items(), m2.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


def test_truncated_file(tiny_model_dir, tmp_path):
    d = _copy(tiny_model_dir, tmp_path)
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="model.safetensors.*(corrupt|truncated)"):
        load_model(d)


def test_header_lies_about_size(tiny_model_dir, tmp_path):
    d = _copy(tiny_model_dir, tmp_path)
    f = d / "model.safetensors"
    data = bytearray(f.read_bytes())
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    key = next(k for k in header if k != "__metadata__")
    header[key]["data_offsets"][1] += 4096  # claims more bytes than the file has
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    f.write_bytes(struct.pack("<Q", len(new)) + new + bytes(data[8 + n :]))
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(d)


def test_garbage_file(tiny_model_dir, tmp_path):
    d = _copy(tiny_model_dir, tmp_path)
    (d / "model.safetensors").write_bytes(os.urandom(1000))
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_model(d)


def _rewrite(d, fn):
    f = d / "model.safetensors"
    state = load_file(str(f))
    fn(state)
    save_file(state, str(f))


def test_missing_tensor_is_named(tiny_model_dir, tmp_path):
    d = _copy(tiny_model_dir, tmp_path)
    _rewrite(d, lambda s: s.pop("branches.0.class_embed.weight"))
    with pytest.raises(CheckpointError, match="missing tensor 'branches.0.class_embed.weight'"):
        load_model(d)


def test_extra_tensor_is_named(tiny_model_dir, tmp_path):
    d = _copy(tiny_model_dir, tmp_path)
    _rewrite(d, lambda s: s.__setitem__("stray.weight", torch.zeros(3)))
    with pytest.raises(CheckpointError, match="unexpected tensor 'stray.weight'"):
        load_model(d)


def test_misshaped_tensor_is_named(tiny_model_dir, tmp_path):
    d = _copy(tiny_model_dir, tmp_path)
    _rewrite(d, lambda s: s.__setitem__("branches.0.pos_embed.weight", torch.zeros(5, 32)))
    with pytest.raises(CheckpointError, match="'branches.0.pos_embed.weight' has shape"):
        load_model(d)


def test_nan_weights_are_refused(tiny_model_dir, tmp_path):
    d = _copy(tiny_model_dir, tmp_path)
    _rewrite(d, lambda s: s["branches.1.head.conv.bias"].fill_(float("nan")))
    with pytest.raises(CheckpointError, match="branches.1.head.conv.bias.*NaN"):
        load_model(d)


def _with_branch_field(tiny_model_dir, tmp_path, branch: int, key: str, value) -> Path:
    """A copy of the tiny model whose config.json sets one field of one branch."""
    d = _copy(tiny_model_dir, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["branches"][branch][key] = value
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def test_config_not_matching_weights(tiny_model_dir, tmp_path):
    d = _with_branch_field(tiny_model_dir, tmp_path, 0, "width", 64)
    with pytest.raises(CheckpointError, match="shape"):
        load_model(d)


def test_invalid_config_names_the_field(tiny_model_dir, tmp_path):
    d = _with_branch_field(tiny_model_dir, tmp_path, 1, "grid", 7)
    with pytest.raises(CheckpointError, match=r"config.json: branches\[1\].grid"):
        load_model(d)


def test_missing_directory_or_bad_repo_id(tmp_path):
    with pytest.raises(CheckpointError, match="not a model directory"):
        load_model(tmp_path / "nope" / "deeper")


def test_hub_repo_id_uses_snapshot_download(tiny_model_dir, tmp_path, monkeypatch):
    cache = _copy(tiny_model_dir, tmp_path, "snapshot")
    calls = {}

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None):
        calls.update(repo_id=repo_id, allow_patterns=allow_patterns)
        return str(cache)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    m = load_model("someone/mrdit-tiny")
    assert calls["repo_id"] == "someone/mrdit-tiny"
    assert "*.safetensors" in calls["allow_patterns"] and not any(
        "bin" in p or "pt" in p for p in calls["allow_patterns"]
    )
    assert m.config.num_classes == 3


def test_hub_failure_is_clear(monkeypatch):
    import huggingface_hub

    def offline(**kw):
        raise OSError("network unreachable")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(CheckpointError, match="no Hugging Face Hub repo of that id could be downloaded"):
        load_model("someone/absent")


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_converter_refuses_code_in_pickles(tmp_path):
    src = tmp_path / "evil.pth"
    with open(src, "wb") as f:
        pickle.dump({"stages.0.class_embeds.weight": _Evil()}, f)
    torch.save({"x": _Evil()}, tmp_path / "evil2.pth")
    for path in (src, tmp_path / "evil2.pth"):
        with pytest.raises(CheckpointError, match="refused"):
            convert(path, tmp_path / "out", get_preset("tiny"))
    assert not (tmp_path / "out").exists()


def test_converter_cli_and_leftovers(tmp_path):
    from conftest import PARITY

    ref = load_file(str(PARITY / "tiny_2r.official.safetensors"))
    torch.save(ref, tmp_path / "ref.pth")
    code = convert_main(
        [str(tmp_path / "ref.pth"), "--out", str(tmp_path / "ok"), "--official-config", str(PARITY / "tiny_2r.json")]
    )
    assert code == 0 and (tmp_path / "ok" / "config.json").is_file()
    cfg = json.loads((tmp_path / "ok" / "config.json").read_text())
    assert cfg["schedule"]["kind"] == "scaled-linear" and cfg["null_label"] == 1000
    assert cfg["autoencoder"]["scale_factor"] == 0.18215
    ref["stages.0.unknown.weight"] = torch.zeros(1)
    save_file(ref, str(tmp_path / "extra.safetensors"))
    assert (
        convert_main(
            [
                str(tmp_path / "extra.safetensors"),
                "--out",
                str(tmp_path / "bad"),
                "--official-config",
                str(PARITY / "tiny_2r.json"),
            ]
        )
        == 1
    )
    del ref["stages.0.unknown.weight"]
    del ref["stages.1.skip_denses.0.bias"]
    save_file(ref, str(tmp_path / "short.safetensors"))
    with pytest.raises(CheckpointError, match="branches.1.skips.0.bias"):
        from mrdit.convert import config_from_official

        convert(
            tmp_path / "short.safetensors",
            tmp_path / "bad2",
            config_from_official(json.loads((PARITY / "tiny_2r.json").read_text())),
        )


def test_converter_refuses_pixel_with_a_preset(tmp_path, capsys):
    """--pixel only shapes a config read from --official-config; with --preset it would be ignored."""
    args = [str(tmp_path / "ref.pth"), "--out", str(tmp_path / "out"), "--preset", "tiny", "--pixel"]
    with pytest.raises(SystemExit) as e:
        convert_main(args)
    assert e.value.code == 2 and "--pixel cannot be combined with --preset" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_interrupted_save_leaves_previous_file(tiny_model_dir, tmp_path, monkeypatch):
    d = _copy(tiny_model_dir, tmp_path)
    before = (d / "model.safetensors").read_bytes()
    m = load_model(d)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "safetensors_bytes", boom)
    with pytest.raises(OSError, match="disk full"):
        save_model(m, d)
    assert (d / "model.safetensors").read_bytes() == before
    assert not [p for p in d.iterdir() if p.name.endswith(".tmp")]
    load_model(d)


def test_meta_build_for_full_presets():
    for name in ("dimr-xl-2r", "dimr-g-2r", "dimr-xl-3r"):
        m = build_model(name, device="meta")
        assert next(m.parameters()).device.type == "meta"


def test_saved_files_get_the_usual_permissions(tmp_path):
    """Atomic writes go through a private temporary file; the result is readable like any new file."""
    import os
    import stat

    from mrdit import build_model, get_preset, save_model

    save_model(build_model(get_preset("tiny")), tmp_path / "m")
    mask = os.umask(0o022)
    os.umask(mask)
    for name in ("config.json", "model.safetensors"):
        assert stat.S_IMODE((tmp_path / "m" / name).stat().st_mode) == 0o666 & ~mask, name
