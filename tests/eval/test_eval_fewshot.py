"""Few-shot sampling: seeded and per-item deterministic, never the item itself, named samplers."""
import random

import pytest

from lmlab.errors import LmlabError
from lmlab.eval.data import Docs
from lmlab.eval.tasks import fewshot
from lmlab.eval.tasks.task import Task

POOL = [{"q": f"q{i}", "a": i} for i in range(20)]


def test_same_seed_and_item_give_the_same_examples_whatever_ran_before():
    a = fewshot.choose(POOL, 4, item=POOL[3], item_index=3, seed=7)
    random.seed(99)  # the global generator plays no part
    fewshot.choose(POOL, 4, item=POOL[5], item_index=5, seed=7)
    assert fewshot.choose(POOL, 4, item=POOL[3], item_index=3, seed=7) == a
    assert len(a) == 4 and len({d["a"] for d in a}) == 4


def test_seed_and_item_index_change_the_choice():
    draws = {tuple(d["a"] for d in fewshot.choose(POOL, 4, item={}, item_index=i, seed=s))
             for i in range(5) for s in (1, 2)}
    assert len(draws) > 5


def test_the_item_is_never_its_own_example():
    for i, doc in enumerate(POOL):
        for seed in range(5):
            shots = fewshot.choose(POOL, 19, item=doc, item_index=i, seed=seed)
            assert doc not in shots and len(shots) == 19
    # an exact copy of the item elsewhere in the pool is skipped too (MMLU has one in dev)
    pool = POOL + [dict(POOL[0])]
    assert all(d != POOL[0] for d in fewshot.choose(pool, 20, item=POOL[0], item_index=0, sampler_name="first_n"))


def test_first_n_keeps_file_order_and_k_larger_than_the_pool():
    assert fewshot.choose(POOL, 3, item=POOL[1], item_index=1, sampler_name="first_n") == [POOL[0], POOL[2], POOL[3]]
    assert len(fewshot.choose(POOL[:3], 10, item={}, item_index=0)) == 3
    assert fewshot.choose(POOL, 0, item={}, item_index=0) == []


def test_default_is_lm_eval_name_for_random():
    assert fewshot.choose(POOL, 5, item={}, item_index=2, seed=3, sampler_name="default") == \
        fewshot.choose(POOL, 5, item={}, item_index=2, seed=3, sampler_name="random")


def test_unknown_sampler_names_the_known_ones():
    with pytest.raises(LmlabError, match=r"unknown few-shot sampler 'frist_n' \(did you mean 'first_n'\? "
                                         r"known: default, first_n, random\)"):
        fewshot.choose(POOL, 2, item={}, item_index=0, sampler_name="frist_n")
    docs = Docs([{"x": "a", "y": "b"}], ["f.jsonl:1"])
    with pytest.raises(LmlabError, match=r"my.yaml: unknown few-shot sampler 'balanced'"):
        Task("t", docs, "loglikelihood", lambda d: d["x"], lambda d: d["y"], fewshot_sampler="balanced",
             source="my.yaml")


def test_registered_sampler_is_used_by_tasks(monkeypatch):
    monkeypatch.setitem(fewshot.SAMPLERS, "last_n", lambda cands, k, rng: cands[-k:])
    docs = Docs([{"x": f"x{i}", "y": f"y{i}"} for i in range(5)], [f"f:{i}" for i in range(5)])
    task = Task("t", docs, "loglikelihood", lambda d: d["x"], lambda d: d["y"], num_fewshot=2,
                fewshot_sampler="last_n")
    assert task.items()[0].requests["main"][0].context == "x3 y3\n\nx4 y4\n\nx0"
    with pytest.raises(LmlabError, match="already registered"):
        fewshot.register_sampler("last_n", lambda cands, k, rng: cands)
