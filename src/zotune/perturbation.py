"""Perturbed forwards that never write the perturbation into the stored weights: :class:`ModulePerturbation`.

The estimator's exact modes (:mod:`zotune.estimators`) run here:

- **module**: each module that owns trainable parameters runs its forward on a fresh copy ``θ_i ± εz_i``,
  swapped in for the duration of that forward only. Stored parameters never change during the estimate, so a
  step with lr = 0 is bit-identical in every dtype. Peak extra memory: one module's parameters (a tied
  parameter, e.g. a shared embedding, stays perturbed until the closure returns). Cost: one generation per
  forward, so a closure that runs several micro-batches regenerates z for each of them. A plain embedding on
  the CPU perturbs only the rows it looks up. A plain linear layer or embedding whose optimized weight is
  larger than :data:`SLICE_ELEMENTS` is never copied whole: its forward runs on perturbed slices of its rows,
  one at a time (a vocabulary head's logits slice by slice; a table's lookups gathered from each slice), so
  the peak extra memory of a model with a large vocabulary is one slice and its largest other module.
- **dual** (module mode with ``dual_forward``): one forward over the batch stacked twice; each module runs
  its first half on θ_i + εz_i and its second on θ_i − εz_i, both copies built from one generation
  (a linear layer runs both halves as one batched matmul). Exact like module mode, with one generation
  per estimate instead of two, for the activations of a doubled batch and two copies of the largest
  module. The closure takes ``copies`` (see :class:`zotune.optim.MeZO`). A module called on a single row
  that the batch broadcasts against (position embeddings) runs once per half; T5's batch-wide relative
  position bias, and inputs of an odd number of rows, are refused.

Copies come from :meth:`zotune.directions.DirectionEngine.perturbed_copy`, ``perturbed_pair`` and
``perturbed_rows``, into buffers recycled across modules and steps.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn import functional as F

from .directions import DirectionEngine, Pair
from .errors import OptionError


class ModulePerturbation:
    """Runs forwards at perturbed parameters without writing to the stored ones (see the module docstring):

    - ``with perturbation(pairs): ...``: forwards at θ + Σ a·z(s) over the pairs;
    - ``with perturbation.dual(seed, eps): ...``: a forward over a batch stacked twice along dim 0 evaluates
      the first copy at θ + εz(seed) and the second at θ − εz(seed). Every module that owns optimized
      parameters splits its inputs in halves and runs once per half, each time on a copy of its parameters,
      and z is generated once per module for both copies.

    For the duration, the forward of every module that owns optimized parameters is replaced (the estimator
    runs these forwards in eval mode). A plain ``nn.Embedding``
    on the CPU perturbs only the rows its input looks up: the rest of a vocabulary-sized table is never
    generated.
    """

    def __init__(self, engine: DirectionEngine, model: nn.Module) -> None:
        self.engine = engine
        index_of = {id(param): i for i, param in enumerate(engine.params)}
        self.owned: list[tuple[nn.Module, list[tuple[int, nn.Parameter]]]] = []
        owners: dict[int, int] = {}
        for module in model.modules():
            mine = [(index_of[id(p)], p) for p in module.parameters(recurse=False) if id(p) in index_of]
            if mine:
                self.owned.append((module, mine))
                for index, _ in mine:
                    owners[index] = owners.get(index, 0) + 1
        missing = [i for i in range(len(engine.params)) if i not in owners]
        if missing:
            raise OptionError(
                f"{len(missing)} optimized parameter(s) do not belong to the model given for exact "
                "perturbation: pass the model that owns every optimized parameter, or pass parameters "
                "only (in-place perturbation)."
            )
        self.shared = {index for index, count in owners.items() if count > 1}
        self._index_of = index_of  # id(parameter) -> its index in the engine
        # Copies are recycled across modules and steps: layers repeat shapes, and a fresh large
        # allocation would page-fault its whole size on every forward.
        self._spare: dict[tuple, list[torch.Tensor]] = {}
        # +1 or -1 while a dual forward runs one of its halves: owners nested inside see one copy only, and
        # perturb none of the parameters an enclosing module holds (_held, by index). _rows: the stacked batch's.
        self._sign, self._held, self._rows = 0, set(), None
        owning = {id(module) for module, _ in self.owned}
        # T5's relative position bias: one tensor for the whole batch, which the dual forward cannot split.
        self._batch_wide = next(
            (
                name
                for name, module in model.named_modules()
                if id(module) in owning and name.rsplit(".", 1)[-1] == "relative_attention_bias"
            ),
            None,
        )

    def _copy_buffer(self, param: torch.Tensor, copies: int = 1) -> torch.Tensor:
        """A recycled tensor for ``copies`` copies of ``param`` (shaped like it, or stacked along a new dim 0)."""
        shape = param.shape if copies == 1 else (copies, *param.shape)
        spares = self._spare.get((param.numel() * copies, param.dtype, param.device))
        if spares:
            return spares.pop().view(shape)
        with torch.inference_mode(False):  # a normal tensor, reusable outside inference mode
            return torch.empty(shape, dtype=param.dtype, device=param.device)

    def _recycle(self, buffer: torch.Tensor) -> None:
        self._spare.setdefault((buffer.numel(), buffer.dtype, buffer.device), []).append(buffer)

    def _lookup(self, param_index: int, pairs: Sequence[Pair], input: torch.Tensor) -> torch.Tensor:
        """An embedding lookup at θ + Σ a·z(s), perturbing only the rows looked up."""
        rows, inverse = torch.unique(input, return_inverse=True)
        return F.embedding(inverse, self.engine.perturbed_rows(param_index, pairs, rows))

    @staticmethod
    @contextmanager
    def _swapped(params, copies: dict[int, torch.Tensor]):
        """The parameters' tensors replaced by ``copies`` (by parameter index) for the duration."""
        originals = [(param, param.data) for _, param in params]
        try:
            for index, param in params:
                param.data = copies[index]
            yield
        finally:
            for param, original in originals:
                param.data = original

    def _forward_at(self, params, forward, pairs: Sequence[Pair], args, kwargs):
        """One forward of a module on perturbed copies of its parameters."""
        copies = {}
        try:
            for index, param in params:
                copies[index] = self.engine.perturbed_copy(index, pairs, self._copy_buffer(param))
            with self._swapped(params, copies):
                return forward(*args, **kwargs)
        finally:
            for copy in copies.values():
                self._recycle(copy)

    @contextmanager
    def __call__(self, pairs: Sequence[Pair] | Callable[[int], Sequence[Pair]], only: frozenset[int] | None = None):
        """Forwards at θ + Σ a·z(s); ``pairs``: the same for every parameter, or each engine index's own (a
        block-wise move, whose blocks hold whole modules: a module's parameters share theirs); ``only``: the
        engine indices of the parameters perturbed (a block-wise estimate's block), the others left at θ."""
        originals: dict[int, torch.Tensor] = {}  # shared parameters stay perturbed until the context exits
        pairs_of = pairs if callable(pairs) else (lambda index, same=list(pairs): same)

        def replacement(module, params, forward):
            if _looks_up_rows(module, params):
                ((index, table),) = params

                def lookup(input):
                    if index in originals:  # a shared table, already swapped for its copy by another module
                        return F.embedding(input, table)
                    return self._lookup(index, pairs_of(index), input)

                return lookup
            sliced = _sliced(module, params)
            if sliced:
                weight = self._index_of[id(module.weight)]

                def sliced_forward(input):
                    if weight in originals:  # a shared weight, already swapped for its copy by another module
                        return perturbed_forward(input)

                    def fill(rows, buffer):
                        self.engine.perturbed_copy(weight, pairs_of(weight), buffer[0], rows)
                        return buffer

                    if type(module) is nn.Embedding:
                        return self._lookup_in_slices(weight, [input], fill)[0]
                    bias = self._bias_copies(module, [pairs_of(weight)])
                    return self._linear_in_slices(module, input[None], bias, fill)[0]

            def perturbed_forward(*args, **kwargs):
                for index, param in params:
                    if index not in originals:
                        originals[index] = param.data
                        param.data = self.engine.perturbed_copy(index, pairs_of(index), self._copy_buffer(param))
                try:
                    return forward(*args, **kwargs)
                finally:
                    for index, param in params:
                        if index in originals and index not in self.shared:
                            self._recycle(param.data)
                            param.data = originals.pop(index)

            return sliced_forward if sliced else perturbed_forward

        try:
            with self._replaced_forwards(replacement, only):
                yield
        finally:
            for index, original in originals.items():
                self._recycle(self.engine.params[index].data)
                self.engine.params[index].data = original

    @contextmanager
    def dual(self, seed: int, eps: float):
        """Within the block, a forward over a batch stacked twice along dim 0 runs its first half at
        θ + eps·z(seed) and its second at θ − eps·z(seed), z generated once per module for both; the stored
        parameters are not changed.

        Raises:
            OptionError: on entering, for a model with a batch-wide position bias (T5's); during a forward, for
                inputs that do not split into two halves along dim 0, or outputs that cannot be joined back.
        """
        if self._batch_wide is not None:
            raise OptionError(
                f"dual_forward: {self._batch_wide} computes one position bias for the whole batch "
                "(T5-style), so the two halves cannot see different weights there: use dual_forward=false"
            )

        def replacement(module, params, forward):
            rows_only = _looks_up_rows(module, params)

            def dual_forward(*args, **kwargs):
                if self._sign:  # inside a module that runs one half: perturb what no enclosing module holds
                    pairs = [(seed, self._sign * eps)]
                    free = [(index, param) for index, param in params if index not in self._held]
                    if not free:
                        return forward(*args, **kwargs)
                    if rows_only:
                        return self._lookup(free[0][0], pairs, *args, **kwargs)
                    return self._forward_at(free, forward, pairs, args, kwargs)
                rows = _batch_rows(module, args, kwargs)
                if self._rows is None:  # the first module to run sees the stacked batch itself
                    if rows % 2:
                        raise OptionError(
                            f"dual_forward: {type(module).__name__} got an input of {rows} rows, an odd "
                            "number: the closure must stack two copies of its batch along dim 0 when "
                            "called with copies=2"
                        )
                    self._rows = rows
                if rows == 1:  # a row the stacked batch broadcasts against (GPT-2's, BERT's position embeddings)
                    args, kwargs, rows = *_expanded(args, kwargs, self._rows), self._rows
                if rows % 2:
                    raise OptionError(
                        f"dual_forward: {type(module).__name__} got an input of {rows} rows, which does "
                        "not split into the two stacked copies: its input is not batch-first, so the "
                        "halves cannot see different weights there: use dual_forward=false for this model"
                    )
                if _sliced(module, params) and not rows_only:
                    return self._dual_in_slices(module, seed, eps, *args, **kwargs)
                if type(module) is nn.Linear:
                    return self._dual_linear(module, params, seed, eps, *args, **kwargs)
                halves = _halves(module, args, kwargs)
                if rows_only:
                    return torch.cat(
                        [
                            self._lookup(params[0][0], [(seed, sign * eps)], *half_args, **half_kwargs)
                            for sign, (half_args, half_kwargs) in zip((1, -1), halves)
                        ]
                    )
                with self._pair_copies(params, seed, eps) as stacked:
                    return _joined(module, *self._halves_run(params, stacked, forward, halves))

            return dual_forward

        self._rows = None
        try:
            with self._replaced_forwards(replacement):
                yield
        finally:
            self._rows = None

    def _halves_run(self, params, stacked, forward, halves) -> list:
        """The module's forward on each half of its inputs with its parameters at that half's copy; modules
        inside it see the copies as their own (a tied bias, e.g. RoBERTa's head's, is not perturbed twice)."""
        outputs = []
        self._held.update(index for index, _ in params)
        try:
            for side, (sign, (half_args, half_kwargs)) in enumerate(zip((1, -1), halves)):
                self._sign = sign
                with self._swapped(params, {index: pair[side] for index, pair in stacked.items()}):
                    outputs.append(forward(*half_args, **half_kwargs))
        finally:
            self._sign = 0
            self._held.difference_update(index for index, _ in params)
        return outputs

    def _dual_linear(self, module: nn.Linear, params, seed: int, eps: float, input: torch.Tensor) -> torch.Tensor:
        """A linear layer's dual forward as one batched matmul of the two halves by the two weight copies, stacked
        in one buffer: no cut of the input, no join of the outputs."""
        with self._pair_copies(params, seed, eps) as stacked:
            weight = stacked.get(self._index_of.get(id(module.weight)), module.weight.expand(2, -1, -1))
            rows = input.reshape(2, -1, module.in_features)
            if module.bias is None:
                output = torch.bmm(rows, weight.transpose(1, 2))
            else:
                bias = stacked.get(self._index_of.get(id(module.bias)), module.bias.expand(2, -1))
                output = torch.baddbmm(bias.unsqueeze(1), rows, weight.transpose(1, 2))
            return output.view(*input.shape[:-1], module.out_features)

    def _dual_in_slices(self, module: nn.Module, seed: int, eps: float, input: torch.Tensor) -> torch.Tensor:
        """A large linear layer's or embedding's dual forward slice by slice, both copies of each slice from
        one generation."""
        weight = self._index_of[id(module.weight)]

        def fill(rows, buffer):
            self.engine.perturbed_pair(weight, seed, eps, buffer[0], buffer[1], rows)
            return buffer

        if type(module) is nn.Embedding:
            return torch.cat(self._lookup_in_slices(weight, list(input.chunk(2)), fill))
        bias = self._bias_copies(module, [[(seed, eps)], [(seed, -eps)]])
        output = self._linear_in_slices(module, input.reshape(2, -1, module.in_features), bias, fill)
        return output.view(*input.shape[:-1], module.out_features)

    def _linear_in_slices(self, module: nn.Linear, inputs: torch.Tensor, biases, fill) -> torch.Tensor:
        """``inputs[k] @ W_k.T + b_k`` for stacked inputs [copies, ..., in], W_k built a slice of output rows at a
        time by ``fill(rows, buffer)`` (buffer [copies, rows, in]) into one recycled buffer: no whole copy of W."""
        copies = inputs.shape[0]
        flat = inputs.reshape(copies, -1, module.in_features)
        output = flat.new_empty(copies, flat.shape[1], module.out_features)
        for rows in _row_slices(module.weight):
            buffer = self._copy_buffer(module.weight[rows], copies)
            try:
                part = fill(rows, buffer.view(copies, *module.weight[rows].shape))
                output[:, :, rows] = torch.bmm(flat, part.transpose(1, 2))
            finally:
                self._recycle(buffer)
        if biases is not None:
            output += biases[:, None, :]
        return output.view(*inputs.shape[:-1], module.out_features)

    def _lookup_in_slices(self, index: int, inputs: list[torch.Tensor], fill) -> list[torch.Tensor]:
        """Embedding lookups of each input in its copy of table ``index``, the copies built a slice of rows at
        a time by ``fill(rows, buffer)`` (buffer [copies, rows, dim]): the rows each slice holds are gathered
        from it, and no whole copy of the table is held."""
        table = self.engine.params[index]
        flats = [input.reshape(-1) for input in inputs]
        outputs = [table.new_empty(flat.numel(), *table.shape[1:]) for flat in flats]
        for rows in _row_slices(table):
            hits = [((flat >= rows.start) & (flat < rows.stop)).nonzero()[:, 0] for flat in flats]
            if not any(hit.numel() for hit in hits):
                continue
            buffer = self._copy_buffer(table[rows], len(inputs))
            try:
                part = fill(rows, buffer.view(len(inputs), *table[rows].shape))
                for k, (flat, hit) in enumerate(zip(flats, hits)):
                    outputs[k][hit] = part[k][flat[hit] - rows.start]
            finally:
                self._recycle(buffer)
        return [output.view(*input.shape, *table.shape[1:]) for output, input in zip(outputs, inputs)]

    def _bias_copies(self, module: nn.Linear, pairs_per_copy) -> torch.Tensor | None:
        """A linear layer's bias for each copy: perturbed by that copy's pairs if it is optimized."""
        if module.bias is None:
            return None
        index = self._index_of.get(id(module.bias))
        if index is None or index in self._held:
            return module.bias.detach().expand(len(pairs_per_copy), -1)
        return torch.stack([self.engine.perturbed_copy(index, pairs) for pairs in pairs_per_copy])

    @contextmanager
    def _pair_copies(self, params, seed: int, eps: float):
        """For each parameter (by index), its copies θ + εz and θ − εz stacked along a new dim 0 in one recycled
        buffer, z generated once for both."""
        stacked = {}
        try:
            for index, param in params:
                stacked[index] = self._copy_buffer(param, 2)
                self.engine.perturbed_pair(index, seed, eps, stacked[index][0], stacked[index][1])
            yield stacked
        finally:
            for buffer in stacked.values():
                self._recycle(buffer)

    @contextmanager
    def _replaced_forwards(self, replacement, only: frozenset[int] | None = None):
        """Every owning module's forward ← ``replacement(module, its parameters, its forward)``; with ``only``,
        the modules that own those parameters."""
        replaced = []
        for module, params in self.owned:
            if only is not None and not any(index in only for index, _ in params):
                continue
            replaced.append((module, module.__dict__.get("forward")))
            module.forward = replacement(module, params, module.forward)
        try:
            yield
        finally:
            for module, own_forward in replaced:
                if own_forward is None:
                    del module.forward
                else:
                    module.forward = own_forward


def _looks_up_rows(module: nn.Module, params) -> bool:
    """A plain embedding table on the CPU, where drawing z for single rows costs less than for the whole table
    (on a GPU, a kernel launch per row would cost more)."""
    return type(module) is nn.Embedding and module.max_norm is None and len(params) == 1 and params[0][1].device.type == "cpu"


# Above this many elements, an optimized linear weight or embedding table is never copied whole: its forward
# runs on perturbed slices of rows of about this size (a vocabulary-sized head or table of a large model is
# hundreds of MiB to gigabytes).
SLICE_ELEMENTS = 1 << 22


def _sliced(module: nn.Module, params) -> bool:
    """A plain linear layer or embedding whose optimized weight is larger than a slice."""
    if type(module) not in (nn.Linear, nn.Embedding) or getattr(module, "max_norm", None) is not None:
        return False
    return any(param is module.weight for _, param in params) and module.weight.numel() > SLICE_ELEMENTS


def _row_slices(weight: torch.Tensor) -> list[slice]:
    """Consecutive slices of rows of ``weight`` of at most :data:`SLICE_ELEMENTS` elements (one row at least)."""
    step = max(1, SLICE_ELEMENTS // max(1, weight[0].numel()))
    return [slice(start, min(start + step, weight.shape[0])) for start in range(0, weight.shape[0], step)]


def _batch_rows(module: nn.Module, args, kwargs) -> int:
    """The length along dim 0 of a dual forward's first tensor input."""
    tensors = [value for value in (*args, *kwargs.values()) if isinstance(value, torch.Tensor) and value.dim()]
    if not tensors:
        raise OptionError(
            f"dual_forward: {type(module).__name__} owns optimized parameters but got no tensor input "
            "to cut in two: use dual_forward=False for this model"
        )
    return tensors[0].shape[0]


def _expanded(args, kwargs, rows: int):
    """The inputs with every one-row tensor repeated to ``rows`` rows, so that each half of the stacked batch
    gets its own copy (and so its own weights)."""

    def expand(value):
        if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == 1:
            return value.expand(rows, *value.shape[1:])
        return value

    return tuple(expand(a) for a in args), {k: expand(v) for k, v in kwargs.items()}


def _halves(module: nn.Module, args, kwargs):
    """The inputs of a dual forward cut in two along dim 0: every tensor as long as the first tensor input
    along dim 0 is cut, the rest goes to both halves."""
    rows = _batch_rows(module, args, kwargs)

    def cut(value, part):
        if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == rows:
            return value[: rows // 2] if part == 0 else value[rows // 2 :]
        return value

    return [(tuple(cut(a, part) for a in args), {k: cut(v, part) for k, v in kwargs.items()}) for part in (0, 1)]


def _joined(module: nn.Module, first, second):
    """The two halves' outputs put back together along dim 0, through tuples, lists and dicts."""
    if isinstance(first, torch.Tensor):
        return torch.cat([first, second])
    if first is None:
        return None
    if isinstance(first, (tuple, list)):
        return type(first)(_joined(module, a, b) for a, b in zip(first, second))
    if isinstance(first, dict):
        joined = {key: _joined(module, first[key], second[key]) for key in first}
        return type(first)(**joined) if type(first) is not dict else joined
    raise OptionError(
        f"dual_forward: {type(module).__name__} returned a {type(first).__name__}, which zotune cannot "
        "join along the batch: use dual_forward=False for this model"
    )
