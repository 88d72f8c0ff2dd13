"""Whole conversations to train the demo model on: what it must do over many turns.

Each conversation is a system prompt and up to 10 exchanges; each reply is a list of
segments, the model's own text (learned) and the code runner's `Output:` blocks (not
learned). Besides the plain questions of `demo_problems.make_problem`, it mixes in:

- paraphrases: "compute", "calculate", "what's N squared", "divided by", "add A and B",
  "the sum/product/difference of", "N percent of M", numbers written in words, operators
  with and without spaces (`6*7` is a product);
- runs that were declined or that failed: the reply says that it needs to run the code (a
  tiny model's sums in its head are too often wrong to offer, even for one-digit numbers);
- questions outside arithmetic, answered by a short refusal that names the way out;
- code edits (mistol/demo_code_edits.py): a short block shown with one change asked for,
  answered with the whole block rewritten, which then runs like any other;
- a duo (`mistol duo`): one side asks small arithmetic questions, the other answers them in
  its head. Each side is rendered as mistol/duo.py feeds it (its persona as the system
  prompt, the other's lines as user turns); the answering side, whose sums must be learned
  by heart, is most of them.

The evaluation (scripts/eval_demo.py) writes its questions with other templates and other
number ranges, so it measures what carries over to phrasings never seen here.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from .demo_code_edits import make_code_edit
from .demo_problems import GREETING_REPLY, GREETINGS, make_problem
from .duo import agent_system_prompt
from .sandbox.code_turn import CODE_SYSTEM_PROMPT, DECLINED
from .sandbox.codeblocks import format_output

REFUSAL = ("I'm a tiny demo model: I can only do arithmetic. For a real assistant, run mistol chat "
           "--model <a real model>.")
NEEDS_CODE = ("I need to run the code to answer that. Answer y when I ask to run it (or start the chat "
              "with --yes), and ask again.")
FAILED = "The code failed, so I have no answer. Ask again and I will write it another way."
HERMES_SYSTEM_PROMPT = "You are Hermes, a helpful, honest and concise assistant."

ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
        "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


def in_words(n: int) -> str:
    """0..999 in English words ("forty-two", "three hundred and five")."""
    if n < 20:
        return ONES[n]
    if n < 100:
        return TENS[n // 10] + ("" if n % 10 == 0 else "-" + ONES[n % 10])
    rest = n % 100
    return ONES[n // 100] + " hundred" + ("" if rest == 0 else " and " + in_words(rest))


@dataclass
class Exchange:
    """One user line and the reply to it, as (text, learned) segments."""

    user: str
    reply: list[tuple[str, bool]] = field(default_factory=list)

    @property
    def content(self) -> str:
        return "".join(text for text, _ in self.reply)


@dataclass
class Question:
    """An arithmetic question, the code that answers it and what that code prints."""

    text: str
    code: str
    printed: str
    final: str
    small: str | None = None  # "6 * 7 = 42": small enough for a duo to answer without code


# -- questions ---------------------------------------------------------------------------------
def _number(rng: random.Random, lo: int = 0) -> int:
    digits = rng.choices([1, 2, 3, 4, 5], weights=[3, 4, 4, 3, 2])[0]
    return max(lo, rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1))


def _op_text(rng: random.Random, a: str, b: str, op: str) -> str:
    """`a op b` with or without spaces: "6*7", "6 * 7"."""
    return rng.choice([f"{a} {op} {b}", f"{a}{op}{b}", f"{a} {op} {b}", f"{a} {op}{b}" if rng.random() < 0.2 else f"{a}{op} {b}"])


def _wrap(rng: random.Random, body: str, verb_ok: bool = True) -> str:
    """A phrase around an expression: "What is 6*7?", "please compute 6*7", "what's 6*7"."""
    forms = [f"What is {body}?", f"what is {body}?", f"What's {body}?", f"what's {body}", f"{body}?", f"{body} = ?",
             f"How much is {body}?", f"Tell me {body}.", f"{body}", f"I want to know {body}.",
             f"Can you tell me {body}?", f"Give me {body}."]
    if verb_ok:
        forms += [f"Compute {body}.", f"Please compute {body}.", f"Calculate {body}.", f"calculate {body}",
                  f"Can you calculate {body}?", f"Could you compute {body}?", f"Work out {body}.",
                  f"Evaluate {body}.", f"Please calculate {body}", f"I need {body}."]
    text = rng.choice(forms)
    lead = rng.choice(["", "", "", "", "Hey, ", "Quick question: ", "OK. ", "Now ", "And "])
    return lead + (text[0].lower() + text[1:] if lead and text[1:2].islower() else text)


def _choose(rng: random.Random, words: bool, forms: list[str]) -> str:
    """One of `forms`; the first writes the operator as a sign, which numbers in words never take."""
    return rng.choice(forms[1:] if words else forms)


def _small_question(rng: random.Random) -> Question:
    """One-digit operands: what the two sides of a duo ask and answer in words."""
    op = rng.choice("+-*")
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    if op == "-" and b > a and rng.random() < 0.7:
        a, b = b, a
    value = eval(f"{a} {op} {b}")  # noqa: S307 - two digits and an operator
    spoken = {"+": "plus", "-": "minus", "*": "times"}[op]
    if rng.random() < 0.35:
        body = f"{in_words(a)} {spoken} {in_words(b)}"
    elif rng.random() < 0.3:
        body = f"{a} {spoken} {b}"
    else:
        body = _op_text(rng, str(a), str(b), op if op != "*" or rng.random() < 0.8 else "x")
    return Question(_wrap(rng, body), f"print({a} {op} {b})", str(value), f"The answer is {value}.",
                    f"{a} {op} {b} = {value}")


def _binary_question(rng: random.Random) -> Question:
    op = rng.choices(["+", "-", "*", "/", "//", "%"], weights=[5, 5, 6, 4, 1, 1])[0]
    a, b = _number(rng), _number(rng)
    if op == "*":
        a, b = _number(rng) % 10000, rng.choice([_number(rng) % 1000, rng.randint(2, 99)])
    if op in ("/", "//", "%"):
        b = rng.choice([rng.randint(1, 20), rng.randint(2, 999)])
        if op == "/" and rng.random() < 0.6:
            a = b * rng.randint(1, 999)  # an exact quotient, as people mostly ask
    if op in "+-*" and rng.random() < 0.2:  # two-digit numbers, which people write in words too
        a, b = rng.randint(0, 99), rng.randint(0, 99)
    words = rng.random() < 0.2 and a < 1000 and b < 1000 or a < 100 and b < 100 and rng.random() < 0.5
    x, y = (in_words(a), in_words(b)) if words else (str(a), str(b))
    if op == "+":
        body = _choose(rng, words, [_wrap(rng, _op_text(rng, x, y, "+")), _wrap(rng, f"{x} plus {y}"),
                           f"Add {x} and {y}.", f"add {x} and {y}", f"Please add {x} to {y}.",
                           _wrap(rng, f"the sum of {x} and {y}"), f"What do {x} and {y} add up to?"])
    elif op == "-":
        body = _choose(rng, words, [_wrap(rng, _op_text(rng, x, y, "-")), _wrap(rng, f"{x} minus {y}"),
                           f"Subtract {y} from {x}.", f"subtract {y} from {x}", f"Take {y} away from {x}.",
                           _wrap(rng, f"the difference between {x} and {y}"), _wrap(rng, f"the difference of {x} and {y}")])
    elif op == "*":
        sign = rng.choice(["*", "*", "*", "x", "×"])
        body = _choose(rng, words, [_wrap(rng, _op_text(rng, x, y, sign)), _wrap(rng, f"{x} times {y}"),
                           _wrap(rng, f"{x} multiplied by {y}"), f"Multiply {x} by {y}.", f"multiply {x} and {y}",
                           _wrap(rng, f"the product of {x} and {y}")])
    elif op == "/":
        body = _choose(rng, words, [_wrap(rng, _op_text(rng, x, y, "/")), _wrap(rng, f"{x} divided by {y}"),
                           f"Divide {x} by {y}.", f"divide {x} by {y}", _wrap(rng, f"{x} over {y}"),
                           f"How much is {x} divided by {y}?"])
    elif op == "//":
        body = _choose(rng, words, [_wrap(rng, _op_text(rng, x, y, "//")), _wrap(rng, f"{x} divided by {y}, rounded down"),
                           f"How many times does {y} go into {x}?"])
    else:
        body = _choose(rng, words, [_wrap(rng, _op_text(rng, x, y, "%")), _wrap(rng, f"{x} mod {y}"),
                           _wrap(rng, f"the remainder of {x} divided by {y}"), f"Find {x} modulo {y}."])
    value = eval(f"{a} {op} {b}")  # noqa: S307 - numbers and one operator
    return Question(body, f"print({a} {op} {b})", str(value), f"The answer is {value}.")


def _power_question(rng: random.Random) -> Question:
    kind = rng.choice(["squared", "cubed", "power", "percent", "percent"])
    if kind in ("squared", "cubed"):
        a = rng.choice([rng.randint(2, 30), rng.randint(2, 999)])
        e = 2 if kind == "squared" else 3
        x = in_words(a) if rng.random() < 0.15 else str(a)
        body = rng.choice([_wrap(rng, f"{x} {kind}"), _wrap(rng, f"the {'square' if e == 2 else 'cube'} of {x}"),
                           _wrap(rng, f"{x}^{e}", False), _wrap(rng, f"{x}**{e}", False)])
        code, value = f"print({a} ** {e})", a**e
    elif kind == "power":
        a, e = rng.randint(2, 25), rng.randint(2, 12)
        body = rng.choice([_wrap(rng, f"{a} to the power of {e}"), _wrap(rng, f"{a} to the {e}th power"),
                           _wrap(rng, f"{a} raised to the power {e}"), _wrap(rng, f"{a}^{e}", False)])
        code, value = f"print({a} ** {e})", a**e
    else:
        p = rng.choice([rng.randint(1, 100), rng.choice([5, 10, 15, 20, 25, 50, 75]), rng.randint(1, 300)])
        m = _number(rng, 1)
        pct = rng.choice([f"{p}%", f"{p} percent", f"{p} per cent", f"{p} %"])
        body = rng.choice([_wrap(rng, f"{pct} of {m}"), f"Find {pct} of {m}.", f"How much is {pct} of {m}?"])
        code, value = f"print({p} * {m} / 100)", p * m / 100
    return Question(body, code, str(value), f"The answer is {value}.")


def _plain_question(rng: random.Random) -> Question:
    """The original single-question generator (sums of ranges, equations...), greetings excluded."""
    p = make_problem(rng)
    while p.code is None:
        p = make_problem(rng)
    return Question(p.question, p.code, p.answer, p.final)


TAILS = [", please.", " please", " for me.", ", please?", " for me, please.", "! Thanks.", ", thanks", " now.",
         "?", "? Thanks!", ", if you can.", " quickly."]


def make_question(rng: random.Random) -> Question:
    make = rng.choices([_small_question, _binary_question, _power_question, _plain_question],
                       weights=[4, 8, 3, 4])[0]
    q = make(rng)
    if rng.random() < 0.25:  # a polite or chatty tail
        q.text = q.text.rstrip("?.!") + rng.choice(TAILS)
    if rng.random() < 0.08:
        q.text = q.text.lower()
    return q


OUTSIDE = [
    "What is the capital of {country}?", "Who wrote {book}?", "Write a poem about {thing}.", "Tell me a joke.",
    "Tell me a joke about {thing}.", "What's the weather like in {city}?", "How do I sort a list in Python?",
    "Translate 'good morning' into {language}.", "What is the meaning of life?", "Who are you working for?",
    "Can you write me an email to my boss?", "What is {thing}?", "Explain how {thing} works.",
    "Summarize this: the meeting is moved to Tuesday.", "What time is it?", "Recommend a good book.",
    "How tall is the Eiffel Tower?", "Write a story about {thing}.", "Who won the world cup?",
    "Is {city} a nice place to live?", "What should I cook tonight?", "How are you feeling today?",
    "what do you think about {thing}", "Give me advice about {thing}.", "Write a haiku.",
    "Describe {thing} in three words.", "why is the sky blue?", "How do I install Python?",
    "Tell me about {country}.", "What day is it today?", "Can you help me with my homework in {language}?",
    "Who invented {invention}?", "How do I {task}?", "Write a {form} about {thing}.", "Is {language} hard to learn?",
    "Who was {person}?", "Tell me a fun fact about {animal}.", "What do {animal} eat?", "How do you say thank you in {language}?",
    "Write a birthday message for my sister.", "Suggest a game to play with friends.", "How do I center a div in CSS?",
    "What is the population of {country}?", "Where is {city}?", "Why do {animal} sleep so much?",
]
FILL = {
    "country": ["France", "Japan", "Peru", "Kenya", "Canada", "Norway", "India", "Egypt"],
    "city": ["Paris", "Lima", "Oslo", "Tokyo", "Nairobi", "Boston", "Rome"],
    "book": ["Hamlet", "Don Quixote", "War and Peace", "Dracula", "Moby Dick"],
    "thing": ["the sea", "cats", "love", "photosynthesis", "a rainbow", "gravity", "the internet", "coffee",
              "a bicycle", "music", "winter", "dogs", "democracy", "the moon"],
    "language": ["French", "German", "Spanish", "Italian", "Chinese"],
    "invention": ["the telephone", "the light bulb", "the printing press", "the airplane", "the radio"],
    "task": ["bake bread", "learn to swim", "tie a tie", "change a tyre", "plant tomatoes", "write a CV"],
    "form": ["poem", "song", "story", "haiku", "letter", "riddle"],
    "person": ["Napoleon", "Cleopatra", "Einstein", "Shakespeare", "Gandhi"],
    "animal": ["cats", "dolphins", "owls", "elephants", "bees", "penguins"],
}


def outside_question(rng: random.Random) -> str:
    text = rng.choice(OUTSIDE)
    for key, values in FILL.items():
        text = text.replace("{" + key + "}", rng.choice(values))
    return text


FAILURES = [
    'Traceback (most recent call last):\n  File "<cell {n}>", line 1, in <module>\n    {code}\nNameError: name \'x\' is not defined\n',
    'Traceback (most recent call last):\n  File "<cell {n}>", line 1, in <module>\n    {code}\nSyntaxError: invalid syntax\n',
    "(the code could not be run: the sandbox could not start)",
    "SandboxError: the Python process running the code was killed; its variables are lost\n",
    "TimeoutError: the code ran longer than 10 s and was stopped; its variables are lost\n",
]


# -- conversations -----------------------------------------------------------------------------
def code_exchange(rng: random.Random, q: Question, cell: int, declined: float = 0.15, failed: float = 0.05) -> Exchange:
    """The code, then what the runner said, then the answer (or why there is none)."""
    block = f"```python\n{q.code}\n```"
    roll = rng.random()
    if roll < declined:
        output, after = DECLINED, NEEDS_CODE
    elif roll < declined + failed:
        output = rng.choice(FAILURES).format(n=cell, code=q.code)
        after = FAILED
    else:
        output, after = q.printed, q.final
    return Exchange(q.text, [(block, True), (format_output(output), False), (after, True)])


CODE_EDITS = 0.13  # the share of chat turns that ask to rewrite a block
DUOS = 0.15  # the share of conversations that are one side of a duo
DUO_ANSWERS = 0.7  # of those, the share on the answering side


def chat_conversation(rng: random.Random, turns: int) -> tuple[str, list[Exchange]]:
    """A `mistol chat` (or voice) conversation with the code prompt."""
    system = CODE_SYSTEM_PROMPT if rng.random() < 0.9 else HERMES_SYSTEM_PROMPT
    declined = rng.choice([0.0, 0.1, 0.2, 0.4])  # some people decline often, most never
    exchanges = []
    for i in range(turns):
        roll = rng.random()
        if roll < 0.13:  # anywhere in a conversation, not only at its start
            exchanges.append(Exchange(outside_question(rng), [(REFUSAL, True)]))
        elif roll < 0.16:
            exchanges.append(Exchange(rng.choice(GREETINGS), [(GREETING_REPLY, True)]))
        elif roll < 0.16 + CODE_EDITS:
            edit = make_code_edit(rng)
            exchanges.append(code_exchange(rng, Question(edit.request, edit.edited, edit.printed, edit.final), i + 1,
                                           declined))
        else:
            exchanges.append(code_exchange(rng, make_question(rng), i + 1, declined))
    return system, exchanges


PERSONAS = ["You are a curious student.", "You are a strict math teacher.", "You love numbers.",
            "You are a friendly robot.", "You are a pirate.", "You are a quiz master.", "You are Alice.",
            "a helpful assistant", "You ask questions.", "You answer questions.", "A calculator.", "A child."]
TOPICS = ["arithmetic", "math", "numbers", "multiplication", "sums", "mental arithmetic", "a quiz",
          "small numbers", "homework", "the weather", "anything"]
NAMES = [("Alice", "Bob"), ("Ann", "Ben"), ("Tutor", "Student"), ("Quiz", "Player"), ("Alice", "Bob")]


def duo_conversation(rng: random.Random, turns: int) -> tuple[str, list[Exchange]]:
    """One side of a `mistol duo`: the opener asks small questions, the other side answers."""
    (a, b), topic = rng.choice(NAMES), rng.choice(TOPICS)
    persona = rng.choice(PERSONAS)
    questions = [_small_question(rng) for _ in range(turns + 1)]
    exchanges = []
    if rng.random() >= DUO_ANSWERS:  # the asker, who opens
        system = agent_system_prompt(a, persona, b, topic)
        user = f"Let's talk about {topic}. You start."
        for i in range(turns):
            ask = questions[i].text
            if i and rng.random() < 0.5:
                ask = rng.choice(["Right! ", "Correct. ", "Good. ", "Yes. ", "Next: "]) + ask
            exchanges.append(Exchange(user, [(ask, True)]))
            user = f"{questions[i].small}."
    else:  # the answerer
        system = agent_system_prompt(b, persona, a, topic)
        for i in range(turns):
            exchanges.append(Exchange(questions[i].text, [(f"{questions[i].small}.", True)]))
    return system, exchanges


def make_conversation(rng: random.Random, turns: int) -> tuple[str, list[Exchange]]:
    """A system prompt and `turns` exchanges."""
    if rng.random() < DUOS:
        return duo_conversation(rng, turns)
    return chat_conversation(rng, turns)
