"""The one exception type front ends turn into a clear one-line message."""


class MistolError(Exception):
    """A problem the user can act on: a bad path, a bad file, a bad option.

    The message is complete on its own (it names the file, what was expected and what was
    found), so the command line prints it as is, without a traceback.
    """
