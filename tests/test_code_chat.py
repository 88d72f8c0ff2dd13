"""The code turn: a block closes, the person decides, the output goes back to the model.

The assistant side is scripted here (a random model does not write code); everything else —
detection while streaming, the decision, the sandbox, the continuation — is the real path.
"""

from __future__ import annotations

from mistol.chat.log import ChatLog
from mistol.chat.repl import ChatApp, ChatOptions
from mistol.sampling import SamplingParams
from mistol.sandbox.code_turn import DECLINED, CodeOptions, CodeRunner, code_turn
from mistol.sandbox.codeblocks import format_output


class ScriptedLLM:
    """Plays the assistant: each call streams the next scripted text, a few characters at a time."""

    def __init__(self, *replies: str):
        self.replies = list(replies)
        self.calls = []
        self.last = None
        self.dropped = 0

    def chat(self, messages, params, continue_last=False):
        self.calls.append(([dict(m) for m in messages], continue_last))
        text = self.replies.pop(0)
        for i in range(0, len(text), 3):
            yield text[i : i + 3]


def make_app(tmp_path, llm, runner):
    log = ChatLog(tmp_path / "log.jsonl")
    messages = [{"role": "system", "content": "code mode"}]
    return ChatApp(llm, SamplingParams(), log, messages, ChatOptions(interactive=False), runner)


def runner(tmp_path, yes=False, answers=None):
    answers = list(answers or [])
    ask = (lambda question: answers.pop(0)) if answers else None
    return CodeRunner(CodeOptions(auto_yes=yes), ask, lambda text: None)


def test_code_runs_and_its_output_feeds_the_continuation(tmp_path):
    code = "x = 37\nprint(x * 48)"
    llm = ScriptedLLM(f"Let me compute.\n```python\n{code}\n```\nTHIS IS NEVER SHOWN", "The answer is 1776.")
    app = make_app(tmp_path, llm, runner(tmp_path, yes=True))
    app.user_turn("What is 37 * 48?")
    reply = app.messages[-1]["content"]
    assert reply == f"Let me compute.\n```python\n{code}\n```" + format_output("1776\n") + "The answer is 1776."
    (first, cont_first), (second, cont_second) = llm.calls
    assert not cont_first and cont_second
    assert second[-1]["content"].endswith("```\n1776\n```\n")  # the model continues after the output
    app.code.close()


def test_state_persists_between_blocks_of_a_conversation(tmp_path):
    llm = ScriptedLLM("```python\ny = 6\n```", "ok", "```python\nprint(y * 7)\n```", "done")
    app = make_app(tmp_path, llm, runner(tmp_path, yes=True))
    app.user_turn("set y")
    app.user_turn("use y")
    assert "42" in app.messages[-1]["content"]
    app.code.close()


def test_declined_code_never_runs(tmp_path):
    marker = tmp_path / "ran.txt"
    code = f"open({str(marker)!r}, 'w').write('x')"
    llm = ScriptedLLM(f"```python\n{code}\n```", "Fine.")
    app = make_app(tmp_path, llm, runner(tmp_path, answers=["n"]))
    app.user_turn("make a file")
    assert not marker.exists()
    assert DECLINED in app.messages[-1]["content"]
    # nobody to ask (a pipe without --yes): declined as well
    app2 = make_app(tmp_path, ScriptedLLM(f"```python\n{code}\n```", "Fine."), runner(tmp_path))
    app2.user_turn("make a file")
    assert not marker.exists() and DECLINED in app2.messages[-1]["content"]


def test_edit_runs_the_edited_code(tmp_path):
    class Editing(CodeRunner):
        def ask_edit(self, code):
            return "print('edited')"

    answers = iter(["e", "y"])
    r = Editing(CodeOptions(), ask=lambda question: next(answers), notice=lambda text: None)
    app = make_app(tmp_path, ScriptedLLM("```python\nprint('original')\n```", "ok"), r)
    app.user_turn("go")
    assert "Output:\n```\nedited\n```" in app.messages[-1]["content"]
    r.close()


def test_non_python_fences_are_not_run(tmp_path):
    llm = ScriptedLLM("```bash\nrm -rf /tmp/nothing\n```\nand\n```json\n{}\n```\nThat is all.")
    app = make_app(tmp_path, llm, runner(tmp_path, yes=True))
    app.user_turn("show me")
    assert "Output:" not in app.messages[-1]["content"]
    assert len(llm.calls) == 1


def test_a_turn_told_to_stop_ends_where_it_is_and_runs_nothing():
    """`stopped` (a voice barge-in) is asked before each piece and before each run."""
    reply = "Let me see.\n```python\nprint(1)\n```\nmore"
    for stop_after, kept in [("Let me", "Let me"), ("print(1)\n```", "Let me see.\n```python\nprint(1)\n```")]:
        ran, shown = [], []
        llm = ScriptedLLM(reply, "never asked for")
        messages = [{"role": "user", "content": "go"}, {"role": "assistant", "content": ""}]
        turn = code_turn(llm, messages, SamplingParams(), lambda block: ran.append(block) or "1\n",
                         lambda text, is_output: shown.append(text),
                         stopped=lambda: messages[-1]["content"].endswith(stop_after))
        assert not ran and not turn.runs and len(llm.calls) == 1
        assert messages[-1]["content"] == "".join(shown) == kept
