"""A counter-based generator of Gaussian and Rademacher values for CPU tensors, compiled with numba.

torch's CPU generator is mt19937: a sequential stream, ~4 ns per Gaussian value per core, and a 32-bit
seed. Direction generation dominates a MeZO step on the CPU, so zotune draws CPU directions here instead.

A parameter's values are cut into keyed blocks (``keyed_block`` values each): block b of a parameter key k
is the SplitMix64 stream of ``key = mix((k ^ b) + γ)``, whose j-th 64-bit output is ``mix(key + (j + 1)·γ)``,
a pure function of (k, b, j). Any stretch of a parameter can therefore be computed on its own, by any
thread, in one call whatever the blocks it crosses, and every step of the computation is element-wise, so
LLVM vectorizes it (8 float32 lanes with AVX2).

- Gaussian: output j gives positions 2j and 2j+1 by the Box-Muller transform. The top 31 bits k of its low
  half give the radius, ``sqrt(-2 ln u1)`` with ``u1 = (k + ½)·2⁻³¹`` (largest |z| ≈ 6.66; torch's CPU normal
  stops at 5.77); its high bits give the angle ``2π·u2``: 2 bits pick the quadrant, 24 bits the angle inside it.
  ln, sin and cos are evaluated with polynomials fitted for float32 (|error| < 1e-6 for |z| < 7, checked
  against a float64 reference in the tests), so the values are exactly Gaussian as far as float32 can tell.
- Rademacher: bit b of output j (low 32 bits first) is the sign at position 64j + b: + for 0, - for 1.

The arithmetic uses only correctly rounded float32 operations, fused multiply-adds where the code asks for
them and nowhere else, so a key gives the same values whether LLVM vectorizes the loops or not (checked on
x86-64 with AVX2 and FMA; without FMA, LLVM calls the C library's fmaf, correctly rounded too but slow,
which these machines cannot test).
:mod:`zotune.triton_rng` computes the same stream on a GPU.
"""

from __future__ import annotations

import math

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

# Which values a key names. Raised whenever they change, so that an optimizer state saved with seeds (which
# stand for directions) is not resumed against other directions. 2: the polynomials fitted for float32
# and 31 bits of radius; 1 had Taylor series and 32.
STREAM_VERSION = 2

_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_LOW32 = np.uint64(0xFFFFFFFF)

_LN2_HIGH = np.float32(0.693145751953125)  # ln 2 split so that e·ln2 is exact in its high part
_LN2_LOW = np.float32(1.428606765330187e-06)
_SQRT2 = np.float32(math.sqrt(2.0))
# A step of the angle inside its quadrant: π/2 · 2⁻²⁴.
_ANGLE_STEP = np.float32(math.pi / 2 * 2.0**-24)
# Polynomial coefficients fitted to minimize the relative error over the reduced ranges (|φ| <= π/4 for sin
# and cos, s² <= 0.0295 for atanh(s)/s), then rounded to float32: sin 4e-9, cos 1e-10, atanh 1e-9 before
# rounding. Taylor coefficients of the same degrees would be 100-1000 times less accurate.
_SIN = tuple(np.float32(c) for c in ("-0.16666655", "0.00833216", "-0.00019515282"))
_COS = tuple(np.float32(c) for c in ("-0.5", "0.04166662", "-0.0013886682", "2.4383568e-05"))
_ATANH = tuple(np.float32(c) for c in ("0.33333388", "0.19988787", "0.1493547"))

# Words per chunk: a Gaussian chunk's scratch (4 arrays of this many 32-bit values) stays in the L1 cache.
_CHUNK = 512
# CPU work is shared between threads only above this many values per thread (a launch or a dispatch costs
# ~10 us, a value ~1.5 ns), in shares that start on 64-byte boundaries. Also the rule of
# :class:`zotune.workers.Workers`, for the work that goes through torch ops.
MIN_SHARE = 1 << 14
SHARE_ALIGN = 16

# error_model="numpy": no Python ZeroDivisionError checks, whose branches would stop vectorization.
_COMPILE = dict(nogil=True, cache=True, error_model="numpy")
_INLINE = dict(inline="always", error_model="numpy")


@intrinsic
def _fma(typingctx, a, b, c):
    """a·b + c in float32, rounded once: half the operations of a polynomial, and what the GPU kernel's
    ``tl.fma`` computes, so that both devices give the same values."""

    def codegen(context, builder, signature, args):
        float32 = ir.FloatType()
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(float32, [float32] * 3), "llvm.fma.f32")
        return builder.call(fma, args)

    return types.float32(types.float32, types.float32, types.float32), codegen


@njit(**_INLINE)
def _mix(value):
    value = (value ^ (value >> np.uint64(30))) * _MIX1
    value = (value ^ (value >> np.uint64(27))) * _MIX2
    return value ^ (value >> np.uint64(31))


@njit(**_COMPILE)
def _random_words(low, high, key, first, count):
    # The state advances by γ, which LLVM vectorizes as an add: written as (counter + 1)·γ, it stayed a
    # third 64-bit multiply, emulated on AVX2 by three 32-bit ones (the hash took 0.53 instead of 0.38 ns).
    state = key + (np.uint64(first) + np.uint64(1)) * _GAMMA
    for t in range(count):
        bits = _mix(state)
        low[t] = np.uint32(bits & _LOW32)
        high[t] = np.uint32(bits >> np.uint64(32))
        state += _GAMMA


@njit(**_INLINE)
def _log(u):
    """ln u for u in (0, 1]: u = m·2^e with m in [√½, √2), ln m = 2·atanh((m-1)/(m+1)) as a polynomial."""
    bits = np.float32(u).view(np.uint32)
    exponent = np.int32(bits >> np.uint32(23)) - np.int32(127)
    mantissa = np.uint32((bits & np.uint32(0x7FFFFF)) | np.uint32(0x3F800000)).view(np.float32)
    large = mantissa > _SQRT2
    mantissa = np.float32(0.5) * mantissa if large else mantissa
    exponent = exponent + np.int32(1) if large else exponent
    s = (mantissa - np.float32(1.0)) / (mantissa + np.float32(1.0))  # |s| <= 0.1716
    s2 = s * s
    series = _fma(s2, _fma(s2, _fma(s2, _ATANH[2], _ATANH[1]), _ATANH[0]), np.float32(1.0))
    e = np.float32(exponent)
    return _fma(e, _LN2_HIGH, _fma(e, _LN2_LOW, np.float32(2.0) * s * series))


@njit(**_INLINE)
def _box_muller(low, high):
    # Only 31 bits of ``low`` and 24 of ``high`` are used, as signed integers: AVX2 converts those in one
    # instruction, unsigned ones in five.
    u1 = _fma(np.float32(np.int32(low >> np.uint32(1))), np.float32(2.0**-31), np.float32(2.0**-32))
    # sqrt(-ln u1) is the radius sqrt(-2 ln u1) times √½, the length of the rotation below.
    radius = np.float32(math.sqrt(-_log(u1)))
    # angle = (quadrant + ½)·π/2 + φ with |φ| <= π/4, where the polynomials of sin and cos are short; the
    # rotation by (quadrant + ½)·π/2 is (±√½, ±√½), whose √½ is in the radius. The subtraction is exact.
    quadrant = high >> np.uint32(30)
    phi = (np.float32(np.int32((high >> np.uint32(6)) & np.uint32(0xFFFFFF))) - np.float32(8388607.5)) * _ANGLE_STEP
    p2 = phi * phi
    sin = phi * _fma(p2, _fma(p2, _fma(p2, _SIN[2], _SIN[1]), _SIN[0]), np.float32(1.0))
    cos = _fma(p2, _fma(p2, _fma(p2, _fma(p2, _COS[3], _COS[2]), _COS[1]), _COS[0]), np.float32(1.0))
    # Branch-free signs (branches would stop vectorization): cos of the rotation is + in quadrants 0 and 3.
    cos_sign = np.float32(1.0) - np.float32(2.0) * np.float32(np.int32((quadrant ^ (quadrant >> np.uint32(1))) & np.uint32(1)))
    sin_sign = np.float32(1.0) - np.float32(2.0) * np.float32(np.int32(quadrant >> np.uint32(1)))
    return (np.float32(radius * (cos_sign * cos - sin_sign * sin)), np.float32(radius * (sin_sign * cos + cos_sign * sin)))


@njit(**_COMPILE)
def _gaussian_pairs(low, high, values, count):
    for t in range(count):
        first, second = _box_muller(low[t], high[t])
        values[2 * t] = first
        values[2 * t + 1] = second


@njit(**_COMPILE)
def _rademacher_words(low, high, values, count):
    for t in range(count):
        for b in range(32):
            values[64 * t + b] = np.float32(1.0) - np.float32(2.0) * np.float32((low[t] >> np.uint32(b)) & np.uint32(1))
            values[64 * t + 32 + b] = np.float32(1.0) - np.float32(2.0) * np.float32((high[t] >> np.uint32(b)) & np.uint32(1))


_FILL, _ADD, _PAIR, _COPY, _MOMENTS = 0, 1, 2, 3, 4


@njit(**_INLINE)
def _write(out, values, count, coefficient, mode, source, minus, square_coefficient):
    if mode == _ADD:
        for k in range(count):
            out[k] += coefficient * values[k]
    elif mode == _PAIR:
        for k in range(count):
            scaled = coefficient * values[k]
            out[k] = source[k] + scaled
            minus[k] = source[k] - scaled
    elif mode == _COPY:
        for k in range(count):
            out[k] = source[k] + coefficient * values[k]
    elif mode == _MOMENTS:
        for k in range(count):
            out[k] += coefficient * values[k]
            minus[k] += square_coefficient * values[k] * values[k]
    else:
        for k in range(count):
            out[k] = values[k]


@njit(**_COMPILE)
def _stream(out, key, start, coefficient, mode, gaussian, source, minus, square_coefficient):
    """The stream's values z at positions [start, start + len(out)), written as ``mode`` says: out ← z
    (fill), out += coefficient·z (add), out ← source + coefficient·z (copy), that and also
    minus ← source − coefficient·z (pair), or out += coefficient·z and minus += square_coefficient·z²
    (moments)."""
    per_word = 2 if gaussian else 64
    low = np.empty(_CHUNK, np.uint32)
    high = np.empty(_CHUNK, np.uint32)
    values = np.empty(64 * _CHUNK if not gaussian else 2 * _CHUNK, np.float32)
    stop = start + out.shape[0]
    word = start // per_word
    while per_word * word < stop:
        count = min(_CHUNK, (stop - 1) // per_word + 1 - word)
        _random_words(low, high, key, word, count)
        if gaussian:
            _gaussian_pairs(low, high, values, count)
        else:
            _rademacher_words(low, high, values, count)
        first = max(per_word * word, start)
        last = min(per_word * (word + count), stop)
        at = first - start
        _write(
            out[at:],
            values[first - per_word * word :],
            last - first,
            coefficient,
            mode,
            source[at:],
            minus[at:],
            square_coefficient,
        )
        word += count


@njit(**_INLINE)
def _block_key(param_key, block):
    """The stream key of keyed block ``block`` of a parameter (``keys.block_key``'s mix, in numba)."""
    return _mix((param_key ^ np.uint64(block)) + _GAMMA)


@njit(**_COMPILE)
def _keyed(out, offset, param_keys, coefficients, scale, mode, gaussian, keyed_block, source, minus, square_coefficients):
    """``_stream`` over the positions [offset, offset + len(out)) of a parameter whose keyed block b draws from the
    stream of ``_block_key(param_key, b)``, once per term (param_keys[t], coefficients[t], square_coefficients[t]);
    in add mode ``out`` is multiplied by ``scale`` first. Block by block, so each value sees scale then the terms in order, as the
    same updates applied one after another would. One call covers a whole stretch of a parameter: a call per
    keyed block cost ~20 us of Python each, serialized by the GIL (~1,150 calls per sweep of a 135M model)."""
    done = 0
    while done < out.shape[0]:
        block = (offset + done) // keyed_block
        inside = offset + done - block * keyed_block
        stop = min(out.shape[0], done + keyed_block - inside)
        piece = out[done:stop]
        if scale != np.float32(1.0):
            for k in range(stop - done):
                piece[k] *= scale
        for t in range(param_keys.shape[0]):
            _stream(
                piece,
                _block_key(param_keys[t], block),
                inside,
                coefficients[t],
                mode,
                gaussian,
                source[done:stop],
                minus[done:stop],
                square_coefficients[t],
            )
        done = stop


@njit(parallel=True, **_COMPILE)
def _keyed_shared(
    out, offset, param_keys, coefficients, scale, mode, gaussian, keyed_block, source, minus, square_coefficients, shares
):
    """``_keyed`` on ``shares`` equal stretches of ``out``, one per thread of numba's pool."""
    length = out.shape[0]
    for share in prange(shares):
        first = length * share // shares // SHARE_ALIGN * SHARE_ALIGN
        last = length if share == shares - 1 else length * (share + 1) // shares // SHARE_ALIGN * SHARE_ALIGN
        _keyed(
            out[first:last],
            offset + first,
            param_keys,
            coefficients,
            scale,
            mode,
            gaussian,
            keyed_block,
            source[first:last],
            minus[first:last],
            square_coefficients,
        )


def _generate(threads, out, *arguments) -> None:
    """``_keyed(out, *arguments)``, shared between up to ``threads`` of numba's threads when ``out`` is long enough."""
    _launch(_keyed, _keyed_shared, threads, out.shape[0], (out, *arguments))


def _launch(alone, shared, threads, values, arguments) -> None:
    """``alone(*arguments)``, or ``shared(*arguments, shares)`` on up to ``threads`` of numba's threads when the
    ``values`` are many enough.

    Numba's threads, not Python's: a Python thread pool cost ~70 us per call here, its workers waking up and
    contending for the GIL, where a numba launch costs ~10 us. With numba's OpenMP layer, the threads are
    the OpenMP team that torch's CPU ops use, warm from the forward's last op. A launch must come from one
    thread at a time where numba falls back to its workqueue layer: zotune launches from the caller's thread
    only."""
    shares = min(threads, numba.config.NUMBA_NUM_THREADS, values // MIN_SHARE)
    if shares > 1:
        before = numba.get_num_threads()
        numba.set_num_threads(shares)  # this thread's setting only; the rest of numba's threads stay asleep
        try:
            shared(*arguments, shares)
        finally:
            numba.set_num_threads(before)
    else:
        alone(*arguments)


@intrinsic
def _float32_at(typingctx, address):
    """The float32 pointer at an integer address: how one call reaches many arrays (a tuple or a list of
    arrays would be compiled once per length, or cost microseconds per element to build)."""

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(types.CPointer(types.float32)))

    return types.CPointer(types.float32)(types.int64), codegen


@njit(**_INLINE)
def _aligned_cut(lengths, position):
    """``position`` in the arrays laid end to end, moved back to a multiple of SHARE_ALIGN inside its array."""
    begin = 0
    for length in lengths:
        if position < begin + length:
            return begin + (position - begin) // SHARE_ALIGN * SHARE_ALIGN
        begin += length
    return begin


@njit(**_INLINE)
def _update_share(share, shares, addresses, lengths, offsets, param_keys, coefficients, scale, gaussian, keyed_block, unused):
    """Share ``share`` of ``shares`` equal stretches of the arrays laid end to end, updated as ``_keyed`` does."""
    total = lengths.sum()
    first = _aligned_cut(lengths, total * share // shares)
    last = total if share == shares - 1 else _aligned_cut(lengths, total * (share + 1) // shares)
    begin = 0
    for p in range(lengths.shape[0]):
        low, high = max(first, begin), min(last, begin + lengths[p])
        if low < high:
            out = numba.carray(_float32_at(addresses[p]), lengths[p])
            _keyed(
                out[low - begin : high - begin],
                offsets[p] + low - begin,
                param_keys[p],
                coefficients,
                scale,
                _ADD,
                gaussian,
                keyed_block,
                unused,
                unused,
                coefficients,
            )
        begin += lengths[p]


@njit(**_COMPILE)
def _update_all(addresses, lengths, offsets, param_keys, coefficients, scale, gaussian, keyed_block, unused):
    _update_share(0, 1, addresses, lengths, offsets, param_keys, coefficients, scale, gaussian, keyed_block, unused)


@njit(parallel=True, **_COMPILE)
def _update_all_shared(addresses, lengths, offsets, param_keys, coefficients, scale, gaussian, keyed_block, unused, shares):
    for share in prange(shares):
        _update_share(share, shares, addresses, lengths, offsets, param_keys, coefficients, scale, gaussian, keyed_block, unused)


@njit(**_COMPILE)
def _rows(out, offsets, param_keys, coefficients, gaussian, keyed_block, unused):
    for row in range(out.shape[0]):
        _keyed(
            out[row],
            offsets[row],
            param_keys,
            coefficients,
            np.float32(1.0),
            _FILL,
            gaussian,
            keyed_block,
            unused,
            unused,
            coefficients,
        )


_UNUSED = np.empty(0, np.float32)
_ONE = np.float32(1.0)


def _one_key(param_key: int) -> np.ndarray:
    return np.array([param_key], np.uint64)


def _one_coefficient(coefficient: float) -> np.ndarray:
    return np.array([coefficient], np.float32)


def fill(out: np.ndarray, offset: int, param_key: int, distribution: str, keyed_block: int, threads: int = 1) -> None:
    """``out`` (1-D float32) ← z at the parameter's positions [offset, offset + len), keys changing every
    ``keyed_block`` values (the arguments of :func:`zotune.triton_rng.fill`), on up to ``threads`` threads."""
    coefficients = _one_coefficient(1.0)
    _generate(
        threads,
        out,
        offset,
        _one_key(param_key),
        coefficients,
        _ONE,
        _FILL,
        distribution == "gaussian",
        keyed_block,
        _UNUSED,
        _UNUSED,
        coefficients,
    )


def fill_rows(out: np.ndarray, offsets: np.ndarray, param_key: int, distribution: str, keyed_block: int) -> None:
    """Each row r of ``out`` (2-D float32, C-contiguous) ← z at the parameter's positions [offsets[r], offsets[r] +
    row length), in one call: the rows of a table that an embedding lookup perturbs."""
    _rows(
        out,
        offsets.astype(np.int64),
        _one_key(param_key),
        _one_coefficient(1.0),
        distribution == "gaussian",
        keyed_block,
        _UNUSED,
    )


def update(out: np.ndarray, offset: int, terms, scale: float, distribution: str, keyed_block: int, threads: int = 1) -> None:
    """``out ← out·scale + Σ c·z(key)`` over ``terms`` [(parameter key, c)], ``out`` (1-D float32) holding the
    parameter's values from position ``offset``: generated and added chunk by chunk, with no buffer the size of
    ``out``, rounded after the scale and after each term; on up to ``threads`` threads."""
    update_all([out], [offset], [[key for key, _ in terms]], [c for _, c in terms], scale, distribution, keyed_block, threads)


def update_all(
    outs, offsets, param_keys, coefficients, scale: float, distribution: str, keyed_block: int, threads: int = 1
) -> None:
    """:func:`update` of many parameters in one call: ``outs[p] ← outs[p]·scale + Σ_t coefficients[t]·z(param_keys[p][t])``
    at the parameter's positions from ``offsets[p]``, each ``outs[p]`` a 1-D float32 C-contiguous writable array.
    The values of all the arrays are shared equally between up to ``threads`` threads, in one launch: a sweep
    over a model is one call instead of a call and a launch per parameter (~40 us each, ~10% of a sweep of
    SmolLM2-135M's 272 tensors). Each array gets the values that a call on it alone gives, bit for bit; the
    arrays must not overlap, since threads write them at once."""
    for out in outs:
        if out.dtype != np.float32 or out.ndim != 1 or not out.flags.c_contiguous or not out.flags.writeable:
            raise ValueError(
                f"update_all writes 1-D float32 C-contiguous writable arrays, got {out.dtype} "
                f"{out.shape} with strides {out.strides}"
            )
    if not outs:
        return
    addresses = np.array([out.ctypes.data for out in outs], np.int64)
    lengths = np.array([out.shape[0] for out in outs], np.int64)
    keys = np.array(param_keys, np.uint64).reshape(len(outs), len(coefficients))
    arguments = (
        addresses,
        lengths,
        np.array(offsets, np.int64),
        keys,
        np.array(coefficients, np.float32),
        np.float32(scale),
        distribution == "gaussian",
        keyed_block,
        _UNUSED,
    )
    _launch(_update_all, _update_all_shared, threads, int(lengths.sum()), arguments)


def pair(
    source: np.ndarray,
    plus: np.ndarray,
    minus: np.ndarray | None,
    offset: int,
    param_key: int,
    coefficient: float,
    distribution: str,
    keyed_block: int,
    threads: int = 1,
) -> None:
    """``plus`` ← source + d and, unless ``minus`` is None, ``minus`` ← source − d, with d = coefficient · z
    rounded to float32 before the add (1-D float32 arrays of one length, holding the parameter's values from
    position ``offset``): a perturbed copy, or the two sides of a two-point estimate from one generation; on up
    to ``threads`` threads."""
    mode, minus = (_COPY, _UNUSED) if minus is None else (_PAIR, minus)
    coefficients = _one_coefficient(coefficient)
    _generate(
        threads,
        plus,
        offset,
        _one_key(param_key),
        coefficients,
        _ONE,
        mode,
        distribution == "gaussian",
        keyed_block,
        source,
        minus,
        coefficients,
    )


def moments(first: np.ndarray, second: np.ndarray, offset: int, terms, distribution: str, keyed_block: int) -> None:
    """``first`` += a·z(key) and ``second`` += b·z(key)² over ``terms`` [(parameter key, a, b)] in order, at the
    parameter's positions [offset, offset + len) (1-D float32 arrays of one length): AdaMeZO's moments from a
    window of seeds, each generated and accumulated in one pass."""
    keys = np.array([key for key, _, _ in terms], np.uint64)
    coefficients = np.array([a for _, a, _ in terms], np.float32)
    square_coefficients = np.array([b for _, _, b in terms], np.float32)
    _keyed(
        first,
        offset,
        keys,
        coefficients,
        _ONE,
        _MOMENTS,
        distribution == "gaussian",
        keyed_block,
        _UNUSED,
        second,
        square_coefficients,
    )


def warm_up() -> None:
    """Compile the generator now (or load it from numba's cache), instead of inside the first step."""
    values, plus, minus = np.empty(3, np.float32), np.empty(3, np.float32), np.empty(3, np.float32)
    for distribution in ("gaussian", "rademacher"):
        fill(values, 1, 1, distribution, 2)
        fill(np.empty(2 * MIN_SHARE, np.float32), 1, 1, distribution, 2, threads=2)
        fill_rows(values.reshape(1, 3), np.ones(1, np.int64), 1, distribution, 2)
        update(values, 1, [(1, 1.0)], 0.5, distribution, 2)
        update(np.empty(2 * MIN_SHARE, np.float32), 1, [(1, 1.0)], 0.5, distribution, 2, threads=2)
        pair(values, plus, minus, 1, 1, 1.0, distribution, 2)
        pair(values, plus, None, 1, 1, 1.0, distribution, 2)
        moments(plus, minus, 1, [(1, 1.0, 1.0)], distribution, 2)
