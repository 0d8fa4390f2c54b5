"""Shared fixtures: the parity data, a tiny saved model, and a tiny emoji-like dataset built from
fake npm tarballs (the same layout as the real packages; no network)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
PARITY = Path(__file__).parent / "data" / "parity"

torch.set_num_threads(1)
# The app compiles its model in the background on the CPU; app tests run the plain network (one test
# of the compiled path is in test_compiled.py).
os.environ.setdefault("MRDIT_COMPILE", "0")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from mrdit import build_model, get_preset, save_model

    torch.manual_seed(0)
    cfg = get_preset("tiny").replace(num_classes=3, null_label=2, class_names=("face", "heart"))
    return save_model(build_model(cfg), tmp_path_factory.mktemp("models") / "tiny")


# A few fake emoji per class of the real class table; each style draws them a little differently.
FAKE_EMOJI = [
    ("1f600", "Smileys & Emotion", "face-smiling"),
    ("1f601", "Smileys & Emotion", "face-smiling"),
    ("1f602", "Smileys & Emotion", "face-smiling"),
    ("1f603", "Smileys & Emotion", "face-smiling"),
    ("2764-fe0f", "Smileys & Emotion", "heart"),
    ("1f499", "Smileys & Emotion", "heart"),
    ("1f49a", "Smileys & Emotion", "heart"),
    ("1f49b", "Smileys & Emotion", "heart"),
    ("1f1eb-1f1f7", "Flags", "country-flag"),
    ("1f1e9-1f1ea", "Flags", "country-flag"),
    ("1f1ee-1f1f9", "Flags", "country-flag"),
    ("1f1ef-1f1f5", "Flags", "country-flag"),
    ("1f4a9", "Smileys & Emotion", "face-costume"),
    ("1f3e0", "Travel & Places", "place-building"),  # not in any class: must be ignored
]


def _png(code: str, subcategory: str, style: int, size: int, fmt: str) -> bytes:
    rng = np.random.default_rng(abs(hash((code, style))) % 2**32)
    im = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    d = ImageDraw.Draw(im)
    colour = {"heart": (220, 30, 60, 255), "country-flag": (30, 60, 200, 255)}.get(subcategory, (250, 200, 40, 255))
    jitter = int(rng.integers(0, size // 8))
    if subcategory == "country-flag":
        d.rectangle([2 + jitter, size // 4, size - 3, 3 * size // 4], fill=colour)
    else:
        d.ellipse([4 + jitter, 4 + style, size - 5, size - 5], fill=colour)
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def _tgz(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def make_fake_npm(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    emoji = [
        {
            "unified": c.upper(),
            "image": f"{c}.png",
            "category": cat,
            "subcategory": sub,
            "short_name": c,
            "has_img_twitter": True,
            "has_img_google": True,
        }
        for c, cat, sub in FAKE_EMOJI
    ]
    ej = json.dumps(emoji).encode()
    _tgz(
        folder / "emoji-datasource-twitter-16.0.0.tgz",
        {"package/emoji.json": ej}
        | {f"package/img/twitter/64/{c}.png": _png(c, s, 0, 64, "PNG") for c, _, s in FAKE_EMOJI},
    )
    _tgz(
        folder / "emoji-datasource-google-16.0.0.tgz",
        {"package/emoji.json": ej}
        | {f"package/img/google/64/{c}.png": _png(c, s, 1, 64, "PNG") for c, _, s in FAKE_EMOJI},
    )
    _tgz(
        folder / "lobehub-fluent-emoji-3d-1.1.0.tgz",
        {f"package/assets/{c.replace('-fe0f', '')}.webp": _png(c, s, 2, 256, "WEBP") for c, _, s in FAKE_EMOJI},
    )
    return folder


@pytest.fixture(scope="session")
def fake_npm(tmp_path_factory) -> Path:
    return make_fake_npm(tmp_path_factory.mktemp("npm"))


@pytest.fixture(scope="session")
def emoji_data(tmp_path_factory, fake_npm) -> Path:
    out = tmp_path_factory.mktemp("data") / "emoji"
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "train" / "prepare_emoji.py"),
            "--out",
            str(out),
            "--npm-dir",
            str(fake_npm),
            "--no-fetch",
            "--sizes",
            "16",
            "32",
            "--val-fraction",
            "0.25",
        ],
        check=True,
        capture_output=True,
    )
    return out


def tiny_vae():
    """A small, randomly initialised diffusers AutoencoderKL (2x downsampling, 4 latent channels)."""
    from mrdit.vae import random_vae

    return random_vae("tiny", seed=None).train()


@contextlib.contextmanager
def live_client(default_model: str):
    """The app served on a free local port, and a gradio_client Client for it (one session)."""
    import socket

    from gradio_client import Client

    sys.path.insert(0, str(ROOT))
    import app

    demo = app.build_demo(default_model=default_model)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield Client(f"http://127.0.0.1:{port}/", verbose=False)
    finally:
        demo.close()
