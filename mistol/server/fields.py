"""Request fields beyond OpenAI's core: output constraints, llama.cpp's names, and the rest.

Constraints. One per request, from any of: OpenAI's `response_format` (`json_object`, or
`json_schema` with its `schema`), llama.cpp's top-level `json_schema` and `grammar` (GBNF),
vLLM's `guided_json`/`guided_regex`/`guided_grammar`/`guided_choice`, and `regex`. A client that
asks for constrained output never gets unconstrained text: a constraint we cannot honour is a 400.

llama.cpp's names for fields we have: `n_predict` (-1: no limit) is `max_tokens` (and, as
in llama.cpp, wins over it), `repeat_penalty` is `repetition_penalty`.

Refused. Fields that would change the output and that mistol does not implement are refused
with a 400 naming them, unless they hold their neutral value (`mirostat: 0`, `typical_p: 1`):
answering without them would be answering another request. The settings of such a sampler
(`GATED`: `mirostat_tau`...) do nothing while it is off, and fields that are mere hints
(`HINTS`: `cache_prompt`...) change nothing in the text: both are accepted and ignored.
"""

from __future__ import annotations

import json
import re
from typing import Any

from ..constraints import Constraint
from .errors import APIError

# field -> its neutral value(s): the value that asks for nothing (a field at it is accepted)
REFUSED: dict[str, tuple] = {
    # llama.cpp's samplers that mistol does not have
    "mirostat": (0,), "typical_p": (1,), "tfs_z": (1,), "dynatemp_range": (0,), "xtc_probability": (0,),
    "dry_multiplier": (0,), "top_n_sigma": (-1,), "min_keep": (0,), "adaptive_target": (), "adaptive_decay": (),
    "penalize_nl": (False,), "samplers": (), "grammar_lazy": (False,), "grammar_triggers": ([],),
    # llama.cpp's fields that change the reply's length or shape
    "n_probs": (0,), "n_indent": (0,), "n_discard": (0,), "n_cmpl": (1,), "t_max_predict_ms": (0, -1),
    "t_max_prompt_ms": (0, -1), "post_sampling_probs": (False,), "timings_per_token": (False,),
    "return_tokens": (False,), "return_progress": (False,), "verbose": (False,), "response_fields": ([],),
    "lora": ([],), "image_data": ([],), "multimodal_data": ([],),
    # OpenAI's that ask for more than text
    "functions": ([],), "function_call": ("none",), "audio": (),
    "modalities": (["text"],), "reasoning_effort": (), "web_search_options": (), "verbosity": (),
}
# Settings of a sampler above, which do nothing while it is off (and it is refused when on).
GATED = ("mirostat_tau", "mirostat_eta", "xtc_threshold", "dry_base", "dry_allowed_length", "dry_penalty_last_n",
         "dry_sequence_breakers", "dynatemp_exponent")
# Accepted and ignored: they change nothing in the generated text.
HINTS = ("cache_prompt", "id_slot", "n_keep", "n_cache_reuse", "sse_ping_interval", "backend_sampling",
         "preserved_tokens", "chat_format", "chat_parser", "reasoning_format", "parse_tool_calls", "user",
         "metadata", "store", "service_tier", "parallel_tool_calls", "prediction", "safety_identifier",
         "prompt_cache_key")

_CONSTRAINT_FIELDS = ("response_format", "json_schema", "grammar", "regex", "guided_json", "guided_regex",
                      "guided_grammar", "guided_choice")


def refuse_unsupported(body: dict) -> None:
    """A 400 for the first field in `REFUSED` that holds anything but its neutral value."""
    for key, neutral in REFUSED.items():
        if key in body and body[key] is not None and not any(_same(body[key], v) for v in neutral):
            raise APIError(400, f"{key} is not supported by this server (it would change the output; "
                           f"leave it out, or set it to {json.dumps(neutral[0]) if neutral else 'null'})",
                           key, "unsupported_parameter")
    # mistol's repetition penalty covers the whole context, as llama.cpp's repeat_last_n = -1
    last_n = body.get("repeat_last_n")
    penalty = body.get("repetition_penalty", body.get("repeat_penalty"))
    if last_n not in (None, -1) and penalty not in (None, 1, 1.0):
        raise APIError(400, "repeat_last_n: the repetition penalty here covers the whole context; "
                       "leave repeat_last_n out or set it to -1", "repeat_last_n", "unsupported_parameter")


def _same(value, neutral) -> bool:
    """JSON equality, without Python's True == 1."""
    return value == neutral and isinstance(value, bool) == isinstance(neutral, bool)


def max_tokens(body: dict, given: int | None) -> int | None:
    """max_tokens as llama.cpp reads it: its `n_predict`, when present, wins over `given`
    (-1: no limit, None as max_tokens)."""
    v = body.get("n_predict")
    if v is None:
        return given
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if not isinstance(v, int) or isinstance(v, bool) or v < -1 or v == 0:
        raise APIError(400, f"n_predict must be -1 (no limit) or an integer >= 1 (got {v!r})", "n_predict")
    return None if v == -1 else v


def constraint(body: dict) -> tuple[str, Constraint] | None:
    """The one constraint a request asks for, with the field that asked, or None."""
    found = []
    fmt = body.get("response_format")
    if fmt is not None:
        c = _response_format(fmt)
        if c is not None:
            found.append(("response_format", c))
    for key in ("json_schema", "guided_json"):
        if body.get(key) is not None:
            schema = body[key]
            if not isinstance(schema, (dict, bool)):
                raise APIError(400, f"{key} must be a JSON schema (an object)", key)
            found.append((key, Constraint("json_schema", schema)))
    for key, kind in (("grammar", "grammar"), ("guided_grammar", "grammar"), ("regex", "regex"),
                      ("guided_regex", "regex")):
        value = body.get(key)
        if value is None or value == "":
            continue  # llama.cpp sends grammar: "" for none
        if not isinstance(value, str):
            raise APIError(400, f"{key} must be a string", key)
        found.append((key, Constraint(kind, value)))
    choices = body.get("guided_choice")
    if choices is not None:
        if not (isinstance(choices, list) and choices and all(isinstance(c, str) for c in choices)):
            raise APIError(400, "guided_choice must be a non-empty list of strings", "guided_choice")
        found.append(("guided_choice", Constraint("regex", "|".join(_literal(c) for c in choices))))
    if len(found) > 1:
        names = " and ".join(k for k, _ in found)
        raise APIError(400, f"{names}: at most one output constraint per request", found[1][0])
    return found[0] if found else None


def _response_format(fmt: Any) -> Constraint | None:
    if not isinstance(fmt, dict):
        raise APIError(400, "response_format must be an object with a type", "response_format")
    kind = fmt.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return Constraint("json_object")
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict):
            raise APIError(400, "response_format.json_schema must be an object with a schema",
                           "response_format.json_schema")
        schema = spec.get("schema")
        if not isinstance(schema, (dict, bool)):
            raise APIError(400, "response_format.json_schema.schema must be a JSON schema (an object)",
                           "response_format.json_schema.schema")
        return Constraint("json_schema", schema)
    raise APIError(400, f"response_format.type must be text, json_object or json_schema (got {kind!r})",
                   "response_format.type")


def _literal(text: str) -> str:
    """A regex matching exactly `text` (llguidance's regex syntax is Rust's)."""
    return "(" + re.sub(r"([\\.+*?()|\[\]{}^$#&\-~])", r"\\\1", text) + ")"
