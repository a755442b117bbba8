"""Generation tasks: answer-only loss, greedy decoding, SQuAD F1, templates, and a local run end to end."""

import json

import pytest
import torch

from zotune.cli import main
from zotune.models import load_model
from zotune.scoring import encode, f1, answer_loss, greedy_answers
from zotune.tasks import Example
from zotune.tasks.hub import HUB_TASKS


def test_f1_follows_squad_normalization():
    assert f1("The Eiffel Tower!", ["eiffel tower"]) == 1.0
    assert f1("in Paris, France", ["Paris"]) == pytest.approx(2 * (1 / 3) * 1 / (1 / 3 + 1))
    assert f1("London", ["Paris", "london"]) == 1.0
    assert f1("", ["Paris"]) == 0.0 and f1("the", ["a"]) == 1.0  # both empty after normalization


def test_squad_and_drop_templates():
    squad = HUB_TASKS["squad"][2].example(
        {
            "title": "Paris",
            "context": "Paris is in France.",
            "question": "Where is Paris?",
            "answers": {"text": ["France", "France", "in France"]},
        },
        "row",
    )
    assert squad.prompt == "Title: Paris\nContext: Paris is in France.\nQuestion: Where is Paris?\nAnswer:"
    assert squad.candidates == (" France",) and squad.answers == ("France", "in France")
    drop = HUB_TASKS["drop"][2].example(
        {"passage": "3 goals.", "question": "How many?", "answers_spans": {"spans": ["3"]}}, "row"
    )
    assert drop.prompt == "Passage: 3 goals.\nQuestion: How many?\nAnswer:" and drop.answers == ("3",)


def test_answer_loss_is_answer_token_nll_and_greedy_matches_generate():
    model, tokenizer = load_model("random:tiny")
    model.eval()
    examples = [
        encode(tokenizer, Example("Q: 2+2?\nA:", (" four",), 0, ("four",)), 64),
        encode(tokenizer, Example("Capital?", (" Rome",), 0, ("Rome",)), 64),
    ]
    with torch.no_grad():
        expected = []
        for example in examples:
            sequence, n = example.sequences[0], example.candidate_lengths[0]
            log_probs = torch.log_softmax(model(input_ids=torch.tensor([sequence])).logits[0], -1)
            expected.append(-sum(log_probs[t - 1, sequence[t]] for t in range(len(sequence) - n, len(sequence))) / n)
        torch.testing.assert_close(
            answer_loss(model, examples, tokenizer.pad_token_id), torch.stack(expected).mean(), rtol=1e-5, atol=1e-5
        )
    answers = greedy_answers(model, tokenizer, examples, max_new_tokens=5, batch_size=2)
    for example, answer in zip(examples, answers):  # batched left-padded decoding = one prompt at a time
        prompt = example.sequences[0][: -example.candidate_lengths[0]]
        alone = model.generate(torch.tensor([prompt]), max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        assert answer == tokenizer.decode(alone[0, len(prompt) :], skip_special_tokens=True).strip().split("\n")[0].strip()


def test_local_generation_task_trains_and_reports_f1(tmp_path):
    rows = [{"question": f"What is {i} plus one?", "answer": str(i + 1)} for i in range(12)]
    for split in ("train", "dev", "test"):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    options = [f"task_options.{split}={tmp_path / f'{split}.jsonl'}" for split in ("train", "dev", "test")]
    run_dir = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "model=random:tiny",
                "task=local",
                *options,
                "task_options.template=Q: {question}\nA:",
                "task_options.answer_field=answer",
                "optimizer=adam",
                "lr=3e-3",
                "steps=30",
                "batch_size=6",
                "eval_every=0",
                f"output_dir={run_dir}",
            ]
        )
        == 0
    )
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert sum(losses[-5:]) < sum(losses[:5])  # the answer-token loss falls
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["metric"] == "f1" and 0 <= summary["test"] <= 1
