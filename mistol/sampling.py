"""Turning a step's logits into the next token: `SamplingParams` and `sample_next`.

The controls and their default order follow Hugging Face's generate(): repetition penalty
first, then temperature, top-k, top-p (nucleus) and min-p. `SamplingParams.order` names the
filters in the order they apply, and only those: llama.cpp's default order puts temperature
last (top-p and min-p then see the model's own distribution), and its server lets a client
choose the order and leave filters out (`samplers`; see server/fields.py). temperature == 0
(or top_k == 1), when in the order, is greedy: every filter keeps the most likely token.
`SamplingParams` needs no torch (a client of a remote server imports it); sampling does.

Non-finite logits (NaN or +inf: a damaged model file, or activations that overflow the
dtype) raise a `MistolError` saying so, greedy or not, instead of an error deep in torch or
a junk token: one reduction over the row, read back with the token it picks.

A draw runs where its generator lives (`SamplingParams.make_generator`: the CPU), whatever
the device of the logits: PyTorch refuses a CPU generator for a GPU tensor, and one
vocabulary of floats is cheap to copy. The same logits and seed thus give the same token
on any device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .errors import MistolError

if TYPE_CHECKING:
    import torch

FILTERS = ("temperature", "top_k", "top_p", "min_p")  # the filters an order may name
DEFAULT_ORDER = FILTERS  # Hugging Face's order


@dataclass
class SamplingParams:
    temperature: float = 0.8
    top_k: int = 40  # 0 = off
    top_p: float = 0.95  # 1.0 = off
    min_p: float = 0.05  # 0.0 = off
    repetition_penalty: float = 1.0  # 1.0 = off
    seed: int | None = None
    max_tokens: int = 512
    stop_token_ids: list[int] = field(default_factory=list)
    stop: list[str] = field(default_factory=list)  # stop strings, not part of the output
    order: tuple[str, ...] = DEFAULT_ORDER  # filters applied, in this order; those left out are off

    def __post_init__(self):
        checks = [
            (self.temperature >= 0, "temperature must be >= 0"),
            (self.top_k >= 0, "top_k must be >= 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
            (self.max_tokens >= 0, "max_tokens must be >= 0"),
            (all(name in FILTERS for name in self.order), f"order names filters among {', '.join(FILTERS)}"),
        ]
        for ok, message in checks:
            if not ok:
                raise MistolError(message)

    @property
    def greedy(self) -> bool:
        return ("temperature" in self.order and self.temperature == 0) or ("top_k" in self.order and self.top_k == 1)

    def make_generator(self) -> torch.Generator:
        import torch

        g = torch.Generator()
        if self.seed is None:
            g.seed()
        else:
            g.manual_seed(self.seed)
        return g


def sample_next(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None = None,
    context: torch.Tensor | None = None,
) -> int:
    """logits: [vocab] float32 for one position; context: token ids seen so far (for the
    repetition penalty)."""
    import torch

    logits = penalized(logits, params, context)
    if params.greedy:
        return greedy_token(logits)
    weights = sampling_weights(logits, params).to(draw_device(logits, generator))
    check_weights(weights, logits)
    return int(torch.multinomial(weights, 1, generator=generator))


def greedy_token(logits: torch.Tensor) -> int:
    """The most likely token; a `MistolError` if the logits are not finite. argmax takes a
    NaN or +inf as the largest, so the value at the argmax tells, read back with it."""
    import torch

    best = logits.argmax()
    index, value = torch.stack((best.float(), logits[best].float())).tolist()  # exact below 2**24 tokens
    if not math.isfinite(value):
        raise non_finite_error(logits)
    return int(index)


def check_weights(weights: torch.Tensor, logits: torch.Tensor) -> None:
    """A `MistolError` if `weights` (from `sampling_weights(logits)`) cannot be drawn from:
    NaN logits make every weight NaN, and so does a +inf one. Call it where the weights
    already are on the CPU, where reading their sum costs no device sync."""
    if not math.isfinite(total := float(weights.sum())) or total <= 0:
        raise non_finite_error(logits)


def non_finite_error(logits: torch.Tensor) -> MistolError:
    import torch

    what = "NaN" if bool(torch.isnan(logits).any()) else "infinite"
    return MistolError(f"the model's output is {what} at this token: its weights are damaged or overflow "
                       "the dtype it runs in (try --quant f32, or download the model again)")


def penalized(logits: torch.Tensor, params: SamplingParams, context: torch.Tensor | None = None) -> torch.Tensor:
    """`logits` with the repetition penalty applied to the tokens of `context` (a copy, if any changed)."""
    import torch

    if params.repetition_penalty != 1.0 and context is not None and context.numel():
        logits = logits.clone()
        seen = context.unique().to(logits.device)
        scores = logits[seen]
        p = params.repetition_penalty
        logits[seen] = torch.where(scores < 0, scores * p, scores / p)
    return logits


def sampling_weights(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The probabilities a non-greedy `sample_next` draws from, given the (already
    penalized) logits: the filters of `params.order`, in that order. Each sees the logits
    the ones before it left (a token filtered out is at -inf); top-p and min-p judge the
    distribution those logits make at that point."""
    import torch

    for name in params.order:
        logits = _FILTER_STEPS[name](logits, params)
    return torch.softmax(logits, dim=-1)


def _temperature(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    return logits / params.temperature if params.temperature > 0 else logits  # 0: greedy, never here


def _top_k(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    import torch

    if params.top_k and params.top_k < logits.numel():
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return logits


def _top_p(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    import torch

    if params.top_p < 1.0:
        sorted_probs, order = torch.softmax(logits, dim=-1).sort(descending=True)
        # drop a token once the tokens before it already cover top_p (the first is always kept)
        drop = sorted_probs.cumsum(0) - sorted_probs > params.top_p
        logits = logits.clone()
        logits[order[drop]] = float("-inf")
    return logits


def _min_p(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    import torch

    if params.min_p > 0.0:
        probs = torch.softmax(logits, dim=-1)
        logits = logits.masked_fill(probs < params.min_p * probs.max(), float("-inf"))
    return logits


_FILTER_STEPS = {"temperature": _temperature, "top_k": _top_k, "top_p": _top_p, "min_p": _min_p}


def draw_device(logits: torch.Tensor, generator: torch.Generator | None) -> torch.device:
    """Where a token is drawn from `logits`: on the generator's device (without one, the
    default generator of the logits' own device draws)."""
    return logits.device if generator is None else generator.device
