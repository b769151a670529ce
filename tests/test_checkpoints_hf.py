"""HF-format folders: lmlab reads what transformers writes, and transformers reads what lmlab exports.

Each family: a tiny random HF model → save_pretrained → lmlab.checkpoints.load → same logits on a padded
batch (≤ 1e-4 in float32) and the same greedy tokens (lmlab with its KV cache); then the other way round.
"""
import json

import pytest
import torch

from helpers_hf import (TOL, batch, greedy_hf, greedy_hf_seq2seq, greedy_lmlab, greedy_lmlab_seq2seq,
                        max_diff_at, positions, randomize)
from lmlab.checkpoints import hf, load
from lmlab.config import ModelConfig, preset
from lmlab.errors import LmlabError
from lmlab.model import Transformer
from lmlab.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")
V = 96  # vocabulary of the tiny models


def save_hf(model, folder, **kw):
    randomize(model)
    model.save_pretrained(str(folder), **kw)
    return folder


def hf_load(cls, folder):
    model, info = cls.from_pretrained(str(folder), output_loading_info=True, dtype=torch.float32)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


# --------------------------------------------------------------------------- decoders
DECODERS = {
    "gpt2": lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2)),
    "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=64, rope_theta=500.0, rms_norm_eps=1e-5)),
    "llama-tied-headdim": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=64, tie_word_embeddings=True)),
    "qwen2-gqa": lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)),
    "qwen2-mqa-tied": lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=True)),
}


@pytest.mark.parametrize("name", DECODERS)
def test_decoder_logits_and_greedy_match_hf(tmp_path, name):
    torch.manual_seed(0)
    hf_model = DECODERS[name]()
    save_hf(hf_model, tmp_path / name)
    model, tok = load(str(tmp_path / name))
    assert tok is None and model.cfg.family == name.split("-")[0]
    ids, mask = batch(V, [9, 5, 7], left_pad=True)
    with torch.no_grad():
        theirs = hf_model(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits
        ours = model(ids, attention_mask=mask)
    assert max_diff_at(ours, theirs, mask) <= TOL
    assert torch.equal(greedy_lmlab(model, ids, mask, 6), greedy_hf(hf_model, ids, mask, 6))


def test_sharded_folder(tmp_path):
    torch.manual_seed(0)
    hf_model = DECODERS["llama"]()
    save_hf(hf_model, tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 2
    model, _ = load(str(tmp_path / "sharded"))
    ids, mask = batch(V, [8, 8], left_pad=True)
    with torch.no_grad():
        assert max_diff_at(model(ids), hf_model(ids).logits, None) <= TOL


# --------------------------------------------------------------------------- bert
@pytest.fixture
def bert_folder(tmp_path):
    torch.manual_seed(0)
    conf = transformers.BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=64, max_position_embeddings=64, type_vocab_size=2)
    hf_model = transformers.BertForPreTraining(conf)
    return hf_model, save_hf(hf_model, tmp_path / "bert")


def bert_inputs():
    ids, mask = batch(V, [10, 6, 8], left_pad=False)
    types = torch.zeros_like(ids)
    types[:, 4:] = 1  # a second segment
    return ids, mask, types * mask


def test_bert_mlm_and_nsp_match_hf(bert_folder):
    hf_model, folder = bert_folder
    model, _ = load(str(folder))
    assert model.cfg.mlm_head and model.cfg.pooler
    ids, mask, types = bert_inputs()
    with torch.no_grad():
        out = hf_model(input_ids=ids, attention_mask=mask, token_type_ids=types)
        logits, h = model(ids, attention_mask=mask, token_type_ids=types, return_hidden=True)
        nsp = model.nsp_logits(h)
    assert max_diff_at(logits, out.prediction_logits, mask) <= TOL
    assert max_diff_at(nsp, out.seq_relationship_logits, None) <= TOL


def test_bert_without_heads_loads_encoder(tmp_path):
    """BertModel stores no MLM/NSP heads: lmlab loads the encoder alone (pooler weights are not used)."""
    torch.manual_seed(0)
    conf = transformers.BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=64, max_position_embeddings=64)
    hf_model = transformers.BertModel(conf)
    save_hf(hf_model, tmp_path / "bare")
    model, _ = load(str(tmp_path / "bare"))
    assert not model.cfg.mlm_head and not model.cfg.pooler
    ids, mask, types = bert_inputs()
    with torch.no_grad():
        theirs = hf_model(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        ours = model.encode(ids, mask, types)
    assert max_diff_at(ours, theirs, mask) <= TOL


# --------------------------------------------------------------------------- t5
T5_VARIANTS = {
    "relu-tied": dict(feed_forward_proj="relu"),
    "gated-gelu": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False),
}


def t5_model(**kw):
    conf = transformers.T5Config(vocab_size=V, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=3,
                                 num_heads=4, relative_attention_num_buckets=8,
                                 relative_attention_max_distance=20, decoder_start_token_id=0, **kw)
    return transformers.T5ForConditionalGeneration(conf)


def check_t5(hf_model, model):
    src, src_mask = batch(V, [14, 9, 12], left_pad=False)
    dec, _ = batch(V, [11, 11, 11], left_pad=False, seed=2)
    dec[:, 0] = 0
    with torch.no_grad():
        theirs = hf_model(input_ids=src, attention_mask=src_mask, decoder_input_ids=dec).logits
        ours = model(dec, encoder_input_ids=src, encoder_mask=src_mask)
    assert max_diff_at(ours, theirs, None) <= TOL
    start = model.cfg.decoder_start_id
    assert torch.equal(greedy_lmlab_seq2seq(model, src, src_mask, start, 6),
                       greedy_hf_seq2seq(hf_model, src, src_mask, start, 6))


@pytest.mark.parametrize("variant", T5_VARIANTS)
def test_t5_logits_and_cached_decoding_match_hf(tmp_path, variant):
    torch.manual_seed(0)
    hf_model = t5_model(**T5_VARIANTS[variant])
    save_hf(hf_model, tmp_path / variant)
    model, _ = load(str(tmp_path / variant))
    assert model.cfg.mlp == ("relu" if variant == "relu-tied" else "geglu")
    assert model.cfg.tied_logit_scale == (variant == "relu-tied") and model.cfg.attn_scale == 1.0
    check_t5(hf_model, model)


def test_t5_separate_lm_head(tmp_path):
    """A T5 v1.1-style folder with its own lm_head (tie_word_embeddings=false, head stored)."""
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    folder = save_hf(t5_model(feed_forward_proj="gated-gelu"), tmp_path / "t5")
    sd = load_file(str(folder / "model.safetensors"))
    sd["lm_head.weight"] = torch.randn(V, 32, generator=torch.Generator().manual_seed(5))
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    conf = json.loads((folder / "config.json").read_text())
    conf["tie_word_embeddings"] = False
    conf.pop("scale_decoder_outputs", None)
    (folder / "config.json").write_text(json.dumps(conf))
    hf_model = hf_load(transformers.T5ForConditionalGeneration, folder)
    model, _ = load(str(folder))
    assert not model.cfg.tie_embeddings
    assert torch.equal(model.lm_head.weight, sd["lm_head.weight"])
    check_t5(hf_model, model)


# --------------------------------------------------------------------------- export round trip
def tiny(name: str, **kw) -> ModelConfig:
    base = dict(vocab_size=V, n_layer=2, n_head=4, d_model=32, d_ff=64, max_seq_len=64)
    if name == "t5-small":
        base.update(head_dim=8, rel_buckets=8, rel_max_distance=20, n_decoder_layer=3)
    return preset(name, **{**base, **kw})


EXPORTS = {
    "gpt2": (lambda: tiny("gpt2", bos_id=1, eos_id=2), "AutoModelForCausalLM"),
    "llama-gqa-untied": (lambda: tiny("tiny-llama", n_kv_head=2, tie_embeddings=False), "AutoModelForCausalLM"),
    "qwen2": (lambda: tiny("tiny-llama", family="qwen2", attn_bias=True, n_kv_head=1), "AutoModelForCausalLM"),
    "bert": (lambda: tiny("bert-base", norm_eps=1e-12), "BertForPreTraining"),
    "bert-untied": (lambda: tiny("bert-base", tie_embeddings=False), "BertForPreTraining"),
    "bert-mlm-only": (lambda: tiny("bert-base", pooler=False), "BertForMaskedLM"),
    "t5-relu-scaled": (lambda: tiny("t5-small"), "AutoModelForSeq2SeqLM"),
    "t5-geglu-untied": (lambda: tiny("t5-small", mlp="geglu", tie_embeddings=False, tied_logit_scale=False),
                        "AutoModelForSeq2SeqLM"),
    "t5-tied-unscaled": (lambda: tiny("t5-small", mlp="geglu", tied_logit_scale=False), "AutoModelForSeq2SeqLM"),
}


@pytest.mark.parametrize("name", EXPORTS)
def test_export_loads_in_hf_with_same_logits(tmp_path, name):
    make_cfg, cls_name = EXPORTS[name]
    torch.manual_seed(0)
    model = randomize(Transformer(make_cfg()))
    tok = Tokenizer.char_level("abcdefghijklmnopqrstuvwxyz ")
    folder = hf.export(model, tok, tmp_path / "out")
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json"} <= {p.name for p in folder.iterdir()}
    hf_model = hf_load(getattr(transformers, cls_name), folder)
    arch = model.cfg.arch
    if arch == "decoder":
        ids, mask = batch(V, [9, 6], left_pad=True)
        with torch.no_grad():
            theirs = hf_model(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits
            ours = model(ids, attention_mask=mask)
        assert max_diff_at(ours, theirs, mask) <= TOL
    elif arch == "encoder":
        ids, mask, types = bert_inputs()
        with torch.no_grad():
            out = hf_model(input_ids=ids, attention_mask=mask, token_type_ids=types)
            logits, h = model(ids, attention_mask=mask, token_type_ids=types, return_hidden=True)
        theirs = out.prediction_logits if model.cfg.pooler else out.logits
        assert max_diff_at(logits, theirs, mask) <= TOL
        if model.cfg.pooler:
            assert max_diff_at(model.nsp_logits(h), out.seq_relationship_logits, None) <= TOL
    else:
        check_t5(hf_model, model)
    # and back: lmlab reads its own export to the identical config and weights
    again, tok2 = load(str(folder))
    for f in ("arch", "mlp", "tie_embeddings", "tied_logit_scale", "n_kv_head", "head_dim", "norm_eps"):
        assert getattr(again.cfg, f) == getattr(model.cfg, f), f
    for k, v in model.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k
    assert tok2.encode("hello world") == tok.encode("hello world")


def test_exported_tokenizer_loads_in_transformers(tmp_path):
    model = Transformer(tiny("gpt2", vocab_size=27))
    tok = Tokenizer.char_level("abcdefghijklmnopqrstuvwxyz ")
    folder = hf.export(model, tok, tmp_path / "out")
    theirs = transformers.AutoTokenizer.from_pretrained(str(folder))
    assert theirs("the cat sat")["input_ids"] == tok.encode("the cat sat")


def test_export_replaces_folder_atomically(tmp_path):
    model = Transformer(tiny("tiny-llama"))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "stale.txt").write_text("old")
    hf.export(model, None, tmp_path / "out")
    assert not (tmp_path / "out" / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp or .old folder left behind


def test_export_refuses_config_hf_cannot_express():
    baby = Transformer(preset("baby-gpt"))  # no biases: not GPT-2, and no family
    with pytest.raises(LmlabError, match="matches none"):
        hf.export_family(baby.cfg)
    cfg = preset("baby-gpt", family="gpt2")
    with pytest.raises(LmlabError, match="attn_bias=False"):
        hf.export_family(cfg)
    assert hf.export_family(tiny("tiny-llama", family="")) == "llama"


# --------------------------------------------------------------------------- name maps
@pytest.mark.parametrize("name", EXPORTS)
def test_name_pieces_agree_with_exported_tensors(name):
    """Every HF tensor the export writes is exactly the rows of the lmlab tensor that the name map names."""
    make_cfg, _ = EXPORTS[name]
    torch.manual_seed(0)
    model = randomize(Transformer(make_cfg()))
    family = hf.export_family(model.cfg)
    exported, ours = hf.hf_state_dict(model, family), model.state_dict()
    pieces = hf.name_pieces(model.cfg)
    assert {p.theirs for p in pieces} <= set(exported)
    for p in pieces:
        want = ours[p.ours][p.start:p.stop]
        assert torch.equal(exported[p.theirs], want.t() if p.transpose else want), p
        assert hf.from_hf(model.cfg, p.theirs) == p


def test_fused_modules_map_to_hf_modules_and_back():
    cfg = tiny("tiny-llama", n_kv_head=2)  # q: 4 heads × 8, k and v: 2 heads × 8 rows
    qkv = hf.to_hf(cfg, "decoder.blocks.1.attn.qkv")
    assert [(p.theirs, p.start, p.stop) for p in qkv] == [
        ("model.layers.1.self_attn.q_proj", 0, 32), ("model.layers.1.self_attn.k_proj", 32, 48),
        ("model.layers.1.self_attn.v_proj", 48, 64)]
    assert hf.from_hf(cfg, "model.layers.1.self_attn.k_proj") == qkv[1]
    gate, up = hf.to_hf(cfg, "decoder.blocks.0.mlp.gate_up.weight")
    assert (gate.theirs, gate.stop, up.theirs, up.start, up.stop) == (
        "model.layers.0.mlp.gate_proj.weight", 64, "model.layers.0.mlp.up_proj.weight", 64, 128)
    assert [p.theirs for p in hf.to_hf(cfg, "decoder.blocks.0.mlp.proj")] == ["model.layers.0.mlp.down_proj"]
    (c_attn,) = hf.to_hf(tiny("gpt2"), "decoder.blocks.0.attn.qkv")
    assert c_attn.theirs == "transformer.h.0.attn.c_attn" and c_attn.transpose and c_attn.stop == 96
    t5 = tiny("t5-small", mlp="geglu")
    assert [p.theirs for p in hf.to_hf(t5, "decoder.blocks.2.cross.kv")] == [
        "decoder.block.2.layer.1.EncDecAttention.k", "decoder.block.2.layer.1.EncDecAttention.v"]
    with pytest.raises(LmlabError, match=r"did you mean 'decoder.blocks.0.attn.qkv'"):
        hf.to_hf(cfg, "decoder.blocks.0.attn.qvk")
    with pytest.raises(LmlabError, match="not an HF tensor or module"):
        hf.from_hf(cfg, "model.layers.9.self_attn.q_proj")


# --------------------------------------------------------------------------- errors
@pytest.fixture
def llama_folder(tmp_path):
    torch.manual_seed(0)
    return save_hf(DECODERS["llama"](), tmp_path / "llama")


def edit_config(folder, **changes):
    conf = json.loads((folder / "config.json").read_text())
    conf.update(changes)
    (folder / "config.json").write_text(json.dumps(conf))


def test_error_hidden_size_mismatch_names_tensor(llama_folder):
    edit_config(llama_folder, hidden_size=48)
    with pytest.raises(LmlabError, match=r"tensor 'model\.embed_tokens\.weight' has shape \(96, 32\)"):
        load(str(llama_folder))


def test_error_inconsistent_config_names_file(llama_folder):
    edit_config(llama_folder, hidden_size=30, head_dim=None)  # not a multiple of 4 heads
    with pytest.raises(LmlabError, match=r"config\.json: .*d_model: 30 is not divisible by n_head=4"):
        load(str(llama_folder))


def test_error_intermediate_size_mismatch_names_tensor(llama_folder):
    edit_config(llama_folder, intermediate_size=80)
    with pytest.raises(LmlabError, match=r"model\.layers\.0\.mlp\.gate_proj\.weight"):
        load(str(llama_folder))


def test_error_truncated_safetensors_names_file(llama_folder):
    path = llama_folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(LmlabError, match=r"model\.safetensors"):
        load(str(llama_folder))


def test_error_unknown_model_type_names_it(llama_folder):
    edit_config(llama_folder, model_type="mamba")
    with pytest.raises(LmlabError, match=r"model_type 'mamba' is not supported \(supported: llama, qwen2"):
        load(str(llama_folder))


def test_error_pickle_only_folder(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(LmlabError, match="pytorch_model.bin"):
        load(str(tmp_path))


def test_error_unsupported_rope_scaling(llama_folder):
    edit_config(llama_folder, rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0})
    with pytest.raises(LmlabError, match="rope type 'yarn'"):
        load(str(llama_folder))


def test_error_unexpected_tensor_is_named(llama_folder):
    from safetensors.torch import load_file, save_file

    sd = load_file(str(llama_folder / "model.safetensors"))
    sd["model.layers.0.extra.weight"] = torch.zeros(2)
    save_file(sd, str(llama_folder / "model.safetensors"))
    with pytest.raises(LmlabError, match="unexpected tensor 'model.layers.0.extra.weight'"):
        load(str(llama_folder))


# --------------------------------------------------------------------------- the real model
@pytest.mark.slow
def test_smollm2_gguf_export_loads_in_transformers(smollm2, tmp_path):
    model, tok = smollm2
    assert model.cfg.family == "llama" and model.cfg.tie_embeddings and model.cfg.vocab_size == 49152
    folder = hf.export(model, tok, tmp_path / "smollm2-hf")
    hf_model = hf_load(transformers.AutoModelForCausalLM, folder)
    text = "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris. " * 4
    ids = torch.tensor([tok.encode(text)[:64]])
    assert ids.shape[1] == 64
    with torch.no_grad():
        diff = (model(ids) - hf_model(ids).logits).abs().max().item()
    assert diff <= TOL, diff
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    assert hf_tok(text)["input_ids"] == tok.encode(text)
    again, tok2 = load(str(folder))  # and lmlab reads the folder back: same weights, same tokenizer
    with torch.no_grad():
        assert torch.equal(again(ids), model(ids))
    assert tok2.encode(text) == tok.encode(text) and tok2.chat_template == tok.chat_template


BAD_HF_CONFIGS = {
    # name: (config.json changes, text the message must contain)
    "heads-0": ({"num_attention_heads": 0, "head_dim": None}, "n_head: 0 is out of range"),
    "kv-heads-0": ({"num_key_value_heads": 0}, "n_kv_head: 0 is out of range"),
    "layers-negative": ({"num_hidden_layers": -2}, "n_layer: -2 is out of range"),
    "hidden-string": ({"hidden_size": "64"}, "key 'hidden_size' should be int, got '64'"),
    "vocab-float": ({"vocab_size": 96.5}, "key 'vocab_size' should be int"),
    "rope-theta-string": ({"rope_parameters": {"rope_type": "default", "rope_theta": "big"}},
                          "rope_theta: 'big' is not a number"),
    "rope-theta-negative": ({"rope_parameters": {"rope_type": "default", "rope_theta": -1.0}},
                            "rope_theta: -1.0 is out of range"),
    "model-type-list": ({"model_type": ["llama"]}, "model_type ['llama'] is not supported"),
    "model-type-unknown": ({"model_type": "mamba"}, "model_type 'mamba' is not supported"),
    "context-0": ({"max_position_embeddings": 0}, "max_seq_len: 0 is out of range"),
}


@pytest.mark.parametrize("case", BAD_HF_CONFIGS)
def test_bad_config_json_is_one_line_naming_file_and_field(llama_folder, case):
    changes, text = BAD_HF_CONFIGS[case]
    edit_config(llama_folder, **changes)
    with pytest.raises(LmlabError) as info:
        hf.read(llama_folder)
    message = str(info.value)
    assert message.startswith(str(llama_folder / "config.json")) and text in message and "\n" not in message


@pytest.mark.parametrize("content, text", [(b'{"model_type": "ll\xffama"}', "not UTF-8 text"),
                                           (b'{"model_type": ', "not valid JSON"),
                                           (b"[1, 2]", "expected a JSON object"),
                                           (b"", "not valid JSON")])
def test_unreadable_config_json_names_file(llama_folder, content, text):
    (llama_folder / "config.json").write_bytes(content)
    with pytest.raises(LmlabError, match=f"^{llama_folder / 'config.json'}: {text}"):
        hf.read(llama_folder)


def test_integer_weights_are_named(llama_folder):
    from safetensors.torch import load_file, save_file

    path = llama_folder / "model.safetensors"
    sd = load_file(str(path))
    sd["model.norm.weight"] = sd["model.norm.weight"].to(torch.int32)
    save_file(sd, str(path))
    with pytest.raises(LmlabError, match=r"tensor 'model\.norm\.weight' has dtype int32 \(allowed: a floating"):
        hf.read(llama_folder)
