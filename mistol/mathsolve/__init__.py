"""`mistol math`: solving math problems with an `LLM`, and measuring how well it does.

`answers` finds, normalizes and grades final answers; `datasets` reads GSM8K, MATH/PRM800K
and mistol's own JSON Lines and generates problems; `strategies` holds cot, code, vote and
verify (`verify` scores steps with the model itself); `evaluate` runs a data set with
resumable results and Wilson intervals. The subcommand is mistol/commands/math.py.
"""
