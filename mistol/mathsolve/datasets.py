"""Math problems: reading data sets (JSON Lines) and generating new ones offline.

Formats, told apart record by record:
- GSM8K: {"question", "answer": "...reasoning...\\n#### 72"};
- MATH / PRM800K splits: {"problem", "answer"} or {"problem", "solution": "...\\boxed{...}"};
  PRM800K's labelled files, {"question": {"problem", "ground_truth_answer"}, ...}, also read;
- mistol's own (`mistol math --generate`): {"id", "question", "answer", "kind", "source"}.

A problem's `id` is the record's `id` (or `unique_id`), else its line number in the file.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import MistolError
from .answers import reference_answer


@dataclass
class Problem:
    id: str
    question: str
    reference: str


def load_problems(path: str | Path, limit: int | None = None) -> list[Problem]:
    """The problems of a .jsonl file (a .json file holding a list works too)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MistolError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise MistolError(f"{path}: cannot read it as UTF-8 text ({e})") from None
    problems = []
    for number, record in _records(path, text):
        problems.append(_problem(path, number, record))
        if limit is not None and len(problems) >= limit:
            break
    if not problems:
        raise MistolError(f"{path}: no problems in it (expected JSON Lines with 'question' or 'problem')")
    return problems


def _records(path: Path, text: str) -> Iterator[tuple[int, dict]]:
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            yield from enumerate(json.loads(text), 1)
        except json.JSONDecodeError as e:
            raise MistolError(f"{path}: not valid JSON ({e})") from None
        return
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as e:
            raise MistolError(f"{path}:{number}: not a JSON object ({e.msg})") from None


def _problem(path: Path, number: int, record) -> Problem:
    if not isinstance(record, dict):
        raise MistolError(f"{path}:{number}: expected a JSON object, found {type(record).__name__}")
    inner = record["question"] if isinstance(record.get("question"), dict) else record
    question = inner.get("question") or inner.get("problem")
    if not isinstance(question, str) or not question.strip():
        raise MistolError(f"{path}:{number}: no 'question' or 'problem' text (keys: {', '.join(record)})")
    reference = reference_answer(record)
    if reference is None:
        raise MistolError(f"{path}:{number}: no reference answer ('answer' ending in '#### N', "
                          f"'answer', or a 'solution' with \\boxed{{}})")
    ident = record.get("id", record.get("unique_id"))
    return Problem(str(ident) if ident is not None else f"line{number}", question.strip(), reference)


# -- generating ----------------------------------------------------------------------------
GENERATORS = ("arithmetic", "gsm-symbolic")


def generate(kind: str, n: int, seed: int) -> list[dict]:
    if kind == "arithmetic":
        return generate_arithmetic(n, seed)
    if kind == "gsm-symbolic":
        return generate_gsm_symbolic(n, seed)
    raise MistolError(f"--generate {kind}: unknown kind (choose from {', '.join(GENERATORS)})")


def generate_arithmetic(n: int, seed: int) -> list[dict]:
    """The demo model's kind of problem (mistol/demo_problems.py), without the greetings."""
    from ..demo_problems import make_problem

    rng = random.Random(seed)
    records = []
    while len(records) < n:
        p = make_problem(rng)
        if p.kind == "greeting":
            continue
        records.append({"id": f"arithmetic-{seed}-{len(records)}", "question": p.question, "answer": p.answer,
                        "kind": p.kind, "source": "mistol arithmetic"})
    return records


def generate_gsm_symbolic(n: int, seed: int) -> list[dict]:
    """Grade-school word problems from templates (Mirzadeh et al. 2024, "GSM-Symbolic"), as
    implemented by the reasoning-gym package: generated locally, no download."""
    try:
        import reasoning_gym
    except ImportError:
        raise MistolError("--generate gsm-symbolic needs reasoning-gym: pip install 'mistol[math]' "
                          "(or pip install reasoning-gym)") from None
    dataset = reasoning_gym.create_dataset("gsm_symbolic", size=n, seed=seed)
    return [{"id": f"gsm-symbolic-{seed}-{i}", "question": item["question"], "answer": str(item["answer"]),
             "source": "reasoning-gym gsm_symbolic"} for i, item in enumerate(dataset)]
