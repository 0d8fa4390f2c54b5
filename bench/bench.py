"""Speed benchmarks of mrdit, on the CPU or a GPU: prints a table and writes JSON.

    python bench/bench.py --preset dimr-xl-2r --device cuda --out bench/results/h100.json   # the GPU targets
    python bench/bench.py --model weights/mrdit-emoji-32 --out bench/results/cpu-emoji.json # the CPU demo model

Measures: training img/s and peak memory (with and without activation checkpointing), one forward
at several batch sizes, end-to-end guided sampling latency (250-step dpm-fast, 25-step dpm++2m),
model FLOPs (torch.utils.flop_counter) and the achieved fraction of a matrix-multiply rate measured in
the same run. No gradio or diffusers needed.

    python bench/bench.py --preset dimr-xl-2r --device cuda --skip forward sampling \
        --train-cases 128:ckpt 128:blocks@0.25      # eager checkpointed vs compiled blocks + memory budget
    python bench/bench.py --preset dimr-xl-2r --device cuda --skip train sampling --forward-batches 256 \
        --forward-variants compile-blocks --profile  # where a compiled forward's time goes
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from mrdit import build_model, get_preset, load_model
from mrdit.fast import FastForward
from mrdit.losses import multiscale_loss
from mrdit.sampling import noise_for_seeds, sample
from mrdit.training import TrainConfig, compile_for_training, compile_regions, make_optimizer

FORWARD_VARIANTS = ("eager", "graphs", "compile", "compile+graphs", "compile-blocks")
TRAIN_MODES = ("plain", "ckpt", "compile", "compile+ckpt", "blocks", "blocks+ckpt")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device, warmup: int = 2, repeat: int = 5) -> float:
    """Median seconds of `fn()` after warm-up."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int, warmup: int = 2, repeat: int = 5) -> float:
    """Achieved FLOP/s of a square matrix multiply of size n (the machine's practical peak)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    s = timed(lambda: a @ b, device, warmup=warmup, repeat=repeat)
    return 2 * n**3 / s


def forward_flops(model, batch: int, device) -> float:
    c = model.config
    x = torch.randn(batch, c.channels, c.image_size, c.image_size, device=device)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(x, torch.full((batch,), 500.0, device=device), torch.zeros(batch, dtype=torch.long, device=device))
    return float(fc.get_total_flops())


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def bench_forward(
    model, batches, device, amp, variant: str, fast: FastForward | None = None, profile: bool = False
) -> dict:
    """Seconds per forward at each batch, and the first call's seconds (any compile or capture):
    `eager`, `graphs` (FastForward's CUDA graph replay), `compile` (torch.compile, default mode),
    `compile+graphs` (FastForward's graphs of the compiled network; pass `fast` to share its compiled
    code with the sampling cases) or `compile-blocks` (each block compiled in place). `profile`: also
    the top kernels of one forward at the largest batch."""
    if variant in ("graphs", "compile+graphs") and fast is None:
        fast = FastForward(model, amp, cuda_graphs=True, compile=variant == "compile+graphs")
    net = torch.compile(model) if variant == "compile" else model
    with compiled_blocks(model, variant == "compile-blocks"):
        return _bench_forward(model.config, net, batches, device, amp, fast, profile)


def top_kernels(fn, device: torch.device, rows: int = 15) -> tuple[list[dict], str]:
    """Profile one call of `fn`: the kernels (or CPU ops) taking the most device time."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        fn()
        sync(device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)[:rows]
    top = [{"name": e.key[:120], "calls": e.count, "ms": getattr(e, key) / 1000} for e in events]
    table = "\n".join(f"{r['ms']:9.2f} ms {r['calls']:5d}x  {r['name']}" for r in top)
    return top, table


def _bench_forward(c, net, batches, device, amp, fast: FastForward | None, profile: bool) -> dict:
    out, first = {}, {}
    for b in batches:
        x = torch.randn(b, c.channels, c.image_size, c.image_size, device=device)
        t = torch.full((1,), 500.0, device=device)
        y = torch.zeros(b, dtype=torch.long, device=device)

        def run(x=x, t=t, y=y):
            if fast is not None:
                fast(x, t, y)
                return
            with torch.no_grad(), autocast(device, amp):
                net(x, t, y)

        sync(device)
        t0 = time.perf_counter()
        run()
        sync(device)
        first[b] = time.perf_counter() - t0
        out[b] = timed(run, device)
        if profile and b == max(batches):
            prof, prof_table = top_kernels(run, device)
        if fast is not None:
            fast.clear()
    res = {"median_s": out, "first_call_s": first}
    if profile:
        res["profile"], res["profile_table"] = prof, prof_table
    return res


@contextlib.contextmanager
def memory_budget_scope(memory_budget: float | None):
    """For the duration, a compiled backward keeps only this fraction (0..1] of the activations and
    recomputes the rest (torch._functorch.config.activation_memory_budget). Compiled code is not
    guarded on the budget, so compiled code is dropped on entry and exit."""
    if memory_budget is None:
        yield
        return
    import torch._functorch.config as functorch_config

    torch._dynamo.reset()
    try:
        with functorch_config.patch(activation_memory_budget=memory_budget):
            yield
    finally:
        torch._dynamo.reset()


@contextlib.contextmanager
def compiled_blocks(model, enabled: bool = True):
    """Regional compilation for the duration: each block, skip join and upsampler compiled in place
    (identical modules share the compiled code), back to the plain forward afterwards."""
    if not enabled:
        yield
        return
    compile_for_training(model, "blocks")
    try:
        yield
    finally:
        for blk in compile_regions(model):
            blk._compiled_call_impl = None  # nn.Module.compile is in place


def parse_train_case(spec: str) -> tuple[int, str, float | None]:
    """'128:blocks+ckpt' or '128:blocks@0.5' -> (batch, mode, memory budget)."""
    try:
        batch, rest = spec.split(":")
        mode, _, budget = rest.partition("@")
        if mode not in TRAIN_MODES:
            raise ValueError
        b = float(budget) if budget else None
        if b is not None and not 0 < b <= 1:
            raise ValueError
        return int(batch), mode, b
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"train case {spec!r}: expected BATCH:MODE[@BUDGET], MODE one of {', '.join(TRAIN_MODES)}, BUDGET in (0, 1]"
        ) from None


def bench_train(
    model,
    batch: int,
    device,
    amp,
    checkpointing: bool,
    steps: int,
    compiled: bool | str = False,
    memory_budget: float | None = None,
) -> dict:
    """Training img/s and peak memory. `compiled`: False, True (the whole model through torch.compile)
    or "blocks" (each block compiled in place, regional compilation: identical blocks share the compiled
    code, so it compiles in a fraction of the time and works inside activation checkpointing).
    `memory_budget`: see `memory_budget_scope`."""
    with memory_budget_scope(memory_budget), compiled_blocks(model, compiled == "blocks"):
        return _bench_train(model, batch, device, amp, checkpointing, steps, compiled)


def _bench_train(model, batch: int, device, amp, checkpointing: bool, steps: int, compiled: bool | str) -> dict:
    c = model.config
    model.train()
    model.set_grad_checkpointing(checkpointing)
    net = torch.compile(model) if compiled is True else model
    opt = make_optimizer(model, TrainConfig())
    x = torch.randn(batch, c.channels, c.image_size, c.image_size, device=device)
    n = torch.randint(1, 1001, (batch,), device=device).float()
    y = torch.randint(0, c.num_classes, (batch,), device=device)
    eps = torch.randn_like(x)
    scaler = torch.amp.GradScaler(enabled=amp == torch.float16)

    def step():
        with autocast(device, amp):
            preds = net(x, n, y)
        loss = multiscale_loss(preds, eps, c.loss_weights).mean()
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    s = timed(step, device, warmup=3 if compiled else 2, repeat=steps)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    model.zero_grad(set_to_none=True)
    model.set_grad_checkpointing(False)
    model.eval()
    return {"img_per_s": batch / s, "step_s": s, "peak_gib": peak}


def bench_sampling(net, device, runs, repeat: int, flops_per_run, mm_rate) -> tuple[dict, dict, dict]:
    """Per guided sampling run: median seconds, the network's median fraction of a matmul rate timed
    right after each run (interleaved, so a machine whose speed drifts is compared with itself), and
    the final images (for comparing variants)."""
    c = net.config
    out, fractions, images_out = {}, {}, {}
    for name, sampler, steps, images in runs:
        noise, gens = noise_for_seeds(list(range(images)), (c.channels, c.image_size, c.image_size), device)
        labels = torch.zeros(images, dtype=torch.long, device=device)

        def run(noise=noise, labels=labels, sampler=sampler, steps=steps, gens=gens):
            return sample(net, noise, labels, sampler=sampler, steps=steps, guidance=2.0, generators=gens)

        images_out[name] = run().float().cpu()  # also the warm-up
        times, fracs = [], []
        for _ in range(repeat):
            sync(device)
            t0 = time.perf_counter()
            run()
            sync(device)
            times.append(time.perf_counter() - t0)
            fracs.append(flops_per_run(name) / times[-1] / mm_rate())
        out[name] = sorted(times)[len(times) // 2]
        fractions[name] = sorted(fracs)[len(fracs) // 2]
    return out, fractions, images_out


def parse_inductor_setting(spec: str) -> tuple[str, object]:
    """'max_autotune=true' -> ('max_autotune', True): a torch._inductor.config setting for every compile
    in the run. Values are read as JSON where they parse (true, 3, 0.5) and as strings otherwise."""
    import torch._inductor.config as inductor_config

    key, sep, raw = spec.partition("=")
    if not sep or not hasattr(inductor_config, key):
        raise argparse.ArgumentTypeError(
            f"inductor setting {spec!r}: expected KEY=VALUE with KEY a torch._inductor.config name"
        )
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key, value


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    g = p.add_mutually_exclusive_group()
    g.add_argument("--preset", default=None, help="random weights of a preset (e.g. dimr-xl-2r)")
    g.add_argument("--model", type=Path, help="a model directory (e.g. weights/mrdit-emoji-32)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--amp",
        choices=["none", "bf16", "fp16"],
        default=None,
        help="autocast dtype (default: bf16 on GPU, none on CPU)",
    )
    p.add_argument("--forward-batches", type=int, nargs="+", default=None)
    p.add_argument("--train-batches", type=int, nargs="+", default=None)
    p.add_argument("--train-steps", type=int, default=5)
    p.add_argument("--train-compile", action="store_true", help="also time torch.compile training (largest batch)")
    p.add_argument(
        "--train-cases",
        nargs="+",
        type=parse_train_case,
        default=None,
        metavar="BATCH:MODE[@BUDGET]",
        help="time only these training cases, e.g. 128:ckpt 128:blocks+ckpt 128:blocks@0.4; MODE: "
        + ", ".join(TRAIN_MODES)
        + " (blocks: each block compiled in place); BUDGET: fraction of activations a compiled backward "
        "keeps (the rest is recomputed)",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="after each forward variant, profile one forward at the largest batch and record the top kernels",
    )
    p.add_argument("--forward-compile", action="store_true", help="also time torch.compile forwards")
    p.add_argument(
        "--forward-variants",
        nargs="+",
        choices=FORWARD_VARIANTS,
        default=None,
        help="time only these forward variants (default: eager, graphs on GPU, and the compiled ones with "
        "--forward-compile)",
    )
    p.add_argument(
        "--compile-batches",
        type=int,
        nargs="+",
        default=None,
        help="batches for the compiled forward variants (default: --forward-batches; each is a compile)",
    )
    p.add_argument(
        "--sampling-variants",
        nargs="+",
        default=None,
        metavar="NAME",
        help="time only these sampling cases (fp32, fp32+compile, bf16, bf16+graphs, bf16+compile+graphs; "
        "fp32 is the reference for the error column)",
    )
    p.add_argument("--no-compile", action="store_true", help="CPU: skip the compiled sampling case")
    p.add_argument(
        "--sampling-compile", action="store_true", help="GPU: also time sampling with graphs of the compiled network"
    )
    p.add_argument("--sampling-repeat", type=int, default=3, help="timed sampling runs per case (median)")
    p.add_argument("--images", type=int, default=None, help="images per sampling run (default 1 on GPU, 4 on CPU)")
    p.add_argument("--skip", nargs="*", default=[], choices=["train", "forward", "sampling"])
    p.add_argument("--threads", type=int, default=0)
    p.add_argument(
        "--inductor",
        nargs="+",
        type=parse_inductor_setting,
        default=[],
        metavar="KEY=VALUE",
        help="compiler settings for every compiled case, e.g. max_autotune=true coordinate_descent_tuning=true",
    )
    p.add_argument("--out", type=Path, help="JSON results file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    inductor_settings = {}
    if args.inductor:
        import torch._inductor.config as inductor_config

        for key, value in args.inductor:
            setattr(inductor_config, key, value)
        inductor_settings = {key: getattr(inductor_config, key) for key, _ in args.inductor}  # as in effect
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    amp_name = args.amp or ("bf16" if gpu else "none")
    amp = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp_name]
    forward_batches = args.forward_batches or ([2, 8, 32, 256] if gpu else [1, 4, 8])
    train_batches = args.train_batches or ([64, 128] if gpu else [32])
    images = args.images or (1 if gpu else 4)
    config = vars(args) | {
        "amp": amp_name,
        "forward_batches": forward_batches,
        "train_batches": train_batches,
        "images": images,
    }
    print("config:", json.dumps(config, default=str))

    model = (
        load_model(args.model, device=device)
        if args.model
        else build_model(get_preset(args.preset or "dimr-xl-2r"), device=device).eval()
    )
    name = str(args.model or args.preset or "dimr-xl-2r")
    res: dict = {
        "model": name,
        "device": torch.cuda.get_device_name(0)
        if gpu
        else f"CPU {platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "amp": amp_name,
        "params": sum(p.numel() for p in model.parameters()),
        "inductor": inductor_settings,
    }

    def save() -> None:
        """Results so far, written after every section (a run cut short keeps what it measured)."""
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(res, indent=2, default=str))

    mm_dtype = amp if (gpu and amp is not None) else torch.float32
    res["matmul_tflops"] = matmul_rate(device, mm_dtype, 8192 if gpu else 1024) / 1e12
    flops1 = forward_flops(model, 1, device)
    res["gflops_per_image_forward"] = flops1 / 1e9
    print(
        f"{name}: {res['params']:,} parameters, {flops1 / 2e9:.2f} GMAC per image forward; matmul {res['matmul_tflops']:.3f} TFLOP/s ({mm_dtype})"
    )

    # One FastForward of the compiled network, shared by the forward and sampling cases: its compiled
    # code (minutes per shape for a large model) is reused, only the graphs are recaptured.
    shared: dict[str, FastForward] = {}

    def compiled_graphs() -> FastForward:
        if "fast" not in shared:
            shared["fast"] = FastForward(model, amp, cuda_graphs=True, compile=True)
        return shared["fast"]

    if "forward" not in args.skip:
        res["forward_s"], res["forward_first_call_s"] = {}, {}
        variants = args.forward_variants or (
            (["eager", "graphs"] if gpu else ["eager"])
            + ((["compile", "compile+graphs"] if gpu else ["compile"]) if args.forward_compile else [])
        )
        for variant in variants:
            if variant in ("graphs", "compile+graphs") and not gpu:
                p.error(f"forward variant {variant} needs a CUDA device")
            is_compiled = variant in ("compile", "compile+graphs")
            batches = (args.compile_batches or forward_batches) if is_compiled else forward_batches
            fast = compiled_graphs() if variant == "compile+graphs" else None
            r = bench_forward(model, batches, device, amp, variant, fast, profile=args.profile)
            res["forward_s"][variant], res["forward_first_call_s"][variant] = r["median_s"], r["first_call_s"]
            if "profile" in r:
                res.setdefault("forward_profile", {})[variant] = r["profile"]
                print(f"profile of {variant}, batch {max(batches)}:\n{r['profile_table']}")
            if fast is not None:  # a failed compile falls back to graphs of the plain network: say so
                res["compile_state"] = fast.compile_state
                print(f"compile+graphs: {fast.compile_state}")
            save()
            for b, s in r["median_s"].items():
                tf = flops1 * b / s / 1e12
                print(
                    f"forward {variant:6s} batch {b:4d}: {s * 1000:8.1f} ms  ({tf:.3f} TFLOP/s, {tf / res['matmul_tflops'] * 100:.0f}% of matmul; "
                    f"first call {r['first_call_s'][b]:.1f} s)"
                )
    save()
    if "sampling" not in args.skip:
        runs = [("dpm++2m_25", "dpm++2m", 25, images)]
        if gpu:
            runs.append(("dpm-fast_250", "dpm-fast", 250, images))
        # fp32: the model as is; amp: FastForward autocast; graphs: FastForward with CUDA graph replay.
        variants = {"fp32": model}
        cpu_compile_wanted = not args.sampling_variants or "fp32+compile" in args.sampling_variants
        if not gpu and not args.no_compile and cpu_compile_wanted:
            compiled = FastForward(model, None, cuda_graphs=False, compile=True)
            t0 = time.perf_counter()
            compiled.warm_up((2, 16))
            res["compile_warm_up_s"] = time.perf_counter() - t0
            print(
                f"torch.compile warm-up (batches 2 and 16): {res['compile_warm_up_s']:.1f} s, {compiled.compile_state}"
            )
            variants["fp32+compile"] = compiled
        if amp is not None:
            variants[amp_name] = FastForward(model, amp, cuda_graphs=False)
            if gpu:
                variants[f"{amp_name}+graphs"] = FastForward(model, amp, cuda_graphs=True)
                if args.sampling_compile:  # compiles in the first (untimed) run, unless a forward case did
                    variants[f"{amp_name}+compile+graphs"] = compiled_graphs()
        if args.sampling_variants:
            unknown = sorted(set(args.sampling_variants) - set(variants))
            if unknown:
                p.error(
                    f"--sampling-variants: {', '.join(unknown)} not available here (available: {', '.join(variants)})"
                )
            variants = {k: v for k, v in variants.items() if k in args.sampling_variants}
        res["sampling_s"], res["sampling_fraction_of_matmul"], res["sampling_rel_err_vs_fp32"] = {}, {}, {}
        reference: dict = {}
        for variant, net in variants.items():
            todo = runs if (variant != "fp32" or not gpu) else runs[:1]  # 250 fp32 steps add little
            times, fractions, finals = bench_sampling(
                net,
                device,
                todo,
                args.sampling_repeat,
                lambda k: flops1 * images * 2 * int(k.split("_")[1]),  # guided: two forwards per step
                lambda: matmul_rate(device, mm_dtype, 8192 if gpu else 1024, warmup=1, repeat=3),
            )
            for k, s in times.items():
                steps = int(k.split("_")[1])
                achieved = flops1 * images * 2 * steps / s
                key = f"{variant}/{k}"
                res["sampling_s"][key] = s
                res["sampling_fraction_of_matmul"][key] = fractions[k]
                err = ""
                if variant == "fp32":
                    reference[k] = finals[k]
                elif k in reference:
                    e = float((finals[k] - reference[k]).norm() / reference[k].norm())
                    res["sampling_rel_err_vs_fp32"][key] = e
                    err = f"; final image rel. error vs fp32 {e:.1e}"
                print(
                    f"sampling {key} ({images} images, guided): {s:.3f} s; network {achieved / 1e9:.1f} GFLOP/s = "
                    f"{fractions[k] * 100:.0f}% of the matmul rate timed beside it{err}"
                )
            if isinstance(net, FastForward):
                net.clear()
    save()
    if "train" not in args.skip:
        res["train"] = {}
        if args.train_cases:
            cases = args.train_cases
        else:
            cases = [(b, mode, None) for b in train_batches for mode in ("plain", "ckpt")]
            if args.train_compile:
                cases.append((max(train_batches), "compile", None))
        for b, mode, budget in cases:
            ckpt = mode.endswith("ckpt")
            compiled = {"compile": True, "blocks": "blocks"}.get(mode.split("+")[0], False)
            suffix = {False: "", True: "_compile", "blocks": "_compile_blocks"}[compiled]
            key = f"b{b}_{'ckpt' if ckpt else 'nockpt'}{suffix}" + (f"_budget{budget:g}" if budget else "")
            try:
                r = bench_train(model, b, device, amp, ckpt, args.train_steps, compiled, budget)
            except torch.OutOfMemoryError:
                r = {"error": "out of memory"}
                torch.cuda.empty_cache()
            res["train"][key] = r
            save()
            if "error" in r:
                print(f"train {key}: out of memory")
            else:
                tf = flops1 * 3 * r["img_per_s"] / 1e12
                mem = f", peak {r['peak_gib']:.1f} GiB" if r["peak_gib"] is not None else ""
                print(
                    f"train {key}: {r['img_per_s']:.1f} img/s ({tf:.3f} TFLOP/s, {tf / res['matmul_tflops'] * 100:.0f}% of matmul){mem}"
                )
    save()
    if args.out:
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
