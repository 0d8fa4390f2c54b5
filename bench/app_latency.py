"""The app's latency as a user meets it: `python app.py` served on this machine, requests through
gradio_client. Time to the first streamed preview and total time of the default request (4 images,
25 steps of the default sampler at the default guidance), against the same request sampled without
previews by `mrdit.pipeline.Pipeline` in this process (what streaming adds, transport included).

    python bench/app_latency.py [--model mrdit-emoji-32] [--repeat 5] [--out bench/results/app-latency.json]

On the CPU the app compiles its network in the background after loading it: the bench waits until the
server is idle again, then compiles the in-process reference the same way, then runs untimed rounds
(a compiled network compiles again on its first calls at a new batch size) before the timed ones.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from app_server import ROOT, generate_inputs, served_app, wait_until_idle
from mrdit.checkpoint import resolve_model_dir
from mrdit.compiled import FastForward
from mrdit.pipeline import DEFAULT_GUIDANCE, DEFAULT_SAMPLER, Pipeline
from report import print_config, write_json
from timing import summarise, time_once

LABEL = "face"
PAUSE_S = 0.5  # between the server's run and this process's, so that neither's idle threads still spin


def app_default_model(client) -> str:
    """The model the app's /generate uses when a request names none."""
    params = client.view_api(print_info=False, return_format="dict")["named_endpoints"]["/generate"]["parameters"]
    return next(q["parameter_default"] for q in params if q["parameter_name"] == "model")


def reference_pipeline(model: str, compile: bool) -> tuple[Pipeline, float]:
    """The app's model loaded as the app loads it (weights/ first, then the Hub), compiled in the
    background as the app does on the CPU and waited for; returns it and the compile's seconds."""
    local = ROOT / "weights" / model
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = Pipeline.from_pretrained(local if local.is_dir() else resolve_model_dir(model), device=device)
    t0 = time.perf_counter()
    thread = pipe.compile_in_background() if compile else None
    if thread is not None:
        thread.join()
    return pipe, time.perf_counter() - t0


def streamed(client, inputs: dict) -> tuple[float, float]:
    """One /generate request: (seconds to its first streamed update, seconds to its end)."""
    t0 = time.perf_counter()
    job = client.submit(**inputs, api_name="/generate")
    first = None
    for _ in job:
        first = first or time.perf_counter() - t0
    job.result()  # raises the app's error, if any
    return first if first is not None else time.perf_counter() - t0, time.perf_counter() - t0


def plain(pipe: Pipeline, inputs: dict) -> float:
    """Seconds of the same request sampled and decoded in this process, without previews."""
    n, seed = inputs["num_images"], inputs["seed"]
    return time_once(
        lambda: pipe.generate(
            [inputs["class_label"]] * n,
            list(range(seed, seed + n)),
            steps=inputs["steps"],
            guidance=inputs["guidance"],
            sampler=inputs["sampler"],
        ),
        pipe.device,
    )


def request(args: argparse.Namespace, model: str, seed: int) -> dict:
    """The default request of the app's first tab for `model`, at this seed."""
    return generate_inputs(LABEL, seed, args.steps, args.images, DEFAULT_SAMPLER, DEFAULT_GUIDANCE) | {"model": model}


def measure_rounds(client, pipe: Pipeline, args: argparse.Namespace, model: str) -> dict:
    """`--warmup` untimed rounds, then `--repeat` timed ones, each one streamed request and one plain
    run (interleaved, so a machine whose speed drifts is compared with itself); medians."""
    first, total, alone = [], [], []
    for r in range(args.warmup + args.repeat):
        f, t = streamed(client, request(args, model, r))
        time.sleep(PAUSE_S)
        s = plain(pipe, request(args, model, r))
        time.sleep(PAUSE_S)
        if r >= args.warmup:
            first.append(f)
            total.append(t)
            alone.append(s)
    res = {
        "first_preview_s": summarise(first).median_s,
        "streamed_total_s": summarise(total).median_s,
        "plain_sampling_s": summarise(alone).median_s,
        "rounds": [{"first_preview_s": f, "streamed_s": t, "plain_s": s} for f, t, s in zip(first, total, alone)],
    }
    res["streaming_overhead"] = res["streamed_total_s"] / res["plain_sampling_s"] - 1
    return res


def summary(res: dict) -> str:
    return (
        f"first preview after {res['first_preview_s'] * 1000:.0f} ms; {res['images']} images streamed in "
        f"{res['streamed_total_s']:.2f} s vs {res['plain_sampling_s']:.2f} s without previews "
        f"({res['streaming_overhead'] * 100:+.0f}%)"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default=None, help="a model under weights/ or a Hub id (default: the app's default)")
    p.add_argument("--repeat", type=int, default=5, help="timed rounds")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds before them")
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--no-compile", action="store_true", help="serve the plain network (MRDIT_COMPILE=0)")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    print_config(args)
    from gradio_client import Client

    with served_app(args.model, compile=not args.no_compile) as server:
        client = Client(server.url, verbose=False)
        model = args.model or app_default_model(client)
        t0 = time.perf_counter()
        streamed(client, request(args, model, 0))  # loads the model; on the CPU the app starts compiling it
        settled_s = time.perf_counter() - t0 + wait_until_idle(server.process)
        pipe, compile_s = reference_pipeline(model, compile=not args.no_compile)
        state = pipe.net.compile_state if isinstance(pipe.net, FastForward) else "off"
        print(f"server idle {settled_s:.0f} s after its first request; reference network: {state} ({compile_s:.0f} s)")
        res = {"model": model, "compiled": state == "ready", "images": args.images, "steps": args.steps}
        res |= {"server_settled_s": settled_s, "reference_compile_s": compile_s}
        res |= measure_rounds(client, pipe, args, model)
    print(summary(res))
    write_json(args.out, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
