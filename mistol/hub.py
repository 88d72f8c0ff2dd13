"""Turning a `--model` argument into a local model directory or file.

Accepted: `demo` (the tiny model that ships inside the package), a local directory in
Hugging Face layout, a llama.cpp `.gguf` file, or a Hugging Face repo id
("teknium/OpenHermes-2.5-Mistral-7B"), downloaded once into the usual Hugging Face cache.

A repo id that is not in the cache needs the network. Without one we say so at once (a quick
connection check instead of huggingface_hub's retries, which take half a minute) and name the
ways out: `--model demo` runs offline, or the files can be fetched on another machine. With one,
a caller may pass `confirm` to be asked before a large download (the command line asks the
person; a program calling `Engine.load` asked for the model already).
"""

from __future__ import annotations

import re
import socket
import threading
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

from .errors import MistolError

_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
TOKENIZER_FILES = ["tokenizer.model", "tokenizer_config.json", "tokenizer.json", "added_tokens.json",
                   "special_tokens_map.json"]
_ALWAYS = ["config.json", "generation_config.json", *TOKENIZER_FILES]
ASK_ABOVE_BYTES = 1 << 30  # downloads larger than this are confirmed first
_REACH_TIMEOUT_S = 1.5

DEMO_MODEL = Path(__file__).parent / "demo_model"

# confirm(repo_id, total_bytes, cache_dir) -> whether to go ahead
Confirm = Callable[[str, int, str], bool]


def resolve_model(spec: str, *, tokenizer_only: bool = False, confirm: Confirm | None = None) -> Path:
    """The local path of `spec`, downloading a Hugging Face repo id if needed (only its
    tokenizer files with `tokenizer_only`)."""
    if spec == "demo":
        if not (DEMO_MODEL / "config.json").is_file():
            raise MistolError(f"the demo model is missing from {DEMO_MODEL}; scripts/train_demo.py builds it")
        return DEMO_MODEL
    path = Path(spec).expanduser()
    if path.is_dir() or is_gguf(path):
        return path
    if path.is_file():
        raise MistolError(f"{spec}: is a file; --model takes a model directory, a .gguf file or a Hugging Face repo id")
    if path.suffix.lower() == ".gguf":
        raise MistolError(f"{spec}: no such file")
    if _REPO_ID.match(spec) and not spec.startswith((".", "/")):
        return download(spec, tokenizer_only=tokenizer_only, confirm=confirm)
    raise MistolError(f"{spec}: no such model directory (or Hugging Face repo id)")


def is_gguf(path: Path) -> bool:
    return path.suffix.lower() == ".gguf" and path.is_file()


def download(repo_id: str, *, tokenizer_only: bool = False, confirm: Confirm | None = None) -> Path:
    """Fetch a checkpoint's config, tokenizer and weights (safetensors preferred)."""
    try:
        import huggingface_hub
        from huggingface_hub import constants
        from huggingface_hub.utils import HfHubHTTPError
    except ImportError:
        raise MistolError("downloading models needs huggingface_hub: pip install huggingface_hub") from None
    try:  # already downloaded: no network needed
        cached = Path(huggingface_hub.snapshot_download(repo_id, local_files_only=True))
        if tokenizer_only or any(f.suffix in (".safetensors", ".bin") for f in cached.iterdir()):
            return cached  # (a snapshot that `tokenize` fetched has no weights)
    except Exception:
        pass
    offline = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else _unreachable(constants.ENDPOINT)
    if offline:
        raise MistolError(
            f"{repo_id}: could not download from Hugging Face ({offline}). `--model demo` works offline; "
            f"or fetch the model on a machine with a network (`hf download {repo_id} --local-dir DIR`), "
            "copy DIR here and pass --model DIR"
        )
    try:
        info = huggingface_hub.HfApi().model_info(repo_id, files_metadata=True)
        sizes = {s.rfilename: s.size or 0 for s in info.siblings or []}
        wanted = _wanted_files(list(sizes), tokenizer_only)
        total = sum(sizes[f] for f in wanted)
        if confirm is not None and total > ASK_ABOVE_BYTES and not confirm(repo_id, total, constants.HF_HUB_CACHE):
            raise MistolError(f"{repo_id}: not downloaded")
        return Path(huggingface_hub.snapshot_download(repo_id, allow_patterns=wanted))
    except HfHubHTTPError as e:
        raise MistolError(f"{repo_id}: Hugging Face refused the download ({_first_line(e)})") from None
    except MistolError:
        raise
    except Exception as e:  # the network went away, a proxy, a full disk, ...
        raise MistolError(
            f"{repo_id}: could not download from Hugging Face ({type(e).__name__}: {_first_line(e)}). Without a network, "
            f"fetch it elsewhere (`hf download {repo_id} --local-dir DIR`), copy DIR here and pass --model DIR"
        ) from None


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [""])[0]


def _wanted_files(files: list[str], tokenizer_only: bool) -> list[str]:
    if tokenizer_only:
        return [f for f in files if f in TOKENIZER_FILES]
    weights = [f for f in files if f.endswith(".safetensors")] or [f for f in files if f.endswith(".bin")]
    return [f for f in files if f in _ALWAYS or f in weights or f.endswith(".index.json")]


def _unreachable(endpoint: str) -> str | None:
    """Why `endpoint` cannot be reached within a second or two, or None when it can.

    The name lookup has no timeout of its own, so the check runs on a thread we stop waiting for.
    """
    url = urlparse(endpoint)
    host, port = url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
    outcome: list[str | None] = []

    def connect():
        try:
            socket.create_connection((host, port), timeout=_REACH_TIMEOUT_S).close()
            outcome.append(None)
        except OSError as e:
            outcome.append(f"{host} cannot be reached: {e.strerror or type(e).__name__}")

    probe = threading.Thread(target=connect, daemon=True)
    probe.start()
    probe.join(_REACH_TIMEOUT_S + 0.5)
    return outcome[0] if outcome else f"{host} did not answer"
