"""lmlab.finetune.labeled: jsonl/csv labeled text, label-set checks that name the line and value."""
import pytest

from lmlab.errors import LmlabError
from lmlab.finetune.labeled import load_labeled, pad_batch


def test_jsonl_and_csv_give_the_same_data(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "good film", "label": 1}\n\n{"text": "bad, sadly", "label": 0}\n')
    (tmp_path / "d.csv").write_text('text,label\ngood film,1\n"bad, sadly",0\n')
    a, b = load_labeled(tmp_path / "d.jsonl"), load_labeled(tmp_path / "d.csv")
    assert a.texts == b.texts == ["good film", "bad, sadly"]
    assert a.labels == b.labels == [1, 0] and a.label_names == ["0", "1"]
    assert load_labeled(tmp_path / "d.jsonl", limit=1).texts == ["good film"]
    assert load_labeled(tmp_path / "d.csv", labels=["1", "0"]).labels == [0, 1]


def test_label_outside_the_set_names_line_and_value(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "a", "label": "pos"}\n{"text": "b", "label": "meh"}\n')
    with pytest.raises(LmlabError, match=r"d.jsonl:2: label 'meh' is not in the label set \(neg, pos\)"):
        load_labeled(tmp_path / "d.jsonl", labels=["neg", "pos"])
    (tmp_path / "e.csv").write_text("text,label\na,pos\nb,\n")
    with pytest.raises(LmlabError, match=r"e.csv:3: missing field 'label'"):
        load_labeled(tmp_path / "e.csv")
    (tmp_path / "f.jsonl").write_text('{"text": "a", "label": 1}\n[1]\n')
    with pytest.raises(LmlabError, match=r"f.jsonl:2: expected a JSON object"):
        load_labeled(tmp_path / "f.jsonl")


def test_pad_batch_right_pads():
    ids, mask = pad_batch([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]


def test_label_text_lines(tmp_path):
    (tmp_path / "stsa.binary.train").write_text("1 a fine film .\n\n0 dull , dull .\n")
    d = load_labeled(tmp_path / "stsa.binary.train", fmt="label-text")
    assert d.texts == ["a fine film .", "dull , dull ."] and d.labels == [1, 0]
    with pytest.raises(LmlabError, match="expected a .jsonl or .csv file"):
        load_labeled(tmp_path / "stsa.binary.train")
