"""The direction backends (zotune.backends): which tensor goes to which, and the torch fallback against the
numba kernels on the same float32 tensors (the Triton kernels: tests/test_triton_interpreted.py)."""

import pytest
import torch

from zotune.backends import Backends, TorchBackend
from zotune.keys import BLOCK_SIZE, param_key
from zotune.workers import Workers

# Stretches as a shard holds them: from an odd position, across keyed blocks, and a whole small parameter.
STRETCHES = [(0, 15), (7, BLOCK_SIZE + 1_001), (BLOCK_SIZE - 3, 40_000)]


def backends(distribution="gaussian", threads=2):
    return Backends(distribution, Workers(threads))


def test_each_tensor_goes_to_its_backend():
    chosen = backends()
    assert chosen.of(torch.zeros(3)) is chosen.numba
    for dtype in (torch.bfloat16, torch.float16, torch.float64):
        fallback = chosen.of(torch.zeros(3, dtype=dtype))
        assert isinstance(fallback, TorchBackend) and fallback.generator is chosen.numba


@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
@pytest.mark.parametrize("offset,length", STRETCHES)
def test_the_torch_fallback_computes_what_the_numba_kernels_do(distribution, offset, length):
    chosen = backends(distribution)
    numba, fallback = chosen.numba, TorchBackend(chosen.numba)
    source = torch.randn(length, generator=torch.Generator().manual_seed(0))
    key = param_key(9, 2)

    z = [torch.empty(length) for _ in range(2)]
    numba.fill(z[0], offset, key)
    fallback.fill(z[1], offset, key)
    assert torch.equal(*z)

    # A pair rounds c·z before each add, in both: bit for bit.
    sides = [torch.empty(length) for _ in range(4)]
    numba.pair(source, sides[0], sides[1], offset, key, 1e-2)
    fallback.pair(source, sides[2], sides[3], offset, key, 1e-2)
    assert torch.equal(sides[0], sides[2]) and torch.equal(sides[1], sides[3])
    copies = [torch.empty(length) for _ in range(2)]
    for backend, copy in zip((numba, fallback), copies):
        backend.copy(source, copy, offset, [key], [-1e-2])
    assert torch.equal(copies[0], sides[1]) and torch.equal(copies[1], sides[1])

    # An update may fuse a multiply and an add in torch's kernels: equal up to float32 rounding.
    keys, coefficients = [param_key(s, 2) for s in (3, 4)], [0.25, -0.5]
    updated = [source.clone(), source.clone()]
    for backend, target in zip((numba, fallback), updated):
        backend.update([target], [offset], [keys], coefficients, 0.9)
    torch.testing.assert_close(updated[0], updated[1], rtol=1e-6, atol=1e-6)
    expected = source * 0.9 + 0.25 * _z(numba, length, offset, keys[0]) - 0.5 * _z(numba, length, offset, keys[1])
    torch.testing.assert_close(updated[0], expected)


def _z(backend, length, offset, key):
    z = torch.empty(length)
    backend.fill(z, offset, key)
    return z
