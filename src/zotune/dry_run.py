"""``zotune train --dry-run``: resolve and check a recipe without loading its weights or its data.

Recipes for a GPU and hub models cannot run here, but most of what can be wrong with them can be found
offline: key names and types (the config loader), the task and its loss or objective, the trainable mode's
options, and the optimizer's options and their values, which are checked by building the optimizer on a
tiny random stand-in of the model. What needs the real model or data (the model's context length, LoRA
target names, Addax's length split itself, SVRG's large batch against the training set) is checked when it loads.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from .config import ConfigError, TrainConfig
from .optim import resolve
from .models import BUILTIN, DTYPES, ENCODER, ModelError, random_llama, select_trainable
from .tasks import task_definition


def dry_run(config: TrainConfig) -> list[str]:
    """Lines saying what the run would do; raises the run's own error for what it finds wrong."""
    from .preparation import check_trainable_fits, head_labels, training_loss
    from .train import build_optimizer, split_options

    task = task_definition(config.task, config.task_options)
    generation = getattr(task, "generation", False)
    metric = "f1" if generation else "accuracy"
    loss = training_loss(config, task, metric, tokenizer=None)
    check_trainable_fits(config, generation)
    labels = head_labels(config, task)
    if config.dtype not in DTYPES:
        raise ModelError(f"unknown dtype {config.dtype!r}: choose one of {', '.join(DTYPES)}")
    if not (config.device in ("auto", "cpu") or config.device.split(":")[0] == "cuda"):
        raise ConfigError(f"device {config.device!r}: use auto, cpu, cuda or cuda:N")
    lora = {**config.lora, "targets": ["q_proj", "v_proj"]} if config.trainable == "lora" else config.lora
    stand_in = select_trainable(random_llama("tiny"), config.trainable, lora, config.prefix)
    optimizer = build_optimizer(config, stand_in)
    resolve(config.optimizer)[0].check_data_options(split_options(config)[1], config.batch_size, config.num_train)
    kind = "generation" if generation else "classification"
    objective = getattr(loss, "func", loss).__name__ if config.objective == "loss" else f"minus the batch's {metric}"
    options = ", ".join(f"{key}={value}" for key, value in config.optimizer_options.items()) or "its defaults"
    tested = "the best dev evaluation" if config.select == "best_dev" else "the last step"
    patience = config.early_stopping_patience
    stopping = f", early stopping after {patience} evaluations without improvement" if patience else ""
    return [
        yaml.safe_dump(config.to_dict(), sort_keys=False).rstrip(),
        f"model: {_model_source(config.model)}, {config.dtype}, head={config.head}"
        + (f" ({labels} labels, pooling={config.pooling})" if labels else "")
        + f", trainable={config.trainable}",
        f"task: {config.task} ({kind}, scored by {metric}), trained on {objective}",
        f"optimizer: {type(optimizer).__name__} with {options}, lr={config.lr}",
        f"tests {tested} of {config.steps} steps{stopping}",
        "dry run: the recipe resolves and its options are valid; nothing was loaded or trained",
    ]


def _model_source(name: str) -> str:
    if name in (BUILTIN, ENCODER):
        return f"{name} (built in)"
    if name.startswith("random:"):
        return f"{name} (random weights)"
    if Path(name).is_dir():
        return f"{name} (a local folder)"
    return f"{name} (from the Hugging Face hub, or its cache; not loaded)"
