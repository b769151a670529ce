"""Tokenizer files: a damaged tokenizer.json or side file is a one-line LmlabError naming the file."""
import pytest

from lmlab.data.tokenizers import load_tokenizer
from lmlab.errors import LmlabError
from lmlab.tokenizer import Tokenizer


@pytest.fixture
def folder(tmp_path):
    Tokenizer.char_level(["hello world"]).save(tmp_path)
    return tmp_path


SIDE_FILES = [
    ("tokenizer_config.json", b'{"eos_token": "\xff"}', "not UTF-8 text"),
    ("tokenizer_config.json", b'{"eos_token": ', "not valid JSON"),
    ("tokenizer_config.json", b'["eos"]', "expected a JSON object, got list"),
    ("tokenizer_config.json", b'{"chat_template": [{"name": "x", "template": "y"}]}', "chat_template: list is not a string"),
    ("special_tokens_map.json", b"\xfe\xff", "not UTF-8 text"),
    ("special_tokens_map.json", b"{,}", "not valid JSON"),
    ("chat_template.jinja", b"{{ m \xff }}", "not UTF-8 text"),
]


@pytest.mark.parametrize("name, content, text", SIDE_FILES)
def test_damaged_side_file_is_named(folder, name, content, text):
    if name == "chat_template.jinja":
        (folder / "tokenizer_config.json").write_text("{}")
    (folder / name).write_bytes(content)
    with pytest.raises(LmlabError) as info:
        Tokenizer.from_folder(folder)
    message = str(info.value)
    assert message.startswith(str(folder)) and text in message and "\n" not in message


@pytest.mark.parametrize("content", [b"", b"\xff\xfe", b'{"model": 3}'])
def test_damaged_tokenizer_json_is_named(folder, content):
    (folder / "tokenizer.json").write_bytes(content)
    with pytest.raises(LmlabError, match=f"^{folder / 'tokenizer.json'}: cannot read tokenizer"):
        Tokenizer.from_folder(folder)
    with pytest.raises(LmlabError, match=f"^{folder / 'tokenizer.json'}: cannot read tokenizer"):
        load_tokenizer(str(folder / "tokenizer.json"))
