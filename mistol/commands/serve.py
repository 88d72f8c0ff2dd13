"""`mistol serve --model M [--host 127.0.0.1] [--port 8000] ...`: the OpenAI-compatible server."""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys

from ..errors import MistolError
from . import COMMANDS
from .options import add_model_args, add_speculation_args, load_engine


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "serve", help=COMMANDS["serve"],
        description="Serve the model over an OpenAI-compatible API (/v1/chat/completions, /v1/completions, "
        "/v1/models, /v1/embeddings; /health; /models, /chat/completions and /embeddings also without /v1), "
        "llama.cpp's /tokenize, /detokenize, /apply-template and /metrics, and ollama's API (/api/chat, "
        "/api/generate, /api/tags...). Concurrent requests are decoded together, and each conversation's KV cache "
        "is kept, so a client that resends the history only pays for its new tokens. "
        "A chat page for the browser is at / (http://127.0.0.1:8000/ by default). "
        "Binds to 127.0.0.1 unless told otherwise.",
    )
    add_model_args(p, required=True)
    add_speculation_args(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: 127.0.0.1, this machine only; 0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument("--api-key", action="append", default=None, metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on /v1 requests (default: $MISTOL_API_KEY, else none). "
                   "Repeat it to give each client its own key: cached prompt prefixes are shared only between "
                   "requests with the same key")
    p.add_argument("--no-shared-prefix-cache", dest="share_prefix_cache", action="store_false",
                   help="without API keys, do not let one request reuse the prompt cache another left "
                   "(which tells a client, through usage.cached_tokens and timing, how another's prompt began); "
                   "each request then runs its whole prompt")
    p.add_argument("--max-batch", type=int, default=4,
                   help="requests decoded together; more wait their turn (default: 4). "
                   "Each keeps a KV cache, as do 4 more idle conversations")
    p.add_argument("--kv-dir", default=None, metavar="DIR",
                   help="keep the prompt cache (the KV caches of recent conversations) in DIR across restarts: "
                   "saved when the server stops, taken back when it starts (files of another model are skipped)")
    p.add_argument("--prefill-chunk", type=int, default=256, metavar="N",
                   help="while other requests decode, a new prompt runs N tokens between two of their steps "
                   "(smaller: smoother streams, slower prompts; default: 256)")
    p.add_argument("--ctx", type=int, default=None,
                   help="context per request in tokens, prompt plus reply (default: the model's; "
                   "8192 at most without a sliding window)")
    p.add_argument("--name", default=None, help="the model id clients ask for (default: the --model value)")
    p.add_argument("--strict-model", action="store_true",
                   help="refuse a request without 'model' (400) or naming another model (404); by default any "
                   "name, or none, is answered by this model, whose id the reply gives, as llama.cpp's server does")
    p.add_argument("--cors-origins", default=None, metavar="ORIGINS",
                   help="comma-separated origins (https://app.example.com) whose web pages may call the API "
                   "from the browser; '*' for any page, only with --api-key (default: none)")
    p.add_argument("--max-tokens-default", type=int, default=None, metavar="N",
                   help="tokens a reply may take when the request sets no max_tokens (default: until the "
                   "context is full, or the model stops)")
    g = p.add_argument_group("running code from the chat page (in a sandbox: no network, time and memory limits)")
    g.add_argument("--allow-code", action="store_true",
                   help="give the page's Python blocks a Run button (each run confirmed in the page). "
                   "Only on a loopback address unless --api-key is set")
    g.add_argument("--code-timeout", type=float, default=30.0, help="seconds per block (default: 30)")
    g.add_argument("--code-memory", type=int, default=2048, help="MB of memory per block (default: 2048)")
    g.add_argument("--code-disk", type=int, default=512, help="MB for the files the code writes: its directory and /tmp together (default: 512)")
    p.set_defaults(run=cmd_serve)
    return p


def cmd_serve(args) -> int:
    from ..sandbox.sandbox import SandboxLimits
    from ..server.app import ServerOptions, create_app

    if args.max_batch < 1:
        raise MistolError(f"--max-batch must be at least 1 (got {args.max_batch})")
    if args.prefill_chunk < 1:
        raise MistolError(f"--prefill-chunk must be at least 1 (got {args.prefill_chunk})")
    if args.ctx is not None and args.ctx < 2:
        raise MistolError(f"--ctx must be at least 2 tokens (got {args.ctx})")
    if not 0 <= args.port <= 65535:
        raise MistolError(f"--port must be in 0..65535 (got {args.port})")
    keys = args.api_key or [k for k in [os.environ.get("MISTOL_API_KEY")] if k]
    if any(not key.strip() for key in keys):
        raise MistolError("--api-key must not be empty")
    api_key = keys or None
    cors_origins = [o.strip() for o in (args.cors_origins or "").split(",") if o.strip()]
    if "*" in cors_origins and api_key is None:
        raise MistolError("--cors-origins '*' would let any web page anyone opens use this server; "
                          "set --api-key, or name the origins")
    if args.max_tokens_default is not None and args.max_tokens_default < 1:
        raise MistolError(f"--max-tokens-default must be at least 1 (got {args.max_tokens_default})")
    if args.allow_code and not is_loopback(args.host) and api_key is None:
        raise MistolError(f"--allow-code on {args.host} would let anyone who reaches this port run code here; "
                          "listen on 127.0.0.1, or set --api-key")
    if args.code_timeout <= 0 or args.code_memory < 64 or args.code_disk < 1:
        raise MistolError("--code-timeout must be positive, --code-memory at least 64 MB and --code-disk at least 1 MB")
    if not is_loopback(args.host) and api_key is None:
        print(f"mistol serve: warning: listening on {args.host} without --api-key: anyone who can reach this "
              "port can use the model", file=sys.stderr)
    try:
        import uvicorn
    except ImportError:
        raise MistolError("mistol serve needs fastapi and uvicorn: pip install fastapi uvicorn") from None
    engine = load_engine(args)
    limits = SandboxLimits(timeout_s=args.code_timeout, memory_mb=args.code_memory, disk_mb=args.code_disk)
    options = ServerOptions(model_name=args.name, api_key=api_key, max_batch=args.max_batch, max_context=args.ctx,
                            allow_code=args.allow_code, code_limits=limits,
                            share_prefix_cache=args.share_prefix_cache, strict_model=args.strict_model,
                            cors_origins=cors_origins, max_tokens_default=args.max_tokens_default,
                            model_notice=DEMO_NEEDS_CODE if args.model == "demo" else None,
                            prefill_chunk=args.prefill_chunk, kv_dir=args.kv_dir)
    app = create_app(engine, options)
    server = app.state.server
    host = f"[{args.host}]" if ":" in args.host else args.host
    # With --allow-code the page's address carries the run token: only who reads this can run code.
    page = f"http://{host}:{args.port}/" + (f"?token={server.run_token}" if args.allow_code else "")
    code_note = " (Python blocks can be run, after a confirmation in the page; open this exact address)"
    print(f"mistol serve: {server.model_id} at http://{host}:{args.port}/v1 (batch {args.max_batch}, "
          f"context {server.scheduler.max_context} tokens{key_note(keys, args.share_prefix_cache)})\n"
          f"mistol serve: chat page at {page}"
          f"{code_note if args.allow_code else ''}",
          file=sys.stderr)
    if args.model == "demo" and not args.allow_code:
        print(f"mistol serve: note: {DEMO_NEEDS_CODE}", file=sys.stderr)
    if server.template is None:
        print(f"mistol serve: note: {server.no_template}: completions only (/v1/completions, /api/generate); "
              "chat requests get a 400", file=sys.stderr)
    # On Ctrl-C, streams still generating get a few seconds, not their whole max_tokens.
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", timeout_graceful_shutdown=5)
    return 0


DEMO_NEEDS_CODE = ("the demo model answers arithmetic by writing Python and then stating its output: "
                   "API clients get the code, not the answer, and the chat page runs the code only when "
                   "the server starts with --allow-code")


def key_note(keys: list[str], shared: bool) -> str:
    if len(keys) > 1:
        return f", {len(keys)} API keys, each with its own prompt cache"
    if keys:
        return ", API key required"
    return "" if shared else ", no prompt cache shared between requests"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
