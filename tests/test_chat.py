"""The terminal chat: cache reuse across turns, context overflow, and a real terminal."""

from __future__ import annotations

import io
import json
import os
import sys
import time

import pytest

from checkpoints import make_checkpoint
from mistol.chat.log import replay
from mistol.engine import Engine
from mistol.llm import LocalLLM
from mistol.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=8)
SYSTEM = {"role": "system", "content": "You are a test."}


def converse(llm, turns: int, text: str = "Tell me more about it, please."):
    messages = [SYSTEM]
    processed = []
    for _ in range(turns):
        messages.append({"role": "user", "content": text})
        before = llm.session.tokens_processed
        reply = "".join(llm.chat(messages, GREEDY))
        processed.append(llm.session.tokens_processed - before)
        messages.append({"role": "assistant", "content": reply})
    return messages, processed


def test_each_turn_runs_only_its_new_tokens(mistral_dir):
    llm = LocalLLM(Engine.load(mistral_dir, dtype="f32"))
    messages, processed = converse(llm, turns=5)
    # Turn 1 runs the system prompt too; every later turn runs the same few new tokens.
    assert processed[0] > processed[1]
    assert len(set(processed[1:])) == 1, processed
    # ... and the cache holds exactly the conversation as rendered now.
    full = llm.prompt_ids(messages + [{"role": "user", "content": "x"}])
    assert full[: len(llm.session.tokens) - 1] == llm.session.tokens[:-1]


def test_context_overflow_drops_oldest_exchanges_but_keeps_the_system_prompt(mistral_dir):
    llm = LocalLLM(Engine.load(mistral_dir, dtype="f32"), max_context=96)
    messages, _ = converse(llm, turns=6)
    assert llm.dropped > 0
    system_ids = llm.template.render([SYSTEM], add_generation_prompt=False)
    assert llm.session.tokens[: len(system_ids)] == system_ids
    assert len(messages) == 13  # the conversation itself keeps every message


@pytest.mark.slow
def test_piped_chat_answers_and_exits(mistral_dir, tmp_path):
    import subprocess

    env = {**os.environ, "XDG_DATA_HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-m", "mistol", "chat", "--model", str(mistral_dir), "--max-tokens", "5",
                          "-t", "0"], input="hi\n", capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()
    (log,) = (tmp_path / "mistol" / "chats").glob("*.jsonl")
    messages = replay(log)
    assert [m["role"] for m in messages] == ["system", "user", "assistant"]
    assert messages[2]["content"].strip() == out.stdout.strip()


@pytest.fixture(scope="module")
def long_model(tmp_path_factory):
    """A model with a long context, so a reply can run long enough to be interrupted."""
    return make_checkpoint(tmp_path_factory.mktemp("long"), arch="llama", kv_heads=4, max_positions=4096,
                           hidden=256, layers=4)  # slow enough that a 3000-token reply is still running


@pytest.mark.slow
def test_terminal_session_with_undo_reset_and_ctrl_c(long_model, tmp_path):
    pexpect = pytest.importorskip("pexpect")
    env = {**os.environ, "XDG_DATA_HOME": str(tmp_path), "PYTHONUNBUFFERED": "1", "PROMPT_TOOLKIT_NO_CPR": "1"}
    child = pexpect.spawn(sys.executable, ["-m", "mistol", "chat", "--model", str(long_model), "-t", "0",
                                           "--max-tokens", "12"],
                          env=env, encoding="utf-8", timeout=120, dimensions=(40, 200))
    try:
        child.expect_exact(">>>")
        child.sendline("hello there")
        child.expect_exact(">>>")
        child.sendline("a second question")
        child.expect_exact(">>>")
        child.sendline("/undo")
        child.expect("last exchange dropped")
        child.expect_exact(">>>")
        child.sendline("/reset")
        child.expect("conversation cleared")
        child.expect_exact(">>>")
        child.sendline("/max")  # unknown commands are explained, not fatal
        child.expect("unknown command")
        child.expect_exact(">>>")
        child.close(force=True)
    finally:
        if child.isalive():
            child.close(force=True)

    # A long reply, stopped with Ctrl-C: the partial reply is kept and the chat goes on.
    child = pexpect.spawn(sys.executable, ["-m", "mistol", "chat", "--model", str(long_model), "-t", "0",
                                           "--max-tokens", "3000", "--resume"],
                          env=env, encoding="utf-8", timeout=120, dimensions=(40, 200))
    try:
        child.expect_exact(">>>")
        child.sendline("write a very long story")
        child.expect_exact("story")
        time.sleep(1.5)  # well into a reply of up to 3000 tokens
        child.sendintr()
        child.expect_exact("[stopped]")
        child.expect_exact(">>>")
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0

    (log,) = (tmp_path / "mistol" / "chats").glob("*.jsonl")
    events = [json.loads(line) for line in log.read_text().splitlines()]
    said = [e["content"] for e in events if e["event"] == "message" and e["role"] == "user"]
    assert said == ["hello there", "a second question", "write a very long story"]
    messages = replay(log)
    assert [m["role"] for m in messages] == ["system", "user", "assistant"]
    assert messages[1]["content"] == "write a very long story"
    assert 0 < len(messages[2]["content"])


def test_terminal_load_and_save_errors_keep_the_chat_and_a_wipe_asks_first(mistral_dir, tmp_path):
    """In a real terminal: a bad /load or /save is a one-line notice at the same prompt, and a
    file that would wipe the conversation is loaded only after a yes."""
    pexpect = pytest.importorskip("pexpect")
    (tmp_path / "garbage.txt").write_text("one line of garbage")
    (tmp_path / "delta.jsonl").write_text('{"event": "delta", "content": "x"}\n{"event": "undo"}\n')
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    (tmp_path / "empty.json").write_text('{"messages": []}')
    # the typed lines' file cannot be kept (a directory is in the way): they are recalled in memory
    (tmp_path / "data" / "mistol" / "history").mkdir(parents=True)
    env = {**os.environ, "XDG_DATA_HOME": str(tmp_path / "data"), "PYTHONUNBUFFERED": "1", "PROMPT_TOOLKIT_NO_CPR": "1"}
    child = pexpect.spawn(sys.executable, ["-m", "mistol", "chat", "--model", str(mistral_dir), "-t", "0",
                                           "--max-tokens", "3", "--no-code"],
                          env=env, encoding="utf-8", timeout=120, dimensions=(40, 200), cwd=str(tmp_path))
    child.logfile_read = transcript = io.StringIO()
    try:
        child.expect_exact(">>>")
        child.sendline("hello there")
        child.expect_exact(">>>")
        for name in ("garbage.txt", "delta.jsonl", "deep.json", "missing.json"):
            child.sendline(f"/load {name}")
            child.expect_exact("not loaded: ")
            child.expect_exact(">>>")
        child.sendline("/save no/such/dir.json")
        child.expect_exact("not saved: ")
        child.expect_exact(">>>")
        child.sendline("/load empty.json")
        child.expect_exact("Load it anyway? [y/N]")
        child.sendline("n")
        child.expect_exact("not loaded")
        child.expect_exact(">>>")
        child.sendline("/save kept.json")
        child.expect_exact("saved to kept.json")
        child.expect_exact(">>>")
        child.sendline("/load empty.json")
        child.expect_exact("Load it anyway? [y/N]")
        child.sendline("y")
        child.expect_exact("loaded 0 message(s)")
        child.expect_exact(">>>")
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0 and "Traceback" not in transcript.getvalue()
    kept = json.loads((tmp_path / "kept.json").read_text())["messages"]
    assert [m["role"] for m in kept] == ["system", "user", "assistant"] and kept[1]["content"] == "hello there"
    (log,) = (tmp_path / "data" / "mistol" / "chats").glob("*.jsonl")
    assert replay(log) == []  # the wipe that was confirmed
