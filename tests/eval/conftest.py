import string
from pathlib import Path

import pytest
import torch

from lmlab.config import preset
from lmlab.model import Transformer
from lmlab.tokenizer import Tokenizer

DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"


@pytest.fixture(scope="session")
def tiny():
    """A random tiny Llama with a character tokenizer: fast, and exact enough to test the engine."""
    torch.manual_seed(0)
    tok = Tokenizer.char_level(string.printable)
    model = Transformer(preset("tiny-llama", vocab_size=tok.vocab_size, max_seq_len=512)).eval()
    return model, tok


@pytest.fixture(scope="session")
def data_dir():
    if not (DATA / "eval").is_dir():
        pytest.skip("../shared/data is not present")
    return DATA.resolve() / "eval"
