import pytest
import torch

from zotune.models import load_model
from zotune.scoring import accuracy, answer_loss, candidate_scores, classification_loss, encode, negated_accuracy
from zotune.tasks import Example


@pytest.fixture(scope="module")
def model_and_tokenizer():
    model, tokenizer = load_model("random:tiny")
    return model.eval(), tokenizer


EXAMPLES = [
    Example("The film was", (" bad", " good"), 1),
    Example("A long prompt that goes on and on, it was", (" awful", " wonderful!"), 0),
    Example("Yes or no?\n", ("Yes", "No"), 1),
]


def naive_scores(model, encoded):
    """Each sequence alone, logits over the whole sequence and vocabulary."""
    scores = []
    for example in encoded:
        row = []
        for sequence, n in zip(example.sequences, example.candidate_lengths):
            log_probs = torch.log_softmax(model(input_ids=torch.tensor([sequence])).logits[0], dim=-1)
            row.append(sum(log_probs[t - 1, sequence[t]] for t in range(len(sequence) - n, len(sequence))) / n)
        scores.append(row)
    return torch.tensor(scores)


def test_batched_position_only_scores_match_naive_full_logits(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    encoded = [encode(tokenizer, e, 64) for e in EXAMPLES]
    with torch.no_grad():
        torch.testing.assert_close(
            candidate_scores(model, encoded, tokenizer.pad_token_id), naive_scores(model, encoded), rtol=1e-5, atol=1e-5
        )


def test_loss_is_cross_entropy_over_candidate_scores_and_accuracy_is_argmax(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    encoded = [encode(tokenizer, e, 64) for e in EXAMPLES]
    with torch.no_grad():
        scores = naive_scores(model, encoded)
        expected = torch.nn.functional.cross_entropy(scores, torch.tensor([1, 0, 1]))
        torch.testing.assert_close(classification_loss(model, encoded, tokenizer.pad_token_id), expected, rtol=1e-5, atol=1e-5)
    predicted = scores.argmax(1).tolist()
    assert (
        accuracy(model, encoded, tokenizer.pad_token_id, batch_size=2)
        == sum(p == label for p, label in zip(predicted, [1, 0, 1])) / 3
    )


def test_stacked_copies_give_one_loss_per_copy(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    encoded = [encode(tokenizer, e, 64) for e in EXAMPLES]
    with torch.no_grad():
        for loss in (classification_loss, answer_loss):
            single = loss(model, encoded, tokenizer.pad_token_id)
            torch.testing.assert_close(
                loss(model, encoded, tokenizer.pad_token_id, copies=2), single.repeat(2), rtol=1e-6, atol=1e-6
            )


def test_long_prompts_are_cut_from_the_left(model_and_tokenizer):
    _, tokenizer = model_and_tokenizer
    encoded = encode(tokenizer, Example("x" * 100 + "END", (" a", " bc"), 0), max_length=10)
    assert encoded.truncated and all(len(s) == 10 for s in encoded.sequences)
    assert tokenizer.decode(encoded.sequences[1]).endswith("END bc")


def test_empty_candidate_is_a_clear_error(model_and_tokenizer):
    _, tokenizer = model_and_tokenizer
    with pytest.raises(ValueError, match="candidate '' tokenizes to nothing"):
        encode(tokenizer, Example("p", ("", " b"), 0), 10)


MIXED = [
    Example("Pick one:", (" a", " b"), 1),
    Example("Pick among four:", (" w", " x", " yy", " z"), 2),
    Example("Again, pick one:", (" c", " d"), 0),
]


def test_examples_with_different_numbers_of_candidates_are_each_scored_over_their_own(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    encoded = [encode(tokenizer, e, 64) for e in MIXED]
    pad = tokenizer.pad_token_id
    with torch.no_grad():
        scores = candidate_scores(model, encoded, pad)
        naive = [naive_scores(model, [example])[0] for example in encoded]
        assert scores.shape == (3, 4)
        for row, expected in zip(scores, naive):
            torch.testing.assert_close(row[: len(expected)], expected, rtol=1e-5, atol=1e-5)
            assert torch.isneginf(row[len(expected) :]).all()
        expected_loss = torch.stack(
            [torch.nn.functional.cross_entropy(row[None], torch.tensor([e.label])) for row, e in zip(naive, encoded)]
        ).mean()
        torch.testing.assert_close(classification_loss(model, encoded, pad), expected_loss, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(
            classification_loss(model, encoded, pad, copies=2), expected_loss.repeat(2), rtol=1e-5, atol=1e-5
        )
    predicted = [int(row.argmax()) for row in naive]
    assert accuracy(model, encoded, pad, batch_size=3) == sum(p == e.label for p, e in zip(predicted, encoded)) / 3


def test_mixed_candidate_counts_train_with_finite_gradients(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    encoded = [encode(tokenizer, e, 64) for e in MIXED]
    loss = classification_loss(model, encoded, tokenizer.pad_token_id)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model.zero_grad(set_to_none=True)


def test_answer_loss_scores_the_correct_candidate_only(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    encoded = [encode(tokenizer, e, 64) for e in MIXED]
    with torch.no_grad():
        expected = -torch.stack([naive_scores(model, [e])[0][e.label] for e in encoded]).mean()
        torch.testing.assert_close(answer_loss(model, encoded, tokenizer.pad_token_id), expected, rtol=1e-5, atol=1e-5)


def test_negated_accuracy_is_minus_the_batch_accuracy_per_copy(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    encoded = [encode(tokenizer, e, 64) for e in MIXED]
    with torch.no_grad():
        value = -accuracy(model, encoded, tokenizer.pad_token_id)
        assert negated_accuracy(model, encoded, tokenizer.pad_token_id).item() == pytest.approx(value)
        assert negated_accuracy(model, encoded, tokenizer.pad_token_id, copies=2).tolist() == pytest.approx([value] * 2)
