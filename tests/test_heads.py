"""The classifier and mlm heads on tiny random BERT, RoBERTa, DistilBERT and GPT-2 models saved as folders
(and the lm head's Llama): encoding, scoring against a plain forward, every optimizer through the CLI
(lr = 0 leaves the weights bit-identical, a step with lr > 0 trains the new head too), and the refusals."""

import json

import pytest
import torch
import transformers as hf

from zotune.cli import main
from zotune.heads import HeadError, encode_fields, encode_masked, label_logits, mask_scores
from zotune.models import ModelError, load_model
from zotune.optim import OPTIMIZERS
from zotune.scoring import classification_loss, padded_batch
from zotune.tasks import Example

WORDS = ["it", "was", "great", "terrible", "yes", "no", "maybe", "the", "film"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
LETTERS = [chr(c) for c in range(ord("a"), ord("z") + 1)] + list("0123456789.,?!'\"-:;()")


def word_piece(folder):
    """A BERT tokenizer over a tiny vocabulary: a few whole words, then letters, so any text tokenizes."""
    vocab = [*SPECIAL, *WORDS, *LETTERS, *("##" + letter for letter in LETTERS)]
    return hf.BertTokenizerFast(vocab={token: index for index, token in enumerate(vocab)})


SIZE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
CONFIGS = {
    "bert": lambda v: hf.BertConfig(vocab_size=v, max_position_embeddings=512, pad_token_id=0, **SIZE),
    "roberta": lambda v: hf.RobertaConfig(vocab_size=v, max_position_embeddings=514, pad_token_id=0, **SIZE),
    "distilbert": lambda v: hf.DistilBertConfig(vocab_size=v, dim=32, n_layers=2, n_heads=4, hidden_dim=64, pad_token_id=0),
    "gpt2": lambda v: hf.GPT2Config(vocab_size=v, n_embd=32, n_layer=2, n_head=4, n_positions=512),
}
ENCODERS = ("bert", "roberta", "distilbert")


def save_model(folder, arch, head):
    """A tiny random model of ``arch`` saved with its tokenizer: a bare body for the classifier head (its head is
    new, as with a pretrained encoder), a masked LM for mlm."""
    if arch == "gpt2":
        from zotune.models import byte_tokenizer

        tokenizer = byte_tokenizer()
    else:
        tokenizer = word_piece(folder)
    config = CONFIGS[arch](len(tokenizer))
    kind = hf.AutoModelForMaskedLM if head == "mlm" else hf.AutoModel
    torch.manual_seed(0)
    kind.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("heads")
    saved = {(arch, "classifier"): save_model(root / f"{arch}-body", arch, "classifier") for arch in CONFIGS}
    saved.update({(arch, "mlm"): save_model(root / f"{arch}-mlm", arch, "mlm") for arch in ENCODERS})
    return saved


SENTIMENT = [
    Example("the film It was", (" terrible", " great"), 1, texts=("the film",), masked=("the film It was", ".")),
    Example(
        "it was no film It was", (" terrible", " great"), 0, texts=("it was no film",), masked=("it was no film It was", ".")
    ),
]
PAIRS = [
    Example("p", ("Yes", "No", "Maybe"), 2, texts=("the film was great.", "it was"), masked=("the film?", ", it")),
    Example("p", ("Yes", "No", "Maybe"), 0, texts=("no.", "yes it was the film"), masked=("no?", ", yes")),
]


def test_the_classifier_head_encodes_text_pairs_with_the_tokenizers_special_tokens(tmp_path):
    tokenizer = word_piece(tmp_path)
    encoded = encode_fields(tokenizer, PAIRS[0], 64)
    assert encoded.sequences == (tuple(tokenizer("the film was great.", "it was")["input_ids"]),)
    ids = encoded.sequences[0]
    assert ids[0] == tokenizer.cls_token_id and ids.count(tokenizer.sep_token_id) == 2 and not encoded.truncated
    cut = encode_fields(tokenizer, PAIRS[0], 6)
    assert len(cut.sequences[0]) == 6 and cut.truncated and cut.sequences[0][-1] == tokenizer.sep_token_id
    from zotune.models import byte_tokenizer

    joined = encode_fields(byte_tokenizer(), PAIRS[0], 64)  # no separator token: the fields joined by a newline
    assert joined.sequences[0] == tuple(byte_tokenizer()("the film was great.\nit was")["input_ids"])
    with pytest.raises(HeadError, match="head=classifier needs an example's text fields"):
        encode_fields(tokenizer, Example("p", (" a", " b"), 0), 64)


def test_the_mlm_head_puts_one_mask_where_the_label_word_goes(tmp_path):
    tokenizer = word_piece(tmp_path)
    encoded = encode_masked(tokenizer, SENTIMENT[0], 64)
    ids = encoded.sequences[0]
    assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
    assert ids[encoded.mask_position] == tokenizer.mask_token_id and ids.count(tokenizer.mask_token_id) == 1
    assert tokenizer.decode(ids[1 : encoded.mask_position]) == "the film it was"
    assert encoded.targets == tuple(tokenizer.convert_tokens_to_ids(["terrible", "great"]))
    cut = encode_masked(tokenizer, SENTIMENT[0], 7)  # the prompt loses its beginning
    assert len(cut.sequences[0]) == 7 and cut.truncated and cut.sequences[0][cut.mask_position] == tokenizer.mask_token_id
    with pytest.raises(HeadError, match="'filmy' is 2 tokens"):
        encode_masked(tokenizer, Example("p", (" great", " filmy"), 0, masked=("p", "")), 64)
    from zotune.models import byte_tokenizer

    with pytest.raises(HeadError, match="needs a tokenizer with a mask token"):
        encode_masked(byte_tokenizer(), SENTIMENT[0], 64)


@pytest.mark.parametrize("arch", ENCODERS)
def test_mask_scores_are_the_full_forwards_log_probabilities_at_the_mask(arch, folders):
    model, tokenizer = load_model(str(folders[arch, "mlm"]), head="mlm")
    model.eval()
    examples = [encode_masked(tokenizer, e, 64) for e in [*SENTIMENT, *PAIRS]]
    scores = mask_scores(model, examples, tokenizer.pad_token_id)
    assert scores.shape == (4, 3) and torch.isinf(scores[:2, 2]).all()  # two candidates, padded with -inf
    for row, example in enumerate(examples):  # one at a time, unpadded, through the model's whole forward
        logits = model(input_ids=torch.tensor([example.sequences[0]])).logits[0, example.mask_position]
        expected = torch.log_softmax(logits, dim=-1)[list(example.targets)]
        torch.testing.assert_close(scores[row, : len(example.targets)], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch,pooling", [(arch, pooling) for arch in CONFIGS for pooling in ("cls", "mean")])
def test_classifier_logits_do_not_depend_on_padding(arch, pooling, folders):
    model, tokenizer = load_model(str(folders[arch, "classifier"]), head="classifier", labels=3, pooling=pooling)
    model.eval()
    examples = [encode_fields(tokenizer, e, 64) for e in [*SENTIMENT, *PAIRS]]
    batched = label_logits(model, examples, tokenizer.pad_token_id)
    assert batched.shape == (4, 3)
    for row, example in enumerate(examples):
        alone = label_logits(model, [example], tokenizer.pad_token_id)[0]
        torch.testing.assert_close(batched[row], alone, rtol=1e-5, atol=1e-5)


def test_a_new_classification_head_comes_from_the_seed_and_a_model_without_a_head_is_refused(folders, capsys):
    folder = str(folders["bert", "classifier"])
    first, _ = load_model(folder, head="classifier", labels=2, seed=1)
    again, _ = load_model(folder, head="classifier", labels=2, seed=1)
    other, _ = load_model(folder, head="classifier", labels=2, seed=2)
    assert torch.equal(first.classifier.weight, again.classifier.weight)
    assert not torch.equal(first.classifier.weight, other.classifier.weight)
    assert torch.equal(first.bert.embeddings.word_embeddings.weight, other.bert.embeddings.word_embeddings.weight)
    assert "head=classifier: new weights (classifier.bias, classifier.weight) initialised from seed 1" in capsys.readouterr().err
    with pytest.raises(ModelError, match="has no trained masked-LM head .*use head=classifier"):
        load_model(folder, head="mlm")
    with pytest.raises(ModelError, match=r"this model \(GPT2Config\) has no mlm form"):
        load_model(str(folders["gpt2", "classifier"]), head="mlm")
    with pytest.raises(ModelError, match="random:<shape> models are causal"):
        load_model("random:tiny", head="mlm")


def train(folder, *overrides):
    return main(
        [
            "train",
            f"model={folder}",
            "num_train=16",
            "num_dev=8",
            "num_test=8",
            "batch_size=4",
            "max_length=128",
            "eval_every=0",
            "zero_shot_eval=false",
            *overrides,
        ]
    )


CASES = [("bert", "classifier"), ("roberta", "mlm"), ("distilbert", "classifier"), ("gpt2", "classifier"), ("distilbert", "mlm")]
OPTIONS = {
    "svrg": ["optimizer_options.large_batch=8"],
    "svrg-dense": ["optimizer_options.large_batch=8", "optimizer_options.memory=dense"],
    "addax": ["optimizer_options.L_T=100"],
    "addax-wa": [],
}


@pytest.mark.parametrize("variant", [*OPTIMIZERS, "svrg-dense", "addax-wa"])
@pytest.mark.parametrize("arch,head", CASES)
def test_every_optimizer_trains_every_head_and_lr_zero_changes_nothing(tmp_path, folders, arch, head, variant):
    folder = folders[arch, "mlm" if head == "mlm" else "classifier"]
    optimizer = variant.removesuffix("-dense")
    common = [f"head={head}", f"optimizer={optimizer}", "steps=2", *OPTIONS.get(variant, [])]
    weights = {}
    for lr in (0.0, 1e-2):
        run = tmp_path / str(lr)
        anchor = [f"optimizer_options.anchor_lr={lr}"] if optimizer == "svrg" else []  # η1: its anchor steps' lr
        assert train(folder, *common, f"lr={lr}", *anchor, f"output_dir={run}") == 0
        weights[lr] = torch.load(run / "checkpoint-000002.pt", weights_only=False)["model"]
        losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
        assert len(losses) == 2 and all(loss == loss for loss in losses)
    start, _ = load_model(str(folder), head=head, labels=2)
    start = start.state_dict()
    for name, value in weights[0.0].items():  # lr = 0: bit-identical, the new head included
        assert torch.equal(value, start[name]), name
    new = [name for name in start if name.startswith(("classifier.", "score."))]
    changed = [name for name in start if not torch.equal(weights[1e-2][name], start[name])]
    assert changed and (head == "mlm" or set(new) <= set(changed)), changed


@pytest.mark.parametrize("arch,head", [("bert", "classifier"), ("gpt2", "classifier"), ("roberta", "mlm")])
def test_lora_trains_the_adapters_and_a_classifiers_new_head_only(tmp_path, folders, arch, head):
    folder = folders[arch, head]
    run = tmp_path / "run"
    assert train(folder, f"head={head}", "trainable=lora", "optimizer=mezo", "lr=1e-2", "steps=2", f"output_dir={run}") == 0
    saved = torch.load(run / "checkpoint-000002.pt", weights_only=False)["model"]
    start = load_model(str(folder), head=head, labels=2)[0].state_dict()
    body = {
        name: value
        for name, value in saved.items()
        if not any(part in name for part in ("lora_", "modules_to_save", "original_module"))
    }
    for name, value in body.items():  # the frozen body, as it was loaded
        assert torch.equal(value, start[name.removeprefix("base_model.model.").replace(".base_layer", "")]), name
    trained_head = [name for name in saved if "modules_to_save" in name]
    assert bool(trained_head) == (head == "classifier"), trained_head
    for name in trained_head:  # peft's trainable copy of the new head moves away from the original
        assert not torch.equal(saved[name], saved[name.replace("modules_to_save.default", "original_module")]), name
    assert sum("lora_" in name for name in saved) > 0


def test_a_new_mean_pooled_head_learns_a_batch_with_sgd(tmp_path, folders):
    """A learning check where only the new head starts random: full-batch SGD on one fixed batch lowers its loss."""
    model, tokenizer = load_model(str(folders["bert", "classifier"]), head="classifier", labels=2, pooling="mean")
    examples = [encode_fields(tokenizer, e, 64) for e in SENTIMENT * 2]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    model.eval()
    losses = []
    for _ in range(20):
        loss = classification_loss(model, examples, tokenizer.pad_token_id, scorer=label_logits)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize(
    "overrides,message",
    [
        (
            ["head=classifier", "task=local", "task_options={train: x, dev: x, test: x, template: '{q}', answer_field: a}"],
            "needs a task with a fixed set of labels",
        ),
        (["head=classifier", "loss=lm"], "loss=lm trains a causal LM on the answer's tokens"),
        (["head=classifier", "trainable=prefix"], "trainable=prefix supports head=lm"),
        (["head=mlm", "model=random:tiny"], "random:<shape> models are causal"),
        (["head=mlm", "model=minilm-l6"], "'minilm-l6' is a sentence encoder without a language-model or masked-LM head"),
        (["head=linear"], "config key 'head' must be one of lm, classifier, mlm"),
        (["pooling=max"], "config key 'pooling' must be one of cls, mean"),
    ],
)
def test_heads_that_cannot_work_are_one_line_errors(tmp_path, overrides, message, capsys):
    assert main(["train", *overrides, f"output_dir={tmp_path}", "steps=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("zotune: error:") and message in err and err.count("\n") == 1, err


def test_a_local_task_for_a_classifier_needs_only_text_fields_and_labels(tmp_path, folders):
    rows = [{"text": "the film was great", "label": "pos"}, {"text": "it was terrible", "label": "neg"}] * 4
    for split in ("train", "dev", "test"):
        (tmp_path / f"{split}.jsonl").write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    options = (
        f"task_options={{train: {tmp_path}/train.jsonl, dev: {tmp_path}/dev.jsonl, test: {tmp_path}/test.jsonl, "
        "text_fields: [text], labels: [neg, pos]}"
    )
    assert (
        train(
            folders["bert", "classifier"],
            "head=classifier",
            "task=local",
            options,
            "optimizer=sgd",
            "lr=0.1",
            "steps=2",
            f"output_dir={tmp_path / 'run'}",
        )
        == 0
    )
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert 0 <= summary["test"] <= 1


@pytest.mark.parametrize("arch,head", [("bert", "classifier"), ("gpt2", "classifier"), ("roberta", "mlm"), ("distilbert", "mlm")])
def test_a_dual_forward_run_of_a_head_takes_the_steps_of_separate_forwards(tmp_path, folders, arch, head):
    losses = {}
    for dual in ("false", "true"):
        run = tmp_path / dual
        assert (
            train(
                folders[arch, head],
                f"head={head}",
                "optimizer=mezo",
                "lr=1e-3",
                "steps=3",
                f"optimizer_options.dual_forward={dual}",
                f"output_dir={run}",
            )
            == 0
        )
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        losses[dual] = [r[key] for r in records if "loss" in r for key in ("loss_plus", "loss_minus")]
    assert losses["true"] == pytest.approx(losses["false"], rel=0, abs=1e-5)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_a_classifier_run_exports_a_folder_that_transformers_loads_with_the_same_logits(tmp_path, folders, pooling):
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoModelForSequenceClassification

    from zotune.config import load_config
    from zotune.preparation import prepare

    run_dir = tmp_path / pooling
    assert (
        train(
            folders["bert", "classifier"],
            "head=classifier",
            f"pooling={pooling}",
            "optimizer=sgd",
            "lr=0.1",
            "steps=2",
            f"output_dir={run_dir}",
        )
        == 0
    )
    prepared = prepare(load_config(run_dir / "config.yaml"))
    prepared.model.load_state_dict(torch.load(sorted(run_dir.glob("checkpoint-*.pt"))[-1], weights_only=False)["model"])
    examples = prepared.splits["dev"]
    input_ids, attention = padded_batch([e.sequences[0] for e in examples], prepared.tokenizer.pad_token_id, "cpu")
    with torch.no_grad():
        expected = label_logits(prepared.model.eval(), examples, prepared.tokenizer.pad_token_id)
        if pooling == "cls":
            loaded = AutoModelForSequenceClassification.from_pretrained(run_dir / "model").eval()
            logits = loaded(input_ids=input_ids, attention_mask=attention).logits
        else:  # as the card says: the body's hidden states averaged over the real tokens, then score.safetensors
            body = AutoModel.from_pretrained(run_dir / "model").eval()
            hidden = body(input_ids=input_ids, attention_mask=attention).last_hidden_state
            weights = attention[..., None].to(hidden.dtype)
            score = load_file(run_dir / "model" / "score.safetensors")
            logits = ((hidden * weights).sum(1) / weights.sum(1)) @ score["weight"].T + score["bias"]
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
