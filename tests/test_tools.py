"""The speed benchmark and the demo run end to end on a tiny model and write what they promise."""

import json
import os

from zotune import demo
from zotune.bench import speed
from zotune.bench.memory import entries


def test_speed_script_writes_json_and_table(tmp_path, capsys):
    speed.main(["--shape", "tiny", "--batch", "2", "--length", "8", "--repeats", "1", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "speed.json").read_text())
    optimizers = set(entries()) - {"inference"}  # every registered optimizer and variant: none named here
    steps = {"doubled_forward", "z_sweep", "reference_mezo", "forward_backward"} | optimizers
    assert set(result["seconds"]) == {"forward"} | steps
    assert all(seconds > 0 for seconds in result["seconds"].values())
    assert len(result["rounds"]["forward"]) == len(steps) + 1  # one round: a forward before and after each item
    assert set(result["over_two_forwards"]) == steps
    assert all(len(ratios) == 1 for ratios in result["over_two_forwards_per_round"].values())
    for ratio in [*result["over_two_forwards"].values(), result["speedup_over_reference"]]:
        assert 0 < ratio["low"] <= ratio["median"] <= ratio["high"]
    assert result["speedup_over_reference"]["mode"] in speed.MEZO_MODES
    assert result["config"]["parameters"] == 20640
    assert "÷ (2 × forward)" in (tmp_path / "speed.md").read_text()
    assert "speed-up of the fastest zotune MeZO step" in capsys.readouterr().out
    assert (tmp_path / "speed.png").stat().st_size > 1000


def test_speed_ratios_are_taken_against_the_forwards_beside_each_item(monkeypatch):
    """Each item runs between two forwards and its ratio is over their mean, so rounds on a machine that runs
    at different speeds give the same ratios; the warm-up round is dropped."""
    clock, calls, speed_of_round = [0.0], [], {"factor": 1.0}
    costs = {"forward": 1.0, "step": 3.0, "sweep": 0.5}

    def action(name):
        def run():
            calls.append(name)
            clock[0] += costs[name] * speed_of_round["factor"]
            if calls.count("forward") % 3 == 0 and name == "forward":  # a round's last call: the next is slower
                speed_of_round["factor"] += 1.0

        return run

    monkeypatch.setattr(speed.time, "perf_counter", lambda: clock[0])
    seconds, ratios = speed.bracketed_timings(action("forward"), {"step": action("step"), "sweep": action("sweep")}, repeats=2)
    assert calls == ["forward", "step", "forward", "sweep", "forward"] * 3
    assert seconds["step"] == [6.0, 9.0] and seconds["sweep"] == [1.0, 1.5]  # rounds 1 and 2; 0 is the warm-up
    assert seconds["baseline"] == [2.0, 2.0, 2.0, 3.0, 3.0, 3.0]
    assert ratios == {"step": [3.0, 3.0], "sweep": [0.5, 0.5]}


def test_demo_runs_the_three_recipes_and_writes_the_table_and_plot(tmp_path, monkeypatch, capsys):
    repository = os.getcwd()
    monkeypatch.chdir(tmp_path)
    os.symlink(os.path.join(repository, "configs"), tmp_path / "configs")
    demo.main(["model=random:tiny", "steps=4", "num_train=16", "num_dev=8", "num_test=8", "eval_every=2"])
    table = (tmp_path / "runs" / "demo.md").read_text()
    assert "| ip-sgd | 4 |" in table and "| mezo | 4 |" in table and "| addax | 4 |" in table
    assert "peak memory (MiB)" in table
    for run in ("demo-ipsgd", "demo-mezo", "demo-addax"):
        assert (tmp_path / "runs" / run / "plot.png").is_file()
        summary = json.loads((tmp_path / "runs" / run / "summary.json").read_text())
        assert summary["steps"] == 4 and f"| {summary['peak_memory_mb']:.0f} |" in table
    assert (tmp_path / "runs" / "demo.png").stat().st_size > 1000
    assert table.strip() in capsys.readouterr().out


def test_a_resumed_convergence_suite_keeps_finished_runs_and_continues_stopped_ones(tmp_path):
    from zotune.cli import main

    common = [
        "bench",
        "convergence",
        "--config",
        "configs/demo-sentiment-mezo.yaml",
        "--optimizers",
        "mezo,ip-sgd@1e-2",
        "--set",
        "ip-sgd@1e-2:optimizer_options={}",
        "--out",
        str(tmp_path),
        "model=random:tiny",
        "steps=6",
        "eval_every=3",
        "num_train=16",
        "num_dev=8",
        "num_test=8",
        "checkpoint_every=3",
        "lr=5e-3",
    ]
    assert main(common) == 0
    finished = (tmp_path / "mezo" / "metrics.jsonl").read_text()
    # ip-sgd stopped after its first checkpoint: its last steps and its summary are gone
    stopped = tmp_path / "ip-sgd@1e-2"
    lines = (stopped / "metrics.jsonl").read_text().splitlines()
    (stopped / "metrics.jsonl").write_text(
        "\n".join(line for line in lines if '"step": 6' not in line and '"step": 4' not in line and '"step": 5' not in line)
        + "\n"
    )
    for name in ("summary.json", "checkpoint-000006.pt", "checkpoint-000006.pt.sha256"):
        (stopped / name).unlink()
    assert main([*common, "--resume"]) == 0
    assert (tmp_path / "mezo" / "metrics.jsonl").read_text() == finished  # kept, not run again
    steps = [json.loads(line)["step"] for line in (stopped / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert steps == [1, 2, 3, 4, 5, 6] and (stopped / "summary.json").is_file()  # resumed from step 3
    assert main([*common, "steps=8", "--resume"]) == 0  # a longer budget continues the finished runs
    steps = [
        json.loads(line)["step"] for line in (tmp_path / "mezo" / "metrics.jsonl").read_text().splitlines() if '"loss"' in line
    ]
    assert steps == list(range(1, 9))
    assert main([*common, "seed=1", "--resume"]) == 0  # a setting that defines another run: it starts over
    steps = [
        json.loads(line)["step"] for line in (tmp_path / "mezo" / "metrics.jsonl").read_text().splitlines() if '"loss"' in line
    ]
    assert steps == list(range(1, 7))


def test_convergence_benchmark_compares_optimizers_on_shared_targets(tmp_path, capsys):
    from zotune.cli import main

    assert (
        main(
            [
                "bench",
                "convergence",
                "--config",
                "configs/demo-sentiment-mezo.yaml",
                "--optimizers",
                "mezo,adamezo@1e-4",
                "--set",
                "adamezo@1e-4:optimizer_options.window=2",
                "--smooth",
                "3",
                "--out",
                str(tmp_path),
                "model=random:tiny",
                "steps=8",
                "eval_every=4",
                "num_train=16",
                "num_dev=8",
                "num_test=8",
                "lr=5e-3",
            ]
        )
        == 0
    )
    result = json.loads((tmp_path / "convergence.json").read_text())
    assert set(result) == {"mezo", "adamezo@1e-4"}
    adamezo = result["adamezo@1e-4"]["config"]
    assert adamezo["optimizer"] == "adamezo" and adamezo["optimizer_options"]["window"] == 2 and adamezo["lr"] == 1e-4
    assert result["mezo"]["config"]["lr"] == 5e-3
    for run in result.values():
        # the shared targets are reachable by construction: every run reaches the loss target
        assert run["reached_loss_at"] is not None and run["reached_metric_at"] is not None
        assert run["evals"][0][1] == 0  # the zero-shot evaluation is at zero forward passes
        assert run["summary"]["peak_memory_mb"] > 0
    assert (tmp_path / "convergence.png").stat().st_size > 1000
    assert "| adamezo@1e-4 |" in capsys.readouterr().out


def test_memory_benchmark_orders_addax_between_mezo_and_sgd(tmp_path, capsys):
    """On long sequences activations dominate: Addax (ZO on the long part, backward on the short part) must
    stay near MeZO and well below SGD, which keeps the long part's activations and every gradient."""
    from zotune.cli import main

    assert (
        main(
            [
                "bench",
                "memory",
                "--config",
                "configs/addax-sentiment.yaml",
                "--optimizers",
                "inference,mezo,addax,sgd",
                "--out",
                str(tmp_path),
                "model=random:tiny",
                "max_length=600",
                "optimizer_options.L_T=150",
                "optimizer_options.K0=32",
                "optimizer_options.K1=4",
                "num_train=256",
                "num_dev=4",
                "num_test=4",
            ]
        )
        == 0
    )
    results = json.loads((tmp_path / "memory.json").read_text())["results"]
    extra = {name: r["peak_bytes"] - r["baseline_bytes"] for name, r in results.items()}
    assert min(results["addax"]["batch"]["long"]) > 150 >= max(results["addax"]["batch"]["short"])
    assert extra["sgd"] - max(extra["mezo"], extra["inference"]) > 32 * 2**20  # the long part's activations
    assert extra["addax"] < extra["mezo"] + (extra["sgd"] - extra["mezo"]) / 2
    assert "| addax |" in capsys.readouterr().out and (tmp_path / "memory.png").stat().st_size > 1000


def test_parallel_benchmark_times_one_and_two_processes(tmp_path, capsys):
    from zotune.cli import main

    assert (
        main(
            [
                "bench",
                "parallel",
                "--config",
                "configs/demo-sentiment-mezo.yaml",
                "--processes",
                "1,2",
                "--out",
                str(tmp_path),
                "model=random:tiny",
                "steps=4",
                "num_train=32",
                "lr=5e-3",
            ]
        )
        == 0
    )
    result = json.loads((tmp_path / "parallel.json").read_text())
    assert set(result) == {"1", "2"}
    assert result["1"]["bytes_per_step"] == 0  # one process: no all-reduce at all
    assert result["2"]["bytes_per_step"] == 16 + 4  # L+ and L− (float64), and the stop flag (float32)
    assert result["2"]["threads_per_process"] == max(1, (os.cpu_count() or 1) // 2)
    assert all(r["examples_per_second"] > 0 for r in result.values())
    assert "| 2 |" in capsys.readouterr().out and (tmp_path / "parallel.png").stat().st_size > 1000


def test_task_speed_times_every_optimizer_with_both_scorers_on_a_real_batch(tmp_path):
    speed.main(
        [
            "--task",
            "bigbench-sentiment",
            "--model",
            "random:tiny",
            "--batch",
            "4",
            "--max-length",
            "48",
            "--repeats",
            "1",
            "--eval-examples",
            "6",
            "--optimizers",
            "mezo,svrg,ip-sgd",
            "--cached",
            "--out",
            str(tmp_path),
            "num_train=16",
            "num_dev=6",
            "num_test=4",
        ]
    )
    result = json.loads((tmp_path / "task_speed.json").read_text())
    assert set(result["steps"]) == {"mezo", "svrg", "ip-sgd"}
    for step in result["steps"].values():
        assert all(step["seconds"][scorer] > 0 for scorer in ("packed", "separate", "cached"))
        assert step["cached_over_packed"]["median"] > 0
        assert 0 < step["speedup"]["low"] <= step["speedup"]["median"] <= step["speedup"]["high"]
    assert set(result["forward"]) == {"separate forward", "cached forward", "reference forward", "reference MeZO step"}
    assert result["mezo_over_reference"]["median"] > 0 and result["evaluation"]["examples"] == 6
    assert result["config"]["candidates"] == "2-2" and result["config"]["batch"] == 4
    # The baseline forward and the reference step run on the batches MeZO's steps draw, not on others.
    from zotune.optim import MeZO

    plan = MeZO.data_plan(list(range(16)), 4, {}, 0)
    assert result["config"]["baseline_batches"] == [plan.next_batch(), plan.next_batch()]
    assert (
        "packing's speed-up" in (tmp_path / "task_speed.md").read_text()
        and "cached ÷ packed" in (tmp_path / "task_speed.md").read_text()
    )
