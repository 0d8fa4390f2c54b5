"""Load test: start the app, run N concurrent gradio_client users for T seconds (loopback only).

    python bench/load.py --users 16 --seconds 60 --out bench/results/load.json

Each user is its own session. Most users call /generate with the default settings; every fourth one
walks step mode (/step_start, then /step_next) and checks that its step counter advances 1, 2, 3...
whatever the others do (one session's state never visible to another). Reports completed requests,
p50/p95 latency, errors, clean "queue full" rejections and the server's memory (start, peak, growth).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import threading
import time
from pathlib import Path

import psutil

from app_server import (
    app_client,
    baseline_then_measured,
    cpu_tree_seconds,
    generate_inputs,
    rss_tree_bytes,
    served_app,
    server_parser,
    wait_until_idle,
)
from report import print_config, write_json


class Tally:
    """Counts and the first error messages, shared by the users' threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.latencies: list[float] = []
        self.generate_latencies: list[float] = []  # /generate requests only (not step-mode walks)
        self.counts = {"completed": 0, "errors": 0, "queue_full": 0, "isolation_violations": 0, "step_mode_steps": 0}
        self.messages: list[str] = []

    def record(self, kind: str, msg: str = "") -> None:
        with self.lock:
            self.counts[kind] += 1
            if msg and len(self.messages) < 20:
                self.messages.append(msg[:200])

    def summary(self) -> dict:
        return self.counts | quantiles("", self.latencies) | quantiles("generate_", self.generate_latencies) | {
            "error_messages": self.messages,
        }


def quantiles(prefix: str, latencies: list[float]) -> dict:
    lat = sorted(latencies)
    return {
        f"{prefix}p50_s": statistics.median(lat) if lat else None,
        f"{prefix}p95_s": lat[int(0.95 * (len(lat) - 1))] if lat else None,
    }


def walk_steps(client, i: int, steps: int, stop_at: float, tally: Tally) -> None:
    """Step mode: /step_start, then /step_next until done, checking the session's step counter."""
    client.predict(**generate_inputs("heart", i, steps, 1, "ddim"), api_name="/step_start")
    for k in range(1, steps + 1):
        if time.time() >= stop_at:
            break
        out = client.predict(api_name="/step_next")
        status = out[2] if isinstance(out, (list, tuple)) else str(out)
        m = re.search(r"step (\d+) / (\d+)", status)
        if not m or int(m.group(1)) != k:
            tally.record("isolation_violations", f"user {i} expected step {k}, saw {status!r}")
        tally.record("step_mode_steps")


def user(url: str, i: int, steps: int, images: int, stop_at: float, tally: Tally, shared_tls: bool) -> None:
    """One session: requests back to back until `stop_at`; every fourth user walks step mode."""
    try:
        client = app_client(url, shared_tls)
    except Exception as e:
        tally.record("errors", f"connect: {e}")
        return
    while time.time() < stop_at:
        t0 = time.perf_counter()
        try:
            if i % 4 == 3:
                walk_steps(client, i, steps, stop_at, tally)
            else:
                client.predict(**generate_inputs("face", i, steps, images, "dpm++2m"), api_name="/generate")
            with tally.lock:
                tally.latencies.append(time.perf_counter() - t0)
                if i % 4 != 3:
                    tally.generate_latencies.append(tally.latencies[-1])
            tally.record("completed")
        except Exception as e:
            text = str(e)
            if "queue" in text.lower() and "full" in text.lower():
                tally.record("queue_full")
                time.sleep(0.5)
            else:
                tally.record("errors", f"user {i}: {type(e).__name__}: {text}")


def run_load(url: str, users: int, seconds: float, steps: int, images: int, shared_tls: bool = True) -> dict:
    """`users` concurrent sessions for `seconds`: counts, latency quantiles and the first errors."""
    tally, stop_at = Tally(), time.time() + seconds
    threads = [
        threading.Thread(target=user, args=(url, i, steps, images, stop_at, tally, shared_tls), daemon=True)
        for i in range(users)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=seconds + 300)
    return tally.summary()


def under_watch(proc: psutil.Process, fn) -> tuple[object, int, int]:
    """Run `fn()` while sampling the server's memory: (its result, memory before, peak memory)."""
    start = rss_tree_bytes(proc)
    peak = {"rss": start}
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            peak["rss"] = max(peak["rss"], rss_tree_bytes(proc))
            time.sleep(0.2)

    w = threading.Thread(target=watch, daemon=True)
    w.start()
    try:
        return fn(), start, peak["rss"]
    finally:
        done.set()
        w.join()


def measure_server(args: argparse.Namespace, extra_env: dict[str, str], root: Path) -> dict:
    """One served app (the checkout at `root`) under load: warmed by one request, its background
    compile left to finish (unless `args.no_settle`), then `args.users` users for `args.seconds`;
    counts, latencies and memory."""
    with served_app(args.model, extra_env=extra_env, root=root) as server:
        app_client(server.url).predict(**generate_inputs("face", 0, 2, 1, "ddim"), api_name="/generate")
        if not args.no_settle:
            wait_until_idle(server.process)
        load = lambda: run_load(server.url, args.users, args.seconds, args.steps, args.images, not args.tls_per_request)
        (res, start_mem, peak), cpu = with_cpu(server.process, lambda: under_watch(server.process, load))
        alive = server.alive()
    return res | {
        "env": extra_env,
        "no_settle": args.no_settle,
        "users": args.users,
        "seconds": args.seconds,
        "requests_per_s": res["completed"] / args.seconds,
        "server_alive": alive,
        "start_mem_mb": start_mem / 2**20,
        "peak_mem_mb": peak / 2**20,
        "mem_growth_mb": (peak - start_mem) / 2**20,
        "tls_per_request": args.tls_per_request,
        "cpu_s": cpu,
    }


def with_cpu(server: psutil.Process, fn) -> tuple[object, dict]:
    """Run `fn()`: (its result, CPU seconds used meanwhile by the server and by this load generator)."""
    me = psutil.Process()
    s0, m0 = cpu_tree_seconds(server), sum(me.cpu_times()[:2])
    out = fn()
    return out, {"server": cpu_tree_seconds(server) - s0, "load_generator": sum(me.cpu_times()[:2]) - m0}


def healthy(res: dict) -> bool:
    return res["server_alive"] and res["errors"] == 0 and res["isolation_violations"] == 0


def main(argv: list[str] | None = None) -> int:
    p = server_parser(__doc__, "e.g. MRDIT_BATCH=0: one request at a time, as before batching")
    p.add_argument("--users", type=int, default=16, help="concurrent users (at most 64)")
    p.add_argument("--seconds", type=float, default=60, help="duration (at most 600)")
    p.add_argument(
        "--no-settle",
        action="store_true",
        help="start the load right after the warm-up request instead of once the server is quiet "
        "(a background compile then runs during the load, as the first minute after a restart meets it)",
    )
    p.add_argument(
        "--tls-per-request",
        action="store_true",
        help="let every request of the load generator build its own TLS context, as gradio_client does "
        "by default (how the runs before the shared context were measured; it costs the generator more "
        "CPU than the server uses)",
    )
    args = p.parse_args(argv)
    if not 1 <= args.users <= 64 or not 1 <= args.seconds <= 600:
        p.error("--users must be in [1, 64] and --seconds in [1, 600]")
    print_config(args)
    runs = baseline_then_measured(args, measure_server)
    res = runs["measured"] if len(runs) == 1 else runs | {"ratios": ratios(runs["baseline"], runs["measured"])}
    print(json.dumps(res, indent=2))
    write_json(args.out, res, quiet=True)
    return 0 if all(healthy(r) for r in runs.values()) else 1


def ratios(base: dict, new: dict) -> dict:
    """Measured over baseline: throughput (higher is better) and latency quantiles (lower is better)."""
    per_s = new["requests_per_s"] / base["requests_per_s"] if base["requests_per_s"] else float("inf")
    out = {"requests_per_s": per_s}
    for q in ("p50_s", "p95_s", "generate_p50_s", "generate_p95_s"):
        if base.get(q) and new.get(q) is not None:
            out[q] = new[q] / base[q]
    return out


if __name__ == "__main__":
    sys.exit(main())
