"""A counter-based generator of Gaussian and Rademacher values for CPU tensors, compiled with numba.

torch's CPU generator is mt19937: a sequential stream, ~4 ns per Gaussian value per core, and a 32-bit
seed. Direction generation dominates a MeZO step on the CPU, so zotune draws CPU directions here instead.

The stream of a 64-bit ``key`` is SplitMix64's: its j-th 64-bit output is ``mix(key + (j + 1)·γ)``, a
pure function of (key, j). Any stretch of it can therefore be computed on its own, by any thread, and
every step of the computation is element-wise, so LLVM vectorizes it (8 float32 lanes with AVX2).

- Gaussian: output j gives positions 2j and 2j+1 by the Box-Muller transform. Its low 32 bits give the
  radius, ``sqrt(-2 ln u1)`` with ``u1 = (lo + ½)·2⁻³²`` (largest |z| ≈ 6.76; torch's CPU normal stops at
  5.77); its high bits give the angle ``2π·u2``: 2 bits pick the quadrant, 24 bits the angle inside it.
  ln, sin and cos are evaluated with series accurate to float32 rounding (|error| < 1e-6 for |z| < 7,
  checked against a float64 reference in the tests), so the values are exactly Gaussian as far as
  float32 can tell.
- Rademacher: bit b of output j (low 32 bits first) is the sign at position 64j + b: + for 0, - for 1.

The arithmetic uses only correctly rounded float32 operations, with no fused multiply-add, so a key gives
the same values whether LLVM vectorizes the loops or not (checked on x86-64 with AVX2).
:mod:`zotune.triton_rng` computes the same stream on a GPU.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_LOW32 = np.uint64(0xFFFFFFFF)

_LN2_HIGH = np.float32(0.693145751953125)  # ln 2 split so that e·ln2 is exact in its high part
_LN2_LOW = np.float32(1.428606765330187e-06)
_SQRT2 = np.float32(math.sqrt(2.0))
_SQRT_HALF = np.float32(math.sqrt(0.5))
_QUARTER_TURN = np.float32(math.pi / 2)

# Words per chunk: a Gaussian chunk's scratch (4 arrays of this many 32-bit values) stays in the L1 cache.
_CHUNK = 512

# error_model="numpy": no Python ZeroDivisionError checks, whose branches would stop vectorization.
_COMPILE = dict(nogil=True, cache=True, error_model="numpy")
_INLINE = dict(inline="always", error_model="numpy")


@njit(**_INLINE)
def _splitmix64(key, counter):
    value = key + (counter + np.uint64(1)) * _GAMMA
    value = (value ^ (value >> np.uint64(30))) * _MIX1
    value = (value ^ (value >> np.uint64(27))) * _MIX2
    return value ^ (value >> np.uint64(31))


@njit(**_COMPILE)
def _random_words(low, high, key, first, count):
    for t in range(count):
        bits = _splitmix64(key, np.uint64(first + t))
        low[t] = np.uint32(bits & _LOW32)
        high[t] = np.uint32(bits >> np.uint64(32))


@njit(**_INLINE)
def _log(u):
    """ln u for u in (0, 1]: u = m·2^e with m in [√½, √2), ln m = 2·atanh((m-1)/(m+1)) as a series."""
    bits = np.float32(u).view(np.uint32)
    exponent = np.int32(bits >> np.uint32(23)) - np.int32(127)
    mantissa = np.uint32((bits & np.uint32(0x7FFFFF)) | np.uint32(0x3F800000)).view(np.float32)
    large = mantissa > _SQRT2
    mantissa = np.float32(0.5) * mantissa if large else mantissa
    exponent = exponent + np.int32(1) if large else exponent
    s = (mantissa - np.float32(1.0)) / (mantissa + np.float32(1.0))  # |s| <= 0.1716
    s2 = s * s
    series = np.float32(1.0) + s2 * (np.float32(1 / 3) + s2 * (np.float32(1 / 5) + s2 * (
        np.float32(1 / 7) + s2 * np.float32(1 / 9))))
    e = np.float32(exponent)
    return e * _LN2_HIGH + (e * _LN2_LOW + np.float32(2.0) * s * series)


@njit(**_INLINE)
def _box_muller(low, high):
    u1 = np.float32(low) * np.float32(2.0**-32) + np.float32(2.0**-33)
    radius = np.float32(math.sqrt(np.float32(-2.0) * _log(u1))) * _SQRT_HALF
    # angle = (quadrant + ½)·π/2 + φ with |φ| <= π/4, where the Taylor series of sin and cos converge fast;
    # the rotation by (quadrant + ½)·π/2 is (±√½, ±√½), whose √½ is folded into the radius.
    quadrant = high >> np.uint32(30)
    fraction = (np.float32((high >> np.uint32(6)) & np.uint32(0xFFFFFF)) + np.float32(0.5)) * np.float32(2.0**-24)
    phi = (fraction - np.float32(0.5)) * _QUARTER_TURN
    p2 = phi * phi
    sin = phi * (np.float32(1.0) + p2 * (np.float32(-1 / 6) + p2 * (np.float32(1 / 120) + p2 * (
        np.float32(-1 / 5040) + p2 * np.float32(1 / 362880)))))
    cos = np.float32(1.0) + p2 * (np.float32(-1 / 2) + p2 * (np.float32(1 / 24) + p2 * (np.float32(-1 / 720) + p2 * (
        np.float32(1 / 40320) + p2 * np.float32(-1 / 3628800)))))
    # Branch-free signs (branches would stop vectorization): cos of the rotation is + in quadrants 0 and 3.
    cos_sign = np.float32(1.0) - np.float32(2.0) * np.float32((quadrant ^ (quadrant >> np.uint32(1))) & np.uint32(1))
    sin_sign = np.float32(1.0) - np.float32(2.0) * np.float32(quadrant >> np.uint32(1))
    return (np.float32(radius * (cos_sign * cos - sin_sign * sin)),
            np.float32(radius * (sin_sign * cos + cos_sign * sin)))


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


_FILL, _ADD, _PAIR = 0, 1, 2


@njit(**_INLINE)
def _write(out, values, count, coefficient, mode, source, minus):
    if mode == _ADD:
        for k in range(count):
            out[k] += coefficient * values[k]
    elif mode == _PAIR:
        for k in range(count):
            scaled = coefficient * values[k]
            out[k] = source[k] + scaled
            minus[k] = source[k] - scaled
    else:
        for k in range(count):
            out[k] = values[k]


@njit(**_COMPILE)
def _stream(out, key, start, coefficient, mode, gaussian, source, minus):
    """The stream's values z at positions [start, start + len(out)), written as ``mode`` says: out ← z
    (fill), out += coefficient·z (add), or out ← source + coefficient·z and minus ← source − coefficient·z
    (pair)."""
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
        _write(out[at:], values[first - per_word * word:], last - first, coefficient, mode, source[at:], minus[at:])
        word += count


_UNUSED = np.empty(0, np.float32)


def fill(out: np.ndarray, key: int, start: int = 0, distribution: str = "gaussian") -> None:
    """``out`` (1-D float32) ← the values at positions [start, start + len) of key's stream."""
    _stream(out, np.uint64(key), start, np.float32(0.0), _FILL, distribution == "gaussian", _UNUSED, _UNUSED)


def add(out: np.ndarray, key: int, coefficient: float, start: int = 0, distribution: str = "gaussian") -> None:
    """``out`` (1-D float32) += coefficient × the values at positions [start, start + len) of key's stream,
    generated and added chunk by chunk, with no buffer the size of ``out``."""
    _stream(out, np.uint64(key), start, np.float32(coefficient), _ADD, distribution == "gaussian", _UNUSED, _UNUSED)


def pair(source: np.ndarray, plus: np.ndarray, minus: np.ndarray, key: int, coefficient: float, start: int = 0,
         distribution: str = "gaussian") -> None:
    """``plus`` ← source + d and ``minus`` ← source − d, with d = coefficient × the values at positions
    [start, start + len) of key's stream, rounded to float32 before the add (1-D float32 arrays of one
    length): the two sides of a two-point estimate from one generation."""
    _stream(plus, np.uint64(key), start, np.float32(coefficient), _PAIR, distribution == "gaussian", source, minus)


def warm_up() -> None:
    """Compile the generator now (or load it from numba's cache), instead of inside the first step."""
    values, plus, minus = np.empty(3, np.float32), np.empty(3, np.float32), np.empty(3, np.float32)
    for distribution in ("gaussian", "rademacher"):
        fill(values, 1, 1, distribution)
        add(values, 1, 1.0, 1, distribution)
        pair(values, plus, minus, 1, 1.0, 1, distribution)
