"""Two agents over one set of weights: separate caches, cheap turns, clean stops."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from mistol.duo import Agent, Duo
from mistol.engine import Engine
from mistol.llm import LocalLLM
from mistol.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=6)


def make_duo(engine, stop_phrase=None):
    a = Agent("Ann", "You are a cheerful sailor.", LocalLLM(engine))
    b = Agent("Ben", "You are a grumpy poet.", LocalLLM(engine))
    return Duo(a, b, "the sea", GREEDY, stop_phrase=stop_phrase), a, b


def test_agent_caches_are_isolated(mistral_dir):
    engine = Engine.load(mistral_dir, dtype="f32")
    duo, a, b = make_duo(engine)
    for _ in range(6):
        speaker = duo.speaker
        duo.step()
        if speaker is a:
            # A's logits from its own cache (B ran in between) equal a fresh session's.
            prompt = a.llm.prompt_ids(a.messages[:-1])
            from_cache = a.llm.session.feed(prompt)
            fresh = engine.new_session().feed(prompt)
            assert (from_cache - fresh).abs().max() <= 1e-5
    assert a.llm.session is not b.llm.session


def test_tokens_run_per_turn_do_not_grow(mistral_dir):
    engine = Engine.load(mistral_dir, dtype="f32")
    duo, a, b = make_duo(engine)
    ran = []
    for _ in range(8):
        llm = duo.speaker.llm
        before = llm.session.tokens_processed
        duo.step()
        ran.append(llm.session.tokens_processed - before)
    later = ran[2:]  # after each agent's first turn (which runs its system prompt)
    assert max(later) <= min(later) + 4, ran
    assert max(later) < ran[0]


def test_stop_phrase_and_turn_limit(mistral_dir):
    engine = Engine.load(mistral_dir, dtype="f32")
    duo, a, b = make_duo(engine)
    first = duo.step().strip()
    duo2, *_ = make_duo(engine, stop_phrase=first.split()[0])
    duo2.step()
    assert duo2.finished()
    assert not make_duo(engine, stop_phrase="zzzz never said")[0].finished()


def run_duo(model, tmp_path, *extra, timeout=300):
    env = {**os.environ, "XDG_DATA_HOME": str(tmp_path)}
    return subprocess.run([sys.executable, "-m", "mistol", "duo", "--model", str(model), "--a", "a sailor",
                           "--b", "a poet", "--topic", "the sea", "-t", "0", *extra],
                          capture_output=True, text=True, env=env, timeout=timeout)


def transcript(tmp_path):
    (log,) = (tmp_path / "mistol" / "duos").glob("*.jsonl")
    events = [json.loads(line) for line in log.read_text().splitlines()]
    return [e["role"] for e in events if e["event"] == "message"]


def test_duo_command_writes_transcripts(mistral_dir, tmp_path):
    out = run_duo(mistral_dir, tmp_path, "--turns", "3", "--max-tokens", "5", "--out", str(tmp_path / "t.md"))
    assert out.returncode == 0, out.stderr
    assert [line.split(":")[0] for line in out.stdout.splitlines()] == ["Alice", "Bob", "Alice"]
    assert transcript(tmp_path) == ["Alice", "Bob", "Alice"]
    assert (tmp_path / "t.md").read_text().count("**Bob:**") == 1


def test_ctrl_c_keeps_the_transcript(tmp_path):
    pexpect = pytest.importorskip("pexpect")
    from checkpoints import make_checkpoint

    model = make_checkpoint(tmp_path / "long", arch="llama", kv_heads=4, max_positions=4096,
                           hidden=256, layers=4)  # slow enough that a 3000-token reply is still running
    env = {**os.environ, "XDG_DATA_HOME": str(tmp_path)}
    child = pexpect.spawn(sys.executable, ["-m", "mistol", "duo", "--model", str(model), "--a", "x", "--b", "y",
                                           "--topic", "z", "--turns", "4", "--max-tokens", "3000", "-t", "0"],
                          env=env, encoding="utf-8", timeout=120)
    child.expect_exact("Alice:")
    time.sleep(1.5)
    child.sendintr()
    child.expect_exact("transcript is saved")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    speakers = transcript(tmp_path)
    assert 1 <= len(speakers) < 4 and speakers[0] == "Alice"  # stopped early, what was said kept


def test_agents_can_run_code(tmp_path):
    """--code: an agent's block runs in the sandbox and its output is in its line."""
    import sys as _sys

    _sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from test_code_chat import ScriptedLLM

    from mistol.sandbox.code_turn import CodeOptions, CodeRunner

    a = Agent("Ann", "x", ScriptedLLM("```python\nprint(6 * 7)\n```", " So 42."))
    b = Agent("Ben", "y", ScriptedLLM("Nice."))
    runner = CodeRunner(CodeOptions(auto_yes=True), None, lambda text: None)
    duo = Duo(a, b, "numbers", GREEDY, code=runner)
    try:
        line = duo.step()
        assert "Output:\n```\n42\n```" in line and line.endswith("So 42.")
        assert b.messages[-1] == {"role": "user", "content": line}
    finally:
        runner.close()
