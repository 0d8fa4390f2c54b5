"""Peak memory per rank of the training data path on synthetic latents, sharded against in memory.

    python bench/shards_memory.py --sizes 10000 1000000 --out bench/results/cpu-shards-memory.json

For each dataset size it writes random posteriors once as shards (mrdit/shards.py) and as one file
(the in-memory `LatentDataset`), then, for each layout and each rank of `--world`, starts a fresh
process that draws `--steps` training batches of that rank (`StepBatches`: indices, flips, posterior
draws, noise) and reports its peak resident memory (VmHWM, importing torch included), and its
resident memory after the imports and at the end. Ranks share nothing, so one process per rank measures what a rank holds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from tqdm import tqdm

from memory import peak_rss_mib, rss_mib
from mrdit import get_preset
from report import print_config, write_json

ROOT = Path(__file__).resolve().parents[1]
PRESET = "dimr-xl-2r"  # the model whose latents, classes and noise schedule the synthetic data stands in for


def write_synthetic(folder: Path, n: int, shape: tuple[int, ...], shard_size: int) -> tuple[Path, Path]:
    """The same random posteriors as shards and as one file; returns (shard folder, file)."""
    from safetensors.torch import save_file

    from mrdit.shards import write_index, write_shard

    shards, single = folder / "shards", folder / "latents.safetensors"
    counts, means, logvars, labels = [], [], [], []
    classes = get_preset(PRESET).num_classes - 1  # the last label is the null label
    g = torch.Generator().manual_seed(0)
    for k, first in enumerate(tqdm(range(0, n, shard_size), desc=f"writing {n:,}", unit="shard")):
        m = min(shard_size, n - first)
        t = {
            "mean": torch.randn((m, 2, *shape), generator=g),
            "logvar": torch.randn((m, 2, *shape), generator=g) - 3,
            "labels": torch.randint(0, classes, (m,), generator=g),
        }
        write_shard(shards, k, t)
        counts.append(m)
        means.append(t["mean"])
        logvars.append(t["logvar"])
        labels.append(t["labels"])
    names = [f"class {i}" for i in range(classes)]
    write_index(shards, {"class_names": names, "latent_shape": list(shape)}, counts)
    save_file({"mean": torch.cat(means), "logvar": torch.cat(logvars), "labels": torch.cat(labels)}, str(single))
    single.with_suffix(".json").write_text(json.dumps({"class_names": names}))
    return shards, single


def measure(path: str, rank: int, world: int, batch: int, steps: int) -> dict:
    """In this process: open the dataset, draw `steps` batches of `rank`, report memory."""
    from mrdit.data import LatentDataset
    from mrdit.schedule import NoiseSchedule
    from mrdit.shards import ShardedLatentDataset
    from mrdit.training import StepBatches, TrainConfig

    base = rss_mib()
    c = get_preset(PRESET)
    scale = c.autoencoder.scale_factor
    data = ShardedLatentDataset(path, scale) if Path(path).is_dir() else LatentDataset(path, scale)
    batches = StepBatches(data, NoiseSchedule(c.schedule), c.null_label, TrainConfig(batch_size=batch), rank, world)
    for step in range(steps):
        batches[step]
    return {
        "examples": len(data),
        "rss_after_import_mib": base,
        "rss_end_mib": rss_mib(),
        "peak_rss_mib": peak_rss_mib(),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 1_000_000], help="dataset sizes (examples)")
    p.add_argument("--latent-shape", type=int, nargs=3, default=[4, 4, 4], metavar=("C", "H", "W"))
    p.add_argument("--shard-size", type=int, default=4096)
    p.add_argument("--world", type=int, default=2, help="ranks to measure (one process each)")
    p.add_argument("--batch", type=int, default=1024, help="global batch")
    p.add_argument("--steps", type=int, default=100, help="batches drawn per rank")
    p.add_argument("--work-dir", type=Path, default=None, help="where the synthetic data goes (default: a temp dir)")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    p.add_argument("--child", nargs=2, metavar=("PATH", "RANK"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.child[0], int(args.child[1]), args.world, args.batch, args.steps)))
        return 0
    print_config({k: v for k, v in vars(args).items() if k != "child"})
    rows = []
    with tempfile.TemporaryDirectory(dir=args.work_dir) as tmp:
        for n in args.sizes:
            folder = Path(tmp) / str(n)
            shards, single = write_synthetic(folder, n, tuple(args.latent_shape), args.shard_size)
            for layout, path in (("shards", shards), ("in memory", single)):
                for rank in range(args.world):
                    cmd = [sys.executable, __file__, "--child", str(path), str(rank)]
                    cmd += ["--world", str(args.world), "--batch", str(args.batch), "--steps", str(args.steps)]
                    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
                    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
                    row = {"layout": layout, "rank": rank, **json.loads(out.strip().splitlines()[-1])}
                    print(json.dumps(row), flush=True)
                    rows.append(row)
            shutil.rmtree(folder)  # frees the disk before the next size
    result = {
        "latent_shape": args.latent_shape,
        "bytes_per_example": 4 * 4 * int(torch.tensor(args.latent_shape).prod()) + 8,
        "world": args.world,
        "global_batch": args.batch,
        "steps": args.steps,
        "rows": rows,
    }
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
