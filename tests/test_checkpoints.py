"""Damaged checkpoints: truncated, zeroed or deleted files are found by their checksum (or by failing to load),
skipped with a warning, and the newest good checkpoint is used; with none readable, a one-line error."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from zotune.checkpoints import Checkpoints, checksum_path
from zotune.cli import main
from zotune.errors import TrainingError

DAMAGE = st.sampled_from(["truncate", "zero", "delete", "none"])


def damage(path, kind: str, where: float) -> None:
    data = bytearray(path.read_bytes())
    cut = int(where * len(data))
    if kind == "truncate":
        path.write_bytes(bytes(data[:cut]))
    elif kind == "zero":
        end = min(len(data), cut + 64)
        data[cut:end] = bytes(end - cut) if any(data[cut:end]) else b"\xff" * (end - cut)
        path.write_bytes(bytes(data))
    elif kind == "delete":
        path.unlink()


@settings(max_examples=40, deadline=None)
@given(kinds=st.lists(DAMAGE, min_size=3, max_size=3), places=st.lists(st.floats(0.0, 0.999), min_size=3, max_size=3))
def test_the_newest_good_checkpoint_is_used_whatever_was_damaged(tmp_path_factory, kinds, places):
    folder = tmp_path_factory.mktemp("run")
    checkpoints = Checkpoints(folder, keep=3)
    for step in (1, 2, 3):
        checkpoints.save(step, {"step": step, "weights": torch.full((256,), float(step))})
    paths = checkpoints.paths()
    for path, kind, where in zip(paths, kinds, places):
        damage(path, kind, where)
    good = [step for step, kind in zip((1, 2, 3), kinds) if kind == "none"]
    warnings = []
    if not good and all(kind == "delete" for kind in kinds):
        assert checkpoints.latest(warnings.append) is None
        return
    if not good:
        with pytest.raises(TrainingError, match="no readable checkpoint in"):
            checkpoints.latest(warnings.append)
        return
    state = checkpoints.latest(warnings.append)
    assert state["step"] == good[-1] and torch.equal(state["weights"], torch.full((256,), float(good[-1])))
    skipped = [step for step, kind in zip((1, 2, 3), kinds) if step > good[-1] and kind != "delete"]
    assert len(warnings) == len(skipped) and all("is unusable" in warning for warning in warnings)


def test_a_checksum_is_written_beside_each_checkpoint_and_removed_with_it(tmp_path):
    checkpoints = Checkpoints(tmp_path, keep=2)
    for step in (1, 2, 3):
        checkpoints.save(step, {"step": step})
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoint-000002.pt",
        "checkpoint-000002.pt.sha256",
        "checkpoint-000003.pt",
        "checkpoint-000003.pt.sha256",
    ]
    assert len(checksum_path(checkpoints.paths()[-1]).read_text()) == 64


def test_a_run_resumes_from_the_older_checkpoint_when_the_newest_is_cut_short(tmp_path, capsys):
    args = [
        "train",
        "model=random:tiny",
        "num_train=16",
        "num_dev=8",
        "num_test=8",
        "batch_size=4",
        "max_length=48",
        "optimizer=mezo",
        "lr=5e-3",
        "eval_every=0",
        "checkpoint_every=2",
        "keep_checkpoints=2",
        f"output_dir={tmp_path}",
    ]
    assert main([*args, "steps=4"]) == 0
    newest = tmp_path / "checkpoint-000004.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # as a full disk or a copy cut short leaves it
    capsys.readouterr()
    assert main([*args, "steps=6"]) == 0
    assert "checkpoint-000004.pt is unusable, its checksum does not match" in capsys.readouterr().out
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]  # steps 3 and 4 were taken again


def test_a_full_disk_while_saving_stops_with_one_line_and_keeps_the_older_checkpoints(tmp_path, capsys, monkeypatch):
    import errno

    from zotune import checkpoints

    args = [
        "train",
        "model=random:tiny",
        "num_train=16",
        "num_dev=8",
        "num_test=8",
        "batch_size=4",
        "max_length=48",
        "optimizer=mezo",
        "lr=5e-3",
        "eval_every=0",
        "checkpoint_every=1",
        "export=false",
        f"output_dir={tmp_path}",
    ]
    real_save, saves = torch.save, []

    def filling_up(state, file):  # the third checkpoint finds the disk full halfway through
        saves.append(1)
        if len(saves) == 3:
            file.write(b"x" * 100)
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(state, file)

    monkeypatch.setattr(checkpoints.torch, "save", filling_up)
    capsys.readouterr()
    assert main([*args, "steps=4"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith(("zotune:", "Traceback"))]
    assert len(err) == 1 and err[0].startswith("zotune: error: cannot save checkpoint-000003.pt")
    assert "No space left on device" in err[0] and "checkpoint-000001.pt, checkpoint-000002.pt" in err[0]
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == [
        "checkpoint-000001.pt",
        "checkpoint-000001.pt.sha256",
        "checkpoint-000002.pt",
        "checkpoint-000002.pt.sha256",
    ]
    monkeypatch.setattr(checkpoints.torch, "save", real_save)
    assert main([*args, "steps=4"]) == 0  # space freed: resumes from step 2
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
