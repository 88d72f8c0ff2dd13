"""Speech to text: PocketSphinx (default, offline, model in its wheel) or faster-whisper.

PocketSphinx's general English language model is weak on open dictation (on espeak-ng's
voice "what is two plus two" comes out as "what is due"); a JSGF grammar that lists what
may be said makes it reliable within that grammar. mistol ships two grammars, `arithmetic`
(numbers to 9999 with + - x / mod power, and greetings: what the demo model answers) and
`yes_no` (the spoken answer to "Shall I run it?"), and takes any .gram file. faster-whisper
transcribes open speech well but needs a model (e.g. "base.en" or a local CTranslate2
directory) and the `faster-whisper` package.

PocketSphinx returns bare lower-case words; they are made a sentence with numbers as digits
("what is thirty seven times forty eight" -> "What is 37 times 48?"), the form models are
trained on (and the one faster-whisper writes).
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Protocol

import numpy as np

from ..errors import MistolError
from .audio import SPEECH_RATE, Audio, concat, silence
from .confirm import yes_no_grammar


class STT(Protocol):
    def transcribe(self, audio: Audio) -> str: ...


ARITHMETIC_GRAMMAR = """#JSGF V1.0;
grammar arithmetic;
public <utterance> = <question> | <greeting>;
<greeting> = hello | hi | hey there | good morning | who are you | what can you do | help;
<question> = [what is | what's | compute | calculate | how much is] <number> <operator> <number>;
<operator> = plus | minus | times | multiplied by | divided by | to the power of | modulo | mod;
<number> = <small> | <hundreds> | <thousands>;
<thousands> = <small> thousand [[and] <small> | <hundreds>];
<hundreds> = <digit> hundred [[and] <small>];
<small> = <digit> | <teen> | <tens> [<digit>] | zero;
<digit> = one | two | three | four | five | six | seven | eight | nine;
<teen> = ten | eleven | twelve | thirteen | fourteen | fifteen | sixteen | seventeen | eighteen | nineteen;
<tens> = twenty | thirty | forty | fifty | sixty | seventy | eighty | ninety;
"""
GRAMMARS = {"arithmetic": ARITHMETIC_GRAMMAR, "yes_no": yes_no_grammar()}  # yes_no: answers to "Shall I run it?"
NOISE_FLOOR = 0.005  # RMS of the noise added before PocketSphinx, full scale = 1


class PocketSphinxSTT:
    """CMU PocketSphinx with the en-US model from its wheel; a JSGF grammar when given."""

    def __init__(self, grammar: str | None = None):
        try:
            from pocketsphinx import Decoder
        except ImportError:
            raise MistolError("speech recognition needs PocketSphinx: pip install pocketsphinx "
                              "(or pip install 'mistol[voice]')") from None
        kwargs = {}
        if grammar:
            # 125 feature frames a second instead of 100: fast speech gets more frames per
            # sound, and "ninety"/"twenty", "thirteen"/"thirty" stop merging.
            kwargs.update(jsgf=str(grammar_file(grammar)), frate=125)
        try:
            # Without the lattice's best-path rescoring, which undid the grammar's search: on
            # espeak-ng questions (a set other than the one scripts/eval_voice.py reports) it
            # took exact transcripts from 43 to 49 of 50 at 130 words/minute, 40 to 44 at 175;
            # frate=125 then to 50 and 48.
            self.decoder = Decoder(loglevel="FATAL", bestpath=False, **kwargs)
        except (RuntimeError, ValueError) as e:
            raise MistolError(f"{grammar or 'pocketsphinx'}: PocketSphinx cannot load it ({e})") from None

    def transcribe(self, audio: Audio) -> str:
        # Silence on both sides lets the decoder settle before and after, and a faint noise
        # floor (-46 dBFS) stands in for a microphone's: on digitally clean audio (synthetic
        # speech, gated recordings) exact zeros wreck PocketSphinx's energy features. On 56
        # espeak-ng phrases in the arithmetic grammar it lifts exact transcripts from 12 to 49,
        # and open dictation from nothing to "hello how are you".
        padded = concat([silence(0.3, SPEECH_RATE), audio.resample(SPEECH_RATE), silence(0.3, SPEECH_RATE)])
        x = padded.samples + np.random.default_rng(0).normal(0, NOISE_FLOOR, len(padded.samples)).astype(np.float32)
        pcm = (np.clip(x, -1, 1) * 32767).astype("<i2").tobytes()
        d = self.decoder
        d.start_utt()
        d.process_raw(pcm, full_utt=True)
        d.end_utt()
        hyp = d.hyp()
        return as_sentence(words_to_numbers(hyp.hypstr)) if hyp is not None else ""


_grammar_dir: tempfile.TemporaryDirectory | None = None


def grammar_file(grammar: str) -> Path:
    """A built-in grammar's name, or the path of a JSGF file."""
    global _grammar_dir
    if grammar in GRAMMARS:
        if _grammar_dir is None:
            _grammar_dir = tempfile.TemporaryDirectory(prefix="mistol-grammar-")
        path = Path(_grammar_dir.name) / f"{grammar}.gram"
        path.write_text(GRAMMARS[grammar], encoding="utf-8")
        return path
    path = Path(grammar).expanduser()
    if not path.is_file():
        raise MistolError(f"{grammar}: no such grammar file (a JSGF .gram file, or one of: {', '.join(GRAMMARS)})")
    return path


class WhisperSTT:
    """faster-whisper (CTranslate2) on the CPU, int8."""

    def __init__(self, model: str):
        try:
            from faster_whisper import WhisperModel
        except ImportError:
            raise MistolError("--stt whisper needs faster-whisper: pip install faster-whisper") from None
        try:
            self.model = WhisperModel(model, device="cpu", compute_type="int8")
        except Exception as e:  # a missing model without a network, a bad directory, ...
            raise MistolError(f"{model}: faster-whisper cannot load this model ({type(e).__name__}: {e}); "
                              "pass a model name such as base.en (downloaded once) or a local model directory") from None

    def transcribe(self, audio: Audio) -> str:
        segments, _ = self.model.transcribe(audio.resample(SPEECH_RATE).samples, language="en", beam_size=1,
                                            vad_filter=False, condition_on_previous_text=False)
        return " ".join(s.text.strip() for s in segments).strip()


def make_stt(kind: str, whisper_model: str | None = None, grammar: str | None = None) -> STT:
    if kind == "whisper":
        if not whisper_model:
            raise MistolError("--stt whisper needs --whisper-model NAME_OR_PATH (e.g. base.en)")
        return WhisperSTT(whisper_model)
    return PocketSphinxSTT(grammar)


_QUESTION_WORDS = frozenset("what who whom whose how why when where which is are am was were can could do does did "
                            "will would should shall may might have has".split())


def as_sentence(text: str) -> str:
    """PocketSphinx writes bare lower-case words; models read a sentence better:
    "what is 2 plus 2" -> "What is 2 plus 2?"."""
    text = text.strip()
    if not text:
        return ""
    end = "?" if text.split()[0].lower() in _QUESTION_WORDS else "."
    return text[0].upper() + text[1:] + end


# -- number words to digits ------------------------------------------------------------------
_UNITS = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen".split())}
_TENS = {w: 10 * (i + 2) for i, w in enumerate("twenty thirty forty fifty sixty seventy eighty ninety".split())}
_SCALES = {"hundred": 100, "thousand": 1000, "million": 1_000_000}


def words_to_numbers(text: str) -> str:
    """Spelled-out whole numbers become digits: "one hundred and five minus nine" -> "105 minus 9"."""
    words = text.split()
    out: list[str] = []
    i = 0
    while i < len(words):
        value, used = _number_at(words, i)
        if used:
            out.append(str(value))
            i += used
        else:
            out.append(words[i])
            i += 1
    return " ".join(out)


def _number_at(words: list[str], i: int) -> tuple[int, int]:
    """The number spelled from words[i] on, and how many words it takes (0: none)."""
    total, current, used, last = 0, 0, 0, ""
    j = i
    while j < len(words):
        w = re.sub(r"[^a-z]", "", words[j].lower())
        if w in _UNITS and last not in ("unit", "teen") and not (w == "zero" and used):
            if _UNITS[w] >= 10 and last == "tens":
                break
            current += _UNITS[w]
            last = "teen" if _UNITS[w] >= 10 else "unit"
        elif w in _TENS and last not in ("unit", "teen", "tens"):
            current += _TENS[w]
            last = "tens"
        elif w in _SCALES and used and last != "scale":
            scale = _SCALES[w]
            if scale == 100:
                current = max(current, 1) * 100
            else:
                total += max(current, 1) * scale
                current = 0
            last = "scale"
        elif w == "and" and last == "scale" and j + 1 < len(words) and (
                re.sub(r"[^a-z]", "", words[j + 1].lower()) in _UNITS or words[j + 1].lower() in _TENS):
            j += 1
            continue
        else:
            break
        j += 1
        used = j - i
    return total + current, used
