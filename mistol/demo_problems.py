"""Arithmetic questions with their answers, and the code that answers them.

The demo model is trained on conversations built from these (scripts/train_demo.py) and
evaluated on fresh ones drawn with another seed (scripts/eval_demo.py).
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass
class Problem:
    kind: str
    question: str
    code: str | None  # None: answered in words (greetings)
    answer: str  # what the code prints, or the whole reply for greetings
    final: str  # the sentence that states the answer, once the output is known


GREETINGS = ["Hi!", "Hello", "Hello!", "Hey there", "Good morning!", "hi", "What can you do?",
             "Who are you?", "What can you help me with?", "Help"]
GREETING_REPLY = ("Hello! I am a tiny demo model: I answer arithmetic questions by writing short Python "
                  "programs. Try asking \"What is 37 * 48?\"")


def _pick(rng: random.Random, *options: str) -> str:
    return rng.choice(options)


def make_problem(rng: random.Random) -> Problem:
    kind = rng.choices(
        ["add", "sub", "mul", "div", "mod", "pow", "range", "linear", "quadratic", "greeting"],
        weights=[12, 12, 14, 8, 8, 7, 7, 10, 8, 4],
    )[0]
    n = lambda lo, hi: rng.randint(lo, hi)  # noqa: E731
    if kind == "greeting":
        return Problem(kind, rng.choice(GREETINGS), None, GREETING_REPLY, GREETING_REPLY)
    if kind == "add":
        a, b = n(0, 9999), n(0, 9999)
        q = _pick(rng, f"What is {a} + {b}?", f"Add {a} and {b}.", f"What is the sum of {a} and {b}?",
                  f"Compute {a} plus {b}.", f"Calculate {a}+{b}", f"{a} + {b} = ?")
        code, value = f"print({a} + {b})", a + b
    elif kind == "sub":
        a, b = n(0, 9999), n(0, 9999)
        q = _pick(rng, f"What is {a} - {b}?", f"Subtract {b} from {a}.", f"What is {a} minus {b}?",
                  f"Calculate {a}-{b}", f"What is the difference between {a} and {b}?")
        code, value = f"print({a} - {b})", a - b
    elif kind == "mul":
        a, b = n(2, 999), n(2, 999)
        q = _pick(rng, f"What is {a} * {b}?", f"Multiply {a} by {b}.", f"What is {a} times {b}?",
                  f"What is the product of {a} and {b}?", f"Calculate {a}*{b}", f"{a} x {b} = ?")
        code, value = f"print({a} * {b})", a * b
    elif kind == "div":
        a, b = n(10, 99999), n(2, 99)
        q = _pick(rng, f"What is {a} divided by {b}, rounded down?", f"What is {a} // {b}?",
                  f"How many times does {b} go into {a}?", f"Integer division: {a} by {b}?")
        code, value = f"print({a} // {b})", a // b
    elif kind == "mod":
        a, b = n(10, 99999), n(2, 99)
        q = _pick(rng, f"What is the remainder of {a} divided by {b}?", f"What is {a} mod {b}?",
                  f"What is {a} % {b}?", f"Find {a} modulo {b}.")
        code, value = f"print({a} % {b})", a % b
    elif kind == "pow":
        a, b = n(2, 20), n(2, 9)
        q = _pick(rng, f"What is {a} to the power of {b}?", f"What is {a}^{b}?", f"Compute {a}**{b}.",
                  f"What is {a} raised to {b}?")
        code, value = f"print({a} ** {b})", a**b
    elif kind == "range":
        a = n(0, 100)
        b = a + n(1, 900)
        q = _pick(rng, f"What is the sum of the integers from {a} to {b}?", f"Add up all numbers from {a} to {b}.",
                  f"What is the sum of all whole numbers between {a} and {b}, inclusive?")
        code, value = f"print(sum(range({a}, {b} + 1)))", sum(range(a, b + 1))
    elif kind == "linear":
        a, x, b = n(2, 30), n(-50, 50), n(-99, 99)
        c = a * x + b
        sign = "+" if b >= 0 else "-"
        q = _pick(rng, f"Solve {a}x {sign} {abs(b)} = {c}.", f"Solve for x: {a}x {sign} {abs(b)} = {c}",
                  f"Find x if {a}*x {sign} {abs(b)} = {c}.")
        code = f"a, b, c = {a}, {b}, {c}\nprint((c - b) // a)"
        value = x
        return Problem(kind, q, code, str(value), f"x = {value}.")
    else:  # quadratic with integer roots
        r1, r2 = sorted((n(-12, 12), n(-12, 12)))
        b, c = -(r1 + r2), r1 * r2
        terms = "x^2" + (f" + {b}x" if b > 0 else f" - {-b}x" if b < 0 else "") + (
            f" + {c}" if c > 0 else f" - {-c}" if c < 0 else "")
        q = _pick(rng, f"Solve {terms} = 0.", f"Find the roots of {terms} = 0.", f"Solve for x: {terms} = 0")
        code = (f"import math\na, b, c = 1, {b}, {c}\nd = math.isqrt(b * b - 4 * a * c)\n"
                f"print(sorted({{(-b - d) // (2 * a), (-b + d) // (2 * a)}}))")
        roots = sorted({r1, r2})
        answer = str(roots)
        final = f"x = {roots[0]}." if len(roots) == 1 else f"x = {roots[0]} or x = {roots[1]}."
        return Problem(kind, q, code, answer, final)
    return Problem(kind, q, code, str(value), f"The answer is {value}.")
