"""Live voice mode asks "Shall I run it?" aloud and runs code only on a clear spoken yes.

The conversation runs on prepared audio: a microphone that yields espeak-ng speech (the
question, then the answer once mistol listens for it), a sink that keeps what it is given,
the real sandboxed CodeRunner, PocketSphinx with the yes/no grammar and the Silero VAD.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import time

import numpy as np
import pytest

from mistol.sampling import SamplingParams
from mistol.voice.audio import Audio, silence
from mistol.voice.confirm import NOT_RUN_DECLINED, NOT_RUN_UNHEARD, QUESTION, is_clear_yes

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs espeak-ng (apt-get install espeak-ng)")
needs_sphinx = pytest.mark.skipif(importlib.util.find_spec("pocketsphinx") is None,
                                  reason="needs pocketsphinx (pip install pocketsphinx)")
needs_vad = pytest.mark.skipif(importlib.util.find_spec("silero_vad") is None,
                               reason="needs the Silero VAD weights (pip install silero-vad)")

CODE_REPLY = "Let me compute it.\n```python\nprint(12 * 13)\n```\n"


def speak(text: str, wpm: int = 160) -> Audio:
    from mistol.voice.tts import EspeakTTS

    return EspeakTTS("en-us", wpm).synthesize(text)


class ScriptedLLM:
    """The `LLM` interface over fixed replies; keeps the last message each call was given."""

    def __init__(self, replies: list[str]):
        self.replies = list(replies)
        self.seen: list[str] = []
        self.last = None

    def chat(self, messages, params, continue_last=False):
        self.seen.append(messages[-1]["content"])
        yield from re.findall(r"\S+\s*", self.replies.pop(0))


def test_only_a_clear_yes_counts():
    for yes in ("Yes.", "yeah", "Sure", "Go ahead.", "run it", "Yes, please!", "okay"):
        assert is_clear_yes(yes), yes
    for not_yes in (None, "", "No.", "nope", "Don't.", "cancel", "stop", "yes no", "Yes, wait.", "do not run it",
                    "what is two plus two", "Never mind.", "maybe"):
        assert not is_clear_yes(not_yes), not_yes


@needs_espeak
@needs_sphinx
@pytest.mark.slow
def test_the_yes_no_grammar_hears_yes_as_yes_and_nothing_else_as_yes():
    from mistol.voice.stt import PocketSphinxSTT

    stt = PocketSphinxSTT("yes_no")
    heard = {text: stt.transcribe(speak(text)) for text in ("yes", "yes please", "okay", "no", "cancel")}
    assert heard == {"yes": "Yes.", "yes please": "Yes please.", "okay": "Okay.", "no": "No.", "cancel": "Cancel."}
    # A closed grammar of yes and no alone heard "maybe later" as "please do", "I am not sure"
    # as "sure": what is not an answer must not come out as a yes.
    for other in ("maybe later", "I am not sure", "what is two plus two", "hello"):
        assert not is_clear_yes(stt.transcribe(speak(other))), other


def converse(answer: Audio | None, auto_yes: bool = False):
    """One live turn whose reply writes code; `answer` is said once mistol listens."""
    from mistol.sandbox.code_turn import DECLINED, CodeOptions, CodeRunner
    from mistol.voice.loop import BufferSink, Conversation, EventLog
    from mistol.voice.stt import PocketSphinxSTT
    from mistol.voice.tts import EspeakTTS
    from mistol.voice.vad import FRAME

    events, sink, notices, transcripts = EventLog(), BufferSink(), [], []
    llm = ScriptedLLM([CODE_REPLY, "So twelve times thirteen is 156."])

    class QuestionSTT:  # the question itself is not what is tested here
        def transcribe(self, audio):
            return "What is 12 times 13?"

    def microphone():
        def frames(audio: Audio):
            samples = audio.resample(16000).samples
            for i in range(0, len(samples), FRAME):
                yield samples[i : i + FRAME]

        yield from frames(speak("what is twelve times thirteen"))
        yield from frames(silence(1.0, 16000))
        deadline = time.perf_counter() + 30
        while "listening" not in events.names() and "reply_done" not in events.names():
            assert time.perf_counter() < deadline
            time.sleep(0.005)
            yield np.zeros(FRAME, np.float32)
        if answer is not None:
            yield from frames(answer)
        yield from frames(silence(8.0, 16000))  # longer than the answer's timeout

    code = CodeRunner(CodeOptions(auto_yes=auto_yes), None, notices.append)
    conversation = Conversation(llm, SamplingParams(), QuestionSTT(), EspeakTTS(), "You are Quentin.", code=code,
                                events=events, answer_stt=PocketSphinxSTT("yes_no"), on_notice=notices.append,
                                on_transcript=transcripts.append)
    try:
        conversation.run(microphone(), sink)
    finally:
        code.close()
    said = [d for _, n, d in events.events if n == "say"]
    return conversation.messages[-1]["content"], llm, said, notices, transcripts, DECLINED


@needs_espeak
@needs_sphinx
@needs_vad
def test_a_spoken_yes_runs_the_code_and_its_output_goes_back_to_the_model():
    content, llm, said, notices, transcripts, _ = converse(concat_speech("yes"))
    assert said == [QUESTION]
    assert transcripts == ["What is 12 times 13?", "Yes."]
    assert content == CODE_REPLY + "Output:\n```\n156\n```\nSo twelve times thirteen is 156."
    assert "Output:\n```\n156\n```" in llm.seen[1]  # the model continued from the output
    assert not any("not run" in n for n in notices)


@needs_espeak
@needs_sphinx
@needs_vad
def test_a_spoken_no_does_not_run_the_code_and_says_how_to_allow_it():
    content, llm, said, notices, transcripts, declined = converse(concat_speech("no"))
    assert said == [QUESTION, NOT_RUN_DECLINED] and "--yes" in NOT_RUN_DECLINED
    assert transcripts[-1] in ("No.", "Nope.")  # heard as a refusal, not as something else
    assert "```\n156\n```" not in content and f"Output:\n```\n{declined}\n```" in content
    assert any("code not run: you said no" in n for n in notices)


@needs_espeak
@needs_sphinx
@needs_vad
def test_silence_after_the_question_does_not_run_the_code():
    content, llm, said, notices, transcripts, declined = converse(None)
    assert said == [QUESTION, NOT_RUN_UNHEARD] and "--yes" in NOT_RUN_UNHEARD
    assert transcripts == ["What is 12 times 13?"]
    assert "```\n156\n```" not in content and f"Output:\n```\n{declined}\n```" in content
    assert any("code not run: no clear yes was heard" in n for n in notices)


@needs_espeak
@needs_sphinx
@needs_vad
def test_with_yes_the_code_runs_without_asking():
    content, llm, said, notices, transcripts, _ = converse(None, auto_yes=True)
    assert said == [] and "Output:\n```\n156\n```" in content


def concat_speech(text: str) -> Audio:
    from mistol.voice.audio import concat

    return concat([silence(0.3, 22050), speak(text), silence(0.3, 22050)])
