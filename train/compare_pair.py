"""Two designs, each trained with several seeds, compared by the rule of docs/matched-pair.md.

    python train/compare_pair.py --a weights/pair-dimr-32-s0 weights/pair-dimr-32-s1 \
        --b weights/pair-baseline-32-s0 weights/pair-baseline-32-s1

Reads each model directory's `eval.json` (written by train/evaluate.py; `--records FILE [FILE ...]`
reads the records of `evaluate.py --json` instead, by directory name) and prints, as Markdown, every model's
numbers and, per metric, the verdict: a design is better when every one of its seeds is better than
every seed of the other and, for class accuracy, the 95% Wilson intervals of the two designs' pooled
accuracies do not overlap; otherwise the comparison is not decided. The records must come from one
protocol and judge (version, floors, seeds, sample count, sampling settings) and be reportable, or the
script refuses.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mrdit.cards import CardError, Evaluation, read_evaluation
from mrdit.judge import wilson_interval


@dataclass(frozen=True)
class Metric:
    name: str
    value: Callable[[Evaluation], float | None]
    higher_is_better: bool


METRICS = (
    Metric("class accuracy", lambda e: e.accuracy, True),
    Metric("Frechet distance (judge features)", lambda e: e.fd, False),
    Metric("low-level Frechet distance", lambda e: e.fd_low, False),
)
# Fields every compared record shares: the protocol, the sampling settings and the very judge (a judge of
# one version trained again scores differently, so its floors and validation accuracy must agree too).
SAME_PROTOCOL = (
    "judge_version",
    "first_seed",
    "samples_per_class",
    "steps",
    "guidance",
    "sampler",
    "guidance_schedule",
    "guidance_power",
    "judge_size",
    "tuning",
    "fd_floor",
    "fd_low_floor",
    "classifier_val_accuracy",
)


def pooled_interval(evals: list[Evaluation]) -> tuple[float, float, float, int]:
    """(accuracy, low, high, samples) of several seeds' samples taken together."""
    n = sum(e.samples for e in evals)
    acc = sum(e.accuracy * e.samples for e in evals) / n
    lo, hi = wilson_interval(acc, n)
    return acc, lo, hi, n


def verdict(metric: Metric, a: list[Evaluation], b: list[Evaluation], names: tuple[str, str]) -> str:
    """Which design the rule says is better on `metric`, or "not decided"."""
    va, vb = [metric.value(e) for e in a], [metric.value(e) for e in b]
    if None in va or None in vb:
        return "not measured for every model"
    sign = 1 if metric.higher_is_better else -1
    a_wins = min(sign * x for x in va) > max(sign * x for x in vb)
    b_wins = min(sign * x for x in vb) > max(sign * x for x in va)
    if metric.name == "class accuracy":
        (_, alo, ahi, _), (_, blo, bhi, _) = pooled_interval(a), pooled_interval(b)
        apart = alo > bhi or blo > ahi
        a_wins, b_wins = a_wins and apart, b_wins and apart
    if a_wins:
        return f"**{names[0]} better**"
    if b_wins:
        return f"**{names[1]} better**"
    return "not decided"


def protocol_differences(evals: list[Evaluation]) -> list[str]:
    """The protocol fields in which the records differ (they must all be measured the same way)."""
    return [f for f in SAME_PROTOCOL if len({getattr(e, f) for e in evals}) > 1]


def report(a: dict[str, Evaluation], b: dict[str, Evaluation], names: tuple[str, str]) -> str:
    """Markdown: one row per model, the pooled accuracies, and the verdict per metric."""
    first = next(iter(a.values()))
    lines = [
        f"Judge version {first.judge_version!r} ({first.classifier_val_accuracy * 100:.1f}% on real validation "
        f"emoji), {first.samples_per_class} samples per class at seeds {first.first_seed:,}-"
        f"{first.first_seed + first.samples_per_class - 1:,}, `{first.sampler}`, {first.steps} steps, guidance "
        f"{first.guidance:g}.",
        "",
        "| model | class accuracy (95% interval) | FD (floor) | low-level FD (floor) | near-copies |",
        "|---|---|---|---|---|",
    ]
    for name, e in [*a.items(), *b.items()]:
        lo, hi = wilson_interval(e.accuracy, e.samples)
        low = f"{e.fd_low:.3f} ({e.fd_low_floor:.3f})" if e.fd_low is not None and e.fd_low_floor else "-"
        copies = f"{e.near_copies * 100:.1f}%" if e.near_copies is not None else "-"
        lines.append(
            f"| `{name}` | {e.accuracy * 100:.1f}% ({lo * 100:.1f}-{hi * 100:.1f}%) | {e.fd:.2f} ({e.fd_floor:.2f}) "
            f"| {low} | {copies} |"
        )
    lines += ["", "| | " + " | ".join(names) + " | verdict |", "|---|---|---|---|"]
    pooled = [pooled_interval(list(d.values())) for d in (a, b)]
    cells = [f"{acc * 100:.1f}% ({lo * 100:.1f}-{hi * 100:.1f}%, n = {n:,})" for acc, lo, hi, n in pooled]
    rows = [("class accuracy, seeds pooled", *cells, verdict(METRICS[0], [*a.values()], [*b.values()], names))]
    for m in METRICS[1:]:
        values = [", ".join(_number(m.value(e)) for e in d.values()) for d in (a, b)]
        rows.append((f"{m.name}, per seed", *values, verdict(m, [*a.values()], [*b.values()], names)))
    lines += [f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} |" for r in rows]
    return "\n".join(lines)


def _number(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}" if x < 1 else f"{x:.2f}"


def load(dirs: list[Path], records: dict[str, dict] | None) -> dict[str, Evaluation]:
    """Each directory's record (from `records` by directory name, or its eval.json); a record the
    protocol does not let one report (tuning seeds, too few samples) ends the script."""
    out = {}
    for d in dirs:
        ev = Evaluation.from_dict(records[d.name]) if records is not None else read_evaluation(d)
        if ev is None:
            raise SystemExit(f"error: {d} has no eval.json; run train/evaluate.py on it first")
        problems = ev.protocol_problems()
        if problems:
            raise SystemExit(f"error: the record of {d.name} may not be reported: {'; '.join(problems)}")
        out[d.name] = ev
    return out


def read_records(paths: list[Path]) -> dict[str, dict]:
    """The records of one or more `evaluate.py --json` files, by directory name (later files win)."""
    merged: dict[str, dict] = {}
    for path in paths:
        merged |= json.loads(path.read_text())
    return merged


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--a", type=Path, nargs="+", required=True, help="model directories of design A (one per seed)")
    p.add_argument("--b", type=Path, nargs="+", required=True, help="model directories of design B (one per seed)")
    p.add_argument("--names", nargs=2, default=("DiMR", "baseline"), metavar=("A", "B"))
    p.add_argument(
        "--records", type=Path, nargs="+", help="the JSON files of `evaluate.py --json`, instead of each eval.json"
    )
    args = p.parse_args(argv)
    print("config:", json.dumps({k: str(v) for k, v in vars(args).items()}))
    try:
        records = read_records(args.records) if args.records else None
        a, b = load(args.a, records), load(args.b, records)
    except (OSError, ValueError, KeyError, CardError) as e:
        p.error(f"cannot read the records: {e}")
    differ = protocol_differences([*a.values(), *b.values()])
    if differ:
        p.error(f"the records were not measured the same way (they differ in {', '.join(differ)})")
    print(report(a, b, tuple(args.names)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
