"""Which test items a grid scores: all, the first N, or a seeded random N that is the same in every cell."""
import pytest

from lmlab.errors import LmlabError
from lmlab.icl.experiment import GridConfig, scored_items


def test_limit_takes_the_first_items():
    assert scored_items(10, GridConfig(limit=3)) == [0, 1, 2]
    assert scored_items(2, GridConfig(limit=3)) == [0, 1]
    assert scored_items(4, GridConfig()) == [0, 1, 2, 3]


def test_sample_is_seeded_sorted_and_distinct():
    a = scored_items(872, GridConfig(sample=100))
    assert a == scored_items(872, GridConfig(sample=100, sample_seed=0))  # the same items every time
    assert len(set(a)) == 100 and a == sorted(a) and 0 <= a[0] and a[-1] < 872
    assert a != list(range(100))  # not the first 100
    assert a != scored_items(872, GridConfig(sample=100, sample_seed=1))
    assert scored_items(5, GridConfig(sample=100)) == [0, 1, 2, 3, 4]  # more than there are: all


def test_bad_sample_settings():
    with pytest.raises(LmlabError, match="--sample must be at least 1"):
        GridConfig(sample=0).check(100)
    with pytest.raises(LmlabError, match="give one, not both"):
        GridConfig(sample=5, limit=5).check(100)


def test_a_label_word_that_tokenizes_to_nothing_stops_the_grid(tiny):
    """A BPE vocabulary without an unknown token drops characters it lacks: a Chinese word is no tokens at all."""
    import string

    from tokenizers import Tokenizer as HFTokenizer, models

    from lmlab.eval.data import Docs
    from lmlab.eval.engine import Engine
    from lmlab.icl.experiment import Grid
    from lmlab.icl.prompt import Prompt
    from lmlab.icl.tasks import ICLTask
    from lmlab.tokenizer import Tokenizer

    model, _ = tiny
    tok = Tokenizer(HFTokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(set(string.printable)))},
                                           merges=[])))
    assert tok.encode("正面") == [] and tok.encode("good")
    docs = Docs([{"text": "fine", "label": "pos"}, {"text": "dull", "label": "neg"}], ["f:1", "f:2"])
    task = ICLTask("t", docs, docs, ["neg", "pos"], Prompt("{text} => {label}", {"neg": "正面", "pos": "good"}))
    with pytest.raises(LmlabError, match="the verbalizer's word '正面' for label 'neg' tokenizes to nothing"):
        Grid(Engine(model, tok, progress=False), task, GridConfig(shots=[1]), progress=False)
    task.prompt = Prompt("{text} => {label}", {"neg": "bad", "pos": "good"})
    Grid(Engine(model, tok, progress=False), task, GridConfig(shots=[1]), progress=False)  # fine words pass
