"""Seeded random directions, regenerated on demand instead of stored.

A zeroth-order gradient in zotune is a list of ``(seed, coefficient)`` pairs. The direction ``z(seed)``
is never kept: it is regenerated whenever it is needed, from keys that depend only on the seed, the
parameter's index and the position inside the parameter.

Keyed generation. Each parameter tensor is cut, in flattened order, into blocks of ``BLOCK_SIZE``
values; block ``b`` of parameter ``i`` under seed ``s`` is drawn from its own counter-based stream, keyed
with ``block_key(s, i, b)`` (:mod:`zotune.counter_rng`). So ``z_i(s)`` does not depend on which
other parameters were generated before it (the reference MeZO code reseeds one global stream and walks
the parameters in order), and any block can be regenerated alone: inside a module's forward hook, a
backward hook, on one shard of a parameter, or on any of several threads.

Sharded parameters (FSDP2's ``fully_shard``: DTensors split along dim 0) are keyed by their position in
the whole parameter: a rank generates only the blocks its shard overlaps, and slices the edge blocks, so
its part of ``z`` equals the same rows of the unsharded ``z``. Each rank then perturbs and updates its own
shard; no direction or parameter crosses the network.

The stream is computed by numba-compiled code on the CPU and by a Triton kernel on a GPU
(:mod:`zotune.triton_rng`, which also fuses generation into the update); both give the same values, up to
float32 rounding. Parameters on other devices are refused.
"""

from __future__ import annotations

import importlib.util
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from . import counter_rng
from .counter_rng import MIN_SHARE, SHARE_ALIGN
from .errors import OptionError

GAUSSIAN = "gaussian"
RADEMACHER = "rademacher"
DISTRIBUTIONS = (GAUSSIAN, RADEMACHER)

# Keys change every BLOCK_SIZE values. On the CPU a block is also the unit of work: small enough that threads
# share the work of one large matrix and that its scratch stays in cache, large enough that the per-block
# dispatch (~10 us) stays around 1% of the drawing cost.
BLOCK_SIZE = 1 << 17
# On a GPU every piece of work costs kernel launches (~10 us each) whatever its size: work done through
# torch ops (``transform``) goes in chunks of 2^24 values (64 MiB of float32 scratch), each spanning 128
# keyed blocks, whose keys the kernel computes itself.
CUDA_CHUNK = 1 << 24


# Updated, and copied perturbed, on a GPU by one Triton launch per parameter, in float32, with no z tensor
# (float64 goes through torch ops: the kernels' coefficients are float32).
_FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _generated_in_place(tensor: torch.Tensor) -> bool:
    """Whether :mod:`zotune.counter_rng` writes a result into ``tensor`` as it generates z, in one pass with no
    z buffer: float32 CPU tensors (the numba code is float32; other dtypes take torch ops on a z buffer)."""
    return tensor.device.type == "cpu" and tensor.dtype == torch.float32


def _work_dtype(param: torch.Tensor) -> torch.dtype:
    return torch.float64 if param.dtype == torch.float64 else torch.float32


def _perturb(target: torch.Tensor, source: torch.Tensor, pairs: Sequence[Pair],
             direction: Callable[[int], torch.Tensor], work: torch.Tensor) -> None:
    """``target`` ← ``source`` + Σ a·direction(s) over the pairs. One pair adds the rounded a·z straight to θ,
    as a dense reference does (add's alpha may fuse the two roundings); several are summed in ``work``
    (float32, float64 for float64 parameters) and rounded once. ``direction(s)`` returns float32 values that
    may be scaled in place."""
    if len(pairs) == 1:
        (seed, alpha), = pairs
        z = direction(seed)
        scaled = z if work.dtype == torch.float32 else work.copy_(z)
        torch.add(source, scaled.mul_(alpha), out=target)
        return
    work.copy_(source)
    for seed, alpha in pairs:
        work.add_(direction(seed), alpha=alpha)
    target.copy_(work)


def _chunk_size(device: torch.device) -> int:
    return CUDA_CHUNK if device.type == "cuda" else BLOCK_SIZE

_MASK64 = (1 << 64) - 1

Pair = tuple[int, float]


def _splitmix64(value: int) -> int:
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


def param_key(seed: int, param_index: int) -> int:
    return _splitmix64(_splitmix64(seed & _MASK64) ^ param_index)


def block_key(seed: int, param_index: int, block_index: int) -> int:
    """The stream key of one block: a 64-bit mix of (step seed, parameter index, block index). The generators
    compute it themselves from :func:`param_key` (``counter_rng._block_key``, ``triton_rng._term``)."""
    return _splitmix64(param_key(seed, param_index) ^ block_index)


def derive_seed(base_seed: int, *counters: int) -> int:
    """A 63-bit seed for one direction, e.g. ``derive_seed(base, step, sample)``."""
    value = _splitmix64(base_seed & _MASK64)
    for counter in counters:
        value = _splitmix64(value ^ (counter & _MASK64))
    return value >> 1


def _local_view(param: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(the tensor this process holds, its flat offset in the whole parameter)."""
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(param, DTensor):
        return param, 0
    if param.device_mesh.ndim != 1 or tuple(param.placements) != (Shard(0),):
        raise OptionError(f"a parameter sharded as {tuple(param.placements)} on a {param.device_mesh.ndim}-D mesh: "
                          "zotune's keyed directions support FSDP2's default, Shard(0) on a 1-D mesh")
    rows = param.shape[0]
    chunk = -(-rows // param.device_mesh.size())  # torch.chunk's split: ceil(rows / ranks) rows per rank
    first_row = min(param.device_mesh.get_local_rank() * chunk, rows)
    return param.to_local(), first_row * (param.numel() // max(rows, 1))


class Block:
    """One block of one parameter, as an update sees it (see :meth:`DirectionEngine.transform`)."""

    def __init__(self, engine: DirectionEngine, param_index: int, start: int, stop: int) -> None:
        self.engine, self.param_index, self.start = engine, param_index, start
        self.target = engine.params[param_index].detach().view(-1)[start:stop]
        self.work = self.target if self.target.dtype in (torch.float32, torch.float64) else self.target.float()
        self._drawn: dict[int, torch.Tensor] = {}

    def z(self, seed: int) -> torch.Tensor:
        """This block of ``z(seed)``, drawn once per seed into the thread's reused buffers."""
        if seed not in self._drawn:
            buffer = self.engine._buffer(len(self._drawn), self.work.numel(), self.target.device)
            self.engine._fill(buffer, seed, self.param_index, self.start)
            self._drawn[seed] = buffer
        return self._drawn[seed]

    def add_moments(self, first: torch.Tensor, second: torch.Tensor, terms: Sequence[tuple[int, float, float]]) -> None:
        """``first += a · z(seed)`` and ``second += b · z(seed)²`` over ``terms`` [(seed, a, b)] in order (scratch
        buffers of the block). On the CPU in float32, each run of seeds not drawn already is generated and
        accumulated in one call: a call per seed and block cost ~10 us of Python, serialized by the GIL."""
        pending: list[tuple[int, float, float]] = []

        def generate_pending() -> None:
            if pending:
                counter_rng.moments(first.numpy(), second.numpy(), self.engine._offsets[self.param_index] + self.start,
                                    [(param_key(seed, self.param_index), a, b) for seed, a, b in pending],
                                    self.engine.distribution, BLOCK_SIZE)
                pending.clear()

        for seed, a, b in terms:
            if _generated_in_place(first) and seed not in self._drawn:
                pending.append((seed, a, b))
                continue
            generate_pending()
            z = self.z(seed)
            first.add_(z, alpha=a)
            second.addcmul_(z, z, value=b)
        generate_pending()

    def scratch(self, name: str) -> torch.Tensor:
        """A buffer of the block's size in ``work``'s dtype, owned by the thread and reused (contents undefined)."""
        return self.engine._buffer(name, self.work.numel(), self.target.device, self.work.dtype)


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
            raise OptionError(
                f"unknown direction distribution {distribution!r}: choose one of {', '.join(DISTRIBUTIONS)}"
            )
        views = [_local_view(param) for param in params]
        self.params = [local for local, _ in views]
        self._offsets = [offset for _, offset in views]  # flat offset of the held part in the whole parameter
        unsupported = sorted({str(p.device) for p in self.params if p.device.type not in ("cpu", "cuda")})
        if unsupported:
            raise OptionError(f"parameters on {', '.join(unsupported)}: zotune generates directions on the CPU "
                              "(numba) or on CUDA GPUs (Triton) only")
        if any(p.device.type == "cuda" for p in self.params) and importlib.util.find_spec("triton") is None:
            raise OptionError("parameters on CUDA need Triton for zotune's direction kernel: pip install triton "
                              "(torch's Linux CUDA wheels bring it)")
        self._chunk_sizes = [_chunk_size(local.device) for local in self.params]
        self.distribution = distribution
        self.num_threads = max(1, num_threads or torch.get_num_threads())
        self._pool = ThreadPoolExecutor(self.num_threads - 1) if self.num_threads > 1 else None
        self._local = threading.local()
        self._schedules: dict[tuple[int, ...], list[list[tuple[int, int, int]]]] = {}

    # ----- generation -------------------------------------------------------------------------

    def direction(self, param_index: int, seed: int) -> torch.Tensor:
        """``z_i(seed)`` as a new float32 tensor shaped like the parameter, or like this process's shard of
        it (for tests and references)."""
        param = self.params[param_index]
        out = torch.empty(param.shape, dtype=torch.float32, device=param.device)
        flat = out.view(-1)
        for start, stop in self._blocks(param_index):
            self._fill(flat[start:stop], seed, param_index, start)
        return out

    @staticmethod
    def _fused(param: torch.Tensor) -> bool:
        """Whether one Triton launch generates z and writes the result, z never leaving registers."""
        return param.device.type == "cuda" and param.dtype in _FUSED_DTYPES

    def _fill(self, out: torch.Tensor, seed: int, param_index: int, start: int) -> None:
        """``out`` ← z at this process's positions [start, start + len) of the parameter (any stretch)."""
        if out.device.type == "cuda":
            from . import triton_rng as generator
        else:
            generator, out = counter_rng, out.numpy()
        generator.fill(out, self._offsets[param_index] + start, param_key(seed, param_index), self.distribution,
                       BLOCK_SIZE)

    def _blocks(self, param_index: int) -> list[tuple[int, int]]:
        """(start, stop) of the pieces of work on this process's part of the parameter, local positions,
        cut where the whole parameter's chunks (keyed blocks on the CPU) end."""
        offset, local, size = self._offsets[param_index], self.params[param_index].numel(), self._chunk_sizes[param_index]
        return [(max(b * size, offset) - offset, min((b + 1) * size, offset + local) - offset)
                for b in range(offset // size, -(-(offset + local) // size))]

    def _buffer(self, slot: int | str, numel: int, device: torch.device, dtype=torch.float32) -> torch.Tensor:
        """A scratch block owned by the calling thread, reused across calls."""
        buffers = self._thread_state("buffers", dict)
        key = (slot, device, dtype)
        if key not in buffers:
            # A normal tensor even when first asked for inside a forward under inference_mode, so that
            # it can be written again outside it.
            with torch.inference_mode(False):
                buffers[key] = torch.empty(_chunk_size(device), dtype=dtype, device=device)
        return buffers[key][:numel]

    def _thread_state(self, name, factory):
        if not hasattr(self._local, name):
            setattr(self._local, name, factory())
        return getattr(self._local, name)

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

        def keyed_terms(param_index: int) -> list[tuple[int, float]]:
            return [(param_key(seed, param_index), coef) for seed, coef in terms]

        def update(block: Block) -> None:
            if scale != 1.0:
                block.work.mul_(scale)
            for seed, coef in terms:
                block.work.add_(block.z(seed), alpha=coef)

        indices = list(range(len(self.params)) if indices is None else indices)
        fused = [i for i in indices if self._fused(self.params[i])]
        if fused:
            from . import triton_rng

            for i in fused:
                triton_rng.update(self.params[i].detach().view(-1), self._offsets[i], keyed_terms(i), scale,
                                  self.distribution, BLOCK_SIZE)
        in_place = [i for i in indices if i not in fused and _generated_in_place(self.params[i])]
        if in_place:
            counter_rng.update_all([self.params[i].detach().view(-1).numpy() for i in in_place],
                                   [self._offsets[i] for i in in_place],
                                   [[param_key(seed, i) for seed, _ in terms] for i in in_place], [coef for _, coef in terms],
                                   scale, self.distribution, BLOCK_SIZE, self.num_threads)
        done = {*fused, *in_place}
        rest = [i for i in indices if i not in done]
        if rest:
            self.transform(update, rest)

    def transform(self, update: Callable[[Block], None], indices: Sequence[int] | None = None) -> None:
        """Run ``update`` on every block of the given parameters (default: all), spread over the threads.
        ``update`` changes ``block.work`` in place (float32, or float64 for float64 parameters); the result
        is written back to the parameter, rounded once for low-precision dtypes."""
        indices = tuple(range(len(self.params)) if indices is None else indices)

        def process(param_index: int, start: int, stop: int) -> None:
            block = Block(self, param_index, start, stop)
            update(block)
            if block.work is not block.target:
                block.target.copy_(block.work)

        self._run(self._schedule(indices), process)

    def perturbed_copy(self, param_index: int, pairs: Sequence[Pair], out: torch.Tensor | None = None) -> torch.Tensor:
        """``θ_i + Σ a·z_i(s)`` over ``pairs``, in the parameter's dtype, written into ``out`` (a contiguous
        tensor of the parameter's shape) or a new tensor; θ_i is untouched. One pair is added straight from
        θ, bit-identical to ``θ + a·z`` computed densely; several are summed in the work dtype first, then rounded once."""
        param = self.params[param_index].detach()
        out = torch.empty_like(param, memory_format=torch.contiguous_format) if out is None else out
        source, target = param.reshape(-1), out.view(-1)
        if self._fused(param) and len(pairs) == 1:
            from . import triton_rng

            (seed, alpha), = pairs
            triton_rng.pair(source, target, None, self._offsets[param_index], param_key(seed, param_index), alpha,
                            self.distribution, BLOCK_SIZE)
            return out

        if _generated_in_place(param) and len(pairs) == 1:
            (seed, alpha), = pairs
            counter_rng.pair(source.numpy(), target.numpy(), None, self._offsets[param_index],
                             param_key(seed, param_index), alpha, self.distribution, BLOCK_SIZE, self.num_threads)
            return out

        def process(_: int, start: int, stop: int) -> None:
            def direction(seed: int) -> torch.Tensor:
                z = self._buffer(0, stop - start, param.device)
                self._fill(z, seed, param_index, start)
                return z

            _perturb(target[start:stop], source[start:stop], pairs, direction,
                     self._buffer("sum", stop - start, param.device, _work_dtype(param)))

        self._run(self._schedule((param_index,)), process)
        return out

    def perturbed_pair(self, param_index: int, seed: int, eps: float, plus: torch.Tensor, minus: torch.Tensor) -> None:
        """``plus`` ← θ_i + ε·z_i(seed) and ``minus`` ← θ_i − ε·z_i(seed) (contiguous tensors of the
        parameter's shape), z generated once; each is bit-identical to :meth:`perturbed_copy` with
        ``(seed, ±eps)``."""
        param = self.params[param_index].detach()
        source, plus_flat, minus_flat = param.reshape(-1), plus.view(-1), minus.view(-1)
        if self._fused(param):
            from . import triton_rng

            triton_rng.pair(source, plus_flat, minus_flat, self._offsets[param_index], param_key(seed, param_index),
                            eps, self.distribution, BLOCK_SIZE)
            return

        if _generated_in_place(param):
            counter_rng.pair(source.numpy(), plus_flat.numpy(), minus_flat.numpy(), self._offsets[param_index],
                             param_key(seed, param_index), eps, self.distribution, BLOCK_SIZE, self.num_threads)
            return

        def process(_: int, start: int, stop: int) -> None:
            z = self._buffer(0, stop - start, param.device)
            self._fill(z, seed, param_index, start)
            scaled = z if _work_dtype(param) == torch.float32 else self._buffer("sum", stop - start, param.device,
                                                                               torch.float64).copy_(z)
            scaled.mul_(eps)  # rounded before the add, as in perturbed_copy; θ − d is exactly θ + (−d)
            torch.add(source[start:stop], scaled, out=plus_flat[start:stop])
            torch.sub(source[start:stop], scaled, out=minus_flat[start:stop])

        self._run(self._schedule((param_index,)), process)

    def perturbed_rows(self, param_index: int, pairs: Sequence[Pair], rows: torch.Tensor) -> torch.Tensor:
        """Rows ``rows`` (indices along dim 0) of :meth:`perturbed_copy` of a CPU parameter, drawing z for those
        rows only."""
        param = self.params[param_index].detach()
        width = param[0].numel()
        source = param[rows].reshape(len(rows), width)
        offsets = (rows * width + self._offsets[param_index]).numpy()

        def direction(seed: int) -> torch.Tensor:
            z = torch.empty(source.shape, dtype=torch.float32)
            counter_rng.fill_rows(z.numpy(), offsets, param_key(seed, param_index), self.distribution, BLOCK_SIZE)
            return z

        out = torch.empty_like(source)
        work = torch.empty(source.shape, dtype=_work_dtype(param), device=param.device)
        _perturb(out, source, pairs, direction, work)
        return out.view(len(rows), *param.shape[1:])

    # ----- scheduling -------------------------------------------------------------------------

    def _schedule(self, indices: tuple[int, ...]) -> list[list[tuple[int, int, int]]]:
        """Pieces (parameter, start, stop) of the given parameters, one list per thread, of equal size: the
        values are cut into equal shares, and a keyed block that straddles two shares is split between them
        (values depend on their position only, so any stretch can be drawn alone). Whole blocks per thread
        would leave one of two threads idle on a 576 × 192 matrix (one block), as a bf16 copy asks for, module
        by module. Pieces stay inside keyed blocks, the unit of a :class:`Block`. (Float32 CPU work does not
        come here: :mod:`zotune.counter_rng` shares a parameter between numba's threads itself.)"""
        if indices not in self._schedules:
            blocks = [(i, *block) for i in indices for block in self._blocks(i)]
            parallel = self._pool is not None and all(self.params[i].device.type == "cpu" for i in indices)
            total = sum(stop - start for _, start, stop in blocks)
            workers = max(1, min(self.num_threads, total // MIN_SHARE)) if parallel else 1
            # Share boundaries on the concatenated values, rounded to whole cache lines of float32 values.
            cuts = [total * k // workers // SHARE_ALIGN * SHARE_ALIGN for k in range(1, workers)] + [total]
            groups = [[] for _ in range(workers)]
            share, done = 0, 0
            for param_index, start, stop in blocks:
                while start < stop:
                    # Never empty: consecutive cuts are at least MIN_SHARE - SHARE_ALIGN apart.
                    piece = min(stop, start + cuts[share] - done)
                    groups[share].append((param_index, start, piece))
                    done += piece - start
                    start = piece
                    if done == cuts[share] and share < workers - 1:
                        share += 1
            self._schedules[indices] = groups
        return self._schedules[indices]

    def _run(self, groups, process) -> None:
        # Grad and inference mode are thread-local: workers must run in the caller's modes, e.g. to write
        # into a tensor created under inference_mode inside a forward.
        inference, grad = torch.is_inference_mode_enabled(), torch.is_grad_enabled()

        def work(group):
            with torch.inference_mode(inference), torch.set_grad_enabled(grad):
                for param_index, start, stop in group:
                    process(param_index, start, stop)

        futures = [self._pool.submit(work, group) for group in groups[1:]] if len(groups) > 1 else []
        work(groups[0])
        for future in futures:
            future.result()
