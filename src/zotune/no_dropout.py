"""Forwards without dropout when the optimizer holds parameters but not the modules they belong to.

A two-point estimate needs L(θ+εz) and L(θ−εz) of the same function: with dropout active the two forwards
draw different masks, and c = (L+ − L−)/2ε is mostly the difference of the masks. Given the model, the
estimator puts it in eval mode for its forwards. Given only parameters (in-place perturbation, FSDP2) it
cannot reach the modules, so it runs its forwards under :class:`NoDropout`, a torch function mode that
sees every torch call the forward makes:

- torch's dropout functions (``nn.Dropout`` and friends call them) return their input unchanged, and
  ``scaled_dot_product_attention`` runs with ``dropout_p = 0``: what eval mode would give;
- any other random draw (``torch.rand``, ``bernoulli``, ...) is refused, since no mode switch is known to
  make it deterministic.

A kernel that torch does not see (flash-attn's own dropout, a C extension) is beyond it: for such models,
pass the model or call ``model.eval()`` before the zeroth-order steps.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from .errors import OptionError

_DROPOUTS = {
    F.dropout,
    F.dropout1d,
    F.dropout2d,
    F.dropout3d,
    F.alpha_dropout,
    F.feature_alpha_dropout,
    torch.dropout,
    torch.alpha_dropout,
    torch.feature_dropout,
    torch.feature_alpha_dropout,
}
for _name in ("dropout_", "alpha_dropout_", "feature_dropout_", "feature_alpha_dropout_"):
    if hasattr(torch, _name):
        _DROPOUTS.add(getattr(torch, _name))
_RANDOM = {
    torch.rand,
    torch.rand_like,
    torch.randn,
    torch.randn_like,
    torch.randint,
    torch.randint_like,
    torch.randperm,
    torch.bernoulli,
    torch.multinomial,
    torch.normal,
    torch.poisson,
    torch.native_dropout,
    torch.Tensor.bernoulli,
    torch.Tensor.bernoulli_,
    torch.Tensor.uniform_,
    torch.Tensor.normal_,
    torch.Tensor.random_,
    torch.Tensor.exponential_,
    torch.Tensor.geometric_,
    torch.Tensor.cauchy_,
    torch.Tensor.log_normal_,
    torch.Tensor.multinomial,
}
_SDPA_DROPOUT_POSITION = 4  # scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, ...)


class NoDropout(TorchFunctionMode):
    """Within the block, torch's dropout is the identity and other random draws raise (see the module)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _DROPOUTS:
            return args[0] if args else kwargs["input"]
        if func is F.scaled_dot_product_attention:
            if len(args) > _SDPA_DROPOUT_POSITION:
                args = (*args[:_SDPA_DROPOUT_POSITION], 0.0, *args[_SDPA_DROPOUT_POSITION + 1 :])
            elif "dropout_p" in kwargs:
                kwargs = {**kwargs, "dropout_p": 0.0}
        elif func in _RANDOM:
            raise OptionError(
                f"a zeroth-order forward drew random numbers ({getattr(func, '__name__', func)}): its "
                "two evaluations would see different draws. Pass the model to the optimizer (it is "
                "put in eval mode for these forwards) or call model.eval(), and draw batches outside "
                "the closure"
            )
        return func(*args, **kwargs)
