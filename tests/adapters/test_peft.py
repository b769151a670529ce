"""lmlab.adapters.peft: adapters in HF PEFT's layout, checked against PEFT itself on lmlab's HF export.

Both ways (lmlab → PEFT, PEFT → lmlab) the logits agree to ≤ 1e-4 in float32; merged weights equal
base + adapter and differ from the base; bad adapters are one-line errors that name what is wrong.
"""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers_hf import TOL, batch, positions, randomize
from lmlab.adapters import inject_lora, lora_modules, merge_lora, unmerge_lora
from lmlab.adapters.peft import CONFIG_NAME, WEIGHTS_NAME, load_peft, peft_slices, read_peft_config, save_peft
from lmlab.checkpoints import hf
from lmlab.config import preset
from lmlab.errors import LmlabError
from lmlab.model import Transformer

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
V = 96
TARGETS = ["q", "k", "v", "out", "gate", "up", "proj"]


def tiny(name="tiny-llama", **kw):
    torch.manual_seed(0)
    return randomize(Transformer(preset(name, vocab_size=V, **kw)))


def randomize_b(model, std=0.3, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_modules(model).values():
            for p in layer.lora_B.values():
                p.copy_(torch.randn(p.shape, generator=g) * std)


def inputs():
    ids, mask = batch(V, [9, 6], left_pad=True)
    return ids, mask


def lmlab_logits(model):
    ids, mask = inputs()
    with torch.no_grad():
        return model(ids, attention_mask=mask)[mask.bool()]


def hf_logits(model):
    ids, mask = inputs()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits[mask.bool()]


def hf_base(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()


def diff(a, b):
    return (a - b).abs().max().item()


# --------------------------------------------------------------------------- lmlab → PEFT
@pytest.mark.parametrize("name,targets,rslora", [("tiny-llama", TARGETS, False), ("tiny-llama", ["q", "v"], True),
                                                 ("gpt2", ["*.attn.qkv", "*.mlp.fc"], False)])
def test_lmlab_adapter_loads_in_peft_with_same_logits(tmp_path, name, targets, rslora):
    kw = dict(n_layer=2, n_head=4, d_model=32, max_seq_len=64) if name == "gpt2" else {}
    model = tiny(name, **kw)
    base_dir = hf.export(model, None, tmp_path / "base")
    inject_lora(model, targets, r=4, alpha=8, rslora=rslora, slices_of=peft_slices(model.cfg))
    randomize_b(model)
    save_peft(model, tmp_path / "adapter", base_name="tiny-base")
    conf = json.loads((tmp_path / "adapter" / CONFIG_NAME).read_text())
    assert conf["base_model_name_or_path"] == "tiny-base" and conf["use_rslora"] is rslora
    assert conf["fan_in_fan_out"] is (name == "gpt2")
    theirs = peft.PeftModel.from_pretrained(hf_base(base_dir), str(tmp_path / "adapter")).eval()
    ours = lmlab_logits(model)
    assert diff(ours, hf_logits(theirs)) <= TOL
    assert diff(ours, hf_logits(hf_base(base_dir))) > 1e-2  # the adapter matters


def test_gpt2_sliced_lora_is_refused_for_peft_layout(tmp_path):
    model = tiny("gpt2", n_layer=1, n_head=4, d_model=32, max_seq_len=64)
    inject_lora(model, ["q"], r=2)  # a slice of c_attn: PEFT cannot express it
    with pytest.raises(LmlabError, match="c_attn.*peft_slices"):
        save_peft(model, tmp_path / "a")


# --------------------------------------------------------------------------- PEFT → lmlab
def peft_made(tmp_path, model, targets, **kw):
    base_dir = hf.export(model, None, tmp_path / "base")
    base = hf_base(base_dir)
    pm = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=6, target_modules=targets, **kw))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    pm.save_pretrained(str(tmp_path / "adapter"))
    return pm.eval(), tmp_path / "adapter"


@pytest.mark.parametrize("targets,rslora", [(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj"], False),
                                            (["v_proj", "up_proj"], True)])
def test_peft_adapter_loads_into_lmlab_with_same_logits(tmp_path, targets, rslora):
    model = tiny()
    pm, folder = peft_made(tmp_path, model, targets, use_rslora=rslora)
    units = load_peft(model, folder)
    assert "decoder.blocks.1.attn.qkv:v" in units
    assert diff(lmlab_logits(model.eval()), hf_logits(pm)) <= TOL


def test_merged_equals_base_plus_adapter_and_differs_from_base(tmp_path):
    model = tiny()
    base = lmlab_logits(model)
    pm, folder = peft_made(tmp_path, model, ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"])
    load_peft(model, folder)
    adapted = lmlab_logits(model)
    merge_lora(model)
    merged = lmlab_logits(model)
    assert diff(merged, adapted) <= TOL and diff(merged, base) > 1e-2
    assert diff(merged, hf_logits(pm.merge_and_unload())) <= TOL  # PEFT's own merge agrees
    unmerge_lora(model)
    assert diff(lmlab_logits(model), adapted) <= TOL


def test_lmlab_round_trip_of_its_own_peft_folder(tmp_path):
    model = tiny()
    inject_lora(model, TARGETS, r=3, alpha=5, dropout=0.1)
    randomize_b(model)
    want = lmlab_logits(model.eval())
    save_peft(model, tmp_path / "a")
    other = tiny()
    load_peft(other, tmp_path / "a")
    assert diff(lmlab_logits(other.eval()), want) == 0
    assert next(iter(lora_modules(other).values())).dropout == 0.1


# --------------------------------------------------------------------------- bad adapters
def saved(tmp_path, **kw):
    model = tiny(**kw)
    inject_lora(model, ["q", "v"], r=2, alpha=4)
    randomize_b(model)
    return save_peft(model, tmp_path / "a", base_name="tiny-a")


def edit_config(folder, **changes):
    path = folder / CONFIG_NAME
    conf = json.loads(path.read_text())
    conf.update(changes)
    path.write_text(json.dumps(conf))


@pytest.mark.parametrize("change,match", [
    (dict(use_dora=True), "use_dora=True: DoRA"), (dict(rank_pattern={"q_proj": 4}), "rank_pattern"),
    (dict(bias="all"), "bias='all'"), (dict(peft_type="IA3"), "peft_type='IA3'"), (dict(r=0), "r=0")])
def test_unsupported_configs_are_refused(tmp_path, change, match):
    folder = saved(tmp_path)
    edit_config(folder, **change)
    with pytest.raises(LmlabError, match=match):
        read_peft_config(folder)


def test_adapter_for_a_different_base_names_both(tmp_path):
    folder = saved(tmp_path)
    with pytest.raises(LmlabError, match="base model 'tiny-a', not 'smollm2'"):
        load_peft(tiny(), folder, base_name="smollm2")
    wider = tiny(d_model=128, n_head=4, n_kv_head=2)
    with pytest.raises(LmlabError, match=r"shape \(2, 64\).*expects \(2, 128\).*base 'tiny-a'"):
        load_peft(wider, folder)
    assert not lora_modules(wider)  # refused before any change
    deeper = saved(tmp_path / "deep", n_layer=4)
    with pytest.raises(LmlabError, match="adapter for base 'tiny-a' does not fit this model.*layers.2"):
        load_peft(tiny(), deeper)


def test_missing_and_extra_tensors_are_named(tmp_path):
    folder = saved(tmp_path)
    tensors = load_file(str(folder / WEIGHTS_NAME))
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    save_file({k: v for k, v in tensors.items() if k != key}, str(folder / WEIGHTS_NAME))
    with pytest.raises(LmlabError, match="missing tensor '.*layers.0.self_attn.q_proj.lora_B.weight'"):
        load_peft(tiny(), folder)
    save_file({**tensors, "base_model.model.model.norm.weight": torch.ones(64)}, str(folder / WEIGHTS_NAME))
    with pytest.raises(LmlabError, match="unexpected tensor.*model.norm.weight"):
        load_peft(tiny(), folder)
    save_file({**tensors, "model.layers.0.x": torch.ones(2)}, str(folder / WEIGHTS_NAME))
    with pytest.raises(LmlabError, match="does not start with 'base_model.model.'"):
        load_peft(tiny(), folder)


def test_target_matching_nothing_lists_the_linears(tmp_path):
    folder = saved(tmp_path)
    edit_config(folder, target_modules=["q_proj", "query"])
    with pytest.raises(LmlabError, match="'query' matches no linear.*q_proj, k_proj"):
        load_peft(tiny(), folder)


def test_target_modules_are_suffixes_or_full_names(tmp_path):
    conf = read_peft_config(saved(tmp_path))
    assert conf["target_modules"] == ["q_proj", "v_proj"]
    model = tiny()
    inject_lora(model, ["decoder.blocks.0.attn.qkv:q"], r=2)
    save_peft(model, tmp_path / "b")
    assert read_peft_config(tmp_path / "b")["target_modules"] == ["model.layers.0.self_attn.q_proj"]


def test_merged_model_cannot_be_saved_or_loaded_over(tmp_path):
    folder = saved(tmp_path)
    model = tiny()
    load_peft(model, folder)
    with pytest.raises(LmlabError, match="already has LoRA"):
        load_peft(model, folder)
    merge_lora(model)
    with pytest.raises(LmlabError, match="merged"):
        save_peft(model, tmp_path / "b")


def test_loaded_adapter_takes_the_models_mode(tmp_path):
    model = tiny()
    inject_lora(model, ["q"], r=2, dropout=0.5)
    randomize_b(model)
    save_peft(model, tmp_path / "a")
    other = tiny().eval()
    load_peft(other, tmp_path / "a")
    assert not any(layer.training for layer in lora_modules(other).values())


def test_classification_adapter_on_a_language_model_is_refused(tmp_path):
    folder = saved(tmp_path)
    edit_config(folder, task_type="SEQ_CLS")
    with pytest.raises(LmlabError, match="sequence-classification adapter.*SequenceClassifier"):
        load_peft(tiny(), folder)
