"""Tools the model can use in a chat: for now, running the Python code it writes.

`codeblocks` finds fenced code blocks in streamed text; `sandbox` runs code in an isolated
worker process (`mistol exec FILE`, in mistol/commands/exec.py, shows what the model would see).
"""
