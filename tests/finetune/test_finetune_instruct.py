"""lmlab.finetune.instruct: Alpaca/chat data, rendered with chat templates (with and without generation
markers or a generation prompt); only response tokens are supervised."""
import json
import string

import pytest
import torch
import torch.nn.functional as F
from tokenizers import AddedToken

from lmlab.config import preset
from lmlab.errors import LmlabError
from lmlab.finetune.instruct import IGNORE, encode_all, load_alpaca, load_chat, load_conversations
from lmlab.model import Transformer
from lmlab.tokenizer import Tokenizer

# SmolLM2-Instruct's ChatML template (no generation markers)
CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
          "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# HF-style template with {% generation %} markers
MARKED = ("{% for m in messages %}{% if m['role'] == 'assistant' %}{{ '[ASSISTANT] ' }}{% generation %}"
          "{{ m['content'] + eos_token }}{% endgeneration %}{{ '\n' }}{% else %}"
          "{{ '[' + m['role'] | upper + '] ' + m['content'] + '\n' }}{% endif %}{% endfor %}"
          "{% if add_generation_prompt %}{{ '[ASSISTANT] ' }}{% endif %}")
# ignores add_generation_prompt: the assistant header comes with the message
PLAIN = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ 'User: ' + m['content'] + '\n' }}"
         "{% elif m['role'] == 'assistant' %}{{ 'Assistant: ' + m['content'] + eos_token + '\n' }}"
         "{% else %}{{ m['content'] + '\n' }}{% endif %}{% endfor %}")
END = {"chatml": "<|im_end|>\n", "marked": "</s>\n", "plain": "</s>\n"}  # the turn to its end
TEMPLATES = {"chatml": CHATML, "marked": MARKED, "plain": PLAIN}

CONV = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another, please?"},
        {"role": "assistant", "content": "Assistant: red!"}]  # content that looks like a header


def tokenizer(template):
    tok = Tokenizer.char_level(string.printable)
    specials = ["<|im_start|>", "<|im_end|>", "<s>", "</s>"]
    tok.tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    tok.bos_id, tok.eos_id = tok.tok.token_to_id("<s>"), tok.tok.token_to_id("</s>")
    tok.chat_template = template
    return tok


def supervised_text(tok, ex):
    """The target tokens the loss sees, each run of consecutive ones joined, the runs separated by '|'."""
    runs, cur = [], []
    for t in ex.labels:
        if t == IGNORE:
            if cur:
                runs.append(cur)
            cur = []
        else:
            cur.append(t)
    runs += [cur] if cur else []
    return "|".join(tok.decode(r, skip_special_tokens=False) for r in runs)


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_only_response_tokens_are_supervised(name):
    tok = tokenizer(TEMPLATES[name])
    [ex] = encode_all(tok, [CONV])
    end = END[name]
    assert supervised_text(tok, ex) == f"Blue.{end}|Assistant: red!{end}"
    assert len(ex.ids) == len(ex.labels)
    # the model's loss is the mean over exactly those targets: prompt targets contribute exactly zero
    torch.manual_seed(0)
    model = Transformer(preset("tiny-llama", vocab_size=tok.vocab_size)).eval()
    ids, labels = torch.tensor([ex.ids]), torch.tensor([ex.labels])
    with torch.no_grad():
        logits = model(ids)
    logits.requires_grad_(True)
    loss = F.cross_entropy(logits[0], labels[0], ignore_index=IGNORE, reduction="sum")
    loss.backward()
    prompt = labels[0] == IGNORE
    assert torch.count_nonzero(logits.grad[0][prompt]) == 0 and torch.all(logits.grad[0][~prompt].abs().sum(-1) > 0)
    with torch.no_grad():
        fused = model(ids, labels=labels)
    torch.testing.assert_close(fused, loss.detach() / (~prompt).sum(), atol=1e-5, rtol=0)


def test_truncation_keeps_labels_aligned():
    tok = tokenizer(CHATML)
    [full] = encode_all(tok, [CONV])
    [cut] = encode_all(tok, [CONV], max_len=len(full.ids) - 5)
    assert cut.ids == full.ids[:-5] and cut.labels[:-1] == full.labels[:len(cut.ids) - 1]
    assert cut.labels[-1] == IGNORE
    with pytest.raises(LmlabError, match="conversation 0 has no response tokens within 20"):
        encode_all(tok, [CONV], max_len=20, source="data")


def test_alpaca_records(tmp_path):
    path = tmp_path / "a.json"
    path.write_text(json.dumps([{"instruction": "Add.", "input": "2+2", "output": "4"},
                                {"instruction": "Hi", "input": "", "output": "Hello"}]))
    convs = load_alpaca(path, system="S")
    assert convs[0] == [{"role": "system", "content": "S"}, {"role": "user", "content": "Add.\n\n2+2"},
                        {"role": "assistant", "content": "4"}]
    assert convs[1][1]["content"] == "Hi"
    assert load_conversations(path) == load_alpaca(path)


def test_alpaca_record_missing_a_field_names_index_and_field(tmp_path):
    path = tmp_path / "a.json"
    path.write_text(json.dumps([{"instruction": "a", "input": "", "output": "b"}, {"instruction": "c", "input": ""}]))
    with pytest.raises(LmlabError, match=r"a.json: record 1: missing field 'output'"):
        load_alpaca(path)
    path.write_text(json.dumps([{"instruction": "a", "input": 3, "output": "b"}]))
    with pytest.raises(LmlabError, match=r"record 0: field 'input' should be a string"):
        load_alpaca(path)


def test_chat_jsonl(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"messages": CONV}) + "\n\n" + json.dumps({"messages": [CONV[1]]}) + "\n")
    with pytest.raises(LmlabError, match=r"c.jsonl:3: no assistant message"):
        load_chat(path)
    path.write_text(json.dumps({"messages": [{"role": "bot", "content": "x"}]}) + "\n")
    with pytest.raises(LmlabError, match=r"c.jsonl:1: message 0 should be"):
        load_chat(path)
    path.write_text(json.dumps({"messages": CONV}) + "\n")
    assert load_conversations(path) == [CONV]


def test_unencodable_text_names_the_conversation():
    tok = tokenizer(CHATML)  # characters only: no emoji
    bad = [CONV[1], {"role": "assistant", "content": "\U0001F680 launch"}]
    with pytest.raises(LmlabError, match="d.json: conversation 1: the tokenizer cannot encode"):
        encode_all(tok, [CONV, bad], source="d.json")
