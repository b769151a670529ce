"""SentenceEncoder: mean pooling over real tokens, L2-normalised, independent of batching; lmlab's MiniLM
embeddings equal HF transformers' BertModel + mean pooling on the same folder."""
import numpy as np
import pytest
import torch

from lmlab.errors import LmlabError
from lmlab.retrieval.embed import SentenceEncoder

SENTENCES = [
    "The cat sits on the mat.", "A man is playing a guitar on stage.", "Stock markets fell sharply on Monday.",
    "How do I reset my password?", "Photosynthesis converts light energy into chemical energy.",
    "", "a", "OK", "Hello, world!", "Paris is the capital of France.",
    "The quick brown fox jumps over the lazy dog.", "I can't believe it's not butter!!!",
    "e = mc^2 and F = ma are famous equations.", "Call me at 555-0199 or email test@example.com.",
    "東京は日本の首都です。", "北京是中国的首都。", "Привет, как дела?", "¿Dónde está la biblioteca?",
    "Café, naïve, résumé, coöperate.", "🙂 emojis 🚀 and symbols ©®™",
    "The mitochondria is the powerhouse of the cell.", "def add(a, b): return a + b",
    "SELECT * FROM users WHERE id = 42;", "<html><body>markup</body></html>",
    "Rain is expected tomorrow afternoon in the northern regions.",
    "She sells sea shells by the sea shore.", "Two plus two equals four.", "The movie was terrible.",
    "The film was wonderful and moving.", "What time does the train leave?", "   leading and trailing spaces   ",
    "UPPER CASE SENTENCE SHOUTING", "mixed CaSe WoRdS", "line one\nline two\ttabbed",
    "Antidisestablishmentarianism is a long word.", "The year 1999 was followed by 2000.",
    "Is this the real life? Is this just fantasy?", "Neural networks learn representations.",
    "The patient was prescribed 20 mg twice daily.", "Water boils at 100 degrees Celsius at sea level.",
    "He said, \"No way!\" and left.", "Semicolons; colons: dashes — and ellipses…",
    "Quantum entanglement links particles across distance.", "A dog runs through the snowy field.",
    "The committee will review the proposal next week.", "Buy low, sell high.",
    " ".join(["long"] * 300),  # longer than max_seq_length (256): truncated the same way on both sides
    " ".join(f"word{i}" for i in range(120)),
    "Das ist ein deutscher Satz über Maschinen.", "Ceci est une phrase en français.",
]


# --------------------------------------------------------------------------- fast: a tiny random BERT
@pytest.fixture(scope="module")
def tiny():
    from lmlab.config import preset
    from lmlab.model import Transformer
    from lmlab.tokenizer import Tokenizer

    torch.manual_seed(0)
    tok = Tokenizer.char_level("abcdefghijklmnopqrstuvwxyz .,!?")
    cfg = preset("bert-base", vocab_size=tok.vocab_size, n_layer=2, n_head=2, d_model=32, d_ff=64,
                 max_seq_len=40, mlm_head=False, pooler=False)
    return Transformer(cfg).eval(), tok


def reference(model, tok, text, max_length):
    ids = torch.tensor([tok.encode(text)[:max_length]])
    with torch.inference_mode():
        h = model.encode(ids).mean(1)[0]
    return (h / h.norm()).numpy()


def test_mean_pooling_ignores_padding_and_batching(tiny):
    model, tok = tiny
    texts = ["hello world", "a", "the quick brown fox jumps over the lazy dog again and again", "", "ok, fine!"]
    enc = SentenceEncoder(model, tok, name="tiny", batch_size=2, max_length=30)
    v = enc(texts)
    assert v.shape == (5, 32) and v.dtype == np.float32
    for i, t in enumerate(texts):
        if t:  # an empty text has no tokens here (no special tokens in a char-level vocabulary)
            np.testing.assert_allclose(v[i], reference(model, tok, t, 30), atol=1e-5)
    np.testing.assert_allclose(v, SentenceEncoder(model, tok, name="tiny", batch_size=64, max_length=30)(texts),
                               atol=1e-6)
    assert enc([]).shape == (0, 32)


def test_truncates_to_max_length(tiny):
    model, tok = tiny
    enc = SentenceEncoder(model, tok, name="tiny", max_length=8)
    long = "abcdefgh" + "xyz" * 20
    np.testing.assert_allclose(enc([long])[0], enc(["abcdefgh"])[0], atol=1e-6)
    assert SentenceEncoder(model, tok, name="tiny", max_length=10_000).max_length == 40  # the model's window


def test_bad_inputs(tiny):
    model, tok = tiny
    enc = SentenceEncoder(model, tok, name="tiny")
    with pytest.raises(LmlabError, match="texts: expected a list of texts, got one string"):
        enc("just one")
    with pytest.raises(LmlabError, match=r"texts\[1\] is int"):
        enc(["ok", 3])
    with pytest.raises(LmlabError, match="tiny: the model has no tokenizer"):
        SentenceEncoder(model, None, name="tiny")
    from lmlab.config import preset
    from lmlab.model import Transformer

    gpt = Transformer(preset("baby-gpt", n_layer=1, d_model=32, n_head=2))
    with pytest.raises(LmlabError, match="gpt: sentence embeddings need an encoder model, this one is 'decoder'"):
        SentenceEncoder(gpt, tok, name="gpt")


# --------------------------------------------------------------------------- slow: the real MiniLM
@pytest.fixture(scope="module")
def minilm(minilm_path):
    return SentenceEncoder.load(str(minilm_path), batch_size=8)


def hf_embeddings(folder, texts):
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    model = transformers.BertModel.from_pretrained(str(folder)).eval()
    batch = tok(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.inference_mode():
        h = model(**batch).last_hidden_state
    m = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (h * m).sum(1) / m.sum(1).clamp_min(1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1).numpy()


@pytest.mark.slow
def test_minilm_matches_hf_mean_pooling(minilm, minilm_path):
    assert len(SENTENCES) == 50
    ours = minilm(SENTENCES)
    theirs = hf_embeddings(minilm_path, SENTENCES)
    assert ours.shape == theirs.shape == (50, 384)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
    cos = (ours * theirs).sum(1) / np.linalg.norm(theirs, axis=1)
    assert cos.min() >= 0.9999, f"sentence {int(cos.argmin())}: cosine {cos.min():.6f}"


@pytest.mark.slow
def test_minilm_identity_and_similarity(minilm):
    assert minilm.name == "all-minilm-l6-v2@53aa51172d14" and minilm.max_length == 256
    v = minilm(["The cat sits on the mat.", "A cat is sitting on a mat.", "Stock markets fell sharply."])
    assert v[0] @ v[1] > 0.8 and v[0] @ v[2] < 0.2
