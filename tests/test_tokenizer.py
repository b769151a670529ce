"""lmlab.tokenizer: round trips, special tokens, chat templates, GGUF vocabularies and HF folders; a damaged
tokenizer.json or side file is a one-line LmlabError naming the file."""
import json

import pytest

from lmlab.data.tokenizers import load_tokenizer
from lmlab.errors import LmlabError
from lmlab.tokenizer import Tokenizer

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _gguf_meta(**extra):
    """A byte-level BPE vocabulary in GGUF metadata form: the characters of 'hello world' (Ġ is the
    byte-level space), a few merges, and three special tokens (token type 3)."""
    chars = ["h", "e", "l", "o", "Ġ", "w", "r", "d", "\u010a"]  # \u010a: the byte-level newline
    merged = ["he", "ll", "hell", "hello", "Ġw", "or"]
    tokens = SPECIALS + chars + merged
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "default", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.merges": ["h e", "l l", "he ll", "hell o", "Ġ w", "o r"],
            "tokenizer.ggml.token_type": [3] * len(SPECIALS) + [1] * (len(chars) + len(merged)),
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2, **extra}


def test_char_level_round_trip_keeps_every_character():
    text = "To be, or not\nto be: 42!"
    tok = Tokenizer.char_level(text)
    assert tok.vocab_size == len(set(text))
    ids = tok.encode(text)
    assert len(ids) == len(text)  # one id per character, newlines and spaces included
    assert ids[:3] == [sorted(set(text)).index(c) for c in "To "]
    assert tok.decode(ids) == text
    assert tok.bos_id is None and tok.eos_id is None and tok.pad_id == 0 and tok.stop_ids == []


def test_bpe_merges_and_round_trip():
    tok = Tokenizer.from_gguf_metadata(_gguf_meta())
    ids = tok.encode("hello world")
    assert [tok.token(i) for i in ids] == ["hello", "Ġw", "or", "l", "d"]
    assert tok.decode(ids) == "hello world"
    assert tok.encode_batch(["hello", "world"]) == [tok.encode("hello"), tok.encode("world")]
    assert tok.decode(tok.encode("hello\nworld")) == "hello\nworld"


def test_special_tokens_are_single_ids_and_skipped_on_decode():
    tok = Tokenizer.from_gguf_metadata(_gguf_meta())
    ids = tok.encode("<|im_start|>hello<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2 and [tok.token(i) for i in ids[1:-1]] == ["hello"]
    assert tok.decode(ids) == "hello"
    assert tok.decode(ids, skip_special_tokens=False) == "<|im_start|>hello<|im_end|>"
    assert tok.bos_id == 1 and tok.eos_id == 2 and tok.pad_id == 2  # pad falls back to eos


def test_add_bos_token_prepends_bos_unless_told_not_to():
    tok = Tokenizer.from_gguf_metadata(_gguf_meta(**{"tokenizer.ggml.add_bos_token": True}))
    assert tok.encode("hello") == [1, tok.encode("hello", add_special_tokens=False)[0]]
    assert tok.encode("hello", add_special_tokens=False) == [tok.tok.token_to_id("hello")]


def test_chat_template_renders_and_adds_stop_ids():
    tok = Tokenizer.from_gguf_metadata(_gguf_meta(**{"tokenizer.chat_template": CHATML}))
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    assert tok.apply_chat_template(messages) == ("<|im_start|>system\nbe brief<|im_end|>\n"
                                                 "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n")
    assert tok.apply_chat_template(messages, add_generation_prompt=False).endswith("hello<|im_end|>\n")
    assert tok.stop_ids == [0, 2]  # eos and, with a chat template, <|endoftext|>


def test_chat_template_errors():
    tok = Tokenizer.from_gguf_metadata(_gguf_meta(**{
        "tokenizer.chat_template": "{{ bos_token }}{% if messages[0]['role'] != 'user' %}"
                                   "{{ raise_exception('first message must be the user') }}{% endif %}"}))
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "<|im_start|>"  # bos_token is bound
    with pytest.raises(LmlabError, match="chat template: first message must be the user"):
        tok.apply_chat_template([{"role": "assistant", "content": "x"}])
    with pytest.raises(LmlabError, match="has no chat template"):
        Tokenizer.from_gguf_metadata(_gguf_meta()).apply_chat_template([{"role": "user", "content": "x"}])


def test_unsupported_gguf_vocabularies():
    with pytest.raises(LmlabError, match="model.gguf: unsupported GGUF tokenizer model 'llama'"):
        Tokenizer.from_gguf_metadata(_gguf_meta(**{"tokenizer.ggml.model": "llama"}), source="model.gguf")
    with pytest.raises(LmlabError, match="unsupported GGUF pre-tokenizer 'falcon' .*smollm"):
        Tokenizer.from_gguf_metadata(_gguf_meta(**{"tokenizer.ggml.pre": "falcon"}))


def test_save_and_from_folder_round_trip(tmp_path):
    tok = Tokenizer.from_gguf_metadata(_gguf_meta(**{"tokenizer.chat_template": CHATML}))
    tok.save(tmp_path)
    conf = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert conf["bos_token"] == "<|im_start|>" and conf["eos_token"] == "<|im_end|>"
    back = Tokenizer.from_folder(tmp_path)
    for text in ("hello world", "<|im_start|>hello<|im_end|>"):
        assert back.encode(text) == tok.encode(text)
    assert (back.bos_id, back.eos_id, back.pad_id) == (1, 2, 2)
    assert back.chat_template == CHATML and back.stop_ids == [0, 2]


def test_from_folder_errors(tmp_path):
    with pytest.raises(LmlabError, match="no tokenizer.json"):
        Tokenizer.from_folder(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(LmlabError, match=r"tokenizer.json: cannot read tokenizer"):
        Tokenizer.from_folder(tmp_path)


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
