"""The CUDA paths, run where a GPU is present (the lent GPU machine; CI has none and skips them): keyed
directions drawn by the Triton kernels (equal to the CPU's), MeZO (with separate and dual forwards) and Addax
against their naive references on the GPU, exact lr = 0 in bf16, the allocator-based memory measurement, and
`zotune train` end to end on the GPU."""

import json

import pytest
import torch

from conftest import keyed_direction, lm_loss
from test_addax import check_against_naive_reference
from test_mezo import naive_mezo
from zotune.directions import BLOCK_SIZE, CUDA_CHUNK, DirectionEngine
from zotune.lengths import first_order_peak_bytes
from zotune.models import random_llama
from zotune.optim import MeZO

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")


def test_cuda_directions_are_keyed_deterministic_and_gaussian():
    params = [torch.zeros(CUDA_CHUNK + 3_000_000, device=CUDA), torch.zeros(70, 30, device=CUDA)]
    engine, reordered = DirectionEngine(params), DirectionEngine(params)
    z = engine.direction(0, 11)
    assert torch.equal(z, engine.direction(0, 11)) and not torch.equal(z, engine.direction(0, 12))
    assert not torch.equal(z[:1000], z[BLOCK_SIZE : BLOCK_SIZE + 1000])  # two blocks, two keys
    assert torch.equal(reordered.direction(1, 11), engine.direction(1, 11))  # no dependence on order or history
    assert abs(z.mean().item()) < 3e-3 and abs(z.var().item() - 1) < 3e-3
    engine.apply([(11, 0.5)])
    torch.testing.assert_close(params[0], 0.5 * z)


@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
def test_cuda_directions_equal_the_cpu_directions(distribution):
    """One stream on both devices: the Triton kernel against the numba code, over a chunk boundary, and for
    stretches starting at odd positions (a shard's)."""
    from zotune import triton_rng
    from zotune.directions import param_key

    shapes = [(CUDA_CHUNK + 777,), (3, 5), (BLOCK_SIZE + 1,)]
    on_cpu = DirectionEngine([torch.zeros(shape) for shape in shapes], distribution)
    on_gpu = DirectionEngine([torch.zeros(shape, device=CUDA) for shape in shapes], distribution)
    for i in range(len(shapes)):
        torch.testing.assert_close(on_gpu.direction(i, 5).cpu(), on_cpu.direction(i, 5), rtol=0, atol=2e-6)
    whole = on_cpu.direction(0, 9)
    for offset, length in [(1, 10), (BLOCK_SIZE - 3, 8), (12_345, 300_001)]:
        part = torch.empty(length, device=CUDA)
        triton_rng.fill(part, offset, param_key(9, 0), distribution, BLOCK_SIZE)
        torch.testing.assert_close(part.cpu(), whole[offset : offset + length], rtol=0, atol=2e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_perturbed_copies_and_pairs_come_from_one_kernel_and_equal_the_cpus(dtype):
    """One launch writes θ ± εz on the GPU, compiled without fused multiply-adds: the two sides equal the
    perturbed copies bit for bit, and the CPU's copies as float32 rounding allows."""
    source = torch.randn(CUDA_CHUNK + 777, generator=torch.Generator().manual_seed(0)).to(dtype)
    on_gpu, on_cpu = DirectionEngine([source.to(CUDA)]), DirectionEngine([source])
    plus, minus = torch.empty_like(source, device=CUDA), torch.empty_like(source, device=CUDA)
    on_gpu.perturbed_pair(0, 7, 1e-2, plus, minus)
    assert torch.equal(plus, on_gpu.perturbed_copy(0, [(7, 1e-2)]))
    assert torch.equal(minus, on_gpu.perturbed_copy(0, [(7, -1e-2)]))
    tolerance = dict(rtol=0, atol=2e-6) if dtype == torch.float32 else dict(rtol=2**-7, atol=0)
    torch.testing.assert_close(plus.cpu(), on_cpu.perturbed_copy(0, [(7, 1e-2)]), **tolerance)


@pytest.mark.parametrize("dual", [False, True], ids=["module", "dual-forward"])
def test_mezo_on_cuda_matches_the_naive_reference(dual):
    input_ids = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(1)).to(CUDA)
    hyper = dict(lr=1e-3, eps=1e-3, weight_decay=0.1, n_directions=2, seed=42)
    model = random_llama("tiny", dtype=torch.float64, seed=0).to(CUDA)
    reference = random_llama("tiny", dtype=torch.float64, seed=0).to(CUDA)
    optimizer = MeZO(model, dual_forward=dual, **hyper)
    for _ in range(3):
        optimizer.step(lambda copies=1: lm_loss(model, input_ids, copies=copies))
    expected = naive_mezo(reference, input_ids, steps=3, direction=keyed_direction(model, optimizer), **hyper)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.detach(), expected[name], rtol=0, atol=1e-10, msg=name)


def test_addax_on_cuda_matches_the_naive_reference():
    check_against_naive_reference(exact=True, mixing="convex", alpha=0.3, tie=True, device=CUDA)


def test_zero_learning_rate_is_bit_exact_in_bf16_on_cuda():
    model = random_llama("tiny", dtype=torch.bfloat16, seed=3).to(CUDA)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = MeZO(model, lr=0.0, eps=1e-2, weight_decay=0.1)
    tokens = torch.randint(0, 64, (2, 6), device=CUDA)
    for _ in range(200):
        optimizer.step(lambda: lm_loss(model, tokens))
    for name, param in model.named_parameters():
        assert torch.equal(param.detach().view(torch.int16), before[name].view(torch.int16)), name


def test_first_order_peak_is_the_allocators_and_grows_with_length():
    model = random_llama("tiny", seed=0).to(CUDA)
    peaks = [
        first_order_peak_bytes(model, lambda n=n: lm_loss(model, torch.randint(0, 64, (8, n), device=CUDA))) for n in (16, 256)
    ]
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    assert weights < peaks[0] < peaks[1]


@pytest.mark.parametrize("optimizer,lr", [("mezo", 5e-3), ("addax", 5e-2)])
def test_train_cli_runs_on_the_gpu(tmp_path, optimizer, lr):
    from test_train import TINY
    from zotune.cli import main

    assert (
        main(
            [
                "train",
                *TINY,
                f"optimizer={optimizer}",
                f"lr={lr}",
                "steps=6",
                "eval_every=3",
                "device=cuda",
                f"output_dir={tmp_path}",
            ]
        )
        == 0
    )
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert 0 < summary["peak_memory_mb"] < 2000  # the allocator's peak for a tiny model, not the process's RSS
    state = torch.load(tmp_path / "checkpoint-000006.pt", map_location="cpu", weights_only=False)
    assert all(tensor.device.type == "cpu" for tensor in state["model"].values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
def test_cuda_update_equals_the_same_update_from_drawn_directions(dtype, distribution):
    """apply and perturbed_copy against direction() and plain torch arithmetic, with a restore and a
    weight-decay scale, over a two-block parameter."""
    param = torch.randn(CUDA_CHUNK + 5_000, generator=torch.Generator().manual_seed(0)).to(CUDA, dtype)
    start = param.clone()
    engine = DirectionEngine([param], distribution)
    z3, z4 = engine.direction(0, 3), engine.direction(0, 4)
    if distribution == "rademacher":
        assert set(z3[:100_000].unique().tolist()) == {-1.0, 1.0}
    expected = ((start.float() + 0.25 * z3) * 0.9 - 0.5 * z4).to(dtype)
    copy = engine.perturbed_copy(0, [(4, -0.5)])
    engine.apply([(4, -0.5)], restore=[(3, 0.25)], scale=0.9)
    for got, want in [(copy, (start.float() - 0.5 * z4).to(dtype)), (param, expected)]:
        # The kernel computes θ·0.9 + 0.225·z3 − 0.5·z4 in float32, fusing multiplies and adds: in float32 that
        # differs from the formula's rounding in the last place; rounded to bf16 it moves a rare value by one
        # unit in the last place, never more.
        torch.testing.assert_close(got, want, rtol=1e-5 if dtype == torch.float32 else 8e-3, atol=1e-5)
        if dtype == torch.bfloat16:
            assert (got != want).float().mean() < 1e-3
