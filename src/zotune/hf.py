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
from .optim import create_optimizer

# Optimizers whose step takes one closure on one batch; Addax and MeZO-SVRG need batches the Trainer's
# loop does not make (a length split; a periodic large batch): use `zotune train` for them.
SUPPORTED = ("mezo", "adamezo", "ip-sgd")


class ZOTrainer(Trainer):
    """A ``transformers.Trainer`` that trains with a zotune optimizer (``zo_optimizer``: one of
    ``SUPPORTED``; ``zo_options``: its options besides ``lr`` and ``weight_decay``, which come from the
    ``TrainingArguments``). An optimizer passed as ``optimizers=(zotune_optimizer, None)`` is used as is."""

    def __init__(self, *args, zo_optimizer: str = "mezo", zo_options: dict | None = None, **kwargs) -> None:
        if zo_optimizer not in SUPPORTED:
            raise OptionError(f"ZOTrainer supports {', '.join(SUPPORTED)}, got {zo_optimizer!r}: Addax and MeZO-SVRG "
                              "need their own batches, so train them with `zotune train`")
        super().__init__(*args, **kwargs)
        if self.args.gradient_accumulation_steps != 1:
            raise OptionError("ZOTrainer takes one optimizer step per batch: set gradient_accumulation_steps=1 and "
                              "raise per_device_train_batch_size instead")
        if self.args.world_size > 1:
            raise OptionError("ZOTrainer runs in one process; for data parallel runs use `torchrun ... zotune train`, "
                              "whose ranks exchange only the losses")
        self.zo_optimizer, self.zo_options = zo_optimizer, dict(zo_options or {})
        self._zo_step = None

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            self.optimizer = create_optimizer(self.zo_optimizer, model or self.model, lr=self.args.learning_rate,
                                              weight_decay=self.args.weight_decay, **self.zo_options)
        if self._zo_step is None:
            # The Trainer's loop calls optimizer.step() after training_step, which has already taken the step
            # (it needs the batch, which step() is not given): that later call must do nothing.
            self._zo_step = self.optimizer.step
            self.optimizer.step = lambda closure=None: None
        return self.optimizer

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        model.train()
        inputs = self._prepare_inputs(inputs)

        def closure():
            with self.compute_loss_context_manager():
                return self.compute_loss(model, inputs)

        loss = self._zo_step(closure)
        return torch.tensor(float(loss), device=self.args.device)
