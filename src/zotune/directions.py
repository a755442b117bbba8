"""Seeded random directions, regenerated on demand instead of stored: :class:`DirectionEngine`.

A zeroth-order gradient in zotune is a list of ``(seed, coefficient)`` pairs. The direction ``z(seed)``
is never kept: it is regenerated whenever it is needed, from keys that depend only on the seed, the
parameter's index and the position inside the parameter (:mod:`zotune.keys`). So ``z_i(s)`` does not depend
on which other parameters were generated before it (the reference MeZO code reseeds one global stream and
walks the parameters in order), and any stretch can be regenerated alone: inside a module's forward hook, a
backward hook, on one shard of a parameter, or on any of several threads.

The engine holds the parameters, keyed by their position in its list, and this process's part of each:
for a sharded parameter (FSDP2's ``fully_shard``), the rows its shard holds, keyed by their place in the
whole, so that each rank perturbs and updates its own shard and no direction or parameter crosses the
network. Each operation hands the parameters to their backend (:mod:`zotune.backends`: numba on the CPU,
Triton on CUDA, torch ops for the dtypes those kernels do not take); :meth:`DirectionEngine.transform` runs
a caller's update on every block of the parameters, spread over the threads (:mod:`zotune.workers`).
Parameters on devices other than the CPU and CUDA are refused. With :meth:`DirectionEngine.mask_directions`
every operation draws sparse directions instead (:mod:`zotune.sparse_masks`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch

from . import counter_rng
from .backends import Backend, Backends, NumbaBackend, check_devices, perturb, work_dtype, working
from .errors import OptionError
from .keys import BLOCK_SIZE, local_view, param_key
from .sparse_masks import MagnitudeMask, MaskedBackend, SparseMask
from .keys import block_key as block_key, derive_seed as derive_seed  # re-exported: their import path until now
from .workers import CUDA_CHUNK as CUDA_CHUNK  # re-exported: its import path until now
from .workers import Stretch, Workers

GAUSSIAN = "gaussian"
RADEMACHER = "rademacher"
DISTRIBUTIONS = (GAUSSIAN, RADEMACHER)

Pair = tuple[int, float]


class Block:
    """One block of one parameter, as an update sees it (see :meth:`DirectionEngine.transform`)."""

    def __init__(self, engine: DirectionEngine, param_index: int, start: int, stop: int) -> None:
        self.engine, self.param_index, self.start = engine, param_index, start
        self.target = engine._flat(param_index)[start:stop]
        self.work = working(self.target)
        self._drawn: dict[int, torch.Tensor] = {}

    def z(self, seed: int) -> torch.Tensor:
        """This block of ``z(seed)``, drawn once per seed into the thread's reused buffers."""
        if seed not in self._drawn:
            buffer = self.engine._workers.buffer(len(self._drawn), self.work.numel(), self.target.device)
            self.engine._fill(buffer, seed, self.param_index, self.start)
            self._drawn[seed] = buffer
        return self._drawn[seed]

    def add_moments(self, first: torch.Tensor, second: torch.Tensor, terms: Sequence[tuple[int, float, float]]) -> None:
        """``first += a · z(seed)`` and ``second += b · z(seed)²`` over ``terms`` [(seed, a, b)] in order (scratch
        buffers of the block): AdaMeZO's moments, its own operation rather than a backend's (see
        :mod:`zotune.backends`). On the CPU in float32, each run of seeds not drawn already is generated and
        accumulated in one call of the numba generator's fused form: a call per seed and block cost ~10 us of
        Python, serialized by the GIL. Elsewhere z is drawn into the block's buffers, as :meth:`z` does."""
        pending: list[tuple[int, float, float]] = []

        def generate_pending() -> None:
            if pending:
                counter_rng.moments(
                    first.numpy(),
                    second.numpy(),
                    self.engine._offsets[self.param_index] + self.start,
                    [(param_key(seed, self.param_index), a, b) for seed, a, b in pending],
                    self.engine.distribution,
                    BLOCK_SIZE,
                )
                pending.clear()

        fused = NumbaBackend.takes(first) and not self.engine.masked(self.param_index)
        for seed, a, b in terms:
            if fused and seed not in self._drawn:
                pending.append((seed, a, b))
                continue
            generate_pending()
            z = self.z(seed)
            first.add_(z, alpha=a)
            second.addcmul_(z, z, value=b)
        generate_pending()

    def scratch(self, name: str) -> torch.Tensor:
        """A buffer of the block's size in ``work``'s dtype, owned by the thread and reused (contents undefined)."""
        return self.engine._workers.buffer(name, self.work.numel(), self.target.device, self.work.dtype)


class DirectionEngine:
    """Generates and applies keyed directions for a fixed list of parameter tensors.

    ``params[i]`` is keyed by its position ``i``: build the engine from the same parameters in the same
    order to regenerate the same directions (an optimizer does this from its ``param_groups``). A sharded
    parameter (DTensor) is replaced by the shard this process holds, keyed by its place in the whole.
    Directions are drawn in float32 whatever the parameter dtype; updates of bf16/fp16 parameters are
    computed in float32 and rounded once, those of float64 parameters in float64.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        distribution: str = GAUSSIAN,
        num_threads: int | None = None,
    ) -> None:
        if distribution not in DISTRIBUTIONS:
            raise OptionError(f"unknown direction distribution {distribution!r}: choose one of {', '.join(DISTRIBUTIONS)}")
        views = [local_view(param) for param in params]
        self.params = [local for local, _ in views]
        self._offsets = [offset for _, offset in views]  # flat offset of the held part in the whole parameter
        check_devices(self.params)
        self.distribution = distribution
        self.num_threads = max(1, num_threads or torch.get_num_threads())
        self._workers = Workers(self.num_threads)
        self._backends = Backends(distribution, self._workers)
        self.mask: SparseMask | MagnitudeMask | None = None  # sparse directions (zotune.sparse_masks), set by mask_directions
        self._masked: dict[tuple[int, int], MaskedBackend] = {}

    def mask_directions(self, shares: Sequence[float], magnitude: bool = False) -> SparseMask | MagnitudeMask:
        """From now on z_i has the share ``shares[i]`` of its entries zeroed: seeded entries under the returned
        mask's seed, or with ``magnitude`` those of largest magnitude (:class:`zotune.sparse_masks.MagnitudeMask`,
        whose limits and bits the caller renews and reads)."""
        self.mask = MagnitudeMask(shares, self.params) if magnitude else SparseMask(shares)
        self._mask_generator = Backends(GAUSSIAN, self._workers)
        return self.mask

    def masked(self, param_index: int) -> bool:
        """Whether z of parameter ``param_index`` has entries zeroed (sparse directions with a share above 0)."""
        return self.mask is not None and self.mask.covers(param_index)

    def _flat(self, param_index: int) -> torch.Tensor:
        return self.params[param_index].detach().view(-1)

    def _stretch(self, param_index: int) -> Stretch:
        param = self.params[param_index]
        return param_index, self._offsets[param_index], param.numel(), param.device

    def _backend(self, tensor: torch.Tensor, param_index: int) -> Backend:
        """The backend of ``tensor``, a part of parameter ``param_index`` (or of its z): masked if the parameter is."""
        backend = self._backends.of(tensor)
        if not self.masked(param_index):
            return backend
        key = (param_index, id(backend))
        if key not in self._masked:
            self._masked[key] = MaskedBackend(backend, self._mask_generator.of(tensor), self.mask, param_index)
        return self._masked[key]

    def _fill(self, out: torch.Tensor, seed: int, param_index: int, start: int) -> None:
        """``out`` (float32) ← z at this process's positions [start, start + len) of the parameter."""
        self._backend(out, param_index).fill(out, self._offsets[param_index] + start, param_key(seed, param_index))

    # ----- generation -------------------------------------------------------------------------

    def direction(self, param_index: int, seed: int) -> torch.Tensor:
        """``z_i(seed)`` as a new float32 tensor shaped like the parameter, or like this process's shard of
        it (for tests and references)."""
        param = self.params[param_index]
        out = torch.empty(param.shape, dtype=torch.float32, device=param.device)
        if out.numel():
            self._fill(out.view(-1), seed, param_index, 0)
        return out

    # ----- application ------------------------------------------------------------------------

    def apply(
        self,
        pairs: Sequence[Pair],
        indices: Sequence[int] | None = None,
        restore: Sequence[Pair] = (),
        scale: float = 1.0,
    ) -> None:
        """In place, for each parameter ``i`` in ``indices`` (default: all):

            θ_i ← (θ_i + Σ_restore r·z_i(s)) · scale + Σ_pairs a·z_i(s)

        in one pass over the parameter, computed as θ_i·scale + Σ_s c_s·z_i(s) with one coefficient per
        distinct seed, so each seed is generated once per block. ``restore`` undoes an in-place
        perturbation before ``scale`` (weight decay), so that decay sees the restored value. Zero
        coefficients are skipped, so a zero update leaves parameters bit-identical.
        """
        coefficients: dict[int, float] = {}
        for seed, coef in restore:
            coefficients[seed] = coefficients.get(seed, 0.0) + coef * scale
        for seed, coef in pairs:
            coefficients[seed] = coefficients.get(seed, 0.0) + coef
        terms = [(seed, coef) for seed, coef in coefficients.items() if coef != 0.0]
        if not terms and scale == 1.0:
            return
        by_backend: dict[Backend, list[int]] = {}
        for i in range(len(self.params)) if indices is None else indices:
            by_backend.setdefault(self._backend(self.params[i], i), []).append(i)
        for backend, group in by_backend.items():
            backend.update(
                [self._flat(i) for i in group],
                [self._offsets[i] for i in group],
                [[param_key(seed, i) for seed, _ in terms] for i in group],
                [coef for _, coef in terms],
                scale,
            )

    def transform(self, update: Callable[[Block], None], indices: Sequence[int] | None = None) -> None:
        """Run ``update`` on every block of the given parameters (default: all), spread over the threads.
        ``update`` changes ``block.work`` in place (float32, or float64 for float64 parameters); the result
        is written back to the parameter, rounded once for low-precision dtypes."""

        def process(param_index: int, start: int, stop: int) -> None:
            block = Block(self, param_index, start, stop)
            update(block)
            if block.work is not block.target:
                block.target.copy_(block.work)

        self._workers.run([self._stretch(i) for i in (range(len(self.params)) if indices is None else indices)], process)

    def perturbed_copy(
        self, param_index: int, pairs: Sequence[Pair], out: torch.Tensor | None = None, rows: slice | None = None
    ) -> torch.Tensor:
        """``θ_i + Σ a·z_i(s)`` over ``pairs``, in the parameter's dtype, written into ``out`` (a contiguous
        tensor of the parameter's shape) or a new tensor; θ_i is untouched. One pair is added straight from
        θ, bit-identical to ``θ + a·z`` computed densely; several are summed in the work dtype first, then rounded
        once. ``rows``: those rows (a step-1 slice along dim 0) of the copy only, z drawn for them alone (``out``
        shaped like them), equal to the same rows of the whole copy."""
        param, offset = self._rows_of(param_index, rows)
        out = torch.empty_like(param, memory_format=torch.contiguous_format) if out is None else out
        self._backend(param, param_index).copy(
            param.reshape(-1),
            out.view(-1),
            offset,
            [param_key(seed, param_index) for seed, _ in pairs],
            [alpha for _, alpha in pairs],
        )
        return out

    def perturbed_pair(
        self, param_index: int, seed: int, eps: float, plus: torch.Tensor, minus: torch.Tensor, rows: slice | None = None
    ) -> None:
        """``plus`` ← θ_i + ε·z_i(seed) and ``minus`` ← θ_i − ε·z_i(seed) (contiguous tensors of the
        parameter's shape, or of ``rows``, as in :meth:`perturbed_copy`), z generated once; each is
        bit-identical to :meth:`perturbed_copy` with ``(seed, ±eps)``."""
        param, offset = self._rows_of(param_index, rows)
        self._backend(param, param_index).pair(
            param.reshape(-1), plus.view(-1), minus.view(-1), offset, param_key(seed, param_index), eps
        )

    def _rows_of(self, param_index: int, rows: slice | None) -> tuple[torch.Tensor, int]:
        """The parameter (or its ``rows``) and the flat position in the whole parameter where it starts."""
        param = self.params[param_index].detach()
        if rows is None:
            return param, self._offsets[param_index]
        return param[rows], self._offsets[param_index] + rows.start * param[0].numel()

    def perturbed_rows(self, param_index: int, pairs: Sequence[Pair], rows: torch.Tensor) -> torch.Tensor:
        """Rows ``rows`` (indices along dim 0) of :meth:`perturbed_copy` of a CPU parameter, drawing z for those
        rows only (by the numba generator, whatever the parameter's dtype)."""
        param = self.params[param_index].detach()
        width = param[0].numel()
        source = param[rows].reshape(len(rows), width)
        offsets = (rows * width + self._offsets[param_index]).numpy()

        def draw(key: int) -> torch.Tensor:
            z = torch.empty(source.shape, dtype=torch.float32)
            self._backends.numba.fill_rows(z, offsets, key)
            if self.masked(param_index):
                self.mask.zero_rows(z, offsets, param_index, key, self._mask_generator.numba)
            return z

        out = torch.empty_like(source)
        work = torch.empty(source.shape, dtype=work_dtype(param.dtype), device=param.device)
        perturb(out, source, [(param_key(seed, param_index), alpha) for seed, alpha in pairs], draw, work)
        return out.view(len(rows), *param.shape[1:])
