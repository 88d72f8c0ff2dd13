"""Python functions as tools: the schema against transformers' `get_json_schema` (the reference
for what a function's tool looks like), docstring sections of both styles, schemas that
`jsonschema` reads as meant, clear refusals, and calls whose errors become the result."""

from __future__ import annotations

import enum
import json
from typing import Literal, Optional

import pytest

from mistol.tool_functions import FunctionTools, ToolDefinitionError, function_tool, parse_docstring
from mistol.tools import ToolCall

jsonschema = pytest.importorskip("jsonschema")


class Unit(enum.Enum):
    CELSIUS = "celsius"
    FAHRENHEIT = "fahrenheit"


def get_weather(city: str, days: int, unit: Unit, detail: Literal["short", "long"] = "short",
                tags: list[str] = (), scale: float = 1.0, extra: dict[str, int] | None = None,
                raw: bool = False) -> dict:
    """The weather forecast for a city.

    Args:
        city: The city's name,
            as written in English.
        days (int): How many days ahead.
        unit: The unit of temperatures.
        detail: How much to say.
        tags: Labels.
        scale: A factor.
        extra: More numbers.
        raw: Raw output.

    Returns:
        The forecast.
    """
    return {"city": city, "days": days, "unit": unit.value}


def test_schema_is_transformers_get_json_schema_with_no_other_properties():
    from transformers.utils import get_json_schema

    def typed(city: str, days: int, unit: Unit, detail: Literal["short", "long"] = "short", tags: list[str] = (),
              scale: float = 1.0, extra: dict[str, int] = None, raw: bool = False, pair: tuple[int, str] = (0, "")):
        """Plain types only (transformers writes Optional as OpenAPI's "nullable").

        Args:
            city: The city's name,
                as written in English.
            days (int): How many days ahead.
            unit: The unit of temperatures.
            detail: How much to say.
            tags: Labels.
            scale: A factor.
            extra: More numbers.
            raw: Raw output.
            pair: Two things.
        """

    theirs = get_json_schema(typed)
    theirs["function"]["parameters"]["additionalProperties"] = False
    # a fixed-length tuple: transformers gives prefixItems only; ours also says how many items
    theirs["function"]["parameters"]["properties"]["pair"].update(minItems=2, maxItems=2)
    assert function_tool(typed).signature() == theirs


def test_optional_is_plain_json_schema_null():
    schema = function_tool(get_weather).parameters
    assert schema["properties"]["extra"] == {
        "anyOf": [{"type": "object", "additionalProperties": {"type": "integer"}}, {"type": "null"}],
        "description": "More numbers."}
    ok = {"city": "Paris", "days": 2, "unit": "celsius", "extra": None}
    jsonschema.validate(ok, schema)
    jsonschema.validate({**ok, "extra": {"a": 1}}, schema)
    for bad in ({**ok, "extra": {"a": "x"}}, {**ok, "unit": "kelvin"}, {"city": "Paris"}, {**ok, "other": 1},
                {**ok, "detail": "medium"}, {**ok, "days": 1.5}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)


def test_numpy_docstring_parameters():
    def add(a: int, b: Optional[str] = None) -> int:
        """Add things
        over two lines.

        Parameters
        ----------
        a : int
            The first
            thing.
        b : str, optional
            The second.

        Returns
        -------
        int
        """

    tool = function_tool(add)
    assert tool.description == "Add things over two lines."
    assert tool.parameters == {
        "type": "object", "additionalProperties": False, "required": ["a"],
        "properties": {"a": {"type": "integer", "description": "The first thing."},
                       "b": {"type": ["string", "null"], "description": "The second."}}}


def test_a_function_without_a_docstring_has_no_descriptions():
    def f(x: int):
        pass

    assert function_tool(f).signature()["function"] == {
        "name": "f", "description": "",
        "parameters": {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"],
                       "additionalProperties": False}}
    assert parse_docstring("Sum.\n\nArgs:\n    x: first\n\nRaises:\n    y: not a parameter") == ("Sum.", {"x": "first"})


class Point:
    pass


def no_hint(x):
    pass


def star_args(*values: int):
    pass


def custom(p: Point):
    pass


def int_keys(d: dict[int, str]):
    pass


@pytest.mark.parametrize("fn, says", [
    (no_hint, "function no_hint, parameter 'x' has no type hint"),
    (star_args, "function star_args, parameter 'values': *args and **kwargs"),
    (custom, "function custom, parameter 'p': the type 'Point' has no JSON schema"),
    (int_keys, "keys are strings"),
])
def test_functions_that_cannot_be_described_are_refused_by_name(fn, says):
    with pytest.raises(ToolDefinitionError) as e:
        function_tool(fn)
    assert says in str(e.value) and "\n" not in str(e.value)


def test_a_call_runs_with_enum_members_and_errors_become_the_result():
    def fails(n: int) -> int:
        """Always fails."""
        raise ValueError(f"no {n}")

    tools = FunctionTools([get_weather, fails])
    result = tools.run(ToolCall("c1", "get_weather", json.dumps({"city": "Oslo", "days": 2, "unit": "fahrenheit"})))
    assert json.loads(result) == {"city": "Oslo", "days": 2, "unit": "fahrenheit"}  # unit.value: it was the Enum
    assert tools.run(ToolCall("c2", "fails", '{"n": 3}')) == "error: ValueError: no 3"
    assert tools.run(ToolCall("c3", "missing", "{}")) == "error: there is no tool named 'missing'"
    assert tools.run(ToolCall("c4", "fails", '{"n": 3, "m": 1}')).startswith("error: TypeError:")
    with pytest.raises(ToolDefinitionError, match="two tools are named 'fails'"):
        FunctionTools([fails, fails])
