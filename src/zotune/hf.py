"""zotune optimizers inside a Hugging Face ``transformers.Trainer``.

``ZOTrainer`` is a Trainer whose ``training_step`` takes a whole zotune optimizer step (for MeZO: two
forwards under inference mode, no backward) instead of computing gradients for the Trainer's optimizer
to apply. Everything else stays the Trainer's: data loading, learning-rate schedules (they drive the
zotune optimizer's ``lr``), logging, evaluation, checkpoints and callbacks. An existing script switches
by replacing ``Trainer(...)`` with ``ZOTrainer(..., zo_optimizer="mezo", zo_options={"eps": 1e-3})``.
"""

from __future__ import annotations

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

    def __init__(self, *args, zo_optimizer: str = "mezo", zo_options: dict | None = None, **kwargs) -> None:
        if not resolve(zo_optimizer)[0].hf_trainer:
            raise OptionError(
                f"ZOTrainer supports {', '.join(SUPPORTED)}, got {zo_optimizer!r}: it needs batches the "
                "Trainer does not make (or is the Trainer's own kind), so train it with `zotune train`"
            )
        if (zo_options or {}).get("dual_forward"):
            raise OptionError(
                "ZOTrainer cannot take dual_forward: the Trainer's compute_loss gives one loss, not one per copy of "
                "the batch; drop it, or train with `zotune train` (optimizer_options: {dual_forward: true})"
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
        self.zo_optimizer, self.zo_options = zo_optimizer, dict(zo_options or {})
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
                return self.compute_loss(model, batch)

        record = self._zotune.train_step({"batch": inputs}, loss, self.args.per_device_train_batch_size)
        return torch.tensor(float(record["loss"]), device=self.args.device)
