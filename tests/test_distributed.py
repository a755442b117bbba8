"""Data parallel and FSDP2 on gloo with 2 processes: every rank ends with the same parameters as a one-process
run over the concatenated batch (to float tolerance), and zeroth-order steps all-reduce nothing but their
losses. With FSDP2 each rank holds half of every parameter and perturbs and updates only that half."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import lm_loss
from zotune.distributed import DataParallel, data_parallel, shard_model
from zotune.errors import OptionError
from zotune.models import random_llama
from zotune.optim import create_optimizer

WORLD = 2
STEPS = 3
OPTIMIZERS = {  # name: (options, which closure(s) each step takes)
    "mezo": dict(lr=1e-2, eps=1e-3),
    "adamezo": dict(lr=1e-3, eps=1e-3, window=2),
    "svrg": dict(lr=1e-2, anchor_lr=1e-2, eps=1e-3),
    "ip-sgd": dict(lr=1e-1),
    "addax": dict(lr=1e-1, alpha=0.3, eps=1e-3),
    "zo-sign": dict(lr=1e-3, eps=1e-3),
    "zo-momentum": dict(lr=1e-2, eps=1e-3),
    "zo-adam": dict(lr=1e-3, eps=1e-3),
    "zo-cons": dict(lr=1e-2, eps=1e-3),
    "forward-grad": dict(lr=1e-2),
}


FSDP = ("mezo", "adamezo", "svrg", "zo-sign", "zo-cons")


def run_steps(name, model, batch, shard=lambda rows: rows, group=None, params=None):
    """``STEPS`` steps of ``name`` on ``batch`` (float64); data parallel when given a group. Addax's long and
    short batches are the batch's two halves, each sharded over the ranks. ``params``: optimize these
    (in-place perturbation) instead of the model (module perturbation)."""
    optimizer = create_optimizer(name, model if params is None else params, **OPTIMIZERS[name])
    if group is not None:
        data_parallel(optimizer, group)
    own = shard(batch)
    for _ in range(STEPS):
        if name == "addax":
            half = len(batch) // 2
            long, short = shard(batch[:half]), shard(batch[half:])
            optimizer.step(lambda: lm_loss(model, long), lambda: lm_loss(model, short))
        elif name == "svrg":
            optimizer.step(lambda: lm_loss(model, own), lambda: lm_loss(model, own))
        else:
            optimizer.step(lambda: lm_loss(model, own))
    return {n: p.detach().clone() for n, p in model.named_parameters()}, optimizer


def worker(rank, init_file, out_dir, batch):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    group = DataParallel(rank, WORLD)
    results = {}
    for name in OPTIMIZERS:
        before = group.communicated_bytes
        model = random_llama("tiny", dtype=torch.float64, seed=2)
        params, _ = run_steps(name, model, batch, lambda rows: group.shard(rows), group)
        results[name] = (params, group.communicated_bytes - before)
    for name in FSDP:
        model = shard_model(random_llama("tiny", dtype=torch.float64, seed=2))
        held = {n: p.to_local().numel() for n, p in model.named_parameters()}
        run_steps(name, model, batch, lambda rows: group.shard(rows), group, params=list(model.parameters()))
        results["fsdp", name] = ({n: p.full_tensor() for n, p in model.named_parameters()}, held)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dp")
    batch = torch.randint(0, 64, (8, 10), generator=torch.Generator().manual_seed(0))
    mp.spawn(worker, args=(str(folder / "init"), str(folder), batch), nprocs=WORLD, join=True)
    return batch, [torch.load(folder / f"rank{rank}.pt") for rank in range(WORLD)]


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_two_ranks_match_one_process_on_the_whole_batch(name, two_rank_results):
    batch, ranks = two_rank_results
    expected, _ = run_steps(name, random_llama("tiny", dtype=torch.float64, seed=2), batch)
    start = {n: p.detach() for n, p in random_llama("tiny", dtype=torch.float64, seed=2).named_parameters()}
    for param_name, value in expected.items():
        assert torch.equal(ranks[0][name][0][param_name], ranks[1][name][0][param_name]), param_name  # identical ranks
        torch.testing.assert_close(ranks[0][name][0][param_name], value, rtol=0, atol=1e-9, msg=param_name)
    assert any(not torch.equal(value, start[n]) for n, value in expected.items())  # the steps moved the weights


@pytest.mark.parametrize("name", FSDP)
def test_fsdp2_shards_match_the_unsharded_run(name, two_rank_results):
    batch, ranks = two_rank_results
    model = random_llama("tiny", dtype=torch.float64, seed=2)
    expected, _ = run_steps(name, model, batch, params=list(model.parameters()))  # in place, as the shards are
    for param_name, value in expected.items():
        torch.testing.assert_close(ranks[0]["fsdp", name][0][param_name], value, rtol=0, atol=1e-9, msg=param_name)
    held = [ranks[rank]["fsdp", name][1]["model.embed_tokens.weight"] for rank in range(WORLD)]
    assert held == [32 * 32, 32 * 32]  # each rank holds half of the 64×32 embedding


def test_zeroth_order_steps_communicate_only_their_losses(two_rank_results):
    _, ranks = two_rank_results
    sent = {name: ranks[0][name][1] for name in OPTIMIZERS}
    assert sent["mezo"] == sent["adamezo"] == STEPS * 2 * 8  # L+ and L−, two float64 per step
    assert sent["zo-sign"] == sent["zo-momentum"] == sent["zo-adam"] == STEPS * 2 * 8  # dense state: kept by each rank
    assert sent["zo-cons"] == STEPS * 5 * 8  # L(θ), L+, L−, and the loss at each candidate
    assert sent["forward-grad"] == STEPS * 2 * 8  # the loss and the directional derivative
    assert sent["svrg"] == 8 * 2 * (1 + 2 + 1)  # anchor steps 0 and 2: one estimate; step 1: two
    parameter_bytes = sum(p.numel() * 8 for p in random_llama("tiny", dtype=torch.float64).parameters())
    assert sent["ip-sgd"] == STEPS * (8 + parameter_bytes)  # the loss, then every gradient once
    assert sent["addax"] == STEPS * (16 + 8 + parameter_bytes)  # the long batch's L±, then as IP-SGD


def test_optimizers_that_cannot_work_on_fsdp2_shards_are_refused(monkeypatch):
    from zotune.optim import params as params_module

    model = random_llama("tiny")
    monkeypatch.setattr(params_module, "is_sharded", lambda param: True)  # as if fully_shard had run
    for make, why in [
        (lambda: create_optimizer("ip-sgd", model.parameters(), lr=0.1), "InPlaceSGD updates each"),
        (lambda: create_optimizer("addax", model.parameters(), lr=0.1), "Addax updates each"),
        (lambda: create_optimizer("mezo", model, lr=0.1), "module perturbation swaps"),
        (lambda: create_optimizer("svrg", model.parameters(), memory="dense"), "memory=dense swaps"),
    ]:
        with pytest.raises(OptionError, match=f"FSDP2-sharded parameters: {why}.*With fully_shard use mezo, adamezo, svrg"):
            make()


def test_batches_that_do_not_split_evenly_and_plain_torch_optimizers_are_refused():
    group = DataParallel(rank=1, world_size=2)
    assert group.shard(list(range(6))) == [3, 4, 5]
    with pytest.raises(OptionError, match="the batch of 5 examples cannot be split evenly over 2 processes"):
        group.shard(list(range(5)))
    with pytest.raises(OptionError, match="SGD is not a zotune optimizer: wrap the model in"):
        data_parallel(torch.optim.SGD(random_llama("tiny").parameters(), lr=0.1), group)


TRAIN = [
    "train",
    "model=random:tiny",
    "num_train=32",
    "num_dev=8",
    "num_test=8",
    "batch_size=8",
    "max_length=64",
    "steps=4",
    "eval_every=0",
    "zero_shot_eval=false",
]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def test_torchrun_training_equals_one_process_and_only_rank_0_writes(tmp_path):
    """Addax through the CLI: both of its batches are sharded, and it uses both kinds of all-reduce. With the
    zero-shot evaluation, which rank 0 alone runs."""
    options = ["optimizer=addax", "lr=5e-2", "zero_shot_eval=true"]
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run(
        [sys.executable, "-m", "zotune.cli", *TRAIN, *options, f"output_dir={one}"], env=ENV, check=True, capture_output=True
    )
    launched = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "-m",
            "zotune.cli",
            *TRAIN,
            *options,
            f"output_dir={two}",
        ],
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert launched.stdout.count("after 4 steps dev") == 1  # the summary line, from rank 0 only
    expected = torch.load(one / "checkpoint-000004.pt", weights_only=False)["model"]
    got = torch.load(two / "checkpoint-000004.pt", weights_only=False)["model"]
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=2e-5, msg=name)
    records = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]  # one line per step: rank 0 alone writes
    single = [json.loads(line)["loss"] for line in (one / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert [r["loss"] for r in steps] == pytest.approx(single, abs=1e-5)


def test_torchrun_fsdp_training_equals_one_process(tmp_path):
    """fsdp: true shards every parameter over the 2 ranks; the run matches the unsharded one-process run (which
    perturbs module-wise, not in place: the two differ by rounding only), evaluation included."""
    one, two = tmp_path / "one", tmp_path / "two"
    options = ["optimizer=mezo", "lr=5e-3", "zero_shot_eval=true", "eval_every=2"]
    subprocess.run(
        [sys.executable, "-m", "zotune.cli", *TRAIN, *options, f"output_dir={one}"], env=ENV, check=True, capture_output=True
    )
    launched = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "-m",
            "zotune.cli",
            *TRAIN,
            *options,
            "fsdp=true",
            f"output_dir={two}",
        ],
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert launched.returncode == 0, launched.stderr[-3000:]
    expected = torch.load(one / "checkpoint-000004.pt", weights_only=False)["model"]
    got = torch.load(two / "checkpoint-000004.pt", weights_only=False)["model"]  # gathered from the shards
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=2e-5, msg=name)
    evaluations = [
        [r["value"] for r in map(json.loads, (folder / "metrics.jsonl").read_text().splitlines()) if "split" in r]
        for folder in (one, two)
    ]
    assert evaluations[0] == evaluations[1] and len(evaluations[0]) == 4  # zero-shot, step 2, dev and test at 4


def test_fsdp_options_that_cannot_work_are_one_line_errors():
    from zotune.config import ConfigError, load_config
    from zotune.train import check_fsdp

    group = DataParallel(rank=0, world_size=2)
    with pytest.raises(ConfigError, match="fsdp: true shards the model over processes: launch with torchrun"):
        check_fsdp(load_config(None, ["fsdp=true"]), None)
    for overrides, message in [
        (["optimizer=ip-sgd"], "supports the optimizers mezo, adamezo, svrg, zo-sign, zo-cons .*got 'ip-sgd'"),
        (["optimizer=svrg", "optimizer_options.memory=dense"], "got 'svrg' with memory=dense"),
        (["trainable=lora"], "supports trainable=full, got 'lora'"),
    ]:
        with pytest.raises(ConfigError, match=message):
            check_fsdp(load_config(None, ["fsdp=true", *overrides]), group)
    with pytest.raises(ConfigError, match="config key 'fsdp' must be true or false"):
        load_config(None, ["fsdp=yes please"])


@pytest.mark.parametrize("fsdp", ["false", "true"])
def test_torchrun_trains_a_classifier_head_as_one_process_does(tmp_path, fsdp):
    """head=classifier under data parallel and FSDP2: the ranks start from the same new head (seeded) and end
    where one process does; FSDP shards the blocks it finds in any architecture."""
    one, two = tmp_path / "one", tmp_path / "two"
    options = ["head=classifier", "optimizer=mezo", "lr=5e-3"]
    subprocess.run(
        [sys.executable, "-m", "zotune.cli", *TRAIN, *options, f"output_dir={one}"], env=ENV, check=True, capture_output=True
    )
    launched = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "-m",
            "zotune.cli",
            *TRAIN,
            *options,
            f"fsdp={fsdp}",
            f"output_dir={two}",
        ],
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert launched.returncode == 0, launched.stderr[-3000:]
    expected = torch.load(one / "checkpoint-000004.pt", weights_only=False)["model"]
    got = torch.load(two / "checkpoint-000004.pt", weights_only=False)["model"]
    assert got.keys() == expected.keys() and "score.weight" in got
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=2e-5, msg=name)
