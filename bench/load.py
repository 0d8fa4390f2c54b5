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
import os
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port: int, model: str | None) -> subprocess.Popen:
    env = os.environ | {
        "GRADIO_SERVER_PORT": str(port),
        "GRADIO_SERVER_NAME": "127.0.0.1",
        "GRADIO_ANALYTICS_ENABLED": "False",
    }
    if model:
        env["MRDIT_MODEL"] = model
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "app.py")], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return proc
        except OSError:
            if proc.poll() is not None:
                raise SystemExit("error: the app exited during start-up") from None
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("error: the app did not start within 120 s")


def rss_tree(proc: psutil.Process) -> int:
    try:
        return proc.memory_info().rss + sum(c.memory_info().rss for c in proc.children(recursive=True))
    except psutil.Error:
        return 0


def run_load(url: str, users: int, seconds: float, steps: int, images: int) -> dict:
    from gradio_client import Client

    lock = threading.Lock()
    latencies: list[float] = []
    counts = {"completed": 0, "errors": 0, "queue_full": 0, "isolation_violations": 0, "step_mode_steps": 0}
    messages: list[str] = []
    stop_at = time.time() + seconds

    def record(kind: str, msg: str = "") -> None:
        with lock:
            counts[kind] += 1
            if msg and len(messages) < 20:
                messages.append(msg[:200])

    def user(i: int) -> None:
        try:
            client = Client(url, verbose=False)
        except Exception as e:
            record("errors", f"connect: {e}")
            return
        stepper = i % 4 == 3
        while time.time() < stop_at:
            t0 = time.perf_counter()
            try:
                if stepper:
                    client.predict(
                        class_label="heart",
                        seed=i,
                        steps=steps,
                        guidance=2.0,
                        sampler="ddim",
                        num_images=1,
                        api_name="/step_start",
                    )
                    for k in range(1, steps + 1):
                        if time.time() >= stop_at:
                            break
                        out = client.predict(api_name="/step_next")
                        status = out[2] if isinstance(out, (list, tuple)) else str(out)
                        m = re.search(r"step (\d+) / (\d+)", status)
                        if not m or int(m.group(1)) != k:
                            record("isolation_violations", f"user {i} expected step {k}, saw {status!r}")
                        with lock:
                            counts["step_mode_steps"] += 1
                else:
                    client.predict(
                        class_label="face",
                        seed=i,
                        steps=steps,
                        guidance=2.0,
                        sampler="dpm++2m",
                        num_images=images,
                        api_name="/generate",
                    )
                with lock:
                    latencies.append(time.perf_counter() - t0)
                record("completed")
            except Exception as e:
                text = str(e)
                if "queue" in text.lower() and "full" in text.lower():
                    record("queue_full")
                    time.sleep(0.5)
                else:
                    record("errors", f"user {i}: {type(e).__name__}: {text}")

    threads = [threading.Thread(target=user, args=(i,), daemon=True) for i in range(users)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=seconds + 300)
    lat = sorted(latencies)
    return counts | {
        "p50_s": statistics.median(lat) if lat else None,
        "p95_s": lat[int(0.95 * (len(lat) - 1))] if lat else None,
        "error_messages": messages,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--users", type=int, default=16, help="concurrent users (at most 64)")
    p.add_argument("--seconds", type=float, default=60, help="duration (at most 600)")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--model", default=None, help="model for the app (default: its own default)")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if not 1 <= args.users <= 64 or not 1 <= args.seconds <= 600:
        p.error("--users must be in [1, 64] and --seconds in [1, 600]")
    print("config:", json.dumps({k: str(v) for k, v in vars(args).items()}))
    port = free_port()
    proc = start_server(port, args.model)
    ps = psutil.Process(proc.pid)
    url = f"http://127.0.0.1:{port}/"
    try:
        from gradio_client import Client

        Client(url, verbose=False).predict(
            class_label="face", seed=0, steps=2, guidance=2.0, sampler="ddim", num_images=1, api_name="/generate"
        )
        start_mem = rss_tree(ps)
        peak = {"rss": start_mem}
        done = threading.Event()

        def watch() -> None:
            while not done.is_set():
                peak["rss"] = max(peak["rss"], rss_tree(ps))
                time.sleep(0.2)

        w = threading.Thread(target=watch, daemon=True)
        w.start()
        res = run_load(url, args.users, args.seconds, args.steps, args.images)
        done.set()
        w.join()
        alive = proc.poll() is None
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
    res |= {
        "users": args.users,
        "seconds": args.seconds,
        "server_alive": alive,
        "start_mem_mb": start_mem / 2**20,
        "peak_mem_mb": peak["rss"] / 2**20,
        "mem_growth_mb": (peak["rss"] - start_mem) / 2**20,
    }
    print(json.dumps(res, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=2))
    return 0 if alive and res["errors"] == 0 and res["isolation_violations"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
