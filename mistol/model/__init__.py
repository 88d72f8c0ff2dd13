"""The model: its shape (`ModelConfig`), its KV cache (`KVCache`), the decoder (`Transformer`),
and the plan of which code runs its steps (`backend`).

`Transformer` is imported on first use, so that mistol.quant's layers can read the plan's
rules (model/backend.py) without importing the decoder that is built from those layers.
"""

from .config import ModelConfig
from .kv_cache import KVCache

__all__ = ["ModelConfig", "KVCache", "Transformer"]


def __getattr__(name: str):
    if name == "Transformer":
        from .transformer import Transformer

        return Transformer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
