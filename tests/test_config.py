"""ModelConfig validation: one layer for every source (presets, lmlab.json, HF config.json, GGUF metadata)."""
import json

import pytest
import torch

from lmlab.checkpoints import native
from lmlab.config import ModelConfig, preset
from lmlab.errors import LmlabError, first_line
from lmlab.model import Transformer

BAD_FIELDS = {
    # name: (overrides of tiny-llama, text the message must contain)
    "heads-0": ({"n_head": 0}, "n_head: 0 is out of range (allowed: 1..2147483647)"),
    "kv-heads-0": ({"n_kv_head": 0}, "n_kv_head: 0 is out of range"),
    "kv-heads-not-divisor": ({"n_kv_head": 3}, "n_kv_head: 3 does not divide n_head=4"),
    "context-2^31": ({"max_seq_len": 2**31}, "max_seq_len: 2147483648 is out of range (allowed: 1..1048576)"),
    "layers-negative": ({"n_layer": -1}, "n_layer: -1 is out of range (allowed: 1..10000)"),
    "vocab-string": ({"vocab_size": "512"}, "vocab_size: '512' is not an integer"),
    "d-model-float": ({"d_model": 64.0}, "d_model: 64.0 is not an integer"),
    "bool-for-int": ({"n_layer": True}, "n_layer: True is not an integer"),
    "d-model-indivisible": ({"d_model": 66, "head_dim": None}, "d_model: 66 is not divisible by n_head=4"),
    "pos-unknown": ({"pos": "alibi"}, "pos: 'alibi' is not supported (allowed: learned, sinusoidal, rope"),
    "mlp-unknown": ({"mlp": "swish"}, "mlp: 'swish' is not supported"),
    "norm-unknown": ({"norm": "batchnorm"}, "norm: 'batchnorm' is not supported (allowed: layernorm, rmsnorm)"),
    "arch-list": ({"arch": ["decoder"]}, "arch: ['decoder'] is not supported"),
    "rope-nan": ({"rope_theta": float("nan")}, "rope_theta: nan is out of range"),
    "rope-inf": ({"rope_theta": float("inf")}, "rope_theta: inf is out of range"),
    "rope-int-beyond-float": ({"rope_theta": 10**400}, "rope_theta: 1000000000"),
    "eps-string": ({"norm_eps": "1e-5"}, "norm_eps: '1e-5' is not a number"),
    "dropout-1": ({"dropout": 1.0}, "dropout: 1.0 is out of range (allowed: 0 <= dropout < 1)"),
    "bias-string": ({"attn_bias": "yes"}, "attn_bias: 'yes' is not a boolean"),
    "family-number": ({"family": 3}, "family: 3 is not a string"),
    "pad-negative": ({"pad_id": -1}, "pad_id: -1 is out of range"),
    "odd-rope-head-dim": ({"head_dim": 15}, "head_dim: rotary positions need an even head_dim"),
}


@pytest.mark.parametrize("case", BAD_FIELDS)
def test_bad_field_is_one_line_naming_source_and_field(case):
    overrides, text = BAD_FIELDS[case]
    with pytest.raises(LmlabError) as info:
        preset("tiny-llama", **overrides)
    message = str(info.value)
    assert message.startswith("preset tiny-llama: ") and text in message and "\n" not in message


def test_integer_float_fields_become_floats():
    cfg = preset("tiny-llama", rope_theta=10**30, norm_eps=0, dropout=0)
    assert isinstance(cfg.rope_theta, float) and isinstance(cfg.norm_eps, float) and isinstance(cfg.dropout, float)
    Transformer(cfg)  # a huge integer theta used to overflow inside the rotary table


@pytest.mark.parametrize("case", ["heads-0", "pos-unknown", "vocab-string", "rope-nan"])
def test_lmlab_json_goes_through_the_same_checks(tmp_path, case):
    overrides, text = BAD_FIELDS[case]
    d = {**preset("tiny-llama").to_dict(), **overrides}
    path = tmp_path / "lmlab.json"
    path.write_text(json.dumps(d).replace("NaN", "NaN"))
    with pytest.raises(LmlabError, match=f"^{path}: " + text.split(" ")[0]):
        ModelConfig.load(path)


@pytest.mark.parametrize("content, text", [(b'{"n_layer": 2\xff}', "not UTF-8 text"), (b"{", "not valid JSON"),
                                           (b"", "not valid JSON"), (b"[]", "expected a JSON object"),
                                           (b"[" * 100000, "not valid JSON")])
def test_unreadable_lmlab_json_names_file(tmp_path, content, text):
    path = tmp_path / "lmlab.json"
    path.write_bytes(content)
    with pytest.raises(LmlabError, match=f"^{path}: {text}"):
        ModelConfig.load(path)


@pytest.fixture
def native_folder(tmp_path):
    torch.manual_seed(0)
    model = Transformer(preset("tiny-llama", vocab_size=64, n_layer=2, d_model=32, n_head=2, n_kv_head=1, d_ff=64))
    return native.save(model, None, tmp_path / "ckpt")


def test_native_checkpoint_missing_tensors_are_named(native_folder):
    from safetensors.torch import load_file, save_file

    path = native_folder / native.WEIGHTS_NAME
    sd = load_file(str(path))
    for name in [n for n in sd if n.startswith("decoder.blocks.1.")]:
        del sd[name]
    save_file(sd, str(path))
    with pytest.raises(LmlabError, match=r"missing tensors 'decoder\.blocks\.1\.[^']+', '[^']+', '[^']+' and \d+ more"):
        native.read(native_folder)


def test_native_checkpoint_integer_tensor_is_named(native_folder):
    from safetensors.torch import load_file, save_file

    path = native_folder / native.WEIGHTS_NAME
    sd = load_file(str(path))
    sd["tok_emb.weight"] = sd["tok_emb.weight"].to(torch.int64)
    save_file(sd, str(path))
    with pytest.raises(LmlabError, match=r"tensor 'tok_emb\.weight' has dtype int64"):
        native.read(native_folder)


@pytest.mark.parametrize("cut", [0, 7, 100, -10])
def test_empty_or_truncated_safetensors_is_one_line(native_folder, cut):
    path = native_folder / native.WEIGHTS_NAME
    data = path.read_bytes()
    path.write_bytes(data[:cut])
    with pytest.raises(LmlabError, match=f"^{path}: not a valid safetensors file"):
        native.read(native_folder)


@pytest.mark.parametrize("error, expected", [(ValueError(""), "ValueError"), (IndexError(), "IndexError"),
                                             (OSError("\n\n  disk gone \nmore"), "disk gone")])
def test_first_line_never_fails(error, expected):
    assert first_line(error) == expected
