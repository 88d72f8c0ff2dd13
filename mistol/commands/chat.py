"""`mistol chat`: chat with the model in the terminal, or with a server through --api."""

from __future__ import annotations

import argparse
import sys

from . import COMMANDS
from .options import (add_api_args, add_model_args, add_sampling_args, add_speculation_args, load_engine,
                      remote_llm, sampling_params)


def register(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("chat", help=COMMANDS["chat"],
                       description="Chat in the terminal, in the model's own chat template (ChatML without one). Replies stream as they are written; "
                       "the conversation is saved as it goes under ~/.local/share/mistol/chats/. "
                       "Without a terminal, each line of standard input is one message: "
                       "echo 'hi' | mistol chat --model DIR")
    add_model_args(p)
    p.add_argument("--system", "-s", default=None, help="the system prompt")
    p.add_argument("--resume", action="store_true",
                   help="continue the last saved chat (with its saved KV cache: no re-run of the history)")
    p.add_argument("--no-save-kv", action="store_true",
                   help="do not save the conversation's KV cache next to its log when the chat ends")
    g = p.add_argument_group("running the code the model writes (in a sandbox: no network, time and memory limits)")
    g.add_argument("--yes", "-y", action="store_true",
                   help="run the model's Python blocks without asking (they run on this machine)")
    g.add_argument("--code", action="store_true",
                   help="use the code-mode system prompt (the default with --model demo)")
    g.add_argument("--no-code", action="store_true", help="never offer to run code blocks")
    g.add_argument("--allow-network", action="store_true", help="let the code use the network")
    g.add_argument("--code-timeout", type=float, default=30.0, help="seconds per block (default: 30)")
    g.add_argument("--code-memory", type=int, default=2048, help="MB of memory per block (default: 2048)")
    g.add_argument("--code-disk", type=int, default=512, help="MB for the files the code writes: its directory and /tmp together (default: 512)")
    g.add_argument("--auto-runs", type=int, default=5, metavar="N",
                   help="after [a]lways, run at most N blocks of one reply before asking again (default: 5)")
    t = p.add_argument_group("tools: your own Python functions, which the model may call")
    t.add_argument("--tools", metavar="FILE.py", default=None,
                   help="offer the public functions of FILE.py to the model (described by their signatures and "
                   "docstrings); they run in this process, each call after your yes (--yes: without asking). "
                   "The model's code blocks are then not run")
    t.add_argument("--tool-choice", metavar="CHOICE", default="auto",
                   help="auto (the model decides), required (each reply starts with a call), or a function's name "
                   "(each reply starts by calling it); later replies of a turn decide for themselves")
    p.add_argument("--ctx", type=int, default=None, help="context length in tokens (default: the model's; 8192 at most without a sliding window)")
    p.add_argument("--verbose", "-v", action="store_true", help="after each reply, show tokens/s and time to first token")
    add_sampling_args(p, max_tokens=1024)
    add_speculation_args(p)
    add_api_args(p)
    p.set_defaults(run=cmd_chat)
    return p


def cmd_chat(args) -> int:
    from ..chat.log import ChatLog, latest_chat, replay, set_system
    from ..chat.repl import DEFAULT_SYSTEM, ChatApp, ChatOptions, ask_line, piped_lines, terminal_lines
    from ..errors import MistolError
    from ..llm import LocalLLM
    from ..sandbox.code_turn import CODE_SYSTEM_PROMPT, CodeOptions, CodeRunner
    from ..sandbox.sandbox import SandboxLimits

    interactive = sys.stdin.isatty()
    tools = None
    if args.tools is not None:
        from ..chat.user_tools import load_tool_file

        if args.api:
            raise MistolError("--tools runs with a local model (--model), not with --api")
        tools = load_tool_file(args.tools)  # before the model loads: a bad file is said at once
        if args.tool_choice not in ("auto", "required", *tools.functions):
            raise MistolError(f"--tool-choice: {args.tool_choice!r} is not auto, required or one of the functions "
                              f"of {args.tools} ({', '.join(tools.functions)})")
    elif args.tool_choice != "auto":
        raise MistolError("--tool-choice needs --tools")
    if args.resume:
        path = latest_chat()
        messages, log = replay(path), ChatLog(path)
    else:
        messages, log = [], ChatLog.create()
    if args.system is not None or not messages:
        code_prompt = args.code or (args.model == "demo" and tools is None)
        system = args.system if args.system is not None else CODE_SYSTEM_PROMPT if code_prompt else DEFAULT_SYSTEM
        set_system(messages, system)
        log.write("system", content=system)
    llm = remote_llm(args) if args.api else LocalLLM(load_engine(args), max_context=args.ctx)
    options = ChatOptions(args.verbose, interactive, args.tool_choice)
    code = approve = None
    if tools is not None:
        from ..chat.user_tools import CallApprover

        approve = CallApprover(args.yes, ask_line if interactive else None,
                               lambda text: print(text, file=sys.stderr, flush=True))
    elif not args.no_code:
        limits = SandboxLimits(timeout_s=args.code_timeout, memory_mb=args.code_memory, disk_mb=args.code_disk,
                               allow_network=args.allow_network)
        code = CodeRunner(CodeOptions(auto_yes=args.yes, limits=limits, max_auto_runs=args.auto_runs),
                          ask_line if interactive else None,
                          lambda text: print(text, file=sys.stderr, flush=True))
    app = ChatApp(llm, sampling_params(args, []), log, messages, options, code, tools, approve)
    if interactive:
        where = args.api or args.model
        app.notice(f"mistol chat · {where} · saving to {log.path}\n/help for commands, Ctrl-D to leave")
    kv_path = log.path.with_suffix(".kv")
    if args.resume:
        app.show_recent()
        if isinstance(llm, LocalLLM) and kv_path.is_file():
            why_not = llm.restore_cache(kv_path)
            app.notice(f"KV cache not used ({why_not}): the history runs through the model again" if why_not
                       else f"KV cache restored ({len(llm.session.tokens)} tokens): no need to run the history again")
    try:
        app.run(terminal_lines() if interactive else piped_lines())
    finally:
        log.close()
        if code is not None:
            code.close()
        if isinstance(llm, LocalLLM) and not args.no_save_kv and llm.session.tokens:
            save_kv(llm, kv_path, app.notice)
    return 1 if app.failed_replies and not interactive else 0  # (a script learns that a reply is missing)


def save_kv(llm, path, notice) -> None:
    from ..errors import MistolError

    try:
        size = llm.save_cache(path)
    except MistolError as e:
        notice(str(e))
        return
    notice(f"KV cache saved for --resume ({size / 1e6:.1f} MB, {path}; --no-save-kv to skip)")
