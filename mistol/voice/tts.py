"""Text to speech: espeak-ng (default; a subprocess writing WAV to stdout) or a piper voice.

`speakable` first turns a model's written reply into what should be said: no code blocks,
no Markdown marks, no URLs.
"""

from __future__ import annotations

import io
import re
import shutil
import subprocess
import wave
from pathlib import Path
from typing import Protocol

from ..errors import MistolError
from .audio import Audio, read_wav


class TTS(Protocol):
    def synthesize(self, text: str) -> Audio: ...


class EspeakTTS:
    def __init__(self, voice: str = "en-us", words_per_minute: int = 170, binary: str = "espeak-ng"):
        self.binary = shutil.which(binary)
        if self.binary is None:
            raise MistolError("speech output needs espeak-ng: apt-get install espeak-ng "
                              "(or give a piper voice with --tts piper --piper-voice FILE.onnx)")
        self.voice = voice
        self.words_per_minute = words_per_minute

    def synthesize(self, text: str) -> Audio:
        # The text goes in on stdin: a reply starting with "-" must not read as an option.
        result = subprocess.run([self.binary, "--stdout", "-v", self.voice, "-s", str(self.words_per_minute)],
                                input=text.encode("utf-8"), capture_output=True, timeout=60)
        if result.returncode != 0 or not result.stdout:
            message = result.stderr.decode(errors="replace").strip().splitlines()
            raise MistolError(f"espeak-ng failed ({message[-1] if message else f'exit {result.returncode}'})")
        return read_wav(result.stdout)


class PiperTTS:
    """A piper voice: FILE.onnx with FILE.onnx.json beside it (pip install piper-tts)."""

    def __init__(self, voice_path: str):
        try:
            from piper import PiperVoice
        except ImportError:
            raise MistolError("--tts piper needs piper-tts: pip install piper-tts") from None
        path = Path(voice_path).expanduser()
        if not path.is_file():
            raise MistolError(f"{voice_path}: no such piper voice (a .onnx file with its .onnx.json beside it)")
        try:
            self.voice = PiperVoice.load(str(path))
        except Exception as e:
            raise MistolError(f"{voice_path}: piper cannot load this voice ({type(e).__name__}: {e})") from None

    def synthesize(self, text: str) -> Audio:
        buffer = io.BytesIO()
        with wave.open(buffer, "wb") as w:
            if hasattr(self.voice, "synthesize_wav"):  # piper-tts >= 1.3
                self.voice.synthesize_wav(text, w)
            else:  # piper-tts 1.2
                self.voice.synthesize(text, w)
        return read_wav(buffer.getvalue())


def make_tts(kind: str, piper_voice: str | None = None) -> TTS:
    if kind == "piper" or piper_voice:
        if not piper_voice:
            raise MistolError("--tts piper needs --piper-voice FILE.onnx")
        return PiperTTS(piper_voice)
    return EspeakTTS()


# -- what to say -----------------------------------------------------------------------------
_FENCED = re.compile(r"^[ \t]*(`{3,}|~{3,}).*?(^[ \t]*\1[ \t]*$|\Z)", re.S | re.M)
_INLINE_CODE = re.compile(r"`+([^`]*)`+")
_LINK = re.compile(r"!?\[([^\]]*)\]\([^)]*\)")
_URL = re.compile(r"https?://\S*[^\s.,;:!?)\]]")
_TIMES = re.compile(r"(?<=\d)\s*[*×]\s*(?=\d)")
_EMPHASIS = re.compile(r"(\*{1,3}|_{2,3})(\S(?:.*?\S)?)\1")
_LINE_MARK = re.compile(r"^[ \t]*(#{1,6}[ \t]+|>[ \t]?|[-*+][ \t]+|\d+[.)][ \t]+)", re.M)
_RULE = re.compile(r"^[ \t]*([-*_][ \t]*){3,}$", re.M)
_TABLE = re.compile(r"^[ \t]*\|?[ \t:-]*-{3,}[ \t:|-]*$", re.M)


def speakable(text: str) -> str:
    """The words of a Markdown reply, as they should be read aloud."""
    text = _FENCED.sub(" ", text)
    text = text.replace("```", " ")
    text = _LINK.sub(r"\1", text)
    text = _URL.sub("a link", text)
    text = _INLINE_CODE.sub(r"\1", text)
    text = _TIMES.sub(" times ", text)
    text = _EMPHASIS.sub(r"\2", text)
    text = _RULE.sub(" ", text)
    text = _TABLE.sub(" ", text)
    text = _LINE_MARK.sub("", text)
    text = text.replace("|", ", ").replace("*", "").replace("#", "")
    return re.sub(r"\s+", " ", text).strip()
