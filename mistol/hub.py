"""Turning a `--model` argument into a local model directory or file.

Accepted: `demo` (the tiny model that ships inside the package), a local directory in
Hugging Face layout, a llama.cpp `.gguf` file, or a Hugging Face repo id
("teknium/OpenHermes-2.5-Mistral-7B"), downloaded once into the usual Hugging Face cache.
"""

from __future__ import annotations

import re
from pathlib import Path

from .errors import MistolError

_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
_ALWAYS = ["config.json", "generation_config.json", "tokenizer.model", "tokenizer_config.json",
           "tokenizer.json", "added_tokens.json", "special_tokens_map.json"]


DEMO_MODEL = Path(__file__).parent / "demo_model"


def resolve_model(spec: str) -> Path:
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
        return download(spec)
    raise MistolError(f"{spec}: no such model directory (or Hugging Face repo id)")


def is_gguf(path: Path) -> bool:
    return path.suffix.lower() == ".gguf" and path.is_file()


def download(repo_id: str) -> Path:
    """Fetch a checkpoint's config, tokenizer and weights (safetensors preferred)."""
    try:
        import huggingface_hub
        from huggingface_hub.utils import HfHubHTTPError
    except ImportError:
        raise MistolError("downloading models needs huggingface_hub: pip install huggingface_hub") from None
    try:  # already downloaded: no network needed
        return Path(huggingface_hub.snapshot_download(repo_id, local_files_only=True))
    except Exception:
        pass
    try:
        files = huggingface_hub.list_repo_files(repo_id)
        weights = [f for f in files if f.endswith(".safetensors")] or [f for f in files if f.endswith(".bin")]
        wanted = [f for f in files if f in _ALWAYS or f in weights or f.endswith(".index.json")]
        return Path(huggingface_hub.snapshot_download(repo_id, allow_patterns=wanted))
    except HfHubHTTPError as e:
        raise MistolError(f"{repo_id}: Hugging Face refused the download ({e})") from None
    except Exception as e:  # no network, DNS failure, proxy, ...
        raise MistolError(
            f"{repo_id}: could not download from Hugging Face ({type(e).__name__}). Without a network, "
            f"fetch it elsewhere (`hf download {repo_id} --local-dir DIR`), copy DIR here and pass --model DIR"
        ) from None
