"""lmlab.adapters.freeze: freezing by name pattern, counts, errors that list what exists."""
import pytest
import torch

from lmlab.adapters import first_blocks, freeze, inject_lora, param_counts, unfreeze
from lmlab.config import preset
from lmlab.errors import LmlabError
from lmlab.model import Transformer


def tiny(**kw):
    torch.manual_seed(0)
    return Transformer(preset("tiny-llama", **kw))


def frozen_names(model):
    return {n for n, p in model.named_parameters() if not p.requires_grad}


def numel(model, prefix):
    return sum(p.numel() for n, p in model.named_parameters() if n.startswith(prefix))


def test_freeze_embedding_counts_a_tied_weight_once():
    model = tiny()
    total = model.num_params()
    counts = freeze(model, "tok_emb")
    emb = model.tok_emb.weight.numel()
    assert counts.frozen == emb and counts.trainable == total - emb and counts.total == total
    assert not model.lm_head.weight.requires_grad  # the same parameter
    assert param_counts(model) == counts


def test_first_blocks_freeze_whole_blocks_by_module_prefix():
    model = tiny(n_layer=4)
    counts = freeze(model, first_blocks(2))
    assert frozen_names(model) == {n for n, _ in model.named_parameters() if n.startswith(("decoder.blocks.0.",
                                                                                         "decoder.blocks.1."))}
    assert counts.frozen == numel(model, "decoder.blocks.0.") + numel(model, "decoder.blocks.1.")
    glob = tiny(n_layer=4)
    freeze(glob, "decoder.blocks.[0-1].*")
    assert frozen_names(glob) == frozen_names(model)
    regex = tiny(n_layer=4)
    freeze(regex, r"re:decoder\.blocks\.[01]\..*")
    assert frozen_names(regex) == frozen_names(model)
    assert freeze(tiny(), first_blocks(0)).frozen == 0  # no pattern: nothing frozen


def test_globs_over_parameter_names_and_unfreeze():
    model = tiny()
    freeze(model, ["*norm*"])
    assert frozen_names(model) == {n for n, _ in model.named_parameters() if "norm" in n}
    unfreeze(model, "decoder.norm")
    assert "decoder.norm.weight" not in frozen_names(model)
    assert "decoder.blocks.0.norm1.weight" in frozen_names(model)


def test_unfreeze_a_head_next_to_lora():
    model = tiny(tie_embeddings=False)
    inject_lora(model, ["q", "v"], r=2, alpha=4)
    counts = unfreeze(model, "lm_head")
    lora = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
    assert counts.trainable == lora + model.lm_head.weight.numel()


def test_unknown_pattern_lists_parameter_kinds_once():
    model = tiny(n_layer=3)
    with pytest.raises(LmlabError) as e:
        freeze(model, ["tok_emb", "decoder.layers.0"])
    msg = str(e.value)
    assert msg.startswith("freeze pattern 'decoder.layers.0' matches no parameter; parameters: tok_emb.weight, ")
    assert "decoder.blocks.*.attn.qkv.weight" in msg and "blocks.0" not in msg and msg.count("norm1") == 1
    assert all(p.requires_grad for p in model.parameters())  # a failing call freezes nothing
    with pytest.raises(LmlabError, match="freeze pattern 'decoder.blocks.3' matches no parameter"):
        freeze(model, first_blocks(6))
    with pytest.raises(LmlabError, match="not a valid regular expression"):
        freeze(model, "re:[")
    with pytest.raises(LmlabError, match="unfreeze pattern 'x'"):
        unfreeze(model, "x")
    with pytest.raises(LmlabError, match="n must be a non-negative integer"):
        first_blocks(-1)
