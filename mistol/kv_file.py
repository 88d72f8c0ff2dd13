"""A conversation's KV cache on disk, so that a resumed chat (or a restarted server) picks up
where it was instead of running its whole history through the model again.

The file is safetensors (no code runs when it is read): the filled slots of the cache's keys
and values (and of their scales, in a q8_0 cache), which absolute position each slot holds,
and the token ids. Its metadata says what the cache belongs to: the model's name, shape and
the cache's dtype, a fingerprint of its weights (a hash of a sample of every tensor, so a
different fine-tune of the same shape is told apart without reading gigabytes), and a hash
of the token ids. `restore` checks all of it and answers with the reason when the file does
not fit; the caller then runs the history again, as without a file: a cache never gives a
wrong answer, at worst no head start.

Files are written to a temporary name and renamed, so a crash or a full disk leaves the
previous file or none, never half of one.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .errors import MistolError
from .util import private_file
from .weights.safetensors_file import SafetensorsFile, save_safetensors

if TYPE_CHECKING:
    from .engine import Engine, Session

FORMAT = "mistol-kv/1"
_SAMPLE = 4096  # elements of each tensor that go into the weights' fingerprint


def weights_fingerprint(engine: Engine) -> str:
    """A hash of the model's tensors: names, shapes, dtypes and an evenly spread sample of values."""
    cached = getattr(engine, "_weights_fingerprint", None)
    if cached:
        return cached
    h = hashlib.sha256()
    model = engine.model
    tensors = sorted([*model.named_parameters(), *model.named_buffers()], key=lambda item: item[0])
    with torch.no_grad():
        for name, t in tensors:
            h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
            if t.numel() and t.is_contiguous():
                flat = t.reshape(-1)
                sample = flat[:: max(1, flat.numel() // _SAMPLE)][:_SAMPLE].contiguous().cpu()
                h.update(sample.view(torch.uint8).numpy().tobytes())
    engine._weights_fingerprint = h.hexdigest()
    return engine._weights_fingerprint


def _tokens_hash(tokens: list[int]) -> str:
    return hashlib.sha256(json.dumps(tokens).encode()).hexdigest()


def _shape(engine: Engine) -> str:
    c = engine.config
    return f"{c.num_layers}x{c.num_kv_heads}x{c.head_dim}"


def _dtype(cache) -> str:
    """What a cache holds, as its file records it: "torch.float16", "torch.float32"... or "q8_0"."""
    return str(cache.dtype)


def save(session: Session, path: Path, extra: dict | None = None) -> int:
    """Write `session`'s cache to `path` (atomically); returns the file's size in bytes.
    `extra`: JSON-able data the caller wants back with the cache (e.g. the replies' token ids)."""
    cache = session.cache
    filled = min(cache.length, cache.capacity)
    engine = session.engine
    tensors = {
        **{name: t[:, :, :, :filled] for name, t in cache.tensors().items()},
        "slot_pos": cache.slot_pos[:filled],
        "tokens": torch.tensor(session.tokens, dtype=torch.int64),
    }
    metadata = {
        "format": FORMAT, "model": engine.name, "shape": _shape(engine), "dtype": _dtype(cache),
        "capacity": str(cache.capacity), "weights": weights_fingerprint(engine),
        "tokens": _tokens_hash(session.tokens), "extra": json.dumps(extra or {}),
    }
    path = Path(path)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a process killed while saving
        stale.unlink(missing_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        # Keys and values say what the conversation said: readable by its owner only, as the log is.
        save_safetensors(private_file(tmp), tensors, metadata)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise MistolError(f"{path}: the KV cache was not saved ({e.strerror or e})") from None
    return path.stat().st_size


def restore(session: Session, path: Path) -> tuple[dict | None, str | None]:
    """Load the cache at `path` into `session`: (the caller's extra data, None), or
    (None, why not) when the file does not belong to this model or is damaged; the session
    is then left empty."""
    engine = session.engine
    try:
        f = SafetensorsFile(path)
    except MistolError as e:
        return None, str(e)
    meta = f.metadata
    if meta.get("format") != FORMAT:
        return None, f"{path}: not a mistol KV cache file"
    if meta.get("shape") != _shape(engine) or meta.get("weights") != weights_fingerprint(engine):
        return None, f"{path}: the cache belongs to another model ({meta.get('model', '?')})"
    cache = session.cache
    if meta.get("dtype") != _dtype(cache):
        return None, f"{path}: the cache is in {meta.get('dtype')}, this session's is {_dtype(cache)}"
    ours = cache.tensors()
    try:
        token_ids = f.tensor("tokens")
        saved = {name: f.tensor(name) for name in ours}
        slot_pos = f.tensor("slot_pos")
        extra = json.loads(meta.get("extra") or "{}")
        capacity = int(meta.get("capacity", -1))
    except (KeyError, ValueError, TypeError):
        return None, f"{path}: damaged KV cache file"
    if (token_ids.dtype != torch.int64 or slot_pos.dtype != torch.int64
            or any(saved[name].dtype != t.dtype for name, t in ours.items())):
        return None, f"{path}: damaged KV cache file (tensor types)"
    if token_ids.dim() != 1 or not isinstance(extra, dict):
        return None, f"{path}: damaged KV cache file"
    if token_ids.numel() > session.max_context:  # (before reading them all into a list)
        return None, f"{path}: the cache does not fit this session (context {session.max_context})"
    tokens = token_ids.tolist()
    if any(not 0 <= t < engine.config.vocab_size for t in tokens):
        return None, f"{path}: damaged KV cache file (token ids outside the vocabulary)"
    if _tokens_hash(tokens) != meta.get("tokens"):
        return None, f"{path}: damaged KV cache file (its token ids do not match their hash)"
    filled = saved["k"].shape[3] if saved["k"].dim() == 5 else -1
    expected = min(len(tokens), cache.capacity)
    if (filled != expected or any(saved[name].shape != (*t.shape[:3], filled, *t.shape[4:]) for name, t in ours.items())
            or tuple(slot_pos.shape) != (filled,) or len(tokens) > session.max_context
            or capacity != cache.capacity):
        return None, f"{path}: the cache does not fit this session (context {session.max_context})"
    # slot s holds position p with p % capacity == s among the last `filled` positions, or none (-1)
    slots = torch.arange(filled)
    held = slot_pos >= 0
    if not ((slot_pos[held] % cache.capacity == slots[held]).all() and (slot_pos < len(tokens)).all()
            and (slot_pos[held] >= len(tokens) - filled).all() and (held | (slot_pos == -1)).all()):
        return None, f"{path}: damaged KV cache file (its slots' positions)"
    session.reset()
    for name, t in ours.items():
        t[:, :, :, :filled].copy_(saved[name])
    cache.slot_pos[:filled].copy_(slot_pos)
    cache.length = len(tokens)
    session.tokens = list(tokens)
    return extra, None
