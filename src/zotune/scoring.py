"""Candidate scoring as in MeZO: the mean log-probability of each candidate's tokens after the prompt.

Prediction is the argmax over candidates; the training loss is the cross-entropy over the candidates'
scores (:func:`classification_loss`) or the language-model loss on the correct candidate alone
(:func:`answer_loss`). Examples may have different numbers of candidates: each is scored over its own.
Logits are computed only at the positions that predict candidate tokens: the model body runs on
the whole sequence, the output head (vocabulary-sized) only on the gathered hidden states, which for a
135M model with a 49k vocabulary is ~20x less head work than full-sequence logits.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .errors import ZotuneError
from .packing import pack, takes_block_mask
from .tasks import Example


class EncodingError(ZotuneError, ValueError):
    """An example that cannot be encoded for scoring (a candidate that is empty or too long); the message says
    which and what to change."""


@dataclass(frozen=True)
class EncodedExample:
    """Token ids of prompt+candidate for each candidate, and how many trailing ids are the candidate; for a
    generation example, its gold answers (F1 is taken against each). The ``classifier`` and ``mlm`` heads
    (:mod:`zotune.heads`) encode one sequence per example; ``mlm`` adds the candidates' token ids
    (``targets``) and where its mask is."""

    sequences: tuple[tuple[int, ...], ...]
    candidate_lengths: tuple[int, ...]
    label: int
    truncated: bool
    answers: tuple[str, ...] = ()
    targets: tuple[int, ...] = ()
    mask_position: int = -1


def encode(tokenizer, example: Example, max_length: int) -> EncodedExample:
    """Tokenize prompt and candidates separately (so each candidate keeps its own tokens) and cut the prompt
    from the left when prompt+candidate would exceed ``max_length``."""
    prompt = tokenizer(example.prompt, add_special_tokens=False)["input_ids"]
    if tokenizer.bos_token_id is not None and getattr(tokenizer, "add_bos_token", False):
        prompt = [tokenizer.bos_token_id, *prompt]
    sequences, lengths, truncated = [], [], False
    for candidate in example.candidates:
        ids = tokenizer(candidate, add_special_tokens=False)["input_ids"]
        if not ids:
            raise EncodingError(f"candidate {candidate!r} tokenizes to nothing: give every candidate some text")
        keep = max_length - len(ids)
        if keep < 1:
            raise EncodingError(
                f"candidate {candidate!r} has {len(ids)} tokens, more than max_length={max_length}: raise max_length"
            )
        truncated |= len(prompt) > keep
        sequences.append(tuple(prompt[-keep:] + ids))
        lengths.append(len(ids))
    return EncodedExample(tuple(sequences), tuple(lengths), example.label, truncated, example.answers)


def candidate_scores(model: nn.Module, examples: Sequence[EncodedExample], pad_id: int) -> torch.Tensor:
    """[len(examples), most candidates] mean log-probabilities of each candidate's tokens; an example with
    fewer candidates than the widest is padded with −inf, which softmax, cross-entropy and argmax ignore.
    Each prompt runs once for all its candidates (:mod:`zotune.packing`)."""
    device = next(model.parameters()).device
    packed = pack(examples, pad_id, takes_block_mask(model))
    inputs = {"input_ids": packed.input_ids.to(device), "attention_mask": packed.attention_mask.to(device)}
    if packed.position_ids is not None:
        inputs["position_ids"] = packed.position_ids.to(device)
        if model.config._attn_implementation == "eager":  # eager attention adds the mask to its scores
            dtype = model.get_output_embeddings().weight.dtype
            inputs["attention_mask"] = torch.zeros(inputs["attention_mask"].shape, dtype=dtype, device=device).masked_fill(
                ~inputs["attention_mask"], torch.finfo(dtype).min
            )
    rows, positions = torch.tensor(packed.reads, device=device).T
    with gathered(model):
        hidden = model.get_decoder()(**inputs).last_hidden_state
        log_probs = torch.log_softmax(model.get_output_embeddings()(hidden[rows, positions]).float(), dim=-1)
    token_scores = log_probs.gather(1, torch.tensor(packed.targets, device=device)[:, None])[:, 0]
    return candidate_means(examples, torch.tensor(packed.owners, device=device), token_scores)


def separate_candidate_scores(model: nn.Module, examples: Sequence[EncodedExample], pad_id: int) -> torch.Tensor:
    """:func:`candidate_scores` with every candidate its own sequence, its prompt run once per candidate (the
    scoring of MeZO's code, with logits at the candidates' positions only): the reference the benchmark and
    the tests compare the packed scorer with."""
    device = next(model.parameters()).device
    input_ids, attention, (rows, positions, targets) = one_row_per_candidate(examples, pad_id, device)
    with gathered(model):
        hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention).last_hidden_state
        log_probs = torch.log_softmax(model.get_output_embeddings()(hidden[rows, positions]).float(), dim=-1)
    return candidate_means(examples, rows, log_probs.gather(1, targets[:, None])[:, 0])


def one_row_per_candidate(examples: Sequence[EncodedExample], pad_id: int, device):
    """Every candidate its own sequence (prompt + candidate), padded: input ids, attention mask, and for each
    candidate token its row (the candidate's index), the position that predicts it and the token."""
    sequences = [seq for example in examples for seq in example.sequences]
    lengths = [n for example in examples for n in example.candidate_lengths]
    input_ids, attention = padded_batch(sequences, pad_id, device)
    reads = [
        (r, t - 1, seq[t])
        for r, (seq, n) in enumerate(zip(sequences, lengths))  # state at t-1 predicts t
        for t in range(len(seq) - n, len(seq))
    ]
    return input_ids, attention, torch.tensor(reads, device=device).T


def candidate_means(examples: Sequence[EncodedExample], owners: torch.Tensor, token_scores: torch.Tensor):
    """Each candidate's mean token score (``owners``: the candidate of each token score, counted example by
    example), laid out [examples, most candidates] with −inf where an example has fewer."""
    device = token_scores.device
    counts = torch.tensor([n for example in examples for n in example.candidate_lengths], device=device, dtype=token_scores.dtype)
    sums = torch.zeros(len(counts), device=device, dtype=token_scores.dtype).index_add(0, owners, token_scores)
    widths = [len(example.sequences) for example in examples]
    owner = torch.repeat_interleave(torch.arange(len(examples)), torch.tensor(widths)).to(device)
    slot = torch.tensor([slot for width in widths for slot in range(width)], device=device)
    padded = torch.full((len(examples), max(widths)), -math.inf, device=device, dtype=sums.dtype)
    return padded.index_put((owner, slot), sums / counts)


def padded_batch(sequences: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Input ids [len(sequences), longest] padded on the right with ``pad_id``, and the attention mask."""
    longest = max(len(seq) for seq in sequences)
    input_ids = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
    attention = torch.zeros((len(sequences), longest), dtype=torch.long)
    for r, seq in enumerate(sequences):
        input_ids[r, : len(seq)] = torch.tensor(seq)
        attention[r, : len(seq)] = 1
    return input_ids.to(device), attention.to(device)


@contextmanager
def gathered(model: nn.Module):
    """FSDP2 gathers a module's parameters in its forward hooks, but scoring calls the body and the head
    directly, never the model's own forward: gather the parameters the model itself holds (embeddings,
    final norm, head) around them. The layers are gathered by their own hooks inside the body."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(model, FSDPModule):
        yield
        return
    model.unshard()
    try:
        yield
    finally:
        model.reshard()


def classification_loss(
    model: nn.Module, examples: Sequence[EncodedExample], pad_id: int, copies: int = 1, scorer: Callable = candidate_scores
) -> torch.Tensor:
    """Cross-entropy over the candidates' scores (MeZO's train_as_classification). With ``copies`` > 1 the
    examples are scored stacked that many times in one forward, and the result holds each copy's mean loss
    (the protocol of MeZO's ``dual_forward``). ``scorer``: the head's (:mod:`zotune.heads`)."""
    if copies == 1:
        scores = scorer(model, examples, pad_id)
        labels = torch.tensor([example.label for example in examples], device=scores.device)
        return torch.nn.functional.cross_entropy(scores, labels)
    scores = scorer(model, list(examples) * copies, pad_id)
    labels = torch.tensor([example.label for example in examples] * copies, device=scores.device)
    return torch.nn.functional.cross_entropy(scores, labels, reduction="none").view(copies, -1).mean(dim=1)


def by_length(examples: Sequence[EncodedExample]) -> list[int]:
    """The examples' indices from the shortest to the longest, so that batches cut in this order hold little
    padding (evaluation, MeZO-SVRG's large batches)."""
    return sorted(range(len(examples)), key=lambda i: max(map(len, examples[i].sequences)))


@torch.inference_mode()
def accuracy(
    model: nn.Module, examples: Sequence[EncodedExample], pad_id: int, batch_size: int = 16, scorer: Callable = candidate_scores
) -> float:
    """Fraction of examples whose highest-scoring candidate is the labelled one (scored in eval mode, in batches
    of similar lengths)."""
    training = model.training
    model.eval()
    correct = 0
    order = by_length(examples)
    for start in range(0, len(examples), batch_size):
        chunk = [examples[i] for i in order[start : start + batch_size]]
        predictions = scorer(model, chunk, pad_id).argmax(dim=1).tolist()
        correct += sum(p == example.label for p, example in zip(predictions, chunk))
    model.train(training)
    return correct / len(examples)


def answer_loss(
    model: nn.Module, examples: Sequence[EncodedExample], pad_id: int, copies: int = 1, scorer: Callable = candidate_scores
) -> torch.Tensor:
    """Language-model loss on the correct candidate's tokens only (the prompt is context; the other candidates
    are not run): minus the mean, over the batch, of each correct answer's mean token log-probability. MeZO
    trains generation tasks, COPA and ReCoRD this way. ``copies``, ``scorer``: as in :func:`classification_loss`."""
    answers = [_correct_only(example) for example in examples]
    if copies == 1:
        return -scorer(model, answers, pad_id).mean()
    return -scorer(model, answers * copies, pad_id).view(copies, -1).mean(dim=1)


def _correct_only(example: EncodedExample) -> EncodedExample:
    label = example.label
    return EncodedExample((example.sequences[label],), (example.candidate_lengths[label],), 0, example.truncated, example.answers)


def negated_accuracy(
    model: nn.Module, examples: Sequence[EncodedExample], pad_id: int, copies: int = 1, scorer: Callable = candidate_scores
) -> torch.Tensor:
    """Minus the batch's accuracy: a training objective for zeroth-order optimizers, which need loss values
    only (the MeZO paper trains on accuracy directly). ``copies``, ``scorer``: as in :func:`classification_loss`."""
    scores = scorer(model, list(examples) * copies, pad_id)
    labels = torch.tensor([example.label for example in examples] * copies, device=scores.device)
    correct = (scores.argmax(dim=1) == labels).to(scores.dtype).view(copies, -1).mean(dim=1)
    return -correct[0] if copies == 1 else -correct


def normalize_answer(text: str) -> list[str]:
    """SQuAD's normalization: lower case, no punctuation, no articles, single spaces; as tokens."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return [token for token in text.split() if token not in ("a", "an", "the")]


_PUNCTUATION = set("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")


def f1(prediction: str, answers: Sequence[str]) -> float:
    """Token-overlap F1 of a prediction against the best-matching gold answer (SQuAD's metric)."""
    best = 0.0
    predicted = normalize_answer(prediction)
    for answer in answers:
        gold = normalize_answer(answer)
        common = sum(min(predicted.count(t), gold.count(t)) for t in set(predicted))
        if not predicted or not gold:
            score = float(predicted == gold)
        elif common == 0:
            score = 0.0
        else:
            precision, recall = common / len(predicted), common / len(gold)
            score = 2 * precision * recall / (precision + recall)
        best = max(best, score)
    return best


@torch.inference_mode()
def greedy_answers(
    model: nn.Module, tokenizer, examples: Sequence[EncodedExample], max_new_tokens: int = 50, batch_size: int = 16
) -> list[str]:
    """Greedy continuations of each prompt (left-padded batches of similar lengths), cut at the first newline,
    in the examples' order."""
    training = model.training
    model.eval()
    device = next(model.parameters()).device
    order = by_length(examples)
    prompts = [examples[i].sequences[0][: len(examples[i].sequences[0]) - examples[i].candidate_lengths[0]] for i in order]
    outputs = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        longest = max(map(len, chunk))
        input_ids = torch.full((len(chunk), longest), tokenizer.pad_token_id, dtype=torch.long)
        attention = torch.zeros_like(input_ids)
        for row, prompt in enumerate(chunk):
            input_ids[row, longest - len(prompt) :] = torch.tensor(prompt)
            attention[row, longest - len(prompt) :] = 1
        generated = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
        for row in generated[:, longest:]:
            outputs.append(tokenizer.decode(row, skip_special_tokens=True).strip().split("\n")[0].strip())
    model.train(training)
    answers = [""] * len(examples)
    for index, output in zip(order, outputs):
        answers[index] = output
    return answers


def mean_f1(
    model: nn.Module, tokenizer, examples: Sequence[EncodedExample], batch_size: int = 16, max_new_tokens: int = 50
) -> float:
    """The mean F1 of greedy answers against each example's gold answers (SQuAD's metric)."""
    predictions = greedy_answers(model, tokenizer, examples, max_new_tokens, batch_size)
    return sum(f1(p, example.answers) for p, example in zip(predictions, examples)) / len(examples)
