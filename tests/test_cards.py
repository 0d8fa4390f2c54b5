"""Model cards from typed records (mrdit.cards): a card built from a record says what the record says,
records read back what was written, and the shipped cards are what their records render to."""

from __future__ import annotations

import json
import re

import pytest
from conftest import ROOT

from mrdit import get_preset
from mrdit.cards import (
    CardError,
    Evaluation,
    GrownModel,
    Recipe,
    TrainingRun,
    card,
    read_run_info,
    render_card,
    run_info_from_dict,
    run_info_to_dict,
)
from mrdit.pipeline import DEFAULT_SAMPLER

SHIPPED = sorted(p for p in (ROOT / "weights").iterdir() if (p / "run_info.json").is_file())
RECIPE = Recipe(
    lr=2e-4,
    warmup_steps=200,
    decay_steps=3600,
    betas=(0.9, 0.99),
    weight_decay=0.03,
    ema_decay=0.999,
    label_dropout=0.1,
    class_balanced=True,
    mixed_precision="bf16",
)


def _evaluation(**fields) -> Evaluation:
    base = {
        "accuracy": 0.75,
        "per_class_accuracy": {"a": 1.0, "b": 0.5},
        "fd": 3.25,
        "sec_per_image": 0.0123,
        "samples_per_class": 4,
        "steps": 25,
        "guidance": 4.0,
        "sampler": DEFAULT_SAMPLER,
        "fd_floor": 1.5,
        "classifier_val_accuracy": 0.8,
        "classifier_val_per_class_accuracy": {"a": 0.9, "b": None},
        "classifier_train_accuracy": 0.95,
        "classifier_train_per_class_accuracy": {"a": 1.0, "b": 0.9},
        "classifier_recipe": {"judge_recipe": "2: cosine", "epochs": "30"},
        "command": "python train/evaluate.py weights/m",
        "hardware": "x86_64 CPU, 2 threads",
    }
    return Evaluation.from_dict(base | fields)


def test_card_from_records_of_a_fine_tune_of_a_grown_model():
    config = get_preset("tiny").replace(num_classes=3, null_label=2, class_names=("a", "b"))
    grown = GrownModel(
        grown_from="weights/small",
        command="python train/init_grown.py weights/small --config big.json --out runs/grown",
        copied_branches=3,
        added_branches=(3,),
        patch_factor=2,
        widened="wider MLP in branch 0 (64 -> 128)",
    )
    run = TrainingRun(
        commands=("python train/train.py --config big.json --run-dir runs/big",),
        step=500,
        batch_size=64,
        elapsed_min="12",
        hardware="1 x CPU",
        recipe=RECIPE,
        init_from="runs/grown",
        source=grown,
    )
    text = card("m", config, 1234, run, _evaluation())
    for needle in (
        "# m\n",
        "1,234 parameters",
        "Classes (2, plus the null label 2 for guidance): a, b.",
        f"`{DEFAULT_SAMPLER}`, 25 steps, guidance 4.0.",
        "| class accuracy of samples | 75.0% (95% interval ",
        ", 8 samples) |",
        "| Frechet distance to the validation split (judge features) | 3.25 |",
        "| sampling time per image (dpm++2m-sde, 25 steps, guidance 4.0) | 12 ms |",
        "judge version '2: cosine', 30 epochs",
        "| a | 100% (51-100%) | 100% | 90% |\n| b | 50% (15-85%) | 90% | - |",
        "- Started from `runs/grown`, made as follows:\n  - Grown from `weights/small` with "
        "`python train/init_grown.py weights/small --config big.json --out runs/grown`: its 3 branches copied "
        "(patchify kernels widened 2x; wider MLP in branch 0 (64 -> 128)), branch 3 new\n"
        "    - that model's training is not recorded here\n- Then fine-tuned from those weights (fresh optimizer):\n"
        "  - Command: `python train/train.py --config big.json --run-dir runs/big`\n"
        "  - Steps: 500 at batch 64; wall time 12 min\n  - Recipe: AdamW (betas (0.9, 0.99), weight decay 0.03), "
        "learning rate 0.0002 after 200 warm-up steps, constant, then a linear cool-down over the last 3,600 "
        "steps; EMA 0.999; label dropout 0.1; random horizontal flips; class-balanced batches; bf16 autocast\n"
        "  - Hardware: 1 x CPU\n",
        "CC-BY 4.0",
    ):
        assert needle in text, needle
    assert "judged at" not in text  # judged at the model's own size
    small = card("m", config, 1, TrainingRun(), _evaluation(judge_size=8))
    assert "judged at 8 px (area-averaged from 16 px)" in small
    assert "- Command: `?`\n- Steps: ? at batch ?; wall time ? min\n- Hardware: ?\n" in small
    assert "Not measured yet: run `python train/evaluate.py weights/m`." in card("m", config, 1, run, None)


def test_records_read_back_what_was_written():
    run = TrainingRun(commands=("python a", "python a"), step=3, batch_size="8, then 16", recipe=RECIPE)
    info = GrownModel(grown_from="x", command="python g", copied_branches=2, patch_factor=1, source=run)
    d = run_info_to_dict(info)
    assert d["source"]["command"] == "python a" and d["source"]["recipe"]["betas"] == (0.9, 0.99)
    assert run_info_from_dict(json.loads(json.dumps(d))) == info
    with pytest.raises(CardError, match="unknown field.*bogus"):
        run_info_from_dict({"command": "c", "bogus": 1})
    with pytest.raises(CardError, match="evaluation"):
        Evaluation.from_dict({"accuracy": 0.5})


@pytest.mark.parametrize("model_dir", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_cards_are_what_their_records_render(model_dir):
    """config.json, run_info.json and eval.json make the card; the baseline's comparison with the shipped
    DiMR and the matched pair's section are written by hand."""
    shipped = (model_dir / "README.md").read_text()
    for title in ("How it compares with the shipped DiMR", "The matched pair"):
        shipped = re.sub(rf"## {title}\n.*?\n(?=## )", "", shipped, flags=re.S)
    assert render_card(model_dir) == shipped
    info = read_run_info(model_dir)
    assert run_info_from_dict(json.loads(json.dumps(run_info_to_dict(info)))) == info
