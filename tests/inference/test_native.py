"""lmlab.inference.native: the C++ matrix-vector kernels against de-quantize + F.linear.

Tolerances (relative error of the whole output, ‖got − want‖ / ‖want‖):
  * the integer kernels' fast path quantizes x to int8 per group of 32 columns (an error of about 0.5 %
    of the output, measured for Gaussian x): QUANT_TOL = 2e-2;
  * bfloat16 weights with x rounded to bfloat16: BF16_TOL = 1e-2;
  * exact float32 arithmetic (scalar paths, f32 kernel): EXACT_TOL = 1e-5;
  * a bfloat16 output adds its own rounding (2⁻⁹ relative): + 4e-3.
A real bug (nibbles swapped, a group's scale taken from its neighbour, a dropped tail) gives errors of
tens of percent: test_a_broken_kernel_fails_the_check shows that for swapped nibbles.
"""
import pytest
import torch
import torch.nn.functional as F

from lmlab.inference import native
from lmlab.inference.quantize import dequantize_int4, dequantize_int8, quantize_int4, quantize_int8
from lmlab.utils import device as device_utils

QUANT_TOL, BF16_TOL, EXACT_TOL, BF16_OUT = 2e-2, 1e-2, 1e-5, 4e-3
SHAPES = [(960, 576), (77, 1536), (45, 96), (19, 32), (130, 200)]  # N×K: real ones, and awkward N and K



@pytest.fixture
def built():
    """Builds the kernels on first use (into the real $LMLAB_HOME/kernels cache); skips where they cannot be."""
    if not native.available():
        pytest.skip(f"native kernels not available: {native._state.get('error')}")


needs_native = pytest.mark.usefixtures("built")


@pytest.fixture(params=["fast", "scalar"])
def path(request, monkeypatch):
    """Each kernel on its fast path (where this CPU has one) and on its scalar fallback."""
    if request.param == "scalar":
        monkeypatch.setenv(native.SCALAR_ENV, "1")
    else:
        monkeypatch.delenv(native.SCALAR_ENV, raising=False)
    return request.param


def rel_err(got, want):
    return ((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-12)).item()


def tol(path, dtype, fast_tol):
    exact = EXACT_TOL if dtype == torch.float32 else BF16_OUT
    return (fast_tol if path == "fast" and torch.ops.lmlab.isa() == "avx512" else exact) + \
        (BF16_OUT if dtype == torch.bfloat16 else 0)


def inputs(N, K, M, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=gen) * 0.05 + 0.01 * torch.randn(N, 1, generator=gen)
    x = torch.randn(M, K, generator=gen).to(dtype)
    return w, x


def int4_check(w, x, path, group_size=32):
    packed, scale, minimum = quantize_int4(w, group_size)
    want = F.linear(x.float(), dequantize_int4(packed, scale, minimum, w.shape[1]))
    got = torch.ops.lmlab.int4_gemv(x, packed, scale, minimum, group_size)
    assert got.dtype == x.dtype and got.shape == want.shape
    err = rel_err(got, want)
    assert err <= tol(path, x.dtype, QUANT_TOL), err
    return err


@needs_native
@pytest.mark.parametrize("N,K", SHAPES)
@pytest.mark.parametrize("M", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4(N, K, M, dtype, path):
    int4_check(*inputs(N, K, M, dtype), path)


@needs_native
@pytest.mark.parametrize("M", [5, 7, 16])
def test_more_rows_than_one_block(M, path):
    """x rows go through the kernels in blocks of 4 (the dense ones then 2, then 1): full and partial blocks,
    up to QuantLinear.native_rows; W's 70 rows end in a partial block of 4 too."""
    w, x = inputs(70, 576, M, torch.float32)
    assert rel_err(torch.ops.lmlab.f32_gemv(x, w), F.linear(x, w)) <= EXACT_TOL
    wb = w.bfloat16()
    assert rel_err(torch.ops.lmlab.bf16_gemv(x, wb), F.linear(x, wb.float())) <= BF16_TOL
    for row in range(M):
        torch.testing.assert_close(torch.ops.lmlab.f32_gemv(x[row:row + 1], w)[0], torch.ops.lmlab.f32_gemv(x, w)[row])
    int4_check(w, x, path)
    q, scale = quantize_int8(w)
    assert rel_err(torch.ops.lmlab.int8_gemv(x, q, scale), F.linear(x, dequantize_int8(q, scale))) <= \
        tol(path, torch.float32, QUANT_TOL)
    for row in range(M):  # each row equals its own one-row product (blocks do not mix rows)
        torch.testing.assert_close(torch.ops.lmlab.int8_gemv(x[row:row + 1], q, scale)[0],
                                   torch.ops.lmlab.int8_gemv(x, q, scale)[row])


@needs_native
@pytest.mark.parametrize("group_size", [64, 128])
def test_int4_other_group_sizes_take_the_scalar_path(group_size, path):
    w, x = inputs(70, 576, 2, torch.float32)
    packed, scale, minimum = quantize_int4(w, group_size)
    want = F.linear(x, dequantize_int4(packed, scale, minimum, 576))
    assert rel_err(torch.ops.lmlab.int4_gemv(x, packed, scale, minimum, group_size), want) <= EXACT_TOL


@needs_native
@pytest.mark.parametrize("N,K", SHAPES)
@pytest.mark.parametrize("M", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8(N, K, M, dtype, path):
    w, x = inputs(N, K, M, dtype)
    q, scale = quantize_int8(w)
    want = F.linear(x.float(), dequantize_int8(q, scale))
    got = torch.ops.lmlab.int8_gemv(x, q, scale)
    assert got.dtype == dtype and rel_err(got, want) <= tol(path, dtype, QUANT_TOL)


@needs_native
@pytest.mark.parametrize("N,K", SHAPES)
@pytest.mark.parametrize("M", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bf16(N, K, M, dtype, path):
    w, x = inputs(N, K, M, dtype)
    wb = w.bfloat16()
    want = F.linear(x.float(), wb.float())
    got = torch.ops.lmlab.bf16_gemv(x, wb)
    assert got.dtype == dtype and rel_err(got, want) <= BF16_TOL + (BF16_OUT if dtype == torch.bfloat16 else 0)


@needs_native
@pytest.mark.parametrize("N,K", SHAPES)
@pytest.mark.parametrize("M", [1, 3])
def test_f32(N, K, M, path):
    w, x = inputs(N, K, M, torch.float32)
    assert rel_err(torch.ops.lmlab.f32_gemv(x, w), F.linear(x, w)) <= EXACT_TOL


@needs_native
def test_a_broken_kernel_fails_the_check(path):
    """The tolerance catches a real bug: the kernel fed swapped nibbles misses by far more than QUANT_TOL."""
    w, x = inputs(960, 576, 1, torch.float32)
    packed, scale, minimum = quantize_int4(w, 32)
    want = F.linear(x, dequantize_int4(packed, scale, minimum, 576))
    swapped = (packed >> 4) | (packed << 4)
    assert rel_err(torch.ops.lmlab.int4_gemv(x, swapped, scale, minimum, 32), want) > 10 * QUANT_TOL
    shifted = torch.roll(scale, 1, dims=1)  # each group scaled by its neighbour's scale
    assert rel_err(torch.ops.lmlab.int4_gemv(x, packed, shifted, minimum, 32), want) > 10 * QUANT_TOL


@needs_native
def test_bad_shapes_raise():
    w, x = inputs(16, 64, 1, torch.float32)
    packed, scale, minimum = quantize_int4(w, 32)
    with pytest.raises(RuntimeError):
        torch.ops.lmlab.int4_gemv(torch.randn(1, 128), packed, scale, minimum, 32)
    with pytest.raises(RuntimeError):
        torch.ops.lmlab.f32_gemv(x, w.bfloat16())


@needs_native
def test_torch_compile_traces_through_the_ops():
    w, x = inputs(96, 576, 1, torch.float32)
    packed, scale, minimum = quantize_int4(w, 32)
    q, s = quantize_int8(w)

    def step(x):
        return torch.ops.lmlab.int4_gemv(x, packed, scale, minimum, 32).relu() + torch.ops.lmlab.int8_gemv(x, q, s)

    compiled = torch.compile(step, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), step(x))


# --------------------------------------------------------------------------- real weights
@pytest.mark.slow
@needs_native
def test_real_smollm2_weights(smollm2, path):
    """Every distinct weight shape of SmolLM2-135M, int4 (group 32) and int8, with a real activation scale."""
    model, _ = smollm2
    seen = {}
    for name, p in model.named_parameters():
        if p.dim() == 2 and "emb" not in name and tuple(p.shape) not in seen:
            seen[tuple(p.shape)] = (name, p.detach().float())
    assert len(seen) >= 4, sorted(seen)
    gen = torch.Generator().manual_seed(1)
    for shape, (name, w) in seen.items():
        x = torch.randn(1, w.shape[1], generator=gen) * torch.rand(w.shape[1], generator=gen) * 3  # uneven columns
        int4_check(w, x, path)
        q, scale = quantize_int8(w)
        err = rel_err(torch.ops.lmlab.int8_gemv(x, q, scale), F.linear(x, dequantize_int8(q, scale)))
        assert err <= tol(path, torch.float32, QUANT_TOL), (name, err)


# --------------------------------------------------------------------------- no compiler
def test_missing_compiler_gives_one_notice_and_no_kernels(monkeypatch, tmp_path, capsys):
    """Without a compiler the kernels are simply absent: one notice line, available() False, nothing raises."""
    monkeypatch.setenv(native.ENV_CXX, str(tmp_path / "no-such-g++"))
    monkeypatch.setenv("LMLAB_HOME", str(tmp_path))
    monkeypatch.setattr(device_utils, "NOTES", [])
    monkeypatch.setattr(native, "_state", {})
    assert native.available() is False and native.available() is False
    err = capsys.readouterr().err
    assert err.count("lmlab: ") == 1 and "native CPU kernels are not available" in err
    assert not (tmp_path / "kernels").exists() or not list((tmp_path / "kernels").iterdir())


def test_failed_build_gives_one_notice(monkeypatch, tmp_path, capsys):
    """A compiler that fails: one notice, no library left behind (the temp file is removed)."""
    fake = tmp_path / "fake-cxx"
    fake.write_text("#!/bin/sh\necho 'fake-cxx 1.0'\n[ \"$1\" = --version ] && exit 0\necho 'error: broken' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv(native.ENV_CXX, str(fake))
    monkeypatch.setenv("LMLAB_HOME", str(tmp_path))
    monkeypatch.setattr(device_utils, "NOTES", [])
    monkeypatch.setattr(native, "_state", {})
    assert native.available() is False
    err = capsys.readouterr().err  # the build's notice, then the one fallback line
    assert err.count("lmlab: ") == 2 and "building lmlab's native CPU kernels" in err
    assert err.count("not available") == 1 and "broken" in err
    assert list((tmp_path / "kernels").iterdir()) == []


def test_switched_off(monkeypatch, capsys):
    monkeypatch.setenv(native.ENV, "off")
    monkeypatch.setattr(native, "_state", {})
    assert native.available() is False and capsys.readouterr().err == ""


# --------------------------------------------------------------------------- the quantized linears
@needs_native
@pytest.mark.parametrize("cls", ["int4", "int8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_linears_prefer_the_native_kernel(cls, dtype, monkeypatch):
    monkeypatch.delenv(native.SCALAR_ENV, raising=False)
    from lmlab.inference.quantize import Int4Linear, Int8Linear

    w, _ = inputs(200, 576, 1, torch.float32)
    lin = Int4Linear(w, torch.randn(200)) if cls == "int4" else Int8Linear(w, torch.randn(200))
    lin = lin.to(dtype)  # buffers keep their dtypes; only the bias follows
    for rows in (1, 3, 20):  # 20 > native_rows: PyTorch's kernel (or the reference) takes over
        x = torch.randn(rows, 576).to(dtype)
        assert rel_err(lin(x), lin.reference(x)) <= QUANT_TOL + BF16_OUT
    assert lin.route() == "native"


@needs_native
def test_quantized_linears_fall_back_without_native(monkeypatch):
    from lmlab.inference.quantize import Int4Linear

    monkeypatch.setattr(native, "available", lambda: False)
    lin = Int4Linear(inputs(64, 576, 1, torch.float32)[0])
    x = torch.randn(1, 576)
    lin(x)
    assert lin.route() in ("pytorch", "reference")
    assert rel_err(lin(x), lin.reference(x)) <= 0.05


@needs_native
def test_compiled_quantized_linear_calls_the_native_kernel():
    from lmlab.inference.quantize import Int4Linear

    lin = Int4Linear(inputs(64, 576, 1, torch.float32)[0])
    x = torch.randn(1, 576)
    want = lin(x)  # prepares the route eagerly, as lmlab's compiled step does (warm-up)
    assert lin.route() == "native"
    got = torch.compile(lin, backend="eager", fullgraph=True)(x)
    torch.testing.assert_close(got, want)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,H,KV,T,S,D", [(1, 9, 3, 1, 150, 64), (2, 4, 4, 1, 37, 40), (3, 8, 2, 1, 700, 64),
                                          (1, 9, 3, 5, 150, 64), (2, 6, 2, 16, 90, 40)])
def test_cached_attention_reads_only_the_allowed_slots(dtype, B, H, KV, T, S, D, path):
    """attend_cached against SDPA with the same boolean mask: T queries per row, each allowed its own slots
    with holes (a padded row, causal queries), and garbage (NaN) in slots no query may see, which the kernel
    must never read. The 700-slot case runs threaded."""
    gen = torch.Generator().manual_seed(B * S + T)
    q = torch.randn(B, T, H, D, generator=gen).to(dtype).transpose(1, 2)  # strided, as the model's view is
    k, v = (torch.randn(B, KV, S, D, generator=gen).to(dtype) for _ in range(2))
    seen = torch.rand(B, 1, S, generator=gen) < 0.7
    seen[:, :, :T] = True
    seen[0, :, S // 2:] = False  # row 0: a cache filled only halfway
    allowed = seen & (torch.arange(S).view(1, 1, S) <= (S // 2 - T + torch.arange(T)).view(1, T, 1))  # causal
    anyone = allowed.any(1).view(B, 1, S, 1)
    k[~anyone.expand_as(k)] = float("nan")
    v[~anyone.expand_as(v)] = float("nan")
    scale = D ** -0.5
    got = torch.ops.lmlab.attend_cached(q, k, v, allowed, scale)
    kk, vv = (t.nan_to_num(0).float().repeat_interleave(H // KV, 1) for t in (k, v))
    want = F.scaled_dot_product_attention(q.float(), kk, vv, attn_mask=allowed.view(B, 1, T, S), scale=scale)
    assert got.dtype == dtype and got.shape == q.shape and torch.isfinite(got).all()
    assert rel_err(got, want) <= (1e-5 if dtype == torch.float32 else BF16_OUT), rel_err(got, want)


@needs_native
@pytest.mark.parametrize("B,H,KV,T,S,D", [(1, 9, 3, 512, 512, 64), (2, 4, 2, 37, 50, 32), (1, 6, 2, 5, 70, 128),
                                          (1, 3, 3, 33, 33, 96), (1, 4, 2, 20, 26, 40)])
def test_causal_attention_against_sdpa(B, H, KV, T, S, D, path):
    """causal_attention against float32 SDPA with the bottom-right causal mask (query t sees keys 0..S−T+t):
    bfloat16 q/k/v as the model's views (q a transposed projection, k/v the first S slots of a longer cache
    whose later slots hold NaN, which no query may read). The 512-token case is SmolLM2's prompt and runs
    threaded; D = 40 has no vectorized path and takes the scalar one."""
    gen = torch.Generator().manual_seed(T * S + D)
    q = torch.randn(B, T, H, D, generator=gen).bfloat16().transpose(1, 2)
    cache_k, cache_v = (torch.full((B, KV, S + 9, D), float("nan")).bfloat16() for _ in range(2))
    cache_k[:, :, :S], cache_v[:, :, :S] = (torch.randn(B, KV, S, D, generator=gen) for _ in range(2))
    k, v = cache_k[:, :, :S], cache_v[:, :, :S]
    scale = D ** -0.5
    got = torch.ops.lmlab.causal_attention(q, k, v, scale)
    allowed = torch.arange(S).view(1, S) <= (S - T + torch.arange(T)).view(T, 1)
    want = F.scaled_dot_product_attention(q.float(), k.float().repeat_interleave(H // KV, 1),
                                          v.float().repeat_interleave(H // KV, 1), attn_mask=allowed, scale=scale)
    assert got.dtype == torch.bfloat16 and got.shape == q.shape and torch.isfinite(got).all()
    assert rel_err(got, want) <= 2 * BF16_OUT, rel_err(got, want)
    if path == "fast" and D != 40:
        assert torch.ops.lmlab.causal_attention_fast(D) == device_utils.cpu_flags().issuperset({"avx512_bf16"})


@needs_native
def test_causal_attention_rejects_bad_input():
    q = torch.randn(1, 4, 8, 64).bfloat16()
    with pytest.raises(RuntimeError, match="bfloat16"):
        torch.ops.lmlab.causal_attention(q.float(), q.float(), q.float(), 0.125)
    with pytest.raises(RuntimeError, match="S ≥ T"):
        torch.ops.lmlab.causal_attention(q, q[:, :, :4], q[:, :, :4], 0.125)
