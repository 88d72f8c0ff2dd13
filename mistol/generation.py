"""`Generation`: the outcome of one reply, local or remote (torch-free, for `chat --api`)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Generation:
    """The outcome of one `Session.stream` or `LLM.chat`: filled in as the text streams."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)  # empty when a remote server generated
    completion_tokens: int = 0
    prompt_tokens: int = 0  # tokens of the prompt
    prefilled_tokens: int = 0  # of those, how many had to run through the model
    finish_reason: str | None = None  # "stop" (stop token/string), "length" or "cancelled"
    time_to_first_token: float | None = None
    decode_seconds: float = 0.0
    draft_tokens: int = 0  # guesses verified by speculative decoding (mistol/speculative.py)
    accepted_tokens: int = 0  # of those, kept

    @property
    def acceptance(self) -> float:
        """The share of speculative guesses kept (0 when none were made)."""
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else 0.0

    @property
    def tokens_per_second(self) -> float:
        n = self.completion_tokens - 1
        return n / self.decode_seconds if n > 0 and self.decode_seconds > 0 else 0.0


def speculation_note(result) -> str:
    """", 62% of 120 guesses kept" for a reply (a `Generation`, or anything with `draft_tokens`
    and `accepted_tokens`) that speculated; "" otherwise."""
    guessed = getattr(result, "draft_tokens", 0)
    if not guessed:
        return ""
    return f", {100 * result.accepted_tokens / guessed:.0f}% of {guessed} guesses kept"
