"""`mistol serve`: an OpenAI-compatible HTTP server with a prefix cache and continuous batching.

`create_app(engine, options)` builds the FastAPI app (app.py); its `Scheduler` thread owns
the engine (scheduler.py); protocol.py holds the request checks and response shapes.
"""

from __future__ import annotations

__all__ = ["ServerOptions", "create_app"]


def __getattr__(name):
    # Imported lazily: `mistol --help` should not wait for FastAPI or torch.
    if name in __all__:
        from . import app

        return getattr(app, name)
    raise AttributeError(name)
