"""llama.cpp's utility endpoints, in its request and response shapes:

- POST /tokenize {content, add_special=false, parse_special=true, with_pieces=false} ->
  {"tokens": [ids]} or, with pieces, [{"id", "piece"}] where a piece that is not whole UTF-8
  (one byte of a character) is a list of byte values;
- POST /detokenize {tokens} -> {"content": text} (special tokens written out);
- POST /apply-template {messages, add_generation_prompt, ...} -> {"prompt": text}, the
  conversation as the chat template writes it (what /v1/chat/completions would run);
- GET /metrics: Prometheus text. The counters and gauges llama.cpp's dashboards read keep
  its `llamacpp:` names; the rest are `mistol_...`.

They need the API key as the /v1 routes do; bad input is OpenAI's 400 error.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse
from starlette.concurrency import run_in_threadpool

from ..errors import MistolError
from . import protocol as p
from .protocol import APIError


def token_piece(tokenizer, token: int) -> str | list[int]:
    """A token's own text, its leading space kept (" world"), special tokens written out;
    a byte token (part of a character) as [byte], as llama.cpp's /tokenize gives it."""
    item_of = getattr(tokenizer, "_item", None)
    if item_of is None:
        return tokenizer.decode([token], skip_special=False)
    item = item_of(token, False)
    if isinstance(item, int):
        return [item]
    if isinstance(item, bytes):
        try:
            return item.decode("utf-8")
        except UnicodeDecodeError:
            return list(item)
    return item or ""


def _flag(body: dict, key: str, default: bool) -> bool:
    value = body.get(key, default)
    if not isinstance(value, bool):
        raise APIError(400, f"{key} must be true or false (got {value!r})", key)
    return value


def _object(body) -> dict:
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    return body


def _metrics_text(server, embedder) -> str:
    stats = server.scheduler.stats()
    held, capacity, nbytes = server.scheduler.kv_usage()
    counters = [
        ("llamacpp:prompt_tokens_total", "Number of prompt tokens processed, excluding cached tokens",
         stats["prefill_tokens"]),
        ("llamacpp:prompt_tokens_cached_total", "Number of prompt tokens reused from the cache",
         stats["cached_tokens"]),
        ("llamacpp:tokens_predicted_total", "Number of generation tokens processed", stats["decode_tokens"]),
        ("llamacpp:n_decode_total", "Number of batched decode steps", stats["steps"]),
        ("mistol_requests_total", "Generation requests (choices) admitted to the batch", stats["requests"]),
        ("mistol_requests_cancelled_total", "Requests whose client went away before they finished",
         stats["cancelled"]),
        ("mistol_request_errors_total", "Requests that failed in the engine", stats["errors"]),
        ("mistol_embedding_inputs_total", "Inputs embedded", embedder.inputs if embedder else 0),
        ("mistol_embedding_tokens_total", "Tokens run for embeddings", embedder.tokens if embedder else 0),
    ]
    gauges = [
        ("llamacpp:requests_processing", "Number of requests processing", stats["active"]),
        ("llamacpp:requests_deferred", "Number of requests waiting for a place in the batch", stats["waiting"]),
        ("llamacpp:kv_cache_tokens", "Tokens held in the KV caches", held),
        ("llamacpp:kv_cache_usage_ratio", "Share of the KV caches' token capacity in use",
         held / capacity if capacity else 0.0),
        ("mistol_kv_cache_bytes", "Memory held by the KV caches, in bytes", nbytes),
        ("mistol_kv_cache_sessions", "KV caches (sessions) allocated", stats["sessions"]),
        ("mistol_max_batch", "Requests decoded together at most", stats["max_batch"]),
        ("mistol_context_tokens", "Tokens per request, prompt and reply", stats["max_context"]),
        ("mistol_batch_peak", "Largest batch decoded so far", stats["peak_batch"]),
    ]
    lines = []
    for kind, items in (("counter", counters), ("gauge", gauges)):
        for name, description, value in items:
            lines += [f"# HELP {name} {description}", f"# TYPE {name} {kind}", f"{name} {value}"]
    return "\n".join(lines) + "\n"


def add_utility_routes(app: FastAPI, server, auth, embedder=None) -> None:
    @app.post("/tokenize", dependencies=auth)
    async def tokenize(request: Request):
        body = _object(await server.read_json(request))
        content = body.get("content")
        if not isinstance(content, str):
            raise APIError(400, "content is required: the text to tokenize", "content")
        add_special = _flag(body, "add_special", False)
        parse_special = _flag(body, "parse_special", True)
        with_pieces = _flag(body, "with_pieces", False)
        tok = server.tokenizer

        def run():
            ids = tok.encode(content, add_bos=add_special, parse_special=parse_special)
            return [{"id": i, "piece": token_piece(tok, i)} for i in ids] if with_pieces else ids

        return {"tokens": await run_in_threadpool(run)}

    @app.post("/detokenize", dependencies=auth)
    async def detokenize(request: Request):
        body = _object(await server.read_json(request))
        tokens = body.get("tokens")
        if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
            raise APIError(400, "tokens is required: a list of token ids", "tokens")
        bad = next((t for t in tokens if not 0 <= t < server.vocab_size), None)
        if bad is not None:
            raise APIError(400, f"tokens: token id {bad} is outside the vocabulary of {server.vocab_size}", "tokens")
        text = await run_in_threadpool(server.tokenizer.decode, tokens, False)
        return {"content": text}

    @app.post("/apply-template", dependencies=auth)
    async def apply_template(request: Request):
        spec = p.parse_chat_request(await server.read_json(request))
        try:
            prompt = server.chat_template().render_text(spec.messages, spec.add_generation_prompt,
                                                        spec.continue_final_message, tools=server.offered_tools(spec))
        except MistolError as e:
            raise APIError(400, f"messages: {e}", "messages") from None
        return {"prompt": prompt}

    @app.get("/metrics", dependencies=auth)
    async def metrics():
        return PlainTextResponse(_metrics_text(server, embedder), media_type="text/plain; version=0.0.4")
