"""Audio as mono float32 samples with their rate: WAV in and out, resampling, silence.

Everything in `voice/` passes `Audio` around: the microphone and the STT engines want
16 kHz, espeak-ng writes 22.05 kHz, piper voices 16 or 22.05 kHz. Only numpy is needed.
"""

from __future__ import annotations

import io
import struct
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import MistolError

SPEECH_RATE = 16000  # what the VAD and both STT engines expect


@dataclass
class Audio:
    samples: np.ndarray  # float32, mono, in [-1, 1]
    rate: int

    def __post_init__(self):
        self.samples = np.asarray(self.samples, dtype=np.float32).reshape(-1)

    @property
    def seconds(self) -> float:
        return len(self.samples) / self.rate

    def resample(self, rate: int) -> "Audio":
        return self if rate == self.rate else Audio(resample(self.samples, self.rate, rate), rate)

    def slice(self, start_s: float, end_s: float) -> "Audio":
        return Audio(self.samples[max(0, int(start_s * self.rate)) : int(end_s * self.rate)], self.rate)

    def rms(self) -> float:
        return float(np.sqrt(np.mean(self.samples.astype(np.float64) ** 2))) if len(self.samples) else 0.0


def silence(seconds: float, rate: int) -> Audio:
    return Audio(np.zeros(int(round(seconds * rate)), np.float32), rate)


def concat(clips: list[Audio], rate: int | None = None) -> Audio:
    """Clips joined end to end at `rate` (default: the first clip's)."""
    rate = rate or (clips[0].rate if clips else SPEECH_RATE)
    parts = [c.resample(rate).samples for c in clips]
    return Audio(np.concatenate(parts) if parts else np.zeros(0, np.float32), rate)


# -- WAV -----------------------------------------------------------------------------------
def read_wav(source: str | Path | bytes) -> Audio:
    """PCM (8/16/24/32-bit) or 32/64-bit float WAV, any channels (averaged to mono).

    Written by hand rather than with `wave`, because `espeak-ng --stdout` does not know the
    length when it writes the header and puts 0x7ffffffff-style sizes there; the data chunk
    is then simply whatever follows.
    """
    name = "<bytes>" if isinstance(source, (bytes, bytearray)) else str(source)
    try:
        data = bytes(source) if isinstance(source, (bytes, bytearray)) else Path(source).read_bytes()
    except OSError as e:
        raise MistolError(f"{name}: cannot read ({e.strerror})") from None
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise MistolError(f"{name}: not a WAV file (expected a RIFF/WAVE header)")
    fmt = None
    pos = 12
    while pos + 8 <= len(data):
        tag, size = data[pos : pos + 4], struct.unpack("<I", data[pos + 4 : pos + 8])[0]
        body = pos + 8
        if tag == b"fmt ":
            fmt = list(struct.unpack("<HHIIHH", data[body : body + 16]))
            if fmt[0] == 0xFFFE and size >= 26:  # WAVE_FORMAT_EXTENSIBLE: the subformat GUID says PCM or float
                fmt[0] = struct.unpack("<H", data[body + 24 : body + 26])[0]
        elif tag == b"data":
            if fmt is None:
                raise MistolError(f"{name}: WAV data chunk before its fmt chunk")
            return _decode(name, fmt, data[body : min(len(data), body + size)])
        pos = body + size + (size & 1)
    raise MistolError(f"{name}: WAV file without a data chunk")


def _decode(name: str, fmt: list, raw: bytes) -> Audio:
    code, channels, rate, _, _, bits = fmt
    width = bits // 8
    if channels < 1 or width < 1 or rate < 1:
        raise MistolError(f"{name}: bad WAV format ({channels} channels, {bits} bits, {rate} Hz)")
    raw = raw[: len(raw) - len(raw) % (width * channels)]
    if code == 3 and width in (4, 8):
        x = np.frombuffer(raw, "<f4" if width == 4 else "<f8").astype(np.float32)
    elif code == 1 and width == 1:
        x = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128) / 128
    elif code == 1 and width == 2:
        x = np.frombuffer(raw, "<i2").astype(np.float32) / 32768
    elif code == 1 and width == 3:
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        x = np.where(v >= 1 << 23, v - (1 << 24), v).astype(np.float32) / (1 << 23)
    elif code == 1 and width == 4:
        x = np.frombuffer(raw, "<i4").astype(np.float32) / 2**31
    else:
        raise MistolError(f"{name}: unsupported WAV encoding (format {code}, {bits} bits); use PCM or float")
    return Audio(x.reshape(-1, channels).mean(axis=1), rate)


def wav_bytes(audio: Audio) -> bytes:
    """16-bit PCM mono WAV; the header states the sample rate."""
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(audio.rate)
        w.writeframes(to_pcm16(audio.samples))
    return buffer.getvalue()


def write_wav(path: str | Path, audio: Audio) -> None:
    try:
        Path(path).write_bytes(wav_bytes(audio))
    except OSError as e:
        raise MistolError(f"{path}: cannot write ({e.strerror})") from None


def to_pcm16(samples: np.ndarray) -> bytes:
    return (np.clip(samples, -1, 1) * 32767).round().astype("<i2").tobytes()


# -- resampling ----------------------------------------------------------------------------
def resample(x: np.ndarray, rate_in: int, rate_out: int, taps: int = 16) -> np.ndarray:
    """Band-limited resampling: each output sample is a Hann-windowed sinc interpolation of
    the `taps` input samples on each side, with the cutoff at the lower Nyquist frequency
    (so 22.05 -> 16 kHz does not fold 8-11 kHz hiss into the speech band)."""
    x = np.asarray(x, dtype=np.float32)
    if rate_in == rate_out or len(x) == 0:
        return x.copy()
    n_out = int(round(len(x) * rate_out / rate_in))
    cutoff = min(1.0, rate_out / rate_in)  # in units of the input Nyquist frequency
    half = int(np.ceil(taps / cutoff))
    out = np.empty(n_out, np.float32)
    padded = np.concatenate([np.zeros(half, np.float32), x, np.zeros(half + 1, np.float32)])
    offsets = np.arange(-half + 1, half + 1)
    step = 8192  # output samples per block: bounds the (block x taps) temporary
    for lo in range(0, n_out, step):
        t = np.arange(lo, min(n_out, lo + step)) * (rate_in / rate_out)  # positions in input samples
        base = np.floor(t).astype(np.int64)
        idx = base[:, None] + offsets[None, :]
        d = t[:, None] - idx  # distance from each tap, in input samples
        h = cutoff * np.sinc(cutoff * d) * (0.5 + 0.5 * np.cos(np.pi * np.clip(d / (half + 1), -1, 1)))
        out[lo : lo + len(t)] = (padded[idx + half] * h).sum(axis=1)
    return out
