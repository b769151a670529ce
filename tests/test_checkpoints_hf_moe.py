"""HF Mixtral / Qwen2-MoE (and sliding-window Mistral / Qwen2) folders: lmlab's logits equal transformers'
and lmlab exports them back (transformers loads the export with the same logits)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

transformers = pytest.importorskip("transformers")

from helpers_hf import TOL, batch, max_diff_at, positions, randomize  # noqa: E402
from lmlab.checkpoints import hf, load  # noqa: E402
from lmlab.errors import LmlabError  # noqa: E402
from lmlab.model import Transformer  # noqa: E402

V = 64
COMMON = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=64)

MODELS = {
    "mixtral": lambda: transformers.MixtralForCausalLM(transformers.MixtralConfig(
        intermediate_size=24, num_local_experts=4, num_experts_per_tok=2, **COMMON)),
    "qwen2_moe": lambda: transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(
        intermediate_size=40, moe_intermediate_size=16, shared_expert_intermediate_size=20, num_experts=4,
        num_experts_per_tok=2, **COMMON)),
    "qwen2_moe-renorm-dense-layer": lambda: transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(
        intermediate_size=40, moe_intermediate_size=16, shared_expert_intermediate_size=20, num_experts=4,
        num_experts_per_tok=3, norm_topk_prob=True, mlp_only_layers=[0], tie_word_embeddings=True, **COMMON)),
    "mistral-window": lambda: transformers.MistralForCausalLM(transformers.MistralConfig(
        intermediate_size=48, sliding_window=5, head_dim=8, **COMMON)),
    "qwen2-window": lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        intermediate_size=48, use_sliding_window=True, sliding_window=4, max_window_layers=1, **COMMON)),
    "mixtral-window": lambda: transformers.MixtralForCausalLM(transformers.MixtralConfig(
        intermediate_size=24, num_local_experts=3, num_experts_per_tok=1, sliding_window=6, **COMMON)),
}


def hf_logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits


@pytest.fixture(params=list(MODELS))
def saved(request, tmp_path):
    torch.manual_seed(0)
    model = randomize(MODELS[request.param]())
    model.save_pretrained(str(tmp_path / "hf"))
    return request.param, model, tmp_path


def test_logits_match_hf_and_export_round_trips(saved):
    name, theirs, tmp = saved
    model, _ = load(str(tmp / "hf"))
    assert model.cfg.family == name.split("-")[0]
    if "window" in name:
        assert model.cfg.attn_window is not None
        assert model.cfg.window_layers == ([1] if name.startswith("qwen2") else None)
    for left_pad in (True, False):  # padding is not routed by lmlab; HF's routed pads change no real token
        ids, mask = batch(V, [20, 13, 17], left_pad=left_pad)  # longer than every window
        want = hf_logits(theirs, ids, mask)
        with torch.no_grad():
            ours = model(ids, attention_mask=mask)
        assert max_diff_at(ours, want, mask) <= TOL, left_pad
    if "window" in name:  # the window matters at this length: full attention would differ
        full = Transformer(dataclasses.replace(model.cfg, attn_window=None, window_layers=None)).eval()
        full.load_state_dict(model.state_dict())
        with torch.no_grad():
            assert max_diff_at(full(ids, attention_mask=mask), want, mask) > 1e-2
    hf.export(model, None, tmp / "back")
    back, info = type(theirs).from_pretrained(str(tmp / "back"), output_loading_info=True, dtype=torch.float32)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert max_diff_at(hf_logits(back.eval(), ids, mask), want, mask) <= TOL
    assert type(back.config) is type(theirs.config)


def test_moe_config_fields_from_hf(saved):
    name, theirs, tmp = saved
    if "moe" not in name and "mixtral" not in name:
        pytest.skip("dense")
    cfg = load(str(tmp / "hf"))[0].cfg
    c = theirs.config
    assert cfg.moe_experts == (c.num_local_experts if name.startswith("mixtral") else c.num_experts)
    assert cfg.moe_top_k == c.num_experts_per_tok
    if name.startswith("qwen2_moe"):
        assert (cfg.moe_d_ff, cfg.moe_shared_d_ff, cfg.moe_renormalize) == \
            (c.moe_intermediate_size, c.shared_expert_intermediate_size, c.norm_topk_prob)
        assert cfg.moe_layers == ([1] if c.mlp_only_layers else None)


def test_export_refuses_moe_config_mixtral_cannot_hold():
    from lmlab.config import preset

    cfg = preset("tiny-llama", attn_bias=False, moe_experts=4, moe_layers=[1], family="mixtral")
    with pytest.raises(LmlabError, match="moe_layers"):
        hf.export(Transformer(cfg), None, "/nonexistent/never-written")


@pytest.mark.parametrize("kw", [dict(family="mixtral"),
                                dict(family="qwen2_moe", attn_bias=True, moe_shared_d_ff=24, moe_d_ff=16,
                                     moe_layers=[1], moe_renormalize=False)])
def test_name_pieces_agree_with_exported_tensors(kw):
    from lmlab.config import preset

    torch.manual_seed(0)
    model = randomize(Transformer(preset("tiny-llama", moe_experts=3, moe_top_k=2, **kw)))
    exported, ours = hf.hf_state_dict(model, kw["family"]), model.state_dict()
    pieces = hf.name_pieces(model.cfg)
    assert {p.theirs for p in pieces} == set(exported)
    for p in pieces:
        t = ours[p.ours]
        assert torch.equal(exported[p.theirs], (t.flatten(0, 1) if t.dim() == 3 else t)[p.start:p.stop]), p
        assert hf.from_hf(model.cfg, p.theirs) == p
    w_in = hf.to_hf(model.cfg, "decoder.blocks.1.mlp.w_in")
    assert [p.theirs.split("experts.")[1] for p in w_in][:2] == (
        ["0.w1.weight", "0.w3.weight"] if kw["family"] == "mixtral" else ["0.gate_proj.weight", "0.up_proj.weight"])
