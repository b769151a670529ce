"""`lmlab index` and `--retrieve` end to end: the index round-trips through disk with identical results,
a failed build never touches an earlier index, and bad input is one line naming the culprit."""
import json
import string

import numpy as np
import pytest
import torch

from lmlab import cli
from lmlab.retrieval import index, store
from lmlab.retrieval.corpus import read_corpus

ROWS = [{"text": "the cat sat on the mat", "id": 1}, {"text": "ships sail across the sea", "id": 2},
        {"text": "the cat sat on the mat", "id": 3}, {"text": "bread is baked in an oven", "id": 4}]


def lmlab(capsys, *argv):
    """Run the CLI in-process: (exit code, stdout, stderr)."""
    try:
        cli.main([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def corpus(tmp_path):
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (tmp_path / "b.txt").write_text("the sea is deep and blue\n\ncats chase mice in the barn\n")
    return tmp_path


def test_index_round_trips_with_identical_results(corpus, tmp_path, capsys):
    code, out, err = lmlab(capsys, "index", corpus / "a.jsonl", corpus / "b.txt", "-o", tmp_path / "idx")
    assert code == 0, err
    assert "read 6 passages from 2 file(s); 1 exact duplicates dropped" in err and "indexed 5 passages (bm25)" in out
    texts = read_corpus([corpus / "a.jsonl", corpus / "b.txt"]).texts
    assert texts == ["the cat sat on the mat", "ships sail across the sea", "bread is baked in an oven",
                     "the sea is deep and blue", "cats chase mice in the barn"]
    loaded = index.load(tmp_path / "idx")
    fresh = index.build("bm25", texts)
    queries = ["where is the cat", "blue sea ships", "oven bread"]
    a, b = loaded.search(queries, 3), fresh.search(queries, 3)
    assert loaded.texts == texts
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_array_equal(a.scores, b.scores)


def test_a_failed_build_leaves_the_earlier_index_and_a_foreign_folder_is_refused(corpus, tmp_path, capsys):
    assert lmlab(capsys, "index", corpus / "a.jsonl", "-o", tmp_path / "idx")[0] == 0
    before = (tmp_path / "idx" / store.MANIFEST).read_text()
    (corpus / "bad.jsonl").write_text('{"text": "fine"}\n{"text": oops}\n')
    code, _, err = lmlab(capsys, "index", corpus / "bad.jsonl", "-o", tmp_path / "idx")
    assert code == 1 and f"{corpus / 'bad.jsonl'}:2: not valid JSON" in err and len(err.strip().splitlines()) == 1
    assert (tmp_path / "idx" / store.MANIFEST).read_text() == before and len(index.load(tmp_path / "idx")) == 3
    assert lmlab(capsys, "index", corpus / "b.txt", "-o", tmp_path / "idx")[0] == 0  # an index is replaced whole
    assert index.load(tmp_path / "idx").texts == ["the sea is deep and blue", "cats chase mice in the barn"]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    code, _, err = lmlab(capsys, "index", corpus / "b.txt", "-o", tmp_path / "mine")
    assert code == 1 and "not a saved index; it would be replaced" in err
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize("content,name,message", [
    ("", "empty.txt", "no passages to index (empty corpus)"),
    ("\n  \n", "blank.jsonl", "no passages to index (empty corpus)"),
    ('{"text": "a b"}\nnot json\n', "c.jsonl", "c.jsonl:2: not valid JSON"),
    ('{"text": "a b"}\n{"body": "x"}\n', "d.jsonl", "d.jsonl:2: no field 'text' (fields: body)"),
    ('{"text": 3}\n', "e.jsonl", "e.jsonl:1: field 'text' is int, expected a string"),
    ('[1, 2]\n', "f.jsonl", "f.jsonl:1: expected a JSON object, got list"),
])
def test_bad_corpus_is_one_line_naming_file_and_line(tmp_path, capsys, content, name, message):
    (tmp_path / name).write_text(content)
    code, _, err = lmlab(capsys, "index", tmp_path / name, "-o", tmp_path / "idx")
    assert code == 1 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "idx").exists()


def test_bad_options(corpus, tmp_path, capsys):
    code, _, err = lmlab(capsys, "index", corpus / "b.txt", "-o", tmp_path / "i", "--kind", "dens")
    assert code == 1 and "dens" in err and "dense" in err
    code, _, err = lmlab(capsys, "index", corpus / "b.txt", "-o", tmp_path / "i", "--embed", "x")
    assert code == 1 and "--embed applies to --kind dense only" in err
    code, _, err = lmlab(capsys, "index", tmp_path / "missing.txt", "-o", tmp_path / "i")
    assert code == 1 and "missing.txt: no such file or folder" in err


@pytest.fixture
def saved(corpus, tmp_path, capsys):
    assert lmlab(capsys, "index", corpus / "a.jsonl", corpus / "b.txt", "-o", tmp_path / "idx")[0] == 0
    return tmp_path / "idx"


@pytest.mark.parametrize("command", ["generate", "eval"])
def test_retrieve_checks_the_index_before_loading_a_model(saved, capsys, command):
    args = ["-m", "no-such-model"] + (["-p", "hi"] if command == "generate" else ["--tasks", "boolq"])
    code, _, err = lmlab(capsys, command, *args, "--retrieve", saved, "--retrieve-k", 9)
    assert code == 1 and f"--retrieve-k 9 is larger than the index {saved}, which holds 5 passages" in err
    data = (saved / store.TEXTS).read_bytes()
    (saved / store.TEXTS).write_bytes(data[: len(data) // 2])
    code, _, err = lmlab(capsys, command, *args, "--retrieve", saved)
    assert code == 1 and f"{saved / store.TEXTS}: corrupt or truncated" in err
    code, _, err = lmlab(capsys, command, *args, "--retrieve", saved.parent / "nope")
    assert code == 1 and "not a saved retriever index" in err


def test_generate_reads_the_retrieved_passage(saved, tmp_path, capsys):
    from tiny_gguf import write_tiny

    write_tiny(tmp_path / "tiny.gguf")
    code, out, err = lmlab(capsys, "generate", "-m", tmp_path / "tiny.gguf", "-p", "where do ships sail",
                           "--retrieve", saved, "--max-new-tokens", 3, "--temperature", 0, "--threads", 1)
    assert code == 0, err
    assert out.startswith("ships sail across the sea\nwhere do ships sail")


# --------------------------------------------------------------------------- dense: tiny random encoders
def tiny_encoder(folder, seed):
    from lmlab.checkpoints import native
    from lmlab.config import preset
    from lmlab.model import Transformer
    from lmlab.tokenizer import Tokenizer

    torch.manual_seed(seed)
    tok = Tokenizer.char_level(string.ascii_lowercase + " .,")
    cfg = preset("bert-base", vocab_size=tok.vocab_size, n_layer=1, n_head=2, d_model=16, d_ff=32,
                 max_seq_len=64, mlm_head=False, pooler=False)
    native.save(Transformer(cfg).eval(), tok, folder)
    return folder


def test_dense_index_names_both_models_when_queried_with_another(corpus, tmp_path, capsys):
    a, b = tiny_encoder(tmp_path / "enc-a", 0), tiny_encoder(tmp_path / "enc-b", 1)
    code, out, err = lmlab(capsys, "index", corpus / "b.txt", "-o", tmp_path / "idx", "--dense", "--embed", a)
    assert code == 0, err
    assert "indexed 2 passages (dense, enc-a@" in out
    manifest = json.loads((tmp_path / "idx" / store.MANIFEST).read_text())
    assert manifest["encoder"].startswith("enc-a@")
    code, _, err = lmlab(capsys, "eval", "-m", "no-such-model", "--tasks", "boolq", "--retrieve", tmp_path / "idx",
                         "--retrieve-embed", b)
    assert code == 1 and f"built with embedding model '{manifest['encoder']}', cannot search it with 'enc-b@" in err
    from lmlab.retrieval.augment import load

    aug = load(tmp_path / "idx")  # the recorded model is loaded again: same results as the saved vectors
    assert aug.retriever.encoder.name == manifest["encoder"]
    assert aug.hits(["cats chase mice in the barn"]) == [[1]]
    faiss_file = tmp_path / "idx" / "index.faiss"
    faiss_file.write_bytes(faiss_file.read_bytes()[:-40])
    code, _, err = lmlab(capsys, "eval", "-m", "x", "--tasks", "boolq", "--retrieve", tmp_path / "idx")
    assert code == 1 and f"{faiss_file}: corrupt or truncated" in err
