"""Turning a step's logits into the next token: `SamplingParams` and `sample_next`.

The controls and their order follow Hugging Face's generate(): repetition penalty first,
then temperature, top-k, top-p (nucleus) and min-p. temperature == 0 is greedy.
`SamplingParams` needs no torch (a client of a remote server imports it); sampling does.

A draw runs where its generator lives (`SamplingParams.make_generator`: the CPU), whatever
the device of the logits: PyTorch refuses a CPU generator for a GPU tensor, and one
vocabulary of floats is cheap to copy. The same logits and seed thus give the same token
on any device.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .errors import MistolError

if TYPE_CHECKING:
    import torch


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

    def __post_init__(self):
        checks = [
            (self.temperature >= 0, "temperature must be >= 0"),
            (self.top_k >= 0, "top_k must be >= 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
            (self.max_tokens >= 0, "max_tokens must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise MistolError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

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
        return int(logits.argmax())
    weights = sampling_weights(logits, params)
    return int(torch.multinomial(weights.to(draw_device(weights, generator)), 1, generator=generator))


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
    """The unnormalized probabilities a non-greedy `sample_next` draws from, given the
    (already penalized) logits: temperature, then top-k, top-p and min-p."""
    import torch

    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.numel():
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # drop a token once the tokens before it already cover top_p (the first is always kept)
        drop = sorted_probs.cumsum(0) - sorted_probs > params.top_p
        probs[order[drop]] = 0.0
    if params.min_p > 0.0:
        probs = probs.masked_fill(probs < params.min_p * probs.max(), 0.0)
    return probs


def draw_device(logits: torch.Tensor, generator: torch.Generator | None) -> torch.device:
    """Where a token is drawn from `logits`: on the generator's device (without one, the
    default generator of the logits' own device draws)."""
    return logits.device if generator is None else generator.device
