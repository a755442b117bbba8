"""Every recipe resolves offline: ``zotune train --config X --dry-run`` checks it without loading weights or
data, so the paper recipes, written for a GPU and hub models, are checked here too."""

from pathlib import Path

import pytest

from zotune.cli import main

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
RECIPES = sorted(CONFIGS.rglob("*.yaml"))
PAPER = sorted((CONFIGS / "paper").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=[str(p.relative_to(CONFIGS)) for p in RECIPES])
def test_every_recipe_passes_a_dry_run(recipe, capsys):
    assert main(["train", "--config", str(recipe), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "dry run: the recipe resolves and its options are valid" in out


@pytest.mark.parametrize("recipe", PAPER, ids=[p.name for p in PAPER])
def test_a_paper_recipe_says_how_to_run_it_and_what_it_reproduces(recipe):
    head = [line for line in recipe.read_text().splitlines() if line.startswith("#")]
    assert head and head[0] == f"# zotune train --config configs/paper/{recipe.name}"
    assert any(line.startswith("# Reproduces:") for line in head), recipe


def test_there_is_a_paper_recipe_for_each_headline_setting():
    names = {p.stem for p in PAPER}
    assert {
        "mezo-opt13b-sst2-full",
        "mezo-opt13b-sst2-lora",
        "mezo-opt13b-sst2-prefix",
        "addax-opt13b-sst2",
        "adamezo-opt1.3b-sst2",
    } <= names


@pytest.mark.parametrize(
    "override,message",
    [
        ("optimizer_options.window=0", "window must be a positive integer"),
        ("optimizer_options.windw=3", "has no option 'windw'"),
        ("objective=f1", "is scored by accuracy"),
        ("task=no-such-task", "unknown task"),
    ],
)
def test_a_dry_run_reports_what_is_wrong_in_one_line(override, message, capsys):
    recipe = CONFIGS / "adamezo-sentiment.yaml"
    assert main(["train", "--config", str(recipe), "--dry-run", override]) == 2
    err = capsys.readouterr().err
    assert err.startswith("zotune: error:") and message in err and err.count("\n") == 1


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["optimizer_options.K0=0"], "K0 must be a positive integer"),
        (["optimizer_options.L_T=auto"], "L_T: auto needs memory_budget"),
        (["optimizer_options.L_T=auto", "optimizer_options.memory_budget=lots"], "is not a size"),
        (["optimizer_options.L_T=-3"], "L_T must be a positive number of tokens or auto"),
    ],
)
def test_a_dry_run_checks_addaxs_data_options(overrides, message, capsys):
    assert main(["train", "--config", str(CONFIGS / "addax-sentiment.yaml"), "--dry-run", *overrides]) == 2
    assert message in capsys.readouterr().err
