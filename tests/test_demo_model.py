"""The demo model that ships with mistol: the whole code loop, from a pipe, offline."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from mistol.hub import DEMO_MODEL

pytestmark = pytest.mark.skipif(not (DEMO_MODEL / "config.json").is_file(), reason="the demo model is not built")


def test_demo_answers_by_running_code(tmp_path):
    env = {**os.environ, "XDG_DATA_HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-m", "mistol", "chat", "--model", "demo", "--yes", "-t", "0"],
                         input="What is 37 * 48?\n", capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "```python" in out.stdout and "37 * 48" in out.stdout  # the code it wrote
    assert "Output:\n```\n1776\n```" in out.stdout  # what the sandbox printed
    assert "1776." in out.stdout.rsplit("```", 1)[-1]  # the answer it stated afterwards


def test_demo_without_yes_on_a_pipe_runs_nothing(tmp_path):
    env = {**os.environ, "XDG_DATA_HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-m", "mistol", "chat", "--model", "demo", "-t", "0"],
                         input="What is 37 * 48?\n", capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0
    assert "1776\n```" not in out.stdout
    assert "declined" in out.stdout


def test_terminal_asks_before_running_and_honours_the_answer(tmp_path):
    pexpect = pytest.importorskip("pexpect")
    marker = "Run this code on this machine?"
    env = {**os.environ, "XDG_DATA_HOME": str(tmp_path), "PROMPT_TOOLKIT_NO_CPR": "1"}
    child = pexpect.spawn(sys.executable, ["-m", "mistol", "chat", "--model", "demo", "-t", "0"],
                          env=env, encoding="utf-8", timeout=120, dimensions=(40, 200))
    try:
        child.expect_exact(">>>")
        child.sendline("What is 37 * 48?")
        child.expect_exact(marker)
        child.sendline("y")
        child.expect_exact("1776")  # the output, then the stated answer
        child.expect_exact(">>>")
        child.sendline("What is 12 * 11?")
        child.expect_exact(marker)
        child.sendline("")  # Enter: the default is no
        child.expect_exact("declined")
        child.expect_exact(">>>")
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)


ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\r")
# (question, run the code?, the number the reply must state; None: the refusal)
CONVERSATION = [
    ("What is 37 * 48?", True, 1776),
    ("Please compute 9876 - 1234.", True, 8642),
    ("what's 17 squared", True, 289),
    ("What is 1000 divided by 8?", True, 125),
    ("What is 6*7?", False, 42),  # declined: it may state 42 anyway, or say that the code must run
    ("Add 250 and 175.", True, 425),
    ("What is the capital of France?", None, None),
    ("What is twelve times thirteen?", True, 156),
    ("What is 15 percent of 200?", True, 30),
    ("What is 123 + 456?", True, 579),
]


def stated_numbers(text: str) -> list[float]:
    return [float(n) for n in re.findall(r"(?<![\w.])-?\d+(?:\.\d+)?", text)]


@pytest.mark.slow
def test_a_ten_turn_conversation_with_a_decline_in_a_terminal(tmp_path):
    pexpect = pytest.importorskip("pexpect")
    from mistol.sandbox.sandbox import filesystem_isolation_available, network_isolation_available

    if not (filesystem_isolation_available() and network_isolation_available()):
        pytest.skip("no sandbox isolation here: the chat would not offer to run code")
    marker = "Run this code on this machine?"
    env = {**os.environ, "XDG_DATA_HOME": str(tmp_path), "PROMPT_TOOLKIT_NO_CPR": "1"}
    child = pexpect.spawn(sys.executable, ["-m", "mistol", "chat", "--model", "demo", "-t", "0"],
                          env=env, encoding="utf-8", timeout=120, dimensions=(40, 200))
    try:
        child.expect_exact(">>>")
        for question, run, number in CONVERSATION:
            child.sendline(question)
            if run is None:  # the refusal, and no code to run
                assert child.expect_exact([marker, "I can only do arithmetic"]) == 1, question
                child.expect_exact(">>>")
                continue
            child.expect_exact(marker)
            child.sendline("y" if run else "n")
            child.expect_exact(">>>")
            reply = ANSI.sub("", child.before)
            answer = reply.rsplit("```", 1)[-1]  # the sentence after the code's output
            stated = stated_numbers(answer)
            if run:
                assert stated and stated[-1] == number, (question, reply)
            else:
                assert "declined" in reply, reply
                assert (stated and stated[-1] == number) or (not stated and "run the code" in answer), (question, reply)
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
