"""Keyed directions on CUDA, drawn inside Triton kernels.

The value of ``z`` at flat position p of parameter i under seed s is Philox(key = block_key(s, i, 0),
counter = p): a counter-based draw, so any range of a parameter (a block, an FSDP shard) is drawn alone
and nothing is stored. An update ``θ ← (θ + Σ r·z)·scale + Σ a·z`` then reads and writes the parameter
once, with z made in registers: no scratch buffer and no extra pass over memory, where torch ops need a
generation pass, an upcast, an add and a copy back. Values differ from the CPU's (mt19937 blocks).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .errors import OptionError

_BLOCK = 1024
_TWO_POW_63 = 1 << 63


@triton.jit
def _z(key, position, RADEMACHER: tl.constexpr):
    if RADEMACHER:
        return tl.where(tl.rand(key, position) < 0.5, -1.0, 1.0)
    return tl.randn(key, position)


@triton.jit
def _combine_kernel(source, target, n, start, keys, coefs, n_restore, n_total,
                    RADEMACHER: tl.constexpr, FP64: tl.constexpr, BLOCK: tl.constexpr):
    index = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = index < n
    position = start + index
    x = tl.load(source + index, mask=mask, other=0.0)
    x = x.to(tl.float64) if FP64 else x.to(tl.float32)
    for k in range(0, n_restore):
        x += tl.load(coefs + k) * _z(tl.load(keys + k), position, RADEMACHER)
    x = x * tl.load(coefs + n_total)  # the scale (weight decay), after the restore
    for k in range(n_restore, n_total):
        x += tl.load(coefs + k) * _z(tl.load(keys + k), position, RADEMACHER)
    tl.store(target + index, x.to(target.dtype.element_ty), mask=mask)


@triton.jit
def _fill_kernel(out, n, start, key, RADEMACHER: tl.constexpr, BLOCK: tl.constexpr):
    index = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out + index, _z(key, start + index, RADEMACHER), mask=index < n)


def _signed(key: int) -> int:
    """A 64-bit key as the int64 Triton reads it (the same bits)."""
    return key - (1 << 64) if key >= _TWO_POW_63 else key


def _check(start: int, n: int) -> None:
    if start + n >= 1 << 31:
        raise OptionError(f"a parameter of {start + n} values: the CUDA direction kernels count positions in 32 bits; "
                          "shard it (fully_shard) or split it into smaller tensors")


def fill(out: torch.Tensor, key: int, start: int, rademacher: bool) -> None:
    """``out`` (contiguous float32) ← z at positions [start, start + len) of the key's stream."""
    n = out.numel()
    _check(start, n)
    _fill_kernel[(triton.cdiv(n, _BLOCK),)](out, n, start, _signed(key), RADEMACHER=rademacher, BLOCK=_BLOCK)


def combine(source: torch.Tensor, target: torch.Tensor, start: int, restore: list[tuple[int, float]],
            pairs: list[tuple[int, float]], scale: float, rademacher: bool) -> None:
    """``target ← (source + Σ_restore r·z)·scale + Σ_pairs a·z`` over flat contiguous tensors, z keyed by
    (key, start + position); computed in float32 (float64 for float64 tensors) and rounded once."""
    n = source.numel()
    _check(start, n)
    fp64 = source.dtype == torch.float64
    keys = torch.tensor([_signed(k) for k, _ in [*restore, *pairs]] or [0], dtype=torch.int64, device=source.device)
    coefs = torch.tensor([c for _, c in [*restore, *pairs]] + [scale], device=source.device,
                         dtype=torch.float64 if fp64 else torch.float32)
    _combine_kernel[(triton.cdiv(n, _BLOCK),)](source, target, n, start, keys, coefs, len(restore),
                                              len(restore) + len(pairs), RADEMACHER=rademacher, FP64=fp64,
                                              BLOCK=_BLOCK)
