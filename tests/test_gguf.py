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


# --- damaged headers: every count and offset is checked against the file before reading -------------
import struct  # noqa: E402

import gguf  # noqa: E402

from lmlab.checkpoints.gguf import read as read_gguf  # noqa: E402

STR, ARR, U32 = 8, 9, 4


def gstr(s: bytes) -> bytes:
    return struct.pack("<Q", len(s)) + s


def header(kvs: bytes, n_kv: int, n_tensors: int = 0, tensors: bytes = b"") -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv) + kvs + tensors + bytes(64)


HUGE = 2**63
ARCH = gstr(b"general.architecture") + struct.pack("<I", STR) + gstr(b"llama")
F32_TENSOR = gstr(b"token_embd.weight") + struct.pack("<IQQIQ", 2, 32, 2, 0, 0)
BAD_HEADERS = {
    # name: (file bytes, text the message must contain)
    "string-array-2^63": (header(gstr(b"tokenizer.ggml.tokens") + struct.pack("<IIQ", ARR, STR, HUGE), 1),
                          "tokenizer.ggml.tokens: claims 9223372036854775808 items"),
    "uint32-array-2^63": (header(gstr(b"x.list") + struct.pack("<IIQ", ARR, U32, HUGE), 1), "x.list: claims"),
    "kv-count-2^62": (header(ARCH, 2**62), "kv_count: claims"),
    "tensor-count-2^60": (header(ARCH, 1, 2**60), "tensor_count: claims"),
    "key-length-2^63": (header(struct.pack("<Q", HUGE), 1), "metadata key #0: claims"),
    "value-type-99": (header(gstr(b"general.x") + struct.pack("<I", 99), 1), "general.x: unknown value type 99"),
    "non-utf8-key": (header(gstr(b"gen\xff") + struct.pack("<I", U32) + bytes(4), 1), "not UTF-8"),
    "version-7": (b"GGUF" + struct.pack("<IQQ", 7, 0, 0), "version 7 is not supported"),
    "tensor-type-999": (header(ARCH, 1, 1, gstr(b"token_embd.weight") + struct.pack("<IQQIQ", 2, 32, 2, 999, 0)),
                        "token_embd.weight' type: unknown GGML tensor type 999"),
    "tensor-dims-9": (header(ARCH, 1, 1, gstr(b"t") + struct.pack("<I", 9)), "n_dims: 9"),
    "tensor-past-end": (header(ARCH, 1, 1, gstr(b"token_embd.weight") + struct.pack("<IQQIQ", 2, 32, 2**40, 0, 0)),
                        "truncated: tensor 'token_embd.weight'"),
    "empty": (b"", "not a GGUF file"),
}


@pytest.mark.parametrize("case", BAD_HEADERS)
def test_damaged_header_fails_fast_naming_file_and_field(tmp_path, case):
    data, text = BAD_HEADERS[case]
    path = tmp_path / "bad.gguf"
    path.write_bytes(data)
    with pytest.raises(LmlabError) as info:
        read_gguf(path)
    message = str(info.value)
    assert message.startswith(str(path)) and text in message and "\n" not in message


V = gguf.GGUFValueType
BAD_METADATA = {
    # name: (metadata edits for write_tiny, text the message must contain)
    "head-count-0": ({"{arch}.attention.head_count": (0, V.UINT32)}, "n_head: 0 is out of range"),
    "head-count-string": ({"{arch}.attention.head_count": ("four", V.STRING)}, "n_head: 'four' is not an integer"),
    "layers-missing": ({"{arch}.block_count": None}, "lacks 'llama.block_count'"),
    "rope-nan": ({"{arch}.rope.freq_base": (float("nan"), V.FLOAT32)}, "rope_theta: nan is out of range"),
    "rope-inf": ({"{arch}.rope.freq_base": (float("inf"), V.FLOAT32)}, "rope_theta: inf is out of range"),
    "eps-negative": ({"{arch}.attention.layer_norm_rms_epsilon": (-1.0, V.FLOAT32)}, "norm_eps: -1.0 is out of range"),
    "bos-outside-vocab": ({"tokenizer.ggml.bos_token_id": (100000, V.UINT32)}, "bos_id: 100000 is outside the vocabulary"),
    "eos-outside-vocab": ({"tokenizer.ggml.eos_token_id": (4000, V.UINT32)}, "eos_id: 4000 is outside the vocabulary"),
    "unknown-architecture": ({"general.architecture": ("mamba", V.STRING)}, "unsupported GGUF architecture 'mamba'"),
    "token-not-utf8": ({"tokenizer.ggml.tokens": ([b"a", b"\xff\xfe", b"c"], V.ARRAY)},
                       "tokenizer.ggml.tokens[1]: string is not UTF-8"),
    "token-types-wrong-length": ({"tokenizer.ggml.token_type": ([1, 1], V.ARRAY)}, "not one integer per token"),
    "pre-tokenizer-unknown": ({"tokenizer.ggml.pre": ("klingon", V.STRING)}, "unsupported GGUF pre-tokenizer"),
}


@pytest.mark.parametrize("case", BAD_METADATA)
def test_bad_metadata_is_one_line_naming_file_and_field(tmp_path, case):
    edits, text = BAD_METADATA[case]
    path = tmp_path / "bad.gguf"
    write_tiny(path, n_layer=1, meta=edits)
    with pytest.raises(LmlabError) as info:
        read_gguf(path)
    message = str(info.value)
    assert message.startswith(str(path)) and text in message and "\n" not in message
