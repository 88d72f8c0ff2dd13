"""Voice activity detection: where speech starts and ends, in 32 ms frames at 16 kHz.

The detector is Silero VAD v5/v6 (MIT licence): an STFT as a convolution, four small
convolutions and an LSTM cell, about 300k parameters, well under a millisecond a frame on
one core. Its weights ship inside the `silero-vad` wheel (silero_vad/data/
silero_vad_16k.safetensors), so nothing is downloaded. We run those weights with numpy in
the 40 lines below instead of through the package: importing `silero_vad` calls
`torch.set_num_threads(1)` for the whole process (halving the LLM's speed on two cores),
its loaders need TorchScript or onnxruntime, and a tiny network run with torch's threads
while the LLM decodes in another thread costs ~50 ms a frame in thread contention (numpy:
~0.5 ms, one core, no shared pool).

`Segmenter` turns per-frame speech probabilities into utterances with hysteresis (start
above 0.5, end after a stretch below 0.35) and keeps a little audio from before the start.
"""

from __future__ import annotations

import importlib.util
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import MistolError
from .audio import SPEECH_RATE, Audio

FRAME = 512  # samples per VAD frame at 16 kHz (32 ms), the model's fixed input
CONTEXT = 64  # samples of the previous frame the model sees in front of each frame


class SileroVAD:
    """Silero VAD's 16 kHz network; call `probability(frame)` on consecutive frames."""

    def __init__(self, weights: dict[str, np.ndarray]):
        self.w = {k: v.astype(np.float32) for k, v in weights.items()}
        self.reset()

    @classmethod
    def load(cls) -> "SileroVAD":
        from ..weights.safetensors_file import SafetensorsFile

        f = SafetensorsFile(weights_path())
        return cls({name: f.tensor(name).float().numpy().copy() for name in f.keys()})

    def reset(self) -> None:
        self._context = np.zeros(CONTEXT, np.float32)
        self._h = np.zeros(128, np.float32)
        self._c = np.zeros(128, np.float32)

    def probability(self, frame: np.ndarray) -> float:
        w = self.w
        x = np.concatenate([self._context, np.asarray(frame, np.float32).reshape(FRAME)])
        self._context = x[-CONTEXT:]
        x = np.pad(x, (0, 64), mode="reflect")[None]
        x = _conv1d(x, w["stft_conv.weight"], None, stride=128, padding=0)  # 129 real + 129 imaginary rows
        x = np.sqrt(x[:129] ** 2 + x[129:] ** 2)
        x = _relu(_conv1d(x, w["conv1.weight"], w["conv1.bias"], 1, 1))
        x = _relu(_conv1d(x, w["conv2.weight"], w["conv2.bias"], 2, 1))
        x = _relu(_conv1d(x, w["conv3.weight"], w["conv3.bias"], 2, 1))
        x = _relu(_conv1d(x, w["conv4.weight"], w["conv4.bias"], 1, 1))[:, 0]
        gates = w["lstm_cell.weight_ih"] @ x + w["lstm_cell.bias_ih"] + w["lstm_cell.weight_hh"] @ self._h + w["lstm_cell.bias_hh"]
        i, f, g, o = np.split(gates, 4)  # PyTorch's LSTMCell order
        self._c = _sigmoid(f) * self._c + _sigmoid(i) * np.tanh(g)
        self._h = _sigmoid(o) * np.tanh(self._c)
        logit = w["final_conv.weight"][0, :, 0] @ _relu(self._h) + w["final_conv.bias"][0]
        return float(_sigmoid(logit))


def _conv1d(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None, stride: int, padding: int) -> np.ndarray:
    """x: [in, time], weight: [out, in, k] -> [out, time'] (PyTorch's Conv1d, as one matmul)."""
    out_ch, in_ch, k = weight.shape
    if padding:
        x = np.pad(x, ((0, 0), (padding, padding)))
    steps = (x.shape[1] - k) // stride + 1
    cols = np.stack([x[:, j : j + stride * (steps - 1) + 1 : stride] for j in range(k)], axis=1)
    y = weight.reshape(out_ch, in_ch * k) @ cols.reshape(in_ch * k, steps)
    return y if bias is None else y + bias[:, None]


def _relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0)


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def weights_path() -> Path:
    # find_spec locates the package without importing it (its __init__ changes torch's threads).
    spec = importlib.util.find_spec("silero_vad")
    if spec is None or not spec.submodule_search_locations:
        raise MistolError("voice activity detection needs the Silero VAD weights: pip install silero-vad "
                          "(or pip install 'mistol[voice]')")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "silero_vad_16k.safetensors"
    if not path.is_file():
        raise MistolError(f"{path}: missing; this silero-vad version lacks the 16 kHz safetensors weights "
                          "(pip install -U silero-vad)")
    return path


# -- utterances ----------------------------------------------------------------------------
@dataclass
class VADConfig:
    start_threshold: float = 0.5  # a frame at or above this is speech
    end_threshold: float = 0.35  # below this it is silence (between the two: keep the state)
    min_speech_ms: int = 96  # speech shorter than this (a click, a cough) is not an utterance
    end_silence_ms: int = 600  # this much silence ends an utterance
    pad_ms: int = 200  # audio kept before the start and after the end (the recognizers want it)


@dataclass
class Event:
    kind: str  # "start": speech began; "end": an utterance is complete
    time: float  # seconds since the segmenter began: where the speech starts, or ends
    start: float = 0.0  # "end" only: where that utterance's speech started
    audio: Audio | None = None  # "end" only: the utterance, with pad_ms on each side


class Segmenter:
    """Feed 16 kHz audio in any block size; get "start" and "end" events back."""

    def __init__(self, vad: SileroVAD, config: VADConfig | None = None):
        self.vad = vad
        self.config = config or VADConfig()
        self.vad.reset()
        self._pending = np.zeros(0, np.float32)
        self._frames = 0  # frames seen
        self._speech_frames = 0  # consecutive frames of the candidate start
        self._silent_frames = 0  # consecutive frames below end_threshold while in speech
        self.in_speech = False  # an utterance is open ("start" was reported)
        self._start = 0  # frame index where the speech began
        pre = ms_to_frames(self.config.pad_ms) + ms_to_frames(self.config.min_speech_ms)
        self._before: deque[np.ndarray] = deque(maxlen=pre)  # frames before the start
        self._utterance: list[np.ndarray] = []

    @property
    def now(self) -> float:
        return self._frames * FRAME / SPEECH_RATE

    def speech_seconds(self) -> float:
        """How long the open utterance has been going (0 when none is)."""
        return (self._frames - self._start) * FRAME / SPEECH_RATE if self.in_speech else 0.0

    def feed(self, samples: np.ndarray) -> list[Event]:
        self._pending = np.concatenate([self._pending, np.asarray(samples, np.float32).reshape(-1)])
        events = []
        while len(self._pending) >= FRAME:
            frame, self._pending = self._pending[:FRAME], self._pending[FRAME:]
            event = self._frame(frame)
            if event is not None:
                events.append(event)
        return events

    def flush(self) -> list[Event]:
        """End of the audio: close an open utterance."""
        if not self.in_speech:
            return []
        return [self._close(self._frames - self._silent_frames)]

    def _frame(self, frame: np.ndarray) -> Event | None:
        c = self.config
        p = self.vad.probability(frame)
        self._frames += 1
        if not self.in_speech:
            self._before.append(frame)
            self._speech_frames = self._speech_frames + 1 if p >= c.start_threshold else 0
            if self._speech_frames >= max(1, ms_to_frames(c.min_speech_ms)):
                self.in_speech = True
                self._start = self._frames - self._speech_frames
                self._silent_frames = 0
                self._utterance = list(self._before)
                self._before.clear()
                return Event("start", self._start * FRAME / SPEECH_RATE)
            return None
        self._utterance.append(frame)
        self._silent_frames = self._silent_frames + 1 if p < c.end_threshold else 0
        if self._silent_frames >= ms_to_frames(c.end_silence_ms):
            return self._close(self._frames - self._silent_frames)
        return None

    def _close(self, end_frame: int) -> Event:
        """The utterance ends after frame `end_frame`; keep pad_ms of what followed."""
        keep_after = ms_to_frames(self.config.pad_ms)
        drop = max(0, self._frames - end_frame - keep_after)
        frames = self._utterance[: len(self._utterance) - drop] if drop else self._utterance
        self.in_speech = False
        self._speech_frames = 0
        self._utterance = []
        self._before.clear()
        audio = Audio(np.concatenate(frames) if frames else np.zeros(0, np.float32), SPEECH_RATE)
        return Event("end", end_frame * FRAME / SPEECH_RATE, self._start * FRAME / SPEECH_RATE, audio)


def ms_to_frames(ms: float) -> int:
    return int(round(ms / 1000 * SPEECH_RATE / FRAME))


def utterances(audio: Audio, vad: SileroVAD | None = None, config: VADConfig | None = None) -> list[Event]:
    """The utterances ("end" events) of a whole recording."""
    segmenter = Segmenter(vad or SileroVAD.load(), config)
    events = [*segmenter.feed(audio.resample(SPEECH_RATE).samples), *segmenter.flush()]
    return [e for e in events if e.kind == "end"]
