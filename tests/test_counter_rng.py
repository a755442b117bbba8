import math

import numpy as np
import pytest

from zotune import counter_rng
from zotune.counter_rng import fill, fill_rows, moments, pair, update

MASK64 = (1 << 64) - 1
GAMMA = 0x9E3779B97F4A7C15
# Keyed blocks longer than any test array: one SplitMix64 stream, keyed by splitmix64(key).
ONE_BLOCK = 1 << 40


def mix(value: int) -> int:
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & MASK64
    return value ^ (value >> 31)


def block_stream_key(param_key: int, block: int) -> int:
    """The SplitMix64 state that keyed block ``block`` of a parameter key starts from."""
    return mix(((param_key ^ block) + GAMMA) & MASK64)


def splitmix64_outputs(key: int, first: int, count: int) -> list[int]:
    """SplitMix64's outputs first..first+count-1 for a stream starting at state ``key``, in Python integers."""
    return [mix((key + (counter + 1) * GAMMA) & MASK64) for counter in range(first, first + count)]


def reference_pair(low: int, high: int) -> list[float]:
    """Box-Muller of one 64-bit word's halves, with float64 library log, sqrt, cos and sin."""
    u1 = float(np.float32(float(np.float32(low >> 1)) * 2.0**-31 + 2.0**-32))  # exact in float64, rounded once
    quadrant, fraction = high >> 30, (((high >> 6) & 0xFFFFFF) + 0.5) * 2.0**-24
    angle = (quadrant + fraction) * math.pi / 2
    radius = math.sqrt(-2 * math.log(u1))
    return [radius * math.cos(angle), radius * math.sin(angle)]


def reference_gaussian(key: int, count: int) -> np.ndarray:
    values = []
    for bits in splitmix64_outputs(key, 0, (count + 1) // 2):
        values += reference_pair(bits & 0xFFFFFFFF, bits >> 32)
    return np.array(values[:count])


@pytest.mark.parametrize("key", [0, 1, 0xDEADBEEF, MASK64])
def test_gaussian_values_match_a_float64_box_muller_of_the_same_bits(key):
    out = np.empty(4001, np.float32)
    fill(out, 0, key, "gaussian", ONE_BLOCK)
    np.testing.assert_allclose(out, reference_gaussian(block_stream_key(key, 0), out.size), rtol=0, atol=2e-6)


def test_each_keyed_block_is_the_stream_of_its_own_key():
    # 100 values in blocks of 32 from position 50: the last 14 of block 1, blocks 2 and 3, the first 22 of block 4.
    gaussian, signs = np.empty(100, np.float32), np.empty(100, np.float32)
    fill(gaussian, 50, 77, "gaussian", 32)
    fill(signs, 50, 77, "rademacher", 32)
    expected_gaussian, expected_signs = [], []
    for block in range(5):
        key = block_stream_key(77, block)
        expected_gaussian += list(reference_gaussian(key, 32))
        bits = splitmix64_outputs(key, 0, 1)[0]
        expected_signs += [1.0 - 2.0 * ((bits >> b) & 1) for b in range(32)]
    np.testing.assert_allclose(gaussian, expected_gaussian[50:150], rtol=0, atol=2e-6)
    np.testing.assert_array_equal(signs, expected_signs[50:150])


def test_radius_and_angle_are_accurate_over_their_whole_range():
    # The extreme words: u1 at its smallest and largest, and the angle at every quadrant's edges.
    for low in (0, 1, 2**23, 2**31, 2**32 - 1):
        for high in (0, 2**30 - 1, 2**30, 2**31, 3 * 2**30, 2**32 - 1):
            lows, highs = np.array([low], np.uint32), np.array([high], np.uint32)
            values = np.empty(2, np.float32)
            counter_rng._gaussian_pairs(lows, highs, values, 1)
            np.testing.assert_allclose(values, reference_pair(low, high), atol=2e-6)


@pytest.mark.parametrize("keyed_block", [ONE_BLOCK, 1024, 37])
@pytest.mark.parametrize("start, length", [(0, 1), (1, 1), (3, 1024), (1023, 2), (5, 3000), (64, 63)])
def test_any_stretch_equals_the_same_slice_of_the_whole_stream(start, length, keyed_block):
    whole, other = np.empty(5000, np.float32), np.empty(5000, np.float32)
    part = np.empty(length, np.float32)
    for distribution in ("gaussian", "rademacher"):
        fill(whole, 0, 77, distribution, keyed_block)
        fill(other, 0, 78, distribution, keyed_block)
        fill(part, start, 77, distribution, keyed_block)
        np.testing.assert_array_equal(part, whole[start : start + length])
        # update: scaled first, then each term rounded in turn.
        accumulated = np.linspace(-1, 1, length, dtype=np.float32)
        expected = accumulated * np.float32(0.9) + np.float32(0.25) * part
        expected = expected + np.float32(-0.5) * other[start : start + length]
        update(accumulated, start, [(77, 0.25), (78, -0.5)], 0.9, distribution, keyed_block)
        np.testing.assert_array_equal(accumulated, expected)
        source, plus, minus = np.linspace(-1, 1, length, dtype=np.float32), np.empty_like(part), np.empty_like(part)
        pair(source, plus, minus, start, 77, 1e-3, distribution, keyed_block)
        np.testing.assert_array_equal(plus, source + np.float32(1e-3) * part)
        np.testing.assert_array_equal(minus, source - np.float32(1e-3) * part)
        pair(source, plus, None, start, 77, -2e-3, distribution, keyed_block)
        np.testing.assert_array_equal(plus, source + np.float32(-2e-3) * part)
        first, second = np.linspace(-1, 1, length, dtype=np.float32), np.linspace(0, 2, length, dtype=np.float32)
        expected_first, expected_second = first + np.float32(0.5) * part, second + np.float32(0.125) * part * part
        expected_first = expected_first + np.float32(-0.25) * other[start : start + length]
        expected_second = expected_second + np.float32(2.0) * other[start : start + length] * other[start : start + length]
        moments(first, second, start, [(77, 0.5, 0.125), (78, -0.25, 2.0)], distribution, keyed_block)
        np.testing.assert_array_equal(first, expected_first)
        np.testing.assert_array_equal(second, expected_second)


@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
def test_rows_are_the_same_stretches_of_the_whole_stream(distribution):
    whole, rows = np.empty(5000, np.float32), np.empty((3, 70), np.float32)
    fill(whole, 0, 77, distribution, 1024)
    fill_rows(rows, np.array([4900, 1000, 0]), 77, distribution, 1024)  # the middle row crosses a keyed block
    np.testing.assert_array_equal(rows, [whole[4900:4970], whole[1000:1070], whole[:70]])


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
def test_threads_share_a_stretch_without_changing_a_value(threads, distribution):
    length, offset, block = 100_003, 5, 1 << 17  # long enough to be shared; crosses a keyed block
    source = np.linspace(-1, 1, length, dtype=np.float32)
    results = []
    for used in (1, threads):
        out, plus, minus, accumulated = (np.empty(length, np.float32) for _ in range(4))
        fill(out, offset, 77, distribution, block, used)
        pair(source, plus, minus, offset, 77, 1e-3, distribution, block, used)
        accumulated[:] = source
        update(accumulated, offset, [(77, 0.25), (78, -0.5)], 0.9, distribution, block, used)
        results.append((out, plus, minus, accumulated))
    for alone, shared in zip(*results):
        np.testing.assert_array_equal(alone, shared)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
def test_update_all_is_update_of_each_array(threads, distribution):
    # Lengths around the share boundaries: empty, shorter than an alignment, and long ones that cross keyed blocks.
    lengths, offsets = [0, 7, 70_001, 16, 40_000, 3], [0, 5, 1000, 0, 123_456, 9]
    block = 1 << 15
    keys = [[11 + p, 50 + p] for p in range(len(lengths))]
    source = [np.linspace(-1, 1, n, dtype=np.float32) for n in lengths]
    together = [values.copy() for values in source]
    counter_rng.update_all(together, offsets, keys, [0.25, -0.5], 0.9, distribution, block, threads)
    for p, values in enumerate(source):
        alone = values.copy()
        update(alone, offsets[p], list(zip(keys[p], [0.25, -0.5])), 0.9, distribution, block)
        np.testing.assert_array_equal(together[p], alone)


def test_update_all_refuses_arrays_it_cannot_write_in_place():
    for bad in (np.zeros(8, np.float64), np.zeros((2, 4), np.float32), np.zeros(16, np.float32)[::2]):
        with pytest.raises(ValueError, match="1-D float32 C-contiguous writable"):
            counter_rng.update_all([bad], [0], [[1]], [1.0], 1.0, "gaussian", 1024)


def test_rademacher_signs_are_the_stream_bits():
    out = np.empty(200, np.float32)
    fill(out, 0, 9, "rademacher", ONE_BLOCK)
    bits = splitmix64_outputs(block_stream_key(9, 0), 0, 4)
    expected = [1.0 - 2.0 * ((bits[p // 64] >> (p % 64)) & 1) for p in range(200)]
    np.testing.assert_array_equal(out, expected)


def test_gaussian_distribution():
    out = np.empty(1 << 22, np.float32)
    fill(out, 0, 2024, "gaussian", ONE_BLOCK)
    values = out.astype(np.float64)
    assert abs(values.mean()) < 3e-3 and abs(values.var() - 1) < 3e-3
    assert abs((values**4).mean() - 3) < 0.03  # the normal's kurtosis; a uniform's is 1.8
    # The empirical CDF against Φ at a few points, well inside the binomial noise (~2.5e-4).
    for x in (-3.0, -1.5, -0.5, 0.0, 0.7, 2.0, 3.5):
        phi = 0.5 * (1 + math.erf(x / math.sqrt(2)))
        assert abs((values <= x).mean() - phi) < 1.5e-3, x
    # The tails: P(|z| > 4) = 6.33e-5, so ~266 ± 16 of 4M values.
    assert 186 < (np.abs(values) > 4).sum() < 346
    assert np.abs(values).max() < 6.8


def test_neighbouring_keys_give_uncorrelated_streams():
    first, second = np.empty(1 << 16, np.float32), np.empty(1 << 16, np.float32)
    fill(first, 0, 1000, "gaussian", ONE_BLOCK)
    fill(second, 0, 1001, "gaussian", ONE_BLOCK)
    assert abs(np.corrcoef(first, second)[0, 1]) < 0.02
    # Adjacent values of one stream (cos and sin of the same angle) are uncorrelated too.
    assert abs(np.corrcoef(first[0::2], first[1::2])[0, 1]) < 0.02
