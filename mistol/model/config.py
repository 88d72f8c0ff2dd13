"""`ModelConfig`: the shape of a Mistral/Llama/Qwen2 model, read from a Hugging Face config.json.

What mistol runs: a decoder of RMSNorm, RoPE ("rotate half"), grouped-query attention and a
SwiGLU feed-forward, with an optional sliding window on every layer, optional attention biases
(Qwen2's q/k/v; Llama's `attention_bias` also on o), tied or separate output embeddings, and RoPE
frequencies as given (default), divided by a factor ("linear") or Llama 3.1's "llama3". Anything
else gets a one-line `MistolError` naming what mistol lacks.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from ..errors import MistolError

SUPPORTED_ARCHITECTURES = ("MistralForCausalLM", "LlamaForCausalLM", "Qwen2ForCausalLM")
MODEL_TYPES = {"mistral": "MistralForCausalLM", "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
ROPE_TYPES = ("default", "linear", "llama3")
# Families people ask for that mistol does not run, and what they need that it lacks.
_NOT_RUN = {
    "Mixtral": "a mixture-of-experts feed-forward",
    "Moe": "a mixture-of-experts feed-forward",
    "Gemma": "Gemma's (1 + weight) norms, GeGLU feed-forward and scaled embeddings",
    "Phi3": "Phi-3's fused qkv_proj/gate_up_proj and its RoPE scaling",
    "Qwen3": "Qwen3's q/k norms",
}


@dataclass(frozen=True)
class Llama3Rope:
    """Llama 3.1's RoPE scaling (`rope_type: llama3`): frequencies whose wavelength exceeds
    original_max_position_embeddings / low_freq_factor are divided by `factor`, those below
    it / high_freq_factor kept, the band between blended."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


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
    rope_llama3: Llama3Rope | None = None  # a config.json's llama3 RoPE scaling
    # Divisors of each RoPE frequency [head_dim / 2], as a GGUF file's `rope_freqs` tensor gives them
    rope_freq_factors: tuple[float, ...] | None = None
    qkv_bias: bool = False  # q, k and v projections add a bias (Qwen2)
    o_bias: bool = False  # the output projection adds one too (Llama's attention_bias)
    rms_norm_eps: float = 1e-5
    sliding_window: int | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2

    def __post_init__(self):
        # A damaged or hostile file's numbers, refused before any tensor is sized by them; the
        # bounds are far past any model's, so that no product of two overflows torch's sizes.
        for names, bound in ((("vocab_size", "hidden_size", "intermediate_size", "num_heads", "num_kv_heads", "head_dim"),
                              24), (("num_layers",), 16), (("max_position_embeddings",), 31)):
            for name in names:
                if not 0 < getattr(self, name) < 2**bound:
                    raise MistolError(f"config: {name} is {getattr(self, name)}; it must be positive and below 2^{bound}")
        for name in ("rope_theta", "rope_scaling_factor"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise MistolError(f"config: {name} is {getattr(self, name)}; it must be a positive number")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise MistolError(f"config: sliding_window is {self.sliding_window}; it must be positive (or absent)")
        if not (math.isfinite(self.rms_norm_eps) and self.rms_norm_eps >= 0):
            raise MistolError(f"config: rms_norm_eps is {self.rms_norm_eps}; it must be a number >= 0")
        if self.rope_freq_factors is not None and len(self.rope_freq_factors) != self.head_dim // 2:
            raise MistolError(
                f"config: {len(self.rope_freq_factors)} RoPE frequency factors for a head of {self.head_dim}"
            )
        if self.num_heads % self.num_kv_heads:
            raise MistolError(
                f"config: num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )

    @classmethod
    def from_hf_dict(cls, cfg: dict, source: str = "config.json") -> "ModelConfig":
        arch = _architecture(cfg, source)
        if cfg.get("mlp_bias"):
            raise MistolError(f"{source}: mlp_bias=true (biases in the feed-forward) is not supported")
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise MistolError(f"{source}: hidden_act {act!r} is not supported (expected 'silu')")

        def need(key):
            if cfg.get(key) is None:
                raise MistolError(f"{source}: missing required field {key!r}")
            return cfg[key]

        def whole(key: str, value) -> int:
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            if type(value) is not int:
                raise MistolError(f"{source}: {key} is {value!r}; expected a whole number")
            return value

        def real(key: str, default: float) -> float:
            value = cfg.get(key, default)
            if type(value) not in (int, float):
                raise MistolError(f"{source}: {key} is {value!r}; expected a number")
            return float(value)

        hidden = whole("hidden_size", need("hidden_size"))
        heads = whole("num_attention_heads", need("num_attention_heads"))
        if heads <= 0:
            raise MistolError(f"{source}: num_attention_heads is {heads}; it must be positive")
        layers = whole("num_hidden_layers", need("num_hidden_layers"))
        theta, factor, llama3 = _rope(cfg, source)
        qwen2 = arch == "Qwen2ForCausalLM"
        return cls(
            vocab_size=whole("vocab_size", need("vocab_size")),
            hidden_size=hidden,
            intermediate_size=whole("intermediate_size", need("intermediate_size")),
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=whole("num_key_value_heads", cfg.get("num_key_value_heads") or heads),
            head_dim=whole("head_dim", cfg.get("head_dim") or hidden // heads),
            rope_theta=theta,
            rope_scaling_factor=factor,
            rope_llama3=llama3,
            qkv_bias=qwen2 or bool(cfg.get("attention_bias")),
            o_bias=not qwen2 and bool(cfg.get("attention_bias")),
            rms_norm_eps=real("rms_norm_eps", 1e-5),
            sliding_window=_window(cfg, layers, source),
            max_position_embeddings=whole("max_position_embeddings", cfg.get("max_position_embeddings", 4096)),
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


def _architecture(cfg: dict, source: str) -> str:
    """The config's architecture, if mistol runs it; else a one-line error naming what it lacks."""
    archs = cfg.get("architectures") or []
    if not (isinstance(archs, list) and all(isinstance(a, str) for a in archs)):
        raise MistolError(f"{source}: architectures is {archs!r}; expected a list of names")
    model_type = cfg.get("model_type")
    arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
    if arch is None and not archs:
        arch = MODEL_TYPES.get(model_type)
    named = archs[0] if archs else model_type
    if arch is None:
        missing = next((why for key, why in _NOT_RUN.items() if key.lower() in str(named).lower()), None)
        raise MistolError(
            f"{source}: unsupported architecture {named!r}"
            + (f" (it needs {missing})" if missing else "")
            + "; mistol runs MistralForCausalLM, LlamaForCausalLM and Qwen2ForCausalLM checkpoints"
        )
    for key in ("num_local_experts", "num_experts"):
        if cfg.get(key):
            raise MistolError(f"{source}: {key}={cfg[key]}: mixture-of-experts models are not supported")
    return arch


def _window(cfg: dict, layers: int, source: str) -> int | None:
    """The sliding window every layer uses, or None. Qwen2 switches it with `use_sliding_window`
    and keeps the first `max_window_layers` layers at full attention; transformers 5 lists each
    layer's kind in `layer_types`. mistol runs one kind of attention on every layer."""
    window = cfg.get("sliding_window")
    if cfg.get("use_sliding_window") is False:
        return None
    kinds = cfg.get("layer_types")
    if kinds is None and cfg.get("use_sliding_window"):
        first = int(cfg.get("max_window_layers") or 0)
        kinds = ["full_attention"] * min(first, layers) + ["sliding_attention"] * max(0, layers - first)
    if kinds:
        if len(set(kinds)) > 1:
            raise MistolError(
                f"{source}: a sliding window on some layers only ({kinds.count('sliding_attention')} of "
                f"{len(kinds)}: use_sliding_window/max_window_layers or layer_types) is not supported; "
                "mistol runs one kind of attention on every layer"
            )
        if kinds[0] == "full_attention":
            return None
        if kinds[0] != "sliding_attention":
            raise MistolError(f"{source}: layer type {kinds[0]!r} is not supported")
    return int(window) if window else None


def _rope(cfg: dict, source: str) -> tuple[float, float, Llama3Rope | None]:
    """RoPE base, linear scaling factor and llama3 scaling, from either config form.

    transformers < 5 writes a top-level `rope_theta` (and maybe `rope_scaling`);
    transformers 5 writes `rope_parameters: {rope_theta, rope_type, ...}`.
    """
    key = "rope_parameters" if cfg.get("rope_parameters") else "rope_scaling"
    params = cfg.get(key) or {}
    if not isinstance(params, dict):
        raise MistolError(f"{source}: {key} is {params!r}; expected an object")
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    if type(theta) not in (int, float):
        raise MistolError(f"{source}: rope_theta is {theta!r}; expected a number")
    theta = float(theta)
    rope_type = params.get("rope_type", params.get("type", "default"))
    partial = params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise MistolError(f"{source}: partial_rotary_factor {partial} (RoPE on part of each head) is not supported")
    try:
        if rope_type == "default":
            return theta, 1.0, None
        if rope_type == "linear":
            return theta, float(params["factor"]), None
        if rope_type == "llama3":
            return theta, 1.0, Llama3Rope(
                float(params["factor"]), float(params["low_freq_factor"]), float(params["high_freq_factor"]),
                int(params["original_max_position_embeddings"]),
            )
    except KeyError as e:
        raise MistolError(f"{source}: {key} of rope_type {rope_type!r} lacks {e.args[0]!r}") from None
    except (TypeError, ValueError, OverflowError):
        raise MistolError(f"{source}: {key} holds a value that is not a number: {params!r}") from None
    raise MistolError(
        f"{source}: {key}.rope_type {rope_type!r} is not supported (supported: {', '.join(ROPE_TYPES)})"
    )
