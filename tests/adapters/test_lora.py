"""lmlab.adapters.lora: the LoRA math by hand, fused slices = separate modules (and = HF PEFT),
merge/unmerge, dropout, gradients, target patterns, adapter state dicts."""
import copy
import math

import pytest
import torch
import torch.nn as nn

from lmlab.adapters import (LoRALinear, inject_lora, load_lora_state_dict, lora_modules, lora_settings,
                            lora_state_dict, merge_lora, unload_lora, unmerge_lora)
from lmlab.config import preset
from lmlab.errors import LmlabError
from lmlab.model import Transformer


def tiny(name="tiny-llama", **kw):
    torch.manual_seed(0)
    return Transformer(preset(name, **kw)).eval()


def randomize_b(model, std=0.2, seed=1):
    """Give every B a random value, so each adapter changes the output (a fresh B is zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_modules(model).values():
            for p in layer.lora_B.values():
                p.copy_(torch.randn(p.shape, generator=g) * std)


def ids(model, B=2, T=7, seed=3):
    return torch.randint(0, model.cfg.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- one layer, by hand
@pytest.mark.parametrize("rslora", [False, True])
def test_output_is_base_plus_scaled_low_rank_product(rslora):
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    layer = LoRALinear(base, r=3, alpha=4.0, rslora=rslora)
    A, B = torch.randn(3, 6), torch.randn(5, 3)
    with torch.no_grad():
        layer.lora_A["all"].copy_(A)
        layer.lora_B["all"].copy_(B)
    x = torch.randn(2, 4, 6)
    scaling = 4.0 / (math.sqrt(3) if rslora else 3)
    want = x @ base.weight.T + base.bias + (x @ A.T @ B.T) * scaling
    assert layer.scaling == pytest.approx(scaling)
    torch.testing.assert_close(layer(x), want, atol=1e-6, rtol=0)


def test_new_adapter_changes_nothing_and_a_is_kaiming_uniform():
    torch.manual_seed(0)
    base = nn.Linear(64, 32)
    layer = LoRALinear(base, r=8, alpha=16)
    x = torch.randn(3, 64)
    assert torch.equal(layer(x), base(x))
    A = layer.lora_A["all"]
    assert A.abs().max() <= 1 / math.sqrt(64) and A.abs().max() > 0.5 / math.sqrt(64)  # bound 1/√fan_in
    assert torch.count_nonzero(layer.lora_B["all"]) == 0
    assert layer.base is base and layer.base.weight is base.weight  # wrapped, not copied


def fused_and_split(d=8, sizes=(("q", 8), ("k", 4), ("v", 4)), bias=True, seed=0):
    torch.manual_seed(seed)
    parts = {s: nn.Linear(d, n, bias=bias) for s, n in sizes}
    fused = nn.Linear(d, sum(n for _, n in sizes), bias=bias)
    slices, at = {}, 0
    with torch.no_grad():
        for s, n in sizes:
            fused.weight[at:at + n] = parts[s].weight
            if bias:
                fused.bias[at:at + n] = parts[s].bias
            slices[s] = (at, at + n)
            at += n
    return fused, parts, slices


def test_fused_slices_equal_separate_adapters_on_the_split_linear():
    fused, parts, slices = fused_and_split()
    layer = LoRALinear(fused, r=2, alpha=3, slices=slices, targets=["q", "v"])
    assert layer.targets == ["q", "v"] and set(layer.lora_B) == {"q", "v"}
    assert layer.lora_B["v"].shape == (4, 2)
    sep = {s: LoRALinear(parts[s], r=2, alpha=3) for s in ("q", "v")}
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for s in ("q", "v"):
            for ours, theirs in ((layer.lora_A[s], sep[s].lora_A["all"]), (layer.lora_B[s], sep[s].lora_B["all"])):
                ours.copy_(torch.randn(ours.shape, generator=g))
                theirs.copy_(ours)
    x = torch.randn(2, 3, 8)
    want = torch.cat([sep["q"](x), parts["k"](x), sep["v"](x)], dim=-1)
    torch.testing.assert_close(layer(x), want, atol=1e-6, rtol=0)
    assert torch.equal(layer(x)[..., 8:12], fused(x)[..., 8:12])  # an untargeted slice is the base output, bit for bit


def test_merge_adds_exactly_the_deltas_and_unmerge_takes_them_back():
    fused, _, slices = fused_and_split()
    layer = LoRALinear(fused, r=2, alpha=3, slices=slices, targets=["q", "v"]).eval()
    randomize_b(nn.ModuleDict({"l": layer}))
    w0 = fused.weight.detach().clone()
    x = torch.randn(4, 8)
    before = layer(x)
    assert not torch.allclose(before, nn.functional.linear(x, w0, fused.bias), atol=1e-3)  # the adapter matters
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(fused.weight[0:8], w0[0:8] + layer.delta("q"), atol=1e-6, rtol=0)
    torch.testing.assert_close(fused.weight[12:16], w0[12:16] + layer.delta("v"), atol=1e-6, rtol=0)
    assert torch.equal(fused.weight[8:12], w0[8:12])  # k rows untouched
    assert not torch.allclose(fused.weight, w0, atol=1e-4)  # merge did something
    torch.testing.assert_close(layer(x), before, atol=1e-6, rtol=0)  # merged = unmerged outputs
    with pytest.raises(LmlabError, match="already merged"):
        layer.merge()
    torch.testing.assert_close(layer(x), before, atol=1e-6, rtol=0)  # the refused second merge added nothing
    layer.unmerge()
    torch.testing.assert_close(fused.weight, w0, atol=1e-6, rtol=0)
    torch.testing.assert_close(layer(x), before, atol=1e-6, rtol=0)
    with pytest.raises(LmlabError, match="not merged"):
        layer.unmerge()


def test_dropout_only_on_the_adapter_input_and_only_in_training():
    torch.manual_seed(0)
    base = nn.Linear(16, 16)
    layer = LoRALinear(base, r=4, alpha=8, dropout=0.5)
    x = torch.randn(8, 16)
    assert torch.equal(layer.train()(x), base(x))  # B = 0: dropout never touches the base path
    randomize_b(nn.ModuleDict({"l": layer}))
    layer.eval()
    no_drop = base(x) + x @ layer.lora_A["all"].T @ layer.lora_B["all"].T * layer.scaling
    torch.testing.assert_close(layer(x), no_drop, atol=1e-6, rtol=0)
    assert torch.equal(layer(x), layer(x))
    layer.train()
    a, b = layer(x), layer(x)
    assert not torch.equal(a, b) and not torch.allclose(a, no_drop, atol=1e-3)


def test_half_precision_base_keeps_float32_adapters():
    base = nn.Linear(8, 8).to(torch.bfloat16)
    layer = LoRALinear(base, r=2, alpha=2)
    assert layer.lora_A["all"].dtype == torch.float32
    y = layer(torch.randn(3, 8, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16


@pytest.mark.parametrize("kw, msg", [(dict(r=0), "rank r"), (dict(r=2.5), "rank r"), (dict(alpha=0), "alpha"),
                                     (dict(dropout=1.0), "dropout"), (dict(targets=["x"]), "no slice 'x'"),
                                     (dict(slices={"q": (0, 4), "k": (5, 8)}), "slice 'k' covers rows 5..8"),
                                     (dict(slices={"q": (0, 4)}), "cover rows 0..4 but the layer has 8")])
def test_bad_layer_settings_are_named(kw, msg):
    args = dict(r=2, alpha=2) | kw
    with pytest.raises(LmlabError, match=msg):
        LoRALinear(nn.Linear(8, 8), **args)
    with pytest.raises(LmlabError, match="needs an nn.Linear"):
        LoRALinear(nn.Embedding(4, 4), r=2, alpha=2)


# --------------------------------------------------------------------------- against HF PEFT
class Separate(nn.Module):
    """HF-style projections, one module each."""

    def __init__(self, parts):
        super().__init__()
        for s, lin in parts.items():
            setattr(self, f"{s}_proj", lin)

    def forward(self, x):
        return (torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], -1),
                torch.cat([self.gate_proj(x), self.up_proj(x)], -1))


class Fused(nn.Module):
    def __init__(self, qkv, gate_up):
        super().__init__()
        self.qkv, self.gate_up = qkv, gate_up

    def forward(self, x):
        return self.qkv(x), self.gate_up(x)


def peft_pair(rslora, dropout=0.0):
    """(lmlab fused model, PEFT-wrapped separate model) holding the same weights and adapters."""
    peft = pytest.importorskip("peft")
    qkv, p1, s1 = fused_and_split(d=12, sizes=(("q", 12), ("k", 6), ("v", 6)), seed=0)
    gate_up, p2, s2 = fused_and_split(d=12, sizes=(("gate", 20), ("up", 20)), bias=False, seed=1)
    theirs = peft.inject_adapter_in_model(
        peft.LoraConfig(r=4, lora_alpha=10, lora_dropout=dropout, use_rslora=rslora,
                        target_modules=["q_proj", "v_proj", "gate_proj", "up_proj"]),
        Separate(copy.deepcopy(p1 | p2)))
    ours = Fused(qkv, gate_up)
    slices = {"qkv": s1, "gate_up": s2}
    names = inject_lora(ours, ["q", "v", "gate", "up"], r=4, alpha=10, dropout=dropout, rslora=rslora,
                        slices_of=lambda name, lin: slices.get(name))
    assert names == ["qkv:q", "qkv:v", "gate_up:gate", "gate_up:up"]
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for s in ("q_proj", "v_proj", "gate_proj", "up_proj"):
            b = getattr(theirs, s).lora_B["default"].weight
            b.copy_(torch.randn(b.shape, generator=g) * 0.3)
    # PEFT's saved names ↔ ours: q_proj ↔ qkv:q, gate_proj ↔ gate_up:gate (what the checkpoint maps will do)
    to_ours = {"q_proj": "qkv.{}.q", "v_proj": "qkv.{}.v", "gate_proj": "gate_up.{}.gate", "up_proj": "gate_up.{}.up"}
    sd = {}
    for key, t in peft.get_peft_model_state_dict(theirs).items():
        module, ab, _ = key.split(".")
        sd[to_ours[module].format(ab)] = t
    load_lora_state_dict(ours, sd)
    return ours.eval(), theirs.eval()


@pytest.mark.parametrize("rslora", [False, True])
def test_fused_lora_equals_peft_on_separate_projections(rslora):
    ours, theirs = peft_pair(rslora)
    assert ours.qkv.scaling == pytest.approx(theirs.q_proj.scaling["default"])
    x = torch.randn(3, 5, 12)
    base_out = [lin.base(x) for lin in (ours.qkv, ours.gate_up)]
    for a, b, base in zip(ours(x), theirs(x), base_out):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
        assert not torch.allclose(a, base, atol=1e-3)  # the adapters are doing something
    merge_lora(ours)
    for s in ("q_proj", "v_proj", "gate_proj", "up_proj"):
        getattr(theirs, s).merge()
    qkv, gate_up = ours.qkv.base.weight, ours.gate_up.base.weight
    torch.testing.assert_close(qkv[0:12], theirs.q_proj.base_layer.weight, atol=1e-6, rtol=0)
    torch.testing.assert_close(qkv[12:18], theirs.k_proj.weight, atol=0, rtol=0)
    torch.testing.assert_close(qkv[18:24], theirs.v_proj.base_layer.weight, atol=1e-6, rtol=0)
    torch.testing.assert_close(gate_up[0:20], theirs.gate_proj.base_layer.weight, atol=1e-6, rtol=0)
    torch.testing.assert_close(gate_up[20:40], theirs.up_proj.base_layer.weight, atol=1e-6, rtol=0)
    for a, b in zip(ours(x), theirs(x)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_training_dropout_draws_the_same_masks_as_peft():
    ours, theirs = peft_pair(rslora=False, dropout=0.3)
    ours.train(), theirs.train()
    x = torch.randn(2, 5, 12)
    torch.manual_seed(11)
    a = ours(x)
    torch.manual_seed(11)
    b = theirs(x)
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, atol=1e-6, rtol=0)
    torch.manual_seed(12)
    assert not torch.allclose(ours(x)[0], a[0], atol=1e-4)  # the masks are random


# --------------------------------------------------------------------------- whole models
def test_inject_on_a_transformer_targets_slices_and_freezes_the_rest():
    model = tiny()
    ref = model(ids(model))
    names = inject_lora(model, ["q", "v"], r=4, alpha=8)
    assert names == [f"decoder.blocks.{i}.attn.qkv:{s}" for i in range(2) for s in "qv"]
    layer = model.decoder.blocks[0].attn.qkv
    cfg = model.cfg
    q, kv = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
    assert layer.slices == {"q": (0, q), "k": (q, q + kv), "v": (q + kv, q + 2 * kv)}
    assert layer.lora_B["v"].shape == (kv, 4) and q != kv
    torch.testing.assert_close(model(ids(model)), ref, atol=0, rtol=0)  # fresh adapters: same logits
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"decoder.blocks.{i}.attn.qkv.lora_{ab}.{s}" for i in range(2) for ab in "AB" for s in "qv"}


def test_lora_settings_record_what_was_injected():
    model = tiny()
    inject_lora(model, ["v", "decoder.blocks.1.mlp.proj"], r=3, alpha=5, dropout=0.1, rslora=True)
    assert lora_settings(model) == {"r": 3, "alpha": 5.0, "dropout": 0.1, "rslora": True, "units": [
        "decoder.blocks.0.attn.qkv:v", "decoder.blocks.1.attn.qkv:v", "decoder.blocks.1.mlp.proj"]}
    model.decoder.blocks[1].mlp.proj = LoRALinear(model.decoder.blocks[1].mlp.proj.base, r=4, alpha=5)
    with pytest.raises(LmlabError, match=r"differ in r \(3, 4\)"):
        lora_settings(model)


def test_gradients_reach_only_the_adapters():
    model = tiny()
    inject_lora(model, ["*.attn.qkv", "proj"], r=2, alpha=4)
    randomize_b(model)
    model.train()
    x = ids(model)
    model(x, labels=x).backward()
    for name, p in model.named_parameters():
        if ".lora_" in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None and not p.requires_grad, name


def test_freeze_base_false_leaves_base_trainable():
    model = tiny()
    inject_lora(model, ["out"], r=2, alpha=4, freeze_base=False)
    assert all(p.requires_grad for p in model.parameters())


def test_merged_model_matches_and_unload_restores_plain_linears():
    model = tiny()
    original = copy.deepcopy(model)
    inject_lora(model, ["q", "k", "v", "out", "gate", "up", "proj"], r=4, alpha=8, rslora=True)
    randomize_b(model)
    x = ids(model)
    with torch.no_grad():
        adapted = model(x)
        assert not torch.allclose(adapted, original(x), atol=1e-3)
        assert merge_lora(model) == list(lora_modules(model))
        torch.testing.assert_close(model(x), adapted, atol=1e-5, rtol=0)
        with pytest.raises(LmlabError, match="already merged"):
            merge_lora(model)
        unmerge_lora(model)
        base = {n.replace(".base.", "."): p for n, p in model.state_dict().items() if ".lora_" not in n}
        assert list(base) == list(original.state_dict())
        for n, p0 in original.state_dict().items():
            torch.testing.assert_close(base[n], p0, atol=1e-6, rtol=0)
        unload_lora(model, merge=True)
        assert not lora_modules(model)
        assert all(type(m) is nn.Linear for n, m in model.named_modules() if n.endswith((".qkv", ".out", ".proj", ".gate_up")))
        assert list(model.state_dict()) == list(original.state_dict())  # the base names are back
        torch.testing.assert_close(model(x), adapted, atol=1e-5, rtol=0)


def test_unload_without_merge_gives_back_the_base_model():
    model = tiny()
    original = copy.deepcopy(model)
    inject_lora(model, ["q", "up"], r=2, alpha=4)
    randomize_b(model)
    merge_lora(model)
    unload_lora(model, merge=False)
    for (n, p), (n0, p0) in zip(model.state_dict().items(), original.state_dict().items()):
        assert n == n0
        torch.testing.assert_close(p, p0, atol=1e-6, rtol=0)


def test_merged_adapter_refuses_to_train():
    model = tiny()
    inject_lora(model, ["q"], r=2, alpha=4)
    merge_lora(model)
    model.train()
    with pytest.raises(LmlabError, match="unmerge it before training"):
        model(ids(model))
    with torch.no_grad():
        model(ids(model))  # no gradient wanted: fine


def test_tied_lm_head_adapts_but_refuses_to_merge():
    model = tiny()
    assert model.lm_head.weight is model.tok_emb.weight
    assert inject_lora(model, "lm_head", r=2, alpha=4) == ["lm_head"]
    randomize_b(model)
    emb = model.tok_emb.weight.detach().clone()
    with pytest.raises(LmlabError, match="lm_head: its weight is shared"):
        merge_lora(model)
    with pytest.raises(LmlabError, match="lm_head: its weight is shared"):
        unload_lora(model)
    assert torch.equal(model.tok_emb.weight, emb)
    both = tiny()
    inject_lora(both, ["q", "lm_head"], r=2, alpha=4)
    randomize_b(both)
    qkv = both.decoder.blocks[0].attn.qkv.base.weight.detach().clone()
    with pytest.raises(LmlabError, match="lm_head: its weight is shared"):
        merge_lora(both)
    assert not any(layer.merged for layer in lora_modules(both).values())  # all checked before any merged
    assert torch.equal(both.decoder.blocks[0].attn.qkv.base.weight, qkv)
    untied = tiny(tie_embeddings=False)
    inject_lora(untied, "lm_head", r=2, alpha=4)
    randomize_b(untied)
    x = ids(untied)
    with torch.no_grad():
        before = untied(x)
        merge_lora(untied)
        torch.testing.assert_close(untied(x), before, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- target patterns
def test_target_pattern_forms():
    def names(targets, **kw):
        return inject_lora(tiny(**kw), targets, r=2, alpha=2)

    assert names("*.attn.qkv") == [f"decoder.blocks.{i}.attn.qkv:{s}" for i in range(2) for s in "qkv"]
    assert names("decoder.blocks.0.attn.qkv:k") == ["decoder.blocks.0.attn.qkv:k"]
    assert names("*qkv:[kv]") == [f"decoder.blocks.{i}.attn.qkv:{s}" for i in range(2) for s in "kv"]
    assert names(r"re:decoder\.blocks\.1\..*:v") == ["decoder.blocks.1.attn.qkv:v"]
    assert names("re:gate|up") == [f"decoder.blocks.{i}.mlp.gate_up:{s}" for i in range(2) for s in ("gate", "up")]
    assert names(["decoder.blocks.1.*", "lm_head"]) == [
        "decoder.blocks.1.attn.qkv:q", "decoder.blocks.1.attn.qkv:k", "decoder.blocks.1.attn.qkv:v",
        "decoder.blocks.1.attn.out", "decoder.blocks.1.mlp.gate_up:gate", "decoder.blocks.1.mlp.gate_up:up",
        "decoder.blocks.1.mlp.proj", "lm_head"]
    assert len(names("*")) == 2 * 7 + 1  # every unit of every linear, the head too
    assert names(["q", "q", "*.qkv:q"]) == ["decoder.blocks.0.attn.qkv:q", "decoder.blocks.1.attn.qkv:q"]
    assert names("fc", name="baby-gpt", n_layer=1) == ["decoder.blocks.0.mlp.fc"]


def test_short_names_reach_cross_attention_in_an_encoder_decoder():
    model = tiny("t5-small", n_layer=1, d_model=32, n_head=2, head_dim=16, d_ff=64, vocab_size=64)
    ref = model(ids(model), encoder_input_ids=ids(model, seed=4))
    assert inject_lora(model, ["q", "k"], r=2, alpha=2) == [
        "encoder.blocks.0.attn.qkv:q", "encoder.blocks.0.attn.qkv:k",
        "decoder.blocks.0.attn.qkv:q", "decoder.blocks.0.attn.qkv:k",
        "decoder.blocks.0.cross.q", "decoder.blocks.0.cross.kv:k"]
    randomize_b(model)
    with torch.no_grad():
        adapted = model(ids(model), encoder_input_ids=ids(model, seed=4))
        assert not torch.allclose(adapted, ref, atol=1e-3)
        merge_lora(model)
        torch.testing.assert_close(model(ids(model), encoder_input_ids=ids(model, seed=4)), adapted,
                                   atol=1e-5, rtol=0)


def test_unknown_target_lists_what_exists_once_per_kind():
    model = tiny()
    with pytest.raises(LmlabError) as e:
        inject_lora(model, ["q", "gte"], r=2, alpha=2)
    msg = str(e.value)
    assert "lora target 'gte' matches no linear layer (did you mean 'gate'?)" in msg
    assert "short names: q, k, v, out, gate, up, proj, lm_head" in msg
    assert "decoder.blocks.*.attn.qkv:q" in msg and "decoder.blocks.*.mlp.proj" in msg
    assert "blocks.0" not in msg and "blocks.1" not in msg and msg.count("attn.out") == 1
    assert "\n" not in msg
    assert not lora_modules(model)  # nothing injected when a pattern fails
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("targets, msg", [([], "no pattern given"), ([""], "not a non-empty string"),
                                          (["re:(q"], "not a valid regular expression"),
                                          (["*.attn.qkv:x"], "matches no linear layer")])
def test_bad_targets_are_named(targets, msg):
    with pytest.raises(LmlabError, match=msg):
        inject_lora(tiny(), targets, r=2, alpha=2)


def test_bad_settings_injecting_twice_and_bad_slices_are_errors():
    model = tiny()
    with pytest.raises(LmlabError, match="rank r must be a positive integer"):
        inject_lora(model, "q", r=-1, alpha=2)
    inject_lora(model, "q", r=2, alpha=2)
    with pytest.raises(LmlabError, match="already has LoRA adapters"):
        inject_lora(model, "v", r=2, alpha=2)
    with pytest.raises(LmlabError, match=r"decoder.blocks.0.attn.qkv: slices cover rows 0..10 but the layer has 128"):
        inject_lora(tiny(), "q", r=2, alpha=2, slices_of=lambda name, lin: {"q": (0, 10)} if "qkv" in name else None)


# --------------------------------------------------------------------------- adapter state dicts
def test_lora_state_dict_round_trip_and_keys():
    model = tiny()
    base = copy.deepcopy(model)
    inject_lora(model, ["q", "v", "out"], r=3, alpha=6)
    randomize_b(model)
    sd = lora_state_dict(model)
    assert set(sd) == {k for k in model.state_dict() if ".lora_" in k}
    assert sd["decoder.blocks.0.attn.out.lora_A.all"].shape == (3, 64)
    assert sd["decoder.blocks.1.attn.qkv.lora_B.v"].shape == (32, 3)
    inject_lora(base, ["q", "v", "out"], r=3, alpha=6)
    x = ids(model)
    with torch.no_grad():
        assert not torch.allclose(base(x), model(x), atol=1e-3)
        load_lora_state_dict(base, {k: v.clone() for k, v in sd.items()})
        torch.testing.assert_close(base(x), model(x), atol=0, rtol=0)


def test_load_lora_state_dict_is_strict():
    model = tiny()
    inject_lora(model, ["q", "v"], r=2, alpha=2)
    sd = {k: v.clone() for k, v in lora_state_dict(model).items()}
    model.decoder.blocks[0].attn.qkv.lora_A["q"].data.add_(1.0)  # differs from sd: a partial load would show
    before = {k: v.clone() for k, v in lora_state_dict(model).items()}
    missing = dict(sd)
    del missing["decoder.blocks.1.attn.qkv.lora_B.v"]
    with pytest.raises(LmlabError, match=r"a.safetensors: missing 1 LoRA tensor\(s\): decoder.blocks.1.attn.qkv.lora_B.v"):
        load_lora_state_dict(model, missing, source="a.safetensors")
    with pytest.raises(LmlabError, match=r"1 unexpected tensor\(s\).*decoder.blocks.0.attn.qkv.lora_A.k"):
        load_lora_state_dict(model, sd | {"decoder.blocks.0.attn.qkv.lora_A.k": torch.zeros(2, 64)})
    bad = sd | {"decoder.blocks.0.attn.qkv.lora_A.q": torch.zeros(4, 64)}
    with pytest.raises(LmlabError, match=r"'decoder.blocks.0.attn.qkv.lora_A.q' has shape \(4, 64\), the model "
                                         r"expects \(2, 64\)"):
        load_lora_state_dict(model, bad)
    with pytest.raises(LmlabError, match="is a list, not a tensor"):
        load_lora_state_dict(model, sd | {"decoder.blocks.0.attn.qkv.lora_A.q": [0.0]})
    for k, v in lora_state_dict(model).items():  # the refused loads wrote nothing
        assert torch.equal(v, before[k]), k
    merge_lora(model)
    with pytest.raises(LmlabError, match="cannot load while LoRA is merged"):
        load_lora_state_dict(model, sd)
    with pytest.raises(LmlabError, match="no LoRA adapters"):
        load_lora_state_dict(tiny(), sd)
    with pytest.raises(LmlabError, match="no LoRA adapters"):
        lora_state_dict(tiny())


def test_quantized_base_keeps_the_adapter_but_refuses_to_merge():
    from lmlab.inference.quantize import quantize_model

    model = tiny()
    inject_lora(model, ["q", "v"], r=2, alpha=4)
    randomize_b(model)
    layer = model.decoder.blocks[0].attn.qkv
    x = torch.randn(2, 3, 64)
    with torch.no_grad():
        update = layer(x) - layer.base(x)
        quantize_model(model, "int8")
        assert type(layer.base).__name__ == "Int8Linear"
        torch.testing.assert_close(layer(x) - layer.base(x), update, atol=1e-5, rtol=0)
    with pytest.raises(LmlabError, match="base layer is now Int8Linear"):
        merge_lora(model)


def test_fused_slices_of_smollm2_grouped_query_attention():
    from lmlab.adapters import fused_slices

    slices_of = fused_slices(preset("smollm2-135m"))
    assert slices_of("decoder.blocks.29.attn.qkv", None) == {"q": (0, 576), "k": (576, 768), "v": (768, 960)}
    assert slices_of("decoder.blocks.0.mlp.gate_up", None) == {"gate": (0, 1536), "up": (1536, 3072)}
    assert slices_of("decoder.blocks.0.attn.out", None) is None
