"""`mistol duo`: two agents, each with its own persona, talking about a topic."""

from __future__ import annotations

import argparse
import sys

from ..generation import speculation_note
from ..sandbox.visible import visible
from . import COMMANDS
from .options import (add_api_args, add_model_args, add_sampling_args, add_speculation_args, load_engine,
                      remote_llm, sampling_params)


def register(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("duo", help=COMMANDS["duo"],
                       description="Two agents, each with its own persona and its own KV cache over one set "
                       "of weights, talk about a topic. The transcript is saved as it goes under "
                       "~/.local/share/mistol/duos/ (and as Markdown with --out).")
    add_model_args(p)
    p.add_argument("--a", required=True, metavar="PERSONA", help="agent A's persona (A opens)")
    p.add_argument("--b", required=True, metavar="PERSONA", help="agent B's persona")
    p.add_argument("--topic", required=True, help="what they talk about")
    p.add_argument("--turns", type=int, default=6, help="lines in all, alternating (default: 6)")
    p.add_argument("--a-name", default="Alice", help="agent A's name (default: Alice)")
    p.add_argument("--b-name", default="Bob", help="agent B's name (default: Bob)")
    p.add_argument("--model-a", default=None, help="a different model for agent A")
    p.add_argument("--model-b", default=None, help="a different model for agent B")
    p.add_argument("--stop-phrase", "--stop-at", dest="stop_phrase", default=None,
                   help="end when either agent says this phrase")
    p.add_argument("--out", default=None, help="also write the transcript as Markdown to this file")
    p.add_argument("--code", action="store_true",
                   help="let the agents run the Python they write (asked first, in the code sandbox)")
    p.add_argument("--yes", "-y", action="store_true", help="with --code: run without asking")
    p.add_argument("--allow-network", action="store_true", help="with --code: let the code use the network")
    p.add_argument("--code-disk", type=int, default=512, help="with --code: MB for the files the code writes (default: 512)")
    p.add_argument("--ctx", type=int, default=None, help="context length in tokens per agent")
    p.add_argument("--verbose", "-v", action="store_true", help="show tokens/s and tokens run per turn")
    add_sampling_args(p, max_tokens=256)
    add_speculation_args(p)
    add_api_args(p)
    p.set_defaults(run=cmd_duo)
    return p


def cmd_duo(args) -> int:
    from ..chat.log import ChatLog, data_dir
    from ..duo import Agent, Duo
    from ..llm import LocalLLM

    engines = {}

    def llm_for(model: str):
        if args.api:
            return remote_llm(args)
        if model not in engines:
            engines[model] = load_engine(args, model)
        return LocalLLM(engines[model], max_context=args.ctx)

    a = Agent(args.a_name, args.a, llm_for(args.model_a or args.model))
    b = Agent(args.b_name, args.b, llm_for(args.model_b or args.model))
    code = None
    if args.code:
        from ..chat.repl import ask_line
        from ..sandbox.code_turn import CodeOptions, CodeRunner
        from ..sandbox.sandbox import SandboxLimits

        code = CodeRunner(CodeOptions(auto_yes=args.yes, limits=SandboxLimits(allow_network=args.allow_network, disk_mb=args.code_disk)),
                          ask_line if sys.stdin.isatty() else None, lambda text: print(text, file=sys.stderr, flush=True))
    duo = Duo(a, b, args.topic, sampling_params(args, []), stop_phrase=args.stop_phrase, code=code)
    log = ChatLog.create(data_dir() / "duos", going_on="the duo goes on, printed here")
    log.write("topic", content=args.topic, a=[a.name, a.persona], b=[b.name, b.persona])
    markdown = open(args.out, "w", encoding="utf-8") if args.out else None
    if markdown:
        markdown.write(f"# {a.name} and {b.name}: {args.topic}\n\n")
    color = sys.stdout.isatty()
    colors = {a.name: "\033[36m", b.name: "\033[35m"}
    print(f"(transcript: {log.path})", file=sys.stderr)
    try:
        for _ in range(args.turns):
            speaker = duo.speaker
            name = f"{colors[speaker.name]}\033[1m{speaker.name}:\033[0m{colors[speaker.name]} " if color else f"{speaker.name}: "
            sys.stdout.write(name)
            log.write("message", role=speaker.name, content="")
            processed = speaker.llm.session.tokens_processed if hasattr(speaker.llm, "session") else 0
            def show(piece: str, is_output: bool = False) -> None:
                log.write("delta", content=piece)
                piece = visible(piece)
                sys.stdout.write(f"\033[2m{piece}\033[0m{colors[speaker.name]}" if is_output and color else piece)
                sys.stdout.flush()

            try:
                duo.step(show)
            finally:
                sys.stdout.write("\033[0m\n" if color else "\n")
                if markdown:
                    markdown.write(f"**{speaker.name}:** {duo.transcript[-1]['content']}\n\n")
                    markdown.flush()
            last = speaker.llm.last
            if args.verbose and last is not None:
                ran = speaker.llm.session.tokens_processed - processed if hasattr(speaker.llm, "session") else 0
                print(f"({speaker.name}: {last.completion_tokens} tokens, {last.tokens_per_second:.1f} tok/s, "
                      f"{ran} tokens run{speculation_note(last)})", file=sys.stderr)
            if duo.finished():
                print(f"({speaker.name} said the stop phrase)", file=sys.stderr)
                break
    except KeyboardInterrupt:
        print("\n(stopped; the transcript is saved)", file=sys.stderr)
    finally:
        log.close()
        if markdown:
            markdown.close()
        if code is not None:
            code.close()
    return 0
