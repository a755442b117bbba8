"""Direction backends: how the values of z reach a tensor, behind one small interface.

Every backend computes the same stream (:mod:`zotune.keys`); they differ in where z is drawn and how it is
combined with the tensor:

- :class:`NumbaBackend`: float32 CPU tensors. :mod:`zotune.counter_rng` writes the result as it draws z
  (no z buffer), a stretch in one call shared between numba's threads; a sweep over many tensors is one call.
- :class:`TritonBackend`: float32, bf16 and fp16 CUDA tensors. :mod:`zotune.triton_rng` computes the result
  in one launch per tensor, z never leaving registers, in float32, rounded once.
- :class:`TorchBackend`: every other tensor (bf16, fp16 and float64 on the CPU; float64 on CUDA, since the
  kernels' coefficients are float32). z is drawn in float32 by the device's generator into a scratch buffer,
  piece by piece over the :class:`zotune.workers.Workers`, and combined with torch ops, in float32 (float64
  for float64 tensors), rounded once.

The interface (:class:`Backend`) works on flat tensors holding a parameter's values from flat position
``offset`` of the whole parameter (a shard's start), with parameter keys (:func:`zotune.keys.param_key`):

- ``fill(out, offset, key)``: ``out`` ← z (``out`` float32);
- ``update(targets, offsets, keys, coefficients, scale)``: ``targets[p]`` ← ``targets[p]·scale +
  Σ_t coefficients[t]·z(keys[p][t])``, many tensors in one call;
- ``pair(source, plus, minus, offset, key, coefficient)``: ``plus`` ← source + d and, unless ``minus`` is
  None, ``minus`` ← source − d, with d = coefficient·z rounded before the add;
- ``copy(source, target, offset, keys, coefficients)``: ``target`` ← source + Σ c·z: ``pair`` for one term,
  else summed in the work dtype and rounded once.

The base class implements update, pair and copy with torch ops on z from ``fill``; the numba and Triton
backends replace update and pair with their fused kernels. :meth:`Backends.of` chooses the backend of a
tensor, the only place that does.

AdaMeZO's moments (Σ a·z and Σ b·z² over a window of seeds) are not an operation of the interface: AdaMeZO
is their one user, and only the numba generator has a fused form of them (``counter_rng.moments``), which
:meth:`zotune.directions.Block.add_moments` calls for float32 CPU blocks.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable, Sequence

import numpy as np
import torch

from . import counter_rng
from .errors import OptionError
from .keys import BLOCK_SIZE
from .workers import Workers


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """What an update or a copy is computed in: float64 for float64 tensors, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def working(target: torch.Tensor) -> torch.Tensor:
    """``target`` itself if it is in its work dtype, else a float32 copy to compute in and write back."""
    return target if target.dtype in (torch.float32, torch.float64) else target.float()


def perturb(
    target: torch.Tensor,
    source: torch.Tensor,
    terms: Sequence[tuple[int, float]],
    draw: Callable[[int], torch.Tensor],
    work: torch.Tensor,
) -> None:
    """``target`` ← ``source`` + Σ c·draw(key) over the terms [(key, c)]. One term adds the rounded c·z straight to
    θ, as a dense reference does (add's alpha may fuse the two roundings); several are summed in ``work``
    (float32, float64 for float64 tensors) and rounded once. ``draw(key)`` returns float32 values that may be
    scaled in place."""
    if len(terms) == 1:
        ((key, coefficient),) = terms
        z = draw(key)
        scaled = z if work.dtype == torch.float32 else work.copy_(z)
        torch.add(source, scaled.mul_(coefficient), out=target)
        return
    work.copy_(source)
    for key, coefficient in terms:
        work.add_(draw(key), alpha=coefficient)
    target.copy_(work)


def check_devices(tensors: Sequence[torch.Tensor]) -> None:
    """Refuse tensors that no backend covers."""
    unsupported = sorted({str(t.device) for t in tensors if t.device.type not in ("cpu", "cuda")})
    if unsupported:
        raise OptionError(
            f"parameters on {', '.join(unsupported)}: zotune generates directions on the CPU "
            "(numba) or on CUDA GPUs (Triton) only"
        )
    if any(t.device.type == "cuda" for t in tensors) and importlib.util.find_spec("triton") is None:
        raise OptionError(
            "parameters on CUDA need Triton for zotune's direction kernel: pip install triton "
            "(torch's Linux CUDA wheels bring it)"
        )


class Backend:
    """The interface (see the module docstring), with update, pair and copy done by torch ops on z from
    :meth:`fill`, piece by piece over the workers."""

    def __init__(self, distribution: str, workers: Workers) -> None:
        self.distribution, self.workers = distribution, workers

    def fill(self, out: torch.Tensor, offset: int, key: int) -> None:
        """``out`` ← z of the parameter key ``key`` at the flat positions ``offset`` .. ``offset + out.numel()``
        of the whole parameter. ``out``: a flat float32 tensor on the parameter's device. Every other operation
        of the base class draws z through it."""
        raise NotImplementedError

    def _z(self, offset: int, numel: int, key: int, device: torch.device) -> torch.Tensor:
        """z at ``numel`` positions from ``offset``, in the calling thread's z buffer."""
        z = self.workers.buffer(0, numel, device)
        self.fill(z, offset, key)
        return z

    def update(
        self,
        targets: Sequence[torch.Tensor],
        offsets: Sequence[int],
        keys: Sequence[Sequence[int]],
        coefficients: Sequence[float],
        scale: float,
    ) -> None:
        """``targets[p]`` ← ``targets[p]·scale + Σ_t coefficients[t]·z(keys[p][t])`` for every p, many tensors in
        one call (an update over the parameters of one backend).

        Args:
            targets: flat tensors, changed in place; ``targets[p]`` holds a parameter's values from its flat
                position ``offsets[p]``.
            offsets: where each target starts in its whole parameter.
            keys: for each target, the parameter keys of its terms, one per coefficient.
            coefficients: the terms' coefficients, the same for every target.
            scale: the factor on the old values (weight decay's 1 − lr·wd; 1.0: none).
        """

        def process(p: int, start: int, stop: int) -> None:
            target = targets[p][start:stop]
            work = working(target)
            if scale != 1.0:
                work.mul_(scale)
            for key, coefficient in zip(keys[p], coefficients):
                work.add_(self._z(offsets[p] + start, stop - start, key, target.device), alpha=coefficient)
            if work is not target:
                target.copy_(work)

        self.workers.run(
            [(p, offset, target.numel(), target.device) for p, (target, offset) in enumerate(zip(targets, offsets))], process
        )

    def pair(
        self, source: torch.Tensor, plus: torch.Tensor, minus: torch.Tensor | None, offset: int, key: int, coefficient: float
    ) -> None:
        """``plus`` ← source + d and, unless ``minus`` is None, ``minus`` ← source − d, with d = coefficient·z(key)
        rounded before the add (as a dense θ + c·z computes it): both sides of a two-point estimate from one
        generation of z. ``source``, ``plus`` and ``minus`` are flat tensors of one size and dtype, ``source``
        starting at flat position ``offset`` of its parameter; ``source`` is not changed."""
        wide = source.dtype == torch.float64

        def process(_: int, start: int, stop: int) -> None:
            z = self._z(offset + start, stop - start, key, source.device)
            scaled = self.workers.buffer("sum", stop - start, source.device, torch.float64).copy_(z) if wide else z
            scaled.mul_(coefficient)  # rounded before the add, as a dense θ + c·z; θ − d is exactly θ + (−d)
            torch.add(source[start:stop], scaled, out=plus[start:stop])
            if minus is not None:
                torch.sub(source[start:stop], scaled, out=minus[start:stop])

        self.workers.run([(0, offset, source.numel(), source.device)], process)

    def copy(
        self, source: torch.Tensor, target: torch.Tensor, offset: int, keys: Sequence[int], coefficients: Sequence[float]
    ) -> None:
        """``target`` ← source + Σ_t coefficients[t]·z(keys[t]) (flat tensors of one size, ``source`` starting at
        flat position ``offset`` of its parameter, and not changed): :meth:`pair` for one term, else summed in
        the work dtype (:func:`work_dtype`) and rounded once."""
        if len(keys) == 1:
            self.pair(source, target, None, offset, keys[0], coefficients[0])
            return
        terms = list(zip(keys, coefficients))
        dtype = work_dtype(source.dtype)

        def process(_: int, start: int, stop: int) -> None:
            perturb(
                target[start:stop],
                source[start:stop],
                terms,
                lambda key: self._z(offset + start, stop - start, key, source.device),
                self.workers.buffer("sum", stop - start, source.device, dtype),
            )

        self.workers.run([(0, offset, source.numel(), source.device)], process)


class NumbaBackend(Backend):
    """Float32 CPU tensors, by :mod:`zotune.counter_rng` (numpy views of the tensors)."""

    @staticmethod
    def takes(tensor: torch.Tensor) -> bool:
        """Whether this backend handles ``tensor``: float32 on the CPU."""
        return tensor.device.type == "cpu" and tensor.dtype == torch.float32

    def fill(self, out: torch.Tensor, offset: int, key: int) -> None:
        counter_rng.fill(out.numpy(), offset, key, self.distribution, BLOCK_SIZE)

    def fill_rows(self, out: torch.Tensor, offsets: np.ndarray, key: int) -> None:
        """Each row r of ``out`` (2-D float32) ← z at the positions from ``offsets[r]``, in one call."""
        counter_rng.fill_rows(out.numpy(), offsets, key, self.distribution, BLOCK_SIZE)

    def update(self, targets, offsets, keys, coefficients, scale) -> None:
        counter_rng.update_all(
            [target.numpy() for target in targets],
            offsets,
            keys,
            coefficients,
            scale,
            self.distribution,
            BLOCK_SIZE,
            self.workers.num_threads,
        )

    def pair(self, source, plus, minus, offset, key, coefficient) -> None:
        counter_rng.pair(
            source.numpy(),
            plus.numpy(),
            None if minus is None else minus.numpy(),
            offset,
            key,
            coefficient,
            self.distribution,
            BLOCK_SIZE,
            self.workers.num_threads,
        )


class TritonBackend(Backend):
    """Float32, bf16 and fp16 CUDA tensors, by :mod:`zotune.triton_rng`."""

    @staticmethod
    def takes(tensor: torch.Tensor) -> bool:
        """Whether this backend handles ``tensor``: float32, bf16 or fp16 on CUDA."""
        return tensor.device.type == "cuda" and tensor.dtype in (torch.float32, torch.bfloat16, torch.float16)

    @functools.cached_property
    def _kernels(self):
        from . import triton_rng  # imports Triton: only once a CUDA tensor needs it

        return triton_rng

    def fill(self, out: torch.Tensor, offset: int, key: int) -> None:
        self._kernels.fill(out, offset, key, self.distribution, BLOCK_SIZE)

    def update(self, targets, offsets, keys, coefficients, scale) -> None:
        for target, offset, target_keys in zip(targets, offsets, keys):
            self._kernels.update(target, offset, list(zip(target_keys, coefficients)), scale, self.distribution, BLOCK_SIZE)

    def pair(self, source, plus, minus, offset, key, coefficient) -> None:
        self._kernels.pair(source, plus, minus, offset, key, coefficient, self.distribution, BLOCK_SIZE)


class TorchBackend(Backend):
    """Every other tensor: the base class's torch ops, on z from the device's generator."""

    def __init__(self, generator: Backend) -> None:
        super().__init__(generator.distribution, generator.workers)
        self.generator = generator

    def fill(self, out: torch.Tensor, offset: int, key: int) -> None:
        self.generator.fill(out, offset, key)


class Backends:
    """The backends of one engine (one distribution, one set of workers), and the choice between them."""

    def __init__(self, distribution: str, workers: Workers) -> None:
        self.numba = NumbaBackend(distribution, workers)
        self.triton = TritonBackend(distribution, workers)
        self._torch = {"cpu": TorchBackend(self.numba), "cuda": TorchBackend(self.triton)}

    def of(self, tensor: torch.Tensor) -> Backend:
        """The backend that updates, copies or fills ``tensor``."""
        if NumbaBackend.takes(tensor):
            return self.numba
        if TritonBackend.takes(tensor):
            return self.triton
        return self._torch[tensor.device.type]
