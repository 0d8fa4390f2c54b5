"""What per-step previews add to the default request: two servers side by side, one streaming previews
(the app as shipped) and one with MRDIT_PREVIEWS=0 (final step only), timed in alternation.

    python bench/stream_overhead.py --rounds 8 --out bench/results/stream-overhead.json

Both servers start, answer a warm-up request and are left to finish their background compile; then
the same default request (4 images, 25 steps of the default sampler at the default guidance, through
gradio_client) goes to one, then the other, `--rounds` times, so that other load on the machine
affects both alike. Reports each server's median and quartiles and the ratio of the medians.
"""

from __future__ import annotations

import contextlib
import sys
import time

from app_server import env_pairs, generate_inputs, served_app, server_parser, wait_until_idle
from mrdit.pipeline import DEFAULT_GUIDANCE, DEFAULT_SAMPLER
from report import print_config, write_json
from timing import summarise


def timed(client, inputs: dict) -> float:
    t0 = time.perf_counter()
    client.predict(**inputs, api_name="/generate")
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = server_parser(__doc__, "default MRDIT_PREVIEWS=0: no previews")
    p.add_argument("--rounds", type=int, default=8, help="timed requests per server, alternating")
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error("--rounds must be >= 1")
    if args.baseline_rev is not None:
        p.error("--baseline-rev is not supported here: both servers run this checkout, alternating")
    baseline_env = env_pairs(["MRDIT_PREVIEWS=0"] if args.baseline_env is None else args.baseline_env)
    print_config(args)
    from gradio_client import Client

    inputs = generate_inputs("face", 0, args.steps, args.images, DEFAULT_SAMPLER, DEFAULT_GUIDANCE)
    envs = {"baseline": baseline_env, "measured": env_pairs(args.env)}
    with contextlib.ExitStack() as stack:
        servers = {k: stack.enter_context(served_app(args.model, extra_env=env)) for k, env in envs.items()}
        # The client keeps the frames on the server (download_files=False): a browser elsewhere fetches them on
        # its own cores, while a client here would compete with the server for these.
        clients = {k: Client(s.url, verbose=False, download_files=False) for k, s in servers.items()}
        for k, c in clients.items():
            timed(c, inputs)
            wait_until_idle(servers[k].process)
        for c in clients.values():  # a compiled network recompiles on its first calls at a new shape
            timed(c, inputs)
        times: dict[str, list[float]] = {k: [] for k in clients}
        for _ in range(args.rounds):
            for k, c in clients.items():
                times[k].append(timed(c, inputs))
    stats = {k: summarise(v) for k, v in times.items()}
    res = {k: {"env": envs[k], "times_s": v, "median_s": stats[k].median_s, "quartiles_s": stats[k].quartiles_s}
           for k, v in times.items()}
    res["ratio"] = stats["measured"].median_s / stats["baseline"].median_s
    on, off = stats["measured"].median_s, stats["baseline"].median_s
    print(f"previews on {on:.3f} s, off {off:.3f} s (medians of {args.rounds}): previews add {(on / off - 1):+.1%}")
    write_json(args.out, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
