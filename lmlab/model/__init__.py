"""The one Transformer (lmlab.model.transformer) and its KV cache (lmlab.model.kv_cache).

    transformer  Block, Stack, Transformer: the public model interface
    attention    Attention (self / cross, MHA / GQA / MQA)
    masks        every attention mask (and the sparse route of windowed layers)
    layers       norms and the feed-forward registry (dense MLP or mixture of experts, per layer)
    moe          the mixture-of-experts block, its losses and load report, HF expert names
    sparse_attention  sliding-window / local+global patterns and their linear-memory kernels
    positions    rotary, sinusoidal, relative position bias
    kv_cache     KVCache and the protocol the model reads it by
    rolling_cache  RollingCache: windowed layers keep only their window (make_cache(rolling=True))
    loss         cross-entropy fused with the output projection
"""
from lmlab.model.kv_cache import KVCache
from lmlab.model.transformer import Transformer

__all__ = ["KVCache", "Transformer"]
