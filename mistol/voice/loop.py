"""The spoken conversation: listen, transcribe, answer while speaking, stop when interrupted.

    microphone ─► Segmenter (VAD) ─► end of utterance ─► STT ─► LLM.chat, streaming
                                                                   │ pieces
                     speaker ◄─ sink ◄─ TTS thread ◄─ sentences ◄──┘ (generation thread)

One reply runs three things at once: the generation thread feeds the model's pieces to a
`SentenceSplitter` and queues each sentence as soon as it is complete; the TTS thread
turns sentences into audio and hands each clip to the sink while the model writes the
next; the calling thread keeps reading the microphone. When the VAD hears the person
speak for `barge_in_ms` during the reply, playback and generation stop, the assistant's
message is cut to what was actually played, and the words being spoken become the next
utterance (the segmenter has been collecting them all along).

Sources and sinks are plain objects (an iterator of 16 kHz float32 blocks; `play`, `stop`,
`busy`, `progress`), so all of this runs in tests with prepared audio and no device:
`BufferSink` keeps what it is given, at once or at the pace of a real speaker.

Before code runs without --yes, the reply pauses: "Shall I run it?" is spoken, the calling
thread (the one that owns the microphone) listens for the answer with the yes/no grammar,
and only a clear yes runs the block; otherwise the person hears that it did not run and how
to allow it, and the model is told the run was declined.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from ..sampling import SamplingParams
from ..sandbox.code_turn import CodeRunner, code_turn
from ..sandbox.visible import visible
from .audio import Audio, concat
from .confirm import ANSWER_TIMEOUT_S, MAX_ANSWER_S, NOT_RUN_DECLINED, NOT_RUN_UNHEARD, QUESTION, is_clear_yes
from .sentences import Sentence, SentenceSplitter
from .stt import STT
from .tts import TTS, speakable
from .vad import Event, Segmenter, SileroVAD, VADConfig, utterances


# -- events and timings ----------------------------------------------------------------------
class EventLog:
    """What happened when (perf_counter seconds): the tests read the order, --verbose the gaps."""

    def __init__(self):
        self.events: list[tuple[float, str, object]] = []
        self._lock = threading.Lock()

    def add(self, name: str, detail: object = None) -> None:
        with self._lock:
            self.events.append((time.perf_counter(), name, detail))

    def names(self) -> list[str]:
        with self._lock:
            return [name for _, name, _ in self.events]

    def index(self, name: str, detail: object = None) -> int:
        """Position of the first event called `name` (with `detail`, when given)."""
        for i, (_, n, d) in enumerate(list(self.events)):
            if n == name and (detail is None or d == detail):
                return i
        raise ValueError(f"no event {name!r} ({detail!r})")

    def last_time(self, name: str) -> float | None:
        times = [t for t, n, _ in list(self.events) if n == name]
        return times[-1] if times else None


# -- sinks -------------------------------------------------------------------------------------
class AudioSink(Protocol):
    def play(self, audio: Audio, tag: int) -> None: ...  # queue a clip; returns at once
    def stop(self) -> None: ...  # silence now, drop what is queued
    def busy(self) -> bool: ...  # something is queued or playing
    def progress(self, tag: int) -> float: ...  # how much of clip `tag` has been played, 0..1


class BufferSink:
    """A speaker that keeps what it plays. `speed=None`: every clip counts as played at once
    (file mode); `speed=s`: clips play at s times real time in a thread, like a device."""

    def __init__(self, speed: float | None = None, step_s: float = 0.02):
        self.speed = speed
        self.step_s = step_s
        self.played: list[tuple[int, Audio]] = []  # (tag, the part of the clip that was played)
        self._queue: deque[list] = deque()  # [tag, audio, samples played]
        self._progress: dict[int, float] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = False
        self._thread: threading.Thread | None = None

    def play(self, audio: Audio, tag: int) -> None:
        with self._lock:
            if self.speed is None:
                self.played.append((tag, audio))
                self._progress[tag] = 1.0
                return
            self._queue.append([tag, audio, 0])
            self._progress[tag] = 0.0
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="mistol-sink", daemon=True)
                self._thread.start()
        self._wake.set()

    def _run(self) -> None:
        while not self._closed:
            with self._lock:
                clip = self._queue[0] if self._queue else None
                if clip is not None:
                    tag, audio, pos = clip
                    n = min(len(audio.samples) - pos, max(1, int(audio.rate * self.step_s)))
                    clip[2] = pos + n
                    self._progress[tag] = clip[2] / max(1, len(audio.samples))
                    if clip[2] >= len(audio.samples):
                        self._queue.popleft()
                        self.played.append((tag, audio))
            if clip is None:
                self._wake.wait(0.05)
                self._wake.clear()
            else:
                time.sleep(self.step_s / self.speed)

    def stop(self) -> None:
        with self._lock:
            for tag, audio, pos in self._queue:
                if pos:
                    self.played.append((tag, Audio(audio.samples[:pos], audio.rate)))
            self._queue.clear()

    def busy(self) -> bool:
        with self._lock:
            return bool(self._queue)

    def progress(self, tag: int) -> float:
        with self._lock:
            return self._progress.get(tag, 0.0)

    def audio(self) -> Audio | None:
        """Everything played, end to end (None: nothing was)."""
        with self._lock:
            clips = [a for _, a in self.played]
        return concat(clips) if clips else None

    def close(self) -> None:
        self._closed = True
        self._wake.set()


# -- one reply ---------------------------------------------------------------------------------
@dataclass
class Reply:
    text: str  # what the conversation keeps: all of it, or as far as it was spoken
    generated: str  # everything the model wrote (and code output), spoken or not
    interrupted: bool = False
    sentences: list[str] = field(default_factory=list)  # what was sent to the TTS, in order


class Responder:
    """Streams one assistant reply into speech; see the module docstring."""

    def __init__(self, llm, params: SamplingParams, tts: TTS, sink: AudioSink, events: EventLog,
                 code: CodeRunner | None = None, on_text: Callable[[str], None] | None = None,
                 hear: Callable[[], str | None] | None = None, notice: Callable[[str], None] | None = None):
        self.llm = llm
        self.params = params
        self.tts = tts
        self.sink = sink
        self.events = events
        self.code = code
        self.on_text = on_text or (lambda text: None)
        # Called in the calling thread once "Shall I run it?" is queued: the spoken answer's
        # transcript (None: nothing heard). None: the code runner decides without a voice.
        self.hear = hear
        self.notice = notice or (lambda text: None)

    def respond(self, messages: list[dict], poll: Callable[[], bool | None] | None = None) -> Reply:
        """Append the assistant's message to `messages`, speaking it as it is written. `poll`
        is called while the reply plays; True means the person barged in (None: no more
        input to watch)."""
        message = {"role": "assistant", "content": ""}
        messages.append(message)
        stop = threading.Event()
        # (start, sentence, end) of the reply, or (-1, text, event set once played) said by mistol
        ready: queue.Queue[tuple | None] = queue.Queue()
        spans: dict[int, tuple[int, int]] = {}  # clip tag -> the sentence's [start, end) in the message
        spoken: list[str] = []
        failures: list[BaseException] = []
        asking = threading.Event()  # the question was queued: the calling thread listens
        answers: queue.Queue[str | None] = queue.Queue()

        def say(text: str) -> bool:
            """Speak `text` (not part of the reply) after what is queued; True once it is
            handed to the sink."""
            done = threading.Event()
            ready.put((-1, text, done))
            while not (done.wait(0.05) or stop.is_set()):
                pass
            return done.is_set()

        def ask_aloud(prompt: str) -> str:
            """The code runner's question, asked by voice: "y" only for a clear yes."""
            self.notice(f"{QUESTION} (say yes or no)")
            if not say(QUESTION):
                return "n"
            asking.set()
            while not stop.is_set():
                try:
                    answer = answers.get(timeout=0.05)
                    break
                except queue.Empty:
                    continue
            else:
                return "n"
            if is_clear_yes(answer):
                return "y"
            said_no = bool(answer and answer.strip())
            self.notice("(code not run: " + ("you said no" if said_no else "no clear yes was heard")
                        + "; say yes when asked, or start with --yes)")
            ready.put((-1, NOT_RUN_DECLINED if said_no else NOT_RUN_UNHEARD, None))
            return "n"

        def generate() -> None:
            splitter = SentenceSplitter()
            last_end = 0
            first_token = True

            def queue_sentences(found: list[Sentence]) -> None:
                nonlocal last_end
                inserted = len(message["content"]) - splitter.fed  # code output the turn added
                for s in found:
                    end = min(len(message["content"]), s.end + inserted)
                    ready.put((last_end, s, end))
                    last_end = end
                    self.events.add("sentence", s.text)

            def show(text: str, is_output: bool) -> None:
                nonlocal first_token
                if first_token:
                    first_token = False
                    self.events.add("first_token")
                self.on_text(visible(text))  # shown on a terminal: escapes written out, not obeyed
                if not is_output:  # code output is shown, never spoken
                    queue_sentences(splitter.feed(text))

            def run(block) -> str:
                # The round ended on the closing fence without its newline: close it for the
                # splitter too, or it would take what follows the output for more code.
                queue_sentences(splitter.feed("\n"))
                return self.code.handle(block)

            try:
                code_turn(self.llm, messages, self.params, run if self.code is not None else None, show,
                          stopped=stop.is_set)
                if not stop.is_set():
                    queue_sentences(splitter.flush())
            except BaseException as e:  # reported by the calling thread
                failures.append(e)
            finally:
                self.events.add("llm_done")
                ready.put(None)

        def speak() -> None:
            tag = 0
            try:
                while True:
                    item = ready.get()
                    if item is None or stop.is_set():
                        return
                    start, sentence, end = item
                    if start < 0:  # said by mistol itself (the question about code)
                        self.events.add("say", sentence)
                        self.sink.play(self.tts.synthesize(sentence), tag)
                        tag += 1
                        if end is not None:
                            end.set()
                        continue
                    text = speakable(sentence.text)
                    if not text:
                        continue
                    self.events.add("tts_start", tag)
                    audio = self.tts.synthesize(text)
                    if stop.is_set():
                        return
                    spans[tag] = (start, end)
                    spoken.append(text)
                    self.events.add("audio", tag)
                    self.sink.play(audio, tag)
                    tag += 1
            except BaseException as e:
                failures.append(e)
                stop.set()

        threads = [threading.Thread(target=generate, name="mistol-llm", daemon=True),
                   threading.Thread(target=speak, name="mistol-tts", daemon=True)]
        interrupted = finished = False
        asker = self.code is not None and self.hear is not None
        if asker:  # before the generation thread can reach a block
            previous_ask, self.code.ask = self.code.ask, ask_aloud
        for t in threads:
            t.start()
        try:
            while any(t.is_alive() for t in threads) or self.sink.busy():
                if asking.is_set():
                    asking.clear()
                    answers.put(self.hear())
                    continue
                heard = poll() if poll is not None else None
                if heard:
                    interrupted = True
                    self.events.add("barge_in")
                    break
                if heard is None:
                    time.sleep(0.01)
            finished = True
        finally:
            if interrupted or not finished:  # barge-in, or Ctrl-C
                stop.set()
                self.sink.stop()
            for t in threads:
                t.join()
            if asker:
                self.code.ask = previous_ask
        generated = message["content"]
        if interrupted:
            message["content"] = self._as_spoken(generated, spans)
        if not message["content"]:
            messages.pop()  # nothing was said: keep no empty turn
        self.events.add("reply_done")
        if failures:
            raise failures[0]
        return Reply(message["content"], generated, interrupted, spoken)

    def _as_spoken(self, text: str, spans: dict[int, tuple[int, int]]) -> str:
        """The reply as far as it was played: whole sentences, then the words of the one that
        was playing, and a dash where the person cut in."""
        kept = 0
        for tag in sorted(spans):
            start, end = spans[tag]
            done = self.sink.progress(tag)
            if done >= 1.0:
                kept = end
                continue
            if done > 0:
                segment = text[start:end]
                words = segment.split()
                n = int(np.ceil(done * len(words)))
                lead = segment[: len(segment) - len(segment.lstrip())]
                return (text[:start] + lead + " ".join(words[:n])).rstrip() + "—"
            break
        return text[:kept].rstrip() + ("—" if kept else "")


# -- the conversation --------------------------------------------------------------------------
@dataclass
class Turn:
    transcript: str
    reply: Reply | None
    heard_s: float  # length of the utterance
    timings: dict[str, float]  # seconds after the end of speech was noticed


class Conversation:
    def __init__(self, llm, params: SamplingParams, stt: STT, tts: TTS, system: str,
                 vad: SileroVAD | None = None, vad_config: VADConfig | None = None, code: CodeRunner | None = None,
                 barge_in_ms: int | None = 300, events: EventLog | None = None,
                 on_transcript: Callable[[str], None] | None = None, on_text: Callable[[str], None] | None = None,
                 answer_stt: STT | None = None, answer_timeout_s: float = ANSWER_TIMEOUT_S,
                 on_notice: Callable[[str], None] | None = None):
        self.llm = llm
        self.params = params
        self.stt = stt
        self.tts = tts
        self.vad = vad
        self.vad_config = vad_config or VADConfig()
        self.code = code
        self.barge_in_ms = barge_in_ms  # None: never interrupt a reply
        self.events = events or EventLog()
        self.on_transcript = on_transcript or (lambda text: None)
        self.on_text = on_text
        # Live mode hears the answer to "Shall I run it?" with this (the yes/no grammar);
        # None: the code runner decides alone (file mode: nobody to ask).
        self.answer_stt = answer_stt
        self.answer_timeout_s = answer_timeout_s
        self.on_notice = on_notice
        self.messages: list[dict] = [{"role": "system", "content": system}] if system else []
        self.turns: list[Turn] = []

    def _vad(self) -> SileroVAD:
        if self.vad is None:
            self.vad = SileroVAD.load()
        return self.vad

    def turn(self, audio: Audio, sink: AudioSink, poll: Callable[[], bool | None] | None = None,
             hear: Callable[[], str | None] | None = None) -> Turn:
        """Answer one utterance (its speech ended just now)."""
        self.events.add("speech_end")
        t0 = time.perf_counter()
        text = self.stt.transcribe(audio).strip()
        self.events.add("transcript", text)
        timings = {"transcript": time.perf_counter() - t0}
        if not text:
            turn = Turn("", None, audio.seconds, timings)
            self.turns.append(turn)
            return turn
        self.on_transcript(visible(text))
        self.messages.append({"role": "user", "content": text})
        responder = Responder(self.llm, self.params, self.tts, sink, self.events, self.code, self.on_text,
                              hear, self.on_notice)
        marks = len(self.events.events)
        reply = responder.respond(self.messages, poll)
        for t, name, _ in self.events.events[marks:]:
            if name in ("first_token", "audio") and name not in timings:
                timings[name] = t - t0
        turn = Turn(text, reply, audio.seconds, timings)
        self.turns.append(turn)
        return turn

    def answer_recording(self, audio: Audio, sink: AudioSink) -> Turn:
        """File mode: the whole recording is one question (its silences trimmed by the VAD)."""
        found = utterances(audio, self._vad(), self.vad_config)
        speech = concat([e.audio for e in found if e.audio is not None]) if found else audio
        return self.turn(speech, sink)

    def run(self, source: Iterable[np.ndarray], sink: AudioSink, on_turn: Callable[[Turn], None] | None = None) -> None:
        """Live mode: until the source ends (or Ctrl-C)."""
        segmenter = Segmenter(self._vad(), self.vad_config)
        blocks = iter(source)
        ended = False

        def next_utterance() -> Event | None:
            nonlocal ended
            for block in blocks:
                for event in segmenter.feed(block):
                    if event.kind == "start":
                        self.events.add("speech_start")
                    elif event.kind == "end":
                        return event
            ended = True
            return next((e for e in segmenter.flush() if e.kind == "end"), None)

        def poll() -> bool | None:
            nonlocal ended
            if ended:
                return None
            block = next(blocks, None)
            if block is None:
                ended = True
                return None
            for event in segmenter.feed(block):
                if event.kind == "start":
                    self.events.add("speech_start")
            if self.barge_in_ms is None:
                return False
            return segmenter.in_speech and segmenter.speech_seconds() * 1000 >= self.barge_in_ms

        def hear() -> str | None:
            """The answer to the question just queued on the sink: its transcript, "" for
            speech that is not an answer, None for silence until the timeout."""
            nonlocal ended
            while sink.busy():  # our own question: what the microphone hears is its echo
                if ended or next(blocks, None) is None:
                    ended = True
                    return None
            self.events.add("listening")
            listener = Segmenter(self._vad(), self.vad_config)
            waited = 0.0
            found: list[Event] = []
            for block in blocks:
                waited += len(block) / 16000
                found = [e for e in listener.feed(block) if e.kind == "end"]
                if found or (not listener.in_speech and waited >= self.answer_timeout_s):
                    break
                if waited >= self.answer_timeout_s + MAX_ANSWER_S:
                    break
            else:
                ended = True
                found = [e for e in listener.flush() if e.kind == "end"]
            if not found or found[0].audio is None:
                self.events.add("answer", None)
                return None
            answer = found[0].audio
            text = self.answer_stt.transcribe(answer).strip() if answer.seconds <= MAX_ANSWER_S else ""
            self.events.add("answer", text)
            if text:
                self.on_transcript(visible(text))
            return text

        while not ended:
            event = next_utterance()
            if event is None or event.audio is None:
                break
            turn = self.turn(event.audio, sink, poll, hear if self.answer_stt is not None else None)
            if on_turn is not None:
                on_turn(turn)
            if turn.reply is not None and not turn.reply.interrupted:
                # Whatever the VAD half-heard while the reply played was not a barge-in: the
                # echo of our own voice, a cough. Start the next utterance afresh.
                segmenter = Segmenter(self._vad(), self.vad_config)


def frames_of(audio: Audio, block: int = 512) -> Iterator[np.ndarray]:
    """A recording as a source of blocks, as a microphone would give them."""
    samples = audio.resample(16000).samples
    for i in range(0, len(samples), block):
        yield samples[i : i + block]
