"""Embeddings from the served model: POST /v1/embeddings (and /embeddings), OpenAI's shape.

A chat model is not an embedding model: what it gives, as llama.cpp's server does for one,
is the final norm's output (the hidden state the head reads) at each token of the input,
pooled into one vector and normalized. `pooling` (an extension, as llama.cpp's --pooling):
"mean" over the tokens (the default), "last" (the last token's, which has seen the whole
input), or "cls" (the first token's: the BOS, the same for every input, kept for llama.cpp's
names). `embd_normalize` is llama.cpp's: 2 (the default) divides by the Euclidean norm, -1
leaves the vector as it is, 0 scales the largest component to 32760 (an int16 range), p > 0
divides by the p-norm.

Each input runs on the scheduler's engine thread (`Scheduler.call`), one input per turn of
its loop, so it never races decoding and running requests keep going between inputs.
"""

from __future__ import annotations

import asyncio
import base64
from dataclasses import dataclass

import torch
from fastapi import FastAPI, Request
from starlette.concurrency import run_in_threadpool

from ..errors import MistolError
from .protocol import APIError

POOLINGS = ("mean", "last", "cls")
MAX_INPUTS = 2048  # as OpenAI's API


@dataclass
class EmbeddingRequest:
    model: str | None
    inputs: list[list[int]]  # token ids of each input, BOS first where the tokenizer adds one
    pooling: str = "mean"
    normalize: int = 2
    base64: bool = False


def pool(hidden: torch.Tensor, pooling: str) -> torch.Tensor:
    """One vector from the hidden states of an input's tokens [n, hidden]."""
    if pooling == "mean":
        return hidden.mean(dim=0)
    if pooling == "last":
        return hidden[-1]
    return hidden[0]  # cls


def normalize(vector: torch.Tensor, norm: int) -> torch.Tensor:
    """llama.cpp's `common_embd_normalize`, in double precision as it sums."""
    v = vector.double()
    if norm < 0:
        return vector.float()
    if norm == 0:
        scale = v.abs().max() / 32760.0
    elif norm == 2:
        scale = v.pow(2).sum().sqrt()
    else:
        scale = v.abs().pow(norm).sum().pow(1.0 / norm)
    return (v / scale if scale > 0 else torch.zeros_like(v)).float()


class Embedder:
    """Token ids in, pooled and normalized vectors out, on the engine thread."""

    def __init__(self, server):
        self.server = server
        self.inputs = 0  # counted for /metrics
        self.tokens = 0

    def token_ids(self, value, where: str) -> list[int]:
        """One input: text (encoded as the tokenizer encodes a prompt) or a list of token ids."""
        server = self.server
        if isinstance(value, str):
            tok = server.tokenizer
            ids = tok.encode(value, add_bos=getattr(tok, "add_bos", True))
        elif isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
            bad = next((t for t in value if not 0 <= t < server.vocab_size), None)
            if bad is not None:
                raise APIError(400, f"{where}: token id {bad} is outside the vocabulary of {server.vocab_size}",
                               "input")
            ids = list(value)
        else:
            raise APIError(400, f"{where} must be a string or a list of token ids", "input")
        if not ids:
            raise APIError(400, f"{where} is empty", "input")
        context = server.scheduler.max_context
        if len(ids) > context:
            raise APIError(400, f"{where} ({len(ids)} tokens) is too large: the context holds {context} tokens",
                           "input", "context_length_exceeded")
        return ids

    def parse_inputs(self, value) -> list[list[int]]:
        """OpenAI's `input`: a string, a list of token ids, or a list of either."""
        if isinstance(value, str) or (isinstance(value, list) and value
                                      and all(isinstance(t, int) and not isinstance(t, bool) for t in value)):
            return [self.token_ids(value, "input")]
        if not isinstance(value, list) or not value:
            raise APIError(400, "input is required: a string, a list of strings, or token id lists", "input")
        if len(value) > MAX_INPUTS:
            raise APIError(400, f"input: at most {MAX_INPUTS} inputs per request (got {len(value)})", "input")
        return [self.token_ids(v, f"input[{i}]") for i, v in enumerate(value)]

    async def vectors(self, inputs: list[list[int]], pooling: str, norm: int) -> list[torch.Tensor]:
        engine, scheduler = self.server.engine, self.server.scheduler

        def run(ids: list[int]) -> torch.Tensor:
            return normalize(pool(engine.hidden_states(ids), pooling).cpu(), norm)

        out = []
        for ids in inputs:
            try:
                out.append(await asyncio.wrap_future(scheduler.call(run, ids)))
            except (MistolError, RuntimeError) as e:
                raise APIError(503 if "shutting down" in str(e) else 400, f"embeddings: {e}") from None
            self.inputs += 1
            self.tokens += len(ids)
        return out


def parse_request(body, embedder: Embedder) -> EmbeddingRequest:
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    model = body.get("model") or None
    if model is not None and not isinstance(model, str):
        raise APIError(400, "model must be a string (see GET /v1/models)", "model")
    pooling = body.get("pooling", "mean")
    if pooling == "none":
        raise APIError(400, "pooling 'none' (a vector per token) is not OpenAI-compatible; choose mean, last or cls",
                       "pooling")
    if pooling not in POOLINGS:
        raise APIError(400, f"pooling must be one of {', '.join(POOLINGS)} (got {pooling!r})", "pooling")
    norm = body.get("embd_normalize", 2)
    if not isinstance(norm, int) or isinstance(norm, bool) or not -1 <= norm <= 100:
        raise APIError(400, f"embd_normalize must be an integer in [-1, 100] (got {norm!r})", "embd_normalize")
    fmt = body.get("encoding_format", "float")
    if fmt not in ("float", "base64"):
        raise APIError(400, f"encoding_format must be float or base64 (got {fmt!r})", "encoding_format")
    size = embedder.server.engine.config.hidden_size
    dims = body.get("dimensions")
    if dims is not None and dims != size:
        raise APIError(400, f"dimensions: this model's embeddings have {size} dimensions, and are not shortened "
                       f"(got {dims!r})", "dimensions")
    return EmbeddingRequest(model, embedder.parse_inputs(body.get("input")), pooling, norm, fmt == "base64")


def _encoded(vector: torch.Tensor, as_base64: bool):
    if as_base64:  # little-endian float32, as OpenAI sends it
        return base64.b64encode(vector.to(torch.float32).numpy().astype("<f4").tobytes()).decode()
    return vector.tolist()


def add_embedding_routes(app: FastAPI, server, auth) -> Embedder:
    embedder = Embedder(server)

    async def embeddings(request: Request):
        # tokenizing a large body takes a while: not on the event loop
        spec = await run_in_threadpool(parse_request, await server.read_json(request), embedder)
        server.check_requested_model(spec.model)
        vectors = await embedder.vectors(spec.inputs, spec.pooling, spec.normalize)
        tokens = sum(len(ids) for ids in spec.inputs)
        return {
            "object": "list",
            "data": [{"object": "embedding", "index": i, "embedding": _encoded(v, spec.base64)}
                     for i, v in enumerate(vectors)],
            "model": server.model_id,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }

    for path in ("/v1/embeddings", "/embeddings"):  # /embeddings: as OpenAI's, not llama.cpp's per-token shape
        app.post(path, dependencies=auth)(embeddings)
    return embedder
