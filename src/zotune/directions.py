"""Seeded random directions, regenerated on demand instead of stored.

A zeroth-order gradient in zotune is a list of ``(seed, coefficient)`` pairs. The direction ``z(seed)``
is never kept: it is regenerated whenever it is needed, from keys that depend only on the seed, the
parameter's index and the position inside the parameter.

Keyed generation. Each parameter tensor is cut, in flattened order, into blocks of ``BLOCK_SIZE``
values (``CUDA_BLOCK_SIZE`` for parameters on a GPU); block ``b`` of parameter ``i`` under seed ``s`` is
drawn from its own generator, seeded with ``block_key(s, i, b)``. So ``z_i(s)`` does not depend on which
other parameters were generated before it (the reference MeZO code reseeds one global stream and walks
the parameters in order), and any block can be regenerated alone: inside a module's forward hook, a
backward hook, on one shard of a parameter, or on any of several threads.

Sharded parameters (FSDP2's ``fully_shard``: DTensors split along dim 0) are keyed by their position in
the whole parameter: a rank generates only the blocks its shard overlaps, and slices the edge blocks, so
its part of ``z`` equals the same rows of the unsharded ``z``. Each rank then perturbs and updates its own
shard; no direction or parameter crosses the network.

Values depend on the device type. CPU blocks come from a counter-based SplitMix64 stream per key
(:mod:`zotune.counter_rng`), so any stretch of a block is computed alone, with full 64-bit keys. CUDA
blocks come from torch's Philox generator seeded with the key.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from . import counter_rng
from .errors import OptionError

GAUSSIAN = "gaussian"
RADEMACHER = "rademacher"
DISTRIBUTIONS = (GAUSSIAN, RADEMACHER)

# Small enough that threads share the work of one large matrix, large enough that the per-block seeding
# and dispatch cost (~10 us) stays around 1% of the drawing cost (measured on 2 cores: 2^17 was fastest
# of 2^15..2^17 for a 135M-parameter sweep).
BLOCK_SIZE = 1 << 17
# On a GPU each block costs a few kernel launches (~10 us each) whatever its size: 2^17 made a sweep over a
# 1.2B-parameter model launch-bound (0.55 s on an H100, against 0.03 s for one torch.normal per tensor).
# 2^24 values (64 MiB of float32 scratch) keep a sweep at a few hundred launches.
CUDA_BLOCK_SIZE = 1 << 24


def block_size(device: torch.device) -> int:
    return CUDA_BLOCK_SIZE if device.type == "cuda" else BLOCK_SIZE

_MASK64 = (1 << 64) - 1

Pair = tuple[int, float]


def _splitmix64(value: int) -> int:
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


def block_key(seed: int, param_index: int, block_index: int) -> int:
    """The generator seed of one block: a 64-bit mix of (step seed, parameter index, block index)."""
    return _splitmix64(_splitmix64(_splitmix64(seed & _MASK64) ^ param_index) ^ block_index)


def derive_seed(base_seed: int, *counters: int) -> int:
    """A 63-bit seed for one direction, e.g. ``derive_seed(base, step, sample)``."""
    value = _splitmix64(base_seed & _MASK64)
    for counter in counters:
        value = _splitmix64(value ^ (counter & _MASK64))
    return value >> 1


def _draw(block: torch.Tensor, generator: torch.Generator, distribution: str) -> None:
    if distribution == GAUSSIAN:
        block.normal_(generator=generator)
    else:
        block.random_(0, 2, generator=generator).mul_(2).sub_(1)


def _local_view(param: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """(the tensor this process holds, its flat offset in the whole parameter, the whole parameter's size)."""
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(param, DTensor):
        return param, 0, param.numel()
    if param.device_mesh.ndim != 1 or tuple(param.placements) != (Shard(0),):
        raise OptionError(f"a parameter sharded as {tuple(param.placements)} on a {param.device_mesh.ndim}-D mesh: "
                          "zotune's keyed directions support FSDP2's default, Shard(0) on a 1-D mesh")
    rows = param.shape[0]
    chunk = -(-rows // param.device_mesh.size())  # torch.chunk's split: ceil(rows / ranks) rows per rank
    first_row = min(param.device_mesh.get_local_rank() * chunk, rows)
    return param.to_local(), first_row * (param.numel() // max(rows, 1)), param.numel()


class Block:
    """One block of one parameter, as an update sees it (see :meth:`DirectionEngine.transform`)."""

    def __init__(self, engine: DirectionEngine, param_index: int, block_index: int, start: int, stop: int) -> None:
        self.engine, self.param_index, self.block_index, self.start = engine, param_index, block_index, start
        self.target = engine.params[param_index].detach().view(-1)[start:stop]
        self.work = self.target if self.target.dtype in (torch.float32, torch.float64) else self.target.float()
        self._drawn: dict[int, torch.Tensor] = {}

    def z(self, seed: int) -> torch.Tensor:
        """This block of ``z(seed)``, drawn once per seed into the thread's reused buffers."""
        if seed not in self._drawn:
            buffer = self.engine._buffer(len(self._drawn), self.work.numel(), self.target.device)
            self.engine._fill(buffer, seed, self.param_index, self.block_index, self.start)
            self._drawn[seed] = buffer
        return self._drawn[seed]

    def add_z(self, seed: int, coefficient: float) -> None:
        """``work += coefficient · z(seed)``; on the CPU, generated and added in one pass unless z is drawn already."""
        if self.work.device.type == "cpu" and self.work.dtype == torch.float32 and seed not in self._drawn:
            key, skip = self.engine._key_and_skip(seed, self.param_index, self.block_index, self.start)
            counter_rng.add(self.work.numpy(), key, coefficient, skip, self.engine.distribution)
        else:
            self.work.add_(self.z(seed), alpha=coefficient)

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
        self.params = [local for local, _, _ in views]
        self._offsets = [offset for _, offset, _ in views]  # flat offset of the held part in the whole parameter
        self._sizes = [size for _, _, size in views]  # the whole parameter's number of values
        self._block_sizes = [block_size(local.device) for local in self.params]
        self.distribution = distribution
        self.num_threads = max(1, num_threads or torch.get_num_threads())
        self._pool = ThreadPoolExecutor(self.num_threads - 1) if self.num_threads > 1 else None
        self._local = threading.local()
        self._schedules: dict[tuple[int, ...], list[list[tuple[int, int, int, int]]]] = {}

    # ----- generation -------------------------------------------------------------------------

    def direction(self, param_index: int, seed: int) -> torch.Tensor:
        """``z_i(seed)`` as a new float32 tensor shaped like the parameter, or like this process's shard of
        it (for tests and references)."""
        param = self.params[param_index]
        out = torch.empty(param.shape, dtype=torch.float32, device=param.device)
        flat = out.view(-1)
        for block_index, start, stop in self._blocks(param_index):
            self._fill(flat[start:stop], seed, param_index, block_index, start)
        return out

    def _fill(self, block: torch.Tensor, seed: int, param_index: int, block_index: int, start: int) -> None:
        """``block`` ← z at this process's positions [start, start + len) of the parameter, all inside keyed
        block ``block_index``."""
        key, skip = self._key_and_skip(seed, param_index, block_index, start)
        if block.device.type == "cpu":
            counter_rng.fill(block.numpy(), key, skip, self.distribution)
            return
        generator = self._generator(block.device)
        generator.manual_seed(key)
        size = self._block_sizes[param_index]
        whole = min(size, self._sizes[param_index] - block_index * size)
        if whole == block.numel():
            _draw(block, generator, self.distribution)
            return
        # torch's draw of fewer values is not a prefix of the whole draw: a shard's edge block is drawn
        # whole and sliced.
        drawn = self._buffer("whole", whole, block.device)
        _draw(drawn, generator, self.distribution)
        block.copy_(drawn[skip : skip + block.numel()])

    def _key_and_skip(self, seed: int, param_index: int, block_index: int, start: int) -> tuple[int, int]:
        """The keyed block's generator key, and where local position ``start`` lies inside the keyed block."""
        skip = self._offsets[param_index] + start - block_index * self._block_sizes[param_index]
        return block_key(seed, param_index, block_index), skip

    def _blocks(self, param_index: int) -> list[tuple[int, int, int]]:
        """(keyed block index, start, stop) of this process's part of the parameter, start/stop local."""
        offset, local, size = self._offsets[param_index], self.params[param_index].numel(), self._block_sizes[param_index]
        return [(b, max(b * size, offset) - offset, min((b + 1) * size, offset + local) - offset)
                for b in range(offset // size, -(-(offset + local) // size))]

    def _generator(self, device: torch.device) -> torch.Generator:
        generators = self._thread_state("generators", dict)
        if device not in generators:
            generators[device] = torch.Generator(device=device)
        return generators[device]

    def _buffer(self, slot: int | str, numel: int, device: torch.device, dtype=torch.float32) -> torch.Tensor:
        """A scratch block owned by the calling thread, reused across calls."""
        buffers = self._thread_state("buffers", dict)
        key = (slot, device, dtype)
        if key not in buffers:
            # A normal tensor even when first asked for inside a forward under inference_mode, so that
            # it can be written again outside it.
            with torch.inference_mode(False):
                buffers[key] = torch.empty(block_size(device), dtype=dtype, device=device)
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

        def update(block: Block) -> None:
            if scale != 1.0:
                block.work.mul_(scale)
            for seed, coef in terms:
                block.add_z(seed, coef)

        self.transform(update, indices)

    def transform(self, update: Callable[[Block], None], indices: Sequence[int] | None = None) -> None:
        """Run ``update`` on every block of the given parameters (default: all), spread over the threads.
        ``update`` changes ``block.work`` in place (float32, or float64 for float64 parameters); the result
        is written back to the parameter, rounded once for low-precision dtypes."""
        indices = tuple(range(len(self.params)) if indices is None else indices)

        def process(param_index: int, block_index: int, start: int, stop: int) -> None:
            block = Block(self, param_index, block_index, start, stop)
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
        work_dtype = torch.float64 if param.dtype == torch.float64 else torch.float32

        def process(_: int, block_index: int, start: int, stop: int) -> None:
            z = self._buffer(0, stop - start, param.device)
            if len(pairs) == 1:
                (seed, alpha), = pairs
                self._fill(z, seed, param_index, block_index, start)
                scaled = z if work_dtype == torch.float32 else self._buffer("sum", stop - start, param.device, work_dtype).copy_(z)
                # θ + (a·z, rounded), as a dense reference computes it: add's alpha may fuse the two roundings
                torch.add(source[start:stop], scaled.mul_(alpha), out=target[start:stop])
                return
            work = self._buffer("sum", stop - start, param.device, work_dtype)
            work.copy_(source[start:stop])
            for seed, alpha in pairs:
                self._fill(z, seed, param_index, block_index, start)
                work.add_(z, alpha=alpha)
            target[start:stop].copy_(work)

        self._run(self._schedule((param_index,)), process)
        return out

    # ----- scheduling -------------------------------------------------------------------------

    def _schedule(self, indices: tuple[int, ...]) -> list[list[tuple[int, int, int, int]]]:
        """Blocks (parameter, keyed block, start, stop) of the given parameters, one list per thread, balanced."""
        if indices not in self._schedules:
            blocks = [(i, *block) for i in indices for block in self._blocks(i)]
            parallel = self._pool is not None and all(self.params[i].device.type == "cpu" for i in indices)
            workers = min(self.num_threads, len(blocks)) if parallel else 1
            total = sum(stop - start for _, _, start, stop in blocks)
            groups: list[list[tuple[int, int, int, int]]] = [[] for _ in range(max(workers, 1))]
            done = 0
            for block in blocks:
                groups[min(done * workers // max(total, 1), workers - 1)].append(block)
                done += block[3] - block[2]
            self._schedules[indices] = groups
        return self._schedules[indices]

    def _run(self, groups, process) -> None:
        # Grad and inference mode are thread-local: workers must run in the caller's modes, e.g. to write
        # into a tensor created under inference_mode inside a forward.
        inference, grad = torch.is_inference_mode_enabled(), torch.is_grad_enabled()

        def work(group):
            with torch.inference_mode(inference), torch.set_grad_enabled(grad):
                for param_index, block_index, start, stop in group:
                    process(param_index, block_index, start, stop)

        futures = [self._pool.submit(work, group) for group in groups[1:]] if len(groups) > 1 else []
        work(groups[0])
        for future in futures:
            future.result()
