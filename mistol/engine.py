"""`Engine` (weights + tokenizer + the plan of its steps) and `Session` (one conversation's
KV cache).

A session holds the token ids whose keys and values sit in its cache. Feeding it a new
token list runs only what lies beyond the longest common prefix with what it holds, so
a chat turn, an edited message or a regenerated reply costs only the tokens that changed.
Every step runs through the engine's `Backend` (model/backend.py), which knows which code
runs it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch

from .errors import MistolError
from .generation import Generation
from .model import KVCache, ModelConfig, Transformer
from .model.backend import Backend
from .model.kv_cache import Q8_0, KVType
from .sampling import SamplingParams, sample_next
from .speculative import Speculation, Speculator
from .stops import StopFilter
from .util import available_memory, common_prefix

DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}
DEFAULT_CHUNK = 512  # prefill chunk: bounds activation memory and the rolling-cache slack
# With dtype "auto" on CPU, checkpoints of at least this size load with int8 linear layers
# (Q8_0 blocks, the rest in f32): decoding reads every weight once per token, so int8 is
# about 2x faster than bf16 and 4x than f32 and takes half of bf16's memory, for an error
# far below the model's own noise (llama.cpp users' usual choice). Smaller models (the demo,
# tests) stay in exact f32. GGUF files keep their own types. Only where the compiled kernels
# have SIMD int8 products for this CPU (`auto_int8`): without them int8 layers run on scalar
# C or PyTorch ops, slower than the float weights they replace.
AUTO_INT8_BYTES = 2 << 30
DEFAULT_MAX_CONTEXT = 8192  # for models without a sliding window, whose cache grows with it


class Engine:
    def __init__(self, model: Transformer, tokenizer=None, name: str = "model"):
        self.model = model
        self.config: ModelConfig = model.config
        self._tokenizer = tokenizer
        self.name = name
        self.backend = Backend.choose(model)
        self.kv_dtype: KVType = default_kv_dtype(model)  # what new sessions' caches hold (`KV_CACHE_DTYPES`)
        # How sessions decode several tokens per pass (mistol/speculative.py); None: one at a time
        self.speculation: Speculation | None = Speculation()

    def replan(self) -> None:
        """Choose the plan again, after the model's modules changed or it moved."""
        self.backend = Backend.choose(self.model, self.backend.cuda_graphs)

    @property
    def cuda_graphs(self) -> bool:
        """Whether single-token decode steps on a GPU replay CUDA graphs (model/cuda_graphs.py)."""
        return self.backend.cuda_graphs

    @cuda_graphs.setter
    def cuda_graphs(self, on: bool) -> None:
        self.backend.cuda_graphs = on

    @classmethod
    def load(
        cls,
        model: str | Path,
        dtype: str = "auto",
        device: str = "cpu",
        progress: bool | None = None,
        quant: str | None = None,
    ) -> "Engine":
        """Load a model directory or a `.gguf` file (or anything `resolve_model` accepts);
        `quant` ("int8" or "int4") quantizes the linear layers' weights as they load (see
        `mistol.quant`; for what it does to a GGUF file's tensors, `mistol.weights.gguf_load`).
        With dtype "auto" on CPU, a checkpoint of `AUTO_INT8_BYTES` or more loads as int8
        where the compiled kernels have SIMD int8 products for this CPU (`auto_int8`)."""
        from .hub import is_gguf, resolve_model
        from .quant import quantize_tied_head
        from .weights.memory import release_free_heap

        path = resolve_model(str(model))
        device = _check_device(device)
        if is_gguf(path):
            from .weights.gguf_file import GGUFFile
            from .weights.gguf_load import float_bytes, load_gguf
            from .weights.gguf_vocab import tokenizer_from_gguf

            gf = GGUFFile(path)
            gf.config()  # a file we cannot run fails here, before the tokenizer or any weights
            tokenizer = tokenizer_from_gguf(gf)
            torch_dtype = resolve_dtype(dtype, device, lambda: float_bytes(gf, quant))
            transformer = load_gguf(gf, dtype=torch_dtype, device=device, progress=progress, quant=quant)
            quantize_tied_head(transformer)
            release_free_heap()
            return cls(transformer, tokenizer, name=str(model))

        from .weights import find_weight_files, load_model

        file_bytes = sum(f.stat().st_size for f in find_weight_files(path))
        if dtype == "auto" and quant is None and file_bytes >= AUTO_INT8_BYTES and auto_int8(device):
            dtype, quant = "f32", "int8"  # see AUTO_INT8_BYTES
        torch_dtype = resolve_dtype(dtype, device, lambda: 2 * file_bytes)
        transformer = load_model(path, dtype=torch_dtype, device=device, progress=progress, quant=quant)
        quantize_tied_head(transformer)
        tokenizer = None
        from .bpe_tokenizer import is_byte_level_bpe_dir

        if (path / "tokenizer.model").is_file() or is_byte_level_bpe_dir(path):
            from .tokenizer import Tokenizer

            tokenizer = Tokenizer.from_dir(path)
        release_free_heap()
        return cls(transformer, tokenizer, name=str(model))

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            raise MistolError(f"{self.name}: the model has no tokenizer (tokenizer.model, or GGUF tokenizer metadata)")
        return self._tokenizer

    def new_session(self, max_context: int | None = None, chunk_size: int = DEFAULT_CHUNK) -> "Session":
        return Session(self, max_context=max_context, chunk_size=chunk_size)

    def hidden_states(self, tokens: Sequence[int]) -> torch.Tensor:
        """The final norm's output at each of `tokens` ([n, hidden], float32): what the head
        would turn into logits, and what an embeddings endpoint pools. Runs in a cache of its
        own, chunked as a prefill is, so any sequence that fits the context works."""
        return self.new_session(max_context=max(len(tokens), 1)).hidden_states(tokens)

    @torch.inference_mode()
    def decode_step(self, sessions: Sequence["Session"], tokens: Sequence[int]) -> torch.Tensor:
        """Append one token to each of this engine's `sessions` in a single forward pass.

        Decoding is bound by reading the weights, so B sequences in one step cost about what
        one does: this is what lets a server serve concurrent requests together. Returns the
        float32 logits after each new token, [B, vocab].
        """
        if len(sessions) == 1:  # one session: its own path (on a GPU, a CUDA graph replay)
            return sessions[0].step(tokens[0])[None]
        for s in sessions:
            if s.engine is not self:
                raise ValueError("decode_step: a session of another engine")
            s.check_room()
        device = self.model.device
        ids = torch.tensor([[t] for t in tokens], dtype=torch.long, device=device)
        positions = torch.tensor([[len(s.tokens)] for s in sessions], device=device)
        logits = self.backend.forward(self.model, ids, positions, [s.cache for s in sessions])
        for s, token, row in zip(sessions, tokens, logits):
            s._appended([int(token)], row)
        return logits


def load_tokenizer(model: str | Path):
    """Only the tokenizer of a model directory or `.gguf` file (no weights are read)."""
    from .hub import is_gguf, resolve_model
    from .tokenizer import Tokenizer

    path = resolve_model(str(model), tokenizer_only=True)
    if not is_gguf(path):
        return Tokenizer.from_dir(path)
    from .weights.gguf_file import GGUFFile
    from .weights.gguf_vocab import tokenizer_from_gguf

    tokenizer = tokenizer_from_gguf(GGUFFile(path))
    if tokenizer is None:
        raise MistolError(f"{path}: the file has no tokenizer metadata")
    return tokenizer


def auto_int8(device: torch.device) -> bool:
    """Whether dtype "auto" may load a large checkpoint as int8 on `device`: on a CPU whose
    compiled kernels multiply int8 with SIMD instructions (AVX2, AVX512-VNNI, NEON)."""
    from . import kernels

    return device.type == "cpu" and kernels.impl_name() not in ("scalar", "torch")


def resolve_dtype(name: str, device: torch.device, f32_bytes: Callable[[], int]) -> torch.dtype:
    """`f32_bytes()`: what the weights that load as floats would take in f32 (checkpoint
    files are usually 16-bit: twice their size); asked only for "auto" on CPU."""
    if name in DTYPES:
        return DTYPES[name]
    if name != "auto":
        raise MistolError(f"unknown dtype {name!r} (choose from auto, {', '.join(DTYPES)})")
    if device.type == "cuda":
        return torch.bfloat16
    if device.type == "mps":  # Apple's GPU: float16 runs on every macOS that has MPS (bf16 needs macOS 14)
        return torch.float16
    # On CPU f32 is exact and fast to compute (this CPU class has no native bf16 matmul);
    # fall back to bf16 where f32 weights would crowd out memory.
    return torch.float32 if f32_bytes() < available_memory() // 2 else torch.bfloat16


def _check_device(device: str) -> torch.device:
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise MistolError(f"unknown device {device!r} (use cpu, cuda, cuda:N or mps)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MistolError("--device cuda: this torch build or machine has no CUDA GPU")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        why = ("this torch build has no MPS (PyTorch's Metal backend)" if not torch.backends.mps.is_built()
               else "this machine has no Metal GPU (MPS needs macOS 12.3+ on Apple silicon)")
        raise MistolError(f"--device mps: {why}")
    return dev


# what `--kv-cache` names: float32, float16, or llama.cpp's Q8_0 blocks (model/kv_cache.py)
KV_CACHE_DTYPES = {"f16": torch.float16, "f32": torch.float32, "q8_0": Q8_0}


def default_kv_dtype(model: Transformer) -> torch.dtype:
    """float16 for a quantized model (int8/int4 or a GGUF file's blocks) on a CPU (half the bytes of float32, which such a model
    computes in: a 7B cache takes 128 MiB per 1k tokens instead of 256, and a long context's
    decode step reads half as much), else the model's own dtype."""
    from .block_quant import BlockLinear
    from .quant import QuantizedLinear

    if model.device.type == "cpu" and model.dtype == torch.float32 and any(
            isinstance(m, (QuantizedLinear, BlockLinear)) for m in model.modules()):
        return torch.float16
    return model.dtype


class Session:
    """One conversation: a KV cache and the token ids it holds."""

    def __init__(self, engine: Engine, max_context: int | None = None, chunk_size: int = DEFAULT_CHUNK):
        config = engine.config
        self.engine = engine
        self.model = engine.model
        if max_context is None:
            max_context = config.max_position_embeddings
            if config.sliding_window is None:
                max_context = min(max_context, DEFAULT_MAX_CONTEXT)
        self.max_context = max_context
        self.chunk_size = chunk_size
        capacity = max_context
        if config.sliding_window is not None:
            capacity = min(max_context, config.sliding_window + chunk_size)
        self.cache = KVCache(config, capacity, engine.kv_dtype, self.model.device)
        self.tokens: list[int] = []  # exactly the tokens whose keys/values are cached
        self.tokens_processed = 0  # running count of tokens run through the model
        self._last_logits: torch.Tensor | None = None
        self._graphed = None  # a GraphedDecoder, made at the first decode step on a GPU
        self._speculator: Speculator | None = None  # made at the first reply that speculates

    # -- feeding -------------------------------------------------------------------------
    def feed(self, tokens: Sequence[int], all_logits: bool = False) -> torch.Tensor:
        """Make the session hold `tokens`, running only those past the common prefix.

        Returns the float32 logits after the last token ([vocab]), or with `all_logits`
        the logits of every token that had to run ([n, vocab]).
        """
        tokens = list(tokens)
        if not tokens:
            raise MistolError("cannot feed an empty token list")
        if len(tokens) > self.max_context:
            raise MistolError(f"{len(tokens)} tokens exceed the context of {self.max_context}")
        keep = common_prefix(self.tokens, tokens)
        if keep == len(tokens) == len(self.tokens) and self._last_logits is not None and not all_logits:
            return self._last_logits
        keep = min(keep, len(tokens) - 1)  # the last token must run to give logits
        self.truncate(keep)
        return self._run(tokens[keep:], all_logits)

    def truncate(self, length: int) -> None:
        """Roll the conversation back to its first `length` tokens."""
        if length >= len(self.tokens):
            return
        kept = self.tokens[:length]
        self._last_logits = None
        if self.cache.truncate(length):
            self.tokens = kept
        else:  # a rolling cache already overwrote what that state needs: rebuild it
            self.reset()
            if kept:
                self._run(kept, all_logits=False)

    def reset(self) -> None:
        self.cache.reset()
        self.tokens = []
        self._last_logits = None

    def step(self, token: int) -> torch.Tensor:
        """Append one token (a decode step): the float32 logits after it, [vocab]."""
        self.check_room()
        return self._run([int(token)], all_logits=False)

    def verify(self, tokens: Sequence[int]) -> torch.Tensor:
        """Append `tokens` (a pending token and guesses after it) in one pass: the float32
        logits after each, [n, vocab]. Roll back the wrong guesses with `truncate`, then
        `keep_logits` the last kept row."""
        if len(self.tokens) + len(tokens) > self.max_context:
            raise MistolError(f"a session is at its context limit of {self.max_context} tokens")
        return self._run([int(t) for t in tokens], all_logits=True)

    def verify_rows(self) -> int:
        """The most tokens `verify` should take: one chunk, so that after rolling back any of
        them a rolling cache still holds every key of the window (see `_chunk_step`)."""
        return self._chunk_step()

    def keep_logits(self, logits: torch.Tensor) -> None:
        """Record `logits` as those after the last token held (after a rollback)."""
        self._last_logits = logits

    @property
    def speculator(self) -> Speculator | None:
        """This conversation's speculative decoding (its policy and statistics), or None when
        the engine's `speculation` is off."""
        speculation = self.engine.speculation
        if speculation is None:
            return None
        if self._speculator is None or self._speculator.speculation is not speculation:
            self._speculator = Speculator(speculation)
        return self._speculator

    def check_room(self) -> None:
        """Raise unless the cache has room for one more token."""
        if len(self.tokens) >= self.max_context:
            raise MistolError(f"a session is at its context limit of {self.max_context} tokens")

    @torch.inference_mode()
    def _run(self, new: list[int], all_logits: bool) -> torch.Tensor:
        backend = self.engine.backend
        if len(new) == 1 and not all_logits and backend.graphs:
            return self._graph_step(new[0])
        device = self.model.device
        outputs = []
        step = self._chunk_step()
        for start in range(0, len(new), step):
            chunk = new[start : start + step]
            pos0 = len(self.tokens)
            ids = torch.tensor([chunk], dtype=torch.long, device=device)
            positions = torch.arange(pos0, pos0 + len(chunk), device=device)
            try:
                logits = backend.forward(self.model, ids, positions, [self.cache], all_logits=all_logits)[0]
            except BaseException:  # Ctrl-C mid-step: keep the cache consistent with `tokens`
                self.cache.truncate(len(self.tokens))
                self._last_logits = None
                raise
            outputs.append(logits)
            self._appended(chunk, logits[-1] if all_logits else logits)
        return torch.cat(outputs) if all_logits else self._last_logits

    def _chunk_step(self) -> int:
        """Tokens per prefill chunk: a rolling cache keeps the window's keys for a chunk's first query."""
        if self.cache.window is None:
            return self.chunk_size
        return min(self.chunk_size, self.cache.capacity - self.cache.window + 1)

    @torch.inference_mode()
    def hidden_states(self, tokens: Sequence[int]) -> torch.Tensor:
        """Start over with `tokens` and return the final norm's output at each ([n, hidden],
        float32) instead of logits (see `Engine.hidden_states`)."""
        tokens = [int(t) for t in tokens]
        if not tokens:
            raise MistolError("cannot run an empty token list")
        if len(tokens) > self.max_context:
            raise MistolError(f"{len(tokens)} tokens exceed the context of {self.max_context}")
        self.reset()
        model, device, outputs = self.model, self.model.device, []
        step = self._chunk_step()
        for start in range(0, len(tokens), step):
            chunk = tokens[start : start + step]
            positions = torch.arange(start, start + len(chunk), device=device)
            # Transformer.forward up to its head, layer by layer over this session's cache
            x, cos, sin = model.embed(torch.tensor([chunk], dtype=torch.long, device=device), positions)
            plans = [self.cache.plan(positions)]
            for block in model.layers:
                x = block(x, cos, sin, [self.cache], plans)
            outputs.append(model.norm(x[0]).float())
            self.tokens.extend(chunk)
        self._last_logits = None  # the cache holds the tokens, but no logits were made
        return torch.cat(outputs)

    def _graph_step(self, token: int) -> torch.Tensor:
        if self._graphed is None:
            self._graphed = self.engine.backend.graphed_decoder(self.model, self.cache)
        logits = self._graphed.step(int(token), len(self.tokens))
        self._appended([int(token)], logits)
        return logits

    def _appended(self, tokens: list[int], last_logits: torch.Tensor) -> None:
        """Record tokens whose keys and values a step just wrote into the cache."""
        self.tokens.extend(tokens)
        self.tokens_processed += len(tokens)
        self._last_logits = last_logits

    # -- generating ----------------------------------------------------------------------
    def check_fits(self, prompt_len: int, max_tokens: int) -> None:
        if prompt_len + max_tokens > self.max_context:
            raise MistolError(
                f"the prompt ({prompt_len} tokens) plus max_tokens ({max_tokens}) exceeds "
                f"the context of {self.max_context} tokens: shorten the prompt or ask for fewer tokens"
            )

    def generate(self, prompt: Sequence[int], params: SamplingParams, grammar=None) -> Iterator[int]:
        """Yield new token ids after `prompt`. The last one yielded (a stop token, say)
        is not yet in the cache; the next `feed` of the conversation adds it. `grammar`: a
        `constraints.TokenGrammar` the reply must match; it ends once the grammar is complete.
        Without a grammar, the engine's `speculation` (if on) decodes several tokens per pass,
        with the same output (mistol/speculative.py)."""
        prompt = list(prompt)
        self.check_fits(len(prompt), params.max_tokens)
        if params.max_tokens == 0:
            return
        logits = self.feed(prompt)
        generator = params.make_generator()
        speculator = self.speculator if grammar is None else None
        if speculator is not None:
            yield from speculator.generate(self, logits, params, generator)
            return
        stop_ids = set(params.stop_token_ids)
        for i in range(params.max_tokens):
            context = torch.tensor(self.tokens) if params.repetition_penalty != 1.0 else None
            if grammar is not None:
                logits = grammar.mask(logits.cpu(), params.stop_token_ids)
            token = sample_next(logits, params, generator, context)
            yield token
            if token in stop_ids or i == params.max_tokens - 1:
                return
            if grammar is not None:
                grammar.advance(token)
                if grammar.finished:
                    return
            logits = self.step(token)

    def stream(self, prompt: Sequence[int], params: SamplingParams, result: Generation | None = None,
               grammar=None) -> Iterator[str]:
        """Yield the reply's text as it forms, ending at a stop token, a stop string,
        max_tokens or the end of `grammar` (see `generate`); `result` (a `Generation`)
        collects the text, ids and timings."""
        result = result if result is not None else Generation()
        tokenizer = self.engine.tokenizer
        decoder = tokenizer.stream_decoder()
        prompt = list(prompt)
        result.prompt_tokens = len(prompt)
        stop_ids = set(params.stop_token_ids)
        stops = StopFilter(params.stop)
        start = time.perf_counter()
        before = self.tokens_processed
        speculator = self.speculator if grammar is None else None
        spec_before = (speculator.stats.proposed, speculator.stats.accepted) if speculator else (0, 0)
        result.finish_reason = "length"
        for token in self.generate(prompt, params, grammar):
            now = time.perf_counter()
            if result.time_to_first_token is None:
                result.time_to_first_token = now - start
                result.prefilled_tokens = self.tokens_processed - before
                decode_start = now
            else:
                result.decode_seconds = now - decode_start
            result.token_ids.append(token)
            result.completion_tokens += 1
            if token in stop_ids:
                result.finish_reason = "stop"
                break
            emit = stops.push(decoder.push(token))
            if emit:
                result.text += emit
                yield emit
            if stops.stopped:
                result.finish_reason = "stop"
                break
        if result.finish_reason == "length":
            rest = stops.push(decoder.flush())
            if stops.stopped:
                result.finish_reason = "stop"
        else:  # a stop token: an unfinished character in the decoder is dropped
            rest = ""
        rest += stops.flush()
        if grammar is not None and grammar.finished:
            result.finish_reason = "stop"  # the grammar's end, not the length limit
        if speculator is not None:
            result.draft_tokens = speculator.stats.proposed - spec_before[0]
            result.accepted_tokens = speculator.stats.accepted - spec_before[1]
        if rest:
            result.text += rest
            yield rest


def decode_step(sessions: Sequence[Session], tokens: Sequence[int]) -> torch.Tensor:
    """`Engine.decode_step` of the sessions' engine."""
    return sessions[0].engine.decode_step(sessions, tokens)
