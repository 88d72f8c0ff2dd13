"""`ModelConfig`: the shape of a Mistral/Llama model, read from a Hugging Face config.json."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import MistolError

SUPPORTED_ARCHITECTURES = ("MistralForCausalLM", "LlamaForCausalLM")


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rope_scaling_factor: float = 1.0  # "linear" RoPE scaling divides positions by this
    rms_norm_eps: float = 1e-5
    sliding_window: int | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise MistolError(
                f"config: num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )

    @classmethod
    def from_hf_dict(cls, cfg: dict, source: str = "config.json") -> "ModelConfig":
        archs = cfg.get("architectures") or []
        model_type = cfg.get("model_type")
        if archs and not any(a in SUPPORTED_ARCHITECTURES for a in archs):
            raise MistolError(
                f"{source}: unsupported architecture {archs[0]!r}; "
                "mistol runs Mistral/Llama checkpoints (MistralForCausalLM, LlamaForCausalLM)"
            )
        if not archs and model_type not in ("mistral", "llama"):
            raise MistolError(
                f"{source}: unsupported model_type {model_type!r}; mistol runs Mistral/Llama checkpoints"
            )
        for flag in ("attention_bias", "mlp_bias"):
            if cfg.get(flag):
                raise MistolError(f"{source}: {flag}=true is not supported")
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise MistolError(f"{source}: hidden_act {act!r} is not supported (expected 'silu')")

        def need(key):
            if cfg.get(key) is None:
                raise MistolError(f"{source}: missing required field {key!r}")
            return cfg[key]

        hidden = int(need("hidden_size"))
        heads = int(need("num_attention_heads"))
        theta, factor = _rope(cfg, source)
        window = cfg.get("sliding_window")
        if cfg.get("use_sliding_window") is False:  # Qwen-style switch, honoured if present
            window = None
        return cls(
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(need("intermediate_size")),
            num_layers=int(need("num_hidden_layers")),
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            rope_theta=theta,
            rope_scaling_factor=factor,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
            sliding_window=int(window) if window else None,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            bos_token_id=_first(cfg.get("bos_token_id")),
            eos_token_id=_first(cfg.get("eos_token_id")),
        )

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        try:
            cfg = json.loads(path.read_text())
        except FileNotFoundError:
            raise MistolError(f"{path}: not found (a model directory needs a config.json)") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise MistolError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(cfg, dict):
            raise MistolError(f"{path}: expected a JSON object")
        return cls.from_hf_dict(cfg, source=str(path))


def _first(value):
    """`eos_token_id` may be an int or a list of ints; the first is the model's own."""
    if isinstance(value, list):
        return value[0] if value else None
    return value


def _rope(cfg: dict, source: str) -> tuple[float, float]:
    """RoPE base and linear scaling factor, from either config form.

    transformers < 5 writes a top-level `rope_theta` (and maybe `rope_scaling`);
    transformers 5 writes `rope_parameters: {rope_theta, rope_type, ...}`.
    """
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return float(theta), 1.0
    if rope_type == "linear":
        return float(theta), float(params["factor"])
    key = "rope_parameters" if "rope_parameters" in cfg else "rope_scaling"
    raise MistolError(
        f"{source}: {key}.rope_type {rope_type!r} is not supported (supported: default, linear)"
    )
