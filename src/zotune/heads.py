"""The heads a task is trained through, each an encoding of an example and a scorer of encoded examples.

- ``lm`` (MeZO's large-model setting): the prompt followed by each candidate, scored by the candidate's
  mean token log-probability (:func:`zotune.scoring.candidate_scores`).
- ``classifier`` (MeZO-SVRG's setting): the example's text fields as given, no template, into a
  sequence-classification model whose logits are the scores, one per label.
- ``mlm`` (MeZO's RoBERTa setting, from LM-BFF): a template with the model's mask token where the answer
  goes, scored by the log-probability of each candidate's single token at the mask.

Every scorer returns ``[len(examples), labels]``, so the losses, the metric, the dual forward and data
parallel runs treat the heads alike.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .errors import ZotuneError
from .scoring import EncodedExample, candidate_scores, encode, gathered, padded_batch
from .tasks import Example


class HeadError(ZotuneError, ValueError):
    """A task, tokenizer or model that a head cannot work with; the message says which head would."""


def encode_fields(tokenizer, example: Example, max_length: int) -> EncodedExample:
    """The text fields as one sequence with the tokenizer's special tokens: an encoder's pair encoding
    ([CLS] a [SEP] b [SEP], further fields joined to the second) or, for a tokenizer without a separator
    (decoders), the fields joined by newlines. Cut at the end to ``max_length`` tokens."""
    if not example.texts:
        raise HeadError(
            "head=classifier needs an example's text fields, which this task does not give (its candidates "
            "differ per example): use head=lm"
        )
    texts = (example.texts[0], " ".join(example.texts[1:])) if len(example.texts) > 1 else example.texts[:1]
    if tokenizer.sep_token_id is None:
        texts = ("\n".join(example.texts),)
    full = tokenizer(*texts)["input_ids"]
    ids = tokenizer(*texts, truncation=True, max_length=max_length)["input_ids"] if len(full) > max_length else full
    return EncodedExample((tuple(ids),), (0,), example.label, len(full) > max_length)


def encode_masked(tokenizer, example: Example, max_length: int) -> EncodedExample:
    """[CLS] before [MASK] after [SEP] (the special tokens the tokenizer has), ``before`` cut from the left
    to fit ``max_length``; each candidate must be one token (with a leading space, as LM-BFF's label words)."""
    if tokenizer.mask_token_id is None:
        raise HeadError(
            "head=mlm needs a tokenizer with a mask token (a masked LM such as BERT or RoBERTa); this one "
            "has none: use head=lm or head=classifier"
        )
    if example.masked is None:
        raise HeadError("head=mlm needs a template with a mask, which this task does not give: use head=lm")
    targets = []
    for candidate in example.candidates:
        ids = tokenizer(" " + candidate.strip(), add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise HeadError(
                f"head=mlm scores one token per candidate, but {candidate.strip()!r} is {len(ids)} tokens "
                "for this tokenizer: choose single-token candidates (task_options.verbalizer) or use head=lm"
            )
        targets.append(ids[0])
    before = tokenizer(example.masked[0], add_special_tokens=False)["input_ids"]
    after = tokenizer(example.masked[1], add_special_tokens=False)["input_ids"]
    start = [tokenizer.cls_token_id] if tokenizer.cls_token_id is not None else []
    end = [tokenizer.sep_token_id] if tokenizer.sep_token_id is not None else []
    keep = max_length - len(start) - 1 - len(after) - len(end)
    if keep < 0:
        raise HeadError(f"head=mlm: the text after the mask is {len(after)} tokens, too long for max_length={max_length}")
    kept = before[len(before) - keep :]
    sequence = (*start, *kept, tokenizer.mask_token_id, *after, *end)
    return EncodedExample(
        (sequence,), (0,), example.label, len(before) > keep, targets=tuple(targets), mask_position=len(start) + len(kept)
    )


def label_logits(model: nn.Module, examples: Sequence[EncodedExample], pad_id: int) -> torch.Tensor:
    """[len(examples), labels] logits of a sequence-classification model (in fp32)."""
    input_ids, attention = padded_batch([example.sequences[0] for example in examples], pad_id, next(model.parameters()).device)
    return model(input_ids=input_ids, attention_mask=attention).logits.float()


def mask_scores(model: nn.Module, examples: Sequence[EncodedExample], pad_id: int) -> torch.Tensor:
    """[len(examples), most candidates] log-probabilities of each candidate's token at the mask; the
    vocabulary head runs at the mask positions only where the model's head is one of the known kinds."""
    device = next(model.parameters()).device
    input_ids, attention = padded_batch([example.sequences[0] for example in examples], pad_id, device)
    rows = torch.arange(len(examples), device=device)
    positions = torch.tensor([example.mask_position for example in examples], device=device)
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft keeps the head inside
    head = _vocabulary_head(inner)
    with gathered(model):
        if head is None:
            logits = inner(input_ids=input_ids, attention_mask=attention).logits[rows, positions]
        else:
            hidden = inner.base_model(input_ids=input_ids, attention_mask=attention).last_hidden_state
            logits = head(hidden[rows, positions])
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    width = max(len(example.targets) for example in examples)
    targets = torch.tensor([[*e.targets, *[0] * (width - len(e.targets))] for e in examples], device=device)
    present = torch.tensor([[slot < len(e.targets) for slot in range(width)] for e in examples], device=device)
    return log_probs.gather(1, targets).masked_fill(~present, -math.inf)


def _vocabulary_head(model: nn.Module) -> Callable | None:
    """The module mapping a masked LM's hidden states to vocabulary logits (BERT's ``cls``, RoBERTa's
    ``lm_head``, DistilBERT's four parts), or None for other models, which then run their whole forward."""
    for name in ("cls", "lm_head"):
        if isinstance(getattr(model, name, None), nn.Module):
            return getattr(model, name)
    if hasattr(model, "vocab_projector"):
        return lambda h: model.vocab_projector(model.vocab_layer_norm(model.activation(model.vocab_transform(h))))
    return None


@dataclass(frozen=True)
class Head:
    """How a task's examples are encoded for a head, and how encoded examples are scored."""

    name: str
    encode: Callable  # (tokenizer, Example, max_length) -> EncodedExample
    scores: Callable  # (model, examples, pad_id) -> [len(examples), labels] tensor


HEADS = {
    "lm": Head("lm", encode, candidate_scores),
    "classifier": Head("classifier", encode_fields, label_logits),
    "mlm": Head("mlm", encode_masked, mask_scores),
}
POOLINGS = ("cls", "mean")
