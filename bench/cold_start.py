"""Cold start: the first default request, sent the moment the server accepts connections, against the
same request sent a minute later (loopback only).

    python bench/cold_start.py --baseline-env MRDIT_COMPILE=1 --out bench/results/cold-start.json

Starts `python app.py`, sends the app's default Generate request (4 images, 25 steps, the default
sampler and guidance) as soon as the port accepts, waits until `--later` seconds after that request was
sent (and until the server's CPU is quiet, so that a background compile has finished), then sends the
same request `--repeats` times. Reports the cold time, the later times and their
ratio (cold / median later). With `--baseline-env` it first measures a server with those settings.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from app_server import baseline_then_measured, generate_inputs, served_app, server_parser, wait_until_idle
from mrdit.pipeline import DEFAULT_GUIDANCE, DEFAULT_SAMPLER
from report import print_config, write_json


def timed_request(client, inputs: dict) -> float:
    t0 = time.perf_counter()
    client.predict(**inputs, api_name="/generate")
    return time.perf_counter() - t0


def measure_server(args: argparse.Namespace, extra_env: dict[str, str], root: Path) -> dict:
    """Cold request at once, then the same request `args.later` seconds after it was sent."""
    from gradio_client import Client

    inputs = generate_inputs("face", 0, args.steps, args.images, DEFAULT_SAMPLER, DEFAULT_GUIDANCE)
    with served_app(args.model, extra_env=extra_env, root=root) as server:
        sent = time.perf_counter()
        client = Client(server.url, verbose=False)  # reads the app's config: part of a user's first click
        timed_request(client, inputs)
        cold_total = time.perf_counter() - sent
        time.sleep(max(0.0, args.later - (time.perf_counter() - sent)))
        wait_until_idle(server.process)  # a compile still going would slow the reference: let it finish
        waited = time.perf_counter() - sent
        later = [timed_request(client, inputs) for _ in range(args.repeats)]
    return {
        "env": extra_env,
        "cold_s": cold_total,
        "later_s": later,
        "later_sent_after_s": waited,
        "ratio": cold_total / statistics.median(later),
    }


def main(argv: list[str] | None = None) -> int:
    p = server_parser(__doc__, "e.g. MRDIT_COMPILE_IDLE=0: compile at once, as before")
    p.add_argument("--later", type=float, default=60, help="seconds after the cold request to send it again")
    p.add_argument("--repeats", type=int, default=3, help="later requests (their median is the reference)")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.later < 0:
        p.error("--repeats must be >= 1 and --later >= 0")
    print_config(args)
    res = baseline_then_measured(args, measure_server)
    for name, r in res.items():
        later = ", ".join(f"{t:.2f}" for t in r["later_s"])
        print(f"{name} {r['env']}: cold {r['cold_s']:.2f} s, later {later} s, ratio {r['ratio']:.2f}")
    write_json(args.out, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
