"""zotune optimizers inside a Hugging Face ``transformers.Trainer``.

``ZOTrainer`` is a Trainer whose ``training_step`` takes a whole zotune optimizer step (for MeZO: two
forwards under inference mode, no backward) instead of computing gradients for the Trainer's optimizer
to apply. Everything else stays the Trainer's: data loading, learning-rate schedules (they drive the
zotune optimizer's ``lr``), logging, evaluation, checkpoints and callbacks. An existing script switches
by replacing ``Trainer(...)`` with ``ZOTrainer(..., zo_optimizer="mezo", zo_options={"eps": 1e-3})``.

On a zotune task, ``zo_loss=task_loss(prepared)`` with ``data_collator=examples_collator`` trains on the task's
encoded examples with the trainer's own loss (for the ``lm`` head, candidates scored behind one pass over
their shared prompt), in place of the model's ``compute_loss``; that loss also takes the dual forward.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import Trainer

from .errors import OptionError
from .optim import OPTIMIZERS, create_optimizer, resolve

# Optimizers that take their step on one batch, as the Trainer's loop gives it (the others need batches of
# their own, a length split or a periodic large batch: `zotune train` makes them), and are not the
# Trainer's own kind of first-order optimizer.
SUPPORTED = tuple(name for name, cls in OPTIMIZERS.items() if cls.hf_trainer)


class ZOTrainer(Trainer):
    """A ``transformers.Trainer`` that trains with a zotune optimizer (``zo_optimizer``: one of
    ``SUPPORTED``; ``zo_options``: its options besides ``lr`` and ``weight_decay``, which come from the
    ``TrainingArguments``). An optimizer passed as ``optimizers=(zotune_optimizer, None)`` is used as is."""

    def __init__(
        self, *args, zo_optimizer: str = "mezo", zo_options: dict | None = None, zo_loss: Callable | None = None, **kwargs
    ) -> None:
        if not resolve(zo_optimizer)[0].hf_trainer:
            raise OptionError(
                f"ZOTrainer supports {', '.join(SUPPORTED)}, got {zo_optimizer!r}: it needs batches the "
                "Trainer does not make (or is the Trainer's own kind), so train it with `zotune train`"
            )
        if (zo_options or {}).get("dual_forward") and zo_loss is None:
            raise OptionError(
                "ZOTrainer cannot take dual_forward: the Trainer's compute_loss gives one loss, not one per copy of "
                "the batch; pass a zo_loss that takes copies (zotune.hf.task_loss), or drop it"
            )
        super().__init__(*args, **kwargs)
        if self.args.gradient_accumulation_steps != 1:
            raise OptionError(
                "ZOTrainer takes one optimizer step per batch: set gradient_accumulation_steps=1 and "
                "raise per_device_train_batch_size instead"
            )
        if self.args.world_size > 1:
            raise OptionError(
                "ZOTrainer runs in one process; for data parallel runs use `torchrun ... zotune train`, "
                "whose ranks exchange only the losses"
            )
        self.zo_optimizer, self.zo_options, self.zo_loss = zo_optimizer, dict(zo_options or {}), zo_loss
        self._zotune = None

    def create_optimizer(self, model=None):
        """The zotune optimizer (``zo_optimizer`` with ``zo_options`` and the ``TrainingArguments``' learning rate
        and weight decay) on ``model`` (None: the Trainer's), unless one was passed in. Its ``step()`` without a
        closure, which the Trainer's loop calls after :meth:`training_step` has taken the step, does nothing."""
        if self.optimizer is None:
            self.optimizer = create_optimizer(
                self.zo_optimizer,
                model or self.model,
                lr=self.args.learning_rate,
                weight_decay=self.args.weight_decay,
                **self.zo_options,
            )
        if self._zotune is None:
            # The Trainer's loop calls optimizer.step() after training_step, which has already taken the step
            # (it needs the batch, which step() is not given): that later call, without a closure, does nothing.
            # The Trainer may wrap the optimizer (accelerate's): the step goes to zotune's own.
            self._zotune = self.optimizer
            own_step = self._zotune.step
            self._zotune.step = lambda closure=None: None if closure is None else own_step(closure)
        return self.optimizer

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        """A whole zotune optimizer step on the Trainer's batch ``inputs``, the loss being the Trainer's
        ``compute_loss`` on it (``num_items_in_batch`` is not used). Returns the step's loss as a tensor without
        a graph, for the Trainer's logging."""
        model.train()
        inputs = self._prepare_inputs(inputs)

        def loss(batch, copies=1):
            with self.compute_loss_context_manager():
                return self.compute_loss(model, batch) if self.zo_loss is None else self.zo_loss(model, batch, copies)

        record = self._zotune.train_step({"batch": inputs}, loss, self.args.per_device_train_batch_size)
        return torch.tensor(float(record["loss"]), device=self.args.device)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """``zo_loss`` on the batch when one was given (no model outputs to return), else the Trainer's own."""
        if self.zo_loss is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss = self.zo_loss(model, inputs)
        return (loss, None) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """With ``zo_loss``, the evaluation loss of the batch (no logits or labels); else the Trainer's own."""
        if self.zo_loss is None:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        with torch.no_grad():
            return self.zo_loss(model, self._prepare_inputs(inputs)).detach(), None, None


def task_loss(prepared) -> Callable:
    """A ``zo_loss`` for :class:`ZOTrainer` from a prepared zotune task (:func:`zotune.preparation.prepare`): the
    loss ``zotune train`` minimises, on a batch of the task's encoded examples, ``copies`` of it for the dual
    forward."""
    pad_id = prepared.tokenizer.pad_token_id
    return lambda model, examples, copies=1: prepared.loss(model, examples, pad_id, copies)


def examples_collator(features: list) -> list:
    """A ``data_collator`` that hands a batch of encoded examples to ``zo_loss`` as they are."""
    return list(features)
