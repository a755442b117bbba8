"""A run's model as a Hugging Face folder: loaded by from_pretrained and peft offline, it predicts as the run's."""

import json

import pytest
import torch

from zotune.cli import main
from zotune.config import load_config
from zotune.preparation import prepare
from zotune.scoring import candidate_scores

TINY = [
    "model=random:tiny",
    "num_train=16",
    "num_dev=8",
    "num_test=8",
    "batch_size=4",
    "max_length=48",
    "eval_every=0",
    "zero_shot_eval=false",
]


def trained(tmp_path, name, *args):
    run_dir = tmp_path / name
    assert main(["train", *TINY, "steps=3", f"output_dir={run_dir}", *args]) == 0
    return run_dir


def dev_scores(model, run_dir):
    """The candidate scores of the run's dev split under ``model``."""
    prepared = prepare(load_config(run_dir / "config.yaml"))
    with torch.no_grad():
        return candidate_scores(model.eval(), prepared.splits["dev"], prepared.tokenizer.pad_token_id)


def checkpoint_model(run_dir):
    prepared = prepare(load_config(run_dir / "config.yaml"))
    checkpoint = sorted(run_dir.glob("checkpoint-*.pt"))[-1]
    prepared.model.load_state_dict(torch.load(checkpoint, weights_only=False)["model"])
    return prepared.model


def test_a_full_run_writes_a_folder_that_from_pretrained_loads_with_the_same_predictions(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir = trained(tmp_path, "full", "optimizer=sgd", "lr=0.05")
    folder = run_dir / "model"
    assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
    card = (folder / "README.md").read_text()
    assert "random:tiny" in card and "bigbench-sentiment" in card and "sgd" in card and "| steps | 3 " in card
    summary = json.loads((run_dir / "summary.json").read_text())
    assert f"{100 * summary['test']:.1f}%" in card
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    torch.testing.assert_close(dev_scores(loaded, run_dir), dev_scores(checkpoint_model(run_dir), run_dir))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert (
        tokenizer("It was great")["input_ids"]
        == prepare(load_config(run_dir / "config.yaml")).tokenizer("It was great")["input_ids"]
    )


def test_a_lora_run_writes_its_adapter_and_the_merged_model(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from zotune.models import load_model

    run_dir = trained(tmp_path, "lora", "optimizer=mezo", "lr=1e-2", "trainable=lora", "merge=true")
    folder = run_dir / "model"
    assert (folder / "adapter_config.json").is_file() and (folder / "merged" / "model.safetensors").is_file()
    expected = dev_scores(checkpoint_model(run_dir), run_dir)
    assert not torch.allclose(dev_scores(load_model("random:tiny")[0], run_dir), expected)  # training moved it
    adapter = PeftModel.from_pretrained(load_model("random:tiny")[0], folder)
    torch.testing.assert_close(dev_scores(adapter, run_dir), expected)
    merged = AutoModelForCausalLM.from_pretrained(folder / "merged")
    torch.testing.assert_close(dev_scores(merged, run_dir), expected, rtol=1e-5, atol=1e-5)
    assert not (folder / "model.safetensors").exists()  # the adapter alone, not a copy of the base model
    adapter_card, merged_card = (folder / "README.md").read_text(), (folder / "merged" / "README.md").read_text()
    assert "library_name: peft" in adapter_card and "PeftModel.from_pretrained" in adapter_card
    assert "library_name: transformers" in merged_card and "AutoModelForCausalLM.from_pretrained(folder)" in merged_card
    assert "peft" not in merged_card.lower() and "| trainable | lora (merged into the base weights) |" in merged_card


def test_a_lora_mean_pooled_run_merges_into_a_body_and_a_head_that_load_as_the_card_says(tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModel

    from zotune.heads import label_logits
    from zotune.scoring import padded_batch

    lora = ("trainable=lora", "head=classifier", "pooling=mean", "merge=true")
    run_dir = trained(tmp_path, "lora-mean", "optimizer=mezo", "lr=1e-2", *lora)
    merged = run_dir / "model" / "merged"
    card = (merged / "README.md").read_text()
    assert "library_name: transformers" in card and "AutoModel.from_pretrained(folder)" in card and "score.safetensors" in card
    adapter_card = (run_dir / "model" / "README.md").read_text()  # the adapter: no score.safetensors beside it
    assert "score.safetensors" not in adapter_card and "merged/" in adapter_card
    prepared = prepare(load_config(run_dir / "config.yaml"))
    examples, pad_id = prepared.splits["dev"], prepared.tokenizer.pad_token_id
    input_ids, attention = padded_batch([example.sequences[0] for example in examples], pad_id, "cpu")
    with torch.no_grad():
        untrained = label_logits(prepared.model.eval(), examples, pad_id)
        expected = label_logits(checkpoint_model(run_dir).eval(), examples, pad_id)
        hidden = AutoModel.from_pretrained(merged).eval()(input_ids=input_ids, attention_mask=attention).last_hidden_state
        weights = attention[..., None].to(hidden.dtype)
        score = load_file(merged / "score.safetensors")
        logits = ((hidden * weights).sum(1) / weights.sum(1)) @ score["weight"].T + score["bias"]
    assert not torch.allclose(untrained, expected)  # training moved it
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_zotune_export_writes_any_checkpoint_as_the_run_did(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    run_dir = trained(tmp_path, "full", "optimizer=mezo", "lr=1e-2", "export=false")
    assert not (run_dir / "model").exists()
    checkpoint = sorted(run_dir.glob("checkpoint-*.pt"))[-1]
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "out")]) == 0
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    torch.testing.assert_close(dev_scores(loaded, run_dir), dev_scores(checkpoint_model(run_dir), run_dir))
    assert "| steps | 3 " in (tmp_path / "out" / "README.md").read_text()


@pytest.mark.parametrize("problem", ["missing", "prefix"])
def test_what_cannot_be_exported_is_a_one_line_error(tmp_path, capsys, problem):
    if problem == "missing":
        checkpoint = tmp_path / "nothing.pt"
    else:
        run_dir = trained(tmp_path, "prefix", "optimizer=mezo", "lr=1e-2", "trainable=prefix")
        assert not (run_dir / "model").exists()
        assert "not exported: trainable=prefix" in (run_dir / "metrics.jsonl").read_text()
        checkpoint = sorted(run_dir.glob("checkpoint-*.pt"))[-1]
    capsys.readouterr()
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("zotune: error:")
    assert ("no such checkpoint" if problem == "missing" else "trainable=prefix") in err[0]
