"""Convert the authors' released DiMR checkpoints (reference key naming) into a model directory.

    python -m mrdit.convert SRC --out DIR (--preset NAME | --official-config FILE.json)

SRC is a released `.pth` (read with `torch.load(weights_only=True)`: a file that needs code to
unpickle is refused) or a `.safetensors` in the reference naming. Every reference key is mapped to
one of ours, every shape checked, and leftovers on either side are an error.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .checkpoint import CheckpointError, save_model
from .config import AutoencoderConfig, BranchSpec, ModelConfig, ScheduleConfig
from .presets import PRESETS, get_preset

_TDP_LEAF = {"param0": "p0", "param1": "p1", "nodecay_weight": "w", "nodecay_bias": "b"}

# (reference pattern, our template); applied after the TD-parameter leaf names are renamed.
_RULES: list[tuple[str, str]] = [
    (r"stages\.(\d+)\.input_layer\.1\.(weight|bias)", r"branches.\1.patchify.\2"),
    (r"stages\.(\d+)\.input_layer\.3\.position_embeddings\.weight", r"branches.\1.pos_embed.weight"),
    (r"stages\.(\d+)\.class_embeds\.weight", r"branches.\1.class_embed.weight"),
    (r"stages\.(\d+)\.blocks\.(\d+)\.block1\.norm\.scale\.(p0|p1|w|b)", r"branches.\1.blocks.\2.attn.norm.scale.\3"),
    (r"stages\.(\d+)\.blocks\.(\d+)\.block1\.query_key_value\.weight", r"branches.\1.blocks.\2.attn.qkv.weight"),
    (r"stages\.(\d+)\.blocks\.(\d+)\.block1\.dense\.(weight|bias)", r"branches.\1.blocks.\2.attn.proj.\3"),
    (r"stages\.(\d+)\.blocks\.(\d+)\.block1\.1\.(weight|bias)", r"branches.\1.blocks.\2.dwconv.\3"),
    (r"stages\.(\d+)\.blocks\.(\d+)\.block2\.norm\.scale\.(p0|p1|w|b)", r"branches.\1.blocks.\2.mlp.norm.scale.\3"),
    (r"stages\.(\d+)\.blocks\.(\d+)\.block2\.(w0|w1|w2)\.(weight|bias)", r"branches.\1.blocks.\2.mlp.\3.\4"),
    (r"stages\.(\d+)\.skip_denses\.(\d+)\.(weight|bias)", r"branches.\1.skips.\2.\3"),
    (r"stages\.(\d+)\.output_layer\.0\.(weight|bias)\.(p0|p1|w|b)", r"branches.\1.head.norm.\2.\3"),
    (r"stages\.(\d+)\.output_layer\.2\.(weight|bias)", r"branches.\1.head.conv.\2"),
    (r"stages\.(\d+)\.upsample\.0\.(weight|bias)\.(p0|p1|w|b)", r"branches.\1.upsample.norm_in.\2.\3"),
    (r"stages\.(\d+)\.upsample\.1\.kernel\.(weight|bias)", r"branches.\1.upsample.proj.\2"),
    (r"stages\.(\d+)\.upsample\.2\.(weight|bias)\.(p0|p1|w|b)", r"branches.\1.upsample.norm_out.\2.\3"),
]
_COMPILED = [(re.compile(p + "$"), t) for p, t in _RULES]


def map_key(ref_key: str) -> str:
    """Our parameter name for a reference key; KeyError if the key has no counterpart."""
    parts = ref_key.split(".")
    if parts[-1] in _TDP_LEAF:
        parts[-1] = _TDP_LEAF[parts[-1]]
    key = ".".join(parts)
    for pattern, template in _COMPILED:
        if pattern.match(key):
            return pattern.sub(template, key)
    raise KeyError(f"reference key {ref_key!r} has no counterpart in mrdit")


def map_state_dict(ref: Mapping[str, torch.Tensor], expected: Mapping[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Rename every reference tensor, check its shape against `expected` (our name -> shape), and
    refuse unmapped keys on either side."""
    out: dict[str, torch.Tensor] = {}
    problems: list[str] = []
    for ref_key, tensor in ref.items():
        try:
            key = map_key(ref_key)
        except KeyError as e:
            problems.append(str(e.args[0]))
            continue
        if key not in expected:
            problems.append(f"reference key {ref_key!r} maps to {key!r}, which this config does not have")
        elif tuple(tensor.shape) != tuple(expected[key]):
            problems.append(
                f"reference key {ref_key!r}: shape {tuple(tensor.shape)} != expected {tuple(expected[key])} for {key!r}"
            )
        else:
            out[key] = tensor
    mapped = {map_key_safe(r) for r in ref}
    missing = sorted(set(expected) - mapped)
    problems.extend(f"parameter {k!r} has no reference tensor" for k in missing)
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise CheckpointError(
            f"reference checkpoint does not match the config ({len(problems)} problems):\n  {shown}{more}"
        )
    return out


def map_key_safe(ref_key: str) -> str | None:
    try:
        return map_key(ref_key)
    except KeyError:
        return None


def config_from_official(
    official: Mapping[str, Any], image_size: int | None = None, latent: bool = True
) -> ModelConfig:
    """Our config from the reference configuration (its `stage_configs` field names)."""
    if "official_config" in official:
        image_size = image_size or official.get("image_size")
        official = official["official_config"]
    try:
        stages = official["stage_configs"]
        branches = []
        for s in stages:
            kind = {"TransformerBlock": "transformer", "ConvNeXtBlock": "convnext"}[s["block_type"]]
            branches.append(
                BranchSpec(
                    kind=kind,
                    width=int(s["dim"]),
                    blocks=int(s["num_blocks"]) // 2 * 2 + 1,  # the reference always builds an odd count
                    grid=int(s["max_height"]),
                    patch=int(s["input_feature_ratio"]),
                    mlp_width=int(s["hidden_dim"]),
                    heads=int(s.get("num_attention_heads", 0)) if kind == "transformer" else 0,
                    kernel=int(s.get("kernel_size", 7)),
                    head_kernel=int(s.get("final_kernel_size", 3)),
                )
            )
        channels = int(official["channels"])
        num_classes = int(official["num_classes"])
    except KeyError as e:
        raise CheckpointError(f"reference configuration is missing field {e}") from None
    size = image_size or branches[-1].grid * branches[-1].patch
    return ModelConfig(
        branches=tuple(branches),
        channels=channels,
        image_size=size,
        num_classes=num_classes,
        null_label=num_classes - 1,
        loss_weights=(),
        schedule=ScheduleConfig("scaled-linear"),
        autoencoder=AutoencoderConfig() if latent else None,
    )


def read_reference(src: Path) -> dict[str, torch.Tensor]:
    """Load a reference state dict: safetensors, or a .pth through the restricted (weights-only) unpickler."""
    if not src.is_file():
        raise CheckpointError(f"{src}: no such file")
    if src.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(src))
        except Exception as e:  # safetensors raises several error types for corrupt files
            raise CheckpointError(f"{src}: not a readable safetensors file ({e})") from None
    try:
        obj = torch.load(str(src), map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{src}: refused to load (only plain tensor state dicts are accepted): {e}") from None
    for wrapper in ("state_dict", "model", "ema"):  # tolerate a dict that nests the state dict
        if isinstance(obj, dict) and wrapper in obj and isinstance(obj[wrapper], dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{src}: expected a dict of tensors")
    return obj


def convert(src: Path, out: Path, config: ModelConfig, dtype: torch.dtype = torch.float32) -> Path:
    """Convert `src` to a model directory at `out` for `config`; returns `out`."""
    from .build import build_model

    expected = {k: tuple(v.shape) for k, v in build_model(config, device="meta").state_dict().items()}
    state = map_state_dict(read_reference(src), expected)
    model = build_model(config, device="meta")
    model.load_state_dict(state, strict=True, assign=True)
    save_model(model, out, dtype=dtype)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mrdit.convert", description=__doc__.split("\n\n")[0])
    p.add_argument("src", type=Path, help="released .pth or reference-named .safetensors")
    p.add_argument("--out", type=Path, required=True, help="model directory to write")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--preset", choices=list(PRESETS), help="our preset describing the checkpoint")
    g.add_argument(
        "--official-config", type=Path, help="JSON with the reference configuration (whole, or under 'official_config')"
    )
    p.add_argument("--pixel", action="store_true", help="pixel-space model (no latent autoencoder in the config)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    args = p.parse_args(argv)
    if args.pixel and args.preset:
        p.error("--pixel cannot be combined with --preset (the preset says whether the model is pixel-space)")
    try:
        if args.preset:
            config = get_preset(args.preset)
        else:
            config = config_from_official(json.loads(args.official_config.read_text()), latent=not args.pixel)
        print(f"config: {config.to_json()}")
        convert(args.src, args.out, config, dtype=getattr(torch, args.dtype))
    except (CheckpointError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
