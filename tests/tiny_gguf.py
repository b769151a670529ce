"""Write small GGUF files for tests: a random llama/qwen2 model, quantized like llama.cpp stores it."""
from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders

TEXT = ("The quick brown fox jumps over the lazy dog. Paris is the capital of France. "
        "Numbers like 12345 and symbols #@! appear too. ") * 20


def train_bpe(vocab_size: int = 300) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([TEXT], trainer)
    return tok


# byte offsets of the float16 scales inside one K-quant super-block
K_SCALE_OFFSETS = {Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}


def random_k_blocks(rng: np.random.Generator, shape: tuple[int, int], t: Q) -> np.ndarray:
    block, size = gguf.GGML_QUANT_SIZES[t]
    raw = rng.integers(0, 256, (shape[0], shape[1] // block, size), dtype=np.uint8)
    for off in K_SCALE_OFFSETS[t]:
        raw[..., off:off + 2] = np.frombuffer(np.float16(0.002).tobytes(), dtype=np.uint8)
    return raw.reshape(shape[0], -1)


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert script interleaves the rotary halves of Q and K rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny(path: Path, *, arch: str = "llama", qtype: Q = Q.F32, n_layer: int = 2, d_model: int = 64,
               n_head: int = 4, n_kv_head: int = 2, d_ff: int = 128, tied: bool = True, seed: int = 0,
               truncate: int | None = None, tensor_type_override: dict | None = None,
               meta: dict | None = None) -> dict[str, np.ndarray]:
    """Write a random model; returns the float weights by GGUF name (as a reader must recover them).

    meta: metadata to replace or add, key → (value, gguf.GGUFValueType) or key → None to drop it."""
    tok = train_bpe()
    vocab = tok.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    model = json_model(tok)
    merges = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
    rng = np.random.default_rng(seed)
    V, hd = len(tokens), d_model // n_head

    def rand(*shape):
        return (rng.standard_normal(shape) * 0.2).astype(np.float32)

    w = gguf.GGUFWriter(str(path), arch=arch)
    w.add_block_count(n_layer)
    w.add_context_length(256)
    w.add_embedding_length(d_model)
    w.add_feed_forward_length(d_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv_head)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(hd)
    w.add_vocab_size(V)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t.startswith("<|") else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(0)
    w.add_eos_token_id(2)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    for key, spec in (meta or {}).items():
        if spec is None:
            w.kv_data[0].pop(key.replace("{arch}", arch), None)
        else:
            value, vtype = spec
            sub = gguf.GGUFValueType.get_type(value[0]) if vtype == gguf.GGUFValueType.ARRAY else None
            w.kv_data[0][key.replace("{arch}", arch)] = gguf.GGUFValue(value, vtype, sub)
    truth: dict[str, np.ndarray] = {}

    def add(name: str, arr: np.ndarray, store: np.ndarray | None = None) -> None:
        t = (tensor_type_override or {}).get(name, qtype if arr.ndim == 2 and arr.shape[1] % 32 == 0 else Q.F32)
        stored = arr if store is None else store
        if t == Q.F32:
            truth[name] = arr
            w.add_tensor(name, stored)
        elif t in (Q.F16,):
            truth[name] = arr.astype(np.float16).astype(np.float32)
            w.add_tensor(name, stored.astype(np.float16))
        else:
            # quantization works on blocks within a row, so it commutes with llama.cpp's row permutation
            if t in K_SCALE_OFFSETS:  # gguf cannot encode K-quants: random blocks with sane scales
                raw = random_k_blocks(rng, arr.shape, t)
                truth[name] = gguf.quants.dequantize(raw, t).reshape(arr.shape)
                n_head_rows = n_head if name.endswith("attn_q.weight") else n_kv_head
                w.add_tensor(name, permute(raw, n_head_rows) if store is not None else raw, raw_dtype=t)
            else:
                truth[name] = gguf.quants.dequantize(gguf.quants.quantize(arr, t), t).reshape(arr.shape)
                w.add_tensor(name, gguf.quants.quantize(stored, t), raw_dtype=t)

    add("token_embd.weight", rand(V, d_model))
    add("output_norm.weight", 1 + rand(d_model))
    if not tied:
        add("output.weight", rand(V, d_model))
    for i in range(n_layer):
        p = f"blk.{i}."
        add(p + "attn_norm.weight", 1 + rand(d_model))
        add(p + "ffn_norm.weight", 1 + rand(d_model))
        q, k = rand(n_head * hd, d_model), rand(n_kv_head * hd, d_model)
        if arch == "llama":
            add(p + "attn_q.weight", q, permute(q, n_head))
            add(p + "attn_k.weight", k, permute(k, n_kv_head))
        else:
            add(p + "attn_q.weight", q)
            add(p + "attn_k.weight", k)
            add(p + "attn_q.bias", rand(n_head * hd))
            add(p + "attn_k.bias", rand(n_kv_head * hd))
            add(p + "attn_v.bias", rand(n_kv_head * hd))
        add(p + "attn_v.weight", rand(n_kv_head * hd, d_model))
        add(p + "attn_output.weight", rand(d_model, n_head * hd))
        add(p + "ffn_gate.weight", rand(d_ff, d_model))
        add(p + "ffn_up.weight", rand(d_ff, d_model))
        add(p + "ffn_down.weight", rand(d_model, d_ff))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    if truncate:
        data = path.read_bytes()
        path.write_bytes(data[:truncate])
    return truth


def json_model(tok: Tokenizer) -> dict:
    import json
    return json.loads(tok.to_str())["model"]


def reference_logits(truth: dict[str, np.ndarray], ids: torch.Tensor, *, n_layer: int, n_head: int, n_kv_head: int,
                     arch: str = "llama", eps: float = 1e-5, theta: float = 10000.0) -> torch.Tensor:
    """A direct, loop-free-of-lmlab llama forward over the GGUF-named weights (un-permuted truth)."""
    W = {k: torch.from_numpy(v) for k, v in truth.items() if v is not None}
    x = W["token_embd.weight"][ids]
    B, T, D = x.shape
    hd = D // n_head

    def rms(h, w):
        return w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps))

    inv = 1.0 / theta ** (torch.arange(0, hd, 2).float() / hd)
    ang = torch.arange(T).float()[:, None] * inv[None]
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()

    def rope(t):
        a, b = t[..., : hd // 2], t[..., hd // 2:]
        return t * cos + torch.cat([-b, a], -1) * sin

    for i in range(n_layer):
        p = f"blk.{i}."
        h = rms(x, W[p + "attn_norm.weight"])
        q = h @ W[p + "attn_q.weight"].T
        k = h @ W[p + "attn_k.weight"].T
        v = h @ W[p + "attn_v.weight"].T
        if arch == "qwen2":
            q, k, v = q + W[p + "attn_q.bias"], k + W[p + "attn_k.bias"], v + W[p + "attn_v.bias"]
        q = rope(q.view(B, T, n_head, hd).transpose(1, 2))
        k = rope(k.view(B, T, n_kv_head, hd).transpose(1, 2)).repeat_interleave(n_head // n_kv_head, 1)
        v = v.view(B, T, n_kv_head, hd).transpose(1, 2).repeat_interleave(n_head // n_kv_head, 1)
        att = (q @ k.transpose(-1, -2)) / hd ** 0.5
        att = att.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf")).softmax(-1)
        x = x + (att @ v).transpose(1, 2).reshape(B, T, D) @ W[p + "attn_output.weight"].T
        h = rms(x, W[p + "ffn_norm.weight"])
        g = torch.nn.functional.silu(h @ W[p + "ffn_gate.weight"].T) * (h @ W[p + "ffn_up.weight"].T)
        x = x + g @ W[p + "ffn_down.weight"].T
    x = rms(x, W["output_norm.weight"])
    head = W.get("output.weight", W["token_embd.weight"])
    return x @ head.T
