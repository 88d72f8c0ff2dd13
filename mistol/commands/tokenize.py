"""`mistol tokenize`: print a text's token ids as a JSON list."""

from __future__ import annotations

import argparse
import json

from . import COMMANDS
from ..hub import resolve_model
from .options import DEFAULT_MODEL, MODEL_HELP


def register(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("tokenize", help=COMMANDS["tokenize"],
                       description="Print TEXT's token ids as a JSON list, with the model's BOS in front "
                       "when its tokenizer adds one.")
    p.add_argument("--model", "-m", default=DEFAULT_MODEL, help=MODEL_HELP + " (only its tokenizer files are read or downloaded; "
                   f"default: {DEFAULT_MODEL})")
    p.add_argument("--special", action="store_true",
                   help="turn special tokens written in TEXT (<|im_start|>, <s>, ...) into their ids; "
                   "without it they are tokenized as plain text")
    p.add_argument("--no-bos", action="store_true", help="do not put the BOS token in front")
    p.add_argument("text", help="the text to tokenize")
    p.set_defaults(run=cmd_tokenize, prepare=lambda args: resolve_model(args.model, tokenizer_only=True))
    return p


def cmd_tokenize(args) -> int:
    from ..engine import load_tokenizer

    tok = load_tokenizer(args.model)
    ids = tok.encode(args.text, add_bos=tok.add_bos and not args.no_bos, parse_special=args.special)
    print(json.dumps(ids))
    return 0
