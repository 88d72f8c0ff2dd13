"""Tool calls in `mistol serve` with the official `openai` client: a round trip (request →
`tool_calls` → the tool's result → the final answer), streamed and not, on a random-weight model
whose calls are well-formed only because the grammar makes them so (checked with `jsonschema`).
No mocks."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("llguidance")
openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")

from helpers import LoopbackServer  # noqa: E402
from mistol.engine import Engine  # noqa: E402

MODEL = "tiny-hermes"
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "minLength": 1, "maxLength": 12},
                                            "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET", "PST"]}}, "required": ["zone"],
        "additionalProperties": False}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                      "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "description": "The time in a zone", "parameters": TIME}},
]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def server(mistral_dir):
    from mistol.server import ServerOptions, create_app

    engine = Engine.load(mistral_dir, dtype="f32")
    app = create_app(engine, ServerOptions(model_name=MODEL, max_batch=4, max_context=2048))
    with LoopbackServer(app) as url:
        yield SimpleNamespace(client=openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120))


def check_calls(calls) -> None:
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_round_trip(server):
    first = server.client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
                                                  parallel_tool_calls=False, max_tokens=200, temperature=0.8, seed=3)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    check_calls(choice.message.tool_calls)
    result = json.dumps({"temperature": 21, "sky": "clear and sunny over the river"})
    follow_up = ASK + [choice.message.model_dump(exclude_none=True)] + [
        {"role": "tool", "tool_call_id": call.id, "content": result} for call in choice.message.tool_calls]
    final = server.client.chat.completions.create(model=MODEL, messages=follow_up, tools=TOOLS, tool_choice="none",
                                                  max_tokens=8, temperature=0)
    answer = final.choices[0]
    assert answer.message.tool_calls is None and isinstance(answer.message.content, str)
    assert answer.finish_reason in ("stop", "length")
    # the calls and the results are in the prompt: it is longer than the question alone by more than the results
    alone = server.client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="none",
                                                  max_tokens=1)
    assert final.usage.prompt_tokens > alone.usage.prompt_tokens + len(choice.message.tool_calls) * 20


def streamed_calls(server, **kwargs) -> tuple[list[dict], str]:
    """The calls of a streamed reply, put together from their deltas as OpenAI's clients do."""
    calls: dict[int, dict] = {}
    finish = None
    for chunk in server.client.chat.completions.create(**kwargs, stream=True):
        for choice in chunk.choices:
            for delta in choice.delta.tool_calls or []:
                if delta.id is not None:  # the first delta of a call: its id and name
                    assert delta.index == len(calls) and delta.function.name and delta.type == "function"
                    calls[delta.index] = {"id": delta.id, "name": delta.function.name, "arguments": ""}
                else:
                    assert delta.function.name is None
                calls[delta.index]["arguments"] += delta.function.arguments or ""
            finish = choice.finish_reason or finish
    return list(calls.values()), finish


def test_streamed_round_trip_gives_the_same_calls_as_deltas(server):
    kwargs = dict(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
                  max_tokens=200, temperature=0)
    whole = server.client.chat.completions.create(**kwargs).choices[0].message.tool_calls
    calls, finish = streamed_calls(server, **kwargs)
    assert finish == "tool_calls"
    assert [(c["name"], c["arguments"]) for c in calls] == [(c.function.name, c.function.arguments) for c in whole]
    for c in calls:
        jsonschema.validate(json.loads(c["arguments"]), SCHEMAS[c["name"]])
    follow_up = ASK + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
        for c in calls]}] + [{"role": "tool", "tool_call_id": c["id"], "content": "21 C"} for c in calls]
    chunks = list(server.client.chat.completions.create(model=MODEL, messages=follow_up, tools=TOOLS,
                                                        tool_choice="none", max_tokens=8, temperature=0, stream=True))
    assert all(not c.choices or c.choices[0].delta.tool_calls is None for c in chunks)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_parallel_calls_stream_one_index_each(server):
    """This random model, greedy, calls again and again: cut by max_tokens, several calls."""
    kwargs = dict(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=120, temperature=0)
    whole = server.client.chat.completions.create(**kwargs).choices[0]
    calls, finish = streamed_calls(server, **kwargs)
    assert finish == whole.finish_reason
    assert [(c["name"], c["arguments"]) for c in calls] == [
        (c.function.name, c.function.arguments) for c in whole.message.tool_calls]
    complete = calls if finish == "tool_calls" else calls[:-1]
    assert len(complete) >= 2
    for c in complete:
        jsonschema.validate(json.loads(c["arguments"]), SCHEMAS[c["name"]])


def test_a_named_tool_is_the_one_called_once(server):
    for name in SCHEMAS:
        r = server.client.chat.completions.create(
            model=MODEL, messages=ASK, tools=TOOLS, max_tokens=200, temperature=1.0, seed=1,
            tool_choice={"type": "function", "function": {"name": name}})
        calls = r.choices[0].message.tool_calls
        assert [c.function.name for c in calls] == [name]
        check_calls(calls)


def test_parallel_tool_calls_false_gives_one_call(server):
    for seed in range(3):
        r = server.client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
                                                  parallel_tool_calls=False, max_tokens=200, temperature=1.0,
                                                  seed=seed)
        assert len(r.choices[0].message.tool_calls) == 1 and r.choices[0].finish_reason == "tool_calls"


def test_auto_gives_text_or_valid_calls(server):
    for seed in range(4):
        choice = server.client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=40,
                                                       temperature=1.0, seed=seed).choices[0]
        if choice.message.tool_calls:
            assert choice.finish_reason == "tool_calls" and choice.message.content is None
            check_calls(choice.message.tool_calls)
        else:
            assert "<tool_call>" not in choice.message.content


BAD = [
    ("unknown-named-tool", {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice"),
    ("choice-without-tools", {"tool_choice": "required"}, "tool_choice"),
    ("tools-not-a-list", {"tools": {"name": "x"}}, "tools"),
    ("bad-name", {"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools"),
    ("bad-parameters", {"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "wat"}}}}}]}, "tools"),
    ("with-response-format", {"tools": TOOLS, "response_format": {"type": "json_object"}}, "response_format"),
    ("bad-tool-call", {"messages": ASK + [{"role": "assistant", "tool_calls": [{"id": "1"}]}]},
     "messages[1].tool_calls[0]"),
]


@pytest.mark.parametrize("extra,param", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_tool_requests_are_refused_with_a_400(server, extra, param):
    body = {"messages": ASK, "max_tokens": 5, **extra}
    with pytest.raises(openai.BadRequestError) as caught:
        server.client.chat.completions.create(model=MODEL, **body)
    assert caught.value.body["param"] == param, caught.value.body
