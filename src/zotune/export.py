"""A trained model as a Hugging Face folder that loads without zotune: ``from_pretrained`` and peft's loader.

- ``trainable: full``: the model (``save_pretrained``, safetensors) and its tokenizer;
- ``trainable: lora``: the PEFT adapter (``PeftModel.from_pretrained(base, folder)``), and with ``merge: true``
  the adapter merged into the base model in ``merged/`` (written as the mean-pooled model below where it is one);
- ``head: classifier`` with ``pooling: mean``: the encoder body, and the linear head in ``score.safetensors``
  (transformers has no mean-pooling head; the card says how to apply it);
- ``trainable: prefix``: refused, since transformers cannot load a trained key/value prefix (the run's
  checkpoints hold it).

Each folder has a ``README.md`` model card naming the base model, the task, the optimizer, the steps and the
dev and test metrics. Written at the end of a run (``export: true``) or from any checkpoint by
``zotune export --checkpoint X --out DIR``.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from .config import TrainConfig
from .errors import ZotuneError
from .pooling import MeanPooledClassifier


class ExportError(ZotuneError, ValueError):
    """A model that cannot be written as a Hugging Face folder; the message says why and what to do."""


def export_problem(config: TrainConfig) -> str | None:
    """Why a run with this config cannot be exported, or None."""
    if config.trainable == "prefix":
        return (
            "trainable=prefix trains a key/value prefix, which transformers cannot load by itself: the run's "
            "checkpoints hold it (zotune eval --checkpoint)"
        )
    return None


def export(model: nn.Module, tokenizer, config: TrainConfig, out: Path, results: dict) -> Path:
    """Writes ``model`` (the run's selected weights) and ``tokenizer`` into ``out``; ``results``: the card's
    figures (steps, selected_step, dev, test, metric). Returns ``out``."""
    problem = export_problem(config)
    if problem is not None:
        raise ExportError(f"cannot export: {problem}")
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(model, MeanPooledClassifier):
        _save_mean_pooled(model, out)
        written = ["the encoder body, and the mean-pooling head in score.safetensors"]
    else:
        model.save_pretrained(out, safe_serialization=True)
        written = ["the PEFT adapter" if _is_peft(model) else "the model"]
    tokenizer.save_pretrained(out)
    if _is_peft(model) and config.merge:
        merged = model.merge_and_unload()  # the run is over: its adapters are folded into the base weights
        if isinstance(merged, MeanPooledClassifier):  # a LoRA run of a mean-pooled classifier: no save_pretrained
            _save_mean_pooled(merged, out / "merged")
            contents = "the encoder body with the adapter merged, and the mean-pooling head in score.safetensors"
        else:
            merged.save_pretrained(out / "merged", safe_serialization=True)
            contents = "the base model with the adapter merged"
        tokenizer.save_pretrained(out / "merged")
        (out / "merged" / "README.md").write_text(model_card(config, results, contents, merged=True))
        written.append("the merged model in merged/")
    (out / "README.md").write_text(model_card(config, results, ", ".join(written)))
    return out


def export_checkpoint(checkpoint: Path, out: Path) -> Path:
    """:func:`export` of the weights in a run's checkpoint (``checkpoint-NNNNNN.pt`` or ``best.pt``), built
    from the config it was saved with; the card's figures from the run folder's ``summary.json`` if there is
    one."""
    import json

    from .checkpoints import load_checked
    from .models import load_model, select_trainable
    from .preparation import head_labels
    from .tasks import task_definition

    if not checkpoint.is_file():
        raise ExportError(f"{checkpoint}: no such checkpoint file")
    try:
        state = load_checked(checkpoint)
    except ValueError as error:
        raise ExportError(f"{checkpoint} is unusable: {error}") from None
    if "config" not in state:
        raise ExportError(
            f"{checkpoint} holds no config (best.pt holds weights only): pass a checkpoint-NNNNNN.pt "
            "of the same run, or export the run's model/ folder it wrote at the end"
        )
    config = TrainConfig(**{key: value for key, value in state["config"].items() if key in TrainConfig.__dataclass_fields__})
    problem = export_problem(config)
    if problem is not None:
        raise ExportError(f"cannot export: {problem}")
    labels = head_labels(config, task_definition(config.task, config.task_options))
    model, tokenizer = load_model(config.model, config.dtype, config.head, labels, config.pooling, config.seed)
    model = select_trainable(model, config.trainable, config.lora, config.prefix, config.head)
    model.load_state_dict(state["model"])
    summary_path = checkpoint.parent / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    same = summary.get("selected_step") == state["step"]  # the run's figures are of this checkpoint's weights
    results = dict(
        metric=summary.get("metric", "accuracy"),
        steps=state["step"],
        selected_step=state["step"],
        dev=summary.get("dev") if same else None,
        test=summary.get("test") if same else None,
    )
    return export(model, tokenizer, config, out, results)


def _save_mean_pooled(model: MeanPooledClassifier, folder: Path) -> None:
    """Writes ``model`` into ``folder`` as its body (``save_pretrained``) and its linear head in
    ``score.safetensors``, since transformers has no mean-pooling head."""
    from safetensors.torch import save_file

    model.body.save_pretrained(folder, safe_serialization=True)
    save_file(
        {name: value.detach().contiguous() for name, value in model.score.state_dict().items()}, folder / "score.safetensors"
    )


def _is_peft(model: nn.Module) -> bool:
    return hasattr(model, "peft_config")


def model_card(config: TrainConfig, results: dict, contents: str, merged: bool = False) -> str:
    """A folder's ``README.md``: YAML front matter (library, base model, tags), a table of the run (base model,
    task, trainable parameters, optimizer, steps, dev and test metrics, seed) and how to load the folder.

    Args:
        config: the run's config.
        results: the figures, as for :func:`export`; a missing ``dev`` or ``test`` shows as n/a.
        contents: what the folder holds, in words (``This folder holds {contents}``).
        merged: the folder holds a LoRA run's adapter merged into the base model (``merged/``): a plain
            transformers model, which loads without peft.
    """

    def pct(value):
        return "n/a" if value is None else f"{100 * value:.1f}%"

    metric = results.get("metric", "accuracy")
    adapter = config.trainable == "lora" and not merged  # peft loads the adapter; the merged model needs no peft
    lines = [
        "---",
        "library_name: peft" if adapter else "library_name: transformers",
        f"base_model: {config.model}",
        "tags: [zotune, zeroth-order]",
        "---",
        "",
        f"# {config.model} fine-tuned on {config.task} with {config.optimizer}",
        "",
        f"This folder holds {contents}, written by zotune.",
        "",
        "| | |",
        "|---|---|",
        f"| base model | {config.model} ({config.dtype}) |",
        f"| task | {config.task} (head: {config.head}{', pooling: ' + config.pooling if config.head == 'classifier' else ''}) |",
        f"| trainable | {config.trainable}{' (merged into the base weights)' if merged else ''} |",
        f"| optimizer | {config.optimizer}, lr {config.lr:g}, schedule {config.lr_schedule}, options {config.optimizer_options or '{}'} |",
        f"| steps | {results.get('steps')} of batch {config.batch_size} (weights of step {results.get('selected_step')}, select: {config.select}) |",
        f"| dev {metric} | {pct(results.get('dev'))} |",
        f"| test {metric} | {pct(results.get('test'))} |",
        f"| seed | {config.seed} |",
        "",
    ]
    if config.head == "classifier" and config.pooling == "mean" and adapter:
        lines += [
            "A PEFT adapter of zotune's mean-pooled classifier (`zotune.pooling.MeanPooledClassifier`), which "
            "transformers cannot rebuild alone: score it with `zotune eval --checkpoint`"
            + (
                ", or load the merged model in `merged/`, which needs no zotune."
                if config.merge
                else ", or train with merge: true."
            ),
            "",
        ]
    elif config.head == "classifier" and config.pooling == "mean":
        lines += [
            "Load the body with `AutoModel.from_pretrained(folder)`, average its last hidden states over the "
            "non-padding tokens, and apply the linear layer in `score.safetensors` (`weight`, `bias`).",
            "",
        ]
    elif adapter:
        lines += [
            "Load with `PeftModel.from_pretrained(base_model, folder)`"
            + (", or the merged model in `merged/` with `from_pretrained`." if config.merge else "."),
            "",
        ]
    else:
        kind = {"lm": "AutoModelForCausalLM", "classifier": "AutoModelForSequenceClassification", "mlm": "AutoModelForMaskedLM"}[
            config.head
        ]
        lines += [f"Load with `{kind}.from_pretrained(folder)` and `AutoTokenizer.from_pretrained(folder)`.", ""]
    return "\n".join(lines)
