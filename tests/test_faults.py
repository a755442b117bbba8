"""Faults: a training process killed at random points (SIGKILL) or stopped (SIGTERM/SIGINT) resumes to the
parameters of an uninterrupted run, bit for bit."""

import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from zotune.train import Checkpoints

STEPS = 60
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def command(run_dir):
    return [
        sys.executable,
        "-m",
        "zotune.cli",
        "train",
        "model=random:tiny",
        "num_train=24",
        "num_dev=4",
        "num_test=4",
        "batch_size=8",
        "max_length=64",
        "optimizer=mezo",
        "lr=5e-3",
        f"steps={STEPS}",
        "checkpoint_every=1",
        "keep_checkpoints=2",
        "eval_every=0",
        "zero_shot_eval=false",
        f"output_dir={run_dir}",
    ]


def wait_for_training(run_dir, process, timeout=120):
    """Until a first checkpoint exists in a run started here (start-up takes a few seconds: imports)."""
    deadline = time.monotonic() + timeout
    while not any(run_dir.glob("checkpoint-*.pt")):
        assert process.poll() is None and time.monotonic() < deadline, "the run ended or stalled before its first step"
        time.sleep(0.02)


def assert_same_final_parameters(whole, parts):
    final = f"checkpoint-{STEPS:06d}.pt"
    a, b = (torch.load(d / final, weights_only=False) for d in (whole, parts))
    assert a["sampler"] == b["sampler"] and a["optimizer"]["state"]["zo"] == b["optimizer"]["state"]["zo"]
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("whole")
    subprocess.run(command(run_dir), env=ENV, check=True, capture_output=True)
    return run_dir


def test_sigkill_at_random_points_then_resume_is_bit_identical(tmp_path, uninterrupted):
    rng = random.Random(0)
    kills = 0
    for _ in range(4):
        process = subprocess.Popen(command(tmp_path), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_training(tmp_path, process)
        time.sleep(rng.uniform(0.0, 0.3))
        process.send_signal(signal.SIGKILL)
        process.wait()
        latest = Checkpoints(tmp_path, 2).latest()  # whatever the moment of the kill, the newest complete one loads
        assert latest is not None and latest["step"] >= 1
        kills += latest["step"] < STEPS
    assert kills >= 2, "the kills should land mid-run; the run is too fast for this test's timing"
    subprocess.run(command(tmp_path), env=ENV, check=True, capture_output=True)
    assert_same_final_parameters(uninterrupted, tmp_path)


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_sigint_save_the_step_then_resume_is_bit_identical(tmp_path, uninterrupted, stop):
    process = subprocess.Popen(command(tmp_path), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for_training(tmp_path, process)
    process.send_signal(stop)
    _, error = process.communicate(timeout=60)
    assert process.returncode == 128 + stop
    last_line = error.strip().splitlines()[-1]
    step = int(last_line.split(" at step ")[1].split(":")[0])
    assert last_line == (
        f"zotune: stopped: {stop.name} at step {step}: saved checkpoint-{step:06d}.pt in {tmp_path}; "
        "run the same command to resume"
    )
    assert (tmp_path / f"checkpoint-{step:06d}.pt").exists() and step < STEPS
    subprocess.run(command(tmp_path), env=ENV, check=True, capture_output=True)
    assert_same_final_parameters(uninterrupted, tmp_path)
