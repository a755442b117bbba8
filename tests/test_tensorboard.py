"""logger: tensorboard writes the run's scalars as event files; without the package, a one-line error."""

import importlib.util
import json

from zotune.cli import main

TINY = [
    "model=random:tiny",
    "num_train=16",
    "num_dev=8",
    "num_test=8",
    "batch_size=4",
    "max_length=48",
    "export=false",
    "optimizer=mezo",
    "lr=1e-2",
    "eval_every=2",
]


def scalars(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_the_run_s_losses_rates_and_dev_metric_are_tensorboard_scalars(tmp_path):
    run_dir = tmp_path / "run"
    assert main(["train", *TINY, "steps=4", "logger=tensorboard", f"output_dir={run_dir}"]) == 0
    logged = scalars(run_dir / "tensorboard")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    for field in ("loss", "loss_plus", "loss_minus", "projected_grad", "lr", "peak_memory_mb", "forward_passes"):
        assert [step for step, _ in logged[f"train/{field}"]] == [1, 2, 3, 4]
    assert [round(v, 5) for _, v in logged["train/loss"]] == [round(r["loss"], 5) for r in steps]
    dev = [r for r in records if r.get("split") == "dev"]
    assert [s for s, _ in logged["dev/accuracy"]] == [r["step"] for r in dev] == [0, 2, 4]
    assert [s for s, _ in logged["dev/accuracy_by_forward_passes"]] == [0, 4, 8]  # two forwards a MeZO step
    assert "dev/accuracy_by_seconds" in logged and "test/accuracy" in logged


def test_without_the_tensorboard_package_the_run_stops_with_one_line(tmp_path, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    assert main(["train", *TINY, "steps=2", "logger=tensorboard", f"output_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "logger=tensorboard needs the tensorboard package" in err[0]


def test_a_resumed_run_s_scalars_are_those_of_its_metrics_on_every_axis_once(tmp_path, monkeypatch):
    """Resumed from step 2 of 4 (checkpoint-4 lost), each series holds each kept or redone record once: a purge by
    step would drop the forward-pass and seconds series' earlier points, no purge would keep steps 3 and 4 twice."""
    from zotune.tensorboard_log import TensorBoardLog

    closed = []
    close = TensorBoardLog.close
    monkeypatch.setattr(TensorBoardLog, "close", lambda self: closed.append(close(self)))
    run_dir = tmp_path / "run"
    args = ["train", *TINY, "steps=4", "eval_every=1", "checkpoint_every=2", "keep_checkpoints=2", "logger=tensorboard"]
    assert main([*args, f"output_dir={run_dir}"]) == 0
    for path in (run_dir / "checkpoint-000004.pt", run_dir / "checkpoint-000004.pt.sha256"):
        path.unlink()
    assert main([*args, f"output_dir={run_dir}"]) == 0
    assert len(closed) == 2  # each run closes its event file
    logged = scalars(run_dir / "tensorboard")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [step for step, _ in logged["train/loss"]] == [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    last, expected = {}, {}
    for record in records:
        if "loss" in record:
            last = record
        elif "split" in record:
            tag = f"{record['split']}/{record['metric']}"
            for name, x in ((tag, record["step"]), (f"{tag}_by_forward_passes", last.get("forward_passes", 0))):
                expected.setdefault(name, []).append((x, round(record["value"], 5)))
            expected.setdefault(f"{tag}_by_seconds", []).append((round(last.get("seconds", 0)), round(record["value"], 5)))
    assert [step for step, _ in expected["dev/accuracy"]] == [0, 1, 2, 3, 4]
    assert {tag: [(x, round(v, 5)) for x, v in logged[tag]] for tag in expected} == expected
