"""A classification head on the mean of a model's hidden states, for encoders trained with mean pooling."""

from __future__ import annotations

import torch
from torch import nn


class MeanPooledClassifier(nn.Module):
    """A model body whose last hidden states, averaged over the non-padding tokens, feed a new linear layer
    ``score`` (initialised as transformers initialises its classification heads: normal with the config's
    ``initializer_range``, zero bias). Sentence encoders such as all-MiniLM-L6-v2 were trained to be read
    this way, not through BERT's [CLS] pooler."""

    def __init__(self, body: nn.Module, labels: int) -> None:
        super().__init__()
        self.body, self.config = body, body.config
        self.config.num_labels = labels
        parameter = next(body.parameters())
        self.score = nn.Linear(self.config.hidden_size, labels, device=parameter.device, dtype=parameter.dtype)
        nn.init.normal_(self.score.weight, std=getattr(self.config, "initializer_range", 0.02))
        nn.init.zeros_(self.score.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **_):
        """The labels' logits (``.logits`` of a ``SequenceClassifierOutput``) from the mean of the last hidden
        states over the tokens ``attention_mask`` keeps (None: every token); other keyword arguments are
        ignored."""
        from transformers.modeling_outputs import SequenceClassifierOutput

        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.body(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        weights = attention_mask[..., None].to(hidden.dtype)
        pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)
        return SequenceClassifierOutput(logits=self.score(pooled))
