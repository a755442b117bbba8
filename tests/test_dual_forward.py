"""MeZO's dual forward: θ+εz and θ−εz evaluated in one forward over the batch stacked twice."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from conftest import lm_loss, loss_before_and_after
from zotune import MeZO
from zotune.directions import DirectionEngine
from zotune.errors import OptionError
from zotune.estimators import TwoPointEstimator, mean_over_micro_batches
from zotune.models import random_llama
from zotune.optim import AdaMeZO


class Nested(nn.Module):
    """The cases the dual forward treats apart: an embedding (rows only), a parameter owned by a module whose
    children own parameters too, linear layers with and without bias, and one whose weight is frozen."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(50, 8)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 8))
        self.hidden = nn.Linear(8, 8)
        self.frozen = nn.Linear(8, 8)
        self.frozen.weight.requires_grad_(False)
        self.head = nn.Linear(8, 3, bias=False)

    def forward(self, ids):
        x = self.embedding(ids).mean(dim=1) * self.scale
        return self.head(torch.tanh(self.frozen(torch.tanh(self.hidden(x)))))


def nested_loss(model, ids, targets, copies=1):
    losses = nn.functional.cross_entropy(model(ids.repeat(copies, 1)), targets.repeat(copies), reduction="none")
    return losses.mean() if copies == 1 else losses.view(copies, -1).mean(dim=1)


def nested_case():
    torch.manual_seed(0)
    model = Nested().double()
    generator = torch.Generator().manual_seed(1)
    ids, targets = torch.randint(0, 50, (6, 5), generator=generator), torch.randint(0, 3, (6,), generator=generator)
    return model, lambda copies=1: nested_loss(model, ids, targets, copies)


def llama_case(tie, batch):
    model = random_llama("tiny", dtype=torch.float64, seed=0, tie_embeddings=tie)
    return model, lambda copies=1: lm_loss(model, batch, copies=copies)


@pytest.mark.parametrize("case", ["llama-tied", "llama-untied", "nested"])
def test_dual_forward_gives_the_losses_of_two_separate_forwards(case, batch):
    model, closure = nested_case() if case == "nested" else llama_case(case == "llama-tied", batch)
    engine = DirectionEngine([p for p in model.parameters() if p.requires_grad])
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    for seed in (3, 4):
        separate = TwoPointEstimator(engine, 1e-3, model).estimate(closure, seed, 0)
        dual = TwoPointEstimator(engine, 1e-3, model, dual_forward=True).estimate(closure, seed, 0)
        assert separate.loss_plus != separate.loss_minus
        assert dual.loss_plus == pytest.approx(separate.loss_plus, rel=0, abs=1e-12)
        assert dual.loss_minus == pytest.approx(separate.loss_minus, rel=0, abs=1e-12)
    for name, param in model.named_parameters():  # nothing left perturbed, no forward left replaced
        assert torch.equal(param, before[name]), name
    assert all("forward" not in module.__dict__ for module in model.modules())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_zero_learning_rate_leaves_parameters_bit_identical(dtype, batch):
    model = random_llama("tiny", dtype=dtype, seed=3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = MeZO(model, lr=0.0, eps=1e-2, weight_decay=0.1, dual_forward=True)
    moved = []
    for _ in range(6):  # a bf16 loss is rounded to ~0.03, so some steps see no difference
        optimizer.step(lambda copies=1: lm_loss(model, batch, copies=copies))
        moved.append(optimizer.last_estimates[0].projected_gradient != 0)
    assert any(moved)
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]), name


def test_adamezo_takes_the_same_steps_with_a_dual_forward(batch):
    models = [random_llama("tiny", dtype=torch.float64, seed=0) for _ in range(2)]
    optimizers = [AdaMeZO(model, lr=1e-4, window=2, seed=5, dual_forward=dual) for model, dual in zip(models, (False, True))]
    for _ in range(4):  # through the warm-up and past it
        for model, optimizer in zip(models, optimizers):
            optimizer.step(lambda copies=1, model=model: lm_loss(model, batch, copies=copies))
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10, msg=name)
    untrained = random_llama("tiny", dtype=torch.float64, seed=0)
    assert any(not torch.equal(a, b) for a, b in zip(models[0].parameters(), untrained.parameters()))


def test_clear_errors(batch):
    model = random_llama("tiny", seed=0)
    with pytest.raises(OptionError, match="pass the model"):
        MeZO(model.parameters(), dual_forward=True)
    optimizer = MeZO(model, dual_forward=True)
    with pytest.raises(OptionError, match="closure that takes copies"):
        optimizer.step(lambda: lm_loss(model, batch))
    with pytest.raises(OptionError, match="returned 1 value"):
        optimizer.step(lambda copies=1: lm_loss(model, batch))
    with pytest.raises(OptionError, match="odd number"):
        optimizer.step(lambda copies=1: lm_loss(model, batch[:3]))
    assert all("forward" not in module.__dict__ for module in model.modules())
    assert optimizer.state["zo"]["step"] == 0


def test_gradient_accumulation_with_a_dual_forward_equals_full_batch(batch):
    models = [random_llama("tiny", dtype=torch.float64, seed=1) for _ in range(2)]
    full, accumulated = (MeZO(model, lr=1e-3, seed=5, dual_forward=True) for model in models)
    closure = mean_over_micro_batches(lambda b, copies=1: lm_loss(models[1], b, copies=copies), [batch[:2], batch[2:]])
    for _ in range(3):
        full.step(lambda copies=1: lm_loss(models[0], batch, copies=copies))
        accumulated.step(closure)
        assert accumulated.last_estimates[0].projected_gradient == pytest.approx(
            full.last_estimates[0].projected_gradient, rel=1e-6
        )
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10, msg=name)


def test_mezo_with_a_dual_forward_lowers_the_loss_of_a_tiny_model(batch):
    model = random_llama("tiny", seed=7)
    optimizer = MeZO(model, lr=3e-3, eps=1e-3, seed=0, dual_forward=True)
    initial, final = loss_before_and_after(model, optimizer, batch, steps=300)
    assert final < initial - 0.3, (initial, final)


SIZE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
ARCHITECTURES = {  # name: (config, model class); tiny random weights, vocabulary of 100
    "llama": lambda hf: (hf.LlamaConfig(vocab_size=100, num_key_value_heads=2, **SIZE), hf.AutoModelForCausalLM),
    "opt": lambda hf: (
        hf.OPTConfig(
            vocab_size=100, ffn_dim=64, word_embed_proj_dim=32, hidden_size=32, num_hidden_layers=2, num_attention_heads=4
        ),
        hf.AutoModelForCausalLM,
    ),
    "gpt2": lambda hf: (hf.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4), hf.AutoModelForCausalLM),
    "qwen2": lambda hf: (hf.Qwen2Config(vocab_size=100, num_key_value_heads=2, **SIZE), hf.AutoModelForCausalLM),
    "mistral": lambda hf: (hf.MistralConfig(vocab_size=100, num_key_value_heads=2, **SIZE), hf.AutoModelForCausalLM),
    "gemma": lambda hf: (hf.GemmaConfig(vocab_size=100, num_key_value_heads=2, head_dim=8, **SIZE), hf.AutoModelForCausalLM),
    "phi": lambda hf: (hf.PhiConfig(vocab_size=100, **SIZE), hf.AutoModelForCausalLM),
    "gpt-neox": lambda hf: (hf.GPTNeoXConfig(vocab_size=100, **SIZE), hf.AutoModelForCausalLM),
    "bloom": lambda hf: (hf.BloomConfig(vocab_size=100, hidden_size=32, n_layer=2, n_head=4), hf.AutoModelForCausalLM),
    "falcon": lambda hf: (
        hf.FalconConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4),
        hf.AutoModelForCausalLM,
    ),
    "gptj": lambda hf: (hf.GPTJConfig(vocab_size=100, n_embd=32, n_layer=2, n_head=4, rotary_dim=4), hf.AutoModelForCausalLM),
    "mixtral": lambda hf: (
        hf.MixtralConfig(
            vocab_size=100, num_key_value_heads=2, num_local_experts=4, experts_implementation="eager", **SIZE
        ),  # grouped GEMM: no fp64
        hf.AutoModelForCausalLM,
    ),
    "bert": lambda hf: (hf.BertConfig(vocab_size=100, **SIZE), hf.AutoModelForMaskedLM),
    "roberta": lambda hf: (hf.RobertaConfig(vocab_size=100, pad_token_id=1, **SIZE), hf.AutoModelForMaskedLM),
    "distilbert": lambda hf: (
        hf.DistilBertConfig(vocab_size=100, dim=32, n_layers=2, n_heads=4, hidden_dim=64),
        hf.AutoModelForMaskedLM,
    ),
    "bert-classifier": lambda hf: (hf.BertConfig(vocab_size=100, num_labels=3, **SIZE), hf.AutoModelForSequenceClassification),
}


def architecture_case(name):
    import transformers

    config, kind = ARCHITECTURES[name](transformers)
    torch.manual_seed(0)
    model = kind.from_config(config).double().eval()
    ids = torch.randint(3, 100, (4, 9), generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 2, 1, 1])

    def closure(copies=1):
        logits = model(input_ids=ids.repeat(copies, 1)).logits
        if name.endswith("classifier"):
            losses = [F.cross_entropy(part, labels) for part in logits.chunk(copies)]
        else:
            losses = [F.cross_entropy(part.flatten(0, 1), ids.flatten()) for part in logits.chunk(copies)]
        return losses[0] if copies == 1 else torch.stack(losses)

    return model, closure


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_the_dual_forward_equals_module_mode_on_every_architecture_it_accepts(name):
    """In float64 the two must agree to rounding: a module that sees a broadcast row (GPT-2's and BERT's
    position embeddings) runs once per half, and a tied parameter owned by a module and by one inside it
    (RoBERTa's head bias) is perturbed once."""
    model, closure = architecture_case(name)
    engine = DirectionEngine([p for p in model.parameters() if p.requires_grad])
    separate = TwoPointEstimator(engine, 1e-3, model).estimate(closure, 3, 0)
    dual = TwoPointEstimator(engine, 1e-3, model, dual_forward=True).estimate(closure, 3, 0)
    assert separate.loss_plus != separate.loss_minus
    assert dual.loss_plus == pytest.approx(separate.loss_plus, rel=0, abs=1e-12)
    assert dual.loss_minus == pytest.approx(separate.loss_minus, rel=0, abs=1e-12)


def test_the_dual_forward_refuses_t5s_batch_wide_position_bias():
    import transformers

    torch.manual_seed(0)
    model = (
        transformers.T5ForConditionalGeneration(
            transformers.T5Config(vocab_size=100, d_model=32, d_ff=64, num_layers=2, num_heads=4, d_kv=8)
        )
        .double()
        .eval()
    )
    ids = torch.randint(3, 100, (4, 8), generator=torch.Generator().manual_seed(0))
    engine = DirectionEngine(list(model.parameters()))

    def closure(copies=1):
        stacked = ids.repeat(copies, 1)
        logits = model(input_ids=stacked, decoder_input_ids=stacked).logits
        return torch.stack([F.cross_entropy(part.flatten(0, 1), ids.flatten()) for part in logits.chunk(copies)])

    with pytest.raises(OptionError, match="relative_attention_bias computes one position bias .*dual_forward=false"):
        TwoPointEstimator(engine, 1e-3, model, dual_forward=True).estimate(closure, 3, 0)
