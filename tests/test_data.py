"""Data preparation: token shards, separators, validation split, streaming, tokenizers and bad input."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lmlab.data import PrepareConfig, TokenData, prepare
from lmlab.data.corpus import expand_inputs, iter_pieces, read_text_blocks
from lmlab.data.prepare import pick_dtype
from lmlab.data.tokenizers import train_bpe
from lmlab.tokenizer import Tokenizer
from lmlab.errors import LmlabError

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
DOCS = ["Hello wörld, this is the first document.\nIt has two lines.",
        "Zweites Dokument — mit Umlauten: äöü ß. 中文也可以。",
        "third\n\nwith a blank line inside"]


def write_corpus(tmp_path: Path) -> list[Path]:
    paths = []
    for i, d in enumerate(DOCS):
        p = tmp_path / f"doc{i}.txt"
        p.write_text(d, encoding="utf-8")
        paths.append(p)
    return paths


def all_tokens(data: TokenData) -> list[int]:
    return data.train.read(0, len(data.train)).tolist() + (
        data.val.read(0, len(data.val)).tolist() if data.val is not data.train else [])


def test_prepare_roundtrip_with_separators(tmp_path):
    write_corpus(tmp_path)
    meta = prepare(PrepareConfig(inputs=[str(tmp_path / "doc*.txt")], out_dir=str(tmp_path / "out"),
                                 val_fraction=0.2, workers=1, progress=False))
    data = TokenData(tmp_path / "out")
    ids = all_tokens(data)
    assert meta["dtype"] == "uint16" and meta["tokens"] == len(ids)
    sep = data.sep_id
    texts = data.tokenizer.decode(ids, skip_special_tokens=False).split("<|endoftext|>")
    assert texts == DOCS + [""]
    assert ids.count(sep) == 3 and ids[-1] == sep
    assert abs(meta["val_tokens"] - round(0.2 * len(ids))) <= 1
    assert (tmp_path / "out" / "train_000.bin").stat().st_size == 2 * meta["train_tokens"]


def test_streaming_small_blocks_and_two_workers_match_one(tmp_path):
    """Tiny read blocks and work units (multi-byte characters cut by block edges) give the same tokens;
    2 worker processes write exactly what 1 does."""
    text = "".join(f"Línea {i}: ünïcödé ✓ 中文 {'x' * (i % 7)}\n" for i in range(3000))
    (tmp_path / "big.txt").write_text(text, encoding="utf-8")
    pieces = list(iter_pieces([tmp_path / "big.txt"], block_bytes=37))
    assert "".join(p.text for p in pieces) == text and all(p.text.endswith("\n") for p in pieces[:-1])
    outs = {}
    for workers in (1, 2):
        cfg = PrepareConfig(inputs=[str(tmp_path / "big.txt")], out_dir=str(tmp_path / f"w{workers}"),
                            workers=workers, chunk_chars=5000, progress=False)
        meta = prepare(cfg)
        outs[workers] = all_tokens(TokenData(cfg.out_dir))
        assert meta["val_tokens"] > 0
    assert outs[1] == outs[2]
    tok = TokenData(tmp_path / "w2").tokenizer
    assert tok.decode(outs[2]) == text  # the split interleaves but tokens stay in order
    # the validation part of each work unit is its tail: about 10% overall
    meta = json.loads((tmp_path / "w2" / "meta.json").read_text())
    assert abs(meta["val_tokens"] / meta["tokens"] - 0.1) < 0.01


def test_doc_boundaries_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("p one\nstill one\n\n\np two\n  \np three\n")
    docs = [p.text for p in iter_pieces([tmp_path / "a.txt"], "blank_line")]
    assert docs == ["p one\nstill one", "p two", "p three"]
    assert [p.text for p in iter_pieces([tmp_path / "a.txt"], "line")] == ["p one", "still one", "p two", "p three"]
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "first"}) + "\n\n" + json.dumps({"text": "second"}) + "\n")
    assert [(p.text, p.end_of_doc) for p in iter_pieces([tmp_path / "c.jsonl"])] == [("first", True), ("second", True)]
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"txt": "no"}\n')
    with pytest.raises(LmlabError, match=r"bad.jsonl:2: expected an object with a string field 'text'"):
        list(iter_pieces([tmp_path / "bad.jsonl"]))
    (tmp_path / "bad2.jsonl").write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(LmlabError, match=r"bad2.jsonl:2: not valid JSON"):
        list(iter_pieces([tmp_path / "bad2.jsonl"]))


def test_documents_index(tmp_path):
    (tmp_path / "a.txt").write_text("aa\n\nbbb\n\nc\n")
    prepare(PrepareConfig(inputs=[str(tmp_path / "a.txt")], out_dir=str(tmp_path / "o"), doc_boundary="blank_line",
                          val_fraction=0.0, workers=1, progress=False))
    data = TokenData(tmp_path / "o")
    docs = data.train.documents(data.sep_id)
    assert [data.tokenizer.decode(data.train.read(s, e - s).tolist()) for s, e in docs] == ["aa", "bbb", "c"]
    w = data.train.windows(5, 3, torch.Generator().manual_seed(0))
    assert w.shape == (5, 3) and w.dtype == torch.int64


def test_not_utf8_names_file_and_offset(tmp_path):
    p = tmp_path / "latin1.txt"
    p.write_bytes("good text\n".encode() * 100 + "café".encode("latin-1"))
    with pytest.raises(LmlabError, match=r"latin1.txt: not UTF-8 text \(invalid byte 0xe9 at byte offset 1003\)"):
        list(read_text_blocks(p, block_bytes=64))
    with pytest.raises(LmlabError, match="byte offset 1003"):
        prepare(PrepareConfig(inputs=[str(p)], out_dir=str(tmp_path / "o"), progress=False))


def test_empty_corpus_and_missing_inputs(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    for tokenizer in ("char", None):
        cfg = PrepareConfig(inputs=[str(tmp_path / "empty.txt")], out_dir=str(tmp_path / "o"), progress=False)
        if tokenizer is None:
            Tokenizer.char_level("abc").save(tmp_path)
            cfg.tokenizer = str(tmp_path / "tokenizer.json")
        with pytest.raises(LmlabError, match="corpus is empty"):
            prepare(cfg)
    with pytest.raises(LmlabError, match="no such file, folder or glob match"):
        expand_inputs([str(tmp_path / "nothing*.txt")])
    (tmp_path / "sub").mkdir()
    with pytest.raises(LmlabError, match="folder holds no"):
        expand_inputs([str(tmp_path / "sub")])


def test_vocabulary_too_big_for_dtype(tmp_path):
    assert pick_dtype("auto", 65536) == "uint16" and pick_dtype("auto", 65537) == "uint32"
    big = Tokenizer.char_level(chr(0x10000 + i) for i in range(70000))
    big.save(tmp_path)
    (tmp_path / "c.txt").write_text(chr(0x10005) * 10, encoding="utf-8")
    cfg = PrepareConfig(inputs=[str(tmp_path / "c.txt")], out_dir=str(tmp_path / "o"), dtype="uint16",
                        tokenizer=str(tmp_path / "tokenizer.json"), progress=False)
    with pytest.raises(LmlabError, match=r"\(70001 ids\) does not fit dtype uint16"):
        prepare(cfg)
    cfg.dtype = "auto"
    assert prepare(cfg)["dtype"] == "uint32"
    assert np.fromfile(tmp_path / "o" / "train_000.bin", dtype=np.uint32).max() < 70001


def test_train_bpe_roundtrip(tmp_path):
    text = " ".join(["the cat sat on the mat with another cat"] * 200)
    tok = train_bpe([text, "ünïcode too ✓"], vocab_size=300, show_progress=False)
    assert 256 < tok.vocab_size <= 300 and tok.token(tok.eos_id) == "<|endoftext|>"
    for s in ("the cat sat", "ünïcode ✓ never seen: Ωmega"):
        assert tok.decode(tok.encode(s)) == s
    assert len(tok.encode("the cat sat on the mat")) < len("the cat sat on the mat") / 2
    with pytest.raises(LmlabError, match="corpus is empty"):
        train_bpe(["", "  "], vocab_size=300, show_progress=False)


def test_cli_tokenizer_train_then_prepare(tmp_path, capsys):
    from lmlab.cli import main

    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"document number {i} says hello"}) + "\n" for i in range(300)))
    with pytest.raises(SystemExit) as e:
        main(["tokenizer", "train", str(corpus), "-o", str(tmp_path / "tok"), "--vocab-size", "320"])
    assert e.value.code == 0
    with pytest.raises(SystemExit) as e:
        main(["prepare", str(corpus), "-o", str(tmp_path / "data"), "-t", str(tmp_path / "tok"), "-q"])
    assert e.value.code == 0
    meta = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    data = TokenData(tmp_path / "data")
    assert meta["vocab_size"] == data.tokenizer.vocab_size and all_tokens(data).count(data.sep_id) == 300


@pytest.mark.skipif(not (SHARED / "corpora" / "tinyshakespeare.txt").is_file(), reason="shared data absent")
def test_tinyshakespeare_char_split_like_nanogpt(tmp_path):
    meta = prepare(PrepareConfig(inputs=[str(SHARED / "corpora" / "tinyshakespeare.txt")], out_dir=str(tmp_path),
                                 workers=2, progress=False))
    assert meta["vocab_size"] == 66  # nanoGPT's 65 characters + the document separator
    assert meta["train_tokens"] == int(1115395 * 0.9) + 1 or abs(meta["train_tokens"] - 1003854) <= 1


def test_failed_reprepare_keeps_previous_data(tmp_path):
    """A re-prepare that fails half-way leaves the previous shards and meta.json as they were."""
    write_corpus(tmp_path)
    out = tmp_path / "out"
    meta = prepare(PrepareConfig(inputs=[str(tmp_path / "doc*.txt")], out_dir=str(out), workers=1, progress=False))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert "train_000.bin" in before
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_bytes(before["tokenizer.json"])
    (tmp_path / "z_bad.txt").write_bytes(b"fine text\n" * 10 + b"\xff broken")
    with pytest.raises(LmlabError, match="z_bad.txt: not UTF-8"):  # fails while shards are being written
        prepare(PrepareConfig(inputs=[str(tmp_path / "doc0.txt"), str(tmp_path / "z_bad.txt")], out_dir=str(out),
                              tokenizer=str(tmp_path / "tok"), workers=1, chunk_chars=16, progress=False))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary left
    assert TokenData(out).meta["tokens"] == meta["tokens"]
    again = prepare(PrepareConfig(inputs=[str(tmp_path / "doc0.txt")], out_dir=str(out), workers=1, progress=False,
                                  shard_tokens=8))
    assert sorted(p.name for p in out.glob("*.bin")) == sorted(
        s["file"] for split in again["shards"].values() for s in split)  # no stale shard of the first run


def test_prepare_never_deletes_files_it_did_not_write(tmp_path):
    write_corpus(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "weights.bin").write_bytes(b"precious")
    with pytest.raises(LmlabError, match=r"out: holds files lmlab prepare did not write \(weights.bin\)"):
        prepare(PrepareConfig(inputs=[str(tmp_path / "doc*.txt")], out_dir=str(out), workers=1, progress=False))
    assert (out / "weights.bin").read_bytes() == b"precious"


def test_separator_keeps_a_real_pad_id_of_zero():
    from tokenizers import Tokenizer as HFTokenizer, models

    from lmlab.data.tokenizers import with_separator

    hf = HFTokenizer(models.WordLevel(vocab={"<pad>": 0, "a": 1, "b": 2}, unk_token=None))
    tok = with_separator(Tokenizer(hf, pad_id=0))
    assert tok.eos_id == 3 and tok.pad_id == 0
    unset = with_separator(Tokenizer(HFTokenizer(models.WordLevel(vocab={"a": 0, "b": 1}, unk_token=None))))
    assert unset.eos_id == 2 and unset.pad_id == 2  # no pad of its own: the separator pads


def test_sigkilled_reprepare_keeps_the_old_data_trainable(tmp_path):
    """SIGKILL `lmlab prepare` while it writes into a folder that holds good data: the old data is intact
    and still trains."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from lmlab.train import train
    from lmlab.train.config import load_config

    root = Path(__file__).resolve().parents[1]
    small = tmp_path / "small.txt"
    small.write_text("".join(f"line {i}: the quick fox {i % 7} jumps.\n" for i in range(600)))
    out = tmp_path / "data"
    prepare(PrepareConfig(inputs=[str(small)], out_dir=str(out), workers=1, progress=False))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    big = tmp_path / "big.txt"
    big.write_text("a much larger corpus, written over the old data. " * 800_000)  # ~40 MB
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    p = subprocess.Popen([sys.executable, "-m", "lmlab", "prepare", str(big), "-o", str(out), "--workers", "1", "-q"],
                         cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    killed, deadline = False, time.time() + 120
    while time.time() < deadline and p.poll() is None:
        shards = list(tmp_path.glob(".data.*.tmp/train_000.bin"))
        if shards and shards[0].stat().st_size > 0:  # new shards are being written
            os.kill(p.pid, signal.SIGKILL)
            killed = True
            break
        time.sleep(0.01)
    p.wait()
    assert killed and p.returncode == -signal.SIGKILL, "prepare was not killed mid-way"
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    TokenData(out)  # still a valid prepared folder
    summary = train(load_config(None, ["model.preset=baby-gpt", "model.n_layer=1", "model.n_head=2",
                                       "model.d_model=32", "seq_len=16", "batch_size=2", "eval_iters=1",
                                       "max_iters=2", "eval_interval=2", "threads=1", "plot=false", "progress=false",
                                       "tensorboard=false", "save_model=false", f"data.path={out}",
                                       f"out_dir={tmp_path / 'run'}"]))
    assert summary["iters"] == 2
    again = prepare(PrepareConfig(inputs=[str(small)], out_dir=str(out), workers=1, progress=False))
    assert again["tokens"] == TokenData(out).meta["tokens"]  # the killed run's leftovers are no obstacle


BAD_META = {
    # name: (edit of meta.json as a dict, or bytes, text the message must contain)
    "not-utf8": (b'{"dtype": "uint16\xff"}', "not UTF-8 text"),
    "not-json": (b'{"dtype": ', "not valid JSON"),
    "dtype": ({"dtype": "float64"}, "dtype: 'float64' is not one of"),
    "vocab-string": ({"vocab_size": "65"}, "vocab_size: '65' is not a positive integer"),
    "sep-outside": ({"sep_id": 10**6}, "sep_id: 1000000 is not a token id"),
    "shards-list": ({"shards": []}, "shards: expected lists of train and val shards"),
    "shard-escapes": ({"shards": {"train": [{"file": "../x.bin", "tokens": 1}], "val": []}}, "shards.train[0]"),
    "shard-short": (lambda m: m["shards"]["train"][0].update(tokens=m["shards"]["train"][0]["tokens"] + 1),
                    "shards.train[0]: train_000.bin has"),
    "vocab-mismatch": (lambda m: m.update(vocab_size=m["vocab_size"] + 5), "but tokenizer.json has"),
}


@pytest.mark.parametrize("case", BAD_META)
def test_damaged_meta_json_is_named(tmp_path, case):
    edit, text = BAD_META[case]
    write_corpus(tmp_path)
    out = tmp_path / "out"
    prepare(PrepareConfig(inputs=[str(tmp_path / "doc*.txt")], out_dir=str(out), workers=1, progress=False))
    meta = json.loads((out / "meta.json").read_text())
    if isinstance(edit, bytes):
        (out / "meta.json").write_bytes(edit)
    else:
        edit(meta) if callable(edit) else meta.update(edit)
        (out / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(LmlabError) as info:
        TokenData(out)
    assert str(info.value).startswith(str(out / "meta.json")) and text in str(info.value)
