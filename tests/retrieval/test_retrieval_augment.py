"""Retrieval augmentation: passages placed before prompts and evaluation items, and In-Context RALM
perplexity equal to a hand-built reference on a tiny random model."""
import string

import pytest
import torch
import torch.nn.functional as F
from retrieval_fakes import BagOfWords

from lmlab.config import preset
from lmlab.errors import LmlabError
from lmlab.eval import evaluate
from lmlab.eval.data import Docs
from lmlab.eval.engine import Engine
from lmlab.eval.requests import MAIN, LoglikelihoodRolling
from lmlab.eval.tasks.task import Task
from lmlab.model import Transformer
from lmlab.retrieval import index
from lmlab.retrieval.augment import Augmenter
from lmlab.tokenizer import Tokenizer

PASSAGES = ["the cat sat on the mat all day", "ships sail across the sea at night", "bread is baked in an oven",
            "the sea is deep and blue", "cats chase mice in the barn"]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    tok = Tokenizer.char_level(string.printable)
    model = Transformer(preset("tiny-llama", vocab_size=tok.vocab_size, max_seq_len=128)).eval()
    return model, tok


@pytest.fixture(scope="module", params=["bm25", "dense"])
def retriever(request):
    return index.build(request.param, PASSAGES, BagOfWords() if request.param == "dense" else None)


def test_prompts_follow_their_passages_best_first(retriever):
    aug = Augmenter(retriever, k=2, separator=" | ")
    (p,) = aug.prompts(["where do ships sail on the sea"])
    first, second, prompt = p.split(" | ")
    assert first == "ships sail across the sea at night" and second in PASSAGES and second != first
    hits = retriever.search(["where do ships sail on the sea"], 2).indices[0]
    assert [first, second] == [PASSAGES[i] for i in hits]
    assert prompt == "where do ships sail on the sea"


def toy_task(**kw):
    docs = Docs([{"q": "which animal sat on the mat", "about": "cat mat"},
                 {"q": "where is bread baked", "about": "bread oven"}], ["toy.jsonl:1", "toy.jsonl:2"])
    return Task("toy", docs, "multiple_choice", doc_to_text=lambda d: f"Q: {d['q']}\nA:",
                doc_to_choice=lambda d: ["yes", "no"], doc_to_target=lambda d: 0, fewshot_docs=docs,
                num_fewshot=1, fewshot_sampler="first_n", **kw)


def test_items_get_the_passage_between_demonstrations_and_their_own_text(retriever):
    task = toy_task()
    items = Augmenter(retriever).items(task, task.items())
    for item, passage in zip(items, ["the cat sat on the mat all day", "bread is baked in an oven"]):
        assert item.prefix and "Q:" in item.prefix  # one demonstration, left as it was
        for r in item.requests[MAIN]:
            assert r.context == f"{item.prefix}{passage}\nQ: {item.doc['q']}\nA:"
        assert item.doc["retrieved"] == passage


def test_items_retrieve_by_doc_to_query(retriever):
    task = toy_task(doc_to_query=lambda d: "ships at sea")
    items = Augmenter(retriever).items(task, task.items())
    assert all(i.doc["retrieved"] == "ships sail across the sea at night" for i in items)


def reference_ralm(model, tok, text, passages_by_block, window, stride):
    """Each block of `stride` tokens scored after [bos] + passage + '\n' (at most half the window) + the
    preceding text that fits."""
    tokens = tok.encode(text)
    bos = tok.bos_id if tok.bos_id is not None else (tok.eos_id if tok.eos_id is not None else 0)
    total = 0.0
    for b, s in enumerate(range(0, len(tokens), stride)):
        end = min(s + stride, len(tokens))
        head = [] if b == 0 else ([bos] + tok.encode(passages_by_block[b] + "\n", add_special_tokens=False))[:window // 2]
        seq = [bos] + tokens
        inp = head + seq[max(0, end - (window - len(head))):end]
        with torch.inference_mode():
            logp = F.log_softmax(model(torch.tensor([inp])).float(), -1)[0]
        n = end - s
        total += sum(float(logp[len(inp) - n + j, tokens[s + j]]) for j in range(n))
    return total, len(tokens)


def test_ralm_equals_a_hand_built_reference(tiny):
    model, tok = tiny
    text = "the sea is calm. ships sail at night and cats sleep on the mat while bread bakes in the oven."
    r = index.build("bm25", PASSAGES)
    aug = Augmenter(r, query_tokens=12)
    engine = Engine(model, tok, batch_size=3, progress=False)
    (got,) = aug.rolling(engine, [LoglikelihoodRolling(text)], window=64, stride=16)
    tokens = tok.encode(text)
    queries = [tok.decode(tokens[max(0, s - 12):s]) for s in range(16, len(tokens), 16)]
    passages = [None] + aug.passages(queries)
    want, n = reference_ralm(model, tok, text, passages, window=64, stride=16)
    assert got.n_tokens == n and got.logprob == pytest.approx(want, abs=1e-3)
    # the passages change the score (they are really read), and a batch size does not
    plain = engine.loglikelihood_rolling([LoglikelihoodRolling(text)], window=64, stride=16)[0]
    assert abs(plain.logprob - got.logprob) > 1e-2
    again = aug.rolling(Engine(model, tok, batch_size=1, progress=False), [LoglikelihoodRolling(text)],
                        window=64, stride=16)[0]
    assert again.logprob == pytest.approx(got.logprob, abs=1e-4)


def test_evaluate_with_retrieval_records_it_and_changes_scores(tiny, retriever):
    model, tok = tiny
    rolling = Task("roll", Docs([{"t": "ships sail across the sea. cats chase mice in the barn at night."}],
                                ["r.jsonl:1"]), "loglikelihood_rolling", doc_to_text=lambda d: "",
                   doc_to_target=lambda d: d["t"])
    aug = Augmenter(retriever, query_tokens=8)
    kw = dict(rolling_window=48, rolling_stride=8, progress=False, max_length=128)
    with_r = evaluate(model, tok, [toy_task(), rolling], augment=aug, log_samples=True, **kw)
    without = evaluate(model, tok, [toy_task(), rolling], **kw)
    assert with_r["config"]["retrieval"]["kind"] == retriever.kind and "retrieval" not in without["config"]
    assert with_r["config"]["retrieval"]["stride"] == 8
    assert with_r["samples"]["toy"][0]["doc"]["retrieved"] == "the cat sat on the mat all day"
    a, b = with_r["results"]["roll"]["word_perplexity"], without["results"]["roll"]["word_perplexity"]
    assert a != pytest.approx(b, rel=1e-4)


def test_k_larger_than_the_index_is_an_error(retriever):
    with pytest.raises(LmlabError, match=r"--retrieve-k 6 is larger than the index idx/, which holds 5 passages"):
        Augmenter(retriever, k=6, name="idx/")
    for bad in (0, -1, True, 1.5):
        with pytest.raises(LmlabError, match="must be a positive integer"):
            Augmenter(retriever, k=bad)


def test_a_stride_that_leaves_no_room_for_a_passage_is_an_error(tiny, retriever):
    model, tok = tiny
    engine = Engine(model, tok, progress=False)
    with pytest.raises(LmlabError, match="retrieval stride 32 leaves no room for a passage in a 32-token window"):
        Augmenter(retriever).rolling(engine, [LoglikelihoodRolling("some text")], window=32, stride=32)
