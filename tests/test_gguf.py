"""GGUF loading: de-quantization, Q/K un-permutation, tokenizer from metadata, and clear errors."""
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from lmlab.checkpoints import load
from lmlab.errors import LmlabError
from tiny_gguf import TEXT, reference_logits, train_bpe, write_tiny

QTYPES = [Q.F32, Q.F16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q4_K, Q.Q5_K, Q.Q6_K]


@pytest.mark.parametrize("qtype", QTYPES, ids=lambda q: q.name)
def test_dequantized_llama_matches_reference(tmp_path, qtype):
    # K-quants work on 256-wide super-blocks, so give them a 256-wide model
    d = 256 if qtype in (Q.Q4_K, Q.Q5_K, Q.Q6_K) else 64
    path = tmp_path / "tiny.gguf"
    truth = write_tiny(path, qtype=qtype, d_model=d, d_ff=256 if d == 256 else 128)
    model, tok = load(str(path))
    ids = torch.tensor([tok.encode("The quick brown fox. Paris is the capital of France.")])
    with torch.no_grad():
        ours = model(ids)
    ref = reference_logits(truth, ids, n_layer=2, n_head=4, n_kv_head=2)
    assert (ours - ref).abs().max().item() < 1e-4


def test_qwen2_bias_and_untied_head(tmp_path):
    path = tmp_path / "qwen.gguf"
    truth = write_tiny(path, arch="qwen2", tied=False)
    model, tok = load(str(path))
    assert model.cfg.family == "qwen2" and model.cfg.attn_bias and not model.cfg.tie_embeddings
    ids = torch.tensor([tok.encode("Numbers like 12345")])
    with torch.no_grad():
        ours = model(ids)
    ref = reference_logits(truth, ids, n_layer=2, n_head=4, n_kv_head=2, arch="qwen2")
    assert (ours - ref).abs().max().item() < 1e-4


def test_tokenizer_from_metadata_matches_original(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny(path)
    _, tok = load(str(path))
    original = train_bpe()
    for text in [TEXT[:200], "Paris!! 12345 <|im_start|>user\nhi<|im_end|>", "  spaces\tand\nnewlines "]:
        assert tok.encode(text) == original.encode(text).ids
        assert tok.decode(tok.encode(text), skip_special_tokens=False) == text
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.tok.token_to_id("<|im_end|>") in tok.stop_ids


def test_matches_hf_transformers_gguf_loader(tmp_path):
    transformers = pytest.importorskip("transformers")
    path = tmp_path / "tiny.gguf"
    write_tiny(path, qtype=Q.Q8_0)
    model, tok = load(str(path))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="tiny.gguf").eval()
    ids = torch.tensor([tok.encode(TEXT[:300])])
    with torch.no_grad():
        diff = (model(ids) - hf(ids).logits).abs().max().item()
    assert diff < 1e-4


def test_truncated_file_names_file(tmp_path):
    path = tmp_path / "cut.gguf"
    write_tiny(path, truncate=20000)
    with pytest.raises(LmlabError, match="cut.gguf"):
        load(str(path))


def test_garbage_file(tmp_path):
    path = tmp_path / "junk.gguf"
    path.write_bytes(b"GGUF" + bytes(range(256)) * 4)
    with pytest.raises(LmlabError, match="junk.gguf"):
        load(str(path))


def test_unsupported_quantization_named(tmp_path):
    path = tmp_path / "q81.gguf"
    # Q8_1 has a block layout but no de-quantizer in gguf; write raw bytes of the right size
    import gguf
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_block_count(1)
    w.add_context_length(16); w.add_embedding_length(32); w.add_feed_forward_length(32)
    w.add_head_count(2); w.add_head_count_kv(2); w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("gpt2"); w.add_token_list(["a", "b"]); w.add_token_merges([])
    block_size, type_size = gguf.GGML_QUANT_SIZES[Q.Q8_1]
    w.add_tensor("token_embd.weight", np.zeros((2, 32 // block_size * type_size), dtype=np.uint8), raw_dtype=Q.Q8_1)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    with pytest.raises(LmlabError, match="Q8_1"):
        load(str(path))
