"""`mistol chat --tools FILE.py` in a real terminal (pexpect) and through a pipe, on a random model
whose first reply of each turn is forced to call the tool (`--tool-choice`): a yes runs the
person's function (it writes to a file we read), a no does not and the model is told so, and
the log keeps the calls and results. Bad tool files end the command with one line."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from mistol.chat.log import replay
from mistol.tool_loop import DECLINED

pytest.importorskip("llguidance")

TOOL_FILE = '''\
import os
from typing import Literal

from json import dumps  # imported, not defined here: not a tool


def get_weather(city: Literal["Paris", "Rome"]) -> str:
    """The weather in a city.

    Args:
        city: The city.
    """
    with open(os.environ["CALLS_FILE"], "a") as f:
        f.write(city + "\\n")
    return "sunny, 21 C"


def _helper():
    pass
'''
QUESTION = "Call it? [y]es / [N]o / [a]lways:"


@pytest.fixture
def setup(tmp_path):
    tools = tmp_path / "my_tools.py"
    tools.write_text(TOOL_FILE)
    env = {**os.environ, "XDG_DATA_HOME": str(tmp_path), "PROMPT_TOOLKIT_NO_CPR": "1",
           "CALLS_FILE": str(tmp_path / "calls.txt")}
    return tools, env, tmp_path / "calls.txt"


def chat_args(model, tools, *extra):
    return ["-m", "mistol", "chat", "--model", str(model), "-t", "0", "--ctx", "2048", "--max-tokens", "60",
            "--tools", str(tools), *extra]


def the_log(tmp_path):
    (log,) = (tmp_path / "mistol" / "chats").glob("*.jsonl")
    return replay(log)


def turn(child, text: str, answer: str) -> tuple[str, int]:
    """Send a message, answer each call of the turn until the prompt is back: the first call's
    city and how many calls were asked about. (A line sent is drawn again with its ">>>", and an
    answer with its question: each step waits for what only comes next.)"""
    child.sendline(text)
    child.expect(r"The assistant wants to call get_weather\(city='(Paris|Rome)'\)")  # forced: a call comes
    city, asked = child.match.group(1), 0
    while True:
        child.expect_exact(QUESTION)
        child.sendline(answer)
        asked += 1
        assert asked <= 9, "the rounds of a turn are bounded"
        if child.expect_exact(["The assistant wants to call", ">>>"]) == 1:
            return city, asked


@pytest.mark.slow
def test_terminal_chat_calls_the_function_on_yes_and_not_on_no(mistral_dir, setup, tmp_path):
    pexpect = pytest.importorskip("pexpect")
    tools, env, calls = setup
    child = pexpect.spawn(sys.executable, chat_args(mistral_dir, tools, "--tool-choice", "get_weather"), env=env,
                          encoding="utf-8", timeout=180, dimensions=(40, 200))
    try:
        child.expect_exact(">>>")
        city, yes_asked = turn(child, "What is the weather in Paris?", "y")
        ran = calls.read_text().splitlines()
        assert ran[0] == city and len(ran) == yes_asked
        _, no_asked = turn(child, "And in Rome?", "n")
        assert calls.read_text().splitlines() == ran  # a no runs nothing
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    messages = the_log(tmp_path)
    second = max(i for i, m in enumerate(messages) if m["role"] == "user")
    results = [m for m in messages[:second] if m["role"] == "tool"]
    assert len(results) == yes_asked and all(r["content"] == "sunny, 21 C" for r in results)
    declined = [m for m in messages[second:] if m["role"] == "tool"]
    assert len(declined) == no_asked and all(r["content"] == DECLINED for r in declined)
    call_ids = [c["id"] for m in messages if m.get("tool_calls") for c in m["tool_calls"]]
    assert [m["tool_call_id"] for m in messages if m["role"] == "tool"] == call_ids
    assert messages[-1]["role"] == "assistant" and "tool_calls" not in messages[-1]


@pytest.mark.slow
def test_piped_chat_calls_with_yes_and_never_without(mistral_dir, setup, tmp_path):
    tools, env, calls = setup
    base = [sys.executable, *chat_args(mistral_dir, tools, "--tool-choice", "get_weather", "--no-save-kv")]
    out = subprocess.run(base, input="Weather in Paris?\n", env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "(not called: get_weather(city=" in out.stderr and "use --yes" in out.stderr
    assert not calls.exists()
    out = subprocess.run([*base, "--yes"], input="Weather in Paris?\n", env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert "calling get_weather(city=" in out.stderr and "get_weather -> sunny, 21 C" in out.stderr
    assert calls.read_text().splitlines()[0] in ("Paris", "Rome")


BAD_FILES = {
    "missing": (None, "no such file"),
    "syntax": ("def f(:\n    pass\n", "syntax error on line 1"),
    "raises": ("raise ValueError('no config')\n", "running it raised ValueError: no config"),
    "empty": ("import os\nfrom json import dumps\nX = 1\n\ndef _private(x: int):\n    pass\n", "no functions found"),
    "untyped": ("def lookup(name):\n    '''Finds a name.'''\n", "function lookup, parameter 'name' has no type hint"),
    "custom": ("class P:\n    pass\n\ndef move(p: P):\n    pass\n", "function move, parameter 'p': the type 'P'"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_a_bad_tool_file_is_one_line(case, mistral_dir, tmp_path):
    source, says = BAD_FILES[case]
    path = tmp_path / f"{case}.py"
    if source is not None:
        path.write_text(source)
    out = subprocess.run([sys.executable, "-m", "mistol", "chat", "--model", str(mistral_dir),
                          "--tools", str(path)], input="", capture_output=True, text=True, timeout=60,
                         env={**os.environ, "XDG_DATA_HOME": str(tmp_path)})
    assert out.returncode == 1
    assert out.stderr.startswith(f"mistol: error: --tools {path}: ") and says in out.stderr, out.stderr
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr


def test_tool_choice_must_name_a_function_of_the_file(setup, mistral_dir):
    tools, env, _ = setup
    out = subprocess.run([sys.executable, "-m", "mistol", "chat", "--model", str(mistral_dir),
                          "--tools", str(tools), "--tool-choice", "get_time"], input="", capture_output=True,
                         text=True, timeout=60, env=env)
    assert out.returncode == 1 and out.stderr.count("\n") == 1
    assert "--tool-choice: 'get_time' is not auto, required or one of the functions" in out.stderr
    assert "(get_weather)" in out.stderr
