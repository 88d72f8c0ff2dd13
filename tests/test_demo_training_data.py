"""The demo model's training data: duo sides as `mistol duo` feeds them, code edits that are one change."""

from __future__ import annotations

import difflib
import importlib.util
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mistol.demo_code_edits import make_code_edit
from mistol.demo_dialogues import duo_conversation
from mistol.duo import Agent, Duo
from mistol.sampling import SamplingParams

ROOT = Path(__file__).resolve().parent.parent


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


class ScriptedLLM:
    """Says the given lines in turn and records each prompt it is given, rendered by the
    demo model's tokenizer and chat template."""

    def __init__(self, template, lines):
        self.template, self.lines, self.prompts, self.last = template, list(lines), [], None

    def chat(self, messages, params, continue_last=False):
        self.prompts.append(self.template.render(messages))
        yield self.lines.pop(0)


@pytest.fixture(scope="module")
def trainer():
    pytest.importorskip("mistral_common")
    from mistol.chat_template import ChatTemplate

    train = load_script("train_demo")
    tok = train.make_tokenizer()
    return train, tok, ChatTemplate(tok, None)


@pytest.mark.parametrize("seed", range(6))
def test_a_duo_side_is_trained_token_for_token_as_mistol_duo_feeds_it(seed, trainer, monkeypatch):
    train, tok, template = trainer
    system, exchanges = duo_conversation(random.Random(seed), 3)
    monkeypatch.setattr(train, "make_conversation", duo_conversation)
    ids, _ = train.conversation(random.Random(seed), tok, template, 3)

    me = re.search(r"You are (\w+), talking with (\w+) about: (.*)\n", system)
    persona, topic = system.split("\n\n")[0], me[3]
    opens = exchanges[0].user.startswith("Let's talk about")
    mine = ScriptedLLM(template, [e.content for e in exchanges])
    theirs = ScriptedLLM(template, [e.user for e in exchanges[1:]] if opens else [e.user for e in exchanges])
    a, b = (Agent(me[1], persona, mine), Agent(me[2], "someone", theirs)) if opens else \
        (Agent(me[2], "someone", theirs), Agent(me[1], persona, mine))
    duo = Duo(a, b, topic, SamplingParams(temperature=0))
    for _ in range(2 * len(exchanges) - (1 if opens else 0)):
        duo.step()
    assert len(mine.prompts) == len(exchanges)
    for prompt in mine.prompts:  # each prompt the duo gave is where a trained reply begins
        assert ids[: len(prompt)] == prompt, tok.decode(prompt)


def test_code_edits_copy_the_block_with_one_change_or_none():
    rng = random.Random(5)
    for _ in range(300):
        edit = make_code_edit(rng)
        assert f"```python\n{edit.code}\n```" in edit.request
        shown, rewritten = edit.code.split("\n"), edit.edited.split("\n")
        assert 4 <= len([line for line in shown if line]) <= 12  # and blank lines between parts
        assert len(rewritten) <= len(shown) + 1
        changed = [line for line in difflib.ndiff(shown, rewritten) if line[:1] in "+-"]
        removed = [line[2:] for line in changed if line[0] == "-"]
        added = [line[2:] for line in changed if line[0] == "+"]
        if not changed:  # "run this code": the block copied whole
            assert "run" in edit.request.lower() or "print" in edit.request.lower()
        elif len(added) == len(removed) + 1 and not removed:  # a line added, at the end
            assert rewritten[:-1] == shown
        elif len(removed) == 1:  # one line changed
            assert len(added) == 1
        else:  # a rename: the same lines with one name replaced by another
            old = {w for line in removed for w in re.findall(r"\w+", line)} - {w for line in added for w in re.findall(r"\w+", line)}
            assert len(old) == 1, changed
            assert len(shown) == len(rewritten)


def test_code_edit_outputs_are_what_python_prints():
    rng = random.Random(9)
    for _ in range(8):
        edit = make_code_edit(rng)
        done = subprocess.run([sys.executable, "-c", edit.edited], capture_output=True, text=True, timeout=30)
        assert done.returncode == 0 and done.stdout.rstrip("\n") == edit.printed
        assert edit.printed.split("\n")[-1] in edit.final


def test_the_evaluation_asks_for_edits_in_its_own_words():
    from mistol.demo_code_edits import FRAMES, WORDS

    evaluation = load_script("eval_demo")
    rng = random.Random(1)
    items = [evaluation.edit_item(rng) for _ in range(100)]
    assert {item.kind for item in items} == {"set", "rename", "operation", "add print"}
    assert not set(evaluation.EDIT_NAMES) & set(WORDS)
    frames = {frame.split("{")[0] for frame in FRAMES if frame[0].isalpha()}  # the wording before the block
    for item in items:
        assert evaluation.program_output(item.expected) == item.output
        assert not any(item.request.startswith(f) for f in frames if len(f) > 8)
