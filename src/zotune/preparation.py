"""What training and evaluation share, prepared from a config: the model (with its trainable parameters
chosen), the task's splits encoded, the metric, and the loss the optimizer minimises."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from .config import ConfigError, TrainConfig
from .errors import TrainingError
from .models import PREFIX_DEFAULTS, check_head_trainable, load_model, select_trainable
from .optim import OPTIMIZERS, resolve
from .heads import HEADS
from .scoring import EncodedExample, accuracy, answer_loss, classification_loss, mean_f1, negated_accuracy
from .tasks import load_task, task_definition


@dataclass
class Prepared:
    """What training and evaluation share: the model, the encoded splits, the loss and the metric."""

    model: torch.nn.Module
    tokenizer: object
    splits: dict[str, list[EncodedExample]]
    metric: str  # accuracy (classification) or f1 (generation)
    evaluate: Callable[[str], float]  # split name -> metric value
    loss: Callable  # (model, batch, pad_id, copies=1) -> loss tensor (one mean per copy when copies > 1)


def resolve_device(name: str) -> torch.device:
    """``auto``: the GPU when there is one (under torchrun, the rank's own: from_environment selected it)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device {name!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"device {name!r}: zotune runs on cpu or cuda; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r}: this machine has no CUDA device; use device=cpu or device=auto")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def prepare(config: TrainConfig) -> Prepared:
    """The model, the encoded splits, the metric and the training loss of a run, from its config.

    Sets torch's threads (``threads``), checks the head and the trainable mode against the task before anything
    loads, loads the task's sampled splits and the model (on its device, its trainable parameters selected),
    encodes every split for the head, and refuses examples longer than the model's context
    (:func:`check_context`)."""
    if config.threads:
        torch.set_num_threads(config.threads)
    definition = task_definition(config.task, config.task_options)
    generation = getattr(definition, "generation", False)
    check_trainable_fits(config, generation)
    labels = head_labels(config, definition)
    sizes = {"train": config.num_train, "dev": config.num_dev, "test": config.num_test}
    loaded = load_task(config.task, config.data, sizes, config.seed, config.task_options)
    model, tokenizer = load_model(config.model, config.dtype, config.head, labels, config.pooling, config.seed)
    model = model.to(resolve_device(config.device))
    context = getattr(model.config, "max_position_embeddings", None)
    model = select_trainable(model, config.trainable, config.lora, config.prefix, config.head)
    head = HEADS[config.head]
    encoded = {
        split: [head.encode(tokenizer, example, config.max_length) for example in examples]
        for split, examples in loaded.splits.items()
    }
    if context is not None:
        prefix_tokens = config.prefix.get("tokens", PREFIX_DEFAULTS["tokens"]) if config.trainable == "prefix" else 0
        check_context(encoded, context, prefix_tokens)
    metric = "f1" if generation else "accuracy"

    def evaluate(split: str) -> float:
        if generation:
            return mean_f1(model, tokenizer, encoded[split], config.eval_batch_size, config.max_new_tokens)
        return accuracy(model, encoded[split], tokenizer.pad_token_id, config.eval_batch_size, head.scores)

    return Prepared(model, tokenizer, encoded, metric, evaluate, training_loss(config, loaded.task, metric, tokenizer))


def head_labels(config: TrainConfig, task) -> int | None:
    """How many labels the task has for a classification head (None for ``head: lm``, which scores candidates);
    tasks without a fixed label set are refused for the other heads."""
    if config.head == "lm":
        return None
    verbalizer = getattr(task, "verbalizer", None)
    if not verbalizer or getattr(task, "generation", False):
        raise ConfigError(
            f"head={config.head} needs a task with a fixed set of labels; {config.task!r} has candidates "
            "that differ per example or is a generation task: use head=lm"
        )
    if config.loss == "lm":
        raise ConfigError(
            f"loss=lm trains a causal LM on the answer's tokens; head={config.head} is trained by "
            "cross-entropy over the labels: set loss=auto or loss=classification"
        )
    return len(verbalizer)


def check_trainable_fits(config: TrainConfig, generation: bool) -> None:
    """Refuses, before anything loads, a trainable mode that the head or the task cannot train: ``prefix``
    needs ``head: lm`` and a classification task (``generation``: whether the task generates its answers)."""
    check_head_trainable(config.trainable, config.head)
    if generation and config.trainable == "prefix":
        raise ConfigError(
            f"trainable=prefix supports classification tasks; {config.task!r} is a generation task: "
            "use trainable=full or trainable=lora"
        )


def training_loss(config: TrainConfig, task, metric: str, tokenizer) -> Callable:
    """What the optimizer minimises: the task's loss (``loss: auto``) or the one configured, or with
    ``objective: accuracy | f1`` minus the batch's metric, which only zeroth-order optimizers can follow."""
    if config.objective != "loss":
        if resolve(config.optimizer)[0].needs_differentiable_loss:
            raise ConfigError(
                f"objective={config.objective} trains on a metric, which has no gradient: it needs a "
                f"zeroth-order optimizer ({', '.join(zeroth_order_optimizers())}), not "
                f"{config.optimizer!r}; or set objective=loss"
            )
        if config.objective != metric:
            raise ConfigError(
                f"objective={config.objective}, but task {config.task!r} is scored by {metric}: set "
                f"objective={metric} or objective=loss"
            )
        if config.objective == "accuracy":
            return negated_accuracy if config.head == "lm" else partial(negated_accuracy, scorer=HEADS[config.head].scores)
        if config.optimizer_options.get("dual_forward"):
            raise ConfigError(
                "objective=f1 decodes answers token by token, which the dual forward cannot stack: "
                "set optimizer_options.dual_forward=false"
            )

        def negated_f1(model, examples, pad_id, copies=1):
            return -torch.tensor(mean_f1(model, tokenizer, examples, len(examples), config.max_new_tokens))

        return negated_f1
    loss = task.loss if config.loss == "auto" else config.loss
    if loss == "classification" and getattr(task, "generation", False):
        raise ConfigError(
            f"loss=classification needs candidates to choose between; {config.task!r} is a generation "
            "task with one answer: set loss=lm or loss=auto"
        )
    if config.head != "lm":
        return partial(classification_loss, scorer=HEADS[config.head].scores)
    return answer_loss if loss == "lm" else classification_loss


def cut_warnings(encoded: dict[str, list[EncodedExample]], max_length: int, head: str = "lm") -> list[str]:
    """A warning for each split of which more than 1% of the examples were cut: the beginning of their prompt
    (``lm``, ``mlm``) or the end of their text (``classifier``)."""
    lost = "the end of their text" if head == "classifier" else "the beginning of their prompt"
    warnings = []
    for split, examples in encoded.items():
        cut = sum(example.truncated for example in examples)
        if cut > 0.01 * len(examples):
            warnings.append(
                f"warning: {cut} of {len(examples)} {split} examples ({cut / len(examples):.0%}) are longer "
                f"than max_length={max_length} tokens and lose {lost}: raise "
                "max_length (MeZO uses 2048) if the model's context allows"
            )
    return warnings


def check_context(encoded: dict[str, list[EncodedExample]], context: int, reserved: int) -> None:
    """Refuses sequences the model has no positions for (OPT's learned positions would fail deep in torch,
    rotary models would silently run beyond what they were trained on)."""
    for split, examples in encoded.items():
        for index, example in enumerate(examples):
            length = reserved + max(len(sequence) for sequence in example.sequences)
            if length > context:
                prefix = f" (including {reserved} prefix positions)" if reserved else ""
                raise ConfigError(
                    f"{split} example {index} is {length} tokens long{prefix}, more than the model's "
                    f"context of {context} positions: set max_length to at most {context - reserved} "
                    "(longer prompts then lose their beginning)"
                )


def evaluate_model(config: TrainConfig, checkpoint: str | None, split: str) -> tuple[str, float]:
    """The task's metric (name, value) for the configured model (zero-shot) or a checkpoint, on one split."""
    prepared = prepare(config)
    if checkpoint is not None:
        if not Path(checkpoint).is_file():
            raise TrainingError(f"{checkpoint}: no such checkpoint file")
        prepared.model.load_state_dict(torch.load(checkpoint, weights_only=False)["model"])
    return prepared.metric, prepared.evaluate(split)


def zeroth_order_optimizers() -> list[str]:
    """The registered optimizers that need loss values only."""
    return [name for name, cls in OPTIMIZERS.items() if not cls.needs_differentiable_loss]
