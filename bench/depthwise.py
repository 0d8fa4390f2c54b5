"""Depthwise 7x7 convolution of the ConvNeXt branch, alone: which way of running it is fastest here.

    python bench/depthwise.py --device cuda --batch 256 --out bench/results/depthwise.json

Times forward and forward+backward of one depthwise convolution on channels-last activations
(B, H, W, D), as the ConvNeXt blocks hold them, for: the convolution on the channels-last view (what
the model does), on a contiguous NCHW copy, in the autocast dtype or float32, with and without cuDNN's
autotuner, and `layers.depthwise_shifted` compiled (elementwise, fused by torch.compile).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from bench import autocast, sync, timed
from mrdit.layers import depthwise_shifted


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--size", type=int, default=32, help="grid side H = W")
    p.add_argument("--dim", type=int, default=480, help="channels D")
    p.add_argument("--kernel", type=int, default=7)
    p.add_argument("--amp", choices=["none", "bf16", "fp16"], default=None, help="default: bf16 on GPU, none on CPU")
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    amp_name = args.amp or ("bf16" if device.type == "cuda" else "none")
    amp = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp_name]
    print("config:", json.dumps(vars(args) | {"amp": amp_name}, default=str))

    B, S, D, k = args.batch, args.size, args.dim, args.kernel
    conv = torch.nn.Conv2d(D, D, k, padding=k // 2, groups=D).to(device)
    x = torch.randn(B, S, S, D, device=device, requires_grad=True)  # channels-last, float32 like the residual
    shifted = torch.compile(depthwise_shifted)

    def variant(name: str):
        if name == "conv":
            return lambda: conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        if name == "conv-nchw":
            return lambda: conv(x.permute(0, 3, 1, 2).contiguous()).permute(0, 2, 3, 1)
        if name == "shifted-compiled":
            return lambda: shifted(x, conv.weight, conv.bias)
        raise ValueError(name)

    reference = conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1).detach().float()
    res: dict = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()} | {"amp": amp_name},
        "cases": {},
    }
    for benchmark in (False, True):
        torch.backends.cudnn.benchmark = benchmark
        for name in ("conv", "conv-nchw", "shifted-compiled"):
            if benchmark and name == "shifted-compiled":
                continue
            for dtype_name, dt in (("amp", amp), ("fp32", None)):
                if dtype_name == "amp" and amp is None:
                    continue
                fn = variant(name)

                def fwd(fn=fn, dt=dt):
                    with torch.no_grad(), autocast(device, dt):
                        return fn()

                def fwd_bwd(fn=fn, dt=dt):
                    with autocast(device, dt):
                        y = fn()
                    y.float().sum().backward()

                out = fwd()
                err = float((out.float() - reference).norm() / reference.norm())
                key = f"{name}/{dtype_name}" + ("/cudnn-benchmark" if benchmark else "")
                t_f = timed(fwd, device, warmup=2, repeat=args.repeat)
                t_fb = timed(fwd_bwd, device, warmup=2, repeat=args.repeat)
                res["cases"][key] = {"forward_ms": t_f * 1e3, "forward_backward_ms": t_fb * 1e3, "rel_err": err}
                print(
                    f"{key:40s} forward {t_f * 1e3:8.3f} ms   forward+backward {t_fb * 1e3:8.3f} ms   rel.err {err:.1e}"
                )
                sync(device)
    torch.backends.cudnn.benchmark = False
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=2))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
