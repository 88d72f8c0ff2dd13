"""`mistol generate`: complete a prompt and print only the generated text (on stdout)."""

from __future__ import annotations

import argparse
import sys

from ..generation import Generation, speculation_note
from . import COMMANDS
from .options import add_model_args, add_sampling_args, add_speculation_args, load_engine, sampling_params


def register(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("generate", help=COMMANDS["generate"],
                       description="Complete PROMPT (a BOS token is put in front) and print only the "
                       "generated text on stdout; logs and progress go to stderr.")
    add_model_args(p, required=True)
    p.add_argument("--prompt", "-p", required=True, help="the text to complete")
    p.add_argument("--special", action="store_true",
                   help="parse special tokens such as <|im_start|> written in the prompt (default: plain text)")
    add_sampling_args(p)
    add_speculation_args(p)
    p.add_argument("--verbose", "-v", action="store_true",
                   help="afterwards, show tokens/s and the share of speculative guesses kept (on stderr)")
    p.set_defaults(run=cmd_generate)
    return p


def cmd_generate(args) -> int:
    engine = load_engine(args)
    tok = engine.tokenizer
    prompt = tok.encode(args.prompt, add_bos=tok.add_bos, parse_special=args.special)
    stop_ids = sorted({i for i in (tok.eos_id, engine.config.eos_token_id) if i is not None})
    params = sampling_params(args, stop_ids)
    session = engine.new_session()
    result = Generation()
    for piece in session.stream(prompt, params, result):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if args.verbose:
        print(f"({result.completion_tokens} tokens, {result.tokens_per_second:.1f} tok/s"
              f"{speculation_note(result)})", file=sys.stderr)
    return 0
