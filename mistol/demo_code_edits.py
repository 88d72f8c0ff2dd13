"""Code-editing requests to train the demo model on: a short Python block and one change to it.

The person shows a block of 4 to 12 lines (variables, a small function, a loop, prints, with
arithmetic) and asks for one change: set a variable, replace a number, rename a name, swap an
operation, print something more, print something else, or none at all ("run this code"). The
reply is the whole block again with that one change, every other line copied as it was; the chat then runs it like any other
block. The evaluation (scripts/eval_demo.py) writes its own programs and requests, with other
names, numbers and phrasings.
"""

from __future__ import annotations

import contextlib
import io
import random
import re
from dataclasses import dataclass

WORDS = ["a", "b", "c", "x", "y", "z", "n", "m", "k", "total", "count", "price", "width", "height", "size",
         "speed", "score", "step", "value", "rate", "days", "items", "base", "start", "end", "cost", "apples",
         "pears", "length", "area", "result", "extra", "bonus", "half", "double", "first", "second", "low",
         "high", "num", "amount", "money", "age", "year", "pages", "cars", "eggs", "cats", "row", "col"]
SUFFIXES = ["count", "total", "value", "size", "sum", "max", "min", "rate", "len", "num"]
FUNCTIONS = ["add", "area", "scale", "combine", "mix", "calc", "compute", "grow", "shift", "f", "g", "apply",
             "twice", "step", "blend", "join_values", "make_total", "get_cost", "work", "volume"]
PARAMS = [("p", "q"), ("a", "b"), ("x", "y"), ("u", "v"), ("left", "right"), ("first", "second"),
          ("width", "height"), ("n", "m"), ("base", "extra")]
LOOP_VARS = ["i", "j", "k", "n", "step", "day", "item"]
OPS = ["+", "-", "*"]
OP_NOUN = {"+": "sum", "-": "difference", "*": "product"}
OP_VERB = {"+": "add", "-": "subtract", "*": "multiply"}
OP_GERUND = {"+": "adding", "-": "subtracting", "*": "multiplying"}


@dataclass
class CodeEdit:
    """A request with the block it shows, and the block rewritten with the change."""

    request: str  # the person's whole message, block included
    code: str  # the block shown
    edited: str  # the block rewritten
    printed: str  # what the rewritten block prints
    final: str  # the sentence that states the result, once the output is known


def run_program(code: str) -> str:
    """What `code` prints (the generators' own short programs: no input, no imports)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "<edit>", "exec"), {})  # noqa: S102 - programs written by the generators
    return out.getvalue()


def final_sentence(printed: str) -> str:
    """"The answer is 42." for one line of output, "It prints 3, 4 and 12." for several."""
    lines = printed.strip().splitlines() or [""]
    if len(lines) == 1:
        return f"The answer is {lines[0]}."
    return "It prints " + ", ".join(lines[:-1]) + " and " + lines[-1] + "."


# -- programs ----------------------------------------------------------------------------------
def _name(rng: random.Random, taken: set[str]) -> str:
    while True:
        name = rng.choice(WORDS)
        if rng.random() < 0.25:
            name = f"{rng.choice(WORDS)}_{rng.choice(SUFFIXES)}" if len(name) > 1 else name
        if name not in taken:
            taken.add(name)
            return name


def _literal(rng: random.Random) -> int:
    return rng.choice([rng.randint(0, 9), rng.randint(2, 20), rng.randint(10, 99), rng.randint(100, 999)])


def _variables(rng: random.Random, taken: set[str], count: int) -> tuple[list[str], list[str]]:
    names = [_name(rng, taken) for _ in range(count)]
    return [f"{n} = {_literal(rng)}" for n in names], names


def _vars_program(rng: random.Random, taken: set[str]) -> list[str]:
    lines, names = _variables(rng, taken, rng.randint(2, 4))
    for _ in range(rng.randint(1, 3)):
        a, b = rng.sample(names, 2)
        target = _name(rng, taken)
        lines.append(f"{target} = {a} {rng.choice(OPS)} {b}")
        names.append(target)
    for printed in rng.sample(names[-3:], rng.randint(1, 2)):
        lines.append(f"print({printed})")
    return lines


def _function_program(rng: random.Random, taken: set[str]) -> list[str]:
    fname = rng.choice([f for f in FUNCTIONS if f not in taken])
    taken.add(fname)
    p, q = rng.choice([pq for pq in PARAMS if not set(pq) & taken])
    lines = [f"def {fname}({p}, {q}):"]
    if rng.random() < 0.5:
        lines.append(f"    return {p} {rng.choice(OPS)} {q}")
    else:
        inner = rng.choice([n for n in ["s", "r", "t", "out", "res"] if n not in taken])
        lines += [f"    {inner} = {p} {rng.choice(OPS)} {q}", f"    return {inner} {rng.choice(OPS)} {rng.randint(1, 9)}"]
    lines.append("")
    taken.update((p, q))
    defs, names = _variables(rng, taken, rng.randint(2, 3))
    lines += defs
    a, b = rng.sample(names, 2)
    if rng.random() < 0.5:
        lines.append(f"print({fname}({a}, {b}))")
    else:
        target = _name(rng, taken)
        lines += [f"{target} = {fname}({a}, {b})", f"print({target})"]
    return lines


def _loop_program(rng: random.Random, taken: set[str]) -> list[str]:
    acc = _name(rng, taken)
    var = rng.choice([v for v in LOOP_VARS if v not in taken])
    taken.add(var)
    lines = []
    if rng.random() < 0.5:
        defs, names = _variables(rng, taken, 1)
        lines += defs
        limit = names[0]
        lines[0] = f"{limit} = {rng.randint(2, 12)}"
        bound = f"range({rng.randint(0, 2)}, {limit})" if rng.random() < 0.5 else f"range({limit})"
    else:
        bound = f"range({rng.randint(0, 3)}, {rng.randint(4, 15)})" if rng.random() < 0.6 else f"range({rng.randint(3, 12)})"
    lines.append(f"{acc} = {rng.randint(0, 5)}")
    lines.append(f"for {var} in {bound}:")
    body = rng.choice([f"    {acc} += {var}", f"    {acc} = {acc} + {var}", f"    {acc} += {var} * {rng.randint(2, 9)}",
                       f"    {acc} = {acc} + {var} * {var}", f"    {acc} -= {var}"])
    lines.append(body)
    lines.append(f"print({acc})")
    return lines


def make_program(rng: random.Random) -> str:
    """A block of 4 to 12 lines."""
    taken: set[str] = set()
    parts = rng.sample([_vars_program, _function_program, _loop_program], rng.choice([1, 1, 2]))
    lines: list[str] = []
    for part in parts:
        more = part(rng, taken)
        if lines and len(lines) + len(more) > 12:
            break
        lines += ([""] if lines and (more[0].startswith("def") or lines[-1].startswith("    ")) else []) + more
    while len(lines) < 4:
        extra, names = _variables(rng, taken, 1)
        lines = extra + lines
    return "\n".join(lines)


# -- the changes -------------------------------------------------------------------------------
def _top_level_names(code: str) -> list[str]:
    return [m[1] for m in re.finditer(r"^(\w+) = ", code, re.M)]


def _set_variable(rng, code):
    choices = [m for m in re.finditer(r"^(\w+) = (\d+)$", code, re.M)]
    if not choices:
        return None
    m = rng.choice(choices)
    name, old = m[1], int(m[2])
    new = rng.choice([v for v in [_literal(rng), old + rng.randint(1, 9), old * 2 + 1] if v != old] or [old + 1])
    edited = code[: m.start()] + f"{name} = {new}" + code[m.end():]
    asks = [f"change {name} to {new}", f"set {name} to {new}", f"make {name} {new} instead of {old}",
            f"use {new} for {name}", f"{name} should be {new}", f"change the value of {name} to {new}",
            f"make {name} equal to {new}"]
    return rng.choice(asks), edited


def _replace_number(rng, code):
    counts: dict[str, int] = {}
    for n in re.findall(r"(?<![\w.])\d+(?![\w.])", code):
        counts[n] = counts.get(n, 0) + 1
    once = [n for n, c in counts.items() if c == 1]
    if not once:
        return None
    old = rng.choice(once)
    new = str(rng.choice([v for v in [_literal(rng), int(old) + rng.randint(1, 5)] if str(v) != old] or [int(old) + 1]))
    edited = re.sub(rf"(?<![\w.]){old}(?![\w.])", new, code)
    asks = [f"replace {old} with {new}", f"change {old} to {new}", f"use {new} instead of {old}",
            f"change the {old} into {new}", f"put {new} where it says {old}"]
    return rng.choice(asks), edited


def _rename(rng, code):
    names = sorted({n for pair in re.findall(r"^(\w+) = |^def (\w+)\(", code, re.M) for n in pair if n})
    if not names:
        return None
    old = rng.choice(names)
    taken = set(re.findall(r"\w+", code))
    new = _name(rng, taken)
    edited = re.sub(rf"\b{old}\b", new, code)
    asks = [f"rename {old} to {new}", f"call {old} {new} instead", f"change the name {old} to {new}",
            f"use the name {new} instead of {old}", f"rename the variable {old} to {new}"]
    if code.startswith("def") or f"def {old}(" in code:
        asks = [f"rename {old} to {new}", f"rename the function {old} to {new}", f"call the function {new} instead of {old}"]
    return rng.choice(asks), edited


def _swap_operation(rng, code):
    lines = code.split("\n")
    candidates = []
    for i, line in enumerate(lines):
        found = [op for op in OPS if f" {op} " in line]
        if len(found) == 1 and line.count(f" {found[0]} ") == 1 and code.count(f" {found[0]} ") == 1:
            candidates.append((i, found[0]))
    if not candidates:
        return None
    i, old = rng.choice(candidates)
    new = rng.choice([op for op in OPS if op != old])
    lines[i] = lines[i].replace(f" {old} ", f" {new} ")
    asks = [f"use {new} instead of {old}", f"{OP_VERB[new]} instead of {OP_GERUND[old]}",
            f"compute the {OP_NOUN[new]} instead of the {OP_NOUN[old]}",
            f"make it print the {OP_NOUN[new]} instead of the {OP_NOUN[old]}",
            f"change the {old} to {new}", f"replace {old} with {new}"]
    return rng.choice(asks), "\n".join(lines)


def _add_print(rng, code):
    names = _top_level_names(code)
    if not names:
        return None
    x = rng.choice(names)
    k = rng.randint(2, 12)
    line, asks = rng.choice([
        (f"print({x} ** 2)", [f"add a line that prints {x} squared", f"also print {x} squared",
                              f"print {x} squared at the end", f"add a print of {x} squared"]),
        (f"print({x} * {k})", [f"add a line that prints {x} times {k}", f"also print {x} times {k}",
                               f"print {x} times {k} at the end"]),
        (f"print({x} + {k})", [f"add a line that prints {x} plus {k}", f"also print {x} plus {k}",
                               f"print {x} plus {k} at the end"]),
        (f"print({x})", [f"add a line that prints {x}", f"also print {x}", f"print {x} at the end",
                         f"add a print of {x}"]),
        (f"print({x} * 2)", [f"add a line that prints {x} doubled", f"also print double {x}"]),
    ])
    return rng.choice(asks), code + "\n" + line


def _print_other(rng, code):
    lines = code.split("\n")
    m = re.fullmatch(r"print\((\w+)\)", lines[-1])
    if not m:
        return None
    others = [n for n in _top_level_names(code) if n != m[1]]
    if not others:
        return None
    y = rng.choice(others)
    lines[-1] = f"print({y})"
    asks = [f"make it print {y} instead of {m[1]}", f"print {y} instead of {m[1]}", f"show {y} rather than {m[1]}",
            f"change the last line to print {y}"]
    return rng.choice(asks), "\n".join(lines)


def _unchanged(rng, code):
    """No change: run the block as shown. Copying a block whole is most of every edit, and
    a tiny model learns it sooner from requests that are nothing but the copy."""
    return rng.choice(["run this code", "run it as it is", "run this", "run this code and tell me what it prints",
                       "what does this print", "run my code"]), code


CHANGES = [(_set_variable, 5), (_replace_number, 2), (_rename, 4), (_swap_operation, 4), (_add_print, 4), (_print_other, 2),
           (_unchanged, 4)]

FRAMES = [
    "{Ask}.\n\n```python\n{code}\n```",
    "{Ask}:\n```python\n{code}\n```",
    "```python\n{code}\n```\n{Ask}.",
    "```python\n{code}\n```\n\n{Ask}, please.",
    "Rewrite this code with one change: {ask}.\n\n```python\n{code}\n```",
    "Rewrite this code with one change: {ask}.\n```python\n{code}\n```",
    "Here is my code:\n\n```python\n{code}\n```\n\nCan you {ask}?",
    "In this code, {ask}.\n\n```python\n{code}\n```",
    "Please {ask} in this code:\n\n```python\n{code}\n```",
    "```python\n{code}\n```\nRewrite it and {ask}.",
    "Edit the code: {ask}.\n```python\n{code}\n```",
]

RUN_FRAMES = [
    "{Ask}.\n\n```python\n{code}\n```",
    "{Ask}:\n```python\n{code}\n```",
    "```python\n{code}\n```\n{Ask}?",
    "```python\n{code}\n```\n\n{Ask}, please.",
    "Here is my code:\n\n```python\n{code}\n```\n\nCan you {ask}?",
]


def make_code_edit(rng: random.Random) -> CodeEdit:
    """A program and one change to it, asked in one of several ways."""
    while True:
        code = make_program(rng)
        changes, weights = zip(*CHANGES)
        change = rng.choices(changes, weights=weights)[0]
        done = change(rng, code)
        if done is None or (done[1] == code) != (change is _unchanged) or len(done[1].split("\n")) > 13:
            continue
        ask, edited = done
        try:
            printed = run_program(edited)
        except Exception:  # noqa: BLE001 - a change that broke the program: draw another
            continue
        if not printed.strip() or len(printed) > 60 or printed.count("\n") > 3:
            continue
        frame = rng.choice(RUN_FRAMES if change is _unchanged else FRAMES)
        request = frame.replace("{Ask}", ask[0].upper() + ask[1:]).replace("{ask}", ask).replace("{code}", code)
        return CodeEdit(request, code, edited, printed.rstrip("\n"), final_sentence(printed))
