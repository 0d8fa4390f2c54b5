"""Model directories: `config.json` + `model.safetensors` (or shards with a Hugging Face-style index).

Loading is strict: a missing, extra or mis-shaped tensor, non-finite weights, a config that does not
match the weights, or a truncated/corrupt file is an error naming the file and the tensor. Only JSON
and safetensors are read; nothing is unpickled. Every file is written to a temporary name first and
renamed into place, so an interrupted save never leaves a half-written file under the final name.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import BinaryIO

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes
from torch import nn

from .config import ConfigError, ModelConfig

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
HUB_PATTERNS = ["*.json", "*.safetensors", "README.md", "*.png"]
_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # "owner/name", as the Hub spells repo ids


class CheckpointError(ValueError):
    """A model directory or weight file cannot be used; the message names the file (and tensor)."""


def _read_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once, at import: os.umask can only be read by setting it, which races threads


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write through `write(file)` to a temporary file beside `path`, fsync, then rename over it:
    readers see the old file or the new one, never a half-written one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the permissions open() would
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_save_safetensors(
    tensors: Mapping[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None
) -> None:
    atomic_write(
        path, lambda f: f.write(safetensors_bytes({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata))
    )


def save_model(
    model: nn.Module, directory: str | Path, dtype: torch.dtype = torch.float32, max_shard_bytes: int = 2 * 1024**3
) -> Path:
    """Write `model.config` and its weights (cast to `dtype`) as a model directory."""
    directory = Path(directory)
    config: ModelConfig = model.config  # type: ignore[assignment]
    if dtype not in _DTYPES.values():
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    state = {k: v.detach().to("cpu", dtype) for k, v in model.state_dict().items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in state.items():
        n = v.numel() * v.element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += n
    meta = {"format": "pt"}
    if len(shards) == 1:
        atomic_save_safetensors(shards[0], directory / WEIGHTS_NAME, meta)
        (directory / INDEX_NAME).unlink(missing_ok=True)
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            atomic_save_safetensors(shard, directory / name, meta)
            weight_map.update({k: name for k in shard})
        total = sum(v.numel() * v.element_size() for v in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        atomic_write(directory / INDEX_NAME, lambda f: f.write(json.dumps(index, indent=2).encode()))
        (directory / WEIGHTS_NAME).unlink(missing_ok=True)
    atomic_write(directory / CONFIG_NAME, lambda f: f.write(config.to_json().encode()))
    return directory


def resolve_model_dir(path_or_repo: str | Path, revision: str | None = None) -> Path:
    """A local model directory, or a Hub repo id downloaded (JSON, safetensors and card only) to the cache."""
    p = Path(path_or_repo).expanduser()
    if p.is_dir():
        return p
    s = str(path_or_repo)
    if not REPO_ID.match(s) or p.exists():
        raise CheckpointError(f"{s}: not a model directory and not a Hugging Face Hub repo id")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=s, revision=revision, allow_patterns=HUB_PATTERNS))
    except Exception as e:  # offline, unknown repo, auth: all become one clear message
        raise CheckpointError(
            f"{s}: no such local model directory, and no Hugging Face Hub repo of that id could be downloaded "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from None


def read_config(directory: str | Path) -> ModelConfig:
    path = Path(directory) / CONFIG_NAME
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (a model directory needs {CONFIG_NAME})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    try:
        return ModelConfig.from_dict(data)
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{path}: {e}") from None


def _weight_files(directory: Path) -> dict[str, Path]:
    """Tensor name -> file holding it, from the index if sharded."""
    index = directory / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid shard index ({e})") from None
        return {k: directory / v for k, v in weight_map.items()}
    single = directory / WEIGHTS_NAME
    if not single.is_file():
        raise CheckpointError(f"{directory}: no {WEIGHTS_NAME} or {INDEX_NAME}")
    return {}


def read_weights(directory: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a model directory, checked for readability, dtype and finiteness."""
    directory = Path(directory)
    mapping = _weight_files(directory)
    files = sorted(set(mapping.values())) if mapping else [directory / WEIGHTS_NAME]
    state: dict[str, torch.Tensor] = {}
    for f in files:
        if f.parent.resolve() != directory.resolve():
            raise CheckpointError(f"{f}: shard outside the model directory")
        try:
            with safe_open(str(f), framework="pt") as sf:
                for k in sf.keys():
                    if mapping and mapping.get(k) != f:
                        raise CheckpointError(f"{f}: tensor {k!r} is not listed for this file in {INDEX_NAME}")
                    t = sf.get_tensor(k)
                    if t.dtype not in _DTYPES.values():
                        raise CheckpointError(f"{f}: tensor {k!r} has unsupported dtype {t.dtype}")
                    if not torch.isfinite(t).all():
                        raise CheckpointError(f"{f}: tensor {k!r} holds NaN or infinite values")
                    state[k] = t
        except CheckpointError:
            raise
        except FileNotFoundError:
            raise CheckpointError(f"{f}: missing weight file") from None
        except Exception as e:  # safetensors reports truncation and bad headers with several types
            raise CheckpointError(f"{f}: corrupt or truncated safetensors file ({e})") from None
    if mapping:
        absent = sorted(set(mapping) - set(state))
        if absent:
            raise CheckpointError(f"{directory / INDEX_NAME}: lists tensor {absent[0]!r} which no shard holds")
    return state


def check_state_dict(state: Mapping[str, torch.Tensor], expected: Mapping[str, tuple[int, ...]], where: str) -> None:
    """Raise unless `state` has exactly the expected tensor names and shapes."""
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing:
        raise CheckpointError(
            f"{where}: missing tensor {missing[0]!r}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    if extra:
        raise CheckpointError(
            f"{where}: unexpected tensor {extra[0]!r}" + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
        )
    for k, shape in expected.items():
        if tuple(state[k].shape) != tuple(shape):
            raise CheckpointError(
                f"{where}: tensor {k!r} has shape {tuple(state[k].shape)}, the config needs {tuple(shape)}"
            )


def load_model(
    path_or_repo: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    revision: str | None = None,
) -> nn.Module:
    """Load a model directory (or Hub repo id) strictly, in eval mode."""
    from .build import build_model

    directory = resolve_model_dir(path_or_repo, revision)
    config = read_config(directory)
    model = build_model(config, device="meta")
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    state = read_weights(directory)
    check_state_dict(state, expected, str(directory))
    model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in state.items()}, strict=True, assign=True)
    return model.eval()
