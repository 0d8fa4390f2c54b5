"""The measurement protocol (docs/evaluation.md): reported numbers come from the frozen judge, held-out
seeds and at least 50 samples per class; the memorisation check; the card and the shipped records say
which judge, seeds, interval and count."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT
from test_cards import _evaluation

from mrdit import get_preset, judge
from mrdit.cards import CardError, Evaluation, TrainingRun, card, read_evaluation, write_card, write_evaluation
from mrdit.data import load_emoji

EVALUATE = [sys.executable, str(ROOT / "train" / "evaluate.py")]
ENV = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
SHIPPED = sorted(p for p in (ROOT / "weights").iterdir() if (p / "eval.json").is_file())


def _record(**fields) -> Evaluation:
    """A reportable record: the card tests' plausible numbers, measured by the protocol, `fields` replaced."""
    protocol = {
        "samples_per_class": 50,
        "first_seed": 10_000,
        "near_copies": 0.02,
        "near_copies_reference": 0.05,
        "near_copy_threshold": 1.0,
        "classifier_val_accuracy": 0.6,
        "classifier_val_images": 40,
        "classifier_val_per_class_accuracy": {"a": 0.9, "b": 0.3},
        "classifier_val_per_class_images": {"a": 30, "b": 10},
        "classifier_recipe": {"judge_recipe": judge.JUDGE_RECIPE, "epochs": str(judge.JUDGE_EPOCHS)},
    }
    return _evaluation(**protocol | fields)


def test_seed_rule():
    assert judge.protocol_problems(judge.REPORT_FIRST_SEED, judge.REPORT_MIN_PER_CLASS) == []
    assert judge.protocol_problems(20_000, 100) == []
    (problem,) = judge.protocol_problems(0, 50)
    assert "seeds 0-49: seeds below 10,000 are for tuning" in problem
    assert judge.protocol_problems(9_999, 50) != []  # one tuning seed is enough to refuse
    # tuning stays below the held-out seeds, with any count
    assert judge.protocol_problems(0, 3, tuning=True) == []
    assert judge.protocol_problems(9_950, 50, tuning=True) == []
    (problem,) = judge.protocol_problems(9_951, 50, tuning=True)
    assert "reach the held-out" in problem
    assert judge.protocol_problems(10_000, 50, tuning=True) != []


def test_sample_count_and_judge_rules():
    (problem,) = judge.protocol_problems(10_000, 49)
    assert "49 samples per class: reported numbers use at least 50" in problem
    (problem,) = judge.protocol_problems(10_000, 50, epochs=2)
    assert "trained for 2 epochs" in problem
    assert len(judge.protocol_problems(0, 20, epochs=2)) == 3
    assert judge.protocol_problems(0, 20, tuning=True, epochs=2) == []


@pytest.mark.parametrize(
    "args, message",
    [
        (["--first-seed", "0"], "seeds below 10,000 are for tuning and selection"),
        (["--per-class", "20"], "reported numbers use at least 50"),
        (["--classifier-epochs", "2"], "the reported judge trains for 30"),
        (["--tuning", "--first-seed", "9990", "--per-class", "20"], "reach the held-out ones"),
        (["--tuning", "--first-seed", "10000"], "reach the held-out ones"),
    ],
)
def test_evaluator_refuses_what_the_protocol_does_not_report(tmp_path, args, message):
    r = subprocess.run(
        [*EVALUATE, str(tmp_path / "m"), "--data", str(tmp_path / "none"), *args],
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and message in r.stderr
    if not args[0] == "--tuning":
        assert "pass --tuning to measure for tuning" in r.stderr
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--sde-variant", "ode-tail", "--sampler", "dpm++2m", "--tuning"], "needs --sampler dpm++2m-sde"),
        (["--sde-variant", "second-order-end"], "for measurement only: pass --tuning or --no-card"),
        (["--branch-guidance", "4,1,1"], "--branch-guidance is for measurement only: pass --tuning or --no-card"),
        (["--branch-guidance", "4,x,1", "--tuning"], "'4,x,1'"),
        (["--branch-guidance", "4,-1,1", "--tuning"], "weights must be finite numbers >= 0"),
    ],
)
def test_sde_variants_are_for_measurement_with_the_sde_sampler(tmp_path, args, message):
    r = subprocess.run(
        [*EVALUATE, str(tmp_path / "m"), "--data", str(tmp_path / "none"), *args],
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and message in r.stderr


def test_an_sde_variant_replaces_the_sampler_in_this_process_only(monkeypatch):
    import importlib.util

    from mrdit.sampling import SAMPLER_REGISTRY

    spec = importlib.util.spec_from_file_location("evaluate_cli", ROOT / "train" / "evaluate.py")
    evaluate = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, evaluate)  # dataclasses look their module up there
    spec.loader.exec_module(evaluate)
    monkeypatch.setitem(SAMPLER_REGISTRY, "dpm++2m-sde", SAMPLER_REGISTRY["dpm++2m-sde"])
    before = SAMPLER_REGISTRY["dpm++2m-sde"]
    evaluate.use_sde_variant("ode-tail")
    after = SAMPLER_REGISTRY["dpm++2m-sde"]
    assert after.fn.keywords == {"ode_below": 0.2} and after.grid is before.grid and after.stochastic


def test_only_reportable_records_are_written(tmp_path):
    for bad, reason in [
        (_record(tuning=True), "tuning seeds"),
        (_record(first_seed=0), "seeds below 10,000"),
        (_record(first_seed=None), "seeds below 10,000"),  # a record from before the protocol
        (_record(samples_per_class=20), "at least 50"),
        (_record(classifier_recipe=None), "version is not recorded"),
        (_record(classifier_val_images=None), "real validation emoji is not recorded"),
        (_record(near_copies=None), "memorisation check is missing"),
    ]:
        with pytest.raises(CardError, match=reason):
            write_evaluation(tmp_path, bad)
        assert not (tmp_path / "eval.json").exists()
    write_evaluation(tmp_path, _record())
    assert read_evaluation(tmp_path) == _record()


def test_memorisation_check_on_features_with_a_known_answer():
    g = torch.Generator().manual_seed(0)
    train, val, fresh = (torch.randn(n, 8, generator=g) for n in (2000, 1000, 4000))
    copies = judge.near_copies(train[:500], train, val)
    assert copies.share == 1.0  # exact copies of training images
    assert 0.049 <= copies.reference <= 0.051 and copies.quantile == 0.05
    assert judge.near_copies(val, train, val).share == copies.reference  # the validation images themselves
    novel = judge.near_copies(fresh, train, val).share  # as novel as real unseen images: about 5%
    assert 0.035 < novel < 0.065
    nudged = judge.near_copies(train[:500] + 0.01 * torch.randn(500, 8, generator=g), train, val).share
    assert nudged > 0.99  # a copy with a little noise is still a copy
    far = judge.near_copies(fresh + 10, train, val).share
    assert far == 0.0


def test_memorisation_check_on_images_through_the_judge():
    torch.manual_seed(0)
    clf = judge.EmojiClassifier(12).eval()  # any fixed feature map will do: copies are copies in every one
    train, val = torch.rand(400, 3, 16, 16) * 2 - 1, torch.rand(200, 3, 16, 16) * 2 - 1
    ft, fv = judge.features_of(clf, train), judge.features_of(clf, val)
    copied = judge.near_copies(judge.features_of(clf, train[torch.randperm(400)[:120]]), ft, fv)
    assert copied.share == 1.0 and copied.threshold > 0
    assert 10 / 200 <= copied.reference <= 11 / 200  # the 5% quantile of 200 distances
    assert judge.near_copies(judge.features_of(clf, val), ft, fv).share == copied.reference
    flipped = judge.near_copies(judge.features_of(clf, train.flip(-1)), ft, fv).share  # mirrored noise is no copy
    assert flipped < 0.2


def test_card_names_the_judge_version_interval_count_and_seeds():
    config = get_preset("tiny").replace(num_classes=3, null_label=2, class_names=("a", "b"))
    text = card("m", config, 1, TrainingRun(), _record())
    lo, hi = judge.wilson_interval(0.75, 100)
    for needle in (
        f"judge version {judge.JUDGE_RECIPE!r}, {judge.JUDGE_EPOCHS} epochs",
        f"| class accuracy of samples | 75.0% (95% interval {lo * 100:.1f}-{hi * 100:.1f}%, 100 samples) |",
        "| the judge's accuracy on real validation emoji (what it can recognise) | 60.0% (95% interval ",
        ", 40 images) |",
        "50 samples per class, seeds 10,000-10,049 of each class (held out: seeds below 10,000 are for tuning).",
        "| near-copies: samples at least as close to a training image (judge features) as the closest 5% of real "
        "validation emoji are | 2.0% (95% interval ",
        "; real validation emoji: 5.0% |",
        "| the same distance, train split vs validation split (floor) | 1.50 |",
        "| a | 100% (93-100%) | 100% | 90% of 30 |",
    ):
        assert needle in text, needle
    old = card("m", config, 1, TrainingRun(), _record(first_seed=None, samples_per_class=20))
    assert "seeds 0-19 of each class (measured before the protocol of docs/evaluation.md)" in old
    assert "drawn as the samples are" not in text  # a record without the reference has no such row
    ref = card(
        "m", config, 1, TrainingRun(), _record(fd_low=0.2, fd_low_floor=0.1, fd_reference=3.0, fd_low_reference=0.15)
    )
    assert (
        "| both distances for real training images drawn as the samples are (50 per class, mean of 10 draws): "
        "what a model that reproduced them exactly would score | 3.00 (2.0x floor); low-level 0.150 (1.5x) |"
    ) in ref


def test_write_card_keeps_sections_added_by_hand(tmp_path, tiny_model_dir):
    import shutil

    model = tmp_path / "m"
    shutil.copytree(tiny_model_dir, model)
    write_card(model)
    plain = (model / "README.md").read_text()
    note = "## How it compares\n\nWritten by hand.\n\n"
    (model / "README.md").write_text(plain.replace("## Data, licences", note + "## Data, licences"))
    write_card(model)
    assert (model / "README.md").read_text() == plain.replace("## Data, licences", note + "## Data, licences")


@pytest.mark.parametrize("model_dir", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_numbers_follow_the_protocol(model_dir):
    """Every shipped record was measured by today's judge version, at held-out seeds, 50 or more per
    class: changing the judge means measuring the shipped models again in the same change."""
    ev = read_evaluation(model_dir)
    assert ev.protocol_problems() == []
    assert ev.judge_version == judge.JUDGE_RECIPE
    readme = (ROOT / "README.md").read_text()
    row = next(line for line in readme.splitlines() if line.startswith(f"| `weights/{model_dir.name}`"))
    lo, hi = judge.wilson_interval(ev.accuracy, ev.samples)
    assert f"{ev.accuracy * 100:.1f}% ({lo * 100:.1f}-{hi * 100:.1f}%, n = {ev.samples})" in row
    assert f"{ev.classifier_val_accuracy * 100:.1f}%" in row and judge.JUDGE_RECIPE in row


def test_a_tuning_run_writes_nothing_into_the_model(tmp_path, emoji_data):
    from mrdit import build_model, save_model

    names = json.loads((emoji_data / "classes.json").read_text())["classes"]
    names = tuple(c["name"] for c in names)
    config = get_preset("tiny").replace(num_classes=len(names) + 1, null_label=len(names), class_names=names)
    torch.manual_seed(0)
    model = save_model(build_model(config), tmp_path / "m")
    out = tmp_path / "tuning.json"
    tuning = ["--tuning", "--per-class", "2", "--steps", "1", "--classifier-epochs", "1", "--json", str(out)]
    cmd = [*EVALUATE, str(model), "--data", str(emoji_data), *tuning]
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "TUNING (not for reporting" in r.stdout and "seeds 0-1 of each class (tuning seeds)" in r.stdout
    assert not (model / "eval.json").exists() and not (model / "README.md").exists()
    record = Evaluation.from_dict(json.loads(out.read_text())["m"])
    assert record.tuning and record.first_seed == 0
    assert record.protocol_problems() == ["measured on tuning seeds (--tuning)"]
    assert 0 <= record.near_copies <= 1 and record.classifier_val_images == len(load_emoji(emoji_data, "val", 16))


def test_low_level_distance_sees_speckle_on_smooth_images():
    torch.manual_seed(0)
    clf = judge.EmojiClassifier(12).eval()  # a fixed first layer; trained or not, noise moves its statistics

    def smooth(n: int) -> torch.Tensor:  # low-frequency images in [-1, 1]
        return torch.nn.functional.interpolate(torch.rand(n, 3, 4, 4) * 2 - 1, size=16, mode="bilinear")

    ref, other = smooth(400), smooth(400)
    low = lambda x: judge.low_level_features(clf, x)  # noqa: E731
    assert low(ref).shape == (400, 64)
    clean = judge.frechet_distance(low(other), low(ref))
    speckled = judge.frechet_distance(low((other + 0.3 * torch.randn_like(other)).clamp(-1, 1)), low(ref))
    assert speckled > 5 * clean, (speckled, clean)


def test_the_judge_learns_subcategories_from_every_image_and_classes_from_classed_ones(emoji_data):
    with_others, without = judge.judge_images(emoji_data, 16, True), judge.judge_images(emoji_data, 16, False)
    assert len(with_others) == len(without) + 3 and (with_others.labels < 0).sum() == 3  # the house, 3 styles
    assert with_others.num_fine == len(json.loads((emoji_data / "classes.json").read_text())["subcategories"])
    flags = with_others.labels == with_others.class_names.index("flag")
    assert not with_others.flip_ok[flags].any() and with_others.flip_ok[~flags].all()
    clf = judge.train_classifier(with_others, judge.Recipe(epochs=1))
    assert clf.fine_head is not None and clf.fine_head.out_features == with_others.num_fine
    assert clf(with_others.x[:4]).shape == (4, len(with_others.class_names))
    plain = judge.train_classifier(without, judge.Recipe(fine=False, others=False, epochs=1))
    assert plain.fine_head is None


def test_strong_augmentation_moves_images_but_pads_with_white():
    g = torch.Generator().manual_seed(0)
    x = torch.ones(64, 3, 16, 16)
    x[:, :, 4:12, 4:12] = -1  # a black square on white
    light = judge.augment(x, torch.ones(64, dtype=torch.bool), False, g)
    strong = judge.augment(x, torch.ones(64, dtype=torch.bool), True, g)
    assert light.shape == strong.shape == x.shape
    white = torch.ones(64, 3, 16, 16)
    padded = judge.augment(white, torch.ones(64, dtype=torch.bool), True, g)
    # rotated, scaled and shifted, a white image stays uniform up to its noise; a grey or black fill would not be
    spread = (padded - padded.mean((1, 2, 3), keepdim=True)).std((1, 2, 3))
    assert float(spread.max()) < 0.2
    # each image gets its own scale, rotation and shift: the square's dark area differs across the batch
    dark = (strong < 0).float().sum((1, 2, 3))
    assert float(dark.std()) > 10 and 0.5 * 192 < float(dark.mean()) < 1.5 * 192
    left = torch.ones(32, 3, 16, 16)
    left[..., :8] = -1  # dark on the left half; a shift of up to 2 px keeps columns 2-5 dark
    kept = judge.augment(left, torch.zeros(32, dtype=torch.bool), False, torch.Generator().manual_seed(2))
    assert bool((kept[..., 2:6].mean((1, 2, 3)) < 0).all())  # never mirrored where flips are not allowed
    free = judge.augment(left, torch.ones(32, dtype=torch.bool), False, torch.Generator().manual_seed(2))
    assert 4 <= int((free[..., 2:6].mean((1, 2, 3)) > 0).sum()) <= 28  # about half mirrored where they are


def test_choose_judge_scores_every_recipe_on_a_held_out_fold_and_applies_its_rule(tmp_path, emoji_data):
    out = tmp_path / "choice.json"
    script = [sys.executable, str(ROOT / "train" / "choose_judge.py"), "--data", str(emoji_data), "--size", "16"]
    ids = judge.judge_images(emoji_data, 16, False).emoji
    folds = [f for f in range(5) if 0 < int((ids % 5 == f).sum()) < len(ids)]
    cmd = [*script, "--epochs", "1", "--jobs", "1", "--fold", str(folds[0]), "--json", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    record = json.loads(out.read_text())
    results = {x["recipe"]: x for x in record["results"]}
    assert set(results) == set(judge.RECIPES)
    assert record["chosen"] == max(results.values(), key=lambda x: x["balanced_accuracy"])["recipe"]
    held = {x["held_out_images"] for x in results.values()}
    assert len(held) == 1 and 0 < held.pop() < len(judge.judge_images(emoji_data, 16, False))
    # the fold is taken from the training split only; recipes with the emoji of no class train on 3 more
    trained = {name: x["trained_on"] for name, x in results.items()}
    assert trained["3: subcategories"] == trained["2: cosine"] + 3
    bad = subprocess.run([*script, "--fold", "5"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--fold must be in 0..4" in bad.stderr
    empty = [f for f in range(5) if int((ids % 5 == f).sum()) == 0]
    assert empty, "the fake data has a fold with none of its training emoji"
    r = subprocess.run([*script, "--fold", str(empty[0])], capture_output=True, text=True)
    assert r.returncode == 2 and "choose another --fold" in r.stderr  # refused before any training


def test_reference_draws_take_each_class_alike_or_the_splits_own_mix():
    labels = torch.tensor([0] * 5 + [1] * 3 + [2] * 8)
    balanced = judge.reference_draws(labels, 3, per_class=True, draws=4)
    for idx in balanced:
        assert len(set(idx.tolist())) == len(idx) == 9  # without replacement
        assert torch.bincount(labels[idx]).tolist() == [3, 3, 3]
    assert len({tuple(sorted(idx.tolist())) for idx in balanced}) > 1  # each draw its own set
    again = judge.reference_draws(labels, 3, per_class=True, draws=4)
    assert all(torch.equal(a, b) for a, b in zip(balanced, again))  # seeded
    whole = judge.reference_draws(labels, len(labels), per_class=False, draws=2)
    assert all(sorted(idx.tolist()) == list(range(len(labels))) for idx in whole)
    with pytest.raises(ValueError, match="a class has only 3"):
        judge.reference_draws(labels, 4, per_class=True, draws=1)
    with pytest.raises(ValueError, match="the split has only 16"):
        judge.reference_draws(labels, 17, per_class=False, draws=1)


def test_reference_distances_scores_training_images_drawn_as_the_samples_are(tmp_path, emoji_data):
    script = [sys.executable, str(ROOT / "train" / "reference_distances.py"), "--data", str(emoji_data)]
    labels = load_emoji(emoji_data, "train", 16).labels
    smallest = int(torch.unique(labels, return_counts=True)[1].min())
    assert smallest >= 2, "the fake data needs two training images of every class"
    out = tmp_path / "ref.json"
    args = ["--size", "16", "--from-size", "32", "--per-class", str(smallest), "--draws", "3"]
    r = subprocess.run(
        [*script, *args, "--classifier-epochs", "1", "--json", str(out)], env=ENV, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr[-2000:]
    record = json.loads(out.read_text())
    assert record["images_per_set"] == smallest * len(torch.unique(labels))
    assert set(record["results"]) == {"natural", "balanced", "balanced, from 32 px"}
    for kind in record["results"].values():
        for measure, floor in (("fd", record["floors"]["fd"]), ("fd_low", record["floors"]["fd_low"])):
            m = kind[measure]
            assert 0 <= m["min"] <= m["mean"] <= m["max"] and m["ratio_to_floor"] == pytest.approx(m["mean"] / floor)
    # the 32 px images area-averaged to 16 px are other pixels than the prepared 16 px ones
    assert record["results"]["balanced, from 32 px"] != record["results"]["balanced"]
    bad = subprocess.run(
        [*script, "--size", "16", "--per-class", str(smallest + 1), "--from-size"],
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and f"a class has only {smallest}" in bad.stderr and "lower --per-class" in bad.stderr
    bad = subprocess.run([*script, "--size", "16", "--from-size", "16"], env=ENV, capture_output=True, text=True)
    assert bad.returncode == 2 and "must be larger than --size 16" in bad.stderr


def test_the_balanced_reference_is_the_mean_over_class_balanced_draws(emoji_data):
    train, val = load_emoji(emoji_data, "train", 16), load_emoji(emoji_data, "val", 16)
    torch.manual_seed(0)
    clf = judge.EmojiClassifier(len(train.class_names)).eval()  # any judge: the bookkeeping is what is tested
    xv = val.batch(torch.arange(len(val)))[0]
    fv, lv = judge.features_of(clf, xv), judge.low_level_features(clf, xv)
    smallest = int(torch.unique(train.labels, return_counts=True)[1].min())
    fd, low = judge.balanced_reference(clf, train, smallest, fv, lv, draws=3)
    sets = judge.reference_draws(train.labels, smallest, True, 3)
    each = judge.draws_distances(clf, train.batch(torch.arange(len(train)))[0], sets, fv, lv)
    assert fd == pytest.approx(sum(e[0] for e in each) / 3) and low == pytest.approx(sum(e[1] for e in each) / 3)
    assert len({round(e[0], 9) for e in each}) > 1  # the draws differ, so the mean is over real draws
    assert judge.balanced_reference(clf, train, smallest + 1, fv, lv) is None  # too few images of a class


def test_branch_guidance_is_measured_and_recorded(tmp_path, emoji_data):
    from mrdit import build_model, save_model

    names = tuple(c["name"] for c in json.loads((emoji_data / "classes.json").read_text())["classes"])
    config = get_preset("tiny").replace(num_classes=len(names) + 1, null_label=len(names), class_names=names)
    torch.manual_seed(0)
    model = save_model(build_model(config), tmp_path / "m")
    out = tmp_path / "tuning.json"
    tuning = ["--tuning", "--per-class", "2", "--steps", "1", "--classifier-epochs", "1"]
    base = [*EVALUATE, str(model), "--data", str(emoji_data), *tuning]
    r = subprocess.run(
        [*base, "--branch-guidance", "4,1,1", "--json", str(out)], env=ENV, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr[-2000:]
    record = Evaluation.from_dict(json.loads(out.read_text())["m"])
    assert tuple(record.branch_guidance) == (4.0, 1.0, 1.0)
    r = subprocess.run([*base, "--branch-guidance", "4,1"], env=ENV, capture_output=True, text=True)
    assert r.returncode == 1 and "one weight per branch (3)" in r.stderr and "Traceback" not in r.stderr
