"""lmlab: one readable, fast PyTorch Transformer and the jobs a practitioner runs on it."""
from lmlab.config import ModelConfig, PRESETS, preset
from lmlab.errors import LmlabError

__version__ = "0.1.0"
__all__ = ["ModelConfig", "PRESETS", "preset", "LmlabError", "__version__"]
