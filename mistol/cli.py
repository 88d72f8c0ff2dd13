"""The `mistol` command. Each subcommand is a small function over the library.

Output meant for scripts goes to stdout; progress and logs go to stderr. Any
`MistolError` ends the command with a one-line message and exit status 1.
"""

from __future__ import annotations

import argparse
import json
import sys

from . import __version__
from .errors import MistolError

DEFAULT_MODEL = "teknium/OpenHermes-2.5-Mistral-7B"


def add_model_args(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument(
        "--model", "-m", required=required, default=None if required else DEFAULT_MODEL,
        help="a model directory (Hugging Face layout), a llama.cpp .gguf file or a Hugging Face repo id"
        + ("" if required else f" (default: {DEFAULT_MODEL})"),
    )
    p.add_argument("--dtype", "--quant", dest="dtype", default="auto", choices=["auto", "f32", "bf16", "f16", "int8", "int4"],
                   help="weight format. auto (the default): on CPU, int8 for checkpoints of 2 GiB or more "
                   "(a 7B model), exact f32 for smaller ones; a .gguf file's own types; bf16 on CUDA. "
                   "int8/int4: linear layers quantized as they load (llama.cpp Q8_0/Q4_0 blocks; "
                   "2x/4x less memory than bf16 and faster decoding on CPU), the rest in f32 on CPU")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")


def add_sampling_args(p: argparse.ArgumentParser, max_tokens: int = 256) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=max_tokens, help=f"most tokens to generate (default: {max_tokens})")
    g.add_argument("--temperature", "-t", type=float, default=0.8, help="0 = greedy (default: 0.8)")
    g.add_argument("--top-k", type=int, default=40, help="keep the K most likely tokens, 0 = off (default: 40)")
    g.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling, 1 = off (default: 0.95)")
    g.add_argument("--min-p", type=float, default=0.05, help="drop tokens below P x the top probability (default: 0.05)")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="1 = off (default: 1.0)")
    g.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    g.add_argument("--stop", action="append", default=[], help="stop at this string (repeatable)")


def add_api_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("remote server (instead of the local engine)")
    g.add_argument("--api", metavar="URL", default=None,
                   help="use an OpenAI-compatible server (mistol serve, llama.cpp, vLLM, ollama), "
                   "e.g. http://127.0.0.1:8000/v1")
    g.add_argument("--api-key", default=None, help="the server's API key")
    g.add_argument("--api-model", default=None, help="the model name on the server (default: its first)")


def sampling_params(args, stop_token_ids: list[int]):
    from .sampling import SamplingParams

    return SamplingParams(
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
        repetition_penalty=args.repetition_penalty, seed=args.seed, max_tokens=args.max_tokens,
        stop_token_ids=stop_token_ids, stop=list(args.stop),
    )


def remote_llm(args):
    from .remote import OpenAICompatibleLLM

    return OpenAICompatibleLLM(args.api, api_key=args.api_key, model=args.api_model)


def load_engine(args, model: str | None = None):
    from .engine import Engine

    if args.dtype in ("int8", "int4"):  # f32 for what stays unquantized: small, and fast on CPU
        dtype = "f32" if args.device == "cpu" else "auto"
        return Engine.load(model or args.model, dtype=dtype, device=args.device, quant=args.dtype)
    return Engine.load(model or args.model, dtype=args.dtype, device=args.device)


# -- subcommands ---------------------------------------------------------------------------
def cmd_generate(args) -> int:
    engine = load_engine(args)
    tok = engine.tokenizer
    prompt = tok.encode(args.prompt, add_bos=True, parse_special=args.special)
    stop_ids = sorted({i for i in (tok.eos_id, engine.config.eos_token_id) if i is not None})
    params = sampling_params(args, stop_ids)
    session = engine.new_session()
    for piece in session.stream(prompt, params):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def cmd_chat(args) -> int:
    from .chat.log import ChatLog, latest_chat, replay, set_system
    from .chat.code_mode import CODE_SYSTEM_PROMPT, CodeOptions, CodeRunner
    from .chat.repl import DEFAULT_SYSTEM, ChatApp, ChatOptions, ask_line, piped_lines, terminal_lines
    from .tools.sandbox import SandboxLimits
    from .llm import LocalLLM

    interactive = sys.stdin.isatty()
    if args.resume:
        path = latest_chat()
        messages, log = replay(path), ChatLog(path)
    else:
        messages, log = [], ChatLog.create()
    if args.system is not None or not messages:
        code_prompt = args.code or args.model == "demo"
        system = args.system if args.system is not None else CODE_SYSTEM_PROMPT if code_prompt else DEFAULT_SYSTEM
        set_system(messages, system)
        log.write("system", content=system)
    llm = remote_llm(args) if args.api else LocalLLM(load_engine(args), max_context=args.ctx)
    options = ChatOptions(args.verbose, interactive)
    code = None
    if not args.no_code:
        limits = SandboxLimits(timeout_s=args.code_timeout, memory_mb=args.code_memory, allow_network=args.allow_network)
        code = CodeRunner(CodeOptions(auto_yes=args.yes, limits=limits), ask_line if interactive else None,
                          lambda text: print(text, file=sys.stderr, flush=True))
    app = ChatApp(llm, sampling_params(args, []), log, messages, options, code)
    if interactive:
        where = args.api or args.model
        app.notice(f"mistol chat · {where} · saving to {log.path}\n/help for commands, Ctrl-D to leave")
    try:
        app.run(terminal_lines() if interactive else piped_lines())
    finally:
        log.close()
        if code is not None:
            code.close()
    return 0


def cmd_duo(args) -> int:
    from .chat.log import ChatLog, data_dir
    from .duo import Agent, Duo
    from .llm import LocalLLM

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
        from .chat.code_mode import CodeOptions, CodeRunner
        from .chat.repl import ask_line
        from .tools.sandbox import SandboxLimits

        code = CodeRunner(CodeOptions(auto_yes=args.yes, limits=SandboxLimits(allow_network=args.allow_network)),
                          ask_line if sys.stdin.isatty() else None, lambda text: print(text, file=sys.stderr, flush=True))
    duo = Duo(a, b, args.topic, sampling_params(args, []), stop_phrase=args.stop_phrase, code=code)
    log = ChatLog.create(data_dir() / "duos")
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
                      f"{ran} tokens run)", file=sys.stderr)
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


def cmd_tokenize(args) -> int:
    from .engine import load_tokenizer

    tok = load_tokenizer(args.model)
    ids = tok.encode(args.text, add_bos=tok.add_bos and not args.no_bos, parse_special=args.special)
    print(json.dumps(ids))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mistol",
        description="A local, private assistant running Mistral/Llama-architecture models "
        "(OpenHermes 2.5 Mistral 7B by default) on your own machine.",
    )
    parser.add_argument("--version", action="version", version=f"mistol {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("generate", help="complete a prompt and print only the generated text",
                       description="Complete PROMPT (a BOS token is put in front) and print only the "
                       "generated text on stdout; logs and progress go to stderr.")
    add_model_args(p, required=True)
    p.add_argument("--prompt", "-p", required=True, help="the text to complete")
    p.add_argument("--special", action="store_true",
                   help="parse special tokens such as <|im_start|> written in the prompt (default: plain text)")
    add_sampling_args(p)
    p.set_defaults(run=cmd_generate)

    p = sub.add_parser("chat", help="chat with the model in the terminal",
                       description="Chat in the terminal (ChatML). Replies stream as they are written; "
                       "the conversation is saved as it goes under ~/.local/share/mistol/chats/. "
                       "Without a terminal, each line of standard input is one message: "
                       "echo 'hi' | mistol chat --model DIR")
    add_model_args(p)
    p.add_argument("--system", "-s", default=None, help="the system prompt")
    p.add_argument("--resume", action="store_true", help="continue the last saved chat")
    g = p.add_argument_group("running the code the model writes (in a sandbox: no network, time and memory limits)")
    g.add_argument("--yes", "-y", action="store_true",
                   help="run the model's Python blocks without asking (they run on this machine)")
    g.add_argument("--code", action="store_true",
                   help="use the code-mode system prompt (the default with --model demo)")
    g.add_argument("--no-code", action="store_true", help="never offer to run code blocks")
    g.add_argument("--allow-network", action="store_true", help="let the code use the network")
    g.add_argument("--code-timeout", type=float, default=30.0, help="seconds per block (default: 30)")
    g.add_argument("--code-memory", type=int, default=2048, help="MB of memory per block (default: 2048)")
    p.add_argument("--ctx", type=int, default=None, help="context length in tokens (default: the model's; 8192 at most without a sliding window)")
    p.add_argument("--verbose", "-v", action="store_true", help="after each reply, show tokens/s and time to first token")
    add_sampling_args(p, max_tokens=1024)
    add_api_args(p)
    p.set_defaults(run=cmd_chat)

    p = sub.add_parser("duo", help="two agents talking to each other",
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
    p.add_argument("--ctx", type=int, default=None, help="context length in tokens per agent")
    p.add_argument("--verbose", "-v", action="store_true", help="show tokens/s and tokens run per turn")
    add_sampling_args(p, max_tokens=256)
    add_api_args(p)
    p.set_defaults(run=cmd_duo)

    p = sub.add_parser("tokenize", help="print the token ids of a text as a JSON list",
                       description="Print TEXT's token ids as a JSON list, with the model's BOS in front "
                       "when its tokenizer adds one.")
    p.add_argument("--model", "-m", default=DEFAULT_MODEL, help="model directory, .gguf file or Hugging Face repo id")
    p.add_argument("--special", action="store_true",
                   help="turn special tokens written in TEXT (<|im_start|>, <s>, ...) into their ids; "
                   "without it they are tokenized as plain text")
    p.add_argument("--no-bos", action="store_true", help="do not put the BOS token in front")
    p.add_argument("text", help="the text to tokenize")
    p.set_defaults(run=cmd_tokenize)

    from .bench.cli import register as register_bench
    from .mathsolve.cli import register as register_math
    from .server.cli import register as register_serve
    from .tools.exec_cli import register as register_exec
    from .voice.cli import register as register_voice

    register_exec(sub)
    register_serve(sub)
    register_math(sub)
    register_voice(sub)
    register_bench(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        return args.run(args)
    except MistolError as e:
        print(f"mistol: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:  # `mistol generate ... | head`
        return 0


if __name__ == "__main__":
    sys.exit(main())
