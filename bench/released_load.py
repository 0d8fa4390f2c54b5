"""First and second load of a released model in the app's path, without the network: how long the
conversion, the VAE copy and the preview fit take, and what a cached load costs.

    python bench/released_load.py [--preset dimr-xl-2r] [--vae sd] [--work /tmp/mrdit-released-load]

A `.pth` with random weights under the release's own key names and shapes (`tests/data/parity/*_keys.tsv`)
and a random autoencoder of the SD VAE's architecture stand in for the files on the Hub; the download
itself is not timed: it depends on the network.
"""

from __future__ import annotations

import argparse
import ast
import json
import shutil
import sys
import time
from pathlib import Path

import huggingface_hub
import torch
from tqdm import tqdm

from mrdit.pipeline import Pipeline
from mrdit.released import RELEASES, prepare
from mrdit.vae import VAE_ARCHITECTURES, random_vae
from report import print_config, write_json

ROOT = Path(__file__).resolve().parents[1]
KEYS = {"dimr-xl-2r": "dimr_xl_2r_keys.tsv", "dimr-g-2r": "dimr_g_2r_keys.tsv"}


def release_pth(preset: str, path: Path) -> int:
    """Write a random checkpoint with the release's key names and shapes; returns its size in bytes."""
    lines = (ROOT / "tests" / "data" / "parity" / KEYS[preset]).read_text().strip().splitlines()[1:]
    g = torch.Generator().manual_seed(0)
    state = {}
    for line in tqdm(lines, desc="random release checkpoint"):
        key, shape = line.split("\t")
        state[key] = torch.randn(ast.literal_eval(shape), generator=g) * 0.02
    torch.save(state, path)
    return path.stat().st_size


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=list(KEYS), default="dimr-xl-2r")
    p.add_argument("--vae", choices=list(VAE_ARCHITECTURES), default="sd")
    p.add_argument("--work", type=Path, default=Path("/tmp/mrdit-released-load"))
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    print_config(args)
    release = next(r for r in RELEASES.values() if r.preset == args.preset)
    shutil.rmtree(args.work, ignore_errors=True)
    hub = args.work / "hub"
    hub.mkdir(parents=True)
    size = release_pth(args.preset, hub / release.filename)
    random_vae(args.vae).save_pretrained(hub / "vae")
    files = {(release.repo_id, release.filename): hub / release.filename}
    files |= {(release.vae_repo, n): hub / "vae" / n for n in release.vae_files}
    huggingface_hub.hf_hub_download = lambda repo_id, filename, **_: str(files[repo_id, filename])
    names = json.loads((ROOT / "assets" / "imagenet_classes.json").read_text())
    res = {"preset": args.preset, "pth_bytes": size, "threads": torch.get_num_threads()}
    t0 = time.perf_counter()
    out = prepare(release, args.work / "cache", names)
    res["prepare_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    assert prepare(release, args.work / "cache", names) == out
    res["prepare_cached_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    pipe = Pipeline.from_pretrained(out)
    res["load_s"] = time.perf_counter() - t0
    res["preview"] = pipe.preview_kind
    print(
        f"{args.preset}: {size / 1e9:.2f} GB checkpoint; convert + VAE copy + preview fit {res['prepare_s']:.1f} s; "
        f"cached: {res['prepare_cached_s'] * 1000:.1f} ms; loading the pipeline (model + VAE + preview) {res['load_s']:.1f} s"
    )
    write_json(args.out, res)
    shutil.rmtree(args.work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
