"""GGUF files (llama.cpp): metadata → ModelConfig and tokenizer, tensors de-quantized with `gguf`."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType as QType, GGUFReader, quants

from lmlab.config import ModelConfig
from lmlab.checkpoints.gguf_check import check_header
from lmlab.checkpoints.native import check_tensors
from lmlab.errors import LmlabError, first_line
from lmlab.tokenizer import Tokenizer
from lmlab.utils.device import machine_threads

# Tensor types `gguf` can turn back into floats (plain floats need no de-quantizing).
FLOAT_TYPES = {QType.F32, QType.F16, QType.BF16, QType.F64}
UNSUPPORTED = {QType.Q8_1, QType.Q8_K, QType.I8, QType.I16, QType.I32, QType.I64} | (
    {QType.Q1_0} if hasattr(QType, "Q1_0") else set())
ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2"}  # GGUF architecture → lmlab family


def open_gguf(path: str | Path) -> GGUFReader:
    path = Path(path)
    check_header(path)  # bounded: counts and offsets against the file size, strings UTF-8
    try:
        reader = GGUFReader(path)
    except Exception as e:  # gguf raises ValueError, KeyError, struct errors... on what the walk lets through
        raise LmlabError(f"{path}: not a readable GGUF file ({type(e).__name__}: {first_line(e)})") from None
    size = path.stat().st_size
    for t in reader.tensors:
        end = t.data_offset + t.n_bytes
        if end > size:
            raise LmlabError(f"{path}: truncated: tensor {t.name!r} needs bytes up to {end}, file has {size}")
    return reader


def metadata(reader: GGUFReader, source: str) -> dict[str, Any]:
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            out[key] = field.contents()
        except Exception as e:  # check_header has vetted sizes and UTF-8; this is a last guard
            raise LmlabError(f"{source}: {key}: unreadable value ({type(e).__name__}: {first_line(e)})") from None
    return out


def config_from_metadata(meta: dict[str, Any], source: str) -> ModelConfig:
    arch = meta.get("general.architecture")
    if not isinstance(arch, str) or arch not in ARCHITECTURES:
        raise LmlabError(f"{source}: general.architecture: unsupported GGUF architecture {arch!r} "
                         f"(supported: {', '.join(ARCHITECTURES)})")

    def get(key: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise LmlabError(f"{source}: GGUF metadata lacks '{arch}.{key}'")
        return value

    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = meta.get(f"{arch}.vocab_size") or (len(tokens) if isinstance(tokens, list) else None)
    if vocab is None:
        raise LmlabError(f"{source}: GGUF metadata lacks '{arch}.vocab_size' and 'tokenizer.ggml.tokens'")
    fields = dict(
        arch="decoder", family=ARCHITECTURES[arch], name=meta.get("general.name", ""),
        vocab_size=vocab, n_layer=get("block_count"), n_head=get("attention.head_count"),
        n_kv_head=meta.get(f"{arch}.attention.head_count_kv"), d_model=get("embedding_length"),
        d_ff=get("feed_forward_length"),
        head_dim=meta.get(f"{arch}.attention.key_length") or meta.get(f"{arch}.rope.dimension_count"),
        max_seq_len=get("context_length"), pos="rope", rope_theta=get("rope.freq_base", 10000.0),
        norm="rmsnorm", norm_eps=get("attention.layer_norm_rms_epsilon"), mlp="swiglu",
        attn_bias=arch == "qwen2", out_bias=False, tie_embeddings=False,
        bos_id=meta.get("tokenizer.ggml.bos_token_id"), eos_id=meta.get("tokenizer.ggml.eos_token_id"),
        pad_id=meta.get("tokenizer.ggml.padding_token_id") or 0,
    )
    if isinstance(fields["rope_theta"], int) and not isinstance(fields["rope_theta"], bool):
        fields["rope_theta"] = float(fields["rope_theta"])
    cfg = ModelConfig.from_dict(fields, source)  # the one validation layer: types and ranges
    cfg.check_special_ids(source)
    return cfg


def dequantize(t, source: str) -> np.ndarray:
    qtype = QType(t.tensor_type)
    if qtype in UNSUPPORTED:
        raise LmlabError(f"{source}: tensor {t.name!r} has unsupported GGUF type {qtype.name}")
    shape = tuple(int(x) for x in reversed(t.shape))  # GGUF lists dimensions innermost first
    if qtype in FLOAT_TYPES:
        arr = np.asarray(t.data)
        if qtype == QType.BF16:
            arr = (arr.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        return arr.astype(np.float32).reshape(shape)
    try:
        return quants.dequantize(t.data, qtype).reshape(shape)
    except NotImplementedError:
        raise LmlabError(f"{source}: tensor {t.name!r} has unsupported GGUF type {qtype.name}") from None
    except ValueError as e:  # a block layout that does not fit the stored bytes
        raise LmlabError(f"{source}: tensor {t.name!r}: cannot de-quantize {qtype.name} ({first_line(e)})") from None


def unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's interleaving of Q/K rows so rotary pairs are (i, i + d/2) again."""
    rest = w.shape[1:]
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *rest).transpose(1, 2).reshape(w.shape)


def gguf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The shape (PyTorch order) every GGUF tensor must have for this config."""
    D, V, F = cfg.d_model, cfg.vocab_size, cfg.d_ff
    q, kv = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
    out = {"token_embd.weight": (V, D), "output_norm.weight": (D,), "output.weight": (V, D)}
    for i in range(cfg.n_layer):
        p = f"blk.{i}."
        out.update({p + "attn_q.weight": (q, D), p + "attn_k.weight": (kv, D), p + "attn_v.weight": (kv, D),
                    p + "attn_q.bias": (q,), p + "attn_k.bias": (kv,), p + "attn_v.bias": (kv,),
                    p + "attn_output.weight": (D, q), p + "attn_norm.weight": (D,), p + "ffn_norm.weight": (D,),
                    p + "ffn_gate.weight": (F, D), p + "ffn_up.weight": (F, D), p + "ffn_down.weight": (D, F)})
    return out


def check_shapes(reader: GGUFReader, cfg: ModelConfig, source: str) -> None:
    """Each tensor's stored shape against the config, before anything is de-quantized."""
    want = gguf_shapes(cfg)
    for t in reader.tensors:
        shape = tuple(int(x) for x in reversed(t.shape))
        if t.name in want and shape != want[t.name]:
            raise LmlabError(f"{source}: tensor {t.name!r} has shape {shape}, the metadata implies {want[t.name]}")


def state_dict(reader: GGUFReader, cfg: ModelConfig, source: str) -> dict[str, torch.Tensor]:
    check_shapes(reader, cfg, source)

    def floats(t) -> tuple[str, torch.Tensor]:
        return t.name, torch.from_numpy(np.ascontiguousarray(dequantize(t, source)))

    with ThreadPoolExecutor(max_workers=machine_threads()) as pool:  # numpy releases the GIL here
        raw = dict(pool.map(floats, reader.tensors))

    def take(name: str) -> torch.Tensor:
        if name not in raw:
            raise LmlabError(f"{source}: missing tensor {name!r}")
        return raw.pop(name)

    sd = {"tok_emb.weight": take("token_embd.weight"), "decoder.norm.weight": take("output_norm.weight")}
    if "output.weight" in raw:
        sd["lm_head.weight"] = take("output.weight")
    permute = cfg.family == "llama"
    for i in range(cfg.n_layer):
        p, q = f"blk.{i}.", f"decoder.blocks.{i}."
        wq, wk, wv = take(p + "attn_q.weight"), take(p + "attn_k.weight"), take(p + "attn_v.weight")
        if permute:
            wq, wk = unpermute(wq, cfg.n_head), unpermute(wk, cfg.n_kv_head)
        sd[q + "attn.qkv.weight"] = torch.cat([wq, wk, wv])
        if cfg.attn_bias:
            sd[q + "attn.qkv.bias"] = torch.cat([take(p + "attn_q.bias"), take(p + "attn_k.bias"),
                                                 take(p + "attn_v.bias")])
        sd[q + "attn.out.weight"] = take(p + "attn_output.weight")
        sd[q + "norm1.weight"] = take(p + "attn_norm.weight")
        sd[q + "norm2.weight"] = take(p + "ffn_norm.weight")
        sd[q + "mlp.gate_up.weight"] = torch.cat([take(p + "ffn_gate.weight"), take(p + "ffn_up.weight")])
        sd[q + "mlp.proj.weight"] = take(p + "ffn_down.weight")
    raw.pop("rope_freqs.weight", None)
    if raw:
        raise LmlabError(f"{source}: unexpected tensor {next(iter(raw))!r} for architecture {cfg.family}")
    check_tensors(cfg, sd, source)  # the final word: exactly the tensors and shapes the model has
    return sd


def read(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor], Tokenizer]:
    reader = open_gguf(path)
    meta = metadata(reader, str(path))
    cfg = config_from_metadata(meta, str(path))
    names = {t.name for t in reader.tensors}
    cfg.tie_embeddings = "output.weight" not in names
    sd = state_dict(reader, cfg, str(path))
    return cfg, sd, Tokenizer.from_gguf_metadata(meta, str(path))
