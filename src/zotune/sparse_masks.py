"""Sparse directions: z with a seeded share of each parameter's entries zeroed (the ZO benchmark's sparse
gradients; Sparse MeZO, Liu et al., 2024, perturbs a subset of the weights likewise).

Entry k of parameter i is zeroed when g_k < Φ⁻¹(share_i), with g a Gaussian stream drawn from the mask's own
key, :func:`zotune.keys.param_key` of the mask seed and i, at the entry's position. So each entry is zeroed
with probability exactly ``share_i``, independently, and any stretch of the mask is regenerated alone, on any
shard, block or thread, like z itself. (The benchmark's code zeroes the entries whose Gaussian draw is below
the share itself, so a share s zeroes Φ(s) of them: 0.5 zeroes 69%.) The mask seed changes every
``mask_every`` steps and is derived from the optimizer's seed and the step, so a resumed run draws the same
masks.

A masked parameter's operations run through :class:`MaskedBackend`: the base backend's torch operations on
masked z, not the fused numba/Triton kernels, which do not mask.
"""

from __future__ import annotations

from collections.abc import Sequence
from statistics import NormalDist

import torch

from .backends import Backend
from .errors import OptionError
from .keys import param_key
from .workers import chunk_size

SHARES = ("layer", "global")
MASK_COUNTER = 1 << 62  # the mask's seeds are derive_seed(seed, epoch, MASK_COUNTER): never a direction's (seed, step, j)
SAMPLE = 10_000_000  # entries sampled to estimate a global magnitude quantile, as the benchmark does


class SparseMask:
    """The zeroed share of each parameter (by engine index; 0: not masked) and the current mask seed."""

    def __init__(self, shares: Sequence[float]) -> None:
        self.thresholds = [NormalDist().inv_cdf(share) if share > 0 else None for share in shares]
        self.shares = list(shares)
        self.seed = 0

    def key(self, param_index: int) -> int:
        """The key of the Gaussian stream whose draws mask parameter ``param_index`` under the current seed."""
        return param_key(self.seed, param_index)


class MaskedBackend(Backend):
    """One parameter's operations on masked z: ``fill`` draws z by the parameter's backend and zeroes the masked
    entries; update, pair and copy are the base class's torch operations on it."""

    def __init__(self, inner: Backend, gaussian: Backend, mask: SparseMask, param_index: int) -> None:
        super().__init__(inner.distribution, inner.workers)
        self.inner, self.gaussian, self.mask, self.param_index = inner, gaussian, mask, param_index

    def fill(self, out: torch.Tensor, offset: int, key: int) -> None:
        """z from the parameter's own backend, with the entries the current mask zeroes set to 0."""
        self.inner.fill(out, offset, key)
        threshold, mask_key, size = (
            self.mask.thresholds[self.param_index],
            self.mask.key(self.param_index),
            chunk_size(out.device),
        )
        for start in range(0, out.numel(), size):  # the mask drawn a scratch chunk at a time
            part = out[start : start + size]
            drawn = self.workers.buffer("mask", part.numel(), out.device)
            self.gaussian.fill(drawn, offset + start, mask_key)
            part.masked_fill_(drawn < threshold, 0.0)


def shares_of(params: Sequence[torch.Tensor], sparsity: float, grouping: str, seed: int) -> list[float]:
    """The zeroed share of each parameter: ``sparsity`` for each ("layer"), or ("global", the benchmark's) the
    share of each parameter's entries at or below the ``sparsity`` quantile of all trainable weights' magnitudes
    (estimated on a seeded sample of ``SAMPLE`` entries), so that small-weight layers are masked more."""
    if not (isinstance(sparsity, (int, float)) and not isinstance(sparsity, bool) and 0 <= sparsity < 1):
        raise OptionError(f"sparsity must be the share of z's entries zeroed, in [0, 1), got {sparsity!r}")
    if grouping not in SHARES:
        raise OptionError(f"sparse_shares must be layer or global, got {grouping!r}")
    if grouping == "layer" or sparsity == 0:
        return [float(sparsity)] * len(params)
    magnitudes = torch.cat([p.detach().reshape(-1).abs().float().cpu() for p in params])
    generator = torch.Generator().manual_seed(seed)
    sample = magnitudes[torch.randperm(len(magnitudes), generator=generator)[:SAMPLE]]
    threshold = torch.quantile(sample, float(sparsity)).item()
    return [p.detach().abs().le(threshold).float().mean().item() for p in params]
