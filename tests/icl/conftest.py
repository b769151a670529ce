import pytest
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "retrieval"))  # retrieval_fakes: a fake encoder
import string

import pytest
import torch

from lmlab.config import preset
from lmlab.model import Transformer
from lmlab.tokenizer import Tokenizer


@pytest.fixture(scope="session")
def tiny():
    """A random tiny Llama with a character tokenizer."""
    torch.manual_seed(0)
    tok = Tokenizer.char_level(string.printable)
    model = Transformer(preset("tiny-llama", vocab_size=tok.vocab_size, max_seq_len=1024)).eval()
    return model, tok


@pytest.fixture(scope="session")
def minilm(minilm_path):
    """lmlab's all-MiniLM-L6-v2 sentence encoder (skips with minilm_path when the weights cannot be had)."""
    from lmlab.retrieval.embed import SentenceEncoder

    return SentenceEncoder.load(str(minilm_path))
