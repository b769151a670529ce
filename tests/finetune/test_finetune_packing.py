"""lmlab.finetune.packing: packed examples never attend to each other and compute exactly as alone."""
import pytest
import torch

from lmlab.config import preset
from lmlab.errors import LmlabError
from lmlab.finetune.instruct import IGNORE, Example
from lmlab.finetune.packing import pack_examples, pack_rows, pad_examples
from lmlab.model import Transformer


def example(n, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 96, (n,), generator=g).tolist()
    return Example(ids, [IGNORE] * (n // 2) + ids[n // 2 + 1:] + [IGNORE])


def test_first_fit_rows():
    assert pack_rows([5, 4, 3, 2], 8) == [[0, 2], [1, 3]]
    with pytest.raises(LmlabError, match="example 1 has 9 tokens"):
        pack_rows([2, 9], 8)


def test_packed_examples_do_not_attend_to_each_other():
    torch.manual_seed(0)
    model = Transformer(preset("tiny-llama", vocab_size=96)).eval()
    a, b, c = example(7, 1), example(5, 2), example(6, 3)
    batch = pack_examples([a, b, c], seq_len=16, pad_id=0)
    assert batch["input_ids"].shape == (2, 16)  # a+b in row 0, c in row 1
    assert batch["positions"][0, :12].tolist() == [*range(7), *range(5)]
    assert batch["labels"][0, :12].tolist() == a.labels + b.labels

    def run(batch):
        with torch.no_grad():
            return model(batch["input_ids"], positions=batch["positions"], attn_mask=batch["attn_mask"])

    packed = run(batch)
    with torch.no_grad():
        alone_a = model(torch.tensor([a.ids]))[0]
        alone_b = model(torch.tensor([b.ids]))[0]
    torch.testing.assert_close(packed[0, :7], alone_a, atol=1e-5, rtol=0)
    torch.testing.assert_close(packed[0, 7:12], alone_b, atol=1e-5, rtol=0)
    # perturbing b leaves a's logits unchanged (bit for bit), and b's change
    other = Example([(t + 1) % 96 for t in b.ids], b.labels)
    perturbed = run(pack_examples([a, other, c], seq_len=16, pad_id=0))
    assert torch.equal(perturbed[0, :7], packed[0, :7])
    assert not torch.allclose(perturbed[0, 7:12], packed[0, 7:12])
    # and the loss through the model's fused path counts each example's targets once
    with torch.no_grad():
        loss = model(batch["input_ids"], positions=batch["positions"], attn_mask=batch["attn_mask"],
                     labels=batch["labels"])
    n = (batch["labels"] != IGNORE).sum()
    assert n == sum(sum(t != IGNORE for t in e.labels) for e in (a, b, c)) and torch.isfinite(loss)


def test_pad_examples():
    a, b = example(4, 1), example(2, 2)
    batch = pad_examples([a, b], pad_id=0)
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["labels"][1].tolist() == b.labels + [IGNORE, IGNORE]
