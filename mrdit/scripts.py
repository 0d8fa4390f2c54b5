"""Console scripts: `mrdit-generate` and `mrdit-convert` from the package, and the training and
data scripts of a source checkout (`train/*.py`) as `mrdit-train`, `mrdit-export`, ... on PATH after
`pip install -e .`. `python -m mrdit.generate`, `python train/train.py` and so on work as before."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

TRAIN = Path(__file__).resolve().parents[1] / "train"

# console script -> the checkout's script it runs
CHECKOUT_SCRIPTS = {
    "mrdit-train": "train.py",
    "mrdit-export": "export.py",
    "mrdit-evaluate": "evaluate.py",
    "mrdit-compare-pair": "compare_pair.py",
    "mrdit-choose-judge": "choose_judge.py",
    "mrdit-prepare-emoji": "prepare_emoji.py",
    "mrdit-init-grown": "init_grown.py",
    "mrdit-encode-latents": "encode_latents.py",
    "mrdit-sample-fid": "sample_fid.py",
    "mrdit-coarse-to-fine": "coarse_to_fine.py",
    "mrdit-branch-experiments": "branch_experiments.py",
}


def run_checkout_script(name: str, argv: list[str] | None = None) -> int:
    """Run `train/<script>` of this checkout as `__main__` with `argv` (default: this process's)."""
    script = TRAIN / CHECKOUT_SCRIPTS[name]
    if not script.is_file():
        print(
            f"error: {name} runs {script.name} from a source checkout (train/ beside mrdit/), and there is "
            f"none here ({script.parent}); clone the repository and `pip install -e .`",
            file=sys.stderr,
        )
        return 1
    saved = sys.argv
    sys.argv = [name, *(sys.argv[1:] if argv is None else argv)]
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = saved
    return 0


def _entry(name: str):
    def main() -> int:
        return run_checkout_script(name)

    main.__name__ = name.removeprefix("mrdit-").replace("-", "_")
    return main


train = _entry("mrdit-train")
export = _entry("mrdit-export")
evaluate = _entry("mrdit-evaluate")
compare_pair = _entry("mrdit-compare-pair")
choose_judge = _entry("mrdit-choose-judge")
prepare_emoji = _entry("mrdit-prepare-emoji")
init_grown = _entry("mrdit-init-grown")
encode_latents = _entry("mrdit-encode-latents")
sample_fid = _entry("mrdit-sample-fid")
coarse_to_fine = _entry("mrdit-coarse-to-fine")
branch_experiments = _entry("mrdit-branch-experiments")
