"""ZOTrainer: a transformers Trainer taking zotune optimizer steps; and the two example scripts."""

import json
import re
import subprocess
import sys

import pytest
import torch
from transformers import TrainingArguments

from zotune.errors import OptionError
from zotune.hf import ZOTrainer
from zotune.models import random_llama


class Sequences(torch.utils.data.Dataset):
    def __init__(self, tokens):
        self.tokens = tokens

    def __len__(self):
        return len(self.tokens)

    def __getitem__(self, index):
        return {"input_ids": self.tokens[index], "labels": self.tokens[index]}


def make_trainer(tmp_path, optimizer="mezo", lr=3e-3, steps=40, zo_options=None, **extra):
    data = Sequences(torch.randint(0, 64, (32, 16), generator=torch.Generator().manual_seed(0)))
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=steps,
        learning_rate=lr,
        lr_scheduler_type="linear",
        per_device_train_batch_size=8,
        logging_steps=10,
        save_steps=steps,
        report_to=[],
        use_cpu=True,
        seed=0,
        **extra,
    )
    return ZOTrainer(
        model=random_llama("tiny", seed=0),
        args=args,
        train_dataset=data,
        eval_dataset=data,
        zo_optimizer=optimizer,
        zo_options=zo_options or ({"eps": 1e-3} if optimizer not in ("ip-sgd", "forward-grad") else {}),
    )


def test_zotrainer_takes_one_mezo_step_per_batch_lowers_the_loss_and_writes_the_trainers_outputs(tmp_path):
    trainer = make_trainer(tmp_path)
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    assert trainer.evaluate()["eval_loss"] < before
    assert trainer.optimizer.optimizer.state["zo"]["step"] == 40  # each batch one step: none doubled or lost
    assert trainer.optimizer.param_groups[0]["lr"] == 0.0  # the Trainer's linear schedule drove MeZO's lr
    checkpoint = tmp_path / "checkpoint-40"
    assert {"model.safetensors", "optimizer.pt", "trainer_state.json"} <= {p.name for p in checkpoint.iterdir()}
    logged = [r["loss"] for r in json.loads((checkpoint / "trainer_state.json").read_text())["log_history"] if "loss" in r]
    assert len(logged) == 4 and all(2.0 < loss < 6.0 for loss in logged)  # the ZO steps' losses, not zeros
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=False)
    assert saved["state"]["zo"]["step"] == 40  # the seed stream is saved with the checkpoint


@pytest.mark.parametrize(
    "optimizer,lr", [("zo-sign", 1e-3), ("zo-momentum", 3e-4), ("zo-cons", 3e-3), ("zo-adam", 1e-3), ("forward-grad", 3e-3)]
)
def test_the_zo_benchmarks_optimizers_train_under_zotrainer(tmp_path, optimizer, lr):
    trainer = make_trainer(tmp_path, optimizer, lr=lr, steps=20)
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    assert trainer.evaluate()["eval_loss"] < before
    assert trainer.optimizer.optimizer.state["zo"]["step"] == 20


def test_zotrainer_refuses_what_it_cannot_do(tmp_path):
    with pytest.raises(OptionError, match="ZOTrainer supports mezo, adamezo, .*ip-sgd, got 'addax'"):
        make_trainer(tmp_path, optimizer="addax")
    with pytest.raises(OptionError, match="set gradient_accumulation_steps=1"):
        make_trainer(tmp_path, gradient_accumulation_steps=2)
    with pytest.raises(OptionError, match="ZOTrainer cannot take dual_forward"):  # it would get one loss for two
        make_trainer(tmp_path, zo_options={"dual_forward": True})


@pytest.mark.parametrize(
    "script,args", [("plain_loop.py", ["--optimizer", "addax"]), ("hf_trainer.py", ["--optimizer", "ip-sgd", "--lr", "0.5"])]
)
def test_examples_run_and_lower_the_loss(tmp_path, script, args):
    output = subprocess.run(
        [sys.executable, f"examples/{script}", *args, *(["--output-dir", str(tmp_path)] if script == "hf_trainer.py" else [])],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    if script == "plain_loop.py":
        before, after = (float(x) for x in re.findall(r"(?:initial|final) loss on all sequences: ([0-9.]+)", output))
    else:
        before, after = (float(x) for x in re.search(r"eval loss ([0-9.]+) -> ([0-9.]+)", output).groups())
    assert after < before - 0.5, output


def task_trainer(tmp_path, zo_options, steps=6):
    from zotune.config import load_config
    from zotune.hf import examples_collator, task_loss
    from zotune.preparation import prepare

    config = load_config(None, ["model=random:tiny", "task=bigbench-sentiment", "num_train=16", "num_dev=8", "max_length=48"])
    prepared = prepare(config)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=steps,
        learning_rate=1e-2,
        per_device_train_batch_size=4,
        report_to=[],
        use_cpu=True,
        seed=0,
        save_strategy="no",
    )
    trainer = ZOTrainer(
        model=prepared.model,
        args=args,
        train_dataset=prepared.splits["train"],
        eval_dataset=prepared.splits["dev"],
        data_collator=examples_collator,
        zo_optimizer="mezo",
        zo_options=zo_options,
        zo_loss=task_loss(prepared),
    )
    return trainer, prepared


def test_zotrainer_trains_a_zotune_task_with_its_candidate_scorer(tmp_path):
    """zo_loss: the Trainer's batches are the task's encoded examples, the loss zotune train's (packed candidate
    scoring), evaluated by the Trainer too; with it the dual forward takes the same steps as two forwards."""
    trainer, prepared = task_trainer(tmp_path, {"eps": 1e-3})
    with torch.no_grad():
        expected = prepared.loss(prepared.model, prepared.splits["dev"], prepared.tokenizer.pad_token_id).item()
    assert trainer.evaluate()["eval_loss"] == pytest.approx(expected, rel=1e-5)  # one batch of 8: the same mean
    initial = {name: p.detach().clone() for name, p in prepared.model.named_parameters()}
    trainer.train()
    assert trainer.optimizer.optimizer.state["zo"]["step"] == 6
    trained = dict(prepared.model.named_parameters())
    assert any(not torch.equal(trained[name], value) for name, value in initial.items())
    dual, dual_prepared = task_trainer(tmp_path / "dual", {"eps": 1e-3, "dual_forward": True})
    dual.train()
    for name, p in dual_prepared.model.named_parameters():
        torch.testing.assert_close(p.detach(), trained[name].detach(), rtol=0, atol=1e-5, msg=name)
