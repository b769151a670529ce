"""The name map of one mixture-of-experts block (lmlab.model.moe.MoE) in HF's on-disk layout.

lmlab stacks the experts: w_in is E×2f×d (each expert's gate rows, then its up rows), w_out is E×d×f.
A 3-D lmlab tensor is matched as its first two dimensions flattened (reader.piece_shapes), so w_in is the
rows gate_0, up_0, gate_1, up_1, ... and w_out the rows down_0, down_1, ... The HF names come from
lmlab.model.moe.HF_MOE_NAMES (Mixtral: block_sparse_moe.experts.{e}.w1/w3/w2; Qwen2-MoE:
mlp.experts.{e}.gate_proj/up_proj/down_proj, plus mlp.shared_expert.* and mlp.shared_expert_gate).
"""
from __future__ import annotations

from lmlab.checkpoints.hf.base import Entry, one
from lmlab.config import ModelConfig
from lmlab.model.moe import HF_MOE_NAMES


def moe_entries(cfg: ModelConfig, o: str, h: str, family: str) -> list[Entry]:
    """Layer prefix o (lmlab, 'decoder.blocks.3.') and h (HF, 'model.layers.3.')."""
    n, E, f, d = HF_MOE_NAMES[family], cfg.moe_experts, cfg.moe_d_ff, cfg.d_model
    gate_up = tuple(h + n[part].format(e=e) for e in range(E) for part in ("gate", "up"))
    out = [one(o + "mlp.router.weight", h + n["router"]),
           Entry(o + "mlp.w_in", gate_up, (f,) * 2 * E),
           Entry(o + "mlp.w_out", tuple(h + n["down"].format(e=e) for e in range(E)), (d,) * E)]
    if cfg.moe_shared_d_ff:
        s = cfg.moe_shared_d_ff
        out += [Entry(o + "mlp.shared.w_in.weight", (h + n["shared_gate_proj"], h + n["shared_up"]), (s, s)),
                one(o + "mlp.shared.w_out.weight", h + n["shared_down"]),
                one(o + "mlp.shared_gate.weight", h + n["shared_gate"])]
    return out
