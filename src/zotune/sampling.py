"""Which training examples each step sees: shuffled epochs, Addax's two length buckets, MeZO-SVRG's batches
and large batches. Each sampler's ``next_batches(optimizer)`` names the batches of the next step (the
training-step protocol, :mod:`zotune.optim.protocol`); ``notes`` says how it split the data. Resumable."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .lengths import LengthSplit


class BatchSampler:
    """Shuffled passes over the training set, one seeded permutation per epoch; resumable."""

    def __init__(self, size: int, batch_size: int, seed: int) -> None:
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.epoch, self.position = 0, 0
        self.notes: list[str] = []

    def next_batches(self, optimizer) -> dict[str, list[int]]:
        """The next step's ``batch`` (``optimizer`` is not consulted: every step takes one)."""
        return {"batch": self.next_batch()}

    def next_batch(self) -> list[int]:
        """The next ``batch_size`` indices of the shuffled passes; a batch that reaches the end of an epoch is
        completed from the start of the next one."""
        batch = []
        while len(batch) < self.batch_size:
            if self.position == self.size:
                self.epoch, self.position = self.epoch + 1, 0
            take = min(self.batch_size - len(batch), self.size - self.position)
            batch += self._permutation()[self.position : self.position + take]
            self.position += take
        return batch

    def _permutation(self) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.size, generator=generator).tolist()

    def state_dict(self) -> dict:
        """Where the passes stand (epoch and position in it): with the seed, all a resumed run needs to draw
        the same batches."""
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        """Continues from a :meth:`state_dict`."""
        self.epoch, self.position = state["epoch"], state["position"]


class AddaxBatches:
    """Each step: K0 indices from D0 and K1 from D1, each bucket in its own shuffled epochs; resumable.

    An empty bucket yields ``None`` for its batch (the step then uses the other batch only)."""

    def __init__(self, split: LengthSplit, k0: int, k1: int, seed: int, notes: list[str] = ()) -> None:
        self.split, self.notes = split, list(notes)
        self.samplers = [
            BatchSampler(len(bucket), k, seed + offset) if bucket else None
            for offset, (bucket, k) in enumerate(((split.long, k0), (split.short, k1)))
        ]

    def next_batches(self, optimizer=None) -> dict[str, list[int] | None]:
        """The next step's ``K0 batch`` (from D0, the long examples) and ``K1 batch`` (from D1), as indices
        into the training set; None for an empty bucket's."""
        buckets = (self.split.long, self.split.short)
        return {
            name: None if sampler is None else [bucket[i] for i in sampler.next_batch()]
            for name, sampler, bucket in zip(("K0 batch", "K1 batch"), self.samplers, buckets)
        }

    def state_dict(self) -> dict:
        """Each bucket's sampler state (None for an empty bucket)."""
        return {"buckets": [None if s is None else s.state_dict() for s in self.samplers]}

    def load_state_dict(self, state: dict) -> None:
        """Continues from a :meth:`state_dict`."""
        for sampler, saved in zip(self.samplers, state["buckets"]):
            if sampler is not None:
                sampler.load_state_dict(saved)


class SVRGBatches:
    """MeZO-SVRG's data: minibatches for its ordinary steps, and large batches for its anchor steps, each
    from its own shuffled epochs over the whole training set; resumable."""

    def __init__(self, size: int, batch_size: int, large_batch_size: int, seed: int) -> None:
        self.small = BatchSampler(size, batch_size, seed)
        self.large = BatchSampler(size, large_batch_size, seed + 2)
        self.notes: list[str] = []

    def next_batches(self, optimizer) -> dict[str, list[int]]:
        """A ``large batch`` when the optimizer's next step is an anchor step, else a ``batch``."""
        if optimizer.is_anchor_step:
            return {"large batch": self.large.next_batch()}
        return {"batch": self.small.next_batch()}

    def state_dict(self) -> dict:
        """The states of the minibatch sampler and of the large-batch sampler."""
        return {"small": self.small.state_dict(), "large": self.large.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Continues from a :meth:`state_dict`."""
        self.small.load_state_dict(state["small"])
        self.large.load_state_dict(state["large"])
