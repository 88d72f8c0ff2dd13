"""The demo model that ships with mistol: the whole code loop, from a pipe, offline."""

from __future__ import annotations

import os
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
