"""Weight-only quantizers: round-trip error bounds, packing, odd shapes, fast kernel vs reference, whole models."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lmlab.config import preset
from lmlab.errors import LmlabError
from lmlab.inference.quantize import (Int4Linear, Int8Linear, QuantLinear, dequantize_int4, dequantize_int8,
                                      quantize_int4, quantize_int8, quantize_model, unpack_int4, weight_bytes)
from lmlab.model import Transformer


def weights(n: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    w[0] *= 20  # rows of very different ranges: per-row / per-group scales must cope
    return w


# --------------------------------------------------------------------------- int8
@pytest.mark.parametrize("shape", [(64, 128), (7, 13), (1, 1), (33, 576)])
def test_int8_round_trip_within_half_a_step(shape):
    w = weights(*shape)
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and q.shape == w.shape and scale.shape == (shape[0],)
    err = (dequantize_int8(q, scale) - w).abs()
    assert (err <= scale[:, None] / 2 + 1e-7).all()
    assert q.abs().max() <= 127


def test_int8_zero_row_stays_zero():
    w = weights(4, 16)
    w[2] = 0
    q, scale = quantize_int8(w)
    assert torch.isfinite(scale).all() and (dequantize_int8(q, scale)[2] == 0).all()


# --------------------------------------------------------------------------- int4
@pytest.mark.parametrize("shape,group", [((64, 128), 32), ((16, 96), 32), ((5, 37), 32), ((48, 100), 16),
                                         ((3, 8), 64)])
def test_int4_round_trip_within_half_a_step(shape, group):
    w = weights(*shape)
    packed, scale, minimum = quantize_int4(w, group)
    Kp = -(-shape[1] // group) * group
    assert packed.dtype == torch.uint8 and packed.shape == (shape[0], Kp // 2)
    assert scale.shape == minimum.shape == (shape[0], Kp // group)
    back = dequantize_int4(packed, scale, minimum, shape[1])
    assert back.shape == w.shape
    step = scale.repeat_interleave(group, dim=1)[:, : shape[1]]
    assert ((back - w).abs() <= step / 2 + 1e-6).all()


def test_int4_codes_cover_the_range_and_unpack_exactly():
    w = weights(16, 64)
    packed, scale, minimum = quantize_int4(w, 32)
    codes = unpack_int4(packed)
    assert codes.min() == 0 and codes.max() == 15
    repacked = codes[:, 0::2] | (codes[:, 1::2] << 4)
    assert torch.equal(repacked, packed)


def test_int4_reproduces_a_4bit_grid_exactly():
    """Weights already on a 16-level grid per group (like de-quantized GGUF Q4_1) survive int4 unchanged."""
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 16, (32, 64), generator=g).float()
    codes[:, 0], codes[:, 1] = 0, 15  # every group of 64 spans the full range
    scale = torch.rand(32, 1, generator=g) + 0.1
    w = codes * scale - 0.5
    packed, s, m = quantize_int4(w, 64)
    assert torch.allclose(dequantize_int4(packed, s, m, 64), w, atol=1e-5)


def test_bad_group_size_and_scheme_are_named():
    with pytest.raises(LmlabError, match="group_size"):
        quantize_int4(weights(4, 8), 3)
    with pytest.raises(LmlabError, match="int3"):
        quantize_model(Transformer(preset("tiny-llama")), "int3")


# --------------------------------------------------------------------------- modules: fast route vs reference
@pytest.mark.parametrize("cls,kw", [(Int8Linear, {}), (Int4Linear, {"group_size": 32}), (Int4Linear, {"group_size": 16})])
@pytest.mark.parametrize("n,k", [(64, 128), (48, 96), (10, 37), (32, 100)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_matches_dequantized_weight(cls, kw, n, k, dtype):
    w, b = weights(n, k), torch.randn(n) * 0.1
    layer = cls(w, b, **kw)
    x = torch.randn(2, 3, k, dtype=dtype)
    y = layer(x)
    assert y.shape == (2, 3, n) and y.dtype == dtype
    want = F.linear(x.float(), layer.dequantize(torch.float32), b)
    rel = (y.float() - want).norm() / want.norm()
    assert rel < (2e-2 if dtype == torch.bfloat16 or layer._fast.get((x.device, dtype)) else 1e-5)
    ref_rel = (layer.reference(x).float() - want).norm() / want.norm()
    assert ref_rel < (2e-2 if dtype == torch.bfloat16 else 1e-6)


def test_quantized_linear_is_close_to_the_float_linear():
    w = weights(96, 256)
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(0))  # int4's error varies with x: 0.02-0.22
    want = F.linear(x, w)
    for layer, tol in [(Int8Linear(w), 0.02), (Int4Linear(w, group_size=32), 0.15)]:
        rel = (layer(x) - want).norm() / want.norm()
        assert rel < tol, (type(layer).__name__, rel)


@pytest.mark.parametrize("cls,kw", [(Int8Linear, {}), (Int4Linear, {"group_size": 32})])
def test_float32_activations_take_the_fast_kernel(cls, kw):
    """The CPU kernels compute in bfloat16 where the CPU has it; a float32 model must still get them (it once
    fell back to de-quantizing every weight on every step: 8 tok/s instead of 55 for SmolLM2 int8)."""
    from lmlab.inference.quantize import NATIVE, kernel_dtype, quantization_route

    scheme = "int8" if cls is Int8Linear else "int4"
    if quantization_route(scheme, torch.device("cpu")) != "kernel":
        pytest.skip(f"no {scheme} kernel in this PyTorch")
    layer = cls(weights(64, 128), **kw)
    layer(torch.randn(1, 128))
    state = layer._fast.get((torch.device("cpu"), torch.float32))
    if state is not None and state[1] is NATIVE:  # lmlab's own kernel first; PyTorch's kept for more rows
        state = state[2]
    assert state is not None and state[0] == kernel_dtype(torch.device("cpu"))


def test_device_move_forgets_prepared_kernels():
    layer = Int8Linear(weights(32, 64))
    layer(torch.randn(1, 64))
    assert layer._fast
    layer.to(torch.float32)
    assert layer._fast == {}


# --------------------------------------------------------------------------- whole models
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantize_model_replaces_every_linear_and_unties_the_head(scheme):
    torch.manual_seed(0)
    model = Transformer(preset("tiny-llama")).eval()
    emb = model.tok_emb.weight.detach().clone()
    ids = torch.randint(0, 512, (2, 9))
    with torch.no_grad():
        want = model(ids)
        before = weight_bytes(model)
        quantize_model(model, scheme, group_size=32)
        got = model(ids)
    assert not any(type(m) is nn.Linear for m in model.modules())
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 2 * 4 + 1  # qkv, out, gate_up, proj ×2; head
    assert torch.equal(model.tok_emb.weight, emb)
    assert weight_bytes(model) < before / 3
    assert isinstance(model.lm_head, Int8Linear)  # the vocabulary projection stays at 8 bits by default
    if scheme == "int4":
        assert isinstance(model.decoder.blocks[0].mlp.gate_up, Int4Linear)
    rel = (got - want).norm() / want.norm()
    assert rel < (0.02 if scheme == "int8" else 0.2)


def test_int4_head_can_be_int4_too():
    model = quantize_model(Transformer(preset("tiny-llama")).eval(), "int4", group_size=32, head=None)
    assert isinstance(model.lm_head, Int4Linear)
    with pytest.raises(LmlabError, match="int16"):
        quantize_model(Transformer(preset("tiny-llama")).eval(), "int4", head="int16")


def test_quantized_state_dict_round_trips():
    torch.manual_seed(0)
    a = quantize_model(Transformer(preset("tiny-llama")).eval(), "int4", group_size=16)
    b = quantize_model(Transformer(preset("tiny-llama")).eval(), "int4", group_size=16)
    b.load_state_dict(a.state_dict())
    ids = torch.randint(0, 512, (1, 7))
    with torch.no_grad():
        assert torch.equal(a(ids), b(ids))


@pytest.mark.parametrize("cls", [Int8Linear, Int4Linear])
def test_prompt_rows_and_decode_rows_agree(cls):
    """Many rows take de-quantize + GEMM, few rows the weight-only kernel: the same numbers either way."""
    layer = cls(weights(64, 128))
    x = torch.randn(80, 128, dtype=torch.bfloat16)
    many = layer(x).float()
    few = torch.cat([layer(x[i:i + 1]) for i in range(80)]).float()
    assert (many - few).norm() / many.norm() < 2e-2
