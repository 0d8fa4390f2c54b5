"""The app as a user meets it: `python app.py` started on a free loopback port, requests through
`gradio_client`, the server process's memory and CPU use. Shared by the app benchmarks."""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def server_env(
    port: int, model: str | None = None, compile: bool = True, extra: dict[str, str] | None = None
) -> dict[str, str]:
    """The environment `python app.py` reads: where to listen, the default model, the background
    compile, and `extra` settings (`MRDIT_BATCH=0`, say)."""
    env = os.environ | (extra or {}) | {
        "GRADIO_SERVER_PORT": str(port),
        "GRADIO_SERVER_NAME": HOST,
        "GRADIO_ANALYTICS_ENABLED": "False",
    }
    if model:
        env["MRDIT_MODEL"] = model
    if not compile:
        env["MRDIT_COMPILE"] = "0"
    return env


@dataclass(frozen=True)
class Server:
    """A running `python app.py`: where it listens and its process."""

    url: str
    popen: subprocess.Popen

    @property
    def process(self) -> psutil.Process:
        return psutil.Process(self.popen.pid)

    def alive(self) -> bool:
        return self.popen.poll() is None


@contextlib.contextmanager
def served_app(
    model: str | None = None,
    compile: bool = True,
    timeout: float = 120,
    extra_env: dict[str, str] | None = None,
    root: Path = ROOT,
) -> Iterator[Server]:
    """Run `python app.py` of the checkout at `root` until the block ends. A server that exits or does
    not listen within `timeout` seconds ends the benchmark with the tail of its log."""
    port = free_port()
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(
            [sys.executable, str(root / "app.py")],
            cwd=root,
            env=server_env(port, model, compile, extra_env),
            stdout=log,
            stderr=log,
        )
        try:
            wait_for_port(proc, port, timeout, log)
            yield Server(f"http://{HOST}:{port}/", proc)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


def wait_for_port(proc: subprocess.Popen, port: int, timeout: float, log) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with socket.create_connection((HOST, port), timeout=1):
                return
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.5)
    log.seek(0)
    tail = log.read()[-2000:]
    state = "exited during start-up" if proc.poll() is not None else f"did not start within {timeout:.0f} s"
    raise SystemExit(f"error: the app {state}; its log ends:\n{tail}")


def generate_inputs(label: str, seed: int, steps: int, images: int, sampler: str, guidance: float = 2.0) -> dict:
    """Keyword arguments of a /generate or /step_start request."""
    return {
        "class_label": label,
        "seed": seed,
        "steps": steps,
        "guidance": guidance,
        "sampler": sampler,
        "num_images": images,
    }


_TLS: ssl.SSLContext | None = None


def app_client(url: str, shared_tls: bool = True, **kwargs):
    """A `gradio_client.Client` of the served app. `gradio_client` opens a new HTTP client, and with it a
    new TLS context that loads the whole CA bundle (about 20 ms of CPU), for every request and every
    streamed file it downloads: under sixteen users that took more of the two cores than the server did
    (bench/NOTES.md). With `shared_tls` every request reuses one context instead, as a browser keeps
    its connections; the app is served over plain HTTP on loopback either way."""
    global _TLS
    from gradio_client import Client

    if shared_tls:
        if _TLS is None:
            _TLS = ssl.create_default_context()
        kwargs["ssl_verify"] = _TLS  # passed on as httpx's `verify`, which takes a context
    return Client(url, verbose=False, **kwargs)


def rss_tree_bytes(proc: psutil.Process) -> int:
    """Resident memory of a process and all its children (0 once it is gone)."""
    try:
        return proc.memory_info().rss + sum(c.memory_info().rss for c in proc.children(recursive=True))
    except psutil.Error:
        return 0


def cpu_tree_seconds(proc: psutil.Process) -> float:
    """CPU seconds used so far by a process and its live children."""
    total = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            total += t.user + t.system
    return total


def wait_until_idle(proc: psutil.Process, window: float = 2.0, busy: float = 0.1, timeout: float = 600) -> float:
    """Wait until the server uses less than `busy` of one core over a `window` (after its first
    request, its background compile is then done); returns the seconds until that quiet window began.
    Gives up after `timeout` seconds."""
    t0 = time.perf_counter()
    used = cpu_tree_seconds(proc)
    while time.perf_counter() - t0 < timeout:
        time.sleep(window)
        now = cpu_tree_seconds(proc)
        if now - used < busy * window:
            return time.perf_counter() - t0 - window
        used = now
    return time.perf_counter() - t0


def env_pairs(pairs: list[str]) -> dict[str, str]:
    """`KEY=VALUE` command-line pairs as a dict; anything else ends the benchmark with a clear error."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.isidentifier():
            raise SystemExit(f"error: expected KEY=VALUE, got {pair!r}")
        out[key] = value
    return out


def server_parser(doc: str, baseline_example: str) -> argparse.ArgumentParser:
    """A served-app benchmark's command line (`doc`: its docstring) with the options they all share:
    the request, the model, and the two servers' settings."""
    p = argparse.ArgumentParser(
        description=doc.split("\n\n")[0], epilog=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--model", default=None, help="model for the app (default: its own default)")
    p.add_argument("--env", nargs="*", default=[], metavar="KEY=VALUE", help="settings for the measured app")
    p.add_argument(
        "--baseline-env",
        nargs="*",
        metavar="KEY=VALUE",
        help=f"first measure the app with these settings ({baseline_example}), then with --env",
    )
    p.add_argument(
        "--baseline-rev",
        metavar="REV",
        help="first measure the app as of this git revision (exported to a temporary folder, with its own "
        "weights and settings from --baseline-env), then this checkout's with --env",
    )
    p.add_argument("--out", type=Path)
    return p


def baseline_then_measured(args: argparse.Namespace, measure) -> dict[str, dict]:
    """`measure(args, env, root)` for the baseline server (if `--baseline-env` or `--baseline-rev`) and
    then the measured one (this checkout)."""
    runs = {}
    if args.baseline_rev is not None:
        with exported_revision(args.baseline_rev) as root:
            runs["baseline"] = measure(args, env_pairs(args.baseline_env or []), root) | {"rev": args.baseline_rev}
    elif args.baseline_env is not None:
        runs["baseline"] = measure(args, env_pairs(args.baseline_env), ROOT)
    runs["measured"] = measure(args, env_pairs(args.env), ROOT)
    return runs


@contextlib.contextmanager
def exported_revision(rev: str) -> Iterator[Path]:
    """This repository's files as of git revision `rev`, in a temporary folder for the block. Its
    `app.py` imports that revision's `mrdit` (a script's own folder comes first on `sys.path`)."""
    with tempfile.TemporaryDirectory(prefix="mrdit-rev-") as tmp:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", rev], capture_output=True)
        if archive.returncode != 0:
            raise SystemExit(f"error: cannot export git revision {rev!r}: {archive.stderr.decode().strip()}")
        subprocess.run(["tar", "-x", "-C", tmp], input=archive.stdout, check=True)
        yield Path(tmp)
