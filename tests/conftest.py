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


def lm_loss(model, input_ids):
    return model(input_ids=input_ids, labels=input_ids).loss
