"""Publish a model directory to the Hugging Face Hub.

    python -m mrdit.hub push weights/mrdit-emoji-32 --repo-id user/mrdit-emoji-32 [--dry-run]

Uploads only what the inference path reads (config.json, safetensors weights and index) and the model
card with its images. `--dry-run` lists the files without touching the network.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .checkpoint import CheckpointError, load_model

UPLOAD_PATTERNS = ("config.json", "*.safetensors", "model.safetensors.index.json", "README.md", "*.png", "eval.json")


def files_to_upload(model_dir: Path) -> list[Path]:
    """The files that would be uploaded, after checking that the directory loads strictly."""
    load_model(model_dir)  # refuse to publish anything that does not load
    if not (model_dir / "README.md").is_file():
        raise CheckpointError(f"{model_dir}: no model card (README.md); write one before publishing")
    files = {p for pattern in UPLOAD_PATTERNS for p in model_dir.glob(pattern) if p.is_file()}
    return sorted(files)


def push(model_dir: Path, repo_id: str, dry_run: bool = False, private: bool = False) -> list[Path]:
    files = files_to_upload(model_dir)
    if dry_run:
        return files
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    api.upload_folder(
        repo_id=repo_id, folder_path=str(model_dir), allow_patterns=list(UPLOAD_PATTERNS), repo_type="model"
    )
    return files


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mrdit.hub", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    pp = sub.add_parser("push", help="upload a model directory with its card")
    pp.add_argument("model_dir", type=Path)
    pp.add_argument("--repo-id", required=True, help="user/name on the Hub")
    pp.add_argument("--private", action="store_true")
    pp.add_argument("--dry-run", action="store_true", help="list what would be uploaded and exit")
    args = p.parse_args(argv)
    try:
        files = push(args.model_dir, args.repo_id, args.dry_run, args.private)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    verb = "would upload" if args.dry_run else "uploaded"
    for f in files:
        print(f"{verb} {f.name} ({f.stat().st_size:,} bytes) -> {args.repo_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
