"""The strategy names and the voting temperature, apart from strategies.py (which imports
torch through the sampler) so that `mistol math --help` can list them at once."""

STRATEGIES = ("cot", "code", "vote", "verify")
SAMPLING = ("vote", "verify")  # strategies that need temperature > 0
DEFAULT_VOTE_TEMPERATURE = 0.7
