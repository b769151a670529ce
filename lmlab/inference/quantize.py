"""Weight-only quantization: int8 per output channel and int4 in groups along the input dimension.

`quantize_model(model, "int8" | "int4", group_size=32)` swaps every nn.Linear of the model (the LM
head included, untied from the embedding, which stays in floating point) for a module that stores
integer weights and scales. Activations stay in floating point.

Storage is the same on every device: int8 weights (N×K) with one scale per row, or int4 codes packed
two per byte (N×K/2, low nibble = even column) with a scale and a minimum per group of `group_size`
columns (w ≈ code * scale + minimum). The matmul takes the fastest route that exists here:
lmlab's own CPU matrix-vector kernels (lmlab.inference.native: int8 and int4 with groups of 32, up to
`native_rows` rows, where they could be built), then PyTorch's own weight-only kernels
(`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`) where the device has them, each only when it agrees
with the reference on this very weight (checked once), else the reference route, which de-quantizes the
weight to the activation dtype and calls F.linear (the same on CPU, CUDA or anything else; torch.compile
fuses it).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmlab.errors import LmlabError
from lmlab.inference import native
from lmlab.utils.device import bf16_supported

SCHEMES = ("int8", "int4")


# --------------------------------------------------------------------------- quantizers (pure functions)
def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: w ≈ q * scale[:, None]; |error| ≤ scale / 2 per element."""
    w = w.detach().float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp_min(1e-12)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return q.to(dtype) * scale.to(dtype)[:, None]


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric int4 in groups of `group_size` columns: w ≈ code * scale + minimum.

    Returns packed codes (uint8 N×Kp/2, Kp = K rounded up to the group size, padding codes 0), and
    float32 scale and minimum of shape N×(Kp/group_size). |error| ≤ scale / 2 per element.
    """
    if group_size < 2 or group_size % 2:
        raise LmlabError(f"int4 group_size must be an even number ≥ 2, got {group_size}")
    w = w.detach().float()
    N, K = w.shape
    Kp = -(-K // group_size) * group_size
    groups = F.pad(w, (0, Kp - K)).view(N, Kp // group_size, group_size)
    if Kp != K:  # padding must not widen the last group's range: fill it with the group's first value
        last = groups[:, -1]
        n_real = group_size - (Kp - K)
        last[:, n_real:] = last[:, :1]
    lo, hi = groups.amin(-1), groups.amax(-1)
    scale = ((hi - lo) / 15.0).clamp_min(1e-12)
    codes = torch.round((groups - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.uint8).view(N, Kp)
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
    return packed, scale, lo


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 N×Kp/2 → codes N×Kp (uint8 0..15)."""
    return torch.stack([packed & 0x0F, packed >> 4], dim=-1).view(packed.shape[0], -1)


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, in_features: int,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    codes = unpack_int4(packed)
    N, Kp = codes.shape
    g = Kp // scale.shape[1]
    w = codes.view(N, -1, g).to(dtype) * scale.to(dtype)[..., None] + minimum.to(dtype)[..., None]
    return w.view(N, Kp)[:, :in_features]


# --------------------------------------------------------------------------- kernels available here
_UNSET = object()
NATIVE = "native"  # the second item of a state that routes to lmlab.inference.native


def _has_op(name: str) -> bool:
    try:
        return hasattr(torch.ops.aten, name)
    except (RuntimeError, AttributeError):
        return False


def kernel_dtype(device: torch.device) -> torch.dtype:
    """Activation dtype the weight-only kernels run fastest in on this device."""
    return torch.bfloat16 if bf16_supported(device) else torch.float32


def quantization_route(scheme: str, device: torch.device) -> str:
    """'kernel' when PyTorch has a fast weight-only kernel for `scheme` on this device, else 'reference'."""
    op = {"int8": "_weight_int8pack_mm", "int4": "_weight_int4pack_mm_for_cpu"}[scheme]
    if scheme == "int4" and device.type != "cpu":
        return "reference"
    return "kernel" if _has_op(op) else "reference"


class QuantLinear(nn.Module):
    """Common part of the weight-only linears: bias, shapes, and a fast kernel checked once per device."""

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None
        self._fast: dict = {}  # (device, dtype) → prepared kernel state, or None when it is unavailable

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        raise NotImplementedError

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantize(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    # subclasses: _prepare(device, dtype) → state (its first item the dtype the kernel computes in) or None;
    # _run(state, x2d) → y2d. A native state is (torch.int8, NATIVE, PyTorch's state or None, the op's weight
    # arguments): lmlab's kernel (it computes with x quantized to int8) up to `native_rows` rows, PyTorch's
    # kernel or the reference above.
    native_rows = 16

    def _kernel(self, x: torch.Tensor):
        key = (x.device, x.dtype)
        if key not in self._fast:
            self._fast[key] = None
            torch_state = self._checked(self._prepare, x.device, x.dtype)
            native_state = None
            if x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) and self._native_ok() \
                    and native.available():
                native_state = self._checked(lambda d, t: (torch.int8, NATIVE, torch_state, self._native_buffers()),
                                             x.device, x.dtype)
            self._fast[key] = native_state or torch_state
        return self._fast[key]

    def _checked(self, prepare, device, dtype):
        try:
            state = prepare(device, dtype)
            if state is not None and self._agrees(state, device, dtype):
                return state
        except (RuntimeError, NotImplementedError, TypeError):
            pass
        return None

    def _native_ok(self) -> bool:  # whether lmlab's native kernel has a fast path for this layer
        return False

    def _native_buffers(self) -> tuple[str, ...]:
        """The native op's weight arguments as names of this layer's buffers: its own where they already are
        in the op's layout, else non-persistent `native_argN` copies (named, so that an exported graph reads
        them as the layer's tensors, see lmlab.inference.compile)."""
        own, names = dict(self.named_buffers(recurse=False)), []
        for i, t in enumerate(self._native_args()):
            name = next((n for n, b in own.items() if b is t), None)
            if name is None:
                name = f"native_arg{i}"
                self.register_buffer(name, t, persistent=False)
            names.append(name)
        return tuple(names)

    def _native_args(self) -> tuple:
        raise NotImplementedError

    def _native(self, args: tuple, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def route(self) -> str:
        """The kernel this layer chose for few rows: 'native', 'pytorch' or 'reference' (before any call: 'unset')."""
        if not self._fast:
            return "unset"
        states = [s for s in self._fast.values() if s is not None]
        if not states:
            return "reference"
        return "native" if states[0][1] is NATIVE else "pytorch"

    def _dispatch(self, state, x: torch.Tensor) -> torch.Tensor:
        if state[1] is NATIVE:
            if x.shape[0] <= self.native_rows:
                return self._native(tuple(getattr(self, n) for n in state[3]), x)
            if state[2] is None:
                return F.linear(x, self.dequantize(x.dtype))
            state = state[2]
        return self._run(state, x)

    @torch.no_grad()
    def _agrees(self, state, device, dtype) -> bool:
        """The fast kernel against de-quantize + F.linear on this weight, for two random rows."""
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(2, self.in_features, generator=gen).to(device=device, dtype=dtype)
        got = self._dispatch(state, x).float()
        want = F.linear(x.float(), self.dequantize(torch.float32))
        tol = 1e-3 if dtype == state[0] == torch.float32 else 0.05  # state[0]: the dtype the kernel computes in
        return bool(((got - want).norm() <= tol * want.norm() + 1e-6).item())

    # The weight-only kernels are matrix-vector kernels: from this many rows on (prompt passes),
    # de-quantizing once and calling the dense GEMM is faster (measured on CPU: at 512 rows the int8
    # kernel took 39 ms and de-quantize + bf16 GEMM 3 ms for a 3072×576 weight).
    gemm_rows = 24

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() >= self.gemm_rows * self.in_features:
            return self.reference(x)
        state = self._fast.get((x.device, x.dtype), _UNSET)
        if state is _UNSET:  # first call on this device/dtype (prepared eagerly, never while compiling)
            state = None if torch.compiler.is_compiling() else self._kernel(x)
        if state is None:
            return self.reference(x)
        y = self._dispatch(state, x.reshape(-1, self.in_features)).view(*x.shape[:-1], self.out_features)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    def _apply(self, fn, recurse=True):  # .to(device/dtype) invalidates prepared kernels
        self._fast = {}
        for name in [n for n in self._buffers if n.startswith("native_arg")]:
            del self._buffers[name]
        return super()._apply(fn, recurse)


class Int8Linear(QuantLinear):
    """Per-output-channel symmetric int8 weights."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__(weight.shape[1], weight.shape[0], bias)
        q, scale = quantize_int8(weight)
        self.register_buffer("qweight", q.to(weight.device))
        self.register_buffer("scale", scale.to(weight.device))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_int8(self.qweight, self.scale, dtype)

    def _prepare(self, device, dtype):
        # the CPU kernel reads K in blocks of 16 and crashes (not raises) on other widths
        if not _has_op("_weight_int8pack_mm") or (device.type == "cpu" and self.in_features % 16):
            return None
        kdtype = kernel_dtype(device) if device.type == "cpu" else dtype
        return kdtype, self.scale.to(kdtype)

    def _run(self, state, x):
        kdtype, scale = state
        return torch.ops.aten._weight_int8pack_mm(x.to(kdtype), self.qweight, scale).to(x.dtype)

    def _native_ok(self) -> bool:
        return self.qweight.device.type == "cpu"

    def _native_args(self):
        return self.qweight.contiguous(), self.scale.float().contiguous()

    def _native(self, args, x):
        return torch.ops.lmlab.int8_gemv(x, *args)


class Int4Linear(QuantLinear):
    """Group-wise asymmetric int4 weights (codes 0..15, a scale and a minimum per group)."""

    gemm_rows = 64  # unpacking int4 costs more than int8, so the kernel keeps more rows

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, group_size: int = 32):
        super().__init__(weight.shape[1], weight.shape[0], bias)
        self.group_size = group_size
        packed, scale, minimum = quantize_int4(weight, group_size)
        self.register_buffer("qweight", packed.to(weight.device))
        self.register_buffer("scale", scale.to(weight.device))
        self.register_buffer("minimum", minimum.to(weight.device))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", group_size={self.group_size}"

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_int4(self.qweight, self.scale, self.minimum, self.in_features, dtype)

    def _prepare(self, device, dtype):
        # PyTorch's CPU int4 kernel: codes repacked by the op, w = (code - 8) * scale + zero.
        if device.type != "cpu" or not _has_op("_weight_int4pack_mm_for_cpu") or self.out_features % 16 \
                or self.group_size not in (32, 64, 128, 256):
            return None
        kdtype = kernel_dtype(device)
        codes = unpack_int4(self.qweight).to(torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        zero = self.minimum + 8 * self.scale
        scale_zero = torch.stack([self.scale, zero], dim=-1).transpose(0, 1).contiguous().to(kdtype)
        return kdtype, packed, scale_zero, codes.shape[1]

    def _run(self, state, x):
        kdtype, packed, scale_zero, Kp = state
        xk = x.to(kdtype)
        if Kp != self.in_features:
            xk = F.pad(xk, (0, Kp - self.in_features))
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(xk, packed, self.group_size, scale_zero)
        return y.to(x.dtype)

    def _native_ok(self) -> bool:  # other group sizes take the native kernel's slow scalar path
        return self.group_size == 32 and self.qweight.device.type == "cpu"

    def _native_args(self):
        return self.qweight.contiguous(), self.scale.float().contiguous(), self.minimum.float().contiguous()

    def _native(self, args, x):
        return torch.ops.lmlab.int4_gemv(x, *args, self.group_size)


# --------------------------------------------------------------------------- whole models
def quantize_model(model: nn.Module, scheme: str, group_size: int = 32, *, head: str | None = "int8",
                   skip: tuple[str, ...] = ()) -> nn.Module:
    """Replace every nn.Linear (except names in `skip`) by its weight-only quantized version, in place.

    The LM head (`lm_head`) is quantized with `head` (int8 by default, as llama.cpp keeps its output
    matrix at 8 bits: the vocabulary projection is the most sensitive matrix), or with `scheme` when
    head is None. It is untied from the token embedding first, so the embedding keeps exact rows.
    """
    for value in (scheme, head or scheme):
        if value not in SCHEMES:
            raise LmlabError(f"unknown quantization '{value}' (choose from {', '.join(SCHEMES)})")
    if getattr(model, "lm_head", None) is not None and hasattr(model, "tok_emb") \
            and model.lm_head.weight is model.tok_emb.weight:
        model.lm_head.weight = nn.Parameter(model.tok_emb.weight.detach().clone(), requires_grad=False)
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear) and name not in skip]
    for name, lin in targets:
        w, b = lin.weight.data, lin.bias.data if lin.bias is not None else None
        kind = head if name == "lm_head" and head is not None else scheme
        new = Int8Linear(w, b) if kind == "int8" else Int4Linear(w, b, group_size=group_size)
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes of matrix weights one decoding step reads (every linear, LM head included; not the embedding)."""
    total = 0
    for m in model.modules():
        if isinstance(m, (nn.Linear, QuantLinear)):
            total += sum(t.numel() * t.element_size() for t in m.state_dict().values())  # no kernel copies
    return total
