"""The GPU kernel (zotune.triton_rng) checked without a GPU: Triton's interpreter runs it on CPU tensors with
numpy, so its stream can be compared with the numba generator's on every machine, bit for bit (on a GPU,
which may fuse a multiply and an add, tests/test_cuda.py allows 2e-6).

The interpreter is chosen when a kernel is defined, from TRITON_INTERPRET, so the checks run in a fresh
process with it set."""

import os
import subprocess
import sys

import pytest
import torch

from zotune.directions import BLOCK_SIZE, DirectionEngine, param_key

DISTRIBUTIONS = ("gaussian", "rademacher")


def test_the_triton_kernel_computes_the_cpu_stream_in_the_interpreter():
    pytest.importorskip("triton")
    environment = {**os.environ, "TRITON_INTERPRET": "1"}
    here = os.path.dirname(__file__)
    code = f"import sys; sys.path.insert(0, {here!r}); import test_triton_interpreted as t; t.check_interpreted()"
    done = subprocess.run([sys.executable, "-c", code], env=environment, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.split() == ["fill", "update", "pair", "engine"] * len(DISTRIBUTIONS)


def check_interpreted():
    from zotune import triton_rng

    assert os.environ.get("TRITON_INTERPRET") == "1"
    numel = 2 * BLOCK_SIZE + 777
    for distribution in DISTRIBUTIONS:
        whole = DirectionEngine([torch.zeros(numel)], distribution).direction(0, 9)
        # The whole parameter, and stretches starting at odd positions and across keyed blocks (a shard's).
        for offset, length in [(0, numel), (1, 10), (BLOCK_SIZE - 3, 8), (12_345, 30_001), (2 * BLOCK_SIZE - 5, 700)]:
            part = torch.empty(length)
            triton_rng.fill(part, offset, param_key(9, 0), distribution, BLOCK_SIZE)
            assert torch.equal(part, whole[offset : offset + length]), (distribution, offset, length)
        print("fill")

        source = torch.randn(numel, generator=torch.Generator().manual_seed(0))
        # Six terms take two launches, which float32 does not notice (the CPU too rounds after each add); bf16
        # is rounded once per launch, and once per update on the CPU: so at most four terms there.
        for dtype, seeds, (offset, length) in [
            (torch.float32, range(6), (BLOCK_SIZE - 100, 5_001)),
            (torch.bfloat16, range(3), (7, 4_000)),
        ]:
            terms = [(seed, (-1) ** seed * 0.1 * (seed + 1)) for seed in seeds]
            on_cpu = source.to(dtype, copy=True)
            DirectionEngine([on_cpu], distribution).apply(terms, scale=0.9)
            shard = source.to(dtype)[offset : offset + length].clone()
            triton_rng.update(shard, offset, [(param_key(seed, 0), c) for seed, c in terms], 0.9, distribution, BLOCK_SIZE)
            if dtype == torch.float32:
                assert torch.equal(shard, on_cpu[offset : offset + length]), distribution
            else:  # the interpreter truncates float32 to bf16 where a GPU and the CPU round to nearest: one ulp
                torch.testing.assert_close(shard, on_cpu[offset : offset + length], rtol=2**-7, atol=0)
        print("update")

        # pair: both sides of an estimate from one generation, and a perturbed copy alone (minus None).
        plus, minus = torch.empty(numel), torch.empty(numel)
        DirectionEngine([source], distribution).perturbed_pair(0, 9, 1e-2, plus, minus)
        for offset, length in [(0, numel), (BLOCK_SIZE - 7, 1_001), (3, 11)]:
            stretch = source[offset : offset + length].clone()
            sides = torch.empty(length), torch.empty(length)
            triton_rng.pair(stretch, *sides, offset, param_key(9, 0), 1e-2, distribution, BLOCK_SIZE)
            assert torch.equal(sides[0], plus[offset : offset + length]), (distribution, offset)
            assert torch.equal(sides[1], minus[offset : offset + length]), (distribution, offset)
            alone = torch.empty(length)
            triton_rng.pair(stretch, alone, None, offset, param_key(9, 0), -1e-2, distribution, BLOCK_SIZE)
            assert torch.equal(alone, minus[offset : offset + length]), (distribution, offset)
        stretch, copy = source[:4_000].to(torch.bfloat16), torch.empty(4_000, dtype=torch.bfloat16)
        triton_rng.pair(stretch, copy, None, 0, param_key(9, 0), 1e-2, distribution, BLOCK_SIZE)
        expected = DirectionEngine([stretch], distribution).perturbed_copy(0, [(9, 1e-2)])
        torch.testing.assert_close(copy, expected, rtol=2**-7, atol=0)  # the interpreter's truncation, as above
        print("pair")

        # The engine's GPU paths, taken by CPU tensors: the kernels where a CUDA tensor would use them.
        params = [torch.randn(shape, generator=torch.Generator().manual_seed(1)) for shape in [(3, 5), (numel,)]]
        on_kernels, on_numba = DirectionEngine(params, distribution), DirectionEngine(params, distribution)
        kernels, choose = on_kernels._backends, on_kernels._backends.of
        kernels.of = lambda tensor: kernels.triton if tensor.dtype == torch.float32 else choose(tensor)
        on_kernels._offsets[1] = on_numba._offsets[1] = 12_345  # as a shard starting there would be keyed
        for index, param in enumerate(params):
            copies = [engine.perturbed_copy(index, [(7, 1e-2)]) for engine in (on_kernels, on_numba)]
            assert torch.equal(*copies), (distribution, index)
            sides = [torch.empty_like(param) for _ in range(4)]
            on_kernels.perturbed_pair(index, 7, 1e-2, *sides[:2])
            on_numba.perturbed_pair(index, 7, 1e-2, *sides[2:])
            assert torch.equal(sides[0], sides[2]) and torch.equal(sides[1], sides[3]), (distribution, index)
        expected = [param.clone() for param in params]
        by_numba = DirectionEngine(expected, distribution)
        by_numba._offsets[1] = 12_345
        by_numba.apply([(5, 0.1), (6, -0.2)], scale=0.9)
        on_kernels.apply([(5, 0.1), (6, -0.2)], scale=0.9)
        assert all(torch.equal(param, wanted) for param, wanted in zip(params, expected)), distribution
        print("engine")
