"""lmlab.finetune.heads/export + adapters.peft SEQ_CLS: classifiers agree with HF and PEFT (≤ 1e-4, float32)."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers_hf import TOL, batch, randomize
from lmlab.adapters import inject_lora, lora_modules
from lmlab.adapters.peft import WEIGHTS_NAME, load_peft, peft_slices, save_peft
from lmlab.checkpoints import hf
from lmlab.config import preset
from lmlab.errors import LmlabError
from lmlab.finetune.export import export_classifier
from lmlab.finetune.heads import SequenceClassifier, last_token, mean_pool
from lmlab.model import Transformer

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
V, LABELS = 96, ["neg", "neu", "pos"]
SIZES = {"tiny-llama": {}, "gpt2": dict(n_layer=2, n_head=4, d_model=32, max_seq_len=64),
         "bert-base": dict(n_layer=2, n_head=4, d_model=32, d_ff=64, max_seq_len=64)}
TARGETS = {"tiny-llama": ["q", "v", "gate", "proj"], "gpt2": ["*.attn.qkv", "*.mlp.fc"], "bert-base": ["q", "v", "fc"]}


def classifier(name, seed=0):
    torch.manual_seed(seed)
    backbone = randomize(Transformer(preset(name, vocab_size=V, pad_id=0, **SIZES[name])))
    model = SequenceClassifier(backbone, LABELS)
    randomize(model)  # the head too
    return model.eval()


def inputs():
    return batch(V, [9, 5, 7], left_pad=False)  # right padding with id 0, real tokens ≥ 3


def ours(model):
    ids, mask = inputs()
    with torch.no_grad():
        return model(ids, attention_mask=mask)


def theirs(model):
    ids, mask = inputs()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def hf_cls(folder):
    return transformers.AutoModelForSequenceClassification.from_pretrained(
        str(folder), num_labels=len(LABELS), dtype=torch.float32).eval()


def diff(a, b):
    return (a - b).abs().max().item()


def test_pooling_by_hand():
    h = torch.arange(24.0).view(2, 3, 4)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    torch.testing.assert_close(last_token(h, mask), torch.stack([h[0, 1], h[1, 2]]))
    torch.testing.assert_close(mean_pool(h, mask), torch.stack([h[0, :2].mean(0), h[1].mean(0)]))


def test_padding_does_not_change_a_rows_logits():
    model = classifier("tiny-llama")
    ids, mask = inputs()
    with torch.no_grad():
        alone = model(ids[1:2, :5])
        padded = model(ids, attention_mask=mask)[1:2]
    assert diff(alone, padded) <= 1e-5


@pytest.mark.parametrize("name", list(SIZES))
def test_lmlab_classifier_adapter_loads_in_peft(tmp_path, name):
    model = classifier(name)
    base_dir = hf.export(model.backbone, None, tmp_path / "base")
    inject_lora(model.backbone, TARGETS[name], r=4, alpha=8, slices_of=peft_slices(model.cfg))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for layer in lora_modules(model).values():
            for p in layer.lora_B.values():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    save_peft(model, tmp_path / "adapter")
    conf = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert conf["task_type"] == "SEQ_CLS" and {"classifier", "score"} <= set(conf["modules_to_save"])
    pm = peft.PeftModel.from_pretrained(hf_cls(base_dir), str(tmp_path / "adapter")).eval()
    assert diff(ours(model), theirs(pm)) <= TOL
    # and back into lmlab: a fresh classifier (another random head) becomes the same model
    other = classifier(name, seed=7)
    other.backbone.load_state_dict(model.backbone.state_dict(), strict=False)
    load_peft(other, tmp_path / "adapter")
    assert diff(ours(other.eval()), ours(model)) == 0


def test_peft_made_classifier_adapter_loads_into_lmlab(tmp_path):
    model = classifier("tiny-llama")
    base_dir = hf.export(model.backbone, None, tmp_path / "base")
    pm = peft.get_peft_model(hf_cls(base_dir), peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8,
                                                               target_modules=["q_proj", "v_proj", "up_proj"]))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n or "score" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    pm.save_pretrained(str(tmp_path / "adapter"))
    load_peft(model, tmp_path / "adapter")
    assert diff(ours(model), theirs(pm.eval())) <= TOL


def test_adapter_without_the_head_is_refused(tmp_path):
    model = classifier("tiny-llama")
    inject_lora(model.backbone, ["q"], r=2)
    folder = save_peft(model, tmp_path / "a")
    tensors = load_file(str(folder / WEIGHTS_NAME))
    save_file({k: v for k, v in tensors.items() if "score" not in k}, str(folder / WEIGHTS_NAME))
    with pytest.raises(LmlabError, match="missing tensor 'base_model.model.score.weight'.*random"):
        load_peft(classifier("tiny-llama"), folder)


@pytest.mark.parametrize("name", list(SIZES))
def test_export_classifier_merges_lora_and_loads_in_hf(tmp_path, name):
    model = classifier(name)
    inject_lora(model.backbone, TARGETS[name], r=4, slices_of=peft_slices(model.cfg))
    with torch.no_grad():
        for layer in lora_modules(model).values():
            for p in layer.lora_B.values():
                p.normal_(0, 0.3)
    want = ours(model)
    folder = export_classifier(model, None, tmp_path / "cls")
    hf_model, info = transformers.AutoModelForSequenceClassification.from_pretrained(
        str(folder), dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"], info
    assert hf_model.config.id2label == dict(enumerate(LABELS))
    assert diff(want, theirs(hf_model.eval())) <= TOL
    assert lora_modules(model)  # the original keeps its adapters


def test_bad_settings():
    backbone = Transformer(preset("tiny-llama", vocab_size=V))
    with pytest.raises(LmlabError, match="pooling 'cls' is not available for an decoder"):
        SequenceClassifier(backbone, LABELS, pooling="cls")
    with pytest.raises(LmlabError, match="two distinct labels"):
        SequenceClassifier(backbone, ["a", "a"])
    with pytest.raises(LmlabError, match="mean pooling has no HF"):
        SequenceClassifier(backbone, LABELS, pooling="mean").peft_heads()
