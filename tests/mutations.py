"""Mutation check: deliberate bugs that a user would notice, each applied alone to a temporary copy of
the project and run against only the tests that should catch it. Run by hand, not in CI:

    python tests/mutations.py                 # every mutation; a table of caught / missed, exit 1 if any missed
    python tests/mutations.py -k guidance     # the mutations whose name contains "guidance"
    python tests/mutations.py --list

Each mutation is an exact text replacement that must match exactly once, so when the code moves the
check fails loudly ("pattern not found") instead of silently testing unmutated code. The selected tests
first run on the unmutated copy: a mutation only counts as caught by tests that pass on the real code.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
COPY_IGNORE = shutil.ignore_patterns(
    ".git", ".venv", "__pycache__", ".pytest_cache", ".hypothesis", ".ruff_cache", "runs", "*.pyc"
)
SAMPLING = "tests/test_sampling.py"
TRAINING = "tests/test_training.py"


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str
    edits: tuple[tuple[str, str], ...]  # (exact text, replacement), each text found exactly once
    tests: tuple[str, ...]  # pytest node ids or files, relative to the project root


MUTATIONS = [
    Mutation(
        "guidance sign flipped",
        "mrdit/guidance.py",
        (("guided.append(uncond + w * (cond - uncond))", "guided.append(uncond - w * (cond - uncond))"),),
        (f"{SAMPLING}::test_guidance_is_one_batched_forward_matching_two_passes",),
    ),
    Mutation(
        "null label replaced by class 0",
        "mrdit/guidance.py",
        (("null = torch.full_like(labels, null_label)", "null = torch.full_like(labels, 0)"),),
        (f"{SAMPLING}::test_guidance_is_one_batched_forward_matching_two_passes",),
    ),
    Mutation(
        "class embedding ignored",
        "mrdit/network.py",
        (("cls = self.class_embed(y)[:, None]", "cls = self.class_embed(torch.zeros_like(y))[:, None]"),),
        ("tests/test_parity.py::test_forward_matches_reference",),
    ),
    Mutation(
        "TD-norm time input frozen",
        "mrdit/layers.py",
        (("torch.sigmoid((1 + w) * tau[:, None] + b)", "torch.sigmoid((1 + w) * torch.zeros_like(tau)[:, None] + b)"),),
        ("tests/test_parity.py::test_forward_matches_reference",),
    ),
    Mutation(
        "finest branch's upsampled features dropped",
        "mrdit/network.py",
        (
            (
                "h, feats = branch.run_blocks(x, tau, y, feats, keep_feats=k < last)",
                "h, feats = branch.run_blocks(x, tau, y, feats if k < last else None, keep_feats=k < last)",
            ),
        ),
        ("tests/test_parity.py::test_forward_matches_reference",),
    ),
    Mutation(
        "EMA update skipped",
        "train/train.py",
        (("        self.ema.update(self.unwrapped, self.step)\n", "        pass  # no EMA update\n"),),
        (f"{TRAINING}::test_the_run_keeps_an_ema_of_the_trained_weights",),
    ),
    Mutation(
        "data order not restored on resume",
        "train/train.py",
        (
            (
                "loader = step_batches(batches, t.step, cfg.steps,",
                "loader = step_batches(batches, 0, cfg.steps - t.step,",
            ),
        ),
        (f"{TRAINING}::test_run_folder_and_kill_resume_is_exact",),
    ),
    Mutation(
        "sampler's last step skipped",
        "mrdit/sampling.py",
        (
            (
                "    for i in range(steps):\n        s, t = ts[i], ts[i + 1]\n        p = denoise(x, s)\n        d = p.data\n",
                "    for i in range(steps - 1):\n        s, t = ts[i], ts[i + 1]\n        p = denoise(x, s)\n        d = p.data\n",
            ),
        ),
        (f"{SAMPLING}::test_fuzz_sampler_arguments",),
    ),
    Mutation(
        "one generator shared by the batch",
        "mrdit/sampling.py",
        (
            (
                'g = torch.Generator(device="cpu").manual_seed(int(s))',
                'g = gens[0] if gens else torch.Generator(device="cpu").manual_seed(int(s))',
            ),
        ),
        (f"{SAMPLING}::test_seed_gives_same_image_alone_or_in_batch",),
    ),
    Mutation(
        "safetensors loader made non-strict",
        "mrdit/checkpoint.py",
        (
            ("    check_state_dict(state, expected, str(directory))\n", ""),
            ("strict=True, assign=True)", "strict=False, assign=True)"),
        ),
        ("tests/test_checkpoint.py",),
    ),
    Mutation(
        "pickle accepted by the converter",
        "mrdit/convert.py",
        (
            (
                'torch.load(str(src), map_location="cpu", weights_only=True)',
                'torch.load(str(src), map_location="cpu", weights_only=False)',
            ),
        ),
        ("tests/test_checkpoint.py::test_converter_refuses_code_in_pickles",),
    ),
    Mutation(
        "pickle accepted in a training state",
        "mrdit/training.py",
        (
            (
                'torch.load(path, map_location="cpu", weights_only=True)',
                'torch.load(path, map_location="cpu", weights_only=False)',
            ),
        ),
        (f"{TRAINING}::test_a_training_state_holding_code_is_refused",),
    ),
    Mutation(
        "panels drawn from the wrong branch",
        "mrdit/visual.py",
        (
            (
                "tiles.extend(upscale_nearest(to_uint8(b[i]), display) for b in branches)\n        for k in",
                "tiles.extend(upscale_nearest(to_uint8(b[i]), display) for b in branches[::-1])\n        for k in",
            ),
        ),
        ("tests/test_app.py::test_live_server_with_gradio_client",),
    ),
    Mutation(
        "Stop no longer cancels Generate",
        "app.py",
        (("cancels=[gen_event], ", ""),),
        ("tests/test_app.py::test_stop_cancels_a_running_generation",),
    ),
]


class PatternNotFound(RuntimeError):
    pass


def mutate(text: str, m: Mutation) -> str:
    """Apply every edit of `m`; each original text must occur exactly once."""
    for old, new in m.edits:
        n = text.count(old)
        if n != 1:
            raise PatternNotFound(
                f"{m.name}: pattern {'not found' if n == 0 else f'found {n} times'} in {m.file}: {old!r}"
            )
        text = text.replace(old, new)
    return text


def run_tests(root: Path, tests: tuple[str, ...], timeout: float) -> tuple[int, str]:
    """pytest on `tests` in the copy `root`, stopping at the first failure; (exit code, first failure)."""
    env = os.environ | {"PYTHONPATH": str(root), "PYTHONDONTWRITEBYTECODE": "1"}
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-p", "no:randomly", *tests]
    try:
        r = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return -1, f"timed out after {timeout:.0f} s"
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", r.stdout, re.M)
    if r.returncode == 0:
        return 0, "-"
    return r.returncode, (failed[0] if failed else r.stdout.strip().splitlines()[-1] if r.stdout.strip() else "")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("-k", "--select", default="", help="only mutations whose name contains this text")
    p.add_argument("--list", action="store_true", help="list the mutations and their tests, then exit")
    p.add_argument("--tests", nargs="+", help="run these tests against every chosen mutation instead of its own")
    p.add_argument("--timeout", type=float, default=600, help="seconds allowed per pytest run")
    p.add_argument("--no-baseline", action="store_true", help="skip running the selected tests on the unmutated copy")
    args = p.parse_args(argv)
    chosen = [m for m in MUTATIONS if args.select.lower() in m.name.lower()]
    if args.tests:
        chosen = [dataclasses.replace(m, tests=tuple(args.tests)) for m in chosen]
    print(f"root: {ROOT}; mutations: {len(chosen)} of {len(MUTATIONS)}; timeout {args.timeout:.0f} s per run")
    for m in chosen:  # every pattern must still be there before anything runs
        mutate((ROOT / m.file).read_text(), m)
    if args.list or not chosen:
        for m in chosen:
            print(f"- {m.name} ({m.file}): {' '.join(m.tests)}")
        return 0 if chosen else 2

    with tempfile.TemporaryDirectory(prefix="mrdit-mutations-") as tmp:
        copy = Path(tmp) / "project"
        shutil.copytree(ROOT, copy, ignore=COPY_IGNORE)
        if not args.no_baseline:
            tests = tuple(dict.fromkeys(t for m in chosen for t in m.tests))
            t0 = time.perf_counter()
            print(f"baseline: {len(tests)} test selections on the unmutated copy ...", flush=True)
            code, first = run_tests(copy, tests, args.timeout * 2)
            if code != 0:
                print(
                    f"error: the selected tests fail on the unmutated code ({first}); fix that first", file=sys.stderr
                )
                return 2
            print(f"baseline passed in {time.perf_counter() - t0:.0f} s", flush=True)
        rows = []
        for m in tqdm(chosen, desc="mutations", unit="mutation"):
            path = copy / m.file
            original = path.read_text()
            path.write_text(mutate(original, m))
            t0 = time.perf_counter()
            try:
                code, first = run_tests(copy, m.tests, args.timeout)
            finally:
                path.write_text(original)
            verdict = {0: "MISSED", 1: "caught"}.get(code, f"error (exit {code})")
            rows.append((m, verdict, first, time.perf_counter() - t0))
            tqdm.write(f"{verdict:>8}  {m.name}  ({time.perf_counter() - t0:.0f} s)")

    print("\n| mutation | file | verdict | first failing test | seconds |\n|---|---|---|---|---|")
    for m, verdict, first, secs in rows:
        print(f"| {m.name} | `{m.file}` | {verdict} | `{first}` | {secs:.0f} |")
    caught = sum(v == "caught" for _, v, _, _ in rows)
    print(f"\ncaught {caught} of {len(rows)}")
    return 0 if caught == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
