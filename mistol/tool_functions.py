"""Python functions as tools: a JSON schema from the signature, and calls run with their arguments.

`function_tool(fn)` reads the parameters' type hints (int, float, str, bool, None, list[...],
tuple[...], dict[str, ...], Optional / Union, Literal, Enum) into a JSON schema, the docstring's
first paragraph into the description, and each parameter's description from a Google-style
"Args:" section or a NumPy-style "Parameters" section. A parameter with a default is optional.
The schema is the one transformers' `get_json_schema` writes, except that it is plain JSON Schema
where transformers writes OpenAPI's `"nullable": true` (Optional is `"type": [..., "null"]` or an
`anyOf` with null), and that it allows no other properties (a call the function cannot take is
never written). A function that cannot be described raises `ToolDefinitionError`, naming it.

`FunctionTools` holds the functions of a conversation: `run(call)` calls one with the arguments
the model wrote (Enum parameters get their members) and returns the text the model is shown: the
result (a string as is, anything else as JSON), or the error it raised, never raising itself.
"""

from __future__ import annotations

import enum
import inspect
import json
import re
import types
import typing
from collections.abc import Callable, Sequence

from .errors import MistolError
from .tools import NAME, Tool, ToolCall

_SCALARS = {int: "integer", float: "number", str: "string", bool: "boolean", type(None): "null"}
_GOOGLE_SECTIONS = ("Args", "Arguments", "Parameters", "Params", "Keyword Args", "Keyword Arguments")
_ANY_SECTION = re.compile(r"^\s*([A-Z][A-Za-z ]*):\s*$")  # "Returns:", "Raises:", "Example:"


class ToolDefinitionError(MistolError):
    """A function whose signature cannot be written as a JSON schema."""


def function_tool(fn: Callable) -> Tool:
    """The tool the model is shown for `fn`."""
    name = getattr(fn, "__name__", None)
    if not callable(fn) or not isinstance(name, str) or not NAME.fullmatch(name):
        raise ToolDefinitionError(f"{fn!r} is not a function with a name the model can call")
    try:
        signature = inspect.signature(fn)
        hints = typing.get_type_hints(fn)
    except (TypeError, ValueError, NameError) as e:
        raise ToolDefinitionError(f"function {name}: its signature cannot be read ({e})") from None
    description, documented = parse_docstring(inspect.getdoc(fn) or "")
    properties, required = {}, []
    for pname, param in signature.parameters.items():
        where = f"function {name}, parameter {pname!r}"
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            raise ToolDefinitionError(f"{where}: *args and **kwargs cannot be described to the model")
        if param.kind == param.POSITIONAL_ONLY:
            raise ToolDefinitionError(f"{where}: positional-only; the model passes arguments by name")
        if pname not in hints:
            raise ToolDefinitionError(f"{where} has no type hint")
        schema = json_schema(hints[pname], where)
        if pname in documented:
            schema["description"] = documented[pname]
        properties[pname] = schema
        if param.default is param.empty:
            required.append(pname)
    parameters = {"type": "object", "properties": properties}
    if required:
        parameters["required"] = required
    parameters["additionalProperties"] = False
    return Tool(name, description, parameters)


def json_schema(hint, where: str = "a parameter") -> dict:
    """The JSON schema of one type hint."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is typing.Any:
        return {}
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return _enum_schema([member.value for member in hint], f"{where}: the Enum {hint.__name__}")
    if origin is None:
        if hint in _SCALARS:
            return {"type": _SCALARS[hint]}
        if hint in (list, tuple, set, frozenset):
            return {"type": "array"}
        if hint is dict:
            return {"type": "object"}
        raise ToolDefinitionError(f"{where}: the type {getattr(hint, '__name__', hint)!r} has no JSON schema; "
                                  "use int, float, str, bool, list, dict, Optional, Literal or an Enum")
    if origin is typing.Literal:
        return _enum_schema(list(args), f"{where}: the Literal")
    if origin is typing.Union or origin is types.UnionType:
        schemas = [json_schema(a, where) for a in args if a is not type(None)]
        nullable = type(None) in args
        if all(set(s) == {"type"} and isinstance(s["type"], str) for s in schemas):
            names = [s["type"] for s in schemas] + (["null"] if nullable else [])
            names = list(dict.fromkeys(names))
            return {"type": names[0] if len(names) == 1 else names}
        return {"anyOf": schemas + ([{"type": "null"}] if nullable else [])}
    if origin in (list, set, frozenset, Sequence):
        return {"type": "array", "items": json_schema(args[0], where)} if args else {"type": "array"}
    if origin is tuple:
        if not args:
            return {"type": "array"}
        if len(args) == 2 and args[1] is Ellipsis:
            return {"type": "array", "items": json_schema(args[0], where)}
        return {"type": "array", "prefixItems": [json_schema(a, where) for a in args],
                "minItems": len(args), "maxItems": len(args)}
    if origin is dict:
        if args and args[0] is not str:
            raise ToolDefinitionError(f"{where}: a JSON object's keys are strings, not {args[0]!r}")
        return {"type": "object", "additionalProperties": json_schema(args[1], where)} if args else {"type": "object"}
    raise ToolDefinitionError(f"{where}: the type {hint!r} has no JSON schema")


def _enum_schema(values: list, where: str) -> dict:
    if not values:
        raise ToolDefinitionError(f"{where} has no values")
    if any(type(v) not in _SCALARS for v in values):
        raise ToolDefinitionError(f"{where} has values that are not JSON scalars (str, int, float, bool, None)")
    names = list(dict.fromkeys(_SCALARS[type(v)] for v in values))
    return {"type": names[0] if len(names) == 1 else names, "enum": values}


def parse_docstring(doc: str) -> tuple[str, dict[str, str]]:
    """The description (the first paragraph) and each documented parameter's description, from a
    Google-style "Args:" or a NumPy-style "Parameters" section."""
    lines = doc.expandtabs().splitlines()
    first = []
    for i, line in enumerate(lines):
        if not line.strip() or _ANY_SECTION.match(line) or _is_numpy_header(lines, i):
            break
        first.append(line.strip())
    params: dict[str, str] = {}
    for i, line in enumerate(lines):
        head = line.strip()
        if head.rstrip(":") in _GOOGLE_SECTIONS and head.endswith(":"):
            params.update(_google_items(lines[i + 1:], _indent(line)))
        elif head in ("Parameters", "Other Parameters", "Arguments") and _is_numpy_header(lines, i):
            params.update(_numpy_items(lines[i + 2:], _indent(line)))
    return " ".join(first), params


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _is_numpy_header(lines: list[str], i: int) -> bool:
    return i + 1 < len(lines) and bool(lines[i].strip()) and set(lines[i + 1].strip()) == {"-"}


def _google_items(lines: list[str], section_indent: int) -> dict[str, str]:
    """`name (type): text` items, each continued on more indented lines, until the section ends."""
    items: dict[str, list[str]] = {}
    item_indent, current = None, None
    for line in lines:
        if not line.strip():
            continue
        indent = _indent(line)
        if indent <= section_indent:
            break
        if item_indent is None:
            item_indent = indent
        match = re.match(r"\*{0,2}(\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)$", line.strip()) if indent == item_indent else None
        if match:
            current = match.group(1)
            items[current] = [match.group(2)]
        elif current is not None:
            items[current].append(line.strip())
    return {k: " ".join(t for t in v if t) for k, v in items.items()}


def _numpy_items(lines: list[str], section_indent: int) -> dict[str, str]:
    """`name : type` lines at the section's indent, described on the more indented lines below."""
    items: dict[str, list[str]] = {}
    current = None
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        if _indent(line) <= section_indent:
            if _is_numpy_header(lines, i):
                break  # the next section
            current = re.split(r"\s*:", line.strip(), maxsplit=1)[0].strip()
            items[current] = []
        elif current is not None:
            items[current].append(line.strip())
    return {k: " ".join(v) for k, v in items.items() if v}


class FunctionTools:
    """Python functions offered to the model, by name."""

    def __init__(self, functions: Sequence[Callable]):
        self.tools: list[Tool] = []
        self.functions: dict[str, Callable] = {}
        for fn in functions:
            tool = function_tool(fn)
            if tool.name in self.functions:
                raise ToolDefinitionError(f"two tools are named {tool.name!r}")
            self.tools.append(tool)
            self.functions[tool.name] = fn

    def arguments(self, call: ToolCall) -> dict:
        """The call's arguments as the function takes them (a ValueError when they are not JSON)."""
        arguments = json.loads(call.arguments) if call.arguments.strip() else {}
        if not isinstance(arguments, dict):
            raise ValueError("the arguments are not a JSON object")
        return arguments

    def run(self, call: ToolCall) -> str:
        """Call the function; its result, or its error, as the text the model is shown."""
        fn = self.functions.get(call.name)
        if fn is None:
            return f"error: there is no tool named {call.name!r}"
        try:
            arguments = _with_enums(fn, self.arguments(call))
            result = fn(**arguments)
        except Exception as e:  # the tool's failure is the model's to read, not the loop's to die of
            return f"error: {type(e).__name__}: {e}"
        return result_text(result)


def result_text(result) -> str:
    if isinstance(result, str):
        return result
    try:
        return json.dumps(result, ensure_ascii=False, default=str)
    except ValueError:  # e.g. a circular structure
        return str(result)


def _with_enums(fn: Callable, arguments: dict) -> dict:
    """Arguments for Enum parameters turned from their values into the members."""
    hints = typing.get_type_hints(fn)
    out = dict(arguments)
    for name, value in arguments.items():
        hint = hints.get(name)
        if isinstance(hint, type) and issubclass(hint, enum.Enum):
            out[name] = hint(value)
    return out


def as_tools(tools: Sequence) -> list[Tool]:
    """Tools given as Python functions, `Tool`s or OpenAI's {type: function, function: {...}} dicts."""
    out = []
    for tool in tools:
        if isinstance(tool, Tool):
            out.append(tool)
        elif isinstance(tool, dict):
            fn = tool.get("function", tool)
            out.append(Tool(fn.get("name", ""), fn.get("description", ""), fn.get("parameters", {"type": "object"})))
        else:
            out.append(function_tool(tool))
    return out
