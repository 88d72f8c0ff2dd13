"""mistol: a local, private assistant for Mistral/Llama-architecture models."""

__version__ = "0.1.0"

__all__ = ["Engine", "Generation", "MistolError", "SamplingParams", "Session", "__version__"]


def __getattr__(name):
    # Imported lazily so that `mistol --help` does not wait for torch.
    if name in ("Engine", "Generation", "Session"):
        from . import engine

        return getattr(engine, name)
    if name == "SamplingParams":
        from .sampling import SamplingParams

        return SamplingParams
    if name == "MistolError":
        from .errors import MistolError

        return MistolError
    raise AttributeError(name)
