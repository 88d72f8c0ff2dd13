"""The HTTP side of `mistol serve`: an OpenAI-compatible API over one `Engine`.

Endpoints: GET /v1/models, POST /v1/chat/completions, POST /v1/completions, GET /health,
and the chat page at / (see web.py); POST /v1/embeddings (embeddings.py); llama.cpp's
/tokenize, /detokenize, /apply-template and /metrics (utility_routes.py); ollama's /api/...
(ollama.py). /models and /chat/completions answer at the root too, for
clients whose base URL has no /v1 (as llama.cpp's server allows); /completions does not, as
llama.cpp's own API lives there.
Handlers check the request, render the prompt, and hand a `Job` to the `Scheduler`
(whose thread owns the engine; `n` choices are `n` jobs, decoded as rows of one batch);
text comes back through an asyncio queue and leaves as
one JSON body or as server-sent events ending with `data: [DONE]`. Every error, bad input
or not, is OpenAI's `{"error": {...}}` with a fitting status, never a traceback.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import itertools
import json
import logging
import os
import secrets
from contextlib import asynccontextmanager
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path, PurePath

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..chat_template import ChatTemplate
from ..constraints import Constraint, ConstraintError, Grammars
from ..engine import Engine
from ..errors import MistolError
from ..sandbox.sandbox import SandboxLimits
from ..util import private_dir, private_file
from . import protocol as p
from .protocol import APIError, GenerationRequest
from .embeddings import add_embedding_routes
from .ollama import add_ollama_routes
from .scheduler import Job, Output, Scheduler
from .utility_routes import add_utility_routes
from .web import add_web_routes

log = logging.getLogger("mistol.server")

MAX_REMEMBERED_REPLIES = 512


@dataclass
class ServerOptions:
    model_name: str | None = None  # the id clients send as `model` (default: the engine's name)
    model_notice: str | None = None  # shown in /v1/models: what a client should know about the model
    # If set (one key, or several: one per client), every API request needs "Authorization: Bearer KEY".
    api_key: str | Sequence[str] | None = None
    # Keyless requests reuse each other's cached prompt prefixes (False: none ever does).
    # With keys, requests share cached prefixes only with requests sending the same key.
    share_prefix_cache: bool = True
    max_batch: int = 4  # requests decoded together; more wait in a queue
    prefill_chunk: int = 256  # prompt tokens run between two decode steps of the others (see scheduler.py)
    kv_dir: str | None = None  # where the prefix cache is kept across restarts (see kv_file.py)
    max_context: int | None = None  # tokens per request, prompt and reply (default: the model's)
    max_body_bytes: int = 4 << 20
    allow_code: bool = False  # the chat page may run Python blocks (POST /api/run; see web.py)
    code_limits: SandboxLimits | None = None  # for those runs (default: the terminal chat's)
    # False: any `model` (or none) is answered by the served model, named in the reply's `model`,
    # as llama.cpp's server and LM Studio do. True: a missing model is a 400, another name a 404.
    strict_model: bool = False
    # Origins whose web pages may call the API (CORS); "*" for any, allowed only with an API key.
    cors_origins: Sequence[str] = ()
    max_tokens_default: int | None = None  # when a request has no max_tokens (None: to the end of the context)


def create_app(engine: Engine, options: ServerOptions | None = None) -> FastAPI:
    options = options or ServerOptions()
    check_options(options)
    server = _Server(engine, options)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        server.scheduler.start()
        try:
            yield
        finally:
            await run_in_threadpool(server.scheduler.stop)
            if options.kv_dir is not None:
                try:
                    await run_in_threadpool(server.save_prefixes, Path(options.kv_dir))
                except (MistolError, OSError) as e:
                    log.warning("the prefix cache was not kept: %s", e)
            for close in server.on_close:
                await run_in_threadpool(close)

    app = FastAPI(title="mistol", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server
    auth = [Depends(server.authorize)]

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": server.model_id, **server.scheduler.stats()}

    async def models():
        return p.models_list(server.model_id, server.created, server.options.model_notice)

    async def model(model: str):
        server.check_model(model)
        return p.model_card(server.model_id, server.created, server.options.model_notice)

    async def chat_completions(request: Request):
        return await server.generate(request, chat=True)

    for prefix in ("/v1", ""):  # see the module's docstring
        app.get(f"{prefix}/models", dependencies=auth)(models)
        app.get(f"{prefix}/models/{{model:path}}", dependencies=auth)(model)
        app.post(f"{prefix}/chat/completions", dependencies=auth)(chat_completions)

    @app.post("/v1/completions", dependencies=auth)
    async def completions(request: Request):
        return await server.generate(request, chat=False)

    add_web_routes(app, server)
    embedder = add_embedding_routes(app, server, auth)
    add_utility_routes(app, server, auth, embedder)
    add_ollama_routes(app, server, embedder)
    if options.cors_origins:
        # Preflights are answered before authorization (a browser sends no key with them);
        # the request that follows still needs its key.
        app.add_middleware(CORSMiddleware, allow_origins=list(options.cors_origins), allow_credentials=False,
                           allow_methods=["GET", "POST"], allow_headers=["Authorization", "Content-Type"],
                           max_age=600)

    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e: StarletteHTTPException):  # unknown path, wrong method
        message = f"{request.method} {request.url.path}: {e.detail}"
        return JSONResponse(p.error_body(e.status_code, message), status_code=e.status_code,
                            headers=getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, e: RequestValidationError):
        return JSONResponse(p.error_body(400, f"invalid request: {e.errors()}"), status_code=400)

    @app.exception_handler(Exception)
    async def internal_error(request, e: Exception):
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=e)
        return JSONResponse(p.error_body(500, "internal server error"), status_code=500)

    return app


def check_options(options: ServerOptions) -> None:
    """Refuse settings that would open the server wider than its owner can have meant."""
    if "*" in options.cors_origins and not options.api_key:
        raise MistolError("--cors-origins '*' would let any web page anyone opens use this server; "
                          "set --api-key, or name the origins")
    if options.max_tokens_default is not None and options.max_tokens_default < 1:
        raise MistolError(f"--max-tokens-default must be at least 1 (got {options.max_tokens_default})")


def _weight_types(engine: Engine) -> str:
    """The kinds of tensors the weights are held in: what a quantization changes."""
    model = engine.model
    return ",".join(sorted({str(t.dtype) for t in itertools.chain(model.parameters(), model.buffers())}))


class _Server:
    def __init__(self, engine: Engine, options: ServerOptions):
        self.engine = engine
        self.options = options
        self.tokenizer = engine.tokenizer
        # A base model may have no chat template (and no ChatML tokens): it still serves
        # completions; chat requests get a 400 saying so (chat_template()).
        try:
            self.template: ChatTemplate | None = ChatTemplate.for_tokenizer(self.tokenizer)
            self.no_template = None
        except MistolError as e:
            self.template, self.no_template = None, str(e)
        self.vocab_size = min(self.tokenizer.vocab_size, engine.config.vocab_size)  # valid token ids
        self.scheduler = Scheduler(engine, max_batch=options.max_batch, max_context=options.max_context,
                                   prefill_chunk=options.prefill_chunk)
        self.model_id = options.model_name or engine.name
        self._aliases = {self.model_id, PurePath(self.model_id).name}
        self.fingerprint = p.fingerprint(__version__, self.model_id, _weight_types(engine))
        self.created = p.now()
        key = options.api_key
        self._keys = [key] if isinstance(key, str) else list(key or ())
        self.on_close: list = []  # called at shutdown, after the scheduler stops
        # Generated replies by (client, text) -> the ids the model chose: a resent conversation
        # then renders to the very tokens the session holds, so the prefix cache covers the reply.
        self._replies: collections.OrderedDict[tuple, list[int]] = collections.OrderedDict()
        self._grammars: Grammars | None = None  # the vocabulary as the constraint library sees it
        if options.kv_dir is not None:
            self.load_prefixes(Path(options.kv_dir))

    # -- the prefix cache across restarts (--kv-dir) -------------------------------------------
    def _client_label(self, client) -> str | None:
        """How a client is named on disk: its key's hash, never the key (None: not kept)."""
        if client is None and not self._keys:
            return "shared"
        if isinstance(client, tuple) and client[0] == "key":
            return "key:" + hashlib.sha256(self._keys[client[1]].encode()).hexdigest()
        return None

    def _client_of(self, label: str):
        labels = {self._client_label(c): c for c in [None, *(("key", i) for i in range(len(self._keys)))]}
        labels.pop(None, None)
        return labels[label]

    def save_prefixes(self, directory: Path) -> None:
        """At shutdown (the engine thread has stopped): the pool's sessions and the token ids
        of the replies, so that resent conversations find their prefixes after a restart."""
        private_dir(directory)
        saved = self.scheduler.pool.save(directory, self._client_label)
        replies = [[label, text, ids] for (client, text), ids in self._replies.items()
                   if (label := self._client_label(client)) is not None]
        tmp = directory / ".replies.json.tmp"
        private_file(tmp).write_text(json.dumps(replies))
        os.replace(tmp, directory / "replies.json")
        log.info("kept %d cached prefixes in %s", saved, directory)

    def load_prefixes(self, directory: Path) -> None:
        if not directory.is_dir():
            return
        for reason in self.scheduler.pool.load(directory, self._client_of):
            log.warning("prefix cache: not using %s", reason)
        try:
            replies = json.loads((directory / "replies.json").read_text())
            for label, text, ids in replies[-MAX_REMEMBERED_REPLIES:]:
                try:
                    ids = [int(i) for i in ids]
                    if all(0 <= i < self.vocab_size for i in ids):
                        self._replies[(self._client_of(label), str(text))] = ids
                except (KeyError, TypeError, ValueError):
                    continue
        except (OSError, ValueError, TypeError):
            pass  # no replies file, or a damaged one: prompts are encoded from their text

    # -- checks ------------------------------------------------------------------------------
    async def authorize(self, request: Request) -> None:
        """Check the API key, and note which client sent it (`request.state.client`, see `client_of`)."""
        if not self._keys:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        sent = token.strip().encode()
        # every key is compared, in constant time, so the timing tells nothing of which matched
        matches = [secrets.compare_digest(sent, key.encode()) for key in self._keys]
        if scheme.lower() != "bearer" or not any(matches):
            raise APIError(401, "invalid or missing API key (send the header 'Authorization: Bearer KEY')",
                           code="invalid_api_key")
        request.state.client = ("key", matches.index(True))

    def client_of(self, request: Request):
        """Whose cached prefixes (and remembered replies) a request may reuse: its key's, or
        without keys everyone's (None) or, with sharing off, nobody's (a new object)."""
        client = getattr(request.state, "client", None)
        if client is not None:
            return client
        return None if self.options.share_prefix_cache else object()

    def check_model(self, name: str) -> None:
        """A model card is only the served model's, under its id or its file name."""
        if name not in self._aliases:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {self.model_id!r}",
                           "model", "model_not_found")

    def check_requested_model(self, name: str | None) -> None:
        """Any name, or none, is answered by the served model, unless the server is strict."""
        if not self.options.strict_model:
            return
        if name is None:
            raise APIError(400, "model is required (see GET /v1/models)", "model")
        self.check_model(name)

    async def read_json(self, request: Request):
        limit = self.options.max_body_bytes
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            raise APIError(413, f"the request body ({int(length)} bytes) exceeds the limit of {limit} bytes",
                           code="request_too_large")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise APIError(413, f"the request body exceeds the limit of {limit} bytes", code="request_too_large")
        try:
            value = json.loads(body)
        except (ValueError, RecursionError) as e:
            raise APIError(400, f"the request body is not valid JSON ({e})") from None
        p.check_unicode(value)
        return value

    # -- generation ------------------------------------------------------------------------
    async def generate(self, request: Request, chat: bool):
        spec = (p.parse_chat_request if chat else p.parse_completion_request)(await self.read_json(request))
        self.check_requested_model(spec.model)
        client = self.client_of(request)
        jobs, outputs, prompt = await self.submit(spec, chat, client)
        reply = _Reply(self, spec, chat, len(prompt), client)
        if spec.stream:
            return StreamingResponse(self._stream(jobs, outputs, reply), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await self._collect(jobs, outputs, reply, request)

    async def submit(self, spec: GenerationRequest, chat: bool, client) -> tuple[list[Job], asyncio.Queue, list[int]]:
        """Render and check the prompt, and queue the request's `n` jobs: (the jobs, the queue
        their (choice index, `Output`) pairs arrive in, the prompt's ids)."""
        replies = self._known_replies(spec, client)
        prompt = await run_in_threadpool(self._prompt_ids, spec, replies)
        params = self._params(spec, prompt, chat)
        grammars = await run_in_threadpool(self._grammars_for, spec) if spec.constraint else [None] * spec.n
        for token in spec.logit_bias:
            if not 0 <= token < self.vocab_size:
                raise APIError(400, f"logit_bias: token id {token} is outside the vocabulary", "logit_bias")

        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue[tuple[int, Output]] = asyncio.Queue()  # (choice index, output)

        def job_for(index: int) -> Job:
            def deliver(out: Output) -> None:
                loop.call_soon_threadsafe(outputs.put_nowait, (index, out))

            return Job(prompt, _choice_params(params, index), deliver, logprobs=spec.logprobs,
                       frequency_penalty=spec.frequency_penalty, presence_penalty=spec.presence_penalty,
                       logit_bias=spec.logit_bias, client=client, grammar=grammars[index])

        # n choices are n jobs: the scheduler decodes them together, rows of one batch
        jobs = [job_for(i) for i in range(spec.n)]
        for submitted, job in enumerate(jobs):
            if not self.scheduler.submit(job):
                for earlier in jobs[:submitted]:
                    earlier.cancel()
                raise APIError(503, "the server is busy (too many queued requests); retry later",
                               code="server_busy")
        return jobs, outputs, prompt

    def _grammars_for(self, spec: GenerationRequest) -> list:
        """The request's constraint compiled for this model's vocabulary, one walk of it per choice;
        a 400 saying what is wrong with it."""
        if self._grammars is None:
            self._grammars = Grammars(self.tokenizer)
        field, constraint = spec.constraint_field, spec.constraint
        try:
            if field == "tools":  # the calls as the model's own tool format writes them
                constraint = Constraint("lark", self.chat_template().tool_format.grammar(
                    spec.tools, spec.tool_choice, spec.parallel_tool_calls))
            grammar = self._grammars.compile(constraint)
            return [self._grammars.start(grammar) for _ in range(spec.n)]
        except ConstraintError as e:
            raise APIError(400, f"{field}: {e}", field, "invalid_constraint") from None

    def _known_replies(self, spec: GenerationRequest, client) -> dict[str, list[int]]:
        """The remembered ids of this conversation's assistant messages (exact texts only),
        among the replies this client was given."""
        if spec.messages is None:
            return {}
        texts = {m["content"] for m in spec.messages if m["role"] == "assistant"}
        return {t: list(self._replies[client, t]) for t in texts if (client, t) in self._replies}

    def offered_tools(self, spec: GenerationRequest) -> list:
        """The tools the prompt shows (the template writes them, and the calls and results of
        earlier turns, in the model's tool format; see tools.py)."""
        return spec.tools if spec.tool_choice != "none" else []

    def _prompt_ids(self, spec: GenerationRequest, replies: dict[str, list[int]]) -> list[int]:
        if spec.messages is not None:
            try:
                return self.chat_template().render(spec.messages, add_generation_prompt=spec.add_generation_prompt,
                                                   continue_last=spec.continue_final_message, reply_tokens=replies,
                                                   tools=self.offered_tools(spec))
            except MistolError as e:
                raise APIError(400, f"messages: {e}", "messages") from None
        if isinstance(spec.prompt, list):
            vocab = self.vocab_size
            bad = next((t for t in spec.prompt if not 0 <= t < vocab), None)
            if bad is not None:
                raise APIError(400, f"prompt: token id {bad} is outside the vocabulary of {vocab}", "prompt")
            return list(spec.prompt)
        return self.tokenizer.encode(spec.prompt, add_bos=self.tokenizer.add_bos)  # SmolLM2 and Qwen put no BOS first

    def _params(self, spec: GenerationRequest, prompt: list[int], chat: bool):
        context, n = self.scheduler.max_context, len(prompt)
        where = "messages" if chat else "prompt"
        if n == 0:
            raise APIError(400, "the prompt is empty", where)
        if spec.max_tokens is None and n >= context:
            raise APIError(400, f"the prompt ({n} tokens) leaves no room for a reply in the context of "
                           f"{context} tokens", where, "context_length_exceeded")
        max_tokens = spec.max_tokens
        if max_tokens is None:  # the server's default, cut to what the context leaves
            max_tokens = min(self.options.max_tokens_default or context, context - n)
        if n + max_tokens > context:
            raise APIError(
                400,
                f"the prompt ({n} tokens) plus max_tokens ({max_tokens}) exceeds the context of {context} tokens",
                "max_tokens" if spec.max_tokens is not None else where, "context_length_exceeded",
            )
        stop_ids = [] if spec.ignore_eos else self.stop_ids(chat)
        return replace(spec.params, max_tokens=max_tokens, stop_token_ids=stop_ids)

    def stop_ids(self, chat: bool) -> list[int]:
        """What ends a reply: where the chat template ends a turn; for a completion, as
        `mistol generate`, the tokenizer's EOS and the model's."""
        if chat:
            return self.chat_template().stop_ids
        ids = (self.tokenizer.eos_id, self.engine.config.eos_token_id)
        return sorted({i for i in ids if i is not None})

    def chat_template(self) -> ChatTemplate:
        """The model's chat template; for a model without one, a 400 that says what it serves."""
        if self.template is None:
            raise APIError(400, f"{self.no_template}, so this server answers completions only "
                                "(/v1/completions, /api/generate), not chat", "messages", "no_chat_template")
        return self.template

    def remember(self, client, text: str, token_ids: list[int]) -> None:
        ids = [t for t in token_ids if t not in self.chat_template().stop_ids]
        if not ids or self.tokenizer.decode(ids) != text:
            return  # e.g. cut by a stop string: the next turn encodes the text
        self._replies[client, text] = ids
        self._replies.move_to_end((client, text))
        while len(self._replies) > MAX_REMEMBERED_REPLIES:
            self._replies.popitem(last=False)

    async def _collect(self, jobs: list[Job], outputs: asyncio.Queue, reply: "_Reply", request: Request):
        async def gather() -> Output | None:
            """None once every choice is finished; the first failed output if one fails."""
            while not reply.done:
                index, out = await outputs.get()
                reply.add(index, out)
                if out.error is not None:
                    return out
            return None

        async def disconnected() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass

        waiter, watcher = asyncio.ensure_future(gather()), asyncio.ensure_future(disconnected())
        try:
            await asyncio.wait({waiter, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for job in jobs:
                job.cancel()  # a no-op once finished; frees the slot if the client left
            watcher.cancel()
            waiter.cancel()
        if not waiter.done() or waiter.cancelled():
            return JSONResponse(p.error_body(499, "client closed the request"), status_code=499)
        failed = waiter.result()
        if failed is not None:
            return JSONResponse(p.error_body(500, failed.error), status_code=500)
        return reply.response()

    async def _stream(self, jobs: list[Job], outputs: asyncio.Queue, reply: "_Reply"):
        try:
            if reply.chat:
                for index in range(reply.spec.n):
                    yield reply.sse(reply.chunk(index, delta={"role": "assistant", "content": ""}))
            while not reply.done:
                index, out = await outputs.get()
                reply.add(index, out)
                if out.error is not None:
                    yield reply.sse(p.error_body(500, out.error))
                    break
                if reply.parsers is not None:  # tools: text or calls, as the parser reads them
                    for delta in reply.tool_deltas(index, out.text, out.finish_reason is not None):
                        yield reply.sse(reply.chunk(index, delta=delta))
                elif out.text or out.logprobs:
                    yield reply.sse(reply.chunk(index, text=out.text, logprobs=out.logprobs))
                if out.finish_reason is not None:
                    yield reply.sse(reply.chunk(index, text="", finish_reason=reply.finish_reason(index), final=True))
            else:
                if reply.spec.include_usage:
                    yield reply.sse(reply.usage_chunk())
            yield "data: [DONE]\n\n"
        finally:
            for job in jobs:
                job.cancel()  # the client went away (or we are done): free the slots


def _choice_params(params, index: int):
    """Choice i of a seeded request samples with seed + i: the choices differ, and each is
    reproducible (choice 0 is what the same request with n = 1 gives)."""
    if index == 0 or params.seed is None:
        return params
    seed = params.seed + index
    return replace(params, seed=seed if seed < 2**64 else seed - 2**64)


class _Reply:
    """One response being built: its id, each choice's text so far, and its JSON shapes."""

    def __init__(self, server: _Server, spec: GenerationRequest, chat: bool, prompt_tokens: int, client=None):
        self.server, self.spec, self.chat, self.client = server, spec, chat, client
        self.id = p.new_id("chatcmpl" if chat else "cmpl")
        self.created = p.now()
        self.texts = [""] * spec.n
        self.logprobs = [[] for _ in range(spec.n)]
        self.last: list[Output | None] = [None] * spec.n  # each choice's final output
        self.prompt_tokens = prompt_tokens
        # with tools, each choice's text read into content and calls
        self.parsers = None
        if chat and spec.tool_choice != "none":
            self.parsers = [server.chat_template().tool_format.parser() for _ in range(spec.n)]

    @property
    def done(self) -> bool:
        return all(last is not None for last in self.last)

    def add(self, index: int, out: Output) -> None:
        self.texts[index] += out.text
        self.logprobs[index] += out.logprobs
        if out.finish_reason is not None:
            self.last[index] = out
        if out.finish_reason in ("stop", "length") and self.chat:
            self.server.remember(self.client, self.texts[index], out.token_ids)

    def finish_reason(self, index: int) -> str:
        reason = self.last[index].finish_reason
        if self.parsers is not None and reason == "stop" and self.parsers[index].calls:
            return "tool_calls"
        return reason

    def tool_deltas(self, index: int, text: str, final: bool) -> list[dict]:
        """Stream deltas for new text of a choice with tools: content, or calls as OpenAI streams
        them (the call's id and name first, then pieces of its arguments)."""
        parser = self.parsers[index]
        events = parser.feed(text) + (parser.finish() if final else [])
        deltas = []
        for event in events:
            if event[0] == "content":
                deltas.append({"content": event[1]})
            elif event[0] == "call":
                deltas.append({"tool_calls": [p.tool_call(parser.calls[event[1]], event[1], "")]})
            else:
                deltas.append({"tool_calls": [{"index": event[1], "function": {"arguments": event[2]}}]})
        return deltas

    def _usage(self) -> dict:
        """As OpenAI counts: the prompt once, the completion tokens of every choice."""
        first = self.last[0]
        return p.usage(first.prompt_tokens, sum(last.completion_tokens for last in self.last), first.cached_tokens)

    def _logprobs(self, items, offset: int = 0):
        if self.spec.logprobs is None:
            return None
        return p.chat_logprobs(items) if self.chat else p.completion_logprobs(items, offset)

    def response(self) -> dict:
        choice = p.chat_choice if self.chat else p.completion_choice
        build = p.chat_response if self.chat else p.completion_response
        choices = [choice(i, self.texts[i], last.finish_reason, self._logprobs(self.logprobs[i]))
                   for i, last in enumerate(self.last)]
        if self.parsers is not None:
            for i, parser in enumerate(self.parsers):
                parser.feed(self.texts[i])
                parser.finish()
                calls = [p.tool_call(c) for c in parser.calls]
                choices[i] = p.chat_choice(i, None if calls else parser.content, self.finish_reason(i),
                                           choices[i]["logprobs"], calls)
        return build(self.id, self.created, self.server.model_id, choices, self._usage(), self.server.fingerprint)

    def chunk(self, index: int, delta: dict | None = None, text: str = "", logprobs=(), finish_reason=None,
              final=False) -> dict:
        model, inc, fp = self.server.model_id, self.spec.include_usage, self.server.fingerprint
        lp = self._logprobs(list(logprobs), len(self.texts[index]) - len(text)) if logprobs else None
        if self.chat:
            delta = delta if delta is not None else ({} if final else {"content": text})
            return p.chat_chunk(self.id, self.created, model, delta, finish_reason, lp, None, inc, fp, index)
        return p.completion_chunk(self.id, self.created, model, text, finish_reason, lp, None, inc, fp, index)

    def usage_chunk(self) -> dict:
        build = p.chat_chunk if self.chat else p.completion_chunk
        return build(self.id, self.created, self.server.model_id, None, use=self._usage(), include_usage=True,
                     fingerprint=self.server.fingerprint)

    @staticmethod
    def sse(event: dict) -> str:
        return f"data: {json.dumps(event, ensure_ascii=False, separators=(',', ':'))}\n\n"
