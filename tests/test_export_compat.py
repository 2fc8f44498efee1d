"""Exports (and the built-in base folder adapters load onto) carry the keys
transformers 4.x reads, with the values transformers 5 reads: scripts/check_compat.py
loads them in an older transformers; these tests check the files."""

import json
import shutil

import pytest
import torch

from common.export import add_transformers4_keys, export_merged
from common.model import ensure_builtin_model


def test_builtin_model_folder_has_4x_rope_theta_and_tokenizer_class(tmp_path):
    """The exported built-in model's config and tokenizer files are the built-in
    folder's, passed through add_transformers4_keys (weights are not needed)."""
    folder = ensure_builtin_model()
    for name in ("config.json", "tokenizer_config.json"):
        shutil.copy(folder / name, tmp_path / name)
    add_transformers4_keys(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["rope_theta"] == 100000.0
    assert config["rope_parameters"]["rope_theta"] == config["rope_theta"]
    assert config["rope_scaling"] is None
    assert config["torch_dtype"] == config["dtype"] == "float32"
    tok = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert tok["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert tok["chat_template"]
    # the cached folder itself, which adapters are loaded onto, carries them too
    assert json.loads((folder / "config.json").read_text())["rope_theta"] == 100000.0


def test_export_of_a_llama_with_rope_theta_100000_loads_identically(tmp_path, tokenizer):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         rope_parameters={"rope_type": "default", "rope_theta": 100000.0})
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_config(config),
                           LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    out = export_merged(model, tokenizer, tmp_path / "export")
    written = json.loads((out / "config.json").read_text())
    assert written["rope_theta"] == 100000.0 and written["torch_dtype"] == "float32"
    assert json.loads((out / "tokenizer_config.json").read_text())["tokenizer_class"] == \
        "PreTrainedTokenizerFast"
    # transformers 5 reads the file with the added keys as before
    assert AutoConfig.from_pretrained(out).rope_parameters["rope_theta"] == 100000.0
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([[1, 20, 300, 4000, 5, 60, 700]])
    with torch.no_grad():
        assert (reloaded(input_ids=ids).logits - model.eval()(input_ids=ids).logits).abs().max() < 1e-5
    again = AutoTokenizer.from_pretrained(out)
    text = "Define the word 'otter' (noun)."
    assert again(text)["input_ids"] == tokenizer(text)["input_ids"]
    messages = [{"role": "user", "content": text}]
    assert again.apply_chat_template(messages, tokenize=False) == \
        tokenizer.apply_chat_template(messages, tokenize=False)


@pytest.mark.parametrize("rope, want_scaling", [
    ({"rope_type": "default", "rope_theta": 5e5}, None),
    ({"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
     {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": 8192}),
])
def test_rope_scaling_is_the_rope_parameters_without_theta(tmp_path, rope, want_scaling):
    (tmp_path / "config.json").write_text(json.dumps({"rope_parameters": rope, "dtype": "bfloat16"}))
    add_transformers4_keys(tmp_path)
    add_transformers4_keys(tmp_path)  # idempotent
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["rope_theta"] == 5e5 and config["rope_scaling"] == want_scaling
    assert config["torch_dtype"] == "bfloat16" and config["rope_parameters"] == rope


def test_per_layer_type_rope_is_left_alone(tmp_path):
    rope = {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}
    (tmp_path / "config.json").write_text(json.dumps(
        {"rope_parameters": rope, "layer_types": ["full_attention", "sliding_attention"]}))
    add_transformers4_keys(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert "rope_theta" not in config and "rope_scaling" not in config
