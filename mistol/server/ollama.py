"""ollama's API over the same scheduler, so that tools written for ollama work unchanged:
POST /api/chat, POST /api/generate, POST /api/embed, GET /api/tags, POST /api/show,
GET /api/ps, GET /api/version.

Replies stream as NDJSON by default, as ollama's do (`"stream": false` for one object): one
`{"model", "created_at", "message" | "response", "done": false}` per piece of text, then a
last record with `"done": true`, `done_reason` ("stop" or "length") and ollama's counts and
durations (nanoseconds, measured here from the request's arrival: `prompt_eval_duration`
runs to the first text, `eval_duration` from there to the end; `load_duration` is 0, the
model being loaded at start). Errors are ollama's `{"error": "..."}`, mid-stream as a line.

`options` maps onto the OpenAI fields: temperature, top_p, top_k, min_p, seed (-1: random), stop,
num_predict (max_tokens; -1 or -2 for no limit), repeat_penalty (over the whole context),
frequency_penalty, presence_penalty. Options that only tune how ollama runs a model
(num_ctx, num_gpu, num_thread, ...) are ignored; mirostat, tfs_z, typical_p and
penalize_newline would change the output and mistol does not implement them: refused
unless neutral, as are other unknown options. `format` ("json" or a schema) constrains the
output as `response_format` does. `tools`, `images`,
`think`, `logprobs`, `suffix` and `template` are refused with a 400, not ignored.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import time
from datetime import datetime, timezone

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from .. import __version__
from ..errors import MistolError
from ..sampling import SamplingParams
from . import protocol as p
from .protocol import APIError

# The ollama release whose API these routes follow (tools compare it to the versions that
# introduced the features they use).
OLLAMA_API_VERSION = "0.12.0"
NEUTRAL_OPTIONS = {"mirostat": 0, "tfs_z": 1.0, "typical_p": 1.0, "penalize_newline": False}
IGNORED_OPTIONS = {"num_ctx", "num_batch", "num_gpu", "main_gpu", "low_vram", "numa", "use_mmap", "use_mlock",
                   "num_thread", "num_keep", "vocab_only", "logits_all", "embedding_only", "f16_kv",
                   "mirostat_tau", "mirostat_eta", "repeat_last_n"}
SAME_NAMES = ("temperature", "top_p", "top_k", "min_p", "seed", "stop", "frequency_penalty", "presence_penalty")


class OllamaError(APIError):
    """An error in ollama's shape: `{"error": "message"}`."""

    def body(self) -> dict:
        return {"error": self.message}


def ollama_errors(handler):
    """Answer the handler's OpenAI-shaped errors in ollama's shape."""

    @functools.wraps(handler)
    async def wrapped(*args, **kwargs):
        try:
            return await handler(*args, **kwargs)
        except OllamaError:
            raise
        except APIError as e:
            raise OllamaError(e.status, e.message, e.param, e.code) from None

    return wrapped


def created_at() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


# -- requests -----------------------------------------------------------------------------------
def _object(body, where: str = "the request body") -> dict:
    if not isinstance(body, dict):
        raise APIError(400, f"{where} must be a JSON object")
    return body


def _model(body: dict) -> str:
    model = body.get("model")
    if model is None:
        model = body.get("name")  # ollama's older name for the field
    if not isinstance(model, str) or not model:
        raise APIError(400, "model is required (see GET /api/tags)")
    return model


def _format(body: dict) -> dict:
    """ollama's `format` ("json", or a JSON schema) as OpenAI's `response_format`."""
    fmt = body.get("format")
    if fmt in (None, ""):
        return {}
    if fmt == "json":
        return {"response_format": {"type": "json_object"}}
    if isinstance(fmt, dict):
        return {"response_format": {"type": "json_schema", "json_schema": {"name": "format", "schema": fmt}}}
    raise APIError(400, 'format must be "json" or a JSON schema (an object)')


def _refuse_unsupported(body: dict) -> None:
    for key, what in (("tools", "tools"), ("images", "images"), ("suffix", "suffix (fill-in-the-middle)"),
                      ("template", "a template override")):
        if body.get(key):
            raise APIError(400, f"{what} is not supported by this server")
    if body.get("think") not in (None, False):
        raise APIError(400, "think: this model does not support thinking")
    if body.get("logprobs"):
        raise APIError(400, "logprobs is not supported on ollama's routes (use /v1/chat/completions)")
    if any(body.get(key) is not None for key in ("width", "height", "steps")):
        raise APIError(400, "image generation is not supported by this server")


def _sampling(body: dict) -> dict:
    """ollama's `options` as the OpenAI fields protocol.py checks."""
    options = body.get("options")
    if options is None:
        return {}
    options = _object(options, "options")
    fields = {}
    for key, value in options.items():
        if value is None or key in IGNORED_OPTIONS:
            continue
        if key == "seed" and value == -1:
            continue  # ollama's default: a random seed
        if key in SAME_NAMES:
            fields[key] = value
        elif key == "repeat_penalty":
            fields["repetition_penalty"] = value
        elif key == "num_predict":
            if value in (-1, -2):  # no limit, or to the end of the context
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise APIError(400, f"options.num_predict must be an integer >= 1, or -1 (got {value!r})")
            fields["max_tokens"] = value
        elif key in NEUTRAL_OPTIONS:
            if value != NEUTRAL_OPTIONS[key]:
                raise APIError(400, f"options.{key} is not supported by this server "
                               f"(only {NEUTRAL_OPTIONS[key]!r}, which leaves it off)")
        else:
            raise APIError(400, f"options.{key} is not an option this server knows")
    return fields


def _in_ollamas_words(e: APIError) -> APIError:
    """An error of protocol.py's checks, naming the option the client sent."""
    names = {"max_tokens": "options.num_predict", "repetition_penalty": "options.repeat_penalty",
             **{key: f"options.{key}" for key in SAME_NAMES}}
    if e.param not in names:
        return e
    message = e.message.replace(e.param, names[e.param], 1) if e.param in e.message else e.message
    return APIError(e.status, message, names[e.param], e.code)


def _parsed(parse, body: dict):
    try:
        return parse(body)
    except APIError as e:
        raise _in_ollamas_words(e) from None


def _messages(value) -> list[dict]:
    if not isinstance(value, list):
        raise APIError(400, "messages must be a list of {role, content} objects")
    out = []
    for i, m in enumerate(value):
        m = _object(m, f"messages[{i}]")
        if m.get("role") == "tool" or m.get("tool_calls"):
            raise APIError(400, f"messages[{i}]: tool calls are not supported by this server")
        if m.get("images"):
            raise APIError(400, f"messages[{i}]: images are not supported by this server")
        content = m.get("content")
        out.append({"role": m.get("role"), "content": "" if content is None else content})
    return out


def _context(value, vocab: int) -> list[int]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise APIError(400, "context must be a list of token ids (a previous reply's context)")
    bad = next((t for t in value if not 0 <= t < vocab), None)
    if bad is not None:
        raise APIError(400, f"context: token id {bad} is outside the vocabulary of {vocab}")
    return value


def _flag(body: dict, key: str, default: bool) -> bool:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise APIError(400, f"{key} must be true or false (got {value!r})")
    return value


# -- the model's description ------------------------------------------------------------------
def _parameter_count(model) -> int:
    """The weights' values, a quantized layer counting its unpacked matrix."""
    from ..quant import FORMATS

    total = 0
    for m in model.modules():
        if getattr(m, "fmt", None) in FORMATS:
            total += m.in_features * m.out_features
        else:
            total += sum(t.numel() for t in m.parameters(recurse=False))
    return total


def _human(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}".rstrip("0").rstrip(".") + unit
    return str(n)


def _quantization(model) -> str:
    from ..quant import FORMATS

    formats = {FORMATS[m.fmt].ggml_type for m in model.modules() if getattr(m, "fmt", None) in FORMATS}
    if formats:
        return ",".join(sorted(formats))
    return {"torch.float32": "F32", "torch.bfloat16": "BF16", "torch.float16": "F16"}.get(str(model.dtype),
                                                                                         str(model.dtype))


class ModelDescription:
    """What /api/tags, /api/show and /api/ps say of the served model."""

    def __init__(self, server):
        engine, config = server.engine, server.engine.config
        self.name = server.model_id
        self.family = getattr(config, "model_type", None) or ("mistral" if config.sliding_window else "llama")
        model = engine.model
        self.parameters = _parameter_count(model)
        self.size = sum(t.nbytes for t in (*model.parameters(), *model.buffers()))
        self.on_gpu = model.device.type == "cuda"
        self.digest = hashlib.sha256(server.fingerprint.encode()).hexdigest()  # changes with the weights
        self.modified_at = datetime.fromtimestamp(server.created, timezone.utc).isoformat().replace("+00:00", "Z")
        self.details = {
            "parent_model": "", "format": "gguf" if self.name.endswith(".gguf") else "safetensors",
            "family": self.family, "families": [self.family], "parameter_size": _human(self.parameters),
            "quantization_level": _quantization(model),
        }
        self.context = server.scheduler.max_context
        self.config = config
        self.template = getattr(server.tokenizer, "chat_template", None) or (
            "(ChatML, mistol's built-in template)" if server.template else "{{ .Prompt }}")

    def entry(self) -> dict:
        return {"name": self.name, "model": self.name, "modified_at": self.modified_at, "size": self.size,
                "digest": self.digest, "details": self.details}

    def show(self) -> dict:
        c, arch = self.config, self.family
        d = SamplingParams()
        return {
            "modelfile": f"# served by mistol {__version__}\nFROM {self.name}\n",
            "parameters": f"temperature {d.temperature}\ntop_k {d.top_k}\ntop_p {d.top_p}\nmin_p {d.min_p}",
            "template": self.template,
            "details": self.details,
            "model_info": {
                "general.architecture": arch, "general.parameter_count": self.parameters,
                f"{arch}.context_length": self.context, f"{arch}.embedding_length": c.hidden_size,
                f"{arch}.block_count": c.num_layers, f"{arch}.attention.head_count": c.num_heads,
                f"{arch}.attention.head_count_kv": c.num_kv_heads, f"{arch}.feed_forward_length": c.intermediate_size,
            },
            "capabilities": ["completion"],
            "modified_at": self.modified_at,
        }

    def running(self) -> dict:
        return {**self.entry(), "expires_at": "2999-01-01T00:00:00Z", "size_vram": self.size if self.on_gpu else 0,
                "context_length": self.context}


# -- replies ------------------------------------------------------------------------------------
class _Run:
    """One generation as ollama's records: its text under "message" (chat) or "response" (generate)."""

    def __init__(self, server, client, jobs, outputs, prompt, chat: bool, started: int):
        self.server, self.client = server, client
        self.job, self.outputs, self.prompt = jobs[0], outputs, prompt
        self.chat, self.started = chat, started
        self.first: int | None = None  # when the first text came
        self.text = ""

    def record(self, text: str) -> dict:
        value = {"role": "assistant", "content": text} if self.chat else text
        return {"model": self.server.model_id, "created_at": created_at(),
                "message" if self.chat else "response": value, "done": False}

    def final(self, out, text: str = "") -> dict:
        end = time.perf_counter_ns()
        first = self.first or end
        record = {**self.record(text), "done": True, "done_reason": out.finish_reason,
                  "total_duration": end - self.started, "load_duration": 0,
                  "prompt_eval_count": out.prompt_tokens, "prompt_eval_duration": first - self.started,
                  "eval_count": out.completion_tokens, "eval_duration": end - first}
        if not self.chat:  # the conversation so far, to send back as `context` to go on from it
            stops = set(self.server.stop_ids(chat=self.server.template is not None))  # (as respond asked)
            record["context"] = self.prompt + [t for t in out.token_ids if t not in stops]
        return record

    async def next_output(self):
        _, out = await self.outputs.get()
        if self.first is None and (out.text or out.finish_reason):
            self.first = time.perf_counter_ns()
        self.text += out.text
        if out.finish_reason in ("stop", "length") and self.chat:
            self.server.remember(self.client, self.text, out.token_ids)
        return out

    async def lines(self):
        try:
            while True:
                out = await self.next_output()
                if out.error is not None:
                    yield _line({"error": out.error})
                    return
                if out.text:
                    yield _line(self.record(out.text))
                if out.finish_reason is not None:
                    yield _line(self.final(out))
                    return
        finally:
            self.job.cancel()  # the client went away (or we are done): free the slot

    async def collect(self, request: Request):
        async def finished():
            while True:
                out = await self.next_output()
                if out.error is not None:
                    return JSONResponse({"error": out.error}, status_code=500)
                if out.finish_reason is not None:
                    return self.final(out, self.text)

        async def disconnected():
            while (await request.receive())["type"] != "http.disconnect":
                pass

        waiter, watcher = asyncio.ensure_future(finished()), asyncio.ensure_future(disconnected())
        try:
            await asyncio.wait({waiter, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self.job.cancel()  # a no-op once finished; frees the slot if the client left
            watcher.cancel()
            waiter.cancel()
        if not waiter.done() or waiter.cancelled():
            return JSONResponse({"error": "client closed the request"}, status_code=499)
        return waiter.result()


def _line(record: dict) -> str:
    return json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n"


def add_ollama_routes(app: FastAPI, server, embedder) -> None:
    description = ModelDescription(server)

    @ollama_errors
    async def authorize(request: Request):
        await server.authorize(request)

    auth = [Depends(authorize)]

    def check_model(name: str) -> None:
        server.check_requested_model(name.removesuffix(":latest"))

    async def respond(request: Request, spec, chat: bool, stream: bool, started: int):
        """Queue the request (stopping where the template ends a turn, as ollama stops at the
        model's stop tokens, for /api/generate too; at EOS for a model without a template) and
        answer in NDJSON or as one object."""
        client = server.client_of(request)
        try:
            jobs, outputs, prompt = await server.submit(spec, chat or server.template is not None, client)
        except APIError as e:
            raise _in_ollamas_words(e) from None
        run = _Run(server, client, jobs, outputs, prompt, chat, started)
        if stream:
            return StreamingResponse(run.lines(), media_type="application/x-ndjson")
        return await run.collect(request)

    def loaded(field: str) -> dict:
        """ollama's answer to a request with nothing to generate: the model is loaded."""
        value = {"role": "assistant", "content": ""} if field == "message" else ""
        return {"model": server.model_id, "created_at": created_at(), field: value, "done": True,
                "done_reason": "load"}

    @app.post("/api/chat", dependencies=auth)
    @ollama_errors
    async def chat(request: Request):
        started = time.perf_counter_ns()
        body = _object(await server.read_json(request))
        check_model(_model(body))
        _refuse_unsupported(body)
        stream = _flag(body, "stream", True)
        messages = _messages(body.get("messages", []))
        sampling = _sampling(body)
        if not messages:
            return loaded("message")
        spec = _parsed(p.parse_chat_request, {"messages": messages, **sampling, **_format(body)})
        return await respond(request, spec, True, stream, started)

    @app.post("/api/generate", dependencies=auth)
    @ollama_errors
    async def generate(request: Request):
        started = time.perf_counter_ns()
        body = _object(await server.read_json(request))
        check_model(_model(body))
        _refuse_unsupported(body)
        prompt, system = body.get("prompt", ""), body.get("system", "")
        prompt, system = "" if prompt is None else prompt, "" if system is None else system
        if not isinstance(prompt, str) or not isinstance(system, str):
            raise APIError(400, "prompt and system must be strings")
        raw, stream = _flag(body, "raw", False), _flag(body, "stream", True)
        context = _context(body.get("context"), server.vocab_size)
        sampling = _sampling(body)
        if not prompt:
            return loaded("response")
        tok = server.tokenizer

        def prompt_ids() -> list[int]:
            if raw:  # the client wrote the whole prompt, control tokens included
                return tok.encode(prompt, add_bos=tok.add_bos and not context, parse_special=True)
            if server.template is None:  # a model without a chat template: the prompt as it is (ollama's too)
                return tok.encode(f"{system}\n\n{prompt}" if system else prompt, add_bos=tok.add_bos and not context)
            messages = [{"role": "system", "content": system}] if system else []
            try:
                ids = server.template.render([*messages, {"role": "user", "content": prompt}])
            except MistolError as e:
                raise APIError(400, str(e)) from None
            if context and ids and ids[0] == tok.bos_id:
                ids = ids[1:]  # the context already began with it
            return ids

        ids = await run_in_threadpool(prompt_ids)
        spec = _parsed(p.parse_completion_request, {"prompt": context + ids, **sampling, **_format(body)})
        return await respond(request, spec, False, stream, started)

    @app.post("/api/embed", dependencies=auth)
    @ollama_errors
    async def embed(request: Request):
        started = time.perf_counter_ns()
        body = _object(await server.read_json(request))
        check_model(_model(body))
        value = body.get("input")
        texts = [value] if isinstance(value, str) else value
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            raise APIError(400, "input is required: a string or a list of strings")
        truncate = _flag(body, "truncate", True)
        dims = body.get("dimensions")
        if dims is not None and dims != server.engine.config.hidden_size:
            raise APIError(400, f"dimensions: this model's embeddings have {server.engine.config.hidden_size} "
                           "dimensions, and are not shortened")
        tok, context = server.tokenizer, server.scheduler.max_context

        def token_ids(i: int, text: str) -> list[int]:
            ids = tok.encode(text, add_bos=getattr(tok, "add_bos", True))
            return embedder.token_ids(ids[:context] if truncate else ids, f"input[{i}]")

        inputs = [await run_in_threadpool(token_ids, i, text) for i, text in enumerate(texts)]
        vectors = await embedder.vectors(inputs, "mean", 2)
        return {"model": server.model_id, "embeddings": [v.tolist() for v in vectors],
                "total_duration": time.perf_counter_ns() - started, "load_duration": 0,
                "prompt_eval_count": sum(len(ids) for ids in inputs)}

    @app.get("/api/tags", dependencies=auth)
    async def tags():
        return {"models": [description.entry()]}

    @app.get("/api/ps", dependencies=auth)
    async def ps():
        return {"models": [description.running()]}

    @app.post("/api/show", dependencies=auth)
    @ollama_errors
    async def show(request: Request):
        body = _object(await server.read_json(request))
        check_model(_model(body))
        return description.show()

    @app.get("/api/version")
    async def version():
        return {"version": OLLAMA_API_VERSION, "mistol": __version__}
