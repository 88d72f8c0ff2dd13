"""Evaluating strategies on a data set: one record per problem and strategy, appended to the
results file as it is made (and flushed), so an interrupted run resumes where it stopped;
accuracy with a 95% Wilson score interval.

A record (one JSON line):
    {"id", "strategy", "question", "reference", "answers": [...sampled...], "chosen",
     "correct", "tokens", "seconds", "solution": text of the chosen (or first) solution,
     "code_checked", and for vote "votes", for verify "scores" and "judge_tokens"}
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import MistolError
from ..util import end_the_last_line, write_fully
from .answers import is_equivalent
from .datasets import Problem
from .strategies import Outcome, Strategy


@dataclass
class Summary:
    strategy: str
    n: int = 0
    correct: int = 0
    tokens: int = 0
    seconds: float = 0.0

    def add(self, record: dict) -> None:
        self.n += 1
        self.correct += bool(record.get("correct"))
        self.tokens += int(record.get("tokens") or 0)
        self.seconds += float(record.get("seconds") or 0.0)

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else 0.0

    @property
    def interval(self) -> tuple[float, float]:
        return wilson_interval(self.correct, self.n)


def wilson_interval(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson score interval for k successes in n trials (95% for the default z): unlike
    p ± z·sqrt(p(1-p)/n) it stays inside [0, 1] and is not zero-width at 0 or n."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, center - half), min(1.0, center + half)


def problem_seed(seed: int | None, problem_id: str) -> int | None:
    """A seed per problem, the same on every run (and on a resumed one)."""
    return None if seed is None else (seed * 1_000_003 + zlib.crc32(problem_id.encode())) % (1 << 62)


def make_record(problem: Problem, outcome: Outcome, seconds: float) -> dict:
    index = outcome.chosen_index if outcome.chosen_index is not None else 0
    chosen_attempt = outcome.attempts[index] if outcome.attempts else None
    record = {
        "id": problem.id, "strategy": outcome.strategy, "question": problem.question,
        "reference": problem.reference, "answers": outcome.answers, "chosen": outcome.chosen,
        "correct": is_equivalent(outcome.chosen, problem.reference),
        "tokens": outcome.completion_tokens, "seconds": round(seconds, 3),
        "solution": chosen_attempt.text if chosen_attempt else "",
        "code_checked": bool(chosen_attempt and chosen_attempt.code_checked),
    }
    if outcome.votes:
        record["votes"] = [[answer, count] for answer, count in outcome.votes]
    if outcome.strategy == "verify":
        record["scores"] = [a.score for a in outcome.attempts]
        record["step_scores"] = [a.step_scores for a in outcome.attempts]
        record["judge_tokens"] = outcome.judge_tokens
    return record


def read_records(path: Path) -> list[dict]:
    """The complete records of a results file (a line cut by an interruption is skipped)."""
    if not path.exists():
        return []
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and "id" in record and "strategy" in record:
                records.append(record)
    return records


class ResultsFile:
    """Appends records, each on disk as soon as it is written (one unbuffered write). A file
    that cannot be written (a full disk) ends the run with one line: the records before stay,
    and the same command goes on from them."""

    def __init__(self, path: Path):
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._fd: int | None = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
            end_the_last_line(self._fd)  # a record cut by an interruption
        except OSError as e:
            raise MistolError(f"--out {path}: {e.strerror or e}") from None

    def write(self, record: dict) -> None:
        try:
            write_fully(self._fd, (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
        except OSError as e:
            self.close()
            raise MistolError(f"cannot write to {self.path}: {e.strerror or e}; the records before stay in it "
                              "(make room and run the same command again to go on from them)") from None

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def evaluate(
    problems: list[Problem],
    strategies: list[Strategy],
    out: Path | None = None,
    seed: int | None = 0,
    progress: bool = True,
    on_record: Callable[[dict], None] | None = None,
) -> dict[str, Summary]:
    """Run each strategy on each problem (skipping those already in `out`) and summarize."""
    summaries = {s.name: Summary(s.name) for s in strategies}
    done: dict[tuple[str, str], dict] = {}
    if out is not None:
        wanted = {p.id: p for p in problems}
        for record in read_records(out):
            key = (str(record["id"]), record["strategy"])
            problem = wanted.get(key[0])
            if problem is None or key[1] not in summaries:
                continue
            if record.get("question") != problem.question:
                raise MistolError(f"{out}: its record for problem {key[0]} holds another question; "
                                  "it belongs to another data set (use a new --out file)")
            done[key] = record
    for record in done.values():
        summaries[record["strategy"]].add(record)
    todo = [(p, s) for p in problems for s in strategies if (p.id, s.name) not in done]

    from tqdm import tqdm

    results = ResultsFile(out) if out is not None else None
    bar = tqdm(total=len(todo), file=sys.stderr, disable=not progress, unit="run", dynamic_ncols=True,
               desc="math" if not done else f"math (resumed: {len(done)} done)")
    try:
        for problem, strategy in todo:
            start = time.perf_counter()
            outcome = strategy.solve(problem.question, seed=problem_seed(seed, problem.id))
            record = make_record(problem, outcome, time.perf_counter() - start)
            if results is not None:
                results.write(record)
            summaries[strategy.name].add(record)
            if on_record is not None:
                on_record(record)
            bar.set_postfix_str("  ".join(f"{s.strategy} {s.correct}/{s.n}" for s in summaries.values()))
            bar.update(1)
    finally:
        bar.close()
        if results is not None:
            results.close()
    return summaries


def format_table(summaries: dict[str, Summary]) -> str:
    header = f"{'strategy':<9} {'problems':>8} {'correct':>7} {'accuracy':>8}  {'95% CI (Wilson)':<16} " \
             f"{'tokens/problem':>14} {'s/problem':>9}"
    lines = [header]
    for s in summaries.values():
        lo, hi = s.interval
        per = max(s.n, 1)
        lines.append(f"{s.strategy:<9} {s.n:>8} {s.correct:>7} {s.accuracy:>8.1%}  "
                     f"{f'[{lo:.1%}, {hi:.1%}]':<16} {s.tokens / per:>14.0f} {s.seconds / per:>9.2f}")
    return "\n".join(lines)
