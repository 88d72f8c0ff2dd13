"""The terminal chat: `mistol chat`."""
