"""Limits on Hub repo ids typed by users of a public server, checked before anything large is downloaded.

A typed repo id is served only if free-form ids are allowed (`MRDIT_HUB_IDS`, see `hub_ids_allowed`),
its file list (read first, with sizes) holds a `config.json`, and the files the model needs
(config.json, safetensors weights and their index) add up to at most `MRDIT_HUB_MAX_BYTES`
(default 4 GB). Then `config.json` alone is fetched and must be one of ours; only then the weights.
Nothing else in the repo is downloaded.
"""

from __future__ import annotations

import fnmatch
import json
import os
from pathlib import Path
from typing import Any

from .checkpoint import CONFIG_NAME, INDEX_NAME, CheckpointError
from .config import ConfigError, ModelConfig

ALLOWED_FILES = (CONFIG_NAME, INDEX_NAME, "*.safetensors")
DEFAULT_MAX_BYTES = 4 * 10**9  # DiMR-G/2R in float32 is 4.2 GB; bfloat16 copies of it fit


class HubIdRefused(CheckpointError):
    """A typed Hub repo id that this server will not download; the message says why."""


def hub_ids_allowed(env: dict[str, str] | None = None) -> bool:
    """`MRDIT_HUB_IDS=1` / `0` turns typed Hub ids on / off. Unset: on, except on a Hugging Face Space
    (`SPACE_ID` is set there), where anyone could make the server download."""
    env = os.environ if env is None else env
    value = env.get("MRDIT_HUB_IDS")
    if value is None:
        return "SPACE_ID" not in env
    return value.strip().lower() not in ("0", "false", "no", "off", "")


def max_bytes(env: dict[str, str] | None = None) -> int:
    env = os.environ if env is None else env
    raw = env.get("MRDIT_HUB_MAX_BYTES", "")
    try:
        return int(float(raw)) if raw.strip() else DEFAULT_MAX_BYTES
    except ValueError:
        raise ValueError(f"MRDIT_HUB_MAX_BYTES must be a number of bytes, got {raw!r}") from None


def _wanted(name: str) -> bool:
    return "/" not in name and any(fnmatch.fnmatch(name, p) for p in ALLOWED_FILES)


def plan_download(repo_id: str, api: Any, limit: int, revision: str | None = None) -> list[str]:
    """The files to fetch from `repo_id`, judged from its file list alone; refuses with a reason."""
    try:
        info = api.model_info(repo_id, revision=revision, files_metadata=True)
    except Exception as e:  # unknown repo, offline, gated: one clear message
        raise HubIdRefused(f"{repo_id}: no Hub model repo of that id could be read ({type(e).__name__})") from None
    files = {s.rfilename: s.size for s in (info.siblings or [])}
    if CONFIG_NAME not in files:
        raise HubIdRefused(f"{repo_id}: has no {CONFIG_NAME}, so it is not an mrdit model")
    wanted = sorted(n for n in files if _wanted(n))
    if not any(n.endswith(".safetensors") for n in wanted):
        raise HubIdRefused(f"{repo_id}: has no safetensors weights (other formats are not loaded)")
    unknown = [n for n in wanted if files[n] is None]
    if unknown:
        raise HubIdRefused(f"{repo_id}: the Hub did not report the size of {unknown[0]}, so it is not downloaded")
    total = sum(files[n] for n in wanted)
    if total > limit:
        raise HubIdRefused(
            f"{repo_id}: its weights are {total / 1e9:.2f} GB, over this server's limit of {limit / 1e9:.2f} GB"
        )
    return wanted


def check_config(path: Path, repo_id: str) -> ModelConfig:
    """Refuse a config.json that is not an mrdit model config."""
    try:
        return ModelConfig.from_dict(json.loads(Path(path).read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError, ConfigError, TypeError, KeyError, ValueError) as e:
        raise HubIdRefused(f"{repo_id}: its {CONFIG_NAME} is not an mrdit model config ({e})") from None


def fetch_model(repo_id: str, api: Any = None, env: dict[str, str] | None = None, revision: str | None = None) -> Path:
    """Download a typed Hub repo id within the limits above; returns the local model directory.

    `api` is anything with `model_info`, `hf_hub_download` and `snapshot_download` (an `HfApi`)."""
    if not hub_ids_allowed(env):
        raise HubIdRefused(
            f"{repo_id}: this server does not download typed Hub repo ids (MRDIT_HUB_IDS=0); choose a listed model"
        )
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    files = plan_download(repo_id, api, max_bytes(env), revision)
    try:
        config_path = api.hf_hub_download(repo_id, CONFIG_NAME, revision=revision)
    except Exception as e:
        raise HubIdRefused(f"{repo_id}: {CONFIG_NAME} could not be downloaded ({type(e).__name__})") from None
    check_config(Path(config_path), repo_id)
    try:
        return Path(api.snapshot_download(repo_id, revision=revision, allow_patterns=files))
    except Exception as e:
        raise HubIdRefused(f"{repo_id}: the weights could not be downloaded ({type(e).__name__})") from None
