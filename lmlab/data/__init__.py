"""Pretraining data: corpora → token shards (memory-mapped) with document separators and a validation split."""
from lmlab.data.dataset import TokenData, TokenStream
from lmlab.data.prepare import PrepareConfig, prepare

__all__ = ["PrepareConfig", "TokenData", "TokenStream", "prepare"]
