"""The `LLM` interface with Python functions as tools, on a random-weight model (Hermes format):
the call is forced by `tool_choice`, so what the model does is fixed; its arguments fit the
function's schema only because the grammar makes them (checked with `jsonschema`)."""

from __future__ import annotations

import enum
import json
from typing import Literal

import pytest

pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

from mistol.engine import Engine  # noqa: E402
from mistol.errors import MistolError  # noqa: E402
from mistol.llm import LocalLLM  # noqa: E402
from mistol.sampling import SamplingParams  # noqa: E402
from mistol.tool_functions import function_tool  # noqa: E402
from mistol.tool_loop import DECLINED  # noqa: E402

GREEDY = SamplingParams(temperature=0, max_tokens=80)
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


class Unit(enum.Enum):
    CELSIUS = "celsius"
    FAHRENHEIT = "fahrenheit"


calls: list[tuple] = []


def get_weather(city: Literal["Paris", "Rome", "Oslo"], unit: Unit, tomorrow: bool = False) -> dict:
    """The weather in a city.

    Args:
        city: The city.
        unit: The unit of the temperature.
        tomorrow: Tomorrow's rather than today's.
    """
    calls.append((city, unit, tomorrow))
    return {"city": city, "temperature": 21 if unit is Unit.CELSIUS else 70}


def broken(zone: Literal["UTC", "CET"]) -> str:
    """The time in a zone."""
    raise RuntimeError(f"the clock of {zone} is broken")


@pytest.fixture(scope="module")
def llm(mistral_dir):
    return LocalLLM(Engine.load(mistral_dir, dtype="f32"), max_context=2048)


@pytest.fixture(autouse=True)
def no_calls():
    calls.clear()


def test_a_forced_call_runs_the_function_and_the_answer_follows(llm):
    messages = list(ASK)
    answer = "".join(llm.chat_with_tools(messages, [get_weather, broken], GREEDY, tool_choice="get_weather",
                                         max_rounds=1))
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "assistant"]
    (call,) = messages[1]["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_") and call["function"]["name"] == "get_weather"
    arguments = json.loads(call["function"]["arguments"])
    jsonschema.validate(arguments, function_tool(get_weather).parameters)
    # called once, with the Enum member for the Enum parameter
    assert calls == [(arguments["city"], Unit(arguments["unit"]), arguments.get("tomorrow", False))]
    assert messages[2] == {"role": "tool", "tool_call_id": call["id"], "name": "get_weather",
                           "content": json.dumps(get_weather(arguments["city"], Unit(arguments["unit"])))}
    assert messages[3] == {"role": "assistant", "content": answer}  # the last round offers no tools: text


def test_a_tool_error_goes_back_to_the_model_as_the_result(llm):
    messages = list(ASK)
    "".join(llm.chat_with_tools(messages, [get_weather, broken], GREEDY, tool_choice="broken", max_rounds=1))
    (call,) = messages[1]["tool_calls"]
    zone = json.loads(call["function"]["arguments"])["zone"]
    assert messages[2]["content"] == f"error: RuntimeError: the clock of {zone} is broken"
    assert messages[3]["role"] == "assistant" and "tool_calls" not in messages[3]


def test_rounds_are_bounded_and_a_declined_call_is_told_so(llm):
    messages = list(ASK)
    asked = []

    def approve(call, arguments):
        asked.append((call.name, arguments))
        return False

    "".join(llm.chat_with_tools(messages, [get_weather], GREEDY, tool_choice="get_weather", max_rounds=2,
                                approve=approve, parallel_calls=False))
    rounds = [m for m in messages if m.get("tool_calls")]
    assert 1 <= len(rounds) <= 2 and calls == []  # nothing ran
    assert all(len(m["tool_calls"]) == 1 for m in rounds)
    results = [m for m in messages if m["role"] == "tool"]
    assert len(results) == len(asked) == sum(len(m["tool_calls"]) for m in rounds)
    assert all(r["content"] == DECLINED for r in results)
    assert messages[-1]["role"] == "assistant" and "tool_calls" not in messages[-1]


def test_the_raw_step_returns_calls_without_running_them(llm):
    step = llm.tool_step(ASK, [get_weather], GREEDY, tool_choice="required", parallel_calls=False)
    assert step.tool_calls and calls == [] and step.content == "" and step.finish_reason == "stop"
    for call in step.tool_calls:
        assert call.name == "get_weather"
        jsonschema.validate(json.loads(call.arguments), function_tool(get_weather).parameters)
    # the same step with an OpenAI tool dict: the same calls (greedy)
    openai_tool = function_tool(get_weather).signature()
    again = llm.tool_step(ASK, [openai_tool], GREEDY, tool_choice="required", parallel_calls=False)
    assert [(c.name, c.arguments) for c in again.tool_calls] == [(c.name, c.arguments) for c in step.tool_calls]
    assert step.message()["tool_calls"][0]["function"] == {"name": step.tool_calls[0].name,
                                                           "arguments": step.tool_calls[0].arguments}


def test_chat_with_tools_streams_the_answer_and_leaves_the_messages(llm):
    messages = list(ASK)
    answer = "".join(llm.chat(messages, GREEDY, tools=[get_weather], tool_choice="get_weather", max_tool_rounds=1))
    assert messages == ASK and len(calls) == 1 and isinstance(answer, str)
    # without tools, chat is the plain reply to the same messages
    assert "".join(llm.chat(ASK, GREEDY)) == llm.last.text


def test_bad_tools_and_choices_are_clear_errors(llm):
    def untyped(x):
        """No hint."""

    with pytest.raises(MistolError, match="function untyped, parameter 'x' has no type hint"):
        llm.tool_step(ASK, [untyped])
    with pytest.raises(MistolError, match="tool_choice names 'nope', which is not among the tools"):
        llm.tool_step(ASK, [get_weather], GREEDY, tool_choice="nope")
    with pytest.raises(MistolError, match=r"reached max_tokens \(3\) in the middle of"):
        llm.tool_step(ASK, [get_weather], SamplingParams(temperature=0, max_tokens=3), tool_choice="required")
