"""Build the class-labelled emoji dataset the demo models are trained on.

    python train/prepare_emoji.py --out data/emoji

Fetches three emoji styles from the npm registry with `npm pack` (Twemoji CC-BY 4.0, Noto Emoji
Apache-2.0, Microsoft Fluent Emoji MIT), groups the base emoji into readable classes by their
`emoji.json` category/subcategory, composites them onto white, resizes to 32 and 64 px, splits
train/validation deterministically by emoji (all styles of one emoji land in the same split), and
writes `train.safetensors`, `val.safetensors` (uint8 images), `classes.json` and `ATTRIBUTION.md`.
Every image also carries its `emoji.json` subcategory, and `others.safetensors` holds the base emoji
of no class: the judge of train/evaluate.py learns its features from both (docs/evaluation.md).
The images themselves are never committed to the repository.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import shutil
import subprocess
import sys
import tarfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from tqdm import tqdm

from mrdit.cards import EMOJI_CREDITS

PACKAGES = {
    "twemoji": (
        "emoji-datasource-twitter@16.0.0",
        "emoji-datasource-twitter-16.0.0.tgz",
        "package/img/twitter/64/{image}",
    ),
    "noto": ("emoji-datasource-google@16.0.0", "emoji-datasource-google-16.0.0.tgz", "package/img/google/64/{image}"),
    "fluent": ("@lobehub/fluent-emoji-3d@1.1.0", "lobehub-fluent-emoji-3d-1.1.0.tgz", "package/assets/{code}.webp"),
}
STYLE_NAMES = {"twemoji": "Twemoji", "noto": "Noto", "fluent": "Fluent"}

# class name, representative emoji, (category, subcategory-prefix) rules, flips allowed
CLASSES: list[tuple[str, str, list[tuple[str, str]], bool]] = [
    ("face", "\U0001f600", [("Smileys & Emotion", "face-")], True),
    ("heart", "\u2764\ufe0f", [("Smileys & Emotion", "heart")], True),
    ("animal", "\U0001f98a", [("Animals & Nature", "animal-")], True),
    ("plant", "\U0001f33b", [("Animals & Nature", "plant-")], True),
    ("fruit & vegetable", "\U0001f34e", [("Food & Drink", "food-fruit"), ("Food & Drink", "food-vegetable")], True),
    (
        "prepared food",
        "\U0001f354",
        [("Food & Drink", "food-prepared"), ("Food & Drink", "food-asian"), ("Food & Drink", "food-sweet")],
        True,
    ),
    ("drink", "\u2615", [("Food & Drink", "drink")], True),
    ("vehicle", "\U0001f697", [("Travel & Places", "transport-")], True),
    ("sky & weather", "\u26c5", [("Travel & Places", "sky & weather")], True),
    ("flag", "\U0001f1eb\U0001f1f7", [("Flags", "country-flag")], False),
    ("sport & game", "\u26bd", [("Activities", "sport"), ("Activities", "game")], True),
    ("clothing", "\U0001f455", [("Objects", "clothing")], True),
]


@dataclass
class Item:
    code: str  # lower-case unified code point string, e.g. "1f98a"
    label: int  # the class, or OTHER for an emoji in none of them (the judge's extra training images)
    style: str
    png: bytes
    subcategory: int = -1  # index into the dataset's subcategory list (the judge's finer labels)


OTHER = -1


def classify(category: str, subcategory: str) -> int | None:
    for i, (_, _, rules, _) in enumerate(CLASSES):
        if any(category == c and subcategory.startswith(s) for c, s in rules):
            return i
    return None


class FetchError(RuntimeError):
    """The npm tarballs cannot be fetched here; the message says how to get them another way."""


def fetch(npm_dir: Path) -> None:
    """`npm pack` each package into `npm_dir` unless its tarball is already there."""
    missing = [(spec, tgz) for spec, tgz, _ in PACKAGES.values() if not (npm_dir / tgz).is_file()]
    if not missing:
        return
    by_hand = (
        f"or fetch {', '.join(spec for spec, _ in missing)} with `npm pack` on a machine that can, put the "
        f"tarballs in {npm_dir} and pass --no-fetch"
    )
    npm = shutil.which("npm")
    if npm is None:
        raise FetchError(f"npm is not on PATH: install Node.js (it brings npm), {by_hand}")
    npm_dir.mkdir(parents=True, exist_ok=True)
    for spec, _ in missing:
        print(f"npm pack {spec}", flush=True)
        r = subprocess.run(
            [npm, "pack", spec, "--pack-destination", str(npm_dir), "--silent"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        if r.returncode != 0:
            said = " ".join(r.stderr.strip().splitlines()[-3:]) or "no message"
            raise FetchError(
                f"`npm pack {spec}` failed (exit {r.returncode}: {said}); offline? Retry online, {by_hand}"
            )


def read_members(tgz: Path, wanted: set[str]) -> dict[str, bytes]:
    out = {}
    with tarfile.open(tgz, "r:gz") as tar:
        for m in tar:
            if m.isfile() and m.name in wanted:
                f = tar.extractfile(m)
                if f is not None:
                    out[m.name] = f.read()
    return out


def collect(npm_dir: Path, flag_cap: int) -> tuple[list[Item], list[str]]:
    """Every base emoji of the three styles (Fluent's flags left out), labelled with its class (or OTHER)
    and its `emoji.json` subcategory; flags capped. Returns the items and the subcategory names."""
    twitter_tgz = npm_dir / PACKAGES["twemoji"][1]
    emoji = json.loads(read_members(twitter_tgz, {"package/emoji.json"})["package/emoji.json"])
    subcategories = sorted({f"{e['category']}/{e['subcategory']}" for e in emoji})
    entries = []
    for e in emoji:
        label = classify(e["category"], e["subcategory"])
        sub = subcategories.index(f"{e['category']}/{e['subcategory']}")
        entries.append((e, OTHER if label is None else label, sub))
    items: list[Item] = []
    for style, (_, tgz, pattern) in PACKAGES.items():
        paths = {}
        for e, label, sub in entries:
            if style == "fluent":
                if e["category"] == "Flags":  # Fluent's flags are a different art style
                    continue
                code = e["unified"].lower()
                for c in (code, code.replace("-fe0f", "")):
                    paths[pattern.format(code=c)] = (code, label, sub)
            else:
                if not e.get(f"has_img_{'twitter' if style == 'twemoji' else 'google'}", True):
                    continue
                paths[pattern.format(image=e["image"])] = (e["unified"].lower(), label, sub)
        found = read_members(npm_dir / tgz, set(paths))
        seen = set()
        for path, data in sorted(found.items()):
            code, label, sub = paths[path]
            if code not in seen:
                seen.add(code)
                items.append(Item(code, label, style, data, sub))
    # Cap dominant classes (flags) deterministically, by hash of the emoji code.
    by_label: dict[int, list[Item]] = {}
    for it in items:
        by_label.setdefault(it.label, []).append(it)
    capped = []
    for label, its in sorted(by_label.items()):
        its.sort(key=lambda it: (_hash(it.code), it.style))
        capped.extend(its[:flag_cap] if label != OTHER and CLASSES[label][0] == "flag" else its)
    return capped, subcategories


def _hash(s: str) -> int:
    return int.from_bytes(hashlib.sha256(s.encode()).digest()[:8], "big")


def to_rgb(data: bytes, size: int) -> np.ndarray:
    """Decode, composite RGBA onto white, resize with a box-filtered (area) downsample."""
    im = Image.open(io.BytesIO(data)).convert("RGBA")
    white = Image.new("RGBA", im.size, (255, 255, 255, 255))
    rgb = Image.alpha_composite(white, im).convert("RGB")
    return np.asarray(
        rgb.resize((size, size), Image.Resampling.BOX if rgb.size[0] >= size else Image.Resampling.BICUBIC)
    )


def split_codes(items: list[Item], val_fraction: float) -> set[str]:
    """The validation emoji: stratified by class and by emoji, so all styles of one emoji share a split and
    every class gets validation images."""
    val_codes: set[str] = set()
    for label in range(len(CLASSES)):
        codes = sorted({it.code for it in items if it.label == label}, key=lambda c: _hash("split:" + c))
        n_val = round(val_fraction * len(codes)) if val_fraction > 0 else 0
        val_codes.update(codes[: max(n_val, 1 if val_fraction > 0 and len(codes) > 1 else 0)])
    return val_codes


def write_shard(path: Path, items: list[Item], styles: list[str], sizes: list[int]) -> None:
    """uint8 NHWC images at every size, with their classes, styles and subcategories."""
    tensors = {
        "labels": torch.tensor([it.label for it in items], dtype=torch.int64),
        "styles": torch.tensor([styles.index(it.style) for it in items], dtype=torch.int64),
        "subcategories": torch.tensor([it.subcategory for it in items], dtype=torch.int64),
        # which emoji each image shows (a hash of its code, shared by its styles): folds split by emoji
        "emoji_ids": torch.tensor([_hash(it.code) >> 1 for it in items], dtype=torch.int64),
    }
    for z in sizes:
        images = [to_rgb(it.png, z) for it in items]
        tensors[f"images_{z}"] = (
            torch.from_numpy(np.stack(images)) if images else torch.zeros(0, z, z, 3, dtype=torch.uint8)
        )
    save_file(tensors, str(path), metadata={"layout": "NHWC uint8"})


def build(npm_dir: Path, out: Path, sizes: list[int], val_fraction: float, flag_cap: int) -> dict:
    items, subcategories = collect(npm_dir, flag_cap)
    if not any(it.label != OTHER for it in items):
        raise SystemExit(f"no emoji images found in {npm_dir}")
    styles = list(PACKAGES)
    val_codes = split_codes(items, val_fraction)
    splits: dict[str, list[Item]] = {"train": [], "val": [], "others": []}
    for it in items:
        splits["others" if it.label == OTHER else "val" if it.code in val_codes else "train"].append(it)
    out.mkdir(parents=True, exist_ok=True)
    for split, its in tqdm(splits.items(), desc="shards", unit="shard"):
        write_shard(out / f"{split}.safetensors", its, styles, sizes)
    counts = {s: Counter(it.label for it in its) for s, its in splits.items()}
    classes = {
        "classes": [
            {"id": i, "name": name, "emoji": char, "flip": flip, "train": counts["train"][i], "val": counts["val"][i]}
            for i, (name, char, _, flip) in enumerate(CLASSES)
        ],
        "styles": [STYLE_NAMES[s] for s in styles],
        "null_label": len(CLASSES),
        "sizes": sizes,
        # the judge's finer labels: every image's emoji.json subcategory; `others.safetensors` holds the base
        # emoji of no class, which the judge also learns from (docs/evaluation.md)
        "subcategories": subcategories,
        "others": len(splits["others"]),
    }
    (out / "classes.json").write_text(json.dumps(classes, indent=2, ensure_ascii=False))
    (out / "ATTRIBUTION.md").write_text(ATTRIBUTION)
    return classes


ATTRIBUTION = f"""# Emoji data: sources and licences

This dataset is derived from three emoji sets, fetched from the npm registry:

{EMOJI_CREDITS}

Category names come from `emoji.json` of emoji-datasource (MIT). Images were composited onto white
and resized; no other changes were made.
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    p.add_argument("--out", type=Path, default=Path("data/emoji"), help="output folder (default: data/emoji)")
    p.add_argument(
        "--npm-dir", type=Path, default=Path("data/npm"), help="where the npm tarballs are (fetched if absent)"
    )
    p.add_argument("--no-fetch", action="store_true", help="use the tarballs in --npm-dir; never run npm")
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 64], help="image sizes to write (default: 32 64)")
    p.add_argument(
        "--val-fraction", type=float, default=0.1, help="fraction of emoji held out for validation (default 0.1)"
    )
    p.add_argument("--flag-cap", type=int, default=240, help="cap on the number of flag images (default 240)")
    args = p.parse_args(argv)
    print("config:", json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}))
    if not 0 <= args.val_fraction < 1:
        p.error("--val-fraction must be in [0, 1)")
    if not args.no_fetch:
        try:
            fetch(args.npm_dir)
        except FetchError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    classes = build(args.npm_dir, args.out, args.sizes, args.val_fraction, args.flag_cap)
    for c in classes["classes"]:
        print(f"{c['id']:3d} {c['emoji']} {c['name']:<20} train {c['train']:4d}  val {c['val']:3d}")
    print(f"{classes['others']} images of no class (for the judge), {len(classes['subcategories'])} subcategories")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
