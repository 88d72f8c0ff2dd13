"""Constrained output in `mistol serve`: `response_format` (JSON object, JSON schema), `regex` and
GBNF `grammar`, checked with the official `openai` client on a random-weight model (whose free
text is noise, so a valid reply is the constraint's doing), against `jsonschema` and `re`.
Also llama.cpp's fields: honoured (`grammar`, `json_schema`, `n_predict`, `repeat_penalty`) or
refused with a 400, never ignored. No mocks."""

from __future__ import annotations

import json
import random
import re
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("llguidance")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
jsonschema = pytest.importorskip("jsonschema")

from helpers import LoopbackServer  # noqa: E402
from mistol.engine import Engine  # noqa: E402

MODEL = "tiny-hermes"
CONTEXT = 1024
HI = [{"role": "user", "content": "Describe a person."}]


@pytest.fixture(scope="module")
def server(mistral_dir):
    from mistol.server import ServerOptions, create_app

    engine = Engine.load(mistral_dir, dtype="f32")
    app = create_app(engine, ServerOptions(model_name=MODEL, max_batch=8, max_context=CONTEXT))
    with LoopbackServer(app) as url:
        yield SimpleNamespace(
            engine=engine,
            client=openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120),
            http=httpx.Client(base_url=url, timeout=120),
        )


def generated_schema(rng: random.Random, depth: int = 0) -> dict:
    """An object schema of bounded size (so that every reply can finish): strings with a
    maxLength, bounded integers, booleans, enums, short arrays, nested objects."""
    properties = {}
    for i in range(rng.randint(1, 4)):
        kind = rng.choice(["string", "integer", "boolean", "enum", "array", "object" if depth < 1 else "integer",
                           "null"])
        if kind == "string":
            prop = {"type": "string", "maxLength": rng.randint(1, 8)}
            if rng.random() < 0.3:
                prop["minLength"] = 1
        elif kind == "integer":
            lo = rng.randint(-50, 50)
            prop = {"type": "integer", "minimum": lo, "maximum": lo + rng.randint(0, 500)}
        elif kind == "boolean":
            prop = {"type": "boolean"}
        elif kind == "null":
            prop = {"type": "null"}
        elif kind == "enum":
            prop = {"enum": rng.sample(["red", "green", "blue", "x y", "naïve", "42"], rng.randint(1, 4))}
        elif kind == "array":
            prop = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9},
                    "minItems": rng.randint(0, 1), "maxItems": rng.randint(1, 3)}
        else:
            prop = generated_schema(rng, depth + 1)
        properties[f"{kind}_{i}"] = prop
    return {"type": "object", "properties": properties, "required": sorted(properties),
            "additionalProperties": False}


SCHEMAS = [generated_schema(random.Random(seed)) for seed in range(20)]


def json_schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "reply", "schema": schema, "strict": True}}


def test_twenty_generated_schemas_give_replies_that_validate(server):
    def ask(i: int):
        return server.client.chat.completions.create(
            model=MODEL, messages=HI, max_tokens=200, temperature=1.0, seed=i,
            response_format=json_schema_format(SCHEMAS[i]))

    with ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(ask, range(len(SCHEMAS))))
    for schema, reply in zip(SCHEMAS, replies):
        choice = reply.choices[0]
        assert choice.finish_reason == "stop", (schema, choice.message.content)
        jsonschema.validate(json.loads(choice.message.content), schema)


def test_json_object_gives_a_json_object_in_chat_and_completions(server):
    chat = server.client.chat.completions.create(model=MODEL, messages=HI, max_tokens=300, temperature=0,
                                                 response_format={"type": "json_object"})
    text = server.client.completions.create(model=MODEL, prompt="A person:", max_tokens=300, temperature=0,
                                            extra_body={"response_format": {"type": "json_object"}})
    for content, finish in ((chat.choices[0].message.content, chat.choices[0].finish_reason),
                            (text.choices[0].text, text.choices[0].finish_reason)):
        if finish == "stop":  # a random model may fill a whole object's worth of tokens
            assert isinstance(json.loads(content), dict)
        else:
            assert content.lstrip().startswith("{")


def test_a_streamed_json_schema_reply_validates(server):
    schema = SCHEMAS[3]
    stream = server.client.chat.completions.create(model=MODEL, messages=HI, max_tokens=200, temperature=0.7,
                                                   seed=1, stream=True, response_format=json_schema_format(schema))
    chunks = list(stream)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(content), schema)


def test_regex_and_gbnf_grammar_from_extra_body(server):
    pattern = r"[0-9]{3}-[a-z]{2,4}"
    for seed in range(3):
        r = server.client.chat.completions.create(model=MODEL, messages=HI, max_tokens=20, temperature=1.0,
                                                  seed=seed, extra_body={"regex": pattern})
        assert re.fullmatch(pattern, r.choices[0].message.content), r.choices[0].message.content
        assert r.choices[0].finish_reason == "stop"
    gbnf = 'root ::= answer " " answer\nanswer ::= "yes" | "no" | "maybe"'
    r = server.client.completions.create(model=MODEL, prompt="Answer twice:", max_tokens=20, temperature=1.0,
                                         seed=0, extra_body={"grammar": gbnf})
    assert re.fullmatch(r"(yes|no|maybe) (yes|no|maybe)", r.choices[0].text), r.choices[0].text


def test_vllm_guided_fields(server):
    choices = ["C++ (17)", "a-b & c", "naïve"]
    for seed in range(3):
        r = server.client.completions.create(model=MODEL, prompt="Pick:", max_tokens=20, temperature=1.0, seed=seed,
                                             extra_body={"guided_choice": choices})
        assert r.choices[0].text in choices
    r = server.client.chat.completions.create(model=MODEL, messages=HI, max_tokens=200, temperature=0.5, seed=4,
                                              extra_body={"guided_json": SCHEMAS[5]})
    jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMAS[5])


def test_the_engine_generates_under_a_constraint_as_the_server_does(server):
    from mistol.constraints import Constraint, Grammars
    from mistol.generation import Generation
    from mistol.sampling import SamplingParams

    pattern = r"[A-Z]{2}-[0-9]{3,5}( [a-z]{1,6})?"
    tokenizer = server.engine.tokenizer
    grammars = Grammars(tokenizer)
    grammar = grammars.compile(Constraint("regex", pattern))
    stop_ids = sorted({tokenizer.eos_id, server.engine.config.eos_token_id} - {None})
    params = SamplingParams(temperature=0, max_tokens=30, stop_token_ids=stop_ids)
    result = Generation()
    session = server.engine.new_session(max_context=CONTEXT)
    text = "".join(session.stream(tokenizer.encode("Code:", add_bos=True), params, result, grammars.start(grammar)))
    assert re.fullmatch(pattern, text) and result.finish_reason == "stop", text
    r = server.http.post("/v1/completions", json={"prompt": "Code:", "regex": pattern, "max_tokens": 30,
                                                  "temperature": 0})
    assert r.json()["choices"][0]["text"] == text


BAD_CONSTRAINTS = [
    ("unknown-type", {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "colour"}}}}, "response_format"),
    ("schema-not-object", {"response_format": {"type": "json_schema", "json_schema": {"name": "x",
                                                                                       "schema": "nope"}}},
     "response_format.json_schema.schema"),
    ("bad-pattern", {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "string", "pattern": "(("}}}}, "response_format"),
    ("bad-ref", {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "$ref": "#/$defs/missing"}}}}, "response_format"),
    ("unknown-format-type", {"response_format": {"type": "yaml"}}, "response_format.type"),
    ("unimplemented-keyword", {"json_schema": {"type": "array", "uniqueItems": True}}, "json_schema"),
    ("false-schema", {"json_schema": False}, "json_schema"),
    ("bad-regex", {"regex": "a("}, "regex"),
    ("bad-grammar", {"grammar": "root ::= undefined-rule"}, "grammar"),
    ("two-constraints", {"regex": "a", "grammar": 'root ::= "a"'}, "regex"),
]


@pytest.mark.parametrize("extra,param", [c[1:] for c in BAD_CONSTRAINTS], ids=[c[0] for c in BAD_CONSTRAINTS])
def test_invalid_constraints_are_refused_with_a_clear_400(server, extra, param):
    with pytest.raises(openai.BadRequestError) as caught:
        server.client.chat.completions.create(model=MODEL, messages=HI, max_tokens=5, extra_body=extra)
    error = caught.value.body
    assert caught.value.status_code == 400 and error["param"] == param, error
    assert "\n" not in error["message"] and len(error["message"]) < 400, error["message"]


def test_constrained_and_free_requests_decode_together(server):
    """Rows of one batch: the constrained rows match, the free rows are what they are alone."""
    free_prompt = [{"role": "user", "content": "Tell me a story."}]

    def free():
        return server.client.chat.completions.create(model=MODEL, messages=free_prompt, max_tokens=24,
                                                     temperature=0, extra_body={"ignore_eos": True})

    def digits(seed):
        return server.client.chat.completions.create(model=MODEL, messages=HI, max_tokens=24, temperature=1.0,
                                                     seed=seed, extra_body={"regex": "[0-9]{20}"})

    alone = free().choices[0].message.content
    before = server.http.get("/health").json()["peak_batch"]
    with ThreadPoolExecutor(6) as pool:
        constrained = [pool.submit(digits, s) for s in range(3)]
        unconstrained = [pool.submit(free) for _ in range(3)]
        constrained = [f.result().choices[0].message.content for f in constrained]
        unconstrained = [f.result().choices[0] for f in unconstrained]
    assert server.http.get("/health").json()["peak_batch"] >= max(before, 2)
    for text in constrained:
        assert re.fullmatch("[0-9]{20}", text), text
    for choice in unconstrained:
        assert choice.finish_reason == "length" and choice.message.content == alone
    assert not re.fullmatch("[0-9]*", alone)  # the free rows were not masked


# -- llama.cpp's fields (its server's /completion names, sent to the OpenAI routes) -------------------
def test_llamacpp_grammar_and_json_schema_are_honoured(server):
    r = server.http.post("/v1/completions", json={"prompt": "Say:", "grammar": 'root ::= "on" | "off"',
                                                  "max_tokens": 8, "temperature": 1.0, "seed": 2})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] in ("on", "off"), r.text
    schema = SCHEMAS[0]
    r = server.http.post("/v1/chat/completions", json={"messages": HI, "json_schema": schema, "n_predict": 200,
                                                       "temperature": 0.5, "seed": 2})
    assert r.status_code == 200, r.text
    jsonschema.validate(json.loads(r.json()["choices"][0]["message"]["content"]), schema)


def test_n_predict_is_max_tokens(server):
    body = {"prompt": "Once", "n_predict": 5, "ignore_eos": True, "temperature": 0}
    r = server.http.post("/v1/completions", json=body)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5
    r = server.http.post("/v1/completions", json={**body, "max_tokens": 9})  # llama.cpp: n_predict wins
    assert r.json()["usage"]["completion_tokens"] == 5
    r = server.http.post("/v1/completions", json={**body, "n_predict": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n_predict"


def test_repeat_penalty_is_repetition_penalty(server):
    body = {"prompt": "Once upon a time", "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    same = server.http.post("/v1/completions", json={**body, "repetition_penalty": 3.0}).json()
    alias = server.http.post("/v1/completions", json={**body, "repeat_penalty": 3.0}).json()
    assert alias["choices"][0]["text"] == same["choices"][0]["text"]
    r = server.http.post("/v1/completions", json={**body, "repeat_penalty": "high"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "repeat_penalty"


# Every field of llama.cpp's server (tools/server/server-schema.cpp) and OpenAI's chat API that
# changes the text or the reply's shape and that mistol does not do, with a value that asks for it.
UNSUPPORTED = {
    "mirostat": 2, "typical_p": 0.5, "tfs_z": 0.9, "dynatemp_range": 0.5, "xtc_probability": 0.5,
    "dry_multiplier": 0.8, "top_n_sigma": 1.5, "min_keep": 5, "samplers": ["top_k", "infill"],
    "penalize_nl": True, "n_probs": 3, "n_indent": 4, "n_discard": 8, "n_cmpl": 2, "t_max_predict_ms": 100,
    "t_max_prompt_ms": 100, "post_sampling_probs": True, "timings_per_token": True, "return_tokens": True,
    "return_progress": True, "response_fields": ["content"], "lora": [{"id": 0, "scale": 1.0}],
    "grammar_lazy": True, "grammar_triggers": [{"type": 0, "value": "x"}], "adaptive_target": 0.5,
    "functions": [{"name": "f"}], "audio": {"voice": "alloy", "format": "wav"},
    "modalities": ["text", "audio"], "reasoning_effort": "high", "web_search_options": {}, "verbosity": "low",
}
NEUTRAL = {"mirostat": 0, "typical_p": 1.0, "tfs_z": 1, "dynatemp_range": 0, "xtc_probability": 0.0,
           "dry_multiplier": 0, "top_n_sigma": -1, "min_keep": 0, "n_probs": 0, "timings_per_token": False,
           "tools": [], "tool_choice": "none", "modalities": ["text"], "t_max_predict_ms": -1}
# Mere hints (or a sampler's settings while it is off): accepted, the text unchanged.
HINTS = {"cache_prompt": False, "id_slot": 1, "n_keep": 10, "n_cache_reuse": 256, "user": "u1", "store": False,
         "metadata": {"a": "b"}, "service_tier": "auto", "parallel_tool_calls": False, "mirostat_tau": 4.0,
         "mirostat_eta": 0.2, "xtc_threshold": 0.2, "dry_base": 1.75, "dry_allowed_length": 3,
         "dry_penalty_last_n": 32, "dry_sequence_breakers": ["\n"], "dynatemp_exponent": 2.0,
         "repeat_last_n": 64}


@pytest.mark.parametrize("field", sorted(UNSUPPORTED))
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_a_field_that_would_change_the_output_is_refused(server, path, field):
    body = {"messages": HI} if "chat" in path else {"prompt": "hi"}
    r = server.http.post(path, json={**body, "max_tokens": 2, field: UNSUPPORTED[field]})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == field


@pytest.mark.parametrize("field,value", [("tools", [{"type": "function", "function": {"name": "f"}}]),
                                         ("tool_choice", "required")])
def test_tools_in_a_text_completion_are_refused(server, field, value):
    r = server.http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, field: value})
    assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text


def test_such_a_field_at_its_neutral_value_and_hints_change_nothing(server):
    body = {"prompt": "The weather", "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    plain = server.http.post("/v1/completions", json=body).json()["choices"][0]["text"]
    for field, value in {**NEUTRAL, **HINTS}.items():
        r = server.http.post("/v1/completions", json={**body, field: value})
        assert r.status_code == 200, (field, r.text)
        assert r.json()["choices"][0]["text"] == plain, field
    r = server.http.post("/v1/completions", json={**body, "repeat_penalty": 1.3, "repeat_last_n": 64})
    assert r.status_code == 400 and r.json()["error"]["param"] == "repeat_last_n"
