"""Process supervision with the model as its own judge ("Let's Verify Step by Step",
Lightman et al. 2023).

A solution is cut into steps (lines; a code block with the output it printed is one step).
For each step the judge prompt shows the problem, the steps so far and asks "Is step k
correct? Answer Yes or No."; the step's score is the model's probability of Yes against No,
read from the next-token logits after the prompt:

    p(step k) = P(Yes) / (P(Yes) + P(No)),  P(word) summed over its spellings' first tokens

and the solution's score is the product over its steps (the paper's PRM aggregation). Only
the local engine gives logits, so the judge needs a `LocalLLM`; an OpenAI-compatible server
returns text.

The judge runs in a session of its own. Its prompts for one solution share their beginning
(problem, step 1, ..., step k-1), so the session runs only each new step and the question.
"""

from __future__ import annotations

import math

import torch

from ..errors import MistolError

JUDGE_SYSTEM_PROMPT = (
    "You are a meticulous math teacher. You check a student's solution one step at a time and say "
    "whether the newest step is correct: right reasoning, right arithmetic, and a right result for code."
)
YES_WORDS = ("Yes", "yes")
NO_WORDS = ("No", "no")
VERIFY_NEEDS_ENGINE = (
    "--strategy verify scores each step with the model's next-token probabilities (logits), which only "
    "the local engine gives; it is not available with --api (an OpenAI-compatible server returns text). "
    "Run it with --model instead, or use --strategy vote with the server"
)


def split_steps(text: str) -> list[str]:
    """A solution's steps: its non-empty lines, a fenced block (with the `Output:` block that
    follows it) kept whole as one step."""
    steps: list[str] = []
    current: list[str] = []
    fence = ""
    lines = text.strip().split("\n")
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        if fence:
            current.append(line)
            if stripped.startswith(fence) and stripped.strip("`~") == "":
                fence = ""
                # "Output:" and its block belong to the code that printed it
                if i + 1 < len(lines) and lines[i + 1].strip() == "Output:":
                    i += 1
                    current.append(lines[i])
                    if i + 1 < len(lines) and lines[i + 1].strip().startswith("```"):
                        i += 1
                        current.append(lines[i])
                        fence = "```"
                        i += 1
                        continue
                steps.append("\n".join(current))
                current = []
        elif stripped.startswith(("```", "~~~")):
            fence = stripped[:3]
            current = [line]
        elif stripped:
            steps.append(stripped)
        i += 1
    if current:
        steps.append("\n".join(current))
    return steps


def judge_messages(question: str, steps: list[str]) -> list[dict]:
    """The judge's conversation for the last of `steps`; the steps before it come first, so
    the prompts of one solution share their beginning."""
    shown = "".join(f"Step {i}: {step}\n\n" for i, step in enumerate(steps, 1))
    user = (f"Problem:\n{question}\n\nSolution so far:\n{shown}"
            f"Is step {len(steps)} correct? Answer Yes or No.")
    return [{"role": "system", "content": JUDGE_SYSTEM_PROMPT}, {"role": "user", "content": user}]


class StepScorer:
    """Scores solution steps with the local model's own probability of "Yes"."""

    def __init__(self, llm):
        engine = getattr(llm, "engine", None)
        if engine is None:
            raise MistolError(VERIFY_NEEDS_ENGINE)
        self.engine = engine
        self.template = llm.template
        self.session = engine.new_session()
        self._words: tuple[list[int], list[int]] | None = None
        self.tokens_run = 0  # judge prompt tokens run through the model

    def word_ids(self, prompt: list[int]) -> tuple[list[int], list[int]]:
        """The first token of each spelling of Yes and No, as the model would write it after
        `prompt` (continuing its text) and as a word of its own (with SentencePiece's "▁")."""
        if self._words is None:
            tok = self.engine.tokenizer

            def first_tokens(words) -> set[int]:
                ids = set()
                for word in words:
                    ids.add(tok.encode_pieces([*prompt, word])[len(prompt)])
                    ids.add(tok.encode(word)[0])
                return ids

            yes, no = first_tokens(YES_WORDS), first_tokens(NO_WORDS)
            both = yes & no
            if not yes - both or not no - both:
                raise MistolError("the tokenizer gives Yes and No the same first token; cannot judge steps")
            self._words = sorted(yes - both), sorted(no - both)
        return self._words

    def step_probability(self, question: str, steps: list[str]) -> float:
        """P(Yes) against P(No) for the last of `steps`."""
        prompt = self.template.render(judge_messages(question, steps))
        before = self.session.tokens_processed
        logits = self.session.feed(prompt)
        self.tokens_run += self.session.tokens_processed - before
        yes, no = self.word_ids(prompt)
        log_yes = torch.logsumexp(logits[yes].float(), 0)
        log_no = torch.logsumexp(logits[no].float(), 0)
        return float(torch.sigmoid(log_yes - log_no))

    def score_steps(self, question: str, steps: list[str]) -> list[float]:
        return [self.step_probability(question, steps[: k + 1]) for k in range(len(steps))]


def solution_score(step_scores: list[float]) -> float:
    """The product of the steps' probabilities (1.0 for no steps: nothing was judged wrong)."""
    return math.prod(step_scores)
