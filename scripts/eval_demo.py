#!/usr/bin/env python3
"""Evaluate the demo model through the real chat code path, greedy, on questions it never saw.

Each turn goes through `mistol chat`'s own machinery (ChatApp, LocalLLM, the code-block
detector, the sandbox). Three sets:

- plain: questions of the training generator's single-question kind (mistol/demo_problems.py),
  drawn with another seed, one per conversation (/reset after each);
- paraphrases: questions written by this file's own generator, with templates and number
  ranges that the training data (mistol/demo_dialogues.py) does not use, one per conversation;
- conversations: 10-turn conversations of such questions, with some runs declined (the
  person answers n) and some questions outside arithmetic, without /reset;
- duo: `mistol duo` lines between two demo agents with personas and topics of its own: the
  opener's lines must ask an arithmetic question, the other's must answer it rightly;
- code edits: a short Python block shown with one change asked for, programs, names, numbers
  and phrasings of this file's own (the training's are in mistol/demo_code_edits.py), one per
  conversation, the run allowed: right when the rewritten block is the expected one exactly,
  or prints what the expected one prints.

A turn is right when the sentence after the code's output states the right number (a
declined run: states the right number, or says that the code must run and states none; a
question outside arithmetic: the refusal). A reply is gibberish when it has neither a
well-formed code block, a stated number, nor the refusal.

    python scripts/eval_demo.py                  # all the sets, seed 2024 (training used 1234)
    python scripts/eval_demo.py --sets paraphrases -n 50 --verbose
    python scripts/eval_demo.py --model /tmp/demo --sets code --edits 40
"""

from __future__ import annotations

import argparse
import contextlib
import io
import random
import re
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mistol.chat.log import ChatLog  # noqa: E402
from mistol.chat.repl import ChatApp, ChatOptions  # noqa: E402
from mistol.demo_problems import make_problem  # noqa: E402
from mistol.engine import Engine  # noqa: E402
from mistol.errors import run_script  # noqa: E402
from mistol.llm import LocalLLM  # noqa: E402
from mistol.sampling import SamplingParams  # noqa: E402
from mistol.sandbox.code_turn import CODE_SYSTEM_PROMPT, CodeOptions, CodeRunner  # noqa: E402

REFUSAL_MARK = "I can only do arithmetic"
NUMBER = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?(?:e[-+]?\d+)?")
CODE_BLOCK = re.compile(r"```python\n.*?\S.*?\n```", re.S)


# -- the evaluation's own questions ----------------------------------------------------------
@dataclass
class Item:
    kind: str
    question: str
    value: float | None  # None: outside arithmetic, the refusal is expected
    small: bool = False  # one-digit operands: may be answered in words when the code is declined


WORDS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
         "sixteen seventeen eighteen nineteen").split()
TENS = {2: "twenty", 3: "thirty", 4: "forty", 5: "fifty", 6: "sixty", 7: "seventy", 8: "eighty", 9: "ninety"}


def spelled(n: int) -> str:
    if n < 20:
        return WORDS[n]
    return TENS[n // 10] + ("" if n % 10 == 0 else "-" + WORDS[n % 10])


# Questions outside arithmetic, none of them in the training data.
OUTSIDE = ["Who painted the Mona Lisa?", "What is the capital of Australia?", "Write a limerick about a frog.",
           "How do I make pancakes?", "What's your favourite colour?", "Explain quantum computing simply.",
           "Which planet is the largest?", "Can you recommend a movie for tonight?",
           "How do I reverse a string in JavaScript?", "Tell me something interesting about octopuses.",
           "What language is spoken in Brazil?", "Write a short thank-you note to a friend."]


def paraphrase(rng: random.Random, small: bool = False) -> Item:
    """An arithmetic question phrased unlike the training data, with its value."""
    if small:
        a, b, op = rng.randint(1, 9), rng.randint(1, 9), rng.choice("+*")
        value = a + b if op == "+" else a * b
        name = "plus" if op == "+" else "times"
        q = rng.choice([f"Hey, what do you get for {a}{op}{b}?", f"I'd like to know {a} {op} {b}.",
                        f"What's {spelled(a)} {name} {spelled(b)}?", f"Tell me what {a} {name} {b} makes."])
        return Item("small", q, value, small=True)
    kind = rng.choice(["add", "sub", "mul", "div", "square", "cube", "percent", "words"])
    if kind == "add":
        a, b = rng.randint(150, 60000), rng.randint(150, 60000)
        q = rng.choice([f"Can you add {a} and {b} for me?", f"Please compute {a} + {b}.", f"what's {a}+{b}",
                        f"I'd like the sum of {a} and {b}, please.", f"{a} plus {b} equals what?"])
        value = a + b
    elif kind == "sub":
        a, b = rng.randint(1000, 60000), rng.randint(150, 9999)
        q = rng.choice([f"Please compute {a} - {b}.", f"what's {a}-{b}?", f"{a} minus {b} equals what?",
                        f"Subtract {b} from {a}, please.", f"Work out the difference between {a} and {b} for me."])
        value = a - b
    elif kind == "mul":
        a, b = rng.randint(11, 999), rng.randint(3, 99)
        q = rng.choice([f"What is {a}*{b}?", f"what's {a} times {b}", f"Multiply {a} and {b}, please.",
                        f"Please calculate {a}*{b}.", f"I'd like the product of {a} and {b}."])
        value = a * b
    elif kind == "div":
        b = rng.randint(2, 40)
        a = b * rng.randint(5, 400)
        q = rng.choice([f"What is {a} divided by {b}?", f"Divide {a} by {b}, please.", f"Please compute {a} / {b}.",
                        f"what's {a} divided by {b}"])
        value = a / b
    elif kind in ("square", "cube"):
        n = rng.randint(11, 60)
        e = 2 if kind == "square" else 3
        word = "squared" if e == 2 else "cubed"
        q = rng.choice([f"what's {n} {word}", f"What is {n} {word}?", f"Please compute {n} {word}.",
                        f"Could you tell me {n} {word}?"])
        value = n**e
    elif kind == "percent":
        p, m = rng.choice([10, 20, 30, 40, 60, 80, 12, 35]), rng.randint(20, 3000)
        q = rng.choice([f"What is {p} percent of {m}?", f"Please compute {p}% of {m}.", f"what's {p}% of {m}"])
        value = p * m / 100
    else:
        a, b, op = rng.randint(11, 60), rng.randint(11, 60), rng.choice(["plus", "times", "minus"])
        q = rng.choice([f"What is {spelled(a)} {op} {spelled(b)}?", f"Please compute {spelled(a)} {op} {spelled(b)}.",
                        f"what's {spelled(a)} {op} {spelled(b)}"])
        value = a + b if op == "plus" else a * b if op == "times" else a - b
    return Item(kind, q, value)


# The phrasings a new user tried first; they are always part of the paraphrase set.
FIRST_TRIED = [Item("sub", "Please compute 9876 - 1234.", 8642), Item("square", "what's 17 squared", 289),
               Item("div", "What is 1000 divided by 8?", 125), Item("mul", "What is 6*7?", 42),
               Item("mul", "What is 6 * 7?", 42), Item("words", "What is twelve times thirteen?", 156)]


# -- judging -----------------------------------------------------------------------------------
def numbers(text: str) -> list[float]:
    return [float(n) for n in NUMBER.findall(text.replace(",", ""))]


def same(x: float, y: float) -> bool:
    return abs(x - y) <= 1e-6 * max(1.0, abs(y))


def after_output(reply: str) -> str | None:
    """The text after the last Output block, or None when no code ran (or was declined)."""
    if "\nOutput:\n```\n" not in reply:
        return None
    return reply.rsplit("```\n", 1)[-1]


def is_gibberish(reply: str) -> bool:
    return not (CODE_BLOCK.search(reply) or NUMBER.search(reply) or REFUSAL_MARK in reply)


def is_right(item: Item, reply: str, declined: bool) -> bool:
    if item.value is None:
        return REFUSAL_MARK in reply and "```" not in reply
    tail = after_output(reply)
    if tail is None:
        return False
    stated = numbers(tail)
    if declined:
        return (bool(stated) and same(stated[-1], item.value)) or (not stated and "run the code" in tail)
    return bool(stated) and same(stated[-1], item.value)


# -- running -----------------------------------------------------------------------------------
class Evaluator:
    """One chat (ChatApp over the model) whose runs are allowed or declined turn by turn."""

    def __init__(self, model: str, log_dir: Path):
        self.decline = False
        self.runner = CodeRunner(CodeOptions(auto_yes=False), ask=lambda question: "n" if self.decline else "y",
                                 notice=lambda text: None)
        self.log = ChatLog.create(log_dir)
        self.engine = Engine.load(model)
        self.app = ChatApp(LocalLLM(self.engine), SamplingParams(temperature=0, max_tokens=200), self.log,
                           [{"role": "system", "content": CODE_SYSTEM_PROMPT}], ChatOptions(interactive=False),
                           self.runner)

    def turn(self, question: str, decline: bool = False) -> str:
        self.decline = decline
        with contextlib.redirect_stdout(io.StringIO()):
            self.app.user_turn(question)
        return self.app.messages[-1]["content"]

    def reset(self) -> None:
        self.app.command("/reset")

    def close(self) -> None:
        self.runner.close()
        self.log.close()


@dataclass
class Tally:
    right: int = 0
    turns: int = 0
    gibberish: int = 0

    def add(self, ok: bool, reply: str) -> None:
        self.right += ok
        self.turns += 1
        self.gibberish += is_gibberish(reply)

    def line(self, name: str) -> str:
        return (f"{name:13s} {self.right:4d}/{self.turns:<4d} right = {self.right / max(1, self.turns):6.1%}   "
                f"gibberish replies: {self.gibberish}")


def report(ok: bool, question: str, reply: str, verbose: bool, note: str = "") -> None:
    if verbose or not ok:
        print(f"{'ok ' if ok else 'BAD'}{note} {question!r} -> {reply!r}", file=sys.stderr)


def plain_set(ev: Evaluator, n: int, seed: int, verbose: bool) -> Tally:
    rng, tally = random.Random(seed), Tally()
    for _ in range(n):
        p = make_problem(rng)
        reply = ev.turn(p.question)
        tail = after_output(reply)
        ok = p.final in reply if p.code is None else tail is not None and p.final.rstrip(".") in tail
        tally.add(ok, reply)
        report(ok, p.question, reply, verbose)
        ev.reset()
    return tally


def paraphrase_set(ev: Evaluator, n: int, seed: int, verbose: bool) -> tuple[Tally, Counter, Counter]:
    rng, tally, seen, wrong = random.Random(seed), Tally(), Counter(), Counter()
    items = (FIRST_TRIED + [paraphrase(rng, small=rng.random() < 0.1) for _ in range(n)])[:n]
    for item in items:
        reply = ev.turn(item.question)
        ok = is_right(item, reply, declined=False)
        tally.add(ok, reply)
        seen[item.kind] += 1
        wrong[item.kind] += not ok
        report(ok, item.question, reply, verbose)
        ev.reset()
    return tally, seen, wrong


def conversation_set(ev: Evaluator, conversations: int, seed: int, verbose: bool) -> tuple[Tally, Tally, Counter]:
    """10-turn conversations; returns all turns, the declined turns, and right turns by position."""
    rng, tally, declined_tally, by_position = random.Random(seed + 1), Tally(), Tally(), Counter()
    for c in range(conversations):
        for position in range(10):
            roll = rng.random()
            item = Item("outside", rng.choice(OUTSIDE), None) if roll < 0.1 else paraphrase(rng, small=roll < 0.3)
            decline = item.value is not None and rng.random() < 0.25
            reply = ev.turn(item.question, decline)
            ok = is_right(item, reply, decline)
            tally.add(ok, reply)
            if decline:
                declined_tally.add(ok, reply)
            by_position[position] += ok
            report(ok, item.question, reply, verbose, f" [{c}.{position}{' declined' if decline else ''}]")
        ev.reset()
    return tally, declined_tally, by_position


DUO_CASTS = [("You are a teacher who quizzes pupils.", "You are a pupil.", "arithmetic practice"),
             ("You like puzzles.", "You are good with numbers.", "sums and products"),
             ("You are a quizmaster on the radio.", "You are a contestant.", "a maths quiz"),
             ("You are curious.", "You are patient.", "multiplication tables")]
EQUATION = re.compile(r"(-?\d+) ([-+*]) (-?\d+) = (-?\d+)")


def mentions(question: str, n: int) -> bool:
    text = question.lower()
    return re.search(rf"(?<![\w-]){n}(?!\w)", text) is not None or (0 <= n < 100 and spelled(n) in text)


def operands(text: str) -> list[int]:
    """The whole numbers in `text`, in digits or in words (up to ninety-nine)."""
    found = [int(float(n)) for n in NUMBER.findall(text)]
    words = sorted(((spelled(n), n) for n in range(100)), key=lambda w: -len(w[0]))
    rest = text.lower()
    for word, n in words:
        pattern = rf"(?<![\w-]){re.escape(word)}(?![\w-])"
        found += [n] * len(re.findall(pattern, rest))
        rest = re.sub(pattern, " ", rest)
    return found


def duo_set(engine, duos: int, verbose: bool) -> Tally:
    """The opener asks (a line with a number), the other answers with a true equation of the
    question's numbers."""
    from mistol.duo import Agent, Duo

    tally = Tally()
    for i in range(duos):
        asker, answerer, topic = DUO_CASTS[i % len(DUO_CASTS)]
        duo = Duo(Agent("Alice", asker, LocalLLM(engine)), Agent("Bob", answerer, LocalLLM(engine)), topic,
                  SamplingParams(temperature=0, max_tokens=120))
        question = ""
        for line_number in range(10):
            line = duo.step()
            if line_number % 2 == 0:  # a question: two numbers and an operation
                question, ok = line, len(operands(line)) >= 2 and re.search(r"[-+*x×]|plus|minus|times", line) is not None
            else:
                m = EQUATION.search(line)
                ok = bool(m) and mentions(question, int(m[1])) and mentions(question, int(m[3])) and \
                    eval(f"{m[1]} {m[2]} {m[3]}") == int(m[4])  # noqa: S307 - matched digits and an operator
            tally.add(ok, line)
            report(ok, f"duo {i}.{line_number}", line, verbose)
    return tally


# -- code edits ----------------------------------------------------------------------------------
@dataclass
class EditItem:
    kind: str
    request: str
    expected: str  # the block rewritten with the change
    output: str  # what it prints


EDIT_NAMES = ["points", "weight", "hours", "boxes", "miles", "level", "limit", "seats", "tax", "fee", "goal",
              "coins", "tickets", "depth", "radius", "balance", "marks", "players", "rounds", "total_cost",
              "big", "small", "w", "h", "d", "g"]
EDIT_FUNCS = ["double_it", "cost_of", "rect_area", "plus_tax", "score", "merge", "perimeter"]


def program_output(code: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "<expected>", "exec"), {})  # noqa: S102 - this file's own programs
    return out.getvalue().rstrip("\n")


def edit_program(rng: random.Random) -> tuple[list[str], list[str]]:
    """Lines of a program (4 to 12) and its top-level variables."""
    names = rng.sample(EDIT_NAMES, 6)
    shape = rng.choice(["sums", "function", "loop", "function and loop"])
    number = lambda: rng.choice([rng.randint(11, 60), rng.randint(1000, 3000), rng.randint(2, 9)])  # noqa: E731
    lines, top = [], []
    if shape == "sums":
        a, b, c, r = names[:4]
        lines += [f"{a} = {number()}", f"{b} = {number()}", f"{c} = {rng.randint(2, 9)}",
                  f"{r} = {a} {rng.choice('+-')} {b}", f"print({r} * {c})"]
        top += [a, b, c, r]
    if "function" in shape:
        f = rng.choice(EDIT_FUNCS)
        op = rng.choice("+-*")
        x, y = names[4], names[5]
        lines += [f"def {f}(value, other):", f"    return value {op} other", "", f"{x} = {number()}",
                  f"{y} = {number()}", f"print({f}({x}, {y}))"]
        top += [x, y]
    if "loop" in shape:
        acc, n = names[0], names[1]
        lines += ([""] if lines else []) + [f"{n} = {rng.randint(3, 9)}", f"{acc} = 0", f"for i in range(1, {n}):",
                                            f"    {acc} = {acc} + i * {rng.randint(2, 5)}", f"print({acc})"]
        top += [n, acc]
    return lines, top


def edit_item(rng: random.Random) -> EditItem:
    while True:
        lines, top = edit_program(rng)
        code = "\n".join(lines)
        kind = rng.choice(["set", "rename", "operation", "add print"])
        if kind == "set":
            targets = [i for i, line in enumerate(lines) if re.fullmatch(r"\w+ = \d+", line)]
            i = rng.choice(targets)
            name, old = lines[i].split(" = ")
            new = rng.choice([rng.randint(21, 80), int(old) + 10])
            edited = lines[:i] + [f"{name} = {new}"] + lines[i + 1:]
            ask = rng.choice([f"Could you change {name} to {new}?", f"Let {name} be {new}.",
                              f"Update {name} so that it is {new}.", f"Change {name} to {new}."])
        elif kind == "rename":
            old = rng.choice(top)
            new = rng.choice([n for n in ["answer", "output", "final", "grand", "acc", "q"] if n not in code])
            edited = [re.sub(rf"\b{old}\b", new, line) for line in lines]
            ask = rng.choice([f"Rename {old} to {new}.", f"Please call the variable {old} {new}.",
                              f"Rename {old} as {new} everywhere."])
        elif kind == "operation":
            found = [(i, op) for i, line in enumerate(lines) for op in "+-*" if f" {op} " in line]
            ops = [op for _, op in found]
            single = [(i, op) for i, op in found if ops.count(op) == 1
                      and sum(lines[i].count(f" {o} ") for o in "+-*") == 1]  # the line's only operation
            if not single:
                continue
            i, old = rng.choice(single)
            new = rng.choice([op for op in "+-*" if op != old])
            nouns = {"+": "sum", "-": "difference", "*": "product"}
            edited = lines[:i] + [lines[i].replace(f" {old} ", f" {new} ")] + lines[i + 1:]
            ask = rng.choice([f"Make it print the {nouns[new]} instead of the {nouns[old]}.",
                              f"Switch the {old} to {new}.", f"Use a {new} there instead of the {old}."])
        else:
            x = rng.choice(top)
            k = rng.randint(3, 9)
            extra, ask = rng.choice([(f"print({x} ** 2)", f"Add a line that prints {x} squared."),
                                     (f"print({x} ** 2)", f"Also show {x} squared."),
                                     (f"print({x} * {k})", f"At the end, print {x} times {k}.")])
            edited = lines + [extra]
        expected = "\n".join(edited)
        if expected == code:
            continue
        request = rng.choice([f"{ask}\n\n```python\n{code}\n```", f"```python\n{code}\n```\n{ask}",
                              f"Rewrite the code below, changing one thing. {ask}\n```python\n{code}\n```",
                              f"Take this program:\n```python\n{code}\n```\n{ask}"])
        return EditItem(kind, request, expected, program_output(expected))


def written_block(reply: str) -> str | None:
    m = re.search(r"```python\n(.*?)\n```", reply, re.S)
    return m[1] if m else None


def printed_output(reply: str) -> str | None:
    m = re.search(r"\nOutput:\n```\n(.*?)\n```", reply, re.S)
    return m[1] if m else None


def code_edit_set(ev: Evaluator, n: int, seed: int, verbose: bool) -> tuple[Tally, int, Counter, Counter]:
    """Returns the tally, how many blocks were exactly the expected ones, and per kind seen and wrong."""
    rng, tally, seen, wrong, exact = random.Random(seed + 2), Tally(), Counter(), Counter(), 0
    for _ in range(n):
        item = edit_item(rng)
        reply = ev.turn(item.request)
        same_block = written_block(reply) == item.expected
        ok = same_block or printed_output(reply) == item.output
        exact += same_block
        tally.add(ok, reply)
        seen[item.kind] += 1
        wrong[item.kind] += not ok
        report(ok, item.request, reply, verbose)
        ev.reset()
    return tally, exact, seen, wrong


SETS = ("plain", "paraphrases", "conversations", "duo", "code")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="demo")
    p.add_argument("-n", type=int, default=200, help="questions in the plain and the paraphrase sets")
    p.add_argument("--conversations", type=int, default=20, help="10-turn conversations (default: 20)")
    p.add_argument("--duos", type=int, default=4, help="10-line duos (default: 4)")
    p.add_argument("--edits", type=int, default=60, help="code-edit requests (default: 60)")
    p.add_argument("--sets", default=",".join(SETS))
    p.add_argument("--seed", type=int, default=2024)
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    sets = set(args.sets.split(","))
    if not sets or sets - set(SETS):
        p.error(f"--sets: comma-separated, of {','.join(SETS)}; not {args.sets!r}")
    with tempfile.TemporaryDirectory() as logs:
        ev = Evaluator(args.model, Path(logs))
        start = time.time()
        try:
            if "plain" in sets:
                print(plain_set(ev, args.n, args.seed, args.verbose).line("plain"), flush=True)
            if "paraphrases" in sets:
                tally, seen, wrong = paraphrase_set(ev, args.n, args.seed, args.verbose)
                print(tally.line("paraphrases"), flush=True)
                print("   " + ", ".join(f"{k} {seen[k] - wrong[k]}/{seen[k]}" for k in sorted(seen)))
            if "conversations" in sets:
                tally, declined, by_position = conversation_set(ev, args.conversations, args.seed, args.verbose)
                print(tally.line("conversations"))
                print(declined.line("  declined"))
                print("   right by turn: " + " ".join(f"{by_position[i]}" for i in range(10))
                      + f" (of {args.conversations} each)")
            if "duo" in sets:
                print(duo_set(ev.engine, args.duos, args.verbose).line("duo"), flush=True)
            if "code" in sets:
                tally, exact, seen, wrong = code_edit_set(ev, args.edits, args.seed, args.verbose)
                print(tally.line("code edits") + f"   block exactly as expected: {exact}")
                print("   " + ", ".join(f"{k} {seen[k] - wrong[k]}/{seen[k]}" for k in sorted(seen)))
        finally:
            ev.close()
        print(f"({time.time() - start:.0f} s)")


if __name__ == "__main__":
    run_script(main)
