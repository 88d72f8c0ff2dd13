"""The OpenAI wire format: request bodies checked into our types, and the response shapes.

Requests are validated by hand rather than by a schema library so that every rejection is
an OpenAI-shaped 400 naming the offending field (`param`), never a framework's 422 or a
500. Fields a client may send that we do not implement are ignored when they hold their
default (`tools: []`, `mirostat: 0`) and refused otherwise: silently ignoring them would
return something other than what was asked for (see fields.py, which also reads output
constraints and llama.cpp's names for our fields).

Text must be Unicode: a lone surrogate ("\\ud800", which JSON can spell but UTF-8 cannot
hold) anywhere in a body is refused with a 400 naming where it is, rather than replaced,
so that the model never answers a text other than the one sent.

Unset sampling fields take mistol's defaults (temperature 0.8, top_k 40, top_p 0.95,
min_p 0.05; the same as `mistol chat` and llama.cpp's server), not OpenAI's 1.0/1.0.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass, field, replace
from typing import Any

from ..constraints import Constraint
from ..errors import MistolError
from ..sampling import SamplingParams
from ..tools import Tool, grammar as tool_grammar
from . import fields
from .errors import APIError, error_body  # noqa: F401 - part of this module's interface

MAX_STOP_STRINGS = 16
MAX_CHOICES = 16  # `n`: each choice is a row of the batch, with its own KV cache
MAX_TOP_LOGPROBS = 20
# Below this, logits / temperature overflow float32 and sampling would see inf and NaN; such
# a temperature samples as what it approaches: the most likely token.
MIN_TEMPERATURE = 1e-3
MIN_REPETITION_PENALTY = 0.01  # likewise: logits / penalty must stay finite


# -- requests ---------------------------------------------------------------------------------
@dataclass
class GenerationRequest:
    """A chat or text completion request, checked. Exactly one of `messages`/`prompt` is set."""

    model: str | None  # None: not given (the served model answers; see ServerOptions.strict_model)
    params: SamplingParams  # max_tokens and stop_token_ids are filled in once the prompt is known
    max_tokens: int | None  # None: as many as the context leaves
    stream: bool = False
    include_usage: bool = False
    logprobs: int | None = None  # None: off; else how many top alternatives per token
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    ignore_eos: bool = False  # extension (as in vLLM): generate max_tokens, for benchmarks
    n: int = 1  # choices, sampled independently from the same prompt
    messages: list[dict] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    prompt: str | list[int] | None = None
    constraint: Constraint | None = None  # what the output must match (JSON schema, regex, grammar)
    constraint_field: str | None = None  # the field that asked for it
    tools: list[Tool] = field(default_factory=list)  # offered to the model (chat only)
    tool_choice: str = "none"  # "none", "auto", "required", or a tool's name
    parallel_tool_calls: bool = True


def check_unicode(body: Any) -> None:
    """Refuse a parsed body holding a lone surrogate in any string or key (see the module's docstring)."""
    stack = [(body, "")]
    while stack:  # a loop, not recursion: the nesting depth is the client's to choose
        value, where = stack.pop()
        if isinstance(value, str):
            _check_string(value, where or "the request body")
        elif isinstance(value, list):
            stack.extend((v, f"{where}[{i}]") for i, v in enumerate(value))
        elif isinstance(value, dict):
            for key, v in value.items():
                _check_string(key, f"a key of {where or 'the request body'}")
                stack.append((v, f"{where}.{key}" if where else key))


def _check_string(text: str, where: str) -> None:
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        char = text[e.start]
        raise APIError(400, f"{where}: contains a lone surrogate ({ascii(char)[1:-1]}) at character {e.start}, "
                       "which is not valid Unicode text", where if not where.startswith(("a key", "the ")) else None,
                       "invalid_unicode") from None


def parse_chat_request(body: Any) -> GenerationRequest:
    body = _object(body)
    messages = _messages(body.get("messages"))
    logprobs = _bool(body, "logprobs", False)
    top = _int(body, "top_logprobs", None, 0, MAX_TOP_LOGPROBS)
    if top and not logprobs:
        raise APIError(400, "top_logprobs requires logprobs to be true", "top_logprobs")
    continue_final = _bool(body, "continue_final_message", False)
    if continue_final and _bool(body, "add_generation_prompt", False):
        # one opens a new assistant turn, the other extends the last one: no prompt does both
        raise APIError(400, "add_generation_prompt and continue_final_message cannot both be true: the first "
                       "starts a new assistant message, the second continues the last one", "continue_final_message")
    if continue_final and messages[-1]["role"] != "assistant":
        raise APIError(400, "continue_final_message needs the last message to be the assistant's", "messages")
    max_tokens = _int(body, "max_completion_tokens", None, 1)
    if max_tokens is None:
        max_tokens = _int(body, "max_tokens", None, 1)
    common = _common(body)
    tools, choice = _tools(body.get("tools")), _tool_choice(body.get("tool_choice"))
    if choice is None:
        choice = "auto" if tools else "none"
    if choice != "none":
        if not tools:
            raise APIError(400, f"tool_choice {choice!r} needs tools", "tool_choice")
        if common["constraint"] is not None:
            raise APIError(400, f"{common['constraint_field']} cannot be combined with tools (set tool_choice "
                           "to \"none\" for a constrained answer)", common["constraint_field"])
        try:
            # the Hermes grammar checks the choice here; the server writes the model's own (app.py)
            lark = tool_grammar(tools, choice, _bool(body, "parallel_tool_calls", True))
        except MistolError as e:
            raise APIError(400, str(e), "tool_choice") from None
        common.update(constraint=Constraint("lark", lark), constraint_field="tools")
    return GenerationRequest(
        **common,
        tools=tools,
        tool_choice=choice,
        parallel_tool_calls=_bool(body, "parallel_tool_calls", True),
        max_tokens=fields.max_tokens(body, max_tokens),
        logprobs=(top or 0) if logprobs else None,
        messages=messages,
        add_generation_prompt=_bool(body, "add_generation_prompt", True),
        continue_final_message=continue_final,
    )


def parse_completion_request(body: Any) -> GenerationRequest:
    body = _object(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, list):
        if not prompt or not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            raise APIError(400, "prompt must be a string or a list of token ids (one prompt per request)", "prompt")
    elif not isinstance(prompt, str):
        raise APIError(400, "prompt is required: a string or a list of token ids", "prompt")
    if _bool(body, "echo", False):
        raise APIError(400, "echo is not supported", "echo")
    if body.get("suffix"):
        raise APIError(400, "suffix is not supported", "suffix")
    for key in ("tools", "tool_choice"):
        if body.get(key) not in (None, [], "none"):
            raise APIError(400, f"{key}: tools are for chat completions (/v1/chat/completions)", key)
    common = _common(body)
    if _int(body, "best_of", common["n"], 1) != common["n"]:
        raise APIError(400, "best_of must be left out, or equal n (choices are not ranked)", "best_of")
    max_tokens = _int(body, "max_tokens", None, 1)
    return GenerationRequest(
        **common,
        max_tokens=fields.max_tokens(body, max_tokens),
        logprobs=_int(body, "logprobs", None, 0, MAX_TOP_LOGPROBS),
        prompt=prompt,
    )


def _common(body: dict) -> dict:
    fields.refuse_unsupported(body)
    model = body.get("model")
    if model == "":
        model = None
    if model is not None and not isinstance(model, str):
        raise APIError(400, "model must be a string (see GET /v1/models)", "model")
    n = _int(body, "n", 1, 1, MAX_CHOICES)
    d = SamplingParams()
    params = SamplingParams(
        temperature=_temperature(_float(body, "temperature", d.temperature, 0.0, 2.0)),
        top_p=_float(body, "top_p", d.top_p, 0.0, 1.0, low_open=True),
        top_k=_int(body, "top_k", d.top_k, 0),
        min_p=_float(body, "min_p", d.min_p, 0.0, 1.0),
        repetition_penalty=_float(body, "repetition_penalty" if "repetition_penalty" in body else "repeat_penalty",
                                  d.repetition_penalty, MIN_REPETITION_PENALTY, 10.0),
        seed=_int(body, "seed", None, -(2**63), 2**64 - 1),  # what torch.Generator accepts
        stop=_stop(body.get("stop")),
    )
    frequency_penalty = _float(body, "frequency_penalty", 0.0, -2.0, 2.0)
    presence_penalty = _float(body, "presence_penalty", 0.0, -2.0, 2.0)
    active = {"temperature": params.temperature != 1.0, "top_k": params.top_k != 0, "top_p": params.top_p != 1.0,
              "min_p": params.min_p != 0.0}
    penalized = params.repetition_penalty != 1.0 or frequency_penalty != 0.0 or presence_penalty != 0.0
    chosen = fields.sampler_order(body, active, penalized)  # llama.cpp's `samplers`
    if chosen is not None:
        order, penalties = chosen
        params = replace(params, order=order)
        if not penalties:
            params = replace(params, repetition_penalty=1.0)
            frequency_penalty = presence_penalty = 0.0
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise APIError(400, "stream_options must be an object", "stream_options")
    return dict(
        model=model,
        params=params,
        stream=_bool(body, "stream", False),
        include_usage=bool(options and _bool(options, "include_usage", False, "stream_options.include_usage")),
        frequency_penalty=frequency_penalty,
        presence_penalty=presence_penalty,
        logit_bias=_logit_bias(body.get("logit_bias")),
        ignore_eos=_bool(body, "ignore_eos", False),
        n=n,
        **dict(zip(("constraint_field", "constraint"), fields.constraint(body) or (None, None))),
    )


def _temperature(value: float) -> float:
    return value if value >= MIN_TEMPERATURE else 0.0


def _object(body: Any) -> dict:
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    return body


def _messages(value: Any) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise APIError(400, "messages is required: a non-empty list of {role, content} objects", "messages")
    out = []
    for i, m in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise APIError(400, f"{where} must be an object with role and content", where)
        role = m.get("role")
        if role == "developer":  # OpenAI's newer name for the system role
            role = "system"
        if role not in ("system", "user", "assistant", "tool"):
            raise APIError(400, f"{where}.role must be system, user, assistant or tool (got {role!r})",
                           f"{where}.role")
        calls = _tool_calls(m.get("tool_calls"), f"{where}.tool_calls") if role == "assistant" else []
        content = m.get("content")
        if calls and content is None:
            content = ""  # an assistant turn that only calls tools
        message = {"role": role, "content": _content(content, f"{where}.content")}
        if calls:
            message["tool_calls"] = calls
        if role == "tool":
            message["tool_call_id"] = m.get("tool_call_id")
        out.append(message)
    return out


def _tools(value: Any) -> list[Tool]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise APIError(400, "tools must be a list of {type: function, function: {name, parameters}}", "tools")
    tools, names = [], set()
    for i, entry in enumerate(value):
        where = f"tools[{i}]"
        if not (isinstance(entry, dict) and entry.get("type", "function") == "function"
                and isinstance(entry.get("function"), dict)):
            raise APIError(400, f"{where} must be {{type: function, function: {{name, parameters}}}}", "tools")
        fn = entry["function"]
        name, params, text = fn.get("name"), fn.get("parameters", {"type": "object"}), fn.get("description", "")
        if not isinstance(params, dict) or not isinstance(text, str):
            raise APIError(400, f"{where}.function: parameters must be a JSON schema, description a string", "tools")
        try:
            tools.append(Tool(name if isinstance(name, str) else repr(name), text, params))
        except MistolError as e:
            raise APIError(400, f"{where}.function.name: {e}", "tools") from None
        if name in names:
            raise APIError(400, f"{where}: two tools are named {name!r}", "tools")
        names.add(name)
    return tools


def _tool_choice(value: Any) -> str | None:
    if value is None or value in ("none", "auto", "required"):
        return value
    if isinstance(value, dict) and isinstance(value.get("function"), dict) \
            and isinstance(value["function"].get("name"), str):
        return value["function"]["name"]
    raise APIError(400, "tool_choice must be none, auto, required or {type: function, function: {name}}",
                   "tool_choice")


def _tool_calls(value: Any, where: str) -> list[dict]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise APIError(400, f"{where} must be a list", where)
    calls = []
    for j, call in enumerate(value):
        fn = call.get("function") if isinstance(call, dict) else None
        if not (isinstance(fn, dict) and isinstance(fn.get("name"), str) and isinstance(fn.get("arguments", ""), str)):
            raise APIError(400, f"{where}[{j}] must be {{id, type: function, function: {{name, arguments}}}}",
                           f"{where}[{j}]")
        calls.append({"id": call.get("id"), "name": fn["name"], "arguments": fn.get("arguments", "")})
    return calls


def _content(value: Any, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = []
        for j, part in enumerate(value):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise APIError(400, f"{where}[{j}]: only text parts are supported (got {kind!r})", f"{where}[{j}]")
            texts.append(part["text"])
        return "\n".join(texts)
    raise APIError(400, f"{where} must be a string or a list of text parts", where)


def _stop(value: Any) -> list[str]:
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise APIError(400, "stop must be a string or a list of strings", "stop")
    if len(stops) > MAX_STOP_STRINGS:
        raise APIError(400, f"stop: at most {MAX_STOP_STRINGS} strings (got {len(stops)})", "stop")
    return [s for s in stops if s]


def _logit_bias(value: Any) -> dict[int, float]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise APIError(400, "logit_bias must be an object mapping token ids to biases", "logit_bias")
    out = {}
    for key, bias in value.items():
        try:
            token = int(key)
        except ValueError:
            raise APIError(400, f"logit_bias: {key!r} is not a token id", "logit_bias") from None
        if not _is_number(bias) or not -100 <= bias <= 100:
            raise APIError(400, f"logit_bias[{key}] must be a number in [-100, 100]", "logit_bias")
        out[token] = float(bias)
    return out


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v  # not NaN


def _float(body: dict, key: str, default, lo: float, hi: float, low_open: bool = False):
    v = body.get(key)
    if v is None:
        return default
    if not _is_number(v) or v > hi or v < lo or (low_open and v == lo):
        left = "(" if low_open else "["
        raise APIError(400, f"{key} must be a number in {left}{lo:g}, {hi:g}] (got {v!r})", key)
    return float(v)


def _int(body: dict, key: str, default, lo: int | None = None, hi: int | None = None):
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if not isinstance(v, int) or isinstance(v, bool) or (lo is not None and v < lo) or (hi is not None and v > hi):
        bounds = f" >= {lo}" if hi is None and lo is not None else f" in [{lo}, {hi}]" if hi is not None else ""
        raise APIError(400, f"{key} must be an integer{bounds} (got {v!r})", key)
    return v


def _bool(body: dict, key: str, default: bool, param: str | None = None) -> bool:
    v = body.get(key)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise APIError(400, f"{param or key} must be true or false (got {v!r})", param or key)
    return v


# -- responses --------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    """`cached_tokens`: prompt tokens whose keys and values were already in a session's cache
    (the rest, prompt_tokens - cached_tokens, ran through the model)."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def models_list(model_id: str, created: int, notice: str | None = None) -> dict:
    return {"object": "list", "data": [model_card(model_id, created, notice)]}


def fingerprint(version: str, model_id: str, weight_types: str) -> str:
    """`system_fingerprint`: changes when mistol or the served weights (name, quantization) change,
    which is what tells a client that the same request and seed may now answer differently."""
    digest = hashlib.sha256(f"{model_id}\0{weight_types}".encode()).hexdigest()[:10]
    return f"mistol-{version}-{digest}"


def model_card(model_id: str, created: int, notice: str | None = None) -> dict:
    """OpenAI's model object; `notice`: what a client should know about this model."""
    card = {"id": model_id, "object": "model", "created": created, "owned_by": "mistol"}
    if notice:
        card["notice"] = notice
    return card


def chat_choice(index: int, text: str | None, finish_reason, logprobs, tool_calls: list[dict] | None = None) -> dict:
    message = {"role": "assistant", "content": text, "refusal": None}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish_reason}


def tool_call(call, index: int | None = None, arguments: str | None = None) -> dict:
    """A call in a message (index None) or the first delta of a streamed one (arguments "")."""
    out = {"id": call.id, "type": "function",
           "function": {"name": call.name, "arguments": call.arguments if arguments is None else arguments}}
    return out if index is None else {"index": index, **out}


def chat_response(rid, created, model, choices: list[dict], use, fingerprint=None) -> dict:
    return {
        "id": rid, "object": "chat.completion", "created": created, "model": model,
        "system_fingerprint": fingerprint, "choices": choices, "usage": use,
    }


def chat_chunk(rid, created, model, delta: dict | None, finish_reason=None, logprobs=None,
               use: dict | None = None, include_usage: bool = False, fingerprint=None, index: int = 0) -> dict:
    """delta None: the usage-only chunk that ends a stream with include_usage."""
    chunk = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
             "system_fingerprint": fingerprint,
             "choices": [] if delta is None else
             [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}]}
    if include_usage:
        chunk["usage"] = use
    return chunk


def completion_choice(index: int, text: str, finish_reason, logprobs) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def completion_response(rid, created, model, choices: list[dict], use, fingerprint=None) -> dict:
    return {
        "id": rid, "object": "text_completion", "created": created, "model": model,
        "system_fingerprint": fingerprint, "choices": choices, "usage": use,
    }


def completion_chunk(rid, created, model, text: str | None, finish_reason=None, logprobs=None,
                     use: dict | None = None, include_usage: bool = False, fingerprint=None,
                     index: int = 0) -> dict:
    chunk = {"id": rid, "object": "text_completion", "created": created, "model": model,
             "system_fingerprint": fingerprint,
             "choices": [] if text is None else
             [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}]}
    if include_usage:
        chunk["usage"] = use
    return chunk


# Log-probabilities. A `TokenLogprob` (from the scheduler) carries token strings already.
def chat_logprobs(items) -> dict:
    def entry(token, logprob):
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

    return {
        "content": [
            {**entry(t.token, t.logprob), "top_logprobs": [entry(tok, lp) for tok, lp in t.top]}
            for t in items
        ],
        "refusal": None,
    }


def completion_logprobs(items, text_offset: int = 0) -> dict:
    """The legacy completions shape; offsets count characters of the token strings."""
    offsets, at = [], text_offset
    for t in items:
        offsets.append(at)
        at += len(t.token)
    return {
        "tokens": [t.token for t in items],
        "token_logprobs": [t.logprob for t in items],
        "top_logprobs": [dict(t.top) for t in items],
        "text_offset": offsets,
    }
