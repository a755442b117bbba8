"""What names a value of a direction: the step seed, the parameter's index, and the value's position in the
whole parameter.

Each parameter tensor is cut, in flattened order, into blocks of ``BLOCK_SIZE`` values; block ``b`` of
parameter ``i`` under seed ``s`` is drawn from its own counter-based stream, keyed with ``block_key(s, i, b)``.
The generators (:mod:`zotune.counter_rng`, :mod:`zotune.triton_rng`) take :func:`param_key` and a position
and compute each block's key themselves, so any stretch of a parameter is drawn in one call.

A sharded parameter (FSDP2's ``fully_shard``: a DTensor split along dim 0) is keyed by its place in the
whole: :func:`local_view` gives the shard a process holds and the flat position where it starts, so that
the process's part of ``z`` equals the same rows of the unsharded ``z``.
"""

from __future__ import annotations

import torch

from .errors import OptionError

# Keys change every BLOCK_SIZE values (part of the stream's definition: counter_rng.STREAM_VERSION).
BLOCK_SIZE = 1 << 17

_MASK64 = (1 << 64) - 1


def _splitmix64(value: int) -> int:
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


def param_key(seed: int, param_index: int) -> int:
    """The key of one parameter's part of ``z(seed)``, what the generators take."""
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


def local_view(param: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(the tensor this process holds, its flat offset in the whole parameter)."""
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(param, DTensor):
        return param, 0
    if param.device_mesh.ndim != 1 or tuple(param.placements) != (Shard(0),):
        raise OptionError(
            f"a parameter sharded as {tuple(param.placements)} on a {param.device_mesh.ndim}-D mesh: "
            "zotune's keyed directions support FSDP2's default, Shard(0) on a 1-D mesh"
        )
    rows = param.shape[0]
    chunk = -(-rows // param.device_mesh.size())  # torch.chunk's split: ceil(rows / ranks) rows per rank
    first_row = min(param.device_mesh.get_local_rank() * chunk, rows)
    return param.to_local(), first_row * (param.numel() // max(rows, 1))
