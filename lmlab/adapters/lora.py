"""LoRA: low-rank adapters on linear layers, slice-aware for fused projections.

A LoRALinear wraps an existing nn.Linear (kept as `.base`, its weight not copied) and adds, for each
adapted slice s of the output rows [a, b):

    y[..., a:b] = base(x)[..., a:b] + scaling · B_s A_s dropout(x)   (computed as one product, see update)

with A_s r×in (Kaiming-uniform, a=√5, as nn.Linear), B_s (b−a)×r (zeros, so a new adapter changes
nothing), scaling = alpha/r, or alpha/√r with rsLoRA: the math of HF PEFT's lora.Linear. A fused
projection (`qkv` holding q, k, v rows; `gate_up` holding gate, up rows) carries one (A, B) pair per
targeted slice, so its output is exactly the concatenation of PEFT's separate q_proj/k_proj/v_proj
(gate_proj/up_proj) outputs and each pair maps one-to-one onto a PEFT module. An unfused linear has
a single slice named `all`.

Targets (`inject_lora`) name *units*: `module:slice` for a slice of a fused linear
(`decoder.blocks.0.attn.qkv:q`), `module` for a plain one (`decoder.blocks.0.attn.out`). A pattern
(a glob, or a regular expression after `re:`, always matched against the whole name) is read as:
  - without '.' or ':' (after the `re:` prefix, if any) — a short name: a slice name of a fused linear
    (q, k, v, gate, up) or the last part of a plain linear's name (out, proj, fc, the q of
    cross-attention, lm_head); `*` means every linear;
  - otherwise — a full name, tried against unit names and module names; a module name selects every
    slice of that module (`*.attn.qkv` = its q, k and v).
A pattern that selects nothing is an error that lists the units that exist.
"""
from __future__ import annotations

import math
from collections import Counter
from typing import Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmlab.adapters.patterns import check_patterns, listing, matches
from lmlab.errors import LmlabError
from lmlab.utils.suggest import did_you_mean

Slices = dict[str, tuple[int, int]]
SlicesOf = Callable[[str, nn.Linear], "Slices | None"]
WHOLE = "all"  # the slice name of an unfused linear


# --------------------------------------------------------------------------- one layer
class LoRALinear(nn.Module):
    """base(x) plus a low-rank update on each targeted slice of the output rows."""

    def __init__(self, base: nn.Linear, *, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
                 slices: Slices | None = None, targets: Iterable[str] | None = None,
                 dtype: torch.dtype | None = None, tied: bool = False, name: str = "linear"):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise LmlabError(f"{name}: LoRA needs an nn.Linear, got {type(base).__name__}")
        _check_hyper(name, r, alpha, dropout)
        self.base, self.name, self.tied = base, name, tied
        self.r, self.alpha, self.dropout, self.rslora = r, float(alpha), float(dropout), bool(rslora)
        self.slices = check_slices(name, slices, base.out_features)
        targets = list(self.slices) if targets is None else list(targets)
        for t in targets:
            if t not in self.slices:
                raise LmlabError(f"{name}: no slice '{t}' (slices: {', '.join(self.slices)})")
        if dtype is None:  # half-precision bases keep float32 adapters, as PEFT's autocast_adapter_dtype
            dtype = torch.float32 if base.weight.dtype in (torch.float16, torch.bfloat16) else base.weight.dtype
        device = base.weight.device
        self.lora_A, self.lora_B = nn.ParameterDict(), nn.ParameterDict()
        for s in (s for s in self.slices if s in targets):
            a, b = self.slices[s]
            self.lora_A[s] = nn.Parameter(torch.empty(r, base.in_features, device=device, dtype=dtype))
            self.lora_B[s] = nn.Parameter(torch.zeros(b - a, r, device=device, dtype=dtype))
        self.reset_lora()
        self.merged = False

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)

    @property
    def targets(self) -> list[str]:
        return list(self.lora_A)

    def lora_parameters(self) -> list[nn.Parameter]:
        return [*self.lora_A.values(), *self.lora_B.values()]

    def reset_lora(self) -> None:
        """A Kaiming-uniform (a=√5, nn.Linear's default), B zeros: the update starts at zero."""
        for s in self.lora_A:
            nn.init.kaiming_uniform_(self.lora_A[s], a=math.sqrt(5))
            nn.init.zeros_(self.lora_B[s])

    def update(self, x: torch.Tensor) -> torch.Tensor:
        """scaling · B A dropout(x) for every output row, in the adapter dtype, as one low-rank product:
        h = x Aᵀ with the targeted slices' A stacked (r rows each), then h times a block matrix that holds
        B_s in slice s's rows and r columns and zeros elsewhere (rows of untargeted slices are zero).
        Each slice draws its own dropout mask, as each PEFT module does. One product over the whole output
        instead of per-slice pieces written into it: writes into slices of y cost autograd a full copy and
        a zero-filled gradient per slice."""
        x = x.to(next(iter(self.lora_A.values())).dtype)
        if self.dropout and self.training:
            h = torch.cat([F.linear(F.dropout(x, self.dropout, training=True), a) for a in self.lora_A.values()], -1)
        else:
            h = F.linear(x, self.lora_A_stacked())
        return F.linear(h, self.lora_B_block()) * self.scaling

    def lora_A_stacked(self) -> torch.Tensor:
        a = list(self.lora_A.values())
        return a[0] if len(a) == 1 else torch.cat(a, 0)

    def lora_B_block(self) -> torch.Tensor:
        """[out_features, r · targeted slices]: B_s in slice s's rows and its own r columns, zeros elsewhere."""
        targets = self.targets
        if len(targets) == 1 and len(self.slices) == 1:
            return self.lora_B[targets[0]]
        b0 = self.lora_B[targets[0]]
        width = self.r * len(targets)
        rows = []
        for s, (a, b) in self.slices.items():
            if s not in self.lora_B:
                rows.append(b0.new_zeros(b - a, width))
                continue
            j = targets.index(s) * self.r
            rows.append(F.pad(self.lora_B[s], (j, width - j - self.r)))
        return torch.cat(rows, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged:  # training A and B through merged weights would silently train nothing
            if self.training and torch.is_grad_enabled() and any(p.requires_grad for p in self.lora_parameters()):
                raise LmlabError(f"{self.name}: LoRA is merged into the weights; unmerge it before training")
            return y
        if not self.lora_A:
            return y
        return y + self.update(x).to(y.dtype)

    def delta(self, s: str) -> torch.Tensor:
        """The weight rows slice s adds when merged: scaling · B_s A_s, in float32."""
        return (self.lora_B[s].float() @ self.lora_A[s].float()) * self.scaling

    def check_merge(self, merged: bool) -> None:
        """An LmlabError unless the adapter can go to the merged (True) or unmerged (False) state."""
        if merged and self.merged:
            raise LmlabError(f"{self.name}: LoRA is already merged")
        if not isinstance(self.base, nn.Linear):
            raise LmlabError(f"{self.name}: the base layer is now {type(self.base).__name__} (quantized?), "
                             "not an nn.Linear; its weight cannot take a merge")
        if merged and self.tied:
            raise LmlabError(f"{self.name}: its weight is shared with another module (tied embeddings); "
                             "merging would change both; keep the adapter unmerged or untie the weights")
        if not merged and not self.merged:
            raise LmlabError(f"{self.name}: LoRA is not merged")

    @torch.no_grad()
    def merge(self) -> None:
        """Add every slice's update into the base weight rows, in place."""
        self.check_merge(True)
        self._add_deltas(+1)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take every slice's update back out of the base weight rows."""
        self.check_merge(False)
        self._add_deltas(-1)
        self.merged = False

    def _add_deltas(self, sign: int) -> None:
        w = self.base.weight
        for s in self.lora_A:
            a, b = self.slices[s]
            w[a:b] = (w[a:b].float() + sign * self.delta(s)).to(w.dtype)

    def extra_repr(self) -> str:
        kind = "rslora" if self.rslora else "lora"
        return (f"{kind} r={self.r}, alpha={self.alpha:g}, dropout={self.dropout:g}, "
                f"targets={','.join(self.targets)}{', merged' if self.merged else ''}")


def _check_hyper(name: str, r: int, alpha: float, dropout: float) -> None:
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise LmlabError(f"{name}: LoRA rank r must be a positive integer, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0 or math.isinf(alpha):
        raise LmlabError(f"{name}: LoRA alpha must be a positive number, got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise LmlabError(f"{name}: LoRA dropout must be in [0, 1), got {dropout!r}")


def check_slices(name: str, slices: Slices | None, out_features: int) -> Slices:
    """Slices ordered by start; they must tile the rows 0..out_features exactly (no gap, no overlap)."""
    if not slices:
        return {WHOLE: (0, out_features)}
    ordered = dict(sorted(((str(s), (int(a), int(b))) for s, (a, b) in slices.items()), key=lambda kv: kv[1]))
    at = 0
    for s, (a, b) in ordered.items():
        if a != at or b <= a:
            raise LmlabError(f"{name}: slice '{s}' covers rows {a}..{b}, expected a non-empty range starting at "
                             f"{at} (slices must tile the {out_features} output rows)")
        at = b
    if at != out_features:
        raise LmlabError(f"{name}: slices cover rows 0..{at} but the layer has {out_features} outputs")
    return ordered


# --------------------------------------------------------------------------- fused projections
def fused_slices(cfg) -> SlicesOf:
    """Slices of the Transformer's fused linears from its config (n_head, n_kv_head, head_dim, d_ff):
    `qkv` → q, k, v rows; cross-attention `kv` → k, v; `gate_up` → gate, up. Other linears: None."""
    q, kv, ff = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim, cfg.d_ff
    table = {"qkv": {"q": (0, q), "k": (q, q + kv), "v": (q + kv, q + 2 * kv)},
             "kv": {"k": (0, kv), "v": (kv, 2 * kv)},
             "gate_up": {"gate": (0, ff), "up": (ff, 2 * ff)}}

    def slices_of(name: str, linear: nn.Linear) -> Slices | None:
        return table.get(name.rpartition(".")[2])

    return slices_of


def _no_slices(name: str, linear: nn.Linear) -> None:
    return None


# --------------------------------------------------------------------------- whole models
def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """Every LoRALinear of the model by module name, in model order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def _units(model: nn.Module, slices_of: SlicesOf) -> list[tuple[str, str]]:
    """(module name, slice name) for every slice of every linear, in model order."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and name:
            out += [(name, s) for s in check_slices(name, slices_of(name, m), m.out_features)]
    return out


def unit_name(module: str, s: str) -> str:
    return module if s == WHOLE else f"{module}:{s}"


def _short_name(module: str, s: str) -> str:
    return module.rpartition(".")[2] if s == WHOLE else s


def _selected(pattern: str, module: str, s: str) -> bool:
    body = pattern[3:] if pattern.startswith("re:") else pattern
    if "." not in body and ":" not in body:
        return matches(pattern, _short_name(module, s))
    return matches(pattern, unit_name(module, s)) or matches(pattern, module)


def select_units(model: nn.Module, targets: str | Iterable[str], slices_of: SlicesOf) -> dict[str, list[str]]:
    """{module name: [slice names]} selected by the target patterns; a pattern selecting nothing is an
    LmlabError listing the units and short names that exist."""
    targets = check_patterns(targets, "lora targets")
    units = _units(model, slices_of)
    chosen: dict[str, list[str]] = {}
    for pattern in targets:
        hits = [(m, s) for m, s in units if _selected(pattern, m, s)]
        if not hits:
            raise LmlabError(_no_match(pattern, units))
        for m, s in hits:
            chosen.setdefault(m, [])
            if s not in chosen[m]:
                chosen[m].append(s)
    order = {m: i for i, (m, _) in enumerate(units)}
    return dict(sorted(chosen.items(), key=lambda kv: order[kv[0]]))


def _no_match(pattern: str, units: list[tuple[str, str]]) -> str:
    if not units:
        return f"lora target '{pattern}': the model has no linear layer"
    shorts = list(dict.fromkeys(_short_name(m, s) for m, s in units))
    return (f"lora target '{pattern}' matches no linear layer{did_you_mean(pattern, shorts)}; "
            f"short names: {', '.join(shorts)}; layers: {listing(unit_name(m, s) for m, s in units)}")


def inject_lora(model: nn.Module, targets: str | Iterable[str], *, r: int = 8, alpha: float = 16.0,
                dropout: float = 0.0, rslora: bool = False, slices_of: SlicesOf | None = None,
                freeze_base: bool = True, dtype: torch.dtype | None = None) -> list[str]:
    """Wrap the targeted linears in LoRALinear, in place; returns the adapted unit names.

    slices_of(module name, linear) gives the output slices of a fused linear (None: unfused); by
    default `fused_slices(model.cfg)` when the model has a config, else no slices. freeze_base: every
    parameter but the new A and B stops requiring gradients (False leaves them as they are).
    """
    _check_hyper("lora", r, alpha, dropout)
    if lora_modules(model):
        raise LmlabError(f"the model already has LoRA adapters ({listing(lora_modules(model))}); unload them first")
    if slices_of is None:
        slices_of = fused_slices(model.cfg) if hasattr(model, "cfg") else _no_slices
    chosen = select_units(model, targets, slices_of)
    uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    if freeze_base:
        for p in model.parameters():
            p.requires_grad_(False)
    for name, slices in chosen.items():
        base = model.get_submodule(name)
        layer = LoRALinear(base, r=r, alpha=alpha, dropout=dropout, rslora=rslora, slices=slices_of(name, base),
                           targets=slices, dtype=dtype, tied=uses[id(base.weight)] > 1, name=name)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, layer)
    layers = lora_modules(model)
    return [unit_name(m, s) for m in chosen for s in layers[m].targets]


def lora_settings(model: nn.Module) -> dict:
    """{'r', 'alpha', 'dropout', 'rslora', 'units'} of the model's adapters (what an adapter config
    records); an LmlabError when its layers disagree on a setting."""
    layers = _require_lora(model)
    out = {}
    for key in ("r", "alpha", "dropout", "rslora"):
        values = {getattr(layer, key) for layer in layers.values()}
        if len(values) > 1:
            raise LmlabError(f"the model's LoRA layers differ in {key} ({', '.join(map(str, sorted(values)))})")
        out[key] = values.pop()
    out["units"] = [unit_name(name, s) for name, layer in layers.items() for s in layer.targets]
    return out


def merge_lora(model: nn.Module) -> list[str]:
    """Merge every adapter into its base weight (see LoRALinear.merge); returns the module names.
    Every layer is checked first, so a refusal leaves all of them as they were."""
    layers = _require_lora(model)
    for layer in layers.values():
        layer.check_merge(True)
    for layer in layers.values():
        layer.merge()
    return list(layers)


def unmerge_lora(model: nn.Module) -> list[str]:
    """Take every merged adapter back out of its base weight; returns the module names."""
    layers = _require_lora(model)
    for layer in layers.values():
        layer.check_merge(False)
    for layer in layers.values():
        layer.unmerge()
    return list(layers)


def unload_lora(model: nn.Module, merge: bool = True) -> list[str]:
    """Put the plain linears back, with the updates merged in (merge=True) or dropped."""
    layers = _require_lora(model)
    for layer in layers.values():
        if merge and not layer.merged:
            layer.check_merge(True)
    for name, layer in layers.items():
        if merge and not layer.merged:
            layer.merge()
        elif not merge and layer.merged:
            layer.unmerge()
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, layer.base)
    return list(layers)


def _require_lora(model: nn.Module) -> dict[str, LoRALinear]:
    layers = lora_modules(model)
    if not layers:
        raise LmlabError("the model has no LoRA adapters (inject_lora first)")
    return layers


# --------------------------------------------------------------------------- adapter weights
def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors only: '<module>.lora_A.<slice>' (r×in) and '<module>.lora_B.<slice>' (rows×r),
    the same keys as in model.state_dict()."""
    out = {}
    for name, layer in _require_lora(model).items():
        for s in layer.targets:
            out[f"{name}.lora_A.{s}"] = layer.lora_A[s].detach()
            out[f"{name}.lora_B.{s}"] = layer.lora_B[s].detach()
    return out


def load_lora_state_dict(model: nn.Module, sd: dict[str, torch.Tensor], source: str = "adapter") -> None:
    """Copy adapter tensors into the model's LoRA layers; every tensor must be present, expected and of
    the right shape (an LmlabError names the ones that are not). Refused while an adapter is merged."""
    layers = _require_lora(model)
    merged = [n for n, layer in layers.items() if layer.merged]
    if merged:
        raise LmlabError(f"{source}: cannot load while LoRA is merged ({listing(merged)}); unmerge first")
    own = {}
    for name, layer in layers.items():
        for s in layer.targets:
            own[f"{name}.lora_A.{s}"], own[f"{name}.lora_B.{s}"] = layer.lora_A[s], layer.lora_B[s]
    missing = [k for k in own if k not in sd]
    extra = [k for k in sd if k not in own]
    if missing:
        raise LmlabError(f"{source}: missing {len(missing)} LoRA tensor(s): {_some(missing)}")
    if extra:
        raise LmlabError(f"{source}: {len(extra)} unexpected tensor(s) for this model's LoRA layers: {_some(extra)}")
    for k, p in own.items():
        t = sd[k]
        if not isinstance(t, torch.Tensor):
            raise LmlabError(f"{source}: '{k}' is a {type(t).__name__}, not a tensor")
        if tuple(t.shape) != tuple(p.shape):
            raise LmlabError(f"{source}: tensor '{k}' has shape {tuple(t.shape)}, the model expects {tuple(p.shape)}")
    with torch.no_grad():
        for k, p in own.items():
            p.copy_(sd[k])


def _some(names: list[str], limit: int = 6) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more
