"""Candidates packed behind their shared prompt score as they do one sequence per candidate."""

from types import SimpleNamespace

import pytest
import torch

from zotune.estimators import TwoPointEstimator
from zotune.directions import DirectionEngine
from zotune.models import PrefixTunedLM
from zotune.packing import pack, packing_note, takes_block_mask
from zotune.scoring import EncodedExample, accuracy, candidate_scores, classification_loss, separate_candidate_scores

SIZE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
CAUSAL = {  # name: config of a tiny random causal LM, vocabulary of 100
    "llama": lambda hf: hf.LlamaConfig(vocab_size=100, num_key_value_heads=2, **SIZE),
    "opt": lambda hf: hf.OPTConfig(
        vocab_size=100, ffn_dim=64, word_embed_proj_dim=32, hidden_size=32, num_hidden_layers=2, num_attention_heads=4
    ),
    "gpt2": lambda hf: hf.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4),
    "qwen2": lambda hf: hf.Qwen2Config(vocab_size=100, num_key_value_heads=2, **SIZE),
    "mistral": lambda hf: hf.MistralConfig(vocab_size=100, num_key_value_heads=2, **SIZE),
    "gemma": lambda hf: hf.GemmaConfig(vocab_size=100, num_key_value_heads=2, head_dim=8, **SIZE),
    "phi": lambda hf: hf.PhiConfig(vocab_size=100, **SIZE),  # not in BLOCK_MASK_MODELS: one row per candidate
    "gpt-neox": lambda hf: hf.GPTNeoXConfig(vocab_size=100, **SIZE),
}
PAD = 0


def causal_model(name, attention="sdpa", dtype=torch.float64):
    import transformers

    config = CAUSAL[name](transformers)
    config._attn_implementation = attention
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).to(dtype).eval()


def example(prompt, candidates, label, cut_to=None):
    """An encoded example; ``cut_to``: the longest sequence allowed, the prompt cut from the left per candidate as
    :func:`zotune.scoring.encode` cuts it (so candidates of different lengths see different prompts)."""
    sequences = []
    for candidate in candidates:
        keep = len(prompt) if cut_to is None else min(len(prompt), cut_to - len(candidate))
        sequences.append(tuple(prompt[len(prompt) - keep :]) + tuple(candidate))
    return EncodedExample(tuple(sequences), tuple(map(len, candidates)), label, cut_to is not None)


def mixed_examples():
    """Mixed candidate counts (2 to 4) and lengths (1 to 4 tokens), prompts of different lengths, and prompts cut
    differently for different candidates."""
    g = torch.Generator().manual_seed(5)

    def ids(n):
        return torch.randint(3, 100, (n,), generator=g).tolist()

    return [
        example(ids(7), [ids(1), ids(1)], 1),  # single-token candidates only: one row, no block mask
        example(ids(11), [ids(3), ids(1), ids(2)], 0),
        example(ids(5), [ids(2), ids(4), ids(2), ids(1)], 3),
        example(ids(13), [ids(4)], 0),  # one candidate: answer_loss's case
        example(ids(20), [ids(1), ids(3), ids(3)], 2, cut_to=16),  # prompts cut to 15 and 13 tokens
    ]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("name", list(CAUSAL))
def test_packed_scores_equal_one_sequence_per_candidate(name, attention):
    model = causal_model(name, attention)
    examples = mixed_examples()
    with torch.no_grad():
        packed, separate = candidate_scores(model, examples, PAD), separate_candidate_scores(model, examples, PAD)
    torch.testing.assert_close(packed, separate, rtol=0, atol=1e-10)
    assert torch.isinf(packed[3, 1:]).all() and torch.isfinite(packed[[0, 1, 2, 4], :2]).all()


def test_the_tested_architectures_share_one_row_per_prompt_and_the_others_one_per_long_candidate():
    examples = mixed_examples()
    assert takes_block_mask(causal_model("llama")) and not takes_block_mask(causal_model("phi"))
    assert not takes_block_mask(
        SimpleNamespace(config=SimpleNamespace(model_type="llama", _attn_implementation="flash_attention_2"))
    )
    shared = pack(examples, PAD, block_mask=True)
    assert shared.input_ids.shape[0] == 6  # one row per distinct prompt: example 4 has two
    assert shared.attention_mask.dim() == 4 and shared.position_ids is not None
    separate = pack(examples, PAD, block_mask=False)
    assert separate.input_ids.shape[0] == 1 + 2 + 3 + 1 + (1 + 2)  # single-token candidates ride on their prompt's row
    assert separate.attention_mask.dim() == 2 and separate.position_ids is None
    single = pack(examples[:1], PAD, block_mask=True)
    assert single.input_ids.shape == (1, 7) and single.attention_mask.dim() == 2


@pytest.mark.parametrize("name", ["llama", "gpt2", "opt"])
def test_the_training_loss_and_its_gradient_equal_one_sequence_per_candidate(name):
    examples = mixed_examples()
    grads = []
    for scorer in (candidate_scores, separate_candidate_scores):
        model = causal_model(name)
        loss = classification_loss(model, examples, PAD, scorer=scorer)
        loss.backward()
        grads.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=0, atol=1e-10)
    assert grads[0][1].keys() == grads[1][1].keys()
    for key in grads[0][1]:
        torch.testing.assert_close(grads[0][1][key], grads[1][1][key], rtol=0, atol=1e-10, msg=key)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_the_dual_forward_of_packed_rows_equals_module_mode(name):
    model = causal_model(name)
    examples = mixed_examples()
    engine = DirectionEngine([p for p in model.parameters() if p.requires_grad])

    def closure(copies=1):
        return classification_loss(model, examples, PAD, copies)

    def reference(copies=1):
        return classification_loss(model, examples, PAD, copies, scorer=separate_candidate_scores)

    separate = TwoPointEstimator(engine, 1e-3, model).estimate(reference, 3, 0)
    dual = TwoPointEstimator(engine, 1e-3, model, dual_forward=True).estimate(closure, 3, 0)
    assert separate.loss_plus != separate.loss_minus
    # the scores are log-softmaxed in float32, so the losses agree to float32 rounding
    assert dual.loss_plus == pytest.approx(separate.loss_plus, rel=0, abs=1e-6)
    assert dual.loss_minus == pytest.approx(separate.loss_minus, rel=0, abs=1e-6)


def test_a_prefix_tuned_model_scores_packed_rows_as_separate_ones():
    model = PrefixTunedLM(causal_model("llama"), tokens=3, seed=0).double()
    examples = mixed_examples()
    with torch.no_grad():
        torch.testing.assert_close(
            candidate_scores(model, examples, PAD), separate_candidate_scores(model, examples, PAD), rtol=0, atol=1e-10
        )


def test_evaluation_in_low_precision_predicts_as_separate_sequences():
    model = causal_model("llama", dtype=torch.bfloat16)
    examples = mixed_examples() * 3
    assert accuracy(model, examples, PAD, batch_size=4) == accuracy(
        model, examples, PAD, batch_size=4, scorer=separate_candidate_scores
    )


def test_an_empty_prompt_is_a_clear_error():
    with pytest.raises(ValueError, match="no prompt before it"):
        pack([EncodedExample(((5, 6),), (2,), 0, False)], PAD, block_mask=True)


def test_the_log_says_once_when_a_model_runs_long_candidates_one_row_each():
    examples = mixed_examples()
    assert packing_note(causal_model("llama"), examples) is None
    assert "phi models are not known to take a block-causal" in packing_note(causal_model("phi"), examples)
    assert packing_note(causal_model("phi"), examples[:1]) is None  # single-token candidates share a row anyway


@pytest.mark.parametrize("name", ["llama", "opt", "gpt2", "qwen2", "mistral", "gemma"])
def test_scores_from_a_kv_cache_of_the_prompts_equal_one_sequence_per_candidate(name):
    """The scheme bench speed --task times beside packing (zotune.cached_scoring)."""
    from zotune.cached_scoring import cached_candidate_scores

    model = causal_model(name)
    examples = mixed_examples()
    with torch.no_grad():
        cached, separate = cached_candidate_scores(model, examples, PAD), separate_candidate_scores(model, examples, PAD)
    torch.testing.assert_close(cached, separate, rtol=0, atol=1e-10)
