"""The microphone and the speaker, through PortAudio (the `sounddevice` package).

Both are callback streams: PortAudio's thread copies blocks into a queue (microphone) or out
of a list of clips (speaker), so the conversation never blocks the audio and the audio
never waits for the model.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Iterator

import numpy as np

from ..errors import MistolError
from .audio import SPEECH_RATE, Audio, resample
from .vad import FRAME


def sounddevice():
    try:
        import sounddevice as sd
    except ImportError:
        raise MistolError("live audio needs sounddevice: pip install sounddevice "
                          "(or answer a recording: --input question.wav --output answer.wav)") from None
    except OSError:  # the package is there, libportaudio.so.2 is not
        raise MistolError("live audio needs the PortAudio library: apt-get install libportaudio2 "
                          "(or answer a recording: --input question.wav --output answer.wav)") from None
    return sd


def _device(sd, kind: str) -> dict:
    try:
        return sd.query_devices(kind=kind)
    except Exception:
        what = "microphone" if kind == "input" else "speaker"
        raise MistolError(f"no {what} found (PortAudio lists no {kind} device); connect one, "
                          "or answer a recording: --input question.wav --output answer.wav") from None


class Microphone:
    """16 kHz mono float32 blocks of FRAME samples, as an iterator."""

    def __init__(self):
        sd = sounddevice()
        info = _device(sd, "input")
        self.blocks: queue.Queue[np.ndarray] = queue.Queue()
        self.rate = SPEECH_RATE
        try:  # most devices (and ALSA's plug layer) record at 16 kHz directly
            self.stream = sd.InputStream(samplerate=SPEECH_RATE, channels=1, dtype="float32", blocksize=FRAME,
                                         callback=self._callback)
        except Exception:
            self.rate = int(info["default_samplerate"])
            block = int(round(FRAME * self.rate / SPEECH_RATE))
            try:
                self.stream = sd.InputStream(samplerate=self.rate, channels=1, dtype="float32", blocksize=block,
                                             callback=self._callback)
            except Exception as e:
                raise MistolError(f"cannot open the microphone ({info.get('name', '?')}): {e}") from None
        self.stream.start()

    def _callback(self, indata, frames, time_info, status) -> None:
        self.blocks.put(indata[:, 0].copy())

    def __iter__(self) -> Iterator[np.ndarray]:
        while True:
            block = self.blocks.get()
            yield block if self.rate == SPEECH_RATE else resample(block, self.rate, SPEECH_RATE)

    def close(self) -> None:
        self.stream.stop()
        self.stream.close()


class Speaker:
    """Plays clips one after another; `stop` silences it at once (barge-in)."""

    def __init__(self):
        self.sd = sounddevice()
        _device(self.sd, "output")
        self._clips: deque[list] = deque()  # [tag, samples, position]
        self._progress: dict[int, float] = {}
        self._lock = threading.Lock()
        self._stream = None
        self.rate: int | None = None

    def play(self, audio: Audio, tag: int) -> None:
        if self._stream is None:  # opened at the first clip's rate: the TTS voice's own
            self.rate = audio.rate
            try:
                self._stream = self.sd.OutputStream(samplerate=self.rate, channels=1, dtype="float32",
                                                    callback=self._callback)
                self._stream.start()
            except Exception as e:
                raise MistolError(f"cannot open the speaker at {self.rate} Hz: {e}") from None
        samples = audio.resample(self.rate).samples
        with self._lock:
            self._clips.append([tag, samples, 0])
            self._progress[tag] = 0.0

    def _callback(self, outdata, frames, time_info, status) -> None:
        out = outdata[:, 0]
        filled = 0
        with self._lock:
            while filled < frames and self._clips:
                clip = self._clips[0]
                tag, samples, pos = clip
                n = min(frames - filled, len(samples) - pos)
                out[filled : filled + n] = samples[pos : pos + n]
                clip[2] = pos + n
                filled += n
                self._progress[tag] = clip[2] / max(1, len(samples))
                if clip[2] >= len(samples):
                    self._clips.popleft()
        out[filled:] = 0

    def stop(self) -> None:
        with self._lock:
            self._clips.clear()

    def busy(self) -> bool:
        with self._lock:
            return bool(self._clips)

    def progress(self, tag: int) -> float:
        with self._lock:
            return self._progress.get(tag, 0.0)

    def close(self) -> None:
        if self._stream is not None:
            self._stream.stop()
            self._stream.close()
