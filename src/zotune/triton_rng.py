"""zotune's keyed directions on a GPU: the stream of :mod:`zotune.counter_rng`, computed by a Triton kernel
inside the pass that updates the parameter.

A GPU step of MeZO is bound by memory traffic, not arithmetic: drawing z into a float32 buffer and then
adding it reads and writes 10 bytes per bf16 value where 4 suffice. Here each value of z lives only in
registers: the kernel loads θ, adds Σ c·z for up to four seeds (scaled by weight decay first), and
stores θ rounded once. The same kernel writes z itself (``fill``) where a caller needs it as a tensor. A
second kernel (``pair``) writes perturbed copies θ + εz, or both θ ± εz from one generation for a dual
forward: one launch reading θ once, where torch ops took three or four launches and a float32 z buffer.

Each value's key is computed in the kernel from its position in the whole parameter, so one launch
covers any stretch of a parameter (a shard included) whatever the keyed blocks it crosses, and the
values equal the CPU generator's up to float32 rounding (the GPU may fuse a multiply and an add; ``pair``
is compiled without fusion, so it rounds every operation as the CPU does).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_PAIRS_PER_PROGRAM = 1024
MAX_TERMS = 4


@triton.jit
def _finalize(value):
    value = (value ^ (value >> 30)) * 0xBF58476D1CE4E5B9
    value = (value ^ (value >> 27)) * 0x94D049BB133111EB
    return value ^ (value >> 31)


@triton.jit
def _term(pairs, param_key, GAUSSIAN: tl.constexpr, KEYED: tl.constexpr):
    """z at positions 2·pairs and 2·pairs + 1 of one parameter, for one seed's parameter key."""
    gamma = tl.full(pairs.shape, 0x9E3779B97F4A7C15, tl.uint64)
    position = 2 * pairs
    inside = position % KEYED
    # One key per value (computing it once per program, for the at most two blocks a program spans, was
    # measured no faster on an H100).
    key = _finalize((param_key ^ (position // KEYED).to(tl.uint64)) + gamma)
    if GAUSSIAN:
        bits = _finalize(key + ((inside // 2).to(tl.uint64) + 1) * gamma)
        low = (bits & 0xFFFFFFFF).to(tl.uint32)
        high = (bits >> 32).to(tl.uint32)
        u1 = tl.fma((low >> 1).to(tl.int32).to(tl.float32), 4.656612873077393e-10, 2.3283064365386963e-10)
        raw = u1.to(tl.uint32, bitcast=True)
        exponent = (raw >> 23).to(tl.int32) - 127
        mantissa = ((raw & 0x7FFFFF) | 0x3F800000).to(tl.float32, bitcast=True)
        large = mantissa > 1.4142135
        mantissa = tl.where(large, 0.5 * mantissa, mantissa)
        exponent = tl.where(large, exponent + 1, exponent)
        s = tl.div_rn(mantissa - 1.0, mantissa + 1.0)
        s2 = s * s
        series = tl.fma(s2, tl.fma(s2, tl.fma(s2, 0.1493547, 0.19988787), 0.33333388), 1.0)
        e = exponent.to(tl.float32)
        log_u1 = tl.fma(e, 0.693145751953125, tl.fma(e, 1.428606765330187e-06, 2.0 * s * series))
        radius = tl.sqrt_rn(-log_u1)
        quadrant = high >> 30
        phi = (((high >> 6) & 0xFFFFFF).to(tl.int32).to(tl.float32) - 8388607.5) * 9.362676e-08
        p2 = phi * phi
        sin = phi * tl.fma(p2, tl.fma(p2, tl.fma(p2, -0.00019515282, 0.00833216), -0.16666655), 1.0)
        cos = tl.fma(p2, tl.fma(p2, tl.fma(p2, tl.fma(p2, 2.4383568e-05, -0.0013886682), 0.04166662), -0.5), 1.0)
        cos_sign = 1.0 - 2.0 * ((quadrant ^ (quadrant >> 1)) & 1).to(tl.float32)
        sin_sign = 1.0 - 2.0 * (quadrant >> 1).to(tl.float32)
        first = radius * (cos_sign * cos - sin_sign * sin)
        second = radius * (sin_sign * cos + cos_sign * sin)
    else:
        bits = _finalize(key + ((inside // 64).to(tl.uint64) + 1) * gamma)
        shift = (inside % 64).to(tl.uint64)
        first = 1.0 - 2.0 * ((bits >> shift) & 1).to(tl.float32)
        second = 1.0 - 2.0 * ((bits >> (shift + 1)) & 1).to(tl.float32)
    return first, second


@triton.jit
def _positions(offset, numel, PAIRS: tl.constexpr):
    """This program's pairs, counted in the whole parameter, and the positions of their values in a tensor
    holding the parameter's values [offset, offset + numel), with the mask of those it holds."""
    first_pair = tl.program_id(0).to(tl.int64) * PAIRS + offset // 2
    pairs = first_pair + tl.arange(0, PAIRS)
    positions = 2 * first_pair - offset + tl.arange(0, 2 * PAIRS)
    return pairs, positions, (positions >= 0) & (positions < numel)


@triton.jit
def _kernel(
    target,
    numel,
    offset,
    scale,
    key0,
    c0,
    key1,
    c1,
    key2,
    c2,
    key3,
    c3,
    TERMS: tl.constexpr,
    GAUSSIAN: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    SCALE: tl.constexpr,
    KEYED: tl.constexpr,
    PAIRS: tl.constexpr,
):
    # Values are loaded and stored contiguously and split into the pairs' first and second values in registers.
    pairs, positions, inside = _positions(offset, numel, PAIRS)
    if ACCUMULATE:
        x = tl.load(target + positions, mask=inside).to(tl.float32)
        if SCALE:
            x = x * scale
        x_even, x_odd = tl.split(tl.reshape(x, (PAIRS, 2)))
    else:
        x_even = tl.zeros(pairs.shape, tl.float32)
        x_odd = tl.zeros(pairs.shape, tl.float32)
    for t in tl.static_range(TERMS):
        if t == 0:
            key, c = key0, c0
        elif t == 1:
            key, c = key1, c1
        elif t == 2:
            key, c = key2, c2
        else:
            key, c = key3, c3
        z_even, z_odd = _term(pairs, key.to(tl.uint64, bitcast=True), GAUSSIAN, KEYED)
        x_even = x_even + c * z_even
        x_odd = x_odd + c * z_odd
    x = tl.reshape(tl.join(x_even, x_odd), (2 * PAIRS,))
    tl.store(target + positions, x.to(target.dtype.element_ty), mask=inside)


@triton.jit
def _pair_kernel(
    source,
    plus,
    minus,
    numel,
    offset,
    key,
    c,
    GAUSSIAN: tl.constexpr,
    KEYED: tl.constexpr,
    BOTH: tl.constexpr,
    PAIRS: tl.constexpr,
):
    pairs, positions, inside = _positions(offset, numel, PAIRS)
    x = tl.load(source + positions, mask=inside).to(tl.float32)
    z_even, z_odd = _term(pairs, key.to(tl.uint64, bitcast=True), GAUSSIAN, KEYED)
    d = tl.reshape(tl.join(c * z_even, c * z_odd), (2 * PAIRS,))
    tl.store(plus + positions, (x + d).to(plus.dtype.element_ty), mask=inside)
    if BOTH:
        tl.store(minus + positions, (x - d).to(minus.dtype.element_ty), mask=inside)


def _signed(key: int) -> int:
    """A 64-bit unsigned key as the int64 bit pattern Triton accepts as a scalar."""
    return key - (1 << 64) if key >= 1 << 63 else key


def _pair_count(offset: int, numel: int) -> int:
    """How many of the stream's (even, odd) pairs the positions [offset, offset + numel) touch."""
    return (offset + numel - 1) // 2 - offset // 2 + 1


def _launch(
    target: torch.Tensor, offset: int, terms, scale: float, distribution: str, accumulate: bool, keyed_block: int
) -> None:
    padded = [*terms, *[(2**40, 0.0)] * (MAX_TERMS - len(terms))]  # unused slots: any key Triton won't specialize
    keys = [_signed(key) for key, _ in padded]
    _kernel[(triton.cdiv(_pair_count(offset, target.numel()), _PAIRS_PER_PROGRAM),)](
        target,
        target.numel(),
        offset,
        scale,
        keys[0],
        padded[0][1],
        keys[1],
        padded[1][1],
        keys[2],
        padded[2][1],
        keys[3],
        padded[3][1],
        TERMS=len(terms),
        GAUSSIAN=distribution == "gaussian",
        ACCUMULATE=accumulate,
        SCALE=scale != 1.0,
        KEYED=keyed_block,
        PAIRS=_PAIRS_PER_PROGRAM,
    )


def update(target: torch.Tensor, offset: int, terms, scale: float, distribution: str, keyed_block: int) -> None:
    """``target ← target·scale + Σ c·z(key)`` over ``terms`` [(parameter key, c)], computed in float32 and
    rounded once per launch (four terms a launch). ``target`` is a contiguous CUDA tensor (float32, bf16 or
    fp16) holding the parameter's values from position ``offset``; keys change every ``keyed_block`` values."""
    for first in range(0, max(len(terms), 1), MAX_TERMS):
        _launch(target, offset, terms[first : first + MAX_TERMS], scale if first == 0 else 1.0, distribution, True, keyed_block)


def fill(out: torch.Tensor, offset: int, param_key: int, distribution: str, keyed_block: int) -> None:
    """``out`` (contiguous float32 CUDA) ← z at the parameter's positions [offset, offset + len)."""
    _launch(out, offset, [(param_key, 1.0)], 1.0, distribution, False, keyed_block)


def pair(
    source: torch.Tensor,
    plus: torch.Tensor,
    minus: torch.Tensor | None,
    offset: int,
    param_key: int,
    coefficient: float,
    distribution: str,
    keyed_block: int,
) -> None:
    """``plus ← source + d`` and, unless ``minus`` is None, ``minus ← source − d``, with ``d = coefficient · z``
    rounded to float32 first: a perturbed copy, or the two sides of a two-point estimate from one
    generation, in one launch that reads θ once and holds z in registers only. Contiguous CUDA tensors of one
    dtype (float32, bf16 or fp16) and length, holding the parameter's values from position ``offset``.

    Compiled without fused multiply-adds: every operation is rounded as the CPU's, so a copy does not depend
    on which kernel made it, and z equals the CPU stream's bit for bit."""
    _pair_kernel[(triton.cdiv(_pair_count(offset, source.numel()), _PAIRS_PER_PROGRAM),)](
        source,
        plus,
        plus if minus is None else minus,
        source.numel(),
        offset,
        _signed(param_key),
        coefficient,
        GAUSSIAN=distribution == "gaussian",
        KEYED=keyed_block,
        BOTH=minus is not None,
        PAIRS=_PAIRS_PER_PROGRAM,
        enable_fp_fusion=False,
    )
