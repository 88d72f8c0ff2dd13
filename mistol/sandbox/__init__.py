"""Running the Python code the model writes.

`codeblocks` finds fenced code blocks in streamed text; `sandbox` runs code in an isolated
worker process (`_worker.py`); `code_turn` is the assistant turn that stops at a closed
block, asks, runs it and feeds its output back, shared by every front end; `visible` writes
out the control characters of code and output shown on a terminal.
"""
