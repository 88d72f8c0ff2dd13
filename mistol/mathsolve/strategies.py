"""Ways to solve a problem with an `LLM`: cot, code, vote and verify.

- cot: one greedy solution, step by step, ending "The answer is ...".
- code: one greedy program-aided solution: the model writes Python, the sandbox runs it
  (no question asked: the user chose this mode; the sandbox's limits hold), the output goes
  back into the reply and the model states the answer (the same code turn as the chat).
- vote: self-consistency (Wang et al. 2022): K solutions sampled at temperature > 0, the
  answer most of them reach wins (answers that are equal as math count together; a tie goes
  to the answer reached first).
- verify: the same K solutions, each scored step by step by the model itself (see
  `verify.py`); the best-scored solution's answer wins, and among solutions scored alike one
  whose stated answer matches what its code printed wins.

vote and verify sample program-aided solutions by default (`base="code"`): a code-checked
answer needs code; `base="cot"` samples chain-of-thought solutions instead.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

from ..errors import MistolError
from ..sampling import SamplingParams
from ..sandbox.code_turn import CODE_SYSTEM_PROMPT, code_turn
from .answers import code_output_answer, extract_answer, is_equivalent
from .choices import SAMPLING, STRATEGIES
from .verify import StepScorer, solution_score, split_steps

TIE = 1e-6  # verify: solution scores this close (relative) count as equal

COT_SYSTEM_PROMPT = (
    "You are a careful mathematician. Solve the problem step by step, one step per line, "
    "and end with a last line of the form \"The answer is ANSWER.\""
)

# show(text, kind): kind is "text" (the model's), "output" (what its code printed) or "note"
Show = Callable[[str, str], None]


@dataclass
class Attempt:
    """One sampled solution."""

    text: str
    answer: str | None
    completion_tokens: int = 0
    runs: list[tuple[str, str]] = field(default_factory=list)  # (code, output)
    code_checked: bool = False  # the stated answer equals what the code printed last
    step_scores: list[float] | None = None  # verify only
    score: float | None = None  # verify only: product of step_scores


@dataclass
class Outcome:
    strategy: str
    attempts: list[Attempt]
    chosen: str | None
    chosen_index: int | None = None  # which attempt gave the chosen answer
    votes: list[tuple[str, int]] = field(default_factory=list)  # vote: (answer, count), most first
    judge_tokens: int = 0  # verify: prompt tokens the judge ran

    @property
    def answers(self) -> list[str | None]:
        return [a.answer for a in self.attempts]

    @property
    def completion_tokens(self) -> int:
        return sum(a.completion_tokens for a in self.attempts)


class Strategy:
    """One strategy over one `LLM` (and the code runner and judge it needs)."""

    def __init__(
        self, name: str, llm, params: SamplingParams, runner=None, samples: int = 5,
        scorer: StepScorer | None = None, base: str = "code",
    ):
        if name not in STRATEGIES:
            raise MistolError(f"unknown strategy {name!r} (choose from {', '.join(STRATEGIES)})")
        if name in SAMPLING:
            if params.greedy:
                raise MistolError(f"--strategy {name} samples {samples} solutions: it needs --temperature > 0 "
                                  "(at 0 they would all be the same)")
            if samples < 1:
                raise MistolError("--samples must be at least 1")
        if name == "verify" and scorer is None:
            raise MistolError("--strategy verify needs a step scorer (the local engine)")
        if base not in ("code", "cot"):
            raise MistolError(f"unknown base {base!r} for vote and verify (choose code or cot)")
        self.name = name
        self.llm = llm
        self.params = params
        self.runner = runner
        self.samples = samples if name in SAMPLING else 1
        self.scorer = scorer
        self.mode = base if name in SAMPLING else name
        if self.mode == "code" and runner is None:
            raise MistolError(f"--strategy {name} runs the model's code: it needs a code runner")

    def solve(self, question: str, seed: int | None = None, show: Show | None = None) -> Outcome:
        """Solve `question`. Sample k uses seed + k, so a run can be repeated."""
        attempts = []
        for k in range(self.samples):
            if show is not None and self.samples > 1:
                show(f"\n── sample {k + 1}/{self.samples} ──\n", "note")
            params = replace(self.params, seed=None if seed is None else seed + k)
            attempts.append(self.attempt(question, params, show))
            if show is not None and not attempts[-1].text.endswith("\n"):
                show("\n", "text")
        if self.name == "vote":
            return self._vote(attempts)
        if self.name == "verify":
            return self._verify(question, attempts, show)
        return Outcome(self.name, attempts, attempts[0].answer, 0)

    def attempt(self, question: str, params: SamplingParams, show: Show | None = None) -> Attempt:
        """One solution, from a fresh conversation (and a fresh sandbox for its code)."""
        code = self.mode == "code"
        system = CODE_SYSTEM_PROMPT if code else COT_SYSTEM_PROMPT
        messages = [{"role": "system", "content": system}, {"role": "user", "content": question},
                    {"role": "assistant", "content": ""}]
        run = self.runner.handle if code else None
        display = (lambda text, is_output: show(text, "output" if is_output else "text")) if show else None
        turn = None
        try:
            turn = code_turn(self.llm, messages, params, run, display)
        finally:
            if code and (turn is None or turn.runs):
                self.runner.reset()  # the next solution starts without this one's variables
        text = messages[-1]["content"]
        answer = extract_answer(text)
        checked = bool(turn.runs) and answer is not None and is_equivalent(answer, code_output_answer(text))
        return Attempt(text, answer, turn.completion_tokens, turn.runs, checked)

    # -- choosing ------------------------------------------------------------------------
    def _vote(self, attempts: list[Attempt]) -> Outcome:
        votes = majority([a.answer for a in attempts])
        if not votes:
            return Outcome(self.name, attempts, None)
        chosen = votes[0][0]
        index = next(i for i, a in enumerate(attempts) if a.answer == chosen)
        return Outcome(self.name, attempts, chosen, index, votes=votes)

    def _verify(self, question: str, attempts: list[Attempt], show: Show | None) -> Outcome:
        before = self.scorer.tokens_run
        for i, a in enumerate(attempts):
            if a.answer is None:
                continue  # nothing to choose: not worth judging
            try:
                a.step_scores = self.scorer.score_steps(question, split_steps(a.text))
                a.score = solution_score(a.step_scores)
            except MistolError as e:  # e.g. the judge prompt does not fit the context
                a.step_scores, a.score = [], 0.0
                if show is not None:
                    show(f"(sample {i + 1} not judged: {e})\n", "note")
            if show is not None:
                steps = " × ".join(f"{p:.2f}" for p in a.step_scores)
                show(f"(sample {i + 1}: answer {a.answer}, steps {steps} = {a.score:.3g}"
                     f"{', code-checked' if a.code_checked else ''})\n", "note")
        index = best_solution(attempts)
        chosen = attempts[index].answer if index is not None else None
        return Outcome(self.name, attempts, chosen, index, judge_tokens=self.scorer.tokens_run - before)


def majority(answers: list[str | None]) -> list[tuple[str, int]]:
    """(answer, count) for each distinct answer (equal as math counts as one), most votes
    first; between equal counts, the answer reached first."""
    clusters: list[list] = []  # [representative, count]
    for answer in answers:
        if answer is None:
            continue
        for cluster in clusters:
            if answer == cluster[0] or is_equivalent(answer, cluster[0]):
                cluster[1] += 1
                break
        else:
            clusters.append([answer, 1])
    ordered = sorted(enumerate(clusters), key=lambda item: (-item[1][1], item[0]))
    return [(c[0], c[1]) for _, c in ordered]


def best_solution(attempts: list[Attempt]) -> int | None:
    """The index of the best-scored attempt with an answer; among scores within TIE of the
    best, a code-checked one first, then the earliest."""
    scored = [(i, a) for i, a in enumerate(attempts) if a.answer is not None and a.score is not None]
    if not scored:
        return None
    top = max(a.score for _, a in scored)
    tied = [(i, a) for i, a in scored if a.score >= top * (1 - TIE)]
    checked = [i for i, a in tied if a.code_checked]
    return checked[0] if checked else tied[0][0]
