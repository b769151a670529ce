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
def minilm():
    """lmlab's all-MiniLM-L6-v2 sentence encoder; skips when the weights cannot be had."""
    from lmlab.errors import LmlabError
    from lmlab.retrieval.embed import SentenceEncoder

    try:
        return SentenceEncoder.load("all-minilm-l6-v2")
    except LmlabError as e:
        pytest.skip(f"all-MiniLM-L6-v2 not available: {e}")
