"""Saved indexes: reload gives identical results; a wrong embedding model or a damaged file is an error
that names it; saving replaces a folder atomically."""
import json

import numpy as np
import pytest
from retrieval_fakes import BagOfWords

from lmlab.errors import LmlabError
from lmlab.retrieval import index, store
from lmlab.retrieval.bm25 import BM25Retriever
from lmlab.retrieval.dense import DenseRetriever

POOL = ["alpha beta gamma", "beta gamma delta", "gamma delta epsilon", "delta epsilon zeta",
        "épsilon ünïcode text", "one more line\nwith a newline", "quote \" and backslash \\ inside"]
QUERIES = ["beta delta", "zeta", "unicode text", "newline"]


def built(kind):
    return index.build(kind, POOL, BagOfWords("bag-a") if kind == "dense" else None)


@pytest.mark.parametrize("kind", ["bm25", "dense"])
def test_save_and_reload_give_identical_results(kind, tmp_path):
    r = built(kind)
    before = r.search(QUERIES, 3, exclude=[0, None, [4], None])
    r.save(tmp_path / "idx")
    again = index.load(tmp_path / "idx", BagOfWords("bag-a") if kind == "dense" else None)
    assert type(again) is type(r) and again.texts == POOL
    after = again.search(QUERIES, 3, exclude=[0, None, [4], None])
    np.testing.assert_array_equal(before.indices, after.indices)
    np.testing.assert_array_equal(before.scores, after.scores)
    manifest = json.loads((tmp_path / "idx" / store.MANIFEST).read_text())
    assert manifest["kind"] == kind and manifest["count"] == len(POOL)


def test_dense_index_records_its_model_and_refuses_another(tmp_path):
    built("dense").save(tmp_path / "idx")
    assert json.loads((tmp_path / "idx" / store.MANIFEST).read_text())["encoder"] == "bag-a"
    with pytest.raises(LmlabError, match="built with embedding model 'bag-a', cannot search it with 'bag-b'"):
        DenseRetriever.load(tmp_path / "idx", BagOfWords("bag-b"))
    with pytest.raises(LmlabError, match="built with embedding model 'bag-a'; pass that encoder"):
        index.load(tmp_path / "idx")  # a fake encoder has no spec to load it again by
    with pytest.raises(LmlabError, match="gives 32-dim vectors, the index holds 64-dim ones"):
        DenseRetriever.load(tmp_path / "idx", BagOfWords("bag-a", dim=32)).search(["alpha"], 1)


def damage(path, how):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if how == "truncate" else data[:-9] + bytes([data[-9] ^ 0xFF]) + data[-8:])


@pytest.mark.parametrize("kind,name", [("dense", "index.faiss"), ("bm25", "bm25/data.csc.index.npy"),
                                       ("bm25", "bm25/vocab.index.json"), ("dense", store.TEXTS)])
@pytest.mark.parametrize("how", ["truncate", "flip"])
def test_damaged_file_is_named(kind, name, how, tmp_path):
    built(kind).save(tmp_path / "idx")
    damage(tmp_path / "idx" / name, how)
    with pytest.raises(LmlabError, match=f"{name}: corrupt or truncated"):
        index.load(tmp_path / "idx", BagOfWords("bag-a") if kind == "dense" else None)


def test_unreadable_faiss_file_with_matching_checksum_is_named(tmp_path):
    built("dense").save(tmp_path / "idx")
    f = tmp_path / "idx" / "index.faiss"
    f.write_bytes(b"not a faiss index at all")
    manifest = json.loads((tmp_path / "idx" / store.MANIFEST).read_text())
    manifest["files"]["index.faiss"] = store._sha256(f)
    (tmp_path / "idx" / store.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(LmlabError, match="index.faiss: cannot read the faiss index"):
        DenseRetriever.load(tmp_path / "idx", BagOfWords("bag-a"))


def test_missing_or_foreign_folders(tmp_path):
    with pytest.raises(LmlabError, match="not a saved retriever index"):
        index.load(tmp_path)
    built("bm25").save(tmp_path / "idx")
    (tmp_path / "idx" / "bm25" / "params.index.json").unlink()
    with pytest.raises(LmlabError, match="params.index.json: missing from the saved index"):
        index.load(tmp_path / "idx")
    with pytest.raises(LmlabError, match="a 'bm25' index, not 'dense'"):
        DenseRetriever.load(tmp_path / "idx", BagOfWords("bag-a"))
    (tmp_path / "idx" / store.MANIFEST).write_text("{not json")
    with pytest.raises(LmlabError, match="retriever.json: not valid JSON"):
        index.load(tmp_path / "idx")


def test_save_replaces_atomically(tmp_path, monkeypatch):
    built("bm25").save(tmp_path / "idx")
    other = BM25Retriever().index(["completely different texts", "here now"])
    monkeypatch.setattr(BM25Retriever, "_save_files", lambda self, folder: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        other.save(tmp_path / "idx")
    assert index.load(tmp_path / "idx").texts == POOL  # the old index survives a failed save
    assert [p.name for p in tmp_path.iterdir()] == ["idx"]
    monkeypatch.undo()
    other.save(tmp_path / "idx")
    assert index.load(tmp_path / "idx").texts == other.texts


def test_build_names_unknown_kinds():
    with pytest.raises(LmlabError, match="unknown retriever 'bm52'"):
        index.build("bm52", POOL)
    with pytest.raises(LmlabError, match="takes no encoder"):
        index.build("bm25", POOL, BagOfWords())
