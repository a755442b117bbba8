"""Sparse directions: z with a seeded share of each parameter's entries zeroed (the ZO benchmark's sparse
gradients; Sparse MeZO, Liu et al., 2024, perturbs a subset of the weights likewise).

Entry k of parameter i is zeroed when g_k < Φ⁻¹(share_i), with g a Gaussian stream drawn from the mask's own
key, :func:`zotune.keys.param_key` of the mask seed and i, at the entry's position. So each entry is zeroed
with probability exactly ``share_i``, independently, and any stretch of the mask is regenerated alone, on any
shard, block or thread, like z itself. (The benchmark's code zeroes the entries whose Gaussian draw is below
the share itself, so a share s zeroes Φ(s) of them: 0.5 zeroes 69%.) The mask seed changes every
``mask_every`` steps and is derived from the optimizer's seed and the step, so a resumed run draws the same
masks.

:class:`MagnitudeMask` is Sparse MeZO's instead: z zeroed on each parameter's entries of largest magnitude,
its share ``share_i`` of them, so that the small weights are the ones perturbed and trained. The limit
between kept and zeroed magnitudes is found anew every ``mask_every`` steps (and kept in the optimizer's
state, so a resumed run finds the same), and the mask is read off the weights at the start of every step
(one bit per weight, held for the step), so that every operation of the step sees the same mask.

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

SHARES = ("layer", "global", "magnitude")
MASK_COUNTER = 1 << 62  # the mask's seeds are derive_seed(seed, epoch, MASK_COUNTER): never a direction's (seed, step, j)
SAMPLE = 10_000_000  # entries sampled to estimate a global magnitude quantile, as the benchmark does


class SparseMask:
    """The zeroed share of each parameter (by engine index; 0: not masked) and the current mask seed."""

    def __init__(self, shares: Sequence[float]) -> None:
        self.seed = 0
        self.earlier: dict[int, int] = {}  # a direction's key -> the mask seed of its step, where not the current
        self.reshare(shares)

    def reshare(self, shares: Sequence[float]) -> None:
        """Sets each parameter's zeroed share (a resumed run's, measured when the run began)."""
        self.thresholds = [NormalDist().inv_cdf(share) if share > 0 else None for share in shares]
        self.shares = list(shares)

    def key(self, param_index: int, direction_key: int | None = None) -> int:
        """The key of the Gaussian stream whose draws mask parameter ``param_index``: under the mask seed of the
        step whose direction is ``direction_key`` (see :meth:`remember`), else under the current seed."""
        return param_key(self.earlier.get(direction_key, self.seed), param_index)

    def remember(self, mask_seeds: dict[int, int]) -> None:
        """Masks earlier steps' directions with their own masks: ``mask_seeds`` maps each direction seed (a
        window's, replayed by AdaMeZO or momentum) to the mask seed of its step; replaces what was remembered."""
        self.earlier = {param_key(seed, i): mask_seed for seed, mask_seed in mask_seeds.items() for i in range(len(self.shares))}

    def covers(self, param_index: int) -> bool:
        """Whether parameter ``param_index`` has entries zeroed (a share above 0)."""
        return self.thresholds[param_index] is not None

    def zero(self, out: torch.Tensor, offset: int, param_index: int, key: int, gaussian: Backend, workers) -> None:
        """Zeroes the masked entries of ``out``, z of parameter ``param_index`` under direction key ``key`` at flat
        positions from ``offset``: the mask's Gaussian stream drawn (by ``gaussian``) a scratch chunk at a time."""
        threshold, mask_key, size = self.thresholds[param_index], self.key(param_index, key), chunk_size(out.device)
        for start in range(0, out.numel(), size):
            part = out[start : start + size]
            drawn = workers.buffer("mask", part.numel(), out.device)
            gaussian.fill(drawn, offset + start, mask_key)
            part.masked_fill_(drawn < threshold, 0.0)

    def zero_rows(self, z: torch.Tensor, offsets, param_index: int, key: int, gaussian) -> None:
        """Zeroes the masked entries of ``z``, rows of parameter ``param_index`` under direction key ``key``
        starting at flat ``offsets`` (a numpy array), the mask drawn for those rows only by ``gaussian`` (numba's)."""
        drawn = torch.empty(z.shape, dtype=torch.float32)
        gaussian.fill_rows(drawn, offsets, self.key(param_index, key))
        z.masked_fill_(drawn < self.thresholds[param_index], 0.0)


class MagnitudeMask:
    """Sparse MeZO's mask: the share ``shares[i]`` of parameter i's entries with the largest magnitudes zeroed
    in z. ``limits[i]``: the magnitude above which entries are zeroed, set by :meth:`renew`; ``bits[i]``: the
    mask read off the weights by :meth:`read`, one bit per entry. Whole parameters only (not FSDP shards)."""

    def __init__(self, shares: Sequence[float], params: Sequence[torch.Tensor]) -> None:
        self.shares, self.params = list(shares), list(params)
        self.limits: list[float | None] = [None] * len(self.params)
        self.bits: list[torch.Tensor | None] = [None] * len(self.params)

    def covers(self, param_index: int) -> bool:
        """Whether parameter ``param_index`` has entries zeroed (a share above 0)."""
        return self.shares[param_index] > 0

    def renew(self) -> list[float | None]:
        """Each masked parameter's limit from its weights now: the magnitude of its ⌈(1 − share)·n⌉-th smallest
        entry, so that the share of entries above it is zeroed (fewer on ties). Returns the limits."""
        for i, (param, share) in enumerate(zip(self.params, self.shares)):
            if share:
                magnitudes = param.detach().reshape(-1).abs()
                if magnitudes.dtype in (torch.float16, torch.bfloat16):  # exactly, where kthvalue takes it
                    magnitudes = magnitudes.float()
                keep = max(1, magnitudes.numel() - round(share * magnitudes.numel()))
                self.limits[i] = magnitudes.kthvalue(keep).values.item()
        return list(self.limits)

    def read(self) -> None:
        """The mask of this step, read off the weights as they are now against the limits."""
        for i, (param, limit) in enumerate(zip(self.params, self.limits)):
            if self.covers(i):
                self.bits[i] = packed_bits(param.detach().reshape(-1).abs() > limit)

    def zero(self, out: torch.Tensor, offset: int, param_index: int, key: int, gaussian: Backend, workers) -> None:
        """Zeroes the masked entries of ``out``, z of parameter ``param_index`` at flat positions from ``offset``
        (under this step's mask, whatever the direction ``key``)."""
        size = chunk_size(out.device)
        for start in range(0, out.numel(), size):
            part = out[start : start + size]
            positions = torch.arange(offset + start, offset + start + part.numel(), device=out.device)
            part.masked_fill_(bits_at(self.bits[param_index], positions), 0.0)

    def zero_rows(self, z: torch.Tensor, offsets, param_index: int, key: int, gaussian) -> None:
        """Zeroes the masked entries of ``z``, rows of parameter ``param_index`` starting at flat ``offsets``."""
        positions = torch.from_numpy(offsets)[:, None] + torch.arange(z.shape[1])
        z.masked_fill_(bits_at(self.bits[param_index], positions), 0.0)


def packed_bits(flags: torch.Tensor) -> torch.Tensor:
    """Flat boolean ``flags`` eight to a byte (flag 8k + b is bit b of byte k), on their device."""
    padded = torch.zeros(-(-flags.numel() // 8) * 8, dtype=torch.uint8, device=flags.device)
    padded[: flags.numel()] = flags
    shifts = torch.arange(8, dtype=torch.uint8, device=flags.device)
    return (padded.view(-1, 8) << shifts).sum(dim=1, dtype=torch.uint8)


def bits_at(bits: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The flags packed by :func:`packed_bits` at ``positions`` (an integer tensor of any shape)."""
    return (bits[positions >> 3] >> (positions & 7).to(torch.uint8)) & 1 == 1


class MaskedBackend(Backend):
    """One parameter's operations on masked z: ``fill`` draws z by the parameter's backend and zeroes the masked
    entries; update, pair and copy are the base class's torch operations on it."""

    def __init__(self, inner: Backend, gaussian: Backend, mask: SparseMask | MagnitudeMask, param_index: int) -> None:
        super().__init__(inner.distribution, inner.workers)
        self.inner, self.gaussian, self.mask, self.param_index = inner, gaussian, mask, param_index

    def fill(self, out: torch.Tensor, offset: int, key: int) -> None:
        """z from the parameter's own backend, with the entries the current mask zeroes set to 0."""
        self.inner.fill(out, offset, key)
        self.mask.zero(out, offset, self.param_index, key, self.gaussian, self.workers)


def shares_of(params: Sequence[torch.Tensor], sparsity: float, grouping: str, seed: int) -> list[float]:
    """The zeroed share of each parameter: ``sparsity`` for each ("layer"), or ("global", the benchmark's) the
    share of each parameter's entries at or below the ``sparsity`` quantile of all trainable weights' magnitudes
    (estimated on a seeded sample of ``SAMPLE`` entries), so that small-weight layers are masked more."""
    if not (isinstance(sparsity, (int, float)) and not isinstance(sparsity, bool) and 0 <= sparsity < 1):
        raise OptionError(f"sparsity must be the share of z's entries zeroed, in [0, 1), got {sparsity!r}")
    if grouping not in SHARES:
        raise OptionError(f"sparse_shares must be layer, global or magnitude, got {grouping!r}")
    if grouping in ("layer", "magnitude") or sparsity == 0:
        return [float(sparsity)] * len(params)
    magnitudes = torch.cat([p.detach().reshape(-1).abs().float().cpu() for p in params])
    generator = torch.Generator().manual_seed(seed)
    sample = magnitudes[torch.randperm(len(magnitudes), generator=generator)[:SAMPLE]]
    threshold = torch.quantile(sample, float(sparsity)).item()
    return [p.detach().abs().le(threshold).float().mean().item() for p in params]
