"""End-to-end: the real CLI on a tiny random model, checking logged losses, files and exact resume."""

import json

import pytest
import torch
import yaml

from zotune.cli import main
from zotune.config import ConfigError, load_config
from zotune.metrics_log import MetricsLog
from zotune.optim import OPTIMIZERS
from zotune.sampling import BatchSampler

TINY = ["model=random:tiny", "num_train=32", "num_dev=16", "num_test=16", "batch_size=8", "max_length=64"]


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def run_cli(args):
    return main(["train", *TINY, *args])


@pytest.mark.parametrize(
    "optimizer,lr,steps", [("mezo", 5e-3, 40), ("adamezo", 1e-4, 40), ("ip-sgd", 5e-2, 15), ("sgd", 5e-2, 15), ("adam", 1e-3, 15)]
)
def test_train_cli_logs_losses_and_writes_run_files(tmp_path, optimizer, lr, steps):
    run_dir = tmp_path / optimizer
    assert run_cli([f"optimizer={optimizer}", f"lr={lr}", f"steps={steps}", "eval_every=5", f"output_dir={run_dir}"]) == 0
    records = read_metrics(run_dir)
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == steps
    # The training batches change, so compare the mean loss of the first and last five steps.
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5, losses
    evaluations = [r for r in records if r.get("split") == "dev"]
    assert [r["step"] for r in evaluations] == [0, *range(5, steps, 5), steps]
    last = [r for r in records if "loss" in r][-1]
    zeroth_order = optimizer in ("mezo", "adamezo")
    assert last["forward_passes"] == steps * (2 if zeroth_order else 1) and last["peak_memory_mb"] > 0
    if zeroth_order:
        assert {"loss_plus", "loss_minus", "projected_grad", "seed"} <= last.keys()
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["optimizer"] == optimizer and config["lr"] == lr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["metric"] == "accuracy" and evaluations[0]["metric"] == "accuracy"
    assert 0 <= summary["test"] <= 1 and summary["zero_shot_dev"] == evaluations[0]["value"]
    assert (run_dir / "plot.png").stat().st_size > 1000
    assert [p.name for p in run_dir.glob("checkpoint-*.pt")] == [f"checkpoint-{steps:06d}.pt"]


@pytest.mark.parametrize(
    "optimizer,lr,trainable",
    [("mezo", 5e-3, "full"), ("adamezo", 1e-4, "full"), ("mezo", 5e-3, "lora"), ("mezo", 5e-2, "prefix")],
)
def test_a_dual_forward_run_takes_the_steps_of_separate_forwards(tmp_path, optimizer, lr, trainable):
    losses = {}
    for dual in (False, True):
        run_dir = tmp_path / str(dual)
        assert (
            run_cli(
                [
                    f"optimizer={optimizer}",
                    f"lr={lr}",
                    "steps=12",
                    "eval_every=0",
                    f"output_dir={run_dir}",
                    f"trainable={trainable}",
                    f"optimizer_options.dual_forward={str(dual).lower()}",
                    "optimizer_options.window=3" if optimizer == "adamezo" else "seed=0",
                ]
            )
            == 0
        )
        losses[dual] = [r[key] for r in read_metrics(run_dir) if "loss" in r for key in ("loss_plus", "loss_minus")]
    assert len(losses[True]) == 2 * 12
    # float32: the batched forward rounds a little differently, which c = ΔL/2ε magnifies step after step
    assert losses[True] == pytest.approx(losses[False], abs=1e-4)
    assert losses[True][:2] == pytest.approx(losses[False][:2], abs=1e-6)


@pytest.mark.parametrize("optimizer,lr", [("mezo", 5e-3), ("adamezo", 1e-4), ("adam", 1e-3), ("addax", 5e-2), ("svrg", 5e-3)])
def test_resumed_run_is_bit_identical_to_an_uninterrupted_one(tmp_path, optimizer, lr):
    common = [
        f"optimizer={optimizer}",
        f"lr={lr}",
        "checkpoint_every=3",
        "keep_checkpoints=2",
        "eval_every=0",
        "num_train=12",
        *(["max_length=200", "optimizer_options.K0=4", "optimizer_options.K1=4"] if optimizer == "addax" else []),
    ]  # 12 examples, batches of 8: the resumed run crosses an epoch boundary
    run_cli([*common, "steps=9", f"output_dir={tmp_path / 'whole'}"])
    run_cli([*common, "steps=4", f"output_dir={tmp_path / 'parts'}"])  # checkpoints at 3 and 4
    (tmp_path / "parts" / "checkpoint-000004.pt").unlink()  # as if killed after step 4's metrics, before its save
    run_cli([*common, "steps=9", f"output_dir={tmp_path / 'parts'}"])  # resumes from step 3
    whole = torch.load(tmp_path / "whole" / "checkpoint-000009.pt", weights_only=False)
    parts = torch.load(tmp_path / "parts" / "checkpoint-000009.pt", weights_only=False)
    for name, tensor in whole["model"].items():
        assert torch.equal(tensor, parts["model"][name]), name
    assert whole["sampler"] == parts["sampler"] and whole["forward_passes"] == parts["forward_passes"]

    def strip(records):
        return [{k: v for k, v in r.items() if k not in ("seconds", "peak_memory_mb")} for r in records]

    assert strip(read_metrics(tmp_path / "whole")) == strip(read_metrics(tmp_path / "parts"))
    assert sorted(p.name for p in (tmp_path / "whole").glob("checkpoint-*.pt")) == [
        "checkpoint-000006.pt",
        "checkpoint-000009.pt",
    ]


def test_a_run_resumed_from_its_final_checkpoint_logs_the_end_of_the_run_once(tmp_path):
    common = ["optimizer=mezo", "lr=5e-3", "steps=4", "eval_every=2", "select=best_dev"]
    run_cli([*common, f"output_dir={tmp_path / 'whole'}"])
    run_cli([*common, f"output_dir={tmp_path / 'parts'}"])
    metrics = tmp_path / "parts" / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    final_dev = max(i for i, line in enumerate(lines) if json.loads(line).get("split") == "dev")
    assert json.loads(lines[final_dev])["step"] == 4 and final_dev < len(lines) - 1
    metrics.write_text("".join(line + "\n" for line in lines[: final_dev + 1]))  # as if killed in the test evaluation
    run_cli([*common, f"output_dir={tmp_path / 'parts'}"])  # resumes from checkpoint-000004.pt, then ends the run

    def strip(records):
        return [{k: v for k, v in r.items() if k not in ("seconds", "peak_memory_mb")} for r in records]

    assert strip(read_metrics(tmp_path / "whole")) == strip(read_metrics(tmp_path / "parts"))


def test_a_metrics_log_resumed_keeps_the_records_written_before_the_checkpoint_or_by_step_for_an_older_one(tmp_path):
    path = tmp_path / "metrics.jsonl"
    for resume_records, kept in [(3, [0, 1, 2]), (None, [0, 1, 2, 2])]:  # None: a checkpoint that does not hold the count
        path.write_text("".join(json.dumps({"step": step}) + "\n" for step in (0, 1, 2, 2, 3)))
        log = MetricsLog(path, 2, resume_records=resume_records)
        assert [record["step"] for record in log.records()] == kept and log.count == len(kept)


ADDAX = ["max_length=200", "lr=0.05", "optimizer_options.alpha=0.01", "optimizer_options.K0=4", "optimizer_options.K1=4"]


@pytest.mark.parametrize("optimizer,extra", [("addax", ["optimizer_options.L_T=105"]), ("addax-wa", [])])
def test_addax_runs_split_by_length_and_log_both_batches(tmp_path, optimizer, extra):
    steps = 6
    assert run_cli([*ADDAX, *extra, f"optimizer={optimizer}", f"steps={steps}", "eval_every=0", f"output_dir={tmp_path}"]) == 0
    records = read_metrics(tmp_path)
    notes = [r["note"] for r in records if "note" in r and not r["note"].startswith("warning:")]
    if optimizer == "addax":
        assert notes == [
            "length split at L_T=105 tokens: D0 (zeroth-order, longer) 16 examples, D1 (first-order) 16; lengths 32..200"
        ]
    else:
        assert notes == ["addax-wa: K0=4 and K1=4 examples per step, both from all 32 training examples"]
    losses = [r for r in records if "loss" in r]
    assert {"loss_zo", "loss_fo", "projected_grad", "seed"} <= losses[-1].keys()
    assert losses[-1]["forward_passes"] == 3 * steps
    assert all(r["loss"] == pytest.approx((r["loss_zo"] + r["loss_fo"]) / 2) for r in losses)


def test_addax_with_an_empty_bucket_falls_back_to_ip_sgd_or_refuses(tmp_path, capsys):
    assert (
        run_cli(
            [
                *ADDAX,
                "optimizer=addax",
                "optimizer_options.L_T=500",
                "steps=2",
                "eval_every=0",
                f"output_dir={tmp_path / 'fallback'}",
            ]
        )
        == 0
    )
    last = [r for r in read_metrics(tmp_path / "fallback") if "loss" in r][-1]
    assert "loss_fo" in last and "loss_zo" not in last and last["forward_passes"] == 2
    assert "every step falls back to IP-SGD on D1" in capsys.readouterr().out
    assert (
        run_cli(
            [
                *ADDAX,
                "optimizer=addax",
                "optimizer_options.L_T=500",
                "optimizer_options.on_empty_bucket=error",
                f"output_dir={tmp_path / 'refused'}",
            ]
        )
        == 2
    )
    assert (
        capsys.readouterr()
        .err.strip()
        .startswith("zotune: error: D0 is empty: no training example is longer than L_T=500 tokens")
    )


@pytest.mark.parametrize("memory", ["seeds", "dense"])
def test_svrg_run_alternates_anchor_and_ordinary_steps(tmp_path, memory):
    assert (
        run_cli(
            [
                "optimizer=svrg",
                "lr=5e-3",
                "optimizer_options.anchor_lr=5e-3",
                "optimizer_options.large_batch=16",
                f"optimizer_options.memory={memory}",
                "steps=6",
                "eval_every=0",
                f"output_dir={tmp_path}",
            ]
        )
        == 0
    )
    steps = [r for r in read_metrics(tmp_path) if "loss" in r]
    assert [r["anchor"] for r in steps] == [True, False] * 3
    assert [r["forward_passes"] for r in steps] == [4, 8, 12, 16, 20, 24]  # anchor: 2 × 2 micro-batches of 8
    assert all(("projected_grad_at_anchor" in r) != r["anchor"] for r in steps)
    assert run_cli(["optimizer=svrg", "optimizer_options.large_batch=999", f"output_dir={tmp_path / 'bad'}"]) == 2


def test_overflowing_gradient_stops_the_run_with_the_step(tmp_path, capsys):
    """lr = 1e30: step 1 is finite and blows the weights up; step 2's loss is finite, its gradient is not,
    and it is caught before SGD writes it into the weights."""
    assert run_cli(["optimizer=sgd", "lr=1e30", "steps=5", "eval_every=0", f"output_dir={tmp_path}"]) == 2
    error = capsys.readouterr().err.splitlines()[-1]  # above it: the progress bar
    failed = read_metrics(tmp_path)[-1]
    assert failed["step"] == 2
    assert error.startswith(
        "zotune: error: run step 2: non-finite gradient at step 2 with a finite loss: the parameters were not updated."
    )
    assert failed["error"] in error and not (tmp_path / "summary.json").exists()


def test_eval_cli_scores_a_checkpoint(tmp_path, capsys):
    run_cli(["optimizer=adam", "lr=1e-3", "steps=3", "eval_every=0", f"output_dir={tmp_path}"])
    capsys.readouterr()
    checkpoint = tmp_path / "checkpoint-000003.pt"
    assert main(["eval", *TINY, "--checkpoint", str(checkpoint), "--split", "dev"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    expected = f"dev accuracy of {checkpoint} on bigbench-sentiment: {100 * summary['dev']:.1f}%"
    assert capsys.readouterr().out.strip() == expected


def test_config_file_overrides_and_errors(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("optimizer: mezo\nlr: 1e-6\noptimizer_options: {eps: 1e-3}\n")
    config = load_config(recipe, ["lr=2e-6", "optimizer_options.n_directions=2"])
    assert config.lr == 2e-6 and config.optimizer_options == {"eps": 1e-3, "n_directions": 2}
    text = load_config(None, ["task_options.template=Q: {question}\nA:", "lora={r: 4}", "task_options.x=[1, 2]"])
    assert text.task_options == {"template": "Q: {question}\nA:", "x": [1, 2]} and text.lora == {"r": 4}
    with pytest.raises(ConfigError, match="unknown config key 'lrr': did you mean 'lr'"):
        load_config(recipe, ["lrr=1"])
    with pytest.raises(ConfigError, match="config key 'steps' must be int, got 'many'"):
        load_config(None, ["steps=many"])
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "missing.yaml")


def test_unknown_names_are_one_line_errors(tmp_path, capsys):
    for override, message in [
        ("optimizer=mezzo", "unknown optimizer 'mezzo'"),
        ("task=sst3", "unknown task 'sst3'"),
        ("dtype=fp8", "unknown dtype 'fp8'"),
        ("optimizer_options.epss=1", "optimizer 'mezo' has no option 'epss'"),
        ("optimizer_options.eps=0", "eps must be positive"),
    ]:
        assert run_cli([override, f"output_dir={tmp_path}"]) == 2
        assert message in capsys.readouterr().err


def test_sampler_covers_each_epoch_once_and_resumes():
    sampler = BatchSampler(10, 4, seed=3)
    first = [sampler.next_batch() for _ in range(5)]  # 20 draws: two full epochs
    assert sorted(sum(first, [])[:10]) == list(range(10)) and sorted(sum(first, [])[10:]) == list(range(10))
    resumed = BatchSampler(10, 4, seed=3)
    replay = BatchSampler(10, 4, seed=3)
    for _ in range(2):
        replay.next_batch()
    resumed.load_state_dict(replay.state_dict())
    assert [resumed.next_batch() for _ in range(3)] == first[2:]


@pytest.mark.parametrize("optimizer,lr", [("mezo", 1e-2), ("ip-sgd", 1e-1)])
def test_lora_trains_only_the_adapters(tmp_path, optimizer, lr):
    assert (
        run_cli(
            [
                f"optimizer={optimizer}",
                f"lr={lr}",
                "steps=12",
                "eval_every=0",
                "trainable=lora",
                "lora.r=4",
                f"output_dir={tmp_path}",
            ]
        )
        == 0
    )
    state = torch.load(tmp_path / "checkpoint-000012.pt", weights_only=False)["model"]
    from zotune.models import load_model

    base, _ = load_model("random:tiny")
    adapters = [name for name in state if "lora_" in name]
    assert adapters and all(".q_proj." in n or ".v_proj." in n for n in adapters)
    assert any(state[n].abs().sum() > 0 for n in adapters if "lora_B" in n)  # B starts at zero, so it moved
    for name, tensor in base.state_dict().items():  # every base weight is untouched
        peft_name = next(n for n in state if n.endswith(name.replace("weight", "base_layer.weight")) or n.endswith(name))
        assert torch.equal(state[peft_name], tensor), name


def test_lora_errors(tmp_path, capsys):
    assert run_cli(["trainable=lora", "lora.targets=[query]", f"output_dir={tmp_path}"]) == 2
    assert "LoRA target 'query' is not a module of this model" in capsys.readouterr().err
    assert run_cli(["trainable=lora", "lora.rank=4", f"output_dir={tmp_path}"]) == 2
    assert "unknown LoRA option 'rank'" in capsys.readouterr().err


def test_every_recipe_in_configs_loads():
    from pathlib import Path

    recipes = sorted(Path("configs").glob("*.yaml"))
    assert len(recipes) >= 4
    for recipe in recipes:
        config = load_config(recipe)
        assert recipe.read_text().startswith(f"# zotune train --config configs/{recipe.name}"), recipe
        assert config.optimizer in OPTIMIZERS, recipe


@pytest.mark.parametrize("optimizer,lr,extra", [("mezo", 1e-2, ["optimizer_options.eps=1e-1"]), ("adam", 1e-2, [])])
def test_prefix_tuning_trains_only_the_prefix_and_lowers_the_loss(tmp_path, optimizer, lr, extra):
    assert (
        run_cli(
            [
                f"optimizer={optimizer}",
                f"lr={lr}",
                *extra,
                "steps=40",
                "eval_every=0",
                "trainable=prefix",
                f"output_dir={tmp_path}",
            ]
        )
        == 0
    )
    losses = [r["loss"] for r in read_metrics(tmp_path) if "loss" in r]
    if optimizer == "adam":
        # MeZO's 40 steps on the random model leave the loss at chance (ln 2 ± 0.002 per batch): comparing its
        # first and last losses is a coin flip (measured: either sign across seeds), so MeZO is checked for
        # moving the prefix only. Adam's run is deterministic.
        assert sum(losses[-8:]) < sum(losses[:8]), losses
    state = torch.load(tmp_path / "checkpoint-000040.pt", weights_only=False)["model"]
    from zotune.models import PREFIX_DEFAULTS, PrefixDecoder, load_model

    base, _ = load_model("random:tiny")
    for name, tensor in base.state_dict().items():
        assert torch.equal(state[f"lm.{name}"], tensor), name
    assert {"prefix.prefix_keys", "prefix.prefix_values"} <= state.keys()
    initial = PrefixDecoder(base.get_decoder(), base.config.vocab_size, **PREFIX_DEFAULTS)
    assert not torch.equal(state["prefix.prefix_keys"], initial.prefix_keys)
    assert not torch.equal(state["prefix.prefix_values"], initial.prefix_values)


def test_sequences_longer_than_the_models_context_are_refused(tmp_path, capsys):
    """random:tiny has 1024 positions and a byte tokenizer: a 1500-character row is longer than that."""
    rows = "".join(json.dumps({"text": text, "label": label}) + "\n" for text, label in [("x" * 1500, 1), ("bad", 0)])
    (tmp_path / "rows.jsonl").write_text(rows)
    data = [f"task_options.{split}={tmp_path / 'rows.jsonl'}" for split in ("train", "dev", "test")]
    local = ["task=local", *data, "task_options.template={text} It was", "task_options.verbalizer={0: ' bad', 1: ' good'}"]
    assert run_cli([*local, "max_length=2000", f"output_dir={tmp_path / 'run'}"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "zotune: error: train example 0 is 1512 tokens long, more than the model's context of 1024 positions: set "
        "max_length to at most 1024 (longer prompts then lose their beginning)"
    )
    assert run_cli([*local, "max_length=1024", "trainable=prefix", "prefix.tokens=5", f"output_dir={tmp_path / 'run'}"]) == 2
    error = capsys.readouterr().err
    assert "(including 5 prefix positions)" in error and "set max_length to at most 1019" in error


PEFT_RUNS = {  # optimizer: the options for a few steps that move the adapters on the tiny model
    "mezo": ["lr=1e-2"],
    "adamezo": ["lr=1e-3"],
    "svrg": ["lr=1e-2", "optimizer_options.anchor_lr=1e-2", "optimizer_options.large_batch=16"],
    "addax": ["lr=1e-1", "optimizer_options.L_T=62"],
    "addax-wa": ["lr=1e-1"],
    "ip-sgd": ["lr=1e-1"],
    "sgd": ["lr=1e-1"],
    "adam": ["lr=1e-2"],
}


@pytest.mark.parametrize("trainable", ["lora", "prefix"])
@pytest.mark.parametrize("optimizer", list(PEFT_RUNS))
def test_every_optimizer_trains_lora_and_prefix_and_only_them(tmp_path, optimizer, trainable):
    assert (
        run_cli(
            [
                f"optimizer={optimizer}",
                *PEFT_RUNS[optimizer],
                "steps=4",
                "eval_every=0",
                "zero_shot_eval=false",
                f"trainable={trainable}",
                f"output_dir={tmp_path}",
            ]
        )
        == 0
    )
    state = torch.load(tmp_path / "checkpoint-000004.pt", weights_only=False)["model"]
    from zotune.models import load_model, select_trainable

    start = select_trainable(load_model("random:tiny")[0], trainable).state_dict()
    changed = {name for name, tensor in state.items() if not torch.equal(tensor, start[name])}
    trained = {name for name in state if ("lora_" in name if trainable == "lora" else name.startswith("prefix."))}
    assert changed <= trained, changed - trained  # no base weight moved
    moved = [name for name in changed if "lora_B" in name or name.startswith("prefix.")]  # lora_B starts at zero
    assert moved, changed


def test_train_help_lists_every_config_key_with_its_default(capsys):
    from zotune.config import FIELDS

    with pytest.raises(SystemExit) as stopped:
        main(["train", "--help"])
    assert stopped.value.code == 0
    out = capsys.readouterr().out
    listed = [line.split("=")[0].strip() for line in out.split("config keys", 1)[1].splitlines()[1:] if " = " in line]
    assert listed == list(FIELDS)
    assert '  head = "lm"  (lm (prompt + candidates)' in out and "  lr = 1e-6" in out


def test_the_plotted_loss_mean_is_the_mean_of_each_window():
    from zotune.plot import moving_mean

    values = [4.0, 2.0, 6.0, 0.0, 1.0]
    assert moving_mean(values, 3) == pytest.approx([4.0, 3.0, 4.0, 8 / 3, 7 / 3])
    assert moving_mean(values, 1) == values


def test_the_dev_metric_is_plotted_against_the_forward_passes_and_seconds_before_it():
    from zotune.plot import dev_points

    records = [
        {"step": 0, "split": "dev", "metric": "accuracy", "value": 0.5},
        {"step": 1, "loss": 1.0, "forward_passes": 2, "seconds": 0.5},
        {"step": 2, "loss": 0.9, "forward_passes": 4, "seconds": 1.0},
        {"step": 2, "split": "dev", "metric": "accuracy", "value": 0.75},
        {"step": 2, "note": "a note"},
    ]
    assert dev_points(records) == [(0, 0, 0.0, 0.5), (2, 4, 1.0, 0.75)]
