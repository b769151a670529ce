"""The one Transformer (lmlab.model.transformer) and its KV cache (lmlab.model.kv_cache).

    transformer  Block, Stack, Transformer: the public model interface
    attention    Attention (self / cross, MHA / GQA / MQA)
    masks        every attention mask
    layers       norms and the feed-forward registry
    positions    rotary, sinusoidal, relative position bias
    kv_cache     KVCache and the protocol the model reads it by
    loss         cross-entropy fused with the output projection
"""
from lmlab.model.kv_cache import KVCache
from lmlab.model.transformer import Transformer

__all__ = ["KVCache", "Transformer"]
