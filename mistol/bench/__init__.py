"""`mistol bench`: prefill and decode speed of mistol, transformers and llama.cpp on one machine.

`shapes` names the model shapes and what a decode step reads, `models` builds random-weight
models directly in each format, `engines` measures one engine in a process of its own, and
`run` runs them all and reports the comparison (the command itself is mistol/commands/bench.py).
"""
