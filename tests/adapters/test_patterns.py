"""lmlab.adapters.patterns: whole-name globs and regular expressions, layer numbers folded in listings."""
import pytest

from lmlab.adapters.patterns import check_patterns, layer_patterns, listing, matches
from lmlab.errors import LmlabError


def test_globs_and_regexes_match_the_whole_name():
    assert matches("*.qkv", "decoder.blocks.0.attn.qkv")
    assert not matches("*.qkv", "decoder.blocks.0.attn.qkv:q")
    assert matches("decoder.blocks.[0-3].*", "decoder.blocks.3.mlp.proj")
    assert not matches("decoder.blocks.[0-3].*", "decoder.blocks.13.mlp.proj")
    assert not matches("Q", "q")  # case-sensitive
    assert matches(r"re:decoder\.blocks\.1[0-1]\..*", "decoder.blocks.11.attn.out")
    assert not matches("re:attn", "decoder.blocks.0.attn.out")  # no partial regex matches


def test_layer_numbers_fold_into_stars():
    names = ["tok_emb.weight", "decoder.blocks.0.attn.qkv:q", "decoder.blocks.12.attn.qkv:q",
             "decoder.blocks.3.mlp.proj", "decoder.blocks.3.mlp.proj", "lm_head"]
    assert layer_patterns(names) == ["tok_emb.weight", "decoder.blocks.*.attn.qkv:q", "decoder.blocks.*.mlp.proj",
                                     "lm_head"]
    assert listing(names, limit=2) == "tok_emb.weight, decoder.blocks.*.attn.qkv:q and 2 more"


def test_check_patterns():
    assert check_patterns("q", "t") == ["q"]
    assert check_patterns(("q", "v"), "t") == ["q", "v"]
    assert check_patterns([], "t", allow_empty=True) == []
    for bad, msg in (([], "t: no pattern given"), ([" "], "not a non-empty string"), ([3], "not a non-empty string"),
                     (["re:*"], "not a valid regular expression")):
        with pytest.raises(LmlabError, match=msg):
            check_patterns(bad, "t")
