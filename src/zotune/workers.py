"""The threads that share the work done by torch ops on directions, and their scratch buffers.

What a generator does not do in one call of its own (updates and copies of tensors in other dtypes, copies
that sum several directions, the blocks of :meth:`zotune.directions.DirectionEngine.transform`) goes piece
by piece: z is drawn into a scratch buffer, then combined with torch ops. :class:`Workers` cuts the
stretches of parameters to work on into pieces, shares the pieces between its threads, and owns each
thread's reused scratch buffers.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from .counter_rng import MIN_SHARE, SHARE_ALIGN
from .keys import BLOCK_SIZE

# On the CPU a piece stays inside a keyed block: small enough that threads share the work of one large matrix
# and that its scratch stays in cache, large enough that the per-piece dispatch (~10 us) stays around 1% of
# the drawing cost. On a GPU every piece costs kernel launches (~10 us each) whatever its size: pieces of
# 2^24 values (64 MiB of float32 scratch), each spanning 128 keyed blocks, whose keys the kernel computes itself.
CUDA_CHUNK = 1 << 24

# (tag, flat offset of the stretch in the whole parameter, its length, its device). The tag comes back with
# each piece, to say which stretch it belongs to.
Stretch = tuple[int, int, int, torch.device]
# (tag, start, stop), positions inside the stretch.
Piece = tuple[int, int, int]


def chunk_size(device: torch.device) -> int:
    """The most values of one piece, and the length of a scratch buffer, on ``device``."""
    return CUDA_CHUNK if device.type == "cuda" else BLOCK_SIZE


def _pieces(offset: int, length: int, size: int) -> list[tuple[int, int]]:
    """(start, stop) inside a stretch of a parameter, cut where the whole parameter's chunks of ``size`` end."""
    return [
        (max(b * size, offset) - offset, min((b + 1) * size, offset + length) - offset)
        for b in range(offset // size, -(-(offset + length) // size))
    ]


class Workers:
    """``num_threads`` threads (the caller's and a pool of the others) for work on pieces of parameters."""

    def __init__(self, num_threads: int) -> None:
        self.num_threads = num_threads
        self._pool = ThreadPoolExecutor(num_threads - 1) if num_threads > 1 else None
        self._local = threading.local()
        self._schedules: dict[tuple[Stretch, ...], list[list[Piece]]] = {}

    def buffer(self, slot: int | str, numel: int, device: torch.device, dtype=torch.float32) -> torch.Tensor:
        """``numel`` values (at most a chunk) of a scratch buffer owned by the calling thread, reused across calls
        (contents undefined)."""
        if not hasattr(self._local, "buffers"):
            self._local.buffers = {}
        key = (slot, device, dtype)
        if key not in self._local.buffers:
            # A normal tensor even when first asked for inside a forward under inference_mode, so that
            # it can be written again outside it.
            with torch.inference_mode(False):
                self._local.buffers[key] = torch.empty(chunk_size(device), dtype=dtype, device=device)
        return self._local.buffers[key][:numel]

    def schedule(self, stretches: tuple[Stretch, ...]) -> list[list[Piece]]:
        """Pieces of the stretches, one list per thread, of equal size: the values are cut into equal shares,
        and a chunk that straddles two shares is split between them (values depend on their position only, so
        any stretch can be drawn alone). Whole chunks per thread would leave one of two threads idle on a
        576 × 192 matrix (one block), as a bf16 copy asks for, module by module. Pieces stay inside chunks, the
        unit of a :class:`zotune.directions.Block`. Work on a GPU stays on the calling thread."""
        if stretches not in self._schedules:
            blocks = [
                (tag, *piece)
                for tag, offset, length, device in stretches
                for piece in _pieces(offset, length, chunk_size(device))
            ]
            parallel = self._pool is not None and all(device.type == "cpu" for *_, device in stretches)
            total = sum(stop - start for _, start, stop in blocks)
            workers = max(1, min(self.num_threads, total // MIN_SHARE)) if parallel else 1
            # Share boundaries on the concatenated values, rounded to whole cache lines of float32 values.
            cuts = [total * k // workers // SHARE_ALIGN * SHARE_ALIGN for k in range(1, workers)] + [total]
            groups: list[list[Piece]] = [[] for _ in range(workers)]
            share, done = 0, 0
            for tag, start, stop in blocks:
                while start < stop:
                    # Never empty: consecutive cuts are at least MIN_SHARE - SHARE_ALIGN apart.
                    piece = min(stop, start + cuts[share] - done)
                    groups[share].append((tag, start, piece))
                    done += piece - start
                    start = piece
                    if done == cuts[share] and share < workers - 1:
                        share += 1
            self._schedules[stretches] = groups
        return self._schedules[stretches]

    def run(self, stretches: Sequence[Stretch], process: Callable[[int, int, int], None]) -> None:
        """``process(tag, start, stop)`` on every piece of the stretches, spread over the threads."""
        groups = self.schedule(tuple(stretches))
        # Grad and inference mode are thread-local: workers must run in the caller's modes, e.g. to write
        # into a tensor created under inference_mode inside a forward.
        inference, grad = torch.is_inference_mode_enabled(), torch.is_grad_enabled()

        def work(group):
            with torch.inference_mode(inference), torch.set_grad_enabled(grad):
                for tag, start, stop in group:
                    process(tag, start, stop)

        futures = [self._pool.submit(work, group) for group in groups[1:]] if len(groups) > 1 else []
        work(groups[0])
        for future in futures:
            future.result()
