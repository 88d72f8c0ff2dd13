"""`mistol voice`: talk with the model, or have it answer a recording.

    mistol voice --model M                                   # microphone and speaker
    mistol voice --model M --input q.wav --output a.wav      # a recording in, the spoken answer out
"""

from __future__ import annotations

import argparse
import sys

from ..errors import MistolError
from . import COMMANDS
from .options import (add_api_args, add_model_args, add_sampling_args, add_speculation_args, load_engine,
                      remote_llm, sampling_params)

DESCRIPTION = (
    "A spoken conversation: the microphone is cut into utterances by voice activity detection "
    "(Silero VAD), transcribed (PocketSphinx, or faster-whisper), answered by the model, and the "
    "answer is spoken sentence by sentence while the model is still writing (espeak-ng, or a piper "
    "voice). Speak while it talks to interrupt it. With --input/--output it answers one recording "
    "and exits, printing the transcript and the reply. Needs the voice extra: pip install 'mistol[voice]' "
    "and apt-get install espeak-ng libportaudio2."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument("--persona", default=None, metavar="stacy|FILE",
                   help="the assistant's system prompt: 'stacy' (a friendly voice assistant with short "
                   "answers; the default) or a text file (with --model demo: the demo's code prompt)")
    g = p.add_argument_group("speech")
    g.add_argument("--stt", choices=["pocketsphinx", "whisper"], default="pocketsphinx",
                   help="speech recognition (default: pocketsphinx, offline, English)")
    g.add_argument("--whisper-model", default=None, metavar="NAME_OR_PATH",
                   help="faster-whisper model for --stt whisper: a name such as base.en or a local directory")
    g.add_argument("--grammar", default=None, metavar="arithmetic|FILE|none",
                   help="limit PocketSphinx to a JSGF grammar: much more accurate for what it covers "
                   "(default with --model demo: arithmetic; else open dictation, as with 'none')")
    g.add_argument("--tts", choices=["espeak", "piper"], default="espeak",
                   help="speech synthesis (default: espeak-ng)")
    g.add_argument("--piper-voice", default=None, metavar="PATH", help="a piper voice (.onnx, with its .onnx.json)")
    g.add_argument("--no-barge-in", action="store_true",
                   help="do not stop when you speak during a reply (use when the speaker's sound reaches "
                   "the microphone, without headphones)")
    g.add_argument("--input", default=None, metavar="WAV", help="answer this recording instead of the microphone")
    g.add_argument("--output", default=None, metavar="WAV",
                   help="with --input: write the spoken answer here (without it, the answer is played)")
    p.add_argument("--yes", "-y", action="store_true",
                   help="run the Python blocks the model writes, in the sandbox, without asking (live mode "
                   "otherwise asks \"Shall I run it?\" aloud and runs the code only on a clear yes)")
    p.add_argument("--ctx", type=int, default=None, help="context length in tokens (default: the model's)")
    p.add_argument("--verbose", "-v", action="store_true",
                   help="show the time from the end of speech to the transcript, first token and first audio")
    add_sampling_args(p, max_tokens=200)
    add_speculation_args(p)
    add_api_args(p)


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("voice", help=COMMANDS["voice"], description=DESCRIPTION)
    add_arguments(p)
    p.set_defaults(run=cmd_voice)
    return p


class _Printer:
    """The transcript and the reply on stdout, as they come."""

    def __init__(self, name: str):
        self.name = name
        self.open = False

    def transcript(self, text: str) -> None:
        self.end()
        print(f"you: {text}", flush=True)

    def text(self, piece: str) -> None:
        if not self.open:
            sys.stdout.write(f"{self.name}: ")
            self.open = True
        sys.stdout.write(piece)
        sys.stdout.flush()

    def end(self) -> None:
        if self.open:
            sys.stdout.write("\n")
            sys.stdout.flush()
            self.open = False


def _timings(turn, live_silence_ms: int | None) -> str:
    t = turn.timings
    parts = [f"transcript {t['transcript']:.2f} s"]
    if "first_token" in t:
        parts.append(f"first token {t['first_token']:.2f} s")
    if "audio" in t:
        parts.append(f"first audio {t['audio']:.2f} s")
    extra = f"; +{live_silence_ms / 1000:.1f} s of silence to notice the end" if live_silence_ms else ""
    return f"(after the end of speech: {' · '.join(parts)}{extra}; heard {turn.heard_s:.1f} s)"


def play_to_the_end(speaker, audio) -> None:
    import time

    speaker.play(audio, tag=0)
    while speaker.busy():
        time.sleep(0.05)
    time.sleep(0.2)  # the device's own buffer


def cmd_voice(args) -> int:
    from ..llm import LocalLLM
    from ..sandbox.code_turn import CODE_SYSTEM_PROMPT, CodeOptions, CodeRunner
    from ..voice.audio import read_wav, silence, write_wav
    from ..voice.loop import BufferSink, Conversation
    from ..voice.persona import load_persona
    from ..voice.stt import make_stt
    from ..voice.tts import make_tts
    from ..voice.vad import SileroVAD, VADConfig

    if args.output and not args.input:
        raise MistolError("--output needs --input (live mode plays the answer on the speaker)")
    demo = args.model == "demo"
    system = load_persona(args.persona) if args.persona else CODE_SYSTEM_PROMPT if demo else load_persona("stacy")
    name = "stacy" if (args.persona or ("code" if demo else "stacy")).lower() == "stacy" else "assistant"
    grammar = args.grammar if args.grammar is not None else ("arithmetic" if demo and args.stt == "pocketsphinx" else None)
    if grammar is not None and grammar.lower() in ("none", ""):
        grammar = None

    # Everything that can be missing is checked before the model loads.
    recording = read_wav(args.input) if args.input else None
    mic = speaker = None
    no_speaker = None  # why a recording's answer cannot be played
    if recording is None:
        from ..voice.devices import Microphone, Speaker

        speaker = Speaker()
        mic = Microphone()
    elif not args.output:
        from ..voice.devices import Speaker

        try:
            speaker = Speaker()
        except MistolError as e:
            no_speaker = str(e).split(" (or ")[0].split(";")[0]
    stt = make_stt(args.stt, args.whisper_model, grammar)
    # Live mode asks "Shall I run it?" aloud; the answer is heard with the yes/no grammar
    # (faster-whisper transcribes it openly, and only a clear yes counts).
    answer_stt = None
    if recording is None:
        answer_stt = make_stt("pocketsphinx", grammar="yes_no") if args.stt == "pocketsphinx" else stt
    tts = make_tts(args.tts, args.piper_voice)
    vad = SileroVAD.load()

    llm = remote_llm(args) if args.api else LocalLLM(load_engine(args), max_context=args.ctx)
    printer = _Printer(name)

    def notice(text: str) -> None:
        printer.end()  # on a line of its own, not after the reply's last words
        print(text, file=sys.stderr, flush=True)

    code = CodeRunner(CodeOptions(auto_yes=args.yes), None, notice)
    config = VADConfig()
    conversation = Conversation(llm, sampling_params(args, []), stt, tts, system, vad=vad, vad_config=config,
                                code=code, barge_in_ms=None if args.no_barge_in else 300,
                                on_transcript=printer.transcript, on_text=printer.text,
                                answer_stt=answer_stt, on_notice=notice)
    try:
        if recording is not None:
            sink = BufferSink()
            turn = conversation.answer_recording(recording, sink)
            printer.end()
            if not turn.transcript:
                raise MistolError(f"{args.input}: no speech recognized")
            if turn.reply is not None and not turn.reply.sentences:
                notice("(the reply had nothing to say aloud)")
            if args.verbose:
                notice(_timings(turn, None))
            if args.output:
                audio = sink.audio() or silence(0.1, 22050)
                write_wav(args.output, audio)
                notice(f"(wrote {args.output}: {audio.seconds:.1f} s at {audio.rate} Hz)")
            elif speaker is not None and sink.audio() is not None:
                play_to_the_end(speaker, sink.audio())
            elif no_speaker:
                notice(f"(the answer was not played: {no_speaker}; --output FILE.wav writes it to a file)")
            return 0

        def on_turn(turn) -> None:
            printer.end()
            if not turn.transcript:
                notice("(didn't catch that)")
            elif turn.reply is not None and turn.reply.interrupted:
                notice("(interrupted)")
            if args.verbose:
                notice(_timings(turn, config.end_silence_ms))

        notice(f"mistol voice · {args.api or args.model} · listening; speak, and Ctrl-C to leave")
        conversation.run(mic, speaker, on_turn)
    except KeyboardInterrupt:
        printer.end()
        return 0
    finally:
        printer.end()
        code.close()
        for device in (mic, speaker):
            if device is not None:
                device.close()
    return 0
