"""The speed script and the demo run end to end on a tiny model and write what they promise."""

import json

from zotune import demo
from zotune.bench import speed


def test_speed_script_writes_json_and_table(tmp_path, capsys):
    speed.main(["--shape", "tiny", "--batch", "2", "--length", "8", "--repeats", "1", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "speed.json").read_text())
    assert set(result["seconds"]) == {"forward", "z_sweep", "mezo_module", "mezo_inplace", "reference_mezo"}
    assert all(seconds > 0 for seconds in result["seconds"].values())
    assert result["config"]["parameters"] == 20640
    assert "÷ (2 × forward)" in (tmp_path / "speed.md").read_text()
    assert "speed-up of the fastest zotune MeZO step" in capsys.readouterr().out


def test_demo_writes_config_and_metrics_and_learns(tmp_path, capsys):
    demo.main(["--steps-scale", "0.1", "--run-dir", str(tmp_path)])
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["optimizers"]["mezo"]["steps"] == 300 and config["optimizers"]["ip-sgd"]["steps"] == 30
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    for name in ("mezo", "ip-sgd"):
        losses = [r["loss"] for r in records if r["optimizer"] == name]
        assert losses[-1] < losses[0], name
    assert "ip-sgd" in capsys.readouterr().out
