"""Learning-rate schedules: the factors, the rates each step is taken with, and an exact resume mid-schedule."""

import json

import pytest
import torch

from zotune.cli import main
from zotune.schedules import lr_factor

TINY = [
    "train",
    "model=random:tiny",
    "num_train=32",
    "num_dev=8",
    "num_test=8",
    "batch_size=8",
    "max_length=64",
    "eval_every=0",
    "zero_shot_eval=false",
]


def test_the_factors_warm_up_linearly_then_hold_or_decay_to_zero():
    assert [lr_factor("constant", s, 10, 4) for s in (1, 2, 4, 5, 10)] == [0.25, 0.5, 1.0, 1.0, 1.0]
    assert [lr_factor("linear", s, 10, 0) for s in (1, 5, 10)] == pytest.approx([0.9, 0.5, 0.0])
    assert [lr_factor("linear", s, 10, 2) for s in (2, 3, 6, 10)] == pytest.approx([1.0, 0.875, 0.5, 0.0])
    assert [lr_factor("cosine", s, 10, 0) for s in (5, 10)] == pytest.approx([0.5, 0.0])
    assert lr_factor("cosine", 1, 10, 0) == pytest.approx(0.5 * (1 + torch.cos(torch.tensor(torch.pi / 10)).item()))


def logged(run, key):
    return [r[key] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.mark.parametrize("optimizer", ["mezo", "svrg", "sgd"])
def test_each_step_is_taken_at_the_scheduled_rate(tmp_path, optimizer):
    options = ["optimizer_options={large_batch: 8}"] if optimizer == "svrg" else []
    assert (
        main(
            [
                *TINY,
                f"optimizer={optimizer}",
                "lr=1e-2",
                "steps=6",
                "lr_schedule=linear",
                "warmup_steps=2",
                *options,
                f"output_dir={tmp_path}",
            ]
        )
        == 0
    )
    expected = [1e-2 * lr_factor("linear", step, 6, 2) for step in range(1, 7)]
    assert logged(tmp_path, "lr") == pytest.approx(expected)


def test_a_run_resumed_mid_schedule_ends_as_an_uninterrupted_one(tmp_path):
    common = [*TINY, "optimizer=mezo", "lr=5e-3", "steps=6", "lr_schedule=cosine", "warmup_steps=2", "checkpoint_every=3"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert main([*common, f"output_dir={whole}"]) == 0
    assert main([*common, f"output_dir={cut}"]) == 0
    for name in ("checkpoint-000006.pt", "checkpoint-000006.pt.sha256", "summary.json"):  # as if stopped at step 3
        (cut / name).unlink()
    assert main([*common, f"output_dir={cut}"]) == 0
    assert logged(cut, "lr")[-3:] == logged(whole, "lr")[-3:]
    final = [torch.load(run / "checkpoint-000006.pt", weights_only=False)["model"] for run in (whole, cut)]
    for name, value in final[0].items():
        assert torch.equal(final[1][name], value), name


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["lr_schedule=step"], "config key 'lr_schedule' must be one of constant, linear, cosine"),
        (["warmup_steps=10", "steps=10"], "'warmup_steps' must be >= 0 and below steps=10"),
        (["optimizer=svrg", "optimizer_options.anneal=5", "lr_schedule=linear"], "both set the learning rates"),
    ],
)
def test_schedules_that_cannot_work_are_one_line_errors(tmp_path, overrides, message, capsys):
    assert main([*TINY, *overrides, f"output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("zotune: error:") and message in err
