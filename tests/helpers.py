"""Shared helpers for the test suite (each helper is self-contained)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

# ChatML, exactly as OpenHermes 2.5 ships it in tokenizer_config.json.
OPENHERMES_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def mistral_v1_tokenizer_model() -> Path:
    """Mistral 7B v0.1's SentencePiece model (also OpenHermes 2.5's), shipped in mistral-common."""
    import importlib.resources

    path = importlib.resources.files("mistral_common") / "data" / "tokenizer.model.v1"
    return Path(str(path))


def make_openhermes_tokenizer_dir(path, legacy: bool = True) -> Path:
    """Write an OpenHermes-2.5-shaped tokenizer directory into `path` and return it.

    tokenizer.model is Mistral v0.1's; `<|im_end|>`=32000 and `<|im_start|>`=32001 are added on top, and
    tokenizer_config.json mirrors the real one (BOS `<s>`, chat EOS `<|im_end|>`), `legacy` as given.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(mistral_v1_tokenizer_model(), path / "tokenizer.model")

    added = {"<|im_end|>": 32000, "<|im_start|>": 32001}
    (path / "added_tokens.json").write_text(json.dumps(added, indent=2) + "\n", encoding="utf-8")

    def token(content: str) -> dict:
        return {
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }

    specials = {0: "<unk>", 1: "<s>", 2: "</s>", 32000: "<|im_end|>", 32001: "<|im_start|>"}
    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": {str(i): token(content) for i, content in specials.items()},
        "additional_special_tokens": [],
        "bos_token": "<s>",
        "chat_template": OPENHERMES_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "legacy": legacy,
        "model_max_length": 1000000000000000019884624838656,
        "pad_token": None,
        "sp_model_kwargs": {},
        "spaces_between_special_tokens": False,
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": "<unk>",
        "use_default_system_prompt": False,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    # A model directory has a config.json; transformers picks its tokenizer pipeline from it, and
    # only with it does AutoTokenizer tokenize as SentencePiece (and the trained model) does.
    if not (path / "config.json").exists():
        model_config = {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "vocab_size": 32002}
        (path / "config.json").write_text(json.dumps(model_config, indent=2) + "\n", encoding="utf-8")
    return path


class LoopbackServer:
    """Run an ASGI app with uvicorn on a free loopback port in a thread: `with LoopbackServer(app) as url`."""

    def __init__(self, app, timeout: float = 30.0):
        self.app, self.timeout = app, timeout

    def __enter__(self) -> str:
        import socket
        import threading
        import time

        import uvicorn

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + self.timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(15)
        self.sock.close()


def kernel_impls() -> list[str]:
    """The compiled kernel implementations this CPU runs, fastest first."""
    from mistol import kernels

    return {"avx512vnni": ["avx512vnni", "avx2", "scalar"], "avx2": ["avx2", "scalar"],
            "dotprod": ["dotprod", "neon", "scalar"], "neon": ["neon", "scalar"]}.get(kernels.best_impl(), ["scalar"])
