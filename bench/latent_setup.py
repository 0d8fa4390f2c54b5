"""Shared by the latent-model benchmarks: a DiMR model and an autoencoder with random weights, served
by the app's pipeline (`mrdit.pipeline.Pipeline`) with the linear preview fitted to that autoencoder."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from mrdit import build_model, get_preset
from mrdit.config import AutoencoderConfig, ModelConfig
from mrdit.convert import config_from_official
from mrdit.pipeline import LatentDecoder, Pipeline
from mrdit.presets import PRESETS
from mrdit.preview import fit_linear_preview, fit_size
from mrdit.vae import VAE_ARCHITECTURES, random_vae

ROOT = Path(__file__).resolve().parents[1]
TINY_RELEASE = ROOT / "tests" / "data" / "parity" / "tiny_2r.json"  # the release's wiring at small widths


def add_model_args(p: argparse.ArgumentParser, preset: str | None) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--preset", choices=[k for k in PRESETS if get_preset(k).autoencoder], default=preset)
    g.add_argument("--official-config", type=Path, help="a reference configuration JSON instead of a preset")
    p.add_argument("--vae", choices=list(VAE_ARCHITECTURES), default="sd", help="autoencoder architecture")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def model_config(args: argparse.Namespace) -> ModelConfig:
    if args.official_config is not None:
        return config_from_official(json.loads(args.official_config.read_text()))
    return get_preset(args.preset or "dimr-xl-2r")


def latent_pipeline(config: ModelConfig, vae_name: str, device: str, linear: bool = True) -> tuple[Pipeline, float]:
    """(pipeline, seconds spent fitting the linear preview). Random weights: for timing only."""
    torch.manual_seed(0)
    model = build_model(config, device=device).eval()
    vae = random_vae(vae_name).to(device)
    scale = (config.autoencoder or AutoencoderConfig()).scale_factor
    t0 = time.perf_counter()
    previewer = fit_linear_preview(vae, scale, size=fit_size(vae, config.image_size)) if linear else None
    fit_s = time.perf_counter() - t0
    return Pipeline(model, LatentDecoder(vae, scale), previewer=previewer), fit_s
