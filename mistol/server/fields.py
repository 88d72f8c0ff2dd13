"""Request fields beyond OpenAI's core: output constraints, llama.cpp's names, and the rest.

Constraints. One per request, from any of: OpenAI's `response_format` (`json_object`, or
`json_schema` with its `schema`), llama.cpp's top-level `json_schema` and `grammar` (GBNF),
vLLM's `guided_json`/`guided_regex`/`guided_grammar`/`guided_choice`, and `regex`. A client that
asks for constrained output never gets unconstrained text: a constraint we cannot honour is a 400.

llama.cpp's names for fields we have: `n_predict` (-1: no limit) is `max_tokens` (and, as
in llama.cpp, wins over it), `repeat_penalty` is `repetition_penalty`.

llama.cpp's `samplers` (its names, with their aliases, or one letter each: "kypmt") chooses
the filters and their order: mistol's own (top_k, top_p, min_p, temperature) apply in the
order given (`SamplingParams.order`), and those left out are off, as in llama.cpp. The
penalties (repetition, frequency, presence) are off when `penalties` is left out; when on,
they come first here, so a list that puts them after a filter that acts is refused. The
samplers mistol lacks (dry, typ_p, xtc, top_n_sigma...) may be named while their own field is
neutral (they do nothing then); left out, their fields are ignored, as llama.cpp ignores them.

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
    "penalize_nl": (False,), "grammar_lazy": (False,), "grammar_triggers": ([],),
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

# llama.cpp's sampler names (common/sampling.cpp) and letters; the aliases are made below
SAMPLER_LETTERS = {"d": "dry", "k": "top_k", "y": "typ_p", "p": "top_p", "s": "top_n_sigma", "m": "min_p",
                   "t": "temperature", "x": "xtc", "i": "infill", "e": "penalties", "a": "adaptive_p"}
SAMPLER_NAMES = {name: name for name in SAMPLER_LETTERS.values()}
for _name in list(SAMPLER_NAMES):  # as llama.cpp: "top-k" and "topk" for "top_k"
    SAMPLER_NAMES[_name.replace("_", "-")] = SAMPLER_NAMES[_name.replace("_", "")] = _name
SAMPLER_NAMES.update(nucleus="top_p", temp="temperature", typ="typ_p")
MAX_SAMPLERS = 32  # llama.cpp has 11; a longer list only repeats them
MISTOL_SAMPLERS = ("top_k", "top_p", "min_p", "temperature")  # SamplingParams.order's filters
# the fields of each llama.cpp sampler, which it alone reads (refused fields: see REFUSED)
SAMPLER_FIELDS = {"dry": ("dry_multiplier",), "typ_p": ("typical_p",), "xtc": ("xtc_probability",),
                  "top_n_sigma": ("top_n_sigma",), "adaptive_p": ("adaptive_target", "adaptive_decay"),
                  "temperature": ("dynatemp_range",), "penalties": ("penalize_nl",), "infill": ()}

_CONSTRAINT_FIELDS = ("response_format", "json_schema", "grammar", "regex", "guided_json", "guided_regex",
                      "guided_grammar", "guided_choice")


def refuse_unsupported(body: dict) -> None:
    """A 400 for the first field in `REFUSED` that holds anything but its neutral value (a
    field of a sampler that `samplers` leaves out is ignored, as llama.cpp ignores it)."""
    chosen = samplers(body)
    ignored = set() if chosen is None else {f for name, keys in SAMPLER_FIELDS.items() if name not in chosen
                                             for f in keys}
    if chosen is not None and "infill" in chosen:
        raise APIError(400, "samplers: infill is not supported by this server (it would change the output; "
                       "leave it out)", "samplers", "unsupported_parameter")
    for key, neutral in REFUSED.items():
        if key in ignored or body.get(key) is None:
            continue
        if not any(_same(body[key], v) for v in neutral):
            raise APIError(400, f"{key} is not supported by this server (it would change the output; "
                           f"leave it out, or set it to {json.dumps(neutral[0]) if neutral else 'null'})",
                           key, "unsupported_parameter")
    # mistol's repetition penalty covers the whole context, as llama.cpp's repeat_last_n = -1
    last_n = body.get("repeat_last_n")
    penalty = body.get("repetition_penalty", body.get("repeat_penalty"))
    if chosen is not None and "penalties" not in chosen:
        penalty = None  # the penalties are off
    if last_n not in (None, -1) and penalty not in (None, 1, 1.0):
        raise APIError(400, "repeat_last_n: the repetition penalty here covers the whole context; "
                       "leave repeat_last_n out or set it to -1", "repeat_last_n", "unsupported_parameter")


def samplers(body: dict) -> list[str] | None:
    """llama.cpp's `samplers`, as canonical names in order; None when not given."""
    value = body.get("samplers")
    if value is None:
        return None
    if isinstance(value, (str, list)) and len(value) > MAX_SAMPLERS:  # each one runs at every token
        raise APIError(400, f"samplers: at most {MAX_SAMPLERS} samplers", "samplers")
    if isinstance(value, str):  # one letter per sampler
        unknown = [c for c in value if c not in SAMPLER_LETTERS]
        if unknown:
            raise APIError(400, f"samplers: unknown sampler letter {unknown[0]!r} (known: "
                           f"{''.join(SAMPLER_LETTERS)})", "samplers")
        return [SAMPLER_LETTERS[c] for c in value]
    if not isinstance(value, list) or not all(isinstance(n, str) for n in value):
        raise APIError(400, "samplers must be a list of sampler names or a string of sampler letters", "samplers")
    unknown = [n for n in value if n.lower() not in SAMPLER_NAMES]
    if unknown:
        raise APIError(400, f"samplers: unknown sampler {unknown[0]!r} (known: "
                       f"{', '.join(SAMPLER_LETTERS.values())})", "samplers")
    return [SAMPLER_NAMES[n.lower()] for n in value]


def sampler_order(body: dict, active: dict[str, bool], penalized: bool) -> tuple[tuple[str, ...], bool] | None:
    """What `samplers` asks of mistol: the order of its filters (`SamplingParams.order`) and
    whether the penalties apply; None when not given. `active`: whether each of mistol's
    filters changes anything with the request's values; `penalized`: whether a penalty is set."""
    chosen = samplers(body)
    if chosen is None:
        return None
    order = tuple(name for name in chosen if name in MISTOL_SAMPLERS)
    penalties = "penalties" in chosen
    if penalties and penalized:
        before = [n for n in chosen[: chosen.index("penalties")] if active.get(n)]
        if before:
            raise APIError(400, f"samplers: the penalties apply first here; put penalties before {before[0]} "
                           "(as llama.cpp's default order does)", "samplers", "unsupported_parameter")
    return order, penalties


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
