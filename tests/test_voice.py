"""`mistol voice`: speech made with espeak-ng goes through VAD, STT, the model and TTS.

Everything runs on prepared audio: sources are iterators of real 16 kHz frames, sinks keep
what they are given (at once, or at the pace of a speaker), so no device is needed.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
import wave
from pathlib import Path

import numpy as np
import pytest

from mistol.errors import MistolError
from mistol.sampling import SamplingParams
from mistol.voice.audio import Audio, concat, read_wav, resample, silence, wav_bytes
from mistol.voice.sentences import SentenceSplitter
from mistol.voice.stt import words_to_numbers
from mistol.voice.tts import speakable

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs espeak-ng (apt-get install espeak-ng)")


def has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


needs_sphinx = pytest.mark.skipif(not has_module("pocketsphinx"), reason="needs pocketsphinx (pip install pocketsphinx)")
needs_vad = pytest.mark.skipif(not has_module("silero_vad"), reason="needs the Silero VAD weights (pip install silero-vad)")
DEMO = Path(__file__).resolve().parent.parent / "mistol" / "demo_model"


def speak(text: str, wpm: int = 160) -> Audio:
    from mistol.voice.tts import EspeakTTS

    return EspeakTTS("en-us", wpm).synthesize(text)


def speech_extent(audio: Audio) -> tuple[float, float]:
    """First and last sample louder than -40 dBFS, in seconds (espeak pads its own silence)."""
    loud = np.flatnonzero(np.abs(audio.samples) > 0.01)
    return loud[0] / audio.rate, (loud[-1] + 1) / audio.rate


class ScriptedLLM:
    """The `LLM` interface over fixed replies, one word at a time with a delay, like a model."""

    def __init__(self, replies: list[str], delay_s: float = 0.02):
        self.replies = list(replies)
        self.delay_s = delay_s
        self.finished: list[bool] = []  # per call: did the stream run to its end?
        self.last = None
        self.dropped = 0

    def chat(self, messages, params, continue_last=False):
        words = re.findall(r"\S+\s*", self.replies.pop(0))
        done = False
        try:
            for word in words:
                time.sleep(self.delay_s)
                yield word
            done = True
        finally:
            self.finished.append(done)


class FakeSTT:
    def __init__(self, texts):
        self.texts = list(texts)

    def transcribe(self, audio):
        return self.texts.pop(0)


# -- audio -----------------------------------------------------------------------------------
@needs_espeak
def test_espeak_wav_from_stdout_reads_and_writes_back():
    audio = speak("Hello there.")
    assert audio.rate == 22050 and audio.seconds > 0.4 and audio.rms() > 0.01
    again = read_wav(wav_bytes(audio))
    assert again.rate == 22050 and len(again.samples) == len(audio.samples)
    assert np.abs(again.samples - audio.samples).max() < 1e-4


def test_resampling_keeps_the_pitch_and_level():
    t = np.arange(22050) / 22050
    tone = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    out = resample(tone, 22050, 16000)
    assert len(out) == 16000
    spectrum = np.abs(np.fft.rfft(out[1000:-1000] * np.hanning(14000)))
    assert abs(np.argmax(spectrum) * 16000 / 14000 - 440) < 3
    assert abs(np.sqrt(np.mean(out[1000:-1000] ** 2)) - 0.5 / np.sqrt(2)) < 0.01


# -- VAD -------------------------------------------------------------------------------------
@needs_espeak
@needs_vad
def test_vad_cuts_speech_padded_with_silence_into_its_utterances():
    from mistol.voice.vad import utterances

    a, b = speak("what is two plus two"), speak("thank you very much, that is all")
    layout = [silence(1.0, a.rate), a, silence(1.5, a.rate), b, silence(1.0, a.rate)]
    truth = []
    offset = 0.0
    for clip in layout:
        if clip.rms() > 0:
            s, e = speech_extent(clip)
            truth.append((offset + s, offset + e))
        offset += clip.seconds
    found = utterances(concat(layout))
    assert len(found) == 2, [(u.start, u.time) for u in found]
    for u, (start, end) in zip(found, truth):
        assert abs(u.start - start) <= 0.2 and abs(u.time - end) <= 0.2, (u.start, u.time, start, end)
        assert u.audio.seconds >= end - start


# -- STT -------------------------------------------------------------------------------------
def test_number_words_become_digits():
    assert words_to_numbers("what is thirty seven times forty eight") == "what is 37 times 48"
    assert words_to_numbers("what is one hundred and five minus nine") == "what is 105 minus 9"
    assert words_to_numbers("two thousand three hundred and one plus seven") == "2301 plus 7"
    assert words_to_numbers("hello how are you") == "hello how are you"


@needs_espeak
@needs_sphinx
@pytest.mark.slow
def test_pocketsphinx_with_the_arithmetic_grammar_hears_the_question():
    from mistol.voice.stt import PocketSphinxSTT

    stt = PocketSphinxSTT("arithmetic")
    assert stt.transcribe(speak("what is two plus two")) == "What is 2 plus 2?"
    assert stt.transcribe(speak("what is thirty seven times forty eight", wpm=150)) == "What is 37 times 48?"
    # Open dictation (no grammar) is far weaker, but gets a clear short phrase.
    assert "Hello" in PocketSphinxSTT().transcribe(speak("hello how are you"))


# -- text to speech ----------------------------------------------------------------------------
def test_speakable_drops_markdown_and_code():
    text = "**Sure!** Run `ls`:\n```bash\nls -la\n```\n- see [the docs](https://x.org).\n7 * 8 = 56"
    assert speakable(text) == "Sure! Run ls: see the docs. 7 times 8 = 56"


def test_sentences_come_out_as_the_text_streams_in():
    text = ("Hello there! Dr. Smith is here.\n1. First item\nHere is code:\n```python\nprint(1.5)\n```\n"
            "That prints 1.5. Done")
    for step in (1, 4, len(text)):
        splitter, out = SentenceSplitter(), []
        for i in range(0, len(text), step):
            out += [s.text for s in splitter.feed(text[i : i + step])]
        out += [s.text for s in splitter.flush()]
        assert out == ["Hello there!", "Dr. Smith is here.", "1. First item", "Here is code:", "That prints 1.5.", "Done"]
    splitter = SentenceSplitter()
    assert [s.text for s in splitter.feed("One. Two")] == ["One."]  # out before the reply ends
    assert splitter.feed(" more words") == [] and [s.text for s in splitter.flush()] == ["Two more words"]


# -- the pipeline ----------------------------------------------------------------------------
@needs_espeak
def test_speech_of_the_first_sentence_starts_before_the_reply_is_written():
    from mistol.voice.loop import BufferSink, EventLog, Responder
    from mistol.voice.tts import EspeakTTS

    llm = ScriptedLLM(["Two plus two is four. That is a small sum. Ask me another one if you like."], 0.03)
    events, sink = EventLog(), BufferSink()
    messages = [{"role": "user", "content": "what is 2 plus 2"}]
    reply = Responder(llm, SamplingParams(), EspeakTTS(), sink, events).respond(messages)
    names = events.names()
    assert names.index("tts_start") < names.index("llm_done")
    assert events.index("audio", 0) < events.index("llm_done")
    assert reply.sentences == ["Two plus two is four.", "That is a small sum.", "Ask me another one if you like."]
    assert messages[-1]["content"] == reply.text == reply.generated and not reply.interrupted
    assert [tag for tag, _ in sink.played] == [0, 1, 2]


@needs_espeak
def test_code_the_model_writes_is_run_not_read_aloud_and_its_answer_is_spoken():
    from mistol.voice.loop import BufferSink, EventLog, Responder
    from mistol.voice.tts import EspeakTTS

    class Runner:  # stands in for the sandboxed CodeRunner
        def __init__(self):
            self.ran = []

        def handle(self, block):
            self.ran.append(block.code)
            return "4\n"

    llm = ScriptedLLM(["Let me compute it.\n```python\nprint(2 + 2)\n```\nignored after the fence",
                       "The answer is 4."], 0)
    runner, messages = Runner(), [{"role": "user", "content": "What is 2 plus 2?"}]
    reply = Responder(llm, SamplingParams(), EspeakTTS(), BufferSink(), EventLog(), code=runner).respond(messages)
    assert runner.ran == ["print(2 + 2)"]
    assert reply.sentences == ["Let me compute it.", "The answer is 4."]
    assert messages[-1]["content"] == ("Let me compute it.\n```python\nprint(2 + 2)\n```\nOutput:\n```\n4\n```\n"
                                       "The answer is 4.")


@needs_espeak
@needs_vad
def test_barge_in_stops_playback_and_generation_and_listens():
    from mistol.voice.loop import BufferSink, Conversation, EventLog
    from mistol.voice.tts import EspeakTTS
    from mistol.voice.vad import FRAME

    speed = 4.0  # the fake speaker and microphone run at 4x real time
    long_reply = ("Sure. Here is a long answer about the sea, which covers most of the planet. "
                  "It holds whales, fish and a great deal of salt. It shapes the weather everywhere. "
                  "People have sailed it for thousands of years, and they still do today.")
    llm = ScriptedLLM([long_reply, "Okay, I stop."], delay_s=0.05)
    sink = BufferSink(speed=speed)
    events = EventLog()
    question = speak("tell me about the sea").resample(16000).samples
    interruption = speak("stop, stop, that is enough, thank you").resample(16000).samples
    quiet = np.zeros(FRAME, np.float32)

    def microphone():
        def paced(samples):
            for i in range(0, len(samples), FRAME):
                time.sleep(FRAME / 16000 / speed)
                yield samples[i : i + FRAME]

        yield from paced(question)
        yield from paced(np.zeros(16000, np.float32))
        deadline = time.perf_counter() + 20
        while not (sink.played and sink.busy()) and time.perf_counter() < deadline:  # the 2nd sentence plays
            yield from paced(quiet)
        yield from paced(interruption)
        yield from paced(np.zeros(24000, np.float32))

    conversation = Conversation(llm, SamplingParams(), FakeSTT(["tell me about the sea", "stop that is enough"]),
                                EspeakTTS(), "You are Stacy.", events=events)
    turns, played_by_turn = [], []

    def on_turn(turn):
        turns.append(turn)
        played_by_turn.append(list(sink.played))

    conversation.run(microphone(), sink, on_turn)
    sink.close()

    assert [t.transcript for t in turns] == ["tell me about the sea", "stop that is enough"]
    first = turns[0].reply
    assert first.interrupted and "barge_in" in events.names()
    assert llm.finished == [False, True]  # generation of the first reply was stopped
    kept = conversation.messages[2]["content"]
    assert kept == first.text and kept.endswith("—")
    # Kept: the first sentence and the words of the second one that were heard before the cut.
    assert kept.startswith("Sure. Here") and long_reply.startswith(kept[:-1])
    assert len(kept) < long_reply.index("planet.")
    played = sum(a.seconds for _, a in played_by_turn[0])
    assert 0 < played < sum(speak(s).seconds for s in first.sentences)  # playback was cut
    assert [m["role"] for m in conversation.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert conversation.messages[3]["content"] == "stop that is enough"


# -- the command -----------------------------------------------------------------------------
def run_voice(tmp_path, *args, timeout=240):
    env = {**os.environ, "XDG_DATA_HOME": str(tmp_path)}
    return subprocess.run([sys.executable, "-m", "mistol", "voice", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


def check_answer_wav(path: Path) -> Audio:
    with wave.open(str(path)) as w:  # a valid WAV that states its rate
        assert w.getframerate() == 22050 and w.getnchannels() == 1 and w.getnframes() > 0
    audio = read_wav(path)
    assert audio.seconds > 0.3 and audio.rms() > 0.01  # speech, not silence
    return audio


@needs_espeak
@needs_sphinx
@needs_vad
@pytest.mark.slow
def test_voice_file_mode_answers_a_recording(mistral_dir, tmp_path):
    question = concat([silence(0.5, 22050), speak("what is two plus two"), silence(0.8, 22050)])
    (tmp_path / "q.wav").write_bytes(wav_bytes(question))
    out = run_voice(tmp_path, "--model", str(mistral_dir), "--input", str(tmp_path / "q.wav"), "--output",
                    str(tmp_path / "a.wav"), "--grammar", "arithmetic", "-t", "0", "--max-tokens", "12", "--verbose")
    assert out.returncode == 0, out.stderr
    assert "you: What is 2 plus 2?" in out.stdout and "\nstacy: " in out.stdout
    assert re.search(r"first token [\d.]+ s · first audio [\d.]+ s", out.stderr), out.stderr
    check_answer_wav(tmp_path / "a.wav")


@needs_espeak
@needs_sphinx
@needs_vad
@pytest.mark.skipif(not (DEMO / "config.json").is_file(), reason="the demo model is not built yet (scripts/train_demo.py)")
@pytest.mark.slow
def test_demo_model_answers_arithmetic_by_voice(tmp_path):
    from mistol.sandbox.sandbox import network_isolation_available

    if not network_isolation_available():
        pytest.skip("the demo model answers by running code, which needs a network namespace here")
    question = concat([silence(0.5, 22050), speak("what is two plus two"), silence(0.8, 22050)])
    (tmp_path / "q.wav").write_bytes(wav_bytes(question))
    out = run_voice(tmp_path, "--model", "demo", "--yes", "--input", str(tmp_path / "q.wav"), "--output",
                    str(tmp_path / "a.wav"), "-t", "0", "--verbose")
    assert out.returncode == 0, out.stderr
    assert "you: What is 2 plus 2?" in out.stdout
    reply = out.stdout.split("assistant: ", 1)[1]
    assert re.search(r"\b4\b", reply.rsplit("```", 1)[-1]), out.stdout  # the spoken sentence, after the code
    check_answer_wav(tmp_path / "a.wav")


def test_register_adds_the_voice_subcommand():
    from mistol.commands.voice import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["voice", "--model", "m", "--input", "q.wav", "--output", "a.wav", "--stt", "whisper",
                              "--whisper-model", "base.en", "--tts", "piper", "--piper-voice", "v.onnx", "--api", "http://x"])
    assert (args.input, args.output, args.stt, args.whisper_model, args.tts, args.api) == (
        "q.wav", "a.wav", "whisper", "base.en", "piper", "http://x")
    assert args.persona is None and args.run.__name__ == "cmd_voice"


def test_each_missing_piece_names_what_to_install(monkeypatch):
    import builtins

    from mistol.voice import devices, stt, tts

    monkeypatch.setattr(tts.shutil, "which", lambda name: None)
    with pytest.raises(MistolError, match="apt-get install espeak-ng"):
        tts.EspeakTTS()
    for module, make, package in [("pocketsphinx", lambda: stt.PocketSphinxSTT(), "pip install pocketsphinx"),
                                  ("faster_whisper", lambda: stt.WhisperSTT("base.en"), "pip install faster-whisper"),
                                  ("piper", lambda: tts.PiperTTS("v.onnx"), "pip install piper-tts"),
                                  ("sounddevice", devices.Microphone, "pip install sounddevice")]:
        monkeypatch.setitem(sys.modules, module, None)  # import fails
        with pytest.raises(MistolError, match=re.escape(package)):
            make()

    real_import = builtins.__import__

    def no_portaudio(name, *args, **kwargs):
        if name == "sounddevice":
            raise OSError("PortAudio library not found")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_portaudio)
    with pytest.raises(MistolError, match="apt-get install libportaudio2"):
        devices.Microphone()
    monkeypatch.setattr(builtins, "__import__", real_import)

    class NoDevices:
        def query_devices(self, kind=None):
            raise ValueError("No input device matching")

    monkeypatch.setitem(sys.modules, "sounddevice", NoDevices())
    with pytest.raises(MistolError, match="no microphone found"):
        devices.Microphone()

    from mistol.commands.voice import add_arguments, cmd_voice

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    with pytest.raises(MistolError, match="--output needs --input"):
        cmd_voice(parser.parse_args(["--model", "m", "--output", "a.wav"]))


class StubSoundDevice:
    """sounddevice's surface as mistol uses it, with the callbacks driven by the test."""

    def __init__(self):
        self.streams = []

    def query_devices(self, kind=None):
        return {"name": f"stub {kind}", "default_samplerate": 48000.0}

    def _stream(self, **kwargs):
        stub = argparse.Namespace(started=False, closed=False, **kwargs)
        stub.start = lambda: setattr(stub, "started", True)
        stub.stop = lambda: None
        stub.close = lambda: setattr(stub, "closed", True)
        self.streams.append(stub)
        return stub

    def InputStream(self, **kwargs):  # noqa: N802 (sounddevice's name)
        return self._stream(**kwargs)

    def OutputStream(self, **kwargs):  # noqa: N802
        return self._stream(**kwargs)


def test_microphone_and_speaker_adapters_move_audio_through_portaudio_callbacks(monkeypatch):
    from mistol.voice import devices

    sd = StubSoundDevice()
    monkeypatch.setitem(sys.modules, "sounddevice", sd)
    mic = devices.Microphone()
    (stream,) = sd.streams
    assert stream.started and stream.samplerate == 16000 and stream.blocksize == 512
    block = np.linspace(-0.5, 0.5, 512, dtype=np.float32)[:, None]
    stream.callback(block, 512, None, None)
    assert np.array_equal(next(iter(mic)), block[:, 0])

    speaker = devices.Speaker()
    clip = Audio(np.full(1000, 0.25, np.float32), 22050)
    speaker.play(clip, tag=0)
    speaker.play(clip, tag=1)
    out = sd.streams[-1]
    assert out.samplerate == 22050 and speaker.busy()
    buffer = np.ones((600, 1), np.float32)
    out.callback(buffer, 600, None, None)
    assert speaker.progress(0) == pytest.approx(0.6) and np.all(buffer == 0.25)
    out.callback(buffer, 600, None, None)
    assert speaker.progress(0) == 1.0 and speaker.progress(1) == pytest.approx(0.2)
    speaker.stop()  # barge-in: silence from the next buffer on
    out.callback(buffer, 600, None, None)
    assert not speaker.busy() and np.all(buffer == 0) and speaker.progress(1) == pytest.approx(0.2)
    mic.close()
    speaker.close()
    assert all(s.closed for s in sd.streams)


@needs_espeak
@needs_sphinx
@needs_vad
@pytest.mark.slow
def test_a_recording_without_output_is_played_or_says_why_not_and_grammar_none_dictates(mistral_dir, tmp_path):
    question = concat([silence(0.5, 22050), speak("what is two plus two"), silence(0.8, 22050)])
    (tmp_path / "q.wav").write_bytes(wav_bytes(question))
    out = run_voice(tmp_path, "--model", str(mistral_dir), "--input", str(tmp_path / "q.wav"), "--grammar", "none",
                    "-t", "0", "--max-tokens", "6")
    assert out.returncode == 0, out.stderr
    assert "you: " in out.stdout and "\nstacy: " in out.stdout
    try:
        from mistol.voice.devices import Speaker

        Speaker().close()
        has_speaker = True
    except Exception:
        has_speaker = False
    if not has_speaker:
        assert "the answer was not played:" in out.stderr and "--output FILE.wav" in out.stderr, out.stderr
