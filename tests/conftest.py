import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
import torch

from zotune.models import random_llama


@pytest.fixture
def tiny_llama():
    return random_llama("tiny", seed=0)


@pytest.fixture
def batch():
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, 64, (4, 12), generator=generator)


def lm_loss(model, input_ids, params=None):
    """Next-token cross-entropy in the model's own dtype (transformers' loss upcasts to float32, which would
    put float32 noise into float64 comparisons). ``params`` evaluates the model at other weights."""
    if params is None:
        logits = model(input_ids=input_ids).logits
    else:
        logits = torch.func.functional_call(model, params, (), {"input_ids": input_ids}).logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), input_ids[:, 1:].flatten())
