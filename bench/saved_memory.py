"""How much memory autograd keeps for the backward of one training forward, per training case; runs on
the CPU, so it predicts GPU memory before a GPU run.

    python bench/saved_memory.py --preset dimr-xl-2r --batch 16 --cases 16:blocks@0.25 --out bench/results/saved.json

Counts the distinct tensors saved for backward (`torch.autograd.graph.saved_tensors_hooks`), parameters
excluded, under the autocast dtype. At small batches the compiled backward's choices are swayed by
the batch-independent weight casts, so compare cases at one batch (bench/NOTES.md says which is large
enough) and use differences, not absolute numbers. Checkpointing hides what it saves from the count, so cases with
`ckpt` are refused.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from modes import autocast, compiled_blocks, memory_budget_scope, parse_train_case
from mrdit import build_model, get_preset
from report import print_config, write_json


def kept_bytes(model, batch: int, amp: torch.dtype | None, net=None) -> int:
    """Bytes of the distinct non-parameter tensors one training forward saves for its backward."""
    c = model.config
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, c.channels, c.image_size, c.image_size, generator=g)
    n = torch.randint(1, c.schedule.num_steps + 1, (batch,), generator=g).float()
    y = torch.randint(0, c.num_classes, (batch,), generator=g)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast(torch.device("cpu"), amp):
        (net or model)(x, n, y)
    return sum(v for k, v in storages.items() if k not in params)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--preset", default="dimr-xl-2r")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--amp", choices=["none", "bf16"], default="bf16")
    p.add_argument(
        "--cases",
        nargs="+",
        type=parse_train_case,
        default=[parse_train_case("0:plain"), parse_train_case("0:blocks@0.25")],
        metavar="BATCH:MODE[@BUDGET]",
        help="training cases as in bench.py (the batch part is ignored: --batch applies); no ckpt modes",
    )
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    print_config(args)
    if any(mode.endswith("ckpt") for _, mode, _ in args.cases):
        p.error("checkpointing hides what it keeps from the count: use plain, compile or blocks cases")
    amp = torch.bfloat16 if args.amp == "bf16" else None
    torch._dynamo.config.automatic_dynamic_shapes = False  # one static graph per case
    torch.manual_seed(0)
    model = build_model(get_preset(args.preset)).train()
    res: dict = {"preset": args.preset, "batch": args.batch, "amp": args.amp, "kept_mib": {}}
    for _, mode, budget in args.cases:
        key = mode + (f"@{budget:g}" if budget else "")
        with memory_budget_scope(budget), compiled_blocks(model, mode == "blocks"):
            net = torch.compile(model) if mode == "compile" else model
            kept_bytes(model, args.batch, amp, net)  # compiles, if the case compiles
            mib = kept_bytes(model, args.batch, amp, net) / 2**20
        res["kept_mib"][key] = mib
        print(f"{key:16s} {mib:10.1f} MiB kept at batch {args.batch} (weight casts included)")
    write_json(args.out, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
