"""The `mistol` subcommands, one module each, named as the command: `register(subparsers)`
adds the command's parser, whose `run` default is the function the command calls.

`options` holds what several commands share (model, sampling and remote-server options, and
the engine or remote LLM they turn into). A command module imports only `options` and the
library at module level, and nothing heavy (torch, numpy, fastapi, ...): `mistol X --help`
imports it, and must answer at once. `mistol.cli` imports a command's module only when that
command runs; COMMANDS is what `mistol --help` lists without importing any of them.
"""

# name -> one-line help, in the order `mistol --help` lists them
COMMANDS: dict[str, str] = {
    "generate": "complete a prompt and print only the generated text",
    "chat": "chat with the model in the terminal",
    "duo": "two agents talking to each other",
    "tokenize": "print the token ids of a text as a JSON list",
    "exec": "run a Python file in the code sandbox and print what the model would see",
    "serve": "serve the model over an OpenAI-compatible HTTP API",
    "math": "solve math problems; evaluate cot/code/vote/verify on a data set",
    "voice": "talk with the model (speech in, spoken answers out)",
    "bench": "measure prefill and decode speed against transformers and llama.cpp",
}
