"""The app's latency on this machine: time to the first streamed preview, total time for the default
request (4 images, 25 steps of the default sampler at the default guidance), and what streaming previews add over plain sampling.

    python bench/app_latency.py [--model mrdit-emoji-32] [--repeat 5] [--out bench/results/app-latency.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import app  # noqa: E402
from mrdit.pipeline import DEFAULT_GUIDANCE, DEFAULT_SAMPLER  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=app.DEFAULT_MODEL)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    print("config:", json.dumps({k: str(v) for k, v in vars(args).items()}))
    pipe = app.MODELS.get(args.model)
    t0 = time.perf_counter()
    thread = getattr(pipe.net, "warm_thread", None)
    if thread is not None:  # the app's background compile: measure after it
        thread.join(timeout=600)
    state = getattr(pipe.net, "compile_state", "off")
    print(f"network: {state if state != 'ready' else f'compiled (ready after {time.perf_counter() - t0:.0f} s)'}")
    first, total, plain = [], [], []
    for r in range(args.repeat + 1):  # the first round warms up
        t0 = time.perf_counter()
        t_first = None
        for _ in app.generate("face", r, args.steps, DEFAULT_GUIDANCE, DEFAULT_SAMPLER, args.images, args.model):
            t_first = t_first or time.perf_counter() - t0
        t_total = time.perf_counter() - t0
        t0 = time.perf_counter()
        pipe.generate(
            ["face"] * args.images,
            list(range(r, r + args.images)),
            steps=args.steps,
            guidance=DEFAULT_GUIDANCE,
            sampler=DEFAULT_SAMPLER,
        )
        t_plain = time.perf_counter() - t0
        if r:
            first.append(t_first)
            total.append(t_total)
            plain.append(t_plain)
    res = {
        "model": args.model,
        "compiled": state == "ready",
        "images": args.images,
        "steps": args.steps,
        "first_preview_s": statistics.median(first),
        "streamed_total_s": statistics.median(total),
        "plain_sampling_s": statistics.median(plain),
    }
    res["streaming_overhead"] = res["streamed_total_s"] / res["plain_sampling_s"] - 1
    print(
        f"first preview after {res['first_preview_s'] * 1000:.0f} ms; {args.images} images streamed in {res['streamed_total_s']:.2f} s "
        f"vs {res['plain_sampling_s']:.2f} s without previews (+{res['streaming_overhead'] * 100:.0f}%)"
    )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
