"""Numerical hazards: non-finite losses and gradients stop the run or skip the step, outlying projected
gradients are reported, and a long run at lr = 0 in half precision leaves the weights bit-identical."""

import pytest
import torch

from conftest import NaNGradient, lm_loss
from test_train import read_metrics, run_cli
from zotune.errors import NonFiniteGradientError, NonFiniteLossError
from zotune.models import random_llama
from zotune.numerics import ProjectedGradientMonitor
from zotune.optim import AdaMeZO, Addax, InPlaceSGD, MeZO
from zotune import preparation as train_module  # where the trainer takes its loss from


def loss_replaced_on_calls(monkeypatch, calls, replace):
    """Makes the trainer's classification loss return ``replace(loss)`` on the given (1-based) calls."""
    original, count = train_module.classification_loss, [0]

    def loss(*args):
        count[0] += 1
        value = original(*args)
        return replace(value) if count[0] in calls else value

    monkeypatch.setattr(train_module, "classification_loss", loss)


def test_skip_policy_skips_a_nan_step_and_goes_on(tmp_path, monkeypatch, capsys):
    # zero_shot_eval=false: the loss's calls are MeZO's two forwards per step, so calls 5 and 6 are step 3.
    loss_replaced_on_calls(monkeypatch, {5, 6}, lambda loss: loss * float("nan"))
    assert (
        run_cli(
            [
                "optimizer=mezo",
                "lr=5e-3",
                "steps=5",
                "eval_every=0",
                "zero_shot_eval=false",
                "on_nonfinite=skip",
                f"output_dir={tmp_path}",
            ]
        )
        == 0
    )
    records = [r for r in read_metrics(tmp_path) if "step" in r and "split" not in r and "note" not in r]  # steps only
    assert [("skipped" in r) for r in records] == [False, False, True, False, False]
    assert records[2]["skipped"].startswith("non-finite loss at step 2 (direction seed ")  # the optimizer's step 2
    assert "step 3 skipped (on_nonfinite=skip)" in capsys.readouterr().out
    # A refused step consumes nothing: its seed is used again, with the next batch.
    assert f"(direction seed {records[3]['seed']})" in records[2]["skipped"]
    assert [r["forward_passes"] for r in records] == [2, 4, 4, 6, 8]


def test_stop_policy_names_the_step_and_seed(tmp_path, monkeypatch, capsys):
    loss_replaced_on_calls(monkeypatch, {3}, lambda loss: loss * float("inf"))
    assert (
        run_cli(["optimizer=mezo", "lr=5e-3", "steps=5", "eval_every=0", "zero_shot_eval=false", f"output_dir={tmp_path}"]) == 2
    )
    error = capsys.readouterr().err.splitlines()[-1]
    assert error.startswith("zotune: error: run step 2: non-finite loss at step 1 (direction seed ")
    assert "loss+=inf" in error and "The parameters were not updated" in error
    assert not (tmp_path / "summary.json").exists() and not list(tmp_path.glob("checkpoint-*.pt"))


def test_too_many_skips_in_a_row_stop_the_run(tmp_path, capsys):
    """lr = 1e30 blows the weights up at step 1; every later step is skipped, until the limit."""
    assert (
        run_cli(
            [
                "optimizer=sgd",
                "lr=1e30",
                "steps=8",
                "eval_every=0",
                "on_nonfinite=skip",
                "max_skipped_steps=2",
                f"output_dir={tmp_path}",
            ]
        )
        == 2
    )
    error = capsys.readouterr().err.splitlines()[-1]
    assert error.startswith("zotune: error: run step 4 (3 steps in a row, more than max_skipped_steps=2): non-finite")


def test_a_nonfinite_gradient_fused_into_backward_stops_even_when_skipping(tmp_path, monkeypatch, capsys):
    loss_replaced_on_calls(monkeypatch, {2}, NaNGradient.apply)
    assert (
        run_cli(
            [
                "optimizer=ip-sgd",
                "lr=1e-2",
                "steps=4",
                "checkpoint_every=1",
                "eval_every=0",
                "zero_shot_eval=false",
                "on_nonfinite=skip",
                f"output_dir={tmp_path}",
            ]
        )
        == 2
    )
    error = capsys.readouterr().err.splitlines()[-1]
    assert error.startswith(
        "zotune: error: run step 2: non-finite gradient at step 1 with a finite loss: the update "
        "fused into backward has already written it into the weights"
    )
    assert [p.name for p in sorted(tmp_path.glob("checkpoint-*.pt"))] == ["checkpoint-000001.pt"]  # step 2 unsaved


@pytest.mark.parametrize("make", [lambda m: InPlaceSGD(m, lr=1e-2), lambda m: Addax(m, lr=1e-2, eps=1e-2)])
def test_optimizers_in_backward_report_a_nan_gradient(make, batch):
    model = random_llama("tiny", seed=0)
    optimizer = make(model)
    closure = lambda: NaNGradient.apply(lm_loss(model, batch))  # noqa: E731
    with pytest.raises(NonFiniteGradientError, match="non-finite gradient at step 0") as raised:
        optimizer.step(closure) if isinstance(optimizer, InPlaceSGD) else optimizer.step(None, closure)
    assert raised.value.applied
    assert any(torch.isnan(p).any() for p in model.parameters())  # what the error says: it reached the weights


def test_an_infinite_projected_gradient_from_finite_losses_is_refused(batch):
    model = random_llama("tiny", seed=0)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = MeZO(model, lr=1e-3, eps=1e-300)
    sign = iter([1.0, -1.0])
    with pytest.raises(NonFiniteLossError, match="projected gradient=-?inf"):
        optimizer.step(lambda: torch.tensor(1e300 * next(sign), dtype=torch.float64))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before))
    assert optimizer.state["zo"]["step"] == 0  # the refused step consumed nothing


def test_monitor_reports_values_far_beyond_the_recent_median():
    monitor = ProjectedGradientMonitor(factor=10.0, window=20, warmup=5)
    assert [monitor.check(v) for v in [1.0, -2.0, 1.5, -1.0, 2.0]] == [None] * 5  # warming up
    assert monitor.check(-14.0) is None  # 9.3x the median 1.5
    report = monitor.check(40.0)
    assert report == "projected gradient 40 is 23x the median |c| (1.75) of the last 6 steps"
    resumed = ProjectedGradientMonitor(factor=10.0, window=20, warmup=5)
    resumed.load_state_dict(monitor.state_dict())
    assert resumed.check(100.0) == monitor.check(100.0) is not None
    assert ProjectedGradientMonitor(factor=0.0, warmup=0).check(1e9) is None


def test_an_outlying_projected_gradient_is_reported_in_the_log(tmp_path, monkeypatch, capsys):
    # Step 12's two losses are scaled by 1000, and so is its c: far beyond the median of steps 1-11.
    loss_replaced_on_calls(monkeypatch, {23, 24}, lambda loss: loss * 1000)
    assert (
        run_cli(["optimizer=mezo", "lr=1e-3", "steps=13", "eval_every=0", "zero_shot_eval=false", f"output_dir={tmp_path}"]) == 0
    )
    warned = [r["step"] for r in read_metrics(tmp_path) if "warning" in r]
    assert warned == [12]
    assert "step 12: projected gradient" in capsys.readouterr().out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "make",
    [lambda m: MeZO(m, lr=0.0, eps=1e-2, weight_decay=0.1), lambda m: AdaMeZO(m, lr=0.0, eps=1e-2, window=3)],
    ids=["mezo", "adamezo"],
)
def test_a_thousand_steps_at_zero_learning_rate_leave_half_precision_weights_bit_identical(dtype, make):
    model = random_llama("tiny", dtype=dtype, seed=3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = make(model)
    tokens = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    nonzero = 0
    for _ in range(1000):
        optimizer.step(lambda: lm_loss(model, tokens))
        nonzero += optimizer.last_estimates[0].projected_gradient != 0
    # The perturbations moved the half-precision loss in most steps (else it rounds to the same value).
    assert nonzero > 500
    for name, param in model.named_parameters():
        assert torch.equal(param.detach().view(torch.int16), before[name].view(torch.int16)), name
