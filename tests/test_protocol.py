"""The papers' training protocol in the trainer: which checkpoint is tested, early stopping, the loss per task,
cut inputs, and training on a non-differentiable metric."""

import json
import random

import pytest

from zotune.cli import main
from zotune.config import ConfigError, load_config
from zotune.scoring import answer_loss, classification_loss
from zotune.tasks.hub import HUB_TASKS
from zotune.train import prepare, train

TINY = ["model=random:tiny", "num_train=32", "num_dev=16", "num_test=16", "batch_size=8", "max_length=64"]


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def local_task(folder, sizes=(("train", 32), ("dev", 32), ("test", 32))):
    """A two-class task a tiny random model can learn: colours are class A, animals class B."""
    generator = random.Random(0)
    for split, size in sizes:
        with open(folder / f"{split}.jsonl", "w") as file:
            for _ in range(size):
                label = generator.randint(0, 1)
                word = generator.choice(["red", "blue", "green"] if label == 0 else ["cat", "dog", "cow"])
                file.write(json.dumps({"text": f"{word} {generator.choice(['is', 'was'])} here", "label": label}) + "\n")
    return [
        "model=random:tiny",
        "task=local",
        *(f"task_options.{split}={folder / f'{split}.jsonl'}" for split, _ in sizes),
        "task_options.template={text}. It is",
        'task_options.verbalizer={0: " A", 1: " B"}',
    ]


def test_best_dev_selection_tests_the_weights_of_the_best_dev_evaluation(tmp_path):
    run_dir = tmp_path / "run"
    assert (
        main(
            [
                "train",
                *TINY,
                "optimizer=mezo",
                "lr=5e-2",
                "optimizer_options.eps=1e-1",
                "steps=24",
                "eval_every=4",
                "select=best_dev",
                f"output_dir={run_dir}",
            ]
        )
        == 0
    )
    log = records(run_dir)
    during = [(r["step"], r["value"]) for r in log if r.get("split") == "dev" and r["step"] > 0]  # not zero-shot
    best_step, best_value = max(during, key=lambda item: (item[1], -item[0]))  # the first of equal bests
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["selected_step"] == best_step and summary["dev"] == best_value
    assert summary["last_dev"] == during[-1][1] and summary["early_stopped_at"] is None
    assert [r for r in log if "selected_step" in r] == [{"step": 24, "selected_step": best_step, "select": "best_dev"}]
    test = [r for r in log if r.get("split") == "test"]
    assert [r["step"] for r in test] == [best_step] and summary["test"] == test[0]["value"]
    # best.pt holds those weights: evaluating it on test gives the summary's test accuracy.
    config = load_config(None, [*TINY, "optimizer=mezo"])
    from zotune.preparation import evaluate_model

    assert evaluate_model(config, str(run_dir / "best.pt"), "test") == ("accuracy", summary["test"])


def test_select_last_tests_the_last_weights_and_keeps_no_best_file(tmp_path):
    assert main(["train", *TINY, "optimizer=mezo", "lr=5e-2", "steps=8", "eval_every=4", f"output_dir={tmp_path}"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["selected_step"] == 8 and summary["dev"] == summary["last_dev"]
    assert not (tmp_path / "best.pt").exists()


def test_early_stopping_after_evaluations_without_improvement_and_a_rerun_stays_stopped(tmp_path):
    # lr = 0: dev accuracy never changes, and a tie is no improvement, so evaluations 2 and 3 (steps 4, 6) are
    # stale and patience 2 stops the run at step 6.
    args = [
        "train",
        *TINY,
        "optimizer=mezo",
        "lr=0",
        "steps=40",
        "eval_every=2",
        "early_stopping_patience=2",
        "select=best_dev",
        f"output_dir={tmp_path}",
    ]
    assert main(args) == 0
    log = records(tmp_path)
    assert max(r["step"] for r in log if "loss" in r) == 6
    assert [r for r in log if r.get("early_stop")] == [{"step": 6, "early_stop": True, "best_step": 2}]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["early_stopped_at"] == 6 and summary["steps"] == 6 and summary["selected_step"] == 2
    assert main(args) == 0  # resumes from the checkpoint at step 6: already stopped, no step is taken
    assert max(r["step"] for r in records(tmp_path) if "loss" in r) == 6


def test_selection_options_are_checked():
    with pytest.raises(ConfigError, match="must be one of last, best_dev"):
        load_config(None, ["select=best"])
    with pytest.raises(ConfigError, match="need dev evaluations during training"):
        load_config(None, ["select=best_dev", "eval_every=0"])
    with pytest.raises(ConfigError, match="early_stopping_patience"):
        load_config(None, ["early_stopping_patience=0"])


def test_each_task_has_the_loss_mezo_trains_it_with():
    losses = {name: task.loss for name, (_, _, task) in HUB_TASKS.items()}
    assert {name for name, loss in losses.items() if loss == "lm"} == {"copa", "record", "squad", "drop"}


def test_the_loss_follows_the_task_unless_overridden(tmp_path):
    task = local_task(tmp_path)
    assert prepare(load_config(None, task)).loss is classification_loss
    assert prepare(load_config(None, [*task, "loss=lm"])).loss is answer_loss
    generation = [
        "model=random:tiny",
        "task=local",
        *(f"task_options.{s}={tmp_path / 'gen.jsonl'}" for s in ("train", "dev", "test")),
        "task_options.template=Q: {q}\nA:",
        "task_options.answer_field=a",
    ]
    (tmp_path / "gen.jsonl").write_text("".join(json.dumps({"q": f"{i}?", "a": str(i)}) + "\n" for i in range(6)))
    assert prepare(load_config(None, generation)).loss is answer_loss
    with pytest.raises(ConfigError, match="loss=classification needs candidates"):
        prepare(load_config(None, [*generation, "loss=classification"]))


def test_more_than_one_percent_of_a_split_cut_is_warned_in_the_log(tmp_path):
    assert main(["train", *TINY, "max_length=24", "optimizer=mezo", "steps=1", "eval_every=0", f"output_dir={tmp_path}"]) == 0
    notes = [r["note"] for r in records(tmp_path) if "note" in r]
    assert notes and all("lose the beginning of their prompt: raise max_length" in note for note in notes)
    assert {note.split(" examples")[0].split()[-1] for note in notes} == {"train", "dev", "test"}


@pytest.mark.parametrize("optimizer", ["ip-sgd", "sgd", "adam", "addax"])
def test_a_metric_objective_is_refused_for_optimizers_that_need_gradients(tmp_path, optimizer):
    config = load_config(None, [*local_task(tmp_path), f"optimizer={optimizer}", "objective=accuracy"])
    with pytest.raises(ConfigError, match="has no gradient: it needs a zeroth-order optimizer"):
        train(config)


def test_a_metric_objective_must_be_the_tasks_metric(tmp_path):
    with pytest.raises(ConfigError, match="is scored by accuracy"):
        prepare(load_config(None, [*local_task(tmp_path), "objective=f1"]))


def test_mezo_trained_on_accuracy_itself_raises_dev_accuracy(tmp_path):
    run_dir = tmp_path / "run"
    assert (
        main(
            [
                "train",
                *local_task(tmp_path),
                "objective=accuracy",
                "optimizer=mezo",
                "lr=3e-2",
                "optimizer_options.eps=0.1",
                "steps=100",
                "eval_every=20",
                "batch_size=32",
                "select=best_dev",
                f"output_dir={run_dir}",
            ]
        )
        == 0
    )
    log = records(run_dir)
    losses = [r["loss"] for r in log if "loss" in r]
    assert all(-1 <= loss <= 0 for loss in losses)  # minus the batch's accuracy
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["dev"] >= summary["zero_shot_dev"] + 0.25, summary


def generation_task(folder):
    (folder / "gen.jsonl").write_text("".join(json.dumps({"q": f"{i} plus one?", "a": str(i + 1)}) + "\n" for i in range(8)))
    return [
        "model=random:tiny",
        "task=local",
        *(f"task_options.{s}={folder / 'gen.jsonl'}" for s in ("train", "dev", "test")),
        "task_options.template=Q: {q}\nA:",
        "task_options.answer_field=a",
        "max_new_tokens=3",
        "batch_size=4",
    ]


def test_mezo_trains_on_f1_with_minus_the_batch_f1_as_its_loss(tmp_path):
    assert (
        main(
            [
                "train",
                *generation_task(tmp_path),
                "objective=f1",
                "optimizer=mezo",
                "steps=2",
                "eval_every=0",
                f"output_dir={tmp_path / 'run'}",
            ]
        )
        == 0
    )
    steps = [r for r in records(tmp_path / "run") if "loss" in r]
    assert len(steps) == 2 and all(-1 <= r["loss_plus"] <= 0 and -1 <= r["loss_minus"] <= 0 for r in steps)


def test_the_f1_objective_refuses_the_dual_forward(tmp_path):
    with pytest.raises(ConfigError, match="objective=f1 decodes answers"):
        prepare(load_config(None, [*generation_task(tmp_path), "objective=f1", "optimizer_options.dual_forward=true"]))


def test_a_clipped_first_order_step_logs_its_gradient_norm(tmp_path):
    assert (
        main(
            [
                "train",
                *TINY,
                "optimizer=ip-sgd",
                "lr=1e-2",
                "optimizer_options.clip_grad_norm=0.5",
                "steps=2",
                "eval_every=0",
                f"output_dir={tmp_path}",
            ]
        )
        == 0
    )
    steps = [r for r in records(tmp_path) if "loss" in r]
    assert len(steps) == 2 and all(r["grad_norm"] > 0 for r in steps)


def test_resuming_a_folder_with_another_runs_settings_is_refused_unless_forced(tmp_path, capsys):
    args = ["train", *TINY, "optimizer=mezo", "lr=5e-3", "steps=2", "eval_every=0", f"output_dir={tmp_path}"]
    assert main(args) == 0
    capsys.readouterr()
    assert main([*args, "seed=1", "optimizer_options.eps=1e-2"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "holds the checkpoints of another run" in error
    assert "seed: 0 there, 1 here" in error and "optimizer_options: {} there, {'eps': 0.01} here" in error
    assert "--force-resume" in error
    assert main([*args[:-3], "steps=4", "eval_every=2", f"output_dir={tmp_path}"]) == 0  # steps may change
    assert max(r["step"] for r in records(tmp_path) if "loss" in r) == 4
    assert main(["train", "--force-resume", *args[1:-2], "steps=5", "seed=1", f"output_dir={tmp_path}"]) == 0
    assert max(r["step"] for r in records(tmp_path) if "loss" in r) == 5


@pytest.mark.parametrize("case", ["yaml", "model", "output_dir"])
def test_bad_files_and_folders_are_one_line_errors(tmp_path, capsys, case):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("steps: 3\noptimizer: mezo\n")
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    args = {
        "yaml": ["--config", str(recipe)],
        "model": ["model=./no/such/model"],
        "output_dir": [f"output_dir={blocked / 'run'}"],
    }[case]
    if case == "yaml":
        recipe.write_text("steps: 3\noptimizer: [mezo\n")
    assert main(["train", *TINY, *args]) == 2
    error = capsys.readouterr().err
    assert error.startswith("zotune: error:") and error.count("\n") == 1
    assert {"yaml": "not valid YAML at line", "model": "no such model folder", "output_dir": "cannot be created or written"}[
        case
    ] in error


@pytest.mark.parametrize("page", ["README.md", "docs/guide/optimizers.md"])
def test_the_optimizer_tables_say_what_each_optimizer_declares(page):
    from pathlib import Path

    from zotune.optim import OPTIMIZERS

    text = (Path(__file__).parents[1] / page).read_text()
    table = text[text.index("| optimizer (`optimizer:`)") :].split("\n\n")[0]
    rows = [line.split("|")[1:-1] for line in table.splitlines() if line.startswith("| `")]
    listed = {}
    for cells in rows:
        for name in cells[0].replace("`", "").split(","):
            listed[name.strip()] = [cell.strip() for cell in cells[4:7]]
    assert set(listed) == set(OPTIMIZERS), set(listed) ^ set(OPTIMIZERS)
    for name, (parallel, fsdp, hf) in listed.items():
        cls = OPTIMIZERS[name]
        assert parallel == "yes"
        assert fsdp.startswith("yes") == (cls.fsdp_problem({}) is None), name
        assert fsdp != "no" or cls.fsdp_problem({}) is not None, name
        assert hf.startswith("yes") == cls.hf_trainer, name
