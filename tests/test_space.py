"""Space readiness: ZeroGPU durations from the request, no compile there, the front matter and LFS."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import ROOT

from mrdit.space import BASE_SECONDS, MAX_SECONDS, SECONDS_PER_IMAGE_STEP, gpu_seconds, on_zero_gpu

sys.path.insert(0, str(ROOT))
import app  # noqa: E402


def test_duration_grows_with_steps_and_images_and_is_bounded():
    assert gpu_seconds(25, 4) == int(BASE_SECONDS + SECONDS_PER_IMAGE_STEP * 100)
    assert gpu_seconds(1, 1) < gpu_seconds(25, 1) < gpu_seconds(25, 8) <= gpu_seconds(1000, 16) == MAX_SECONDS
    assert gpu_seconds("abc", None) == gpu_seconds(1, 1)  # bad input fails inside the call, quickly


def test_app_requests_durations_from_each_event_functions_own_inputs():
    assert app.request_seconds(app.generate, "heart", 0, 25, 4.0, "ddim", 4, "m") == gpu_seconds(25, 4)
    assert app.request_seconds(app.generate, "heart", 0, steps=50, guidance=4.0, sampler="ddim") == gpu_seconds(50, 4)
    assert app.request_seconds(app.step_next, None) == gpu_seconds(1, 1)


def test_zero_gpu_is_detected_from_its_runtime_variable(monkeypatch):  # app.COMPILE is off when it is set
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    assert on_zero_gpu()
    monkeypatch.delenv("SPACES_ZERO_GPU")
    assert not on_zero_gpu()


def test_front_matter_and_lfs_attributes():
    readme = (ROOT / "README.md").read_text()
    front = readme.split("---")[1]
    assert "suggested_hardware:" in front and "preload_from_hub:" in front and "QHL067/DiMR DiMR-XL_2R" in front
    attrs = (ROOT / ".gitattributes").read_text()
    for pattern in ("*.safetensors", "*.png"):
        assert f"{pattern} filter=lfs diff=lfs merge=lfs -text" in attrs


ARENAS_CHILD = """
import ctypes, ctypes.util, sys, tempfile, threading
from mrdit.space import cap_malloc_arenas
applied = cap_malloc_arenas(int(sys.argv[1]))
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype = ctypes.c_void_p
libc.fopen.restype = ctypes.c_void_p
libc.fopen.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
libc.fclose.argtypes = [ctypes.c_void_p]
hold, ready = [], threading.Barrier(8)
def work():
    ready.wait()  # all threads allocate at once, as a server's workers do
    hold.extend(libc.malloc(1000) for _ in range(100))
threads = [threading.Thread(target=work) for _ in range(8)]
[t.start() for t in threads]
[t.join() for t in threads]
with tempfile.NamedTemporaryFile(suffix=".xml") as f:
    fp = libc.fopen(f.name.encode(), b"w")
    libc.malloc_info(0, fp)
    libc.fclose(fp)
    print(applied, open(f.name).read().count("<heap nr="))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_malloc_arenas_are_capped_for_the_server_threads():
    def heaps(arenas: int) -> tuple[str, int]:
        out = subprocess.run([sys.executable, "-c", ARENAS_CHILD, str(arenas)], capture_output=True, text=True, check=True)
        applied, count = out.stdout.split()
        return applied, int(count)

    assert heaps(1) == ("True", 1)
    applied, default = heaps(0)
    assert applied == "False" and default > 1  # glibc's default: more arenas for the same threads
