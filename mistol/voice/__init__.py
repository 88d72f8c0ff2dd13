"""`mistol voice`: speech in, spoken answers out (see loop.py for how the pieces fit)."""
