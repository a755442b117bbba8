"""The one protocol between a training loop and every zotune optimizer.

The trainer, the benchmarks and the Hugging Face path hold no optimizer names and no type checks: they ask
the optimizer. An optimizer class says

- **what data a step needs**: :meth:`TrainingStep.data_plan` (a class method: the plan may measure the
  model before the optimizer exists) builds, from the training set, a resumable
  sampler whose ``next_batches(optimizer)`` names the batches of the next step (one ``batch``; Addax's
  ``K0 batch`` and ``K1 batch``; MeZO-SVRG's ``batch`` or ``large batch``). ``data_options`` are the keys
  of ``optimizer_options`` that shape the data rather than the optimizer;
- **how it takes a step** from those batches: :meth:`TrainingStep.train_step`, given the batches and
  ``loss(examples, copies=1)``, returns what it did: the loss, the forwards it ran and, for zeroth-order
  steps, the losses at θ ± εz, the projected gradient and the direction seed (the log's fields);
- **what it supports**: ``needs_differentiable_loss`` (else it can train on a metric), ``hf_trainer``
  (a step on one batch, as the Hugging Face Trainer gives), :meth:`TrainingStep.fsdp_problem` (why it
  cannot train FSDP2 shards with these options, or None), and :meth:`TrainingStep.data_parallel`, which
  makes its steps average over the ranks of a process group.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence

import torch

from ..errors import NonFiniteGradientError, NonFiniteLossError
from ..sampling import BatchSampler

Loss = Callable[..., torch.Tensor]  # loss(examples, copies=1): the mean loss (one per copy when copies > 1)


class TrainingStep:
    """The protocol's declarations and their defaults: a step on one batch, from shuffled epochs."""

    data_options: tuple[str, ...] = ()
    needs_differentiable_loss = True
    hf_trainer = True  # ZOTrainer can drive it (a step on one batch, and not the Trainer's own kind)
    # Named option sets worth measuring beside the defaults (the benchmarks add an entry for each).
    variants: dict[str, dict] = {}
    # Whether the trainer passes config.seed; the optimizers with a seed stream take it.
    takes_seed = False

    def remove_hooks(self) -> None:
        """Detaches what the optimizer registered on the model (IP-SGD's and Addax's backward hooks), so that
        another optimizer can train it; nothing for most."""

    def skip_warm_up(self) -> None:
        """Puts the optimizer past any warm-up steps that differ from its steady ones (benchmarks time and
        measure the steady step)."""

    @classmethod
    def fsdp_problem(cls, options: dict) -> str | None:
        """Why this optimizer cannot train FSDP2-sharded parameters with ``options``; None if it can."""
        return "its updates need whole parameter tensors (fused into backward, or dense buffers)"

    @classmethod
    def check_data_options(cls, options: dict, batch_size: int, size: int | None) -> None:
        """Refuses data options that cannot work, as far as that is known without the data (``size``: the
        number of training examples, when known)."""

    @classmethod
    def data_plan(
        cls,
        examples: Sequence,
        batch_size: int,
        options: dict,
        seed: int,
        measure: Callable[[list[int]], int] | None = None,
        from_first: Callable[[int], int] = int,
    ):
        """The sampler of this optimizer's batches over ``examples`` (the encoded training set). ``measure``
        gives the peak bytes of a first-order step on some examples; ``from_first`` gives rank 0's value of a
        number, so that every rank of a data-parallel run plans alike."""
        return BatchSampler(len(examples), batch_size, seed)

    def train_step(self, batches: dict[str, list], loss: Loss, micro_batch: int) -> dict:
        """One step from ``batches`` (named as the data plan names them, this rank's share of each);
        ``micro_batch``: the examples one forward may take. Returns the step's log fields, with
        ``forward_passes``."""
        raise NotImplementedError

    def data_parallel(self, group) -> None:
        """Average this optimizer's losses (and gradients, for first-order updates) over ``group``."""
        raise NotImplementedError


def option_names(cls: type) -> list[str]:
    """The keyword options an optimizer class takes: its constructor's, and, where it passes ``**options`` on,
    those of the class it extends."""
    names: list[str] = []
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        parameters = inspect.signature(vars(klass)["__init__"]).parameters.values()
        names += [p.name for p in parameters if p.kind is not p.VAR_KEYWORD and p.name not in names]
        if not any(p.kind is p.VAR_KEYWORD for p in parameters):
            break
    return [name for name in names if name != "self"]


class BackwardThenStep(TrainingStep):
    """A ``torch.optim`` optimizer under the protocol: forward, backward, the gradients averaged over the
    ranks (data parallel) and checked, then ``step()``. A non-finite gradient is refused before the update."""

    hf_trainer = False  # the Trainer runs such optimizers itself

    def _setup_protocol(self) -> None:
        self._reduce_loss: Callable[[list[float]], list[float]] = lambda values: values
        self._reduce_gradient: Callable[[torch.Tensor], None] | None = None

    def data_parallel(self, group) -> None:
        self._reduce_loss, self._reduce_gradient = group.mean, group.mean_gradient

    def train_step(self, batches: dict[str, list], loss: Loss, micro_batch: int) -> dict:
        # Steps counted from 1, kept in the state (a non-tensor key, which state_dict() keeps) for resuming.
        number = self.state.get("steps", 0) + 1
        self.zero_grad(set_to_none=True)
        value_tensor = loss(batches["batch"])
        value = self._reduce_loss([value_tensor.item()])[0]
        if not math.isfinite(value):
            raise NonFiniteLossError(number, {"loss": value})
        value_tensor.backward()
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        if self._reduce_gradient is not None:
            for grad in grads:
                self._reduce_gradient(grad)
        if not all(torch.isfinite(grad).all() for grad in grads):
            self.zero_grad(set_to_none=True)
            raise NonFiniteGradientError(number, applied=False)
        self.step()
        self.state["steps"] = number
        return dict(loss=value, forward_passes=1)
