"""Mixture-of-experts feed-forward block (Mixtral, Qwen2-MoE style).

A bias-free linear router scores E experts per token; softmax over all E (once), then the top-k;
optionally the k weights are renormalised to sum to 1 (Mixtral: yes, Qwen2-MoE: no). Routing is
dropless: the token copies are sorted by expert, each expert runs once on its contiguous slice
(a loop over experts, never over tokens) and the weighted results are added back per token. An
optional shared expert sees every token, scaled by sigmoid(shared_gate(x)) (Qwen2-MoE).

forward returns an `MoEOutput`: the output and the auxiliary terms, always computed, over real
(non-padding) tokens only:
  balance_loss = E * sum_e f_e * P_e   f_e = (top-k assignments to e) / tokens, P_e = mean router prob
               (Switch/Mixtral; the same number as transformers' `load_balancing_loss_func`, so it is k
               when perfectly balanced and E * k at worst)
  z_loss       = mean over tokens of logsumexp(router logits)^2   (ST-MoE)
  loss         = aux_loss_coef * balance_loss + z_loss_coef * z_loss   (add this to the training loss)

Weight layout, the same as transformers 5.x holds in memory (gated: gate rows first, then up):
  router.weight      E x d
  w_in               E x 2*d_ff x d   (swiglu)   or   E x d_ff x d   (gelu, relu)
  w_out              E x d x d_ff
  shared.w_in.weight 2*s x d (or s x d), shared.w_out.weight d x s, shared_gate.weight 1 x d   (s > 0)
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from lmlab.errors import LmlabError

ACTIVATIONS = {"swiglu": F.silu, "gelu": F.gelu, "relu": F.relu}
GATED = {"swiglu"}


@dataclass
class MoEConfig:
    n_experts: int
    top_k: int
    d_model: int
    d_ff: int                       # hidden size of each routed expert
    renormalize: bool = True        # top-k weights rescaled to sum to 1 (Mixtral) or kept (Qwen2-MoE)
    shared_expert_d_ff: int = 0     # 0 = no shared expert
    activation: str = "swiglu"      # "swiglu" (gated) or "gelu" / "relu" (ungated)
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.0
    global_balance: bool = False    # f_e from the counts of every process (all-reduced while training)

    def __post_init__(self) -> None:
        for name in ("n_experts", "top_k", "d_model", "d_ff"):
            _check_int(name, getattr(self, name), low=1)
        _check_int("shared_expert_d_ff", self.shared_expert_d_ff, low=0)
        if self.top_k > self.n_experts:
            raise LmlabError(f"moe: top_k {self.top_k} is larger than n_experts {self.n_experts}")
        if self.activation not in ACTIVATIONS:
            raise LmlabError(f"moe: activation {self.activation!r} is not one of {', '.join(ACTIVATIONS)}")
        for name in ("aux_loss_coef", "z_loss_coef"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value < 0:
                raise LmlabError(f"moe: {name} must be a finite number >= 0, got {value!r}")

    @property
    def gated(self) -> bool:
        return self.activation in GATED


def _check_int(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise LmlabError(f"moe: {name} must be an integer >= {low}, got {value!r}")


@dataclass
class MoEOutput:
    y: torch.Tensor              # same shape as the input
    loss: torch.Tensor           # weighted auxiliary loss to add to the training loss (scalar)
    balance_loss: torch.Tensor   # E * sum_e f_e P_e, unweighted (scalar)
    z_loss: torch.Tensor         # mean logsumexp(logits)^2, unweighted (scalar)
    counts: torch.Tensor         # (E,) int64: top-k assignments of this process's real tokens
    router_logits: torch.Tensor  # (..., E) for every position, padding included


class RouterStats:
    """What a model's MoE layers reported while it was open (Transformer.moe_stats()): the weighted
    auxiliary loss to add to the training loss, and tokens per expert of each layer, summed over calls."""

    def __init__(self) -> None:
        self.loss: torch.Tensor | float = 0.0      # sum of every layer's MoEOutput.loss (with its graph)
        self.counts: dict[str, torch.Tensor] = {}  # layer name → (E,) assignments, summed over calls
        self.balance: list[torch.Tensor] = []      # each call's unweighted balance loss (detached)
        self.z: list[torch.Tensor] = []            # each call's unweighted z-loss (detached)

    def add(self, layer: str, out: MoEOutput) -> None:
        self.loss = self.loss + out.loss
        self.counts[layer] = self.counts.get(layer, 0) + out.counts.detach()
        self.balance.append(out.balance_loss.detach())
        self.z.append(out.z_loss.detach())

    def total_counts(self) -> torch.Tensor | None:
        """(E,) assignments summed over layers (None when no MoE layer ran)."""
        return sum(self.counts.values()) if self.counts else None

    def figures(self) -> dict[str, float]:
        """Mean unweighted balance and z losses over the calls (empty when no MoE layer ran)."""
        if not self.balance:
            return {}
        return {"moe_balance_loss": torch.stack(self.balance).float().mean().item(),
                "moe_z_loss": torch.stack(self.z).float().mean().item()}


def _mlp(x: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor, activation: str) -> torch.Tensor:
    """One expert: x @ w_in.T, activation (gated: act(gate) * up), then @ w_out.T."""
    h = x @ w_in.T
    if activation in GATED:
        gate, up = h.chunk(2, dim=-1)
        h = ACTIVATIONS[activation](gate) * up
    else:
        h = ACTIVATIONS[activation](h)
    return h @ w_out.T


class SharedExpert(nn.Module):
    """The always-on expert of Qwen2-MoE / DeepSeek-MoE (gate and up fused like the routed ones)."""

    def __init__(self, d_model: int, d_ff: int, activation: str):
        super().__init__()
        self.activation = activation
        self.w_in = nn.Linear(d_model, (2 if activation in GATED else 1) * d_ff, bias=False)
        self.w_out = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _mlp(x, self.w_in.weight, self.w_out.weight, self.activation)


class MoE(nn.Module):
    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        E, d, f = cfg.n_experts, cfg.d_model, cfg.d_ff
        self.router = nn.Linear(d, E, bias=False)
        self.w_in = nn.Parameter(torch.empty(E, (2 if cfg.gated else 1) * f, d))
        self.w_out = nn.Parameter(torch.empty(E, d, f))
        self.shared = SharedExpert(d, cfg.shared_expert_d_ff, cfg.activation) if cfg.shared_expert_d_ff else None
        self.shared_gate = nn.Linear(d, 1, bias=False) if cfg.shared_expert_d_ff else None
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        for p in self.parameters():
            nn.init.normal_(p, std=std)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def num_active_params(self) -> int:
        """Parameters one token uses: router, k routed experts, the shared expert (for MFU)."""
        per_expert = (self.w_in.numel() + self.w_out.numel()) // self.cfg.n_experts
        return self.num_params() - (self.cfg.n_experts - self.cfg.top_k) * per_expert

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> MoEOutput:
        """x: (..., d_model); valid: bool mask of x.shape[:-1] (True = real token) or None (all real).
        Padding positions are not routed: their output is the shared expert's alone (or zero)."""
        cfg = self.cfg
        if x.shape[-1] != cfg.d_model:
            raise LmlabError(f"moe: input's last dimension is {x.shape[-1]}, expected d_model {cfg.d_model}")
        h = x.reshape(-1, cfg.d_model)
        logits = self.router(h)
        rows = _real_rows(valid, x.shape[:-1], x.device)
        real_h, real_logits = (h, logits) if rows is None else (h[rows], logits[rows])
        probs = real_logits.softmax(-1, dtype=torch.promote_types(logits.dtype, torch.float32))
        weights, experts = probs.topk(cfg.top_k, dim=-1)
        if cfg.renormalize:
            weights = weights / weights.sum(-1, keepdim=True)
        routed, counts = self._routed(real_h, experts, weights.to(h.dtype))
        y = routed if rows is None else h.new_zeros(h.shape).index_copy(0, rows, routed)
        if self.shared is not None:
            y = y + torch.sigmoid(self.shared_gate(h)) * self.shared(h)
        balance = self._balance_loss(probs, counts)
        tokens = max(real_logits.shape[0], 1)
        z = torch.logsumexp(real_logits.to(probs.dtype), dim=-1).square().sum() / tokens
        loss = cfg.aux_loss_coef * balance + cfg.z_loss_coef * z
        return MoEOutput(y.view(x.shape), loss, balance, z, counts, logits.view(*x.shape[:-1], cfg.n_experts))

    def _routed(self, h: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor):
        """Dropless dispatch: token copies sorted by expert, one batched call per expert, weighted sum."""
        flat = experts.reshape(-1)
        counts = torch.bincount(flat, minlength=self.cfg.n_experts)
        order = flat.argsort(stable=True)
        token = order // self.cfg.top_k
        slices = h[token].split(counts.tolist())
        # every expert runs, even on an empty slice, so each weight gets a gradient (DDP needs that)
        out = torch.cat([_mlp(s, self.w_in[e], self.w_out[e], self.cfg.activation) for e, s in enumerate(slices)])
        out = out * weights.reshape(-1)[order].unsqueeze(-1)
        return h.new_zeros(h.shape).index_add(0, token, out), counts

    def _balance_loss(self, probs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        tokens = probs.new_tensor([probs.shape[0]])
        load = torch.cat([counts.to(probs.dtype), tokens])
        if self.cfg.global_balance and self.training and dist.is_available() and dist.is_initialized():
            dist.all_reduce(load)   # counts and token totals of the global batch; P_e stays local
        f = load[:-1] / load[-1].clamp_min(1)
        P = probs.sum(0) / tokens.clamp_min(1)
        return self.cfg.n_experts * (f * P).sum()


def _real_rows(valid: torch.Tensor | None, shape: torch.Size, device) -> torch.Tensor | None:
    """Flat indices of the real tokens, or None when every position is real."""
    if valid is None:
        return None
    if valid.dtype != torch.bool or tuple(valid.shape) != tuple(shape):
        raise LmlabError(f"moe: valid mask must be a bool tensor of shape {tuple(shape)}, "
                         f"got {valid.dtype} {tuple(valid.shape)}")
    return valid.to(device).reshape(-1).nonzero().squeeze(-1)


@dataclass
class BalanceReport:
    fractions: list[float]   # share of the top-k assignments each expert received
    total: int               # assignments counted (tokens x top_k)
    max_over_mean: float     # 1.0 = perfectly even
    cv: float                # coefficient of variation of the load (std / mean)
    idle: int                # experts that received no token

    @property
    def line(self) -> str:
        if self.total == 0:
            return f"moe load: {len(self.fractions)} experts, no tokens routed"
        top = max(range(len(self.fractions)), key=self.fractions.__getitem__)
        return (f"moe load: {len(self.fractions)} experts, max/mean {self.max_over_mean:.2f}, "
                f"cv {self.cv:.2f}, idle {self.idle}, busiest #{top} {self.fractions[top]:.1%}")


def load_balance_report(counts) -> BalanceReport:
    """Per-expert shares and a one-line summary from tokens-per-expert counts (a 1-D tensor or list,
    e.g. `MoEOutput.counts`, or their sum over layers and steps)."""
    c = torch.as_tensor(counts).detach().to("cpu", torch.float64)
    if c.dim() != 1 or c.numel() == 0 or bool((c < 0).any()) or not bool(torch.isfinite(c).all()):
        raise LmlabError(f"moe: counts must be a non-empty 1-D list of non-negative numbers, got {counts!r}")
    total, mean = float(c.sum()), c.mean()
    if total == 0:
        return BalanceReport([0.0] * c.numel(), 0, 0.0, 0.0, int(c.numel()))
    return BalanceReport((c / total).tolist(), round(total), float(c.max() / mean),
                         float(c.std(unbiased=False) / mean), int((c == 0).sum()))


# --------------------------------------------------------------------------- HF checkpoint names
# One MoE block's tensors as HF checkpoints store them on disk, relative to "model.layers.{i}."
# (transformers 5.x fuses them in memory into experts.gate_up_proj = w_in and experts.down_proj = w_out).
HF_MOE_NAMES = {
    "mixtral": {"router": "block_sparse_moe.gate.weight",
                "gate": "block_sparse_moe.experts.{e}.w1.weight",
                "up": "block_sparse_moe.experts.{e}.w3.weight",
                "down": "block_sparse_moe.experts.{e}.w2.weight"},
    "qwen2_moe": {"router": "mlp.gate.weight",
                  "gate": "mlp.experts.{e}.gate_proj.weight",
                  "up": "mlp.experts.{e}.up_proj.weight",
                  "down": "mlp.experts.{e}.down_proj.weight",
                  "shared_gate_proj": "mlp.shared_expert.gate_proj.weight",
                  "shared_up": "mlp.shared_expert.up_proj.weight",
                  "shared_down": "mlp.shared_expert.down_proj.weight",
                  "shared_gate": "mlp.shared_expert_gate.weight"},
}


def _hf_names(family: str) -> dict[str, str]:
    if family not in HF_MOE_NAMES:
        raise LmlabError(f"moe: no HF name map for family {family!r} (known: {', '.join(HF_MOE_NAMES)})")
    return HF_MOE_NAMES[family]


def moe_state_from_hf(family: str, tensors: dict[str, torch.Tensor], n_experts: int) -> dict[str, torch.Tensor]:
    """One layer's HF tensors (names as in HF_MOE_NAMES) -> an `MoE` state dict (gated experts)."""
    names = _hf_names(family)

    def get(key: str) -> torch.Tensor:
        if key not in tensors:
            raise LmlabError(f"moe: checkpoint tensor {key!r} is missing")
        return tensors[key]

    state = {"router.weight": get(names["router"]),
             "w_in": torch.stack([torch.cat([get(names["gate"].format(e=e)), get(names["up"].format(e=e))])
                                  for e in range(n_experts)]),
             "w_out": torch.stack([get(names["down"].format(e=e)) for e in range(n_experts)])}
    if names.get("shared_gate") in tensors:
        state["shared.w_in.weight"] = torch.cat([get(names["shared_gate_proj"]), get(names["shared_up"])])
        state["shared.w_out.weight"] = get(names["shared_down"])
        state["shared_gate.weight"] = get(names["shared_gate"])
    return state


def moe_state_to_hf(family: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of `moe_state_from_hf`: an `MoE` state dict (gated experts) -> HF on-disk names."""
    names = _hf_names(family)
    out = {names["router"]: state["router.weight"]}
    for e, (w_in, w_out) in enumerate(zip(state["w_in"], state["w_out"])):
        out[names["gate"].format(e=e)], out[names["up"].format(e=e)] = (t.contiguous() for t in w_in.chunk(2))
        out[names["down"].format(e=e)] = w_out.contiguous()
    if "shared_gate.weight" in state:
        if "shared_gate" not in names:
            raise LmlabError(f"moe: family {family!r} has no shared expert, but the state has one")
        gate, up = state["shared.w_in.weight"].chunk(2)
        out[names["shared_gate_proj"]], out[names["shared_up"]] = gate.contiguous(), up.contiguous()
        out[names["shared_down"]] = state["shared.w_out.weight"]
        out[names["shared_gate"]] = state["shared_gate.weight"]
    return out
