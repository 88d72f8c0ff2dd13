"""A token embedding kept in the float dtype its checkpoint stores, rows converted as they are
looked up.

A model whose linear layers are quantized computes in float32. Its embedding converted to
float32 at load would take twice the checkpoint's bytes for it (Mistral 7B: 0.5 GB, Qwen2.5-
0.5B: 0.54 GB), when a prompt reads a few hundred of its rows. Kept as the checkpoint's bf16
or f16 values (a view of the mapped file), only the rows looked up are ever read, and each
converts to float32 exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FloatRowsEmbedding(nn.Module):
    """`weight` [vocab, hidden] (bf16 or f16, a view of a mapped checkpoint file) looked up
    as `dtype`. A tied head is an int8 copy, made by `quant.quantize_tied_head`."""

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype):
        super().__init__()
        self.register_buffer("weight", weight)
        self.num_embeddings, self.embedding_dim = weight.shape
        self.dtype = dtype

    @property
    def device(self) -> torch.device:
        return self.weight.device

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.embedding(tokens.to(self.weight.device), self.weight).to(self.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, stored={self.weight.dtype}, dtype={self.dtype}"
