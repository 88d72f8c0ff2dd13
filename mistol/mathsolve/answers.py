"""Final answers: finding them in a reply, reading them as math, and deciding whether two agree.

`extract_answer(reply)` finds what a reply commits to: the last `\\boxed{}`, else the last
"The answer is ..." / "Answer: ..." / "#### ...", else a closing "x = ..." line, else the last
number after the code's output. `reference_answer(record)` does the same for a data set's
record (GSM8K's "#### N", MATH's `answer` or the `\\boxed{}` of its `solution`).

`is_equivalent(predicted, reference)` reads both as values with sympy, so that `1/2`, `0.5`,
`\\frac{1}{2}` and `50%` of a whole agree, after clearing what is not math: `$`, thousands
commas, units and other trailing words, `\\text{}`, `^\\circ`, `\\left`/`\\right`. Several
solutions (`x = 2 or x = 3`, `[2, 3]`, `\\{2, 3\\}`) compare as sets; `(1, 2)` as an ordered pair.

Model text is never `eval`ed as it stands: sympy's parser evaluates Python, so an expression
reaches it only when every name in it is on a short list and no `.` follows a name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

# -- finding the answer in a reply ----------------------------------------------------------
_ANSWER_IS = re.compile(r"\banswer\s*(?:is|would be|will be|:|=)\s*:?", re.IGNORECASE)
_HASHES = re.compile(r"####")
_OUTPUT_BLOCK = re.compile(r"Output:\n```\n(.*?)\n```", re.DOTALL)
_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?(?:\s*/\s*\d+)?%?|-?\$?\.\d+%?")
_ASSIGNMENT_LINE = re.compile(r"^[\s$\\(]*[a-zA-Z]\w*\s*=\s*\S")


def last_boxed(text: str) -> str | None:
    """The contents of the last `\\boxed{...}` (or `\\fbox{...}`), braces balanced."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0 or text[start:i].strip() not in ("\\boxed", "\\fbox"):
        m = re.match(r"\\boxed\s+([^\s$]+)", text[start:])  # \boxed 5
        return m[1] if m else None
    return _balanced(text, i)


def _balanced(text: str, open_at: int) -> str | None:
    """The text inside the braces that open at `open_at`."""
    depth = 0
    for j in range(open_at, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[open_at + 1 : j]
    return None


def _sentence(text: str) -> str:
    """What follows "the answer is", up to the end of its sentence."""
    text = text.strip().split("\n")[0]
    # A period ends the sentence when a space and a capital, or nothing, follows it (not 3.5).
    text = re.split(r"\.\s+(?=[A-Z])", text)[0]
    return text.strip().rstrip(".").strip()


def extract_answer(reply: str) -> str | None:
    """The answer a reply commits to, as written (normalize it with `parse_answer`)."""
    if (boxed := last_boxed(reply)) is not None:
        return boxed.strip()
    tail = reply.rsplit("\n```\n", 1)[-1] if _OUTPUT_BLOCK.search(reply) else reply
    for pattern in (_ANSWER_IS, _HASHES):
        for text in (tail, reply):  # the last statement wins ("Answer: the final answer is 7")
            found = [s for m in pattern.finditer(text) if (s := _sentence(text[m.end():]))]
            if found:
                return found[-1]
    lines = [line.strip() for line in tail.strip().splitlines() if line.strip()]
    if lines and _ASSIGNMENT_LINE.match(lines[-1]):
        return lines[-1].rstrip(".")
    if numbers := _NUMBER.findall(tail.replace("```", "")):
        return numbers[-1].strip()
    if outputs := _OUTPUT_BLOCK.findall(reply):
        out_lines = [line.strip() for line in outputs[-1].splitlines() if line.strip()]
        if out_lines:
            return out_lines[-1]
    if numbers := _NUMBER.findall(reply):
        return numbers[-1].strip()
    return None


def code_output_answer(reply: str) -> str | None:
    """The last line the reply's last code run printed (what a code-checked answer must match)."""
    outputs = _OUTPUT_BLOCK.findall(reply)
    if not outputs:
        return None
    lines = [line.strip() for line in outputs[-1].splitlines() if line.strip()]
    return lines[-1] if lines else None


def reference_answer(record: dict) -> str | None:
    """The reference answer of a data set record: GSM8K, MATH/PRM800K or mistol's own."""
    question = record.get("question")
    if isinstance(question, dict):  # PRM800K's labelled files: {"question": {"problem", "ground_truth_answer"}}
        return question.get("ground_truth_answer") or reference_answer(question)
    answer = record.get("answer")
    if isinstance(answer, (int, float)):
        return str(answer)
    if isinstance(answer, str) and answer.strip():
        if "####" in answer:
            return answer.rsplit("####", 1)[1].strip()
        return answer.strip()
    for key in ("ground_truth_answer", "solution"):
        value = record.get(key)
        if isinstance(value, str) and value:
            return last_boxed(value) if key == "solution" else value.strip()
    return None


# -- reading an answer as math --------------------------------------------------------------
_MATH_WORDS = {"sqrt", "pi", "oo", "sin", "cos", "tan", "log", "ln", "exp", "and", "or"}
_SINGLE_LETTER_UNITS = {"m", "g", "s", "h", "l", "L", "K", "A", "V", "W", "J", "N"}
_FUNCTIONS = {"sqrt", "sin", "cos", "tan", "log", "ln", "exp"}
_TEXT_COMMANDS = ("\\text", "\\mbox", "\\textrm", "\\textbf", "\\textit", "\\mathrm", "\\mathbf",
                  "\\mathit", "\\operatorname")
_SAFE = re.compile(r"^[A-Za-z0-9\s+\-*/^().!]*$")


@dataclass
class Answer:
    """An answer read as math: one value, a set of solutions, an ordered tuple, or text."""

    kind: str  # "value", "set", "tuple" or "text"
    items: list[Any] = field(default_factory=list)  # sympy expressions, or str where unreadable
    percent: list[bool] = field(default_factory=list)  # an item was written as a percentage
    text: str = ""  # the normalized text, for comparing what sympy cannot read


def normalize_text(answer: str) -> str:
    """Clear an answer of what is not math: LaTeX spacing and wrappers, currency, thousands
    commas, degrees, `\\text{}`; `\\frac`-style LaTeX becomes plain `(a)/(b)`."""
    s = answer.strip()
    if (boxed := last_boxed(s)) is not None:
        s = boxed
    s = s.replace("{,}", ",")  # 10{,}000
    s = s.replace("−", "-").replace("–", "-").replace("×", "*").replace("÷", "/").replace("·", "*")
    s = s.replace("\\$", "").replace("$", "").replace("\\%", "%").replace("％", "%")
    s = re.sub(r"\\(?:left|right|big|Big|bigg|Bigg)\b\s*", "", s)
    s = s.replace("\\displaystyle", "")
    s = re.sub(r"\\(?:!|,|;|:| |quad|qquad)", " ", s).replace("~", " ")
    s = re.sub(r"\^\s*\{?\s*\\circ\s*\}?", "", s).replace("°", "").replace("\\degree", "")
    s = _unwrap(s, _TEXT_COMMANDS, " {} ")
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    s = re.sub(r"\\frac\s*(\d)\s*(\d)", r"\\frac{\1}{\2}", s)  # \frac12
    s = re.sub(r"\\frac\s*\{([^{}]*)\}\s*(\d)", r"\\frac{\1}{\2}", s)  # \frac{1}2
    s = _frac(s)
    s = re.sub(r"\\sqrt\s*(\d+|[a-zA-Z])", r"\\sqrt{\1}", s)
    s = _sqrt(s)
    s = s.replace("\\{", "[").replace("\\}", "]")
    replacements = {"\\pi": " pi ", "\\infty": " oo ", "\\cdot": "*", "\\times": "*", "\\div": "/",
                    "\\ln": " ln ", "\\log": " log ", "\\sin": " sin ", "\\cos": " cos ", "\\tan": " tan "}
    for latex, plain in replacements.items():
        s = s.replace(latex, plain)
    s = s.replace("{", "(").replace("}", ")")
    s = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", s)  # 1,234,567
    s = re.sub(r"(?<=\d) (?=\d{3}(?!\d))", "", s) if re.fullmatch(r"-?\d{1,3}( \d{3})+(\.\d+)?", s.strip()) else s
    s = re.sub(r"\b(?:USD|EUR|GBP|dollars?|euros?|cents?)\b", " ", s) if re.search(r"\d", s) else s
    s = s.replace("€", "").replace("£", "").replace("¥", "")
    s = re.sub(r"\s+", " ", s).strip().rstrip(".").strip()
    return s


def _unwrap(s: str, commands: tuple[str, ...], template: str) -> str:
    """Replace `\\cmd{inner}` by `template` with `inner` put in (braces balanced)."""
    changed = True
    while changed:
        changed = False
        for cmd in commands:
            i = s.find(cmd + "{")
            if i < 0:
                continue
            open_at = i + len(cmd)
            inner = _balanced(s, open_at)
            if inner is None:
                continue
            s = s[:i] + template.replace("{}", inner) + s[open_at + len(inner) + 2 :]
            changed = True
    return s


def _frac(s: str) -> str:
    while (i := s.find("\\frac{")) >= 0:
        num = _balanced(s, i + 5)
        j = i + 5 + len(num) + 2 if num is not None else -1
        while 0 <= j < len(s) and s[j] == " ":
            j += 1
        den = _balanced(s, j) if 0 <= j < len(s) and s[j] == "{" else None
        if num is None or den is None:
            return s.replace("\\frac", "")
        s = s[:i] + f"(({num})/({den}))" + s[j + len(den) + 2 :]
    return s


def _sqrt(s: str) -> str:
    while (i := s.find("\\sqrt")) >= 0:
        j = i + 5
        root = None
        if s[j:j + 1] == "[":
            k = s.find("]", j)
            if k < 0:
                return s.replace("\\sqrt", "sqrt")
            root, j = s[j + 1 : k], k + 1
        inner = _balanced(s, j) if s[j:j + 1] == "{" else None
        if inner is None:
            return s.replace("\\sqrt", "sqrt")
        body = f"sqrt({inner})" if root is None else f"(({inner})**(1/({root})))"
        s = s[:i] + body + s[j + len(inner) + 2 :]
    return s


def _split_top(s: str, separators: re.Pattern) -> list[str]:
    """Split at separators that lie outside any brackets."""
    parts, depth, start = [], 0, 0
    i = 0
    while i < len(s):
        c = s[i]
        if c in "([":
            depth += 1
        elif c in ")]":
            depth -= 1
        elif depth == 0 and (m := separators.match(s, i)):
            parts.append(s[start:i])
            i = start = m.end()
            continue
        i += 1
    parts.append(s[start:])
    return [p.strip() for p in parts if p.strip()]


_LIST_SEPARATORS = re.compile(r"\s*(?:,|;|\bor\b|\band\b)\s*")
_OR_AND = re.compile(r"\s*(?:;|\bor\b|\band\b)\s*")
_COMMA = re.compile(r"\s*,\s*")


def parse_answer(answer: str | None) -> Answer:
    """Read an answer (model-written or reference) as math."""
    if answer is None:
        return Answer("text", text="")
    s = normalize_text(answer)
    text = re.sub(r"\s+", "", s).lower()
    if not s:
        return Answer("text", text="")
    bracketed = len(s) >= 2 and s[0] in "[(" and s[-1] in "])" and _matching(s)
    if bracketed and s[0] == "(" and s[-1] == ")" and len(pair := _split_top(s[1:-1], _COMMA)) > 1:
        parts, kind = pair, "tuple"  # (1, 2): an ordered pair
    elif bracketed and s[0] == "[" and s[-1] == "]":
        parts = _split_top(s[1:-1], _LIST_SEPARATORS)
        kind = "set"
    else:
        separators = _LIST_SEPARATORS if re.search(r"\d\s*,\s+-?\d|=.*,", s) or _OR_AND.search(s) else _OR_AND
        parts = _split_top(s, separators)
        kind = "set" if len(parts) > 1 else "value"
    items, percent = [], []
    for part in parts:
        value, is_percent = _value(part)
        items.append(value)
        percent.append(is_percent)
    if kind == "value" and isinstance(items[0], str):
        return Answer("text", items, percent, text)
    return Answer(kind, items, percent, text)


def _matching(s: str) -> bool:
    """The first bracket closes at the very end (not "(1)+(2)")."""
    depth = 0
    for i, c in enumerate(s):
        depth += c in "(["
        depth -= c in ")]"
        if depth == 0:
            return i == len(s) - 1
    return False


def _value(part: str) -> tuple[Any, bool]:
    """One item: a sympy expression where it reads as one, else its normalized text."""
    s = part.strip()
    s = re.sub(r"^(?:[a-zA-Z]\w*(?:\([a-z]\))?|\\[a-z]+)\s*=\s*", "", s)  # x = 5, f(x) = 5
    s = re.sub(r"^\s*(?:[a-zA-Z]\w*\s*)?(?:≈|\\approx)\s*", "", s)
    is_percent = False
    if re.search(r"%|\bpercent\b", s):
        is_percent = True
        s = re.sub(r"%|\bpercent\b", " ", s)
    s = _strip_words(s)
    expr = _sympify(s)
    if expr is None:
        return re.sub(r"\s+", "", part).lower().strip("()"), False
    return expr, is_percent


def _strip_words(s: str) -> str:
    """Drop units and other words around a number: "3/4 of the pie", "5 cm", "about 12"."""
    if not re.search(r"\d", s):
        return s.strip()
    words = re.compile(r"[A-Za-z]{2,}(?:\^\d|\*\*\d|\d)?")
    tokens = re.sub(r"\s*(\^|\*\*)\s*", r"\1", s).split()  # "cm ^2": one word
    while tokens and _is_word(tokens[-1], words):
        tokens.pop()
    while tokens and _is_word(tokens[0], words):
        tokens.pop(0)
    if len(tokens) >= 2 and tokens[-1] in _SINGLE_LETTER_UNITS and re.search(r"\d$", tokens[-2]):
        tokens.pop()
    s = " ".join(tokens)
    s = re.sub(r"(?<=\d)\s*(?:[a-zA-Z]{2,})$", lambda m: "" if m[0].strip() not in _MATH_WORDS else m[0], s)
    return s.strip()


def _is_word(token: str, words: re.Pattern) -> bool:
    token = token.strip(".,:;")
    return bool(words.fullmatch(token)) and token.lower() not in _MATH_WORDS or token in ("", "'s")


def _sympify(s: str):
    """A sympy expression for `s`, or None where it does not read as math (or is not safe to)."""
    if not s or len(s) > 200 or not _SAFE.match(s) or "__" in s:
        return None
    names = set(re.findall(r"[A-Za-z_]\w*", s))
    if any(len(n) > 1 and n not in _MATH_WORDS for n in names) or re.search(r"[A-Za-z_]\s*\.", s):
        return None
    if re.search(r"\d{60,}", s):
        return None
    try:
        import sympy
        from sympy.parsing.sympy_parser import (
            convert_xor, implicit_multiplication_application, parse_expr, standard_transformations,
        )
    except ImportError:  # pragma: no cover - sympy is a dependency of mistol
        from ..errors import MistolError

        raise MistolError("grading math answers needs sympy: pip install sympy") from None
    local = {n: sympy.Symbol(n) for n in names if len(n) == 1}
    local.update({f: getattr(sympy, f) for f in _FUNCTIONS - {"ln"}})
    local.update(i=sympy.I, pi=sympy.pi, oo=sympy.oo, ln=sympy.log)
    transformations = standard_transformations + (implicit_multiplication_application, convert_xor)
    try:
        expr = parse_expr(s, local_dict=local, transformations=transformations, evaluate=False)
    except Exception:
        return None
    if not isinstance(expr, sympy.Basic) or _too_big(expr):
        return None
    try:
        return expr.doit()
    except Exception:
        return None


def _too_big(expr) -> bool:
    """Powers and factorials that would take long to evaluate (9^9^9, 10000!)."""
    import sympy

    for node in sympy.preorder_traversal(expr):
        if isinstance(node, sympy.Pow) and node.exp.is_number:
            try:
                if abs(float(node.exp)) > 10_000:
                    return True
            except (TypeError, ValueError):
                return True
            if not node.exp.is_Atom and _too_big(node.exp):
                return True
        if isinstance(node, sympy.factorial) and node.args[0].is_number and abs(float(node.args[0])) > 1000:
            return True
    return False


# -- comparing -----------------------------------------------------------------------------
REL_TOL = 1e-6


def is_equivalent(predicted: str | None, reference: str | None) -> bool:
    """Whether a predicted answer states the reference answer."""
    if predicted is None or reference is None:
        return False
    p, r = parse_answer(predicted), parse_answer(reference)
    if not p.text or not r.text:
        return False
    if p.text == r.text:
        return True
    return answers_agree(p, r)


def answers_agree(p: Answer, r: Answer) -> bool:
    if p.kind == "text" or r.kind == "text":
        return p.text == r.text or (len(p.items) == len(r.items) == 1 and _items_equal(p, 0, r, 0))
    if p.kind == "tuple" or r.kind == "tuple":
        return p.kind == r.kind and len(p.items) == len(r.items) and all(
            _items_equal(p, i, r, i) for i in range(len(p.items)))
    # values and sets: each solution of one is a solution of the other
    return (all(any(_items_equal(p, i, r, j) for j in range(len(r.items))) for i in range(len(p.items)))
            and all(any(_items_equal(p, i, r, j) for i in range(len(p.items))) for j in range(len(r.items))))


def _items_equal(p: Answer, i: int, r: Answer, j: int) -> bool:
    a, b = p.items[i], r.items[j]
    if isinstance(a, str) or isinstance(b, str):
        return str(a) == str(b)
    if values_equal(a, b):
        return True
    # "50%" states 0.5 as well as 50; either side may be the percentage
    if p.percent[i] and not r.percent[j] and values_equal(a / 100, b):
        return True
    return r.percent[j] and not p.percent[i] and values_equal(a, b / 100)


def values_equal(a, b) -> bool:
    import sympy

    try:
        if a == b:
            return True
        if a.is_number and b.is_number:
            x, y = complex(sympy.N(a, 30)), complex(sympy.N(b, 30))
            return abs(x - y) <= REL_TOL * max(1.0, abs(y))
        return sympy.simplify(a - b) == 0
    except Exception:
        return False
