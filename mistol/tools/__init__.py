"""Tools the model can use in a chat: for now, running the Python code it writes.

`codeblocks` finds fenced code blocks in streamed text; `sandbox` runs code in an isolated
worker process; `exec_cli` is `mistol exec FILE`, which shows what the model would see.
"""
