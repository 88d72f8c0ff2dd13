"""`mistol math`: answers, grading, the step judge, resuming, and the demo model end to end.

What a tiny random model cannot show: that the judge gives a wrong step a lower probability
than a right one (that needs real weights: OpenHermes judging PRM800K-style steps). With a
random model the tests check the plumbing exactly: the probability is read from the engine's
logits after the judge prompt (the same as a fresh forward pass), step k's score depends on
steps 1..k only, a solution's score is the product of its steps', the judge's session reuses
the prompt it shares between steps, and the choice follows the ranking rules.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch

from mistol.cli import main
from mistol.engine import Engine
from mistol.hub import DEMO_MODEL
from mistol.llm import LocalLLM
from mistol.mathsolve.answers import extract_answer, is_equivalent, parse_answer, reference_answer
from mistol.mathsolve.datasets import generate_arithmetic, load_problems
from mistol.mathsolve.evaluate import evaluate, read_records, wilson_interval
from mistol.mathsolve.strategies import Attempt, Strategy, best_solution, majority
from mistol.mathsolve.verify import StepScorer, judge_messages, solution_score, split_steps
from mistol.sampling import SamplingParams
from mistol.sandbox.code_turn import CodeOptions, CodeRunner

# -- grading -------------------------------------------------------------------------------
GRADER_CASES = [
    # (predicted, reference, equivalent?)
    ("1/2", "0.5", True),
    ("0.5", "\\frac{1}{2}", True),
    ("\\frac{1}{2}", "1/2", True),
    ("\\dfrac{3}{4}", "0.75", True),
    ("\\tfrac{3}{4}", "3/4", True),
    ("\\frac12", "0.5", True),
    ("\\frac{1}2", "1/2", True),
    ("2/4", "1/2", True),
    ("\\boxed{\\frac{1}{2}}", "1/2", True),
    ("\\boxed{5}", "5", True),
    ("$1,234.00", "1234", True),
    ("\\$1,234", "1234", True),
    ("1,000,000", "10^6", True),
    ("10{,}000", "10000", True),
    ("$12.50", "12.5", True),
    ("12 dollars", "12", True),
    ("3/4 of the pie", "0.75", True),
    ("3/4 of the pie", "3/5", False),
    ("-5", "-5", True),
    ("−5", "-5", True),
    ("-5", "5", False),
    ("7", "-7", False),
    ("x = 2 or x = 3", "[2, 3]", True),
    ("x = 3 or x = 2", "[2, 3]", True),
    ("x=2, x=3", "2, 3", True),
    ("x = 2", "[2, 3]", False),
    ("x = 2 or x = 3 or x = 4", "[2, 3]", False),
    ("\\{1, 2\\}", "[2, 1]", True),
    ("[2]", "2", True),
    ("x = -4", "-4", True),
    ("y = 2x + 3", "3 + 2x", True),
    ("(1, 2)", "(1,2)", True),
    ("(2, 1)", "(1,2)", False),
    ("\\left(3, 4\\right)", "(3,4)", True),
    ("(1, 2]", "(1,2]", True),
    ("50%", "50", True),
    ("50%", "0.5", True),
    ("25\\%", "25", True),
    ("12.5 percent", "12.5", True),
    ("40%", "0.5", False),
    ("5 cm", "5", True),
    ("5\\text{ cm}", "5", True),
    ("5 \\text{cm}^2", "5", True),
    ("5\\mathrm{cm}", "5", True),
    ("\\textbf{(B)}", "B", True),
    ("12 apples.", "12", True),
    ("about 12", "12", True),
    ("30^\\circ", "30", True),
    ("30^{\\circ}", "30", True),
    ("30°", "30", True),
    ("30 degrees", "30", True),
    ("2\\sqrt{3}", "\\sqrt{12}", True),
    ("\\frac{\\sqrt{3}}{2}", "\\sqrt3/2", True),
    ("\\sqrt[3]{8}", "2", True),
    ("\\pi", "pi", True),
    ("2\\pi", "6.283185307179586", True),
    ("3.14", "\\pi", False),
    ("x^2+1", "1+x^2", True),
    ("(x+1)^2", "x^2+2x+1", True),
    ("18", "18.0", True),
    ("18.00", "18", True),
    ("0.333", "1/3", False),
    ("\\text{(C)}", "C", True),
    ("D", "C", False),
    ("Evelyn", "\\text{Evelyn}", True),
    ("Evelyn", "Emily", False),
    ("9**9**9**9", "5", False),  # too big to evaluate: compared as text, quickly
    ("__import__('os').getcwd()", "5", False),  # never evaluated
    ("3+4i", "4i+3", True),
    ("\\infty", "oo", True),
    (None, "5", False),
    ("", "5", False),
]


@pytest.mark.parametrize("predicted, reference, expected", GRADER_CASES)
def test_grader(predicted, reference, expected):
    assert is_equivalent(predicted, reference) is expected


EXTRACTION_CASES = [
    ("Let me compute.\n```python\nprint(37 * 48)\n```\nOutput:\n```\n1776\n```\nThe answer is 1776.", "1776"),
    ("```python\nprint(sorted({2, 3}))\n```\nOutput:\n```\n[2, 3]\n```\nx = 2 or x = 3.", "x = 2 or x = 3"),
    ("```python\nprint(5)\n```\nOutput:\n```\n5\n```\n", "5"),  # no sentence: what the code printed
    ("So the total is $\\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}"),
    ("First \\boxed{3}, no wait: \\boxed{4}.", "4"),
    ("Natalia sold 48/2 = 24 clips in May.\nShe sold 48+24 = 72 clips.\n#### 72", "72"),
    ("The answer is 3.5.", "3.5"),
    ("The answer is: $1,234.00. Thanks for asking.", "$1,234.00"),
    ("The answer is 3/4 of the pie.", "3/4 of the pie"),
    ("To answer this, 2+2=4. So we get 4", "4"),
    ("Final Answer: The final answer is 7. I hope it is correct.", "7"),
    ("The answer is -12.", "-12"),
    ("Step 1: 6 * 7 = 42\nStep 2: 42 - 2 = 40", "40"),
    ("I don't know.", None),
]


@pytest.mark.parametrize("reply, expected", EXTRACTION_CASES)
def test_extract_answer(reply, expected):
    assert extract_answer(reply) == expected


def test_reference_answers_of_each_format():
    assert reference_answer({"question": "q", "answer": "48/2 = 24\n#### 1,234"}) == "1,234"
    assert reference_answer({"problem": "p", "answer": "\\frac{1}{2}"}) == "\\frac{1}{2}"
    assert reference_answer({"problem": "p", "solution": "so $\\boxed{\\frac{\\sqrt{3}}{2}}$."}) == "\\frac{\\sqrt{3}}{2}"
    assert reference_answer({"question": {"problem": "p", "ground_truth_answer": "7"}}) == "7"
    assert reference_answer({"question": "q", "answer": 42}) == "42"


def test_answers_read_as_sets_tuples_and_values():
    assert parse_answer("x = 2 or x = 3").kind == "set"
    assert parse_answer("(1, 2)").kind == "tuple"
    assert parse_answer("\\frac{1}{2}").kind == "value"
    assert parse_answer("Evelyn").kind == "text"


def test_load_problems_of_every_format(tmp_path):
    f = tmp_path / "mixed.jsonl"
    lines = [
        {"question": "Natalia sold 48 clips...", "answer": "She sold 72.\n#### 72"},
        {"problem": "What is $\\frac{1}{2}+\\frac{1}{4}$?", "solution": "It is $\\boxed{\\frac{3}{4}}$.",
         "unique_id": "test/algebra/1.json"},
        {"problem": "Compute 2+2.", "answer": "4"},
        {"question": {"problem": "Compute 3+3.", "ground_truth_answer": "6"}, "label": {}},
        generate_arithmetic(1, seed=5)[0],
    ]
    f.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    problems = load_problems(f)
    assert [p.reference for p in problems] == ["72", "\\frac{3}{4}", "4", "6", lines[4]["answer"]]
    assert [p.id for p in problems[:3]] == ["line1", "test/algebra/1.json", "line3"]
    assert problems[4].id == "arithmetic-5-0"
    assert len(load_problems(f, limit=2)) == 2


def test_generated_arithmetic_is_reproducible_and_self_consistent():
    a, b = generate_arithmetic(50, seed=1), generate_arithmetic(50, seed=1)
    assert a == b and len(a) == 50 and a != generate_arithmetic(50, seed=2)
    assert all(r["kind"] != "greeting" for r in a)
    # the demo model's own final sentences grade as correct against the references
    from mistol.demo_problems import make_problem

    rng = random.Random(1)
    for record in a:
        p = make_problem(rng)
        while p.kind == "greeting":
            p = make_problem(rng)
        assert p.question == record["question"]
        assert is_equivalent(extract_answer(p.final), record["answer"]), (p.final, record["answer"])


def test_gsm_symbolic_generates_offline():
    pytest.importorskip("reasoning_gym")
    from mistol.mathsolve.datasets import generate_gsm_symbolic

    records = generate_gsm_symbolic(3, seed=1)
    assert len(records) == 3 and all(r["question"] and r["answer"] for r in records)
    assert records == generate_gsm_symbolic(3, seed=1)


def test_wilson_interval():
    lo, hi = wilson_interval(19, 20)
    assert lo == pytest.approx(0.7639, abs=1e-4) and hi == pytest.approx(0.9911, abs=1e-4)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(0, 10)[1] == pytest.approx(0.2775, abs=1e-4)
    assert wilson_interval(50, 100) == pytest.approx((0.4038, 0.5962), abs=1e-4)


def test_majority_counts_equal_answers_together():
    votes = majority(["1/2", "0.5", "3", None, "\\frac{1}{2}", "3"])
    assert votes[0][1] == 3 and is_equivalent(votes[0][0], "0.5")
    assert votes[1] == ("3", 2)
    assert majority(["4", "5"])[0][0] == "4"  # a tie goes to the answer reached first
    assert majority([None, None]) == []


# -- the step judge ----------------------------------------------------------------------------
RIGHT = "Each box holds 12 eggs.\n3 boxes hold 3 * 12 = 36 eggs.\n36 - 5 = 31 eggs are left.\nThe answer is 31."
WRONG = "Each box holds 12 eggs.\n3 boxes hold 3 * 12 = 38 eggs.\n38 - 5 = 33 eggs are left.\nThe answer is 33."
QUESTION = "A box holds 12 eggs. I buy 3 boxes and break 5 eggs. How many eggs are left?"


def test_split_steps_keeps_code_with_its_output():
    reply = "Let me compute.\n```python\nx = 37\nprint(x * 48)\n```\nOutput:\n```\n1776\n```\nThe answer is 1776."
    assert split_steps(reply) == ["Let me compute.", "```python\nx = 37\nprint(x * 48)\n```\nOutput:\n```\n1776\n```",
                                  "The answer is 1776."]
    assert split_steps(RIGHT) == RIGHT.split("\n")
    assert split_steps("\n\n  one  \n\n two\n") == ["one", "two"]


@pytest.fixture(scope="module")
def tiny_llm(mistral_dir):
    return LocalLLM(Engine.load(mistral_dir, dtype="f32"))


def test_step_probability_is_yes_against_no_from_the_engines_logits(tiny_llm):
    scorer = StepScorer(tiny_llm)
    steps = split_steps(WRONG)
    p = scorer.step_probability(QUESTION, steps[:2])
    # the same number from a fresh session and a full forward pass
    prompt = tiny_llm.template.render(judge_messages(QUESTION, steps[:2]))
    logits = tiny_llm.engine.new_session().feed(prompt)
    yes, no = scorer.word_ids(prompt)
    tok = tiny_llm.engine.tokenizer
    assert {tok.decode([i]).strip() for i in yes} <= {"Yes", "yes"} and {tok.decode([i]).strip() for i in no} <= {"No", "no"}
    assert not set(yes) & set(no)
    expected = torch.logsumexp(logits[yes], 0).exp() / (torch.logsumexp(logits[yes], 0).exp() + torch.logsumexp(logits[no], 0).exp())
    assert 0.0 < p < 1.0 and p == pytest.approx(float(expected), rel=1e-5)


def test_solution_score_is_the_product_of_its_steps(tiny_llm):
    scorer = StepScorer(tiny_llm)
    right = split_steps(RIGHT)
    before = scorer.tokens_run
    scores = scorer.score_steps(QUESTION, right)
    ran = scorer.tokens_run - before
    assert len(scores) == len(right) == 4 and all(0 < p < 1 for p in scores)
    assert solution_score(scores) == pytest.approx(math.prod(scores))
    assert solution_score(scores) <= min(scores)
    # The judge's prompts share their beginning: far fewer tokens run than four whole prompts.
    whole = sum(len(tiny_llm.template.render(judge_messages(QUESTION, right[: k + 1]))) for k in range(4))
    assert ran < 0.6 * whole


def test_a_step_is_judged_on_the_steps_up_to_it(llama_dir):
    # mistral_dir's sliding window (8 tokens, 2 layers) sees only the end of the judge's
    # question, so its scores cannot depend on the steps at all: llama_dir has no window.
    scorer = StepScorer(LocalLLM(Engine.load(llama_dir, dtype="f32")))
    right_scores = scorer.score_steps(QUESTION, split_steps(RIGHT))
    wrong_scores = scorer.score_steps(QUESTION, split_steps(WRONG))
    # Step 1 is the same in both solutions, and its score cannot see what comes after it.
    assert wrong_scores[0] == pytest.approx(right_scores[0], rel=1e-5)
    # From the wrong step (step 2) on, the judge reads other text.
    assert all(w != pytest.approx(r, rel=1e-4) for w, r in zip(wrong_scores[1:], right_scores[1:]))


def test_ranking_prefers_the_best_score_then_a_code_checked_answer():
    def attempt(answer, score, checked=False):
        return Attempt("", answer, score=score, code_checked=checked)

    assert best_solution([attempt("1", 0.2), attempt("2", 0.5), attempt("3", 0.4, True)]) == 1
    assert best_solution([attempt("1", 0.5), attempt("2", 0.5, True), attempt("3", 0.5)]) == 1  # a tie: code decides
    assert best_solution([attempt("1", 0.5), attempt("2", 0.5)]) == 0  # a tie without code: the earliest
    assert best_solution([attempt(None, 0.9), attempt("2", 0.1)]) == 1  # no answer, no choice
    assert best_solution([attempt(None, None)]) is None


class ScriptedLLM:
    """The model's text, scripted (a random model writes neither code nor answers); the judge
    and the sandbox are real."""

    def __init__(self, local: LocalLLM, replies: list[str]):
        self.engine, self.template = local.engine, local.template
        self.replies = list(replies)
        self.last = None
        self.dropped = 0

    def chat(self, messages, params, continue_last=False):
        text = self.replies.pop(0)
        for i in range(0, len(text), 4):
            yield text[i : i + 4]


def test_verify_runs_the_code_scores_every_solution_and_picks_the_best(tiny_llm):
    code = "```python\nprint(3 * 12 - 5)\n```"
    replies = [RIGHT, WRONG, code, "The answer is 31."]  # the third solution ran code, whose output checks it
    llm = ScriptedLLM(tiny_llm, replies)
    runner = CodeRunner(CodeOptions(auto_yes=True), ask=None, notice=lambda text: None)
    try:
        strategy = Strategy("verify", llm, SamplingParams(temperature=0.7), runner, samples=3, scorer=StepScorer(llm))
        outcome = strategy.solve(QUESTION, seed=1)
    finally:
        runner.close()
    right, wrong, coded = outcome.attempts
    assert [a.answer for a in outcome.attempts] == ["31", "33", "31"]
    assert coded.runs == [("print(3 * 12 - 5)", "31\n")] and coded.code_checked and not right.code_checked
    assert coded.text.endswith("Output:\n```\n31\n```\nThe answer is 31.")
    assert len(coded.step_scores) == 2 and len(right.step_scores) == 4
    for a in outcome.attempts:
        assert a.score == pytest.approx(math.prod(a.step_scores))
    assert outcome.chosen_index == max(range(3), key=lambda i: outcome.attempts[i].score)
    assert outcome.chosen == outcome.attempts[outcome.chosen_index].answer
    assert outcome.judge_tokens > 0


def test_verify_is_refused_over_an_api(capsys):
    assert main(["math", "--api", "http://127.0.0.1:9/v1", "--strategy", "code,verify", "What is 2+2?"]) == 1
    assert "not available with --api" in capsys.readouterr().err


def test_vote_needs_a_temperature(mistral_dir, capsys):
    assert main(["math", "--model", str(mistral_dir), "--strategy", "vote", "-t", "0", "What is 2+2?"]) == 1
    assert "--temperature > 0" in capsys.readouterr().err


# -- evaluating and resuming ----------------------------------------------------------------------
def write_problems(path: Path, n: int, seed: int) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in generate_arithmetic(n, seed)))
    return path


def test_an_interrupted_run_resumes_without_redoing_problems(mistral_dir, tmp_path, capsys):
    data = write_problems(tmp_path / "problems.jsonl", 6, seed=3)
    out = tmp_path / "results.jsonl"
    problems = load_problems(data)
    # An earlier run stopped after three problems, in the middle of writing the fourth record.
    earlier = [{"id": p.id, "strategy": "cot", "question": p.question, "reference": p.reference, "answers": [p.reference],
                "chosen": p.reference, "correct": True, "tokens": 9, "seconds": 0.5} for p in problems[:3]]
    out.write_text("".join(json.dumps(r) + "\n" for r in earlier) + '{"id": "arithmetic-3-3", "strat')

    llm = LocalLLM(Engine.load(mistral_dir, dtype="f32"))
    asked = []
    chat = llm.chat
    llm.chat = lambda messages, *a, **k: (asked.append(messages[1]["content"]), chat(messages, *a, **k))[1]
    strategy = Strategy("cot", llm, SamplingParams(temperature=0, max_tokens=4))
    summaries = evaluate(problems, [strategy], out=out, progress=False)

    assert asked == [p.question for p in problems[3:]]  # only the three not done
    records = read_records(out)
    assert records[:3] == earlier
    assert [r["id"] for r in records[3:]] == [p.id for p in problems[3:]]
    assert all(set(r) >= {"question", "reference", "answers", "chosen", "correct", "tokens", "seconds"} for r in records)
    assert summaries["cot"].n == 6 and summaries["cot"].correct >= 3  # the resumed ones count

    # The same command again: nothing left to do, the file unchanged, the table printed.
    before = out.read_text()
    argv = ["math", "--model", str(mistral_dir), "--data", str(data), "--strategy", "cot", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    assert out.read_text() == before
    table = capsys.readouterr().out
    assert "cot" in table and "95% CI" in table and " 6 " in table

    # A results file from another data set is refused rather than mixed in.
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps({**r, "question": r["question"] + " Show your work."}) + "\n"
                             for r in generate_arithmetic(6, seed=3)))
    assert main(["math", "--model", str(mistral_dir), "--data", str(other), "--strategy", "cot", "--out", str(out), "--quiet"]) == 1
    assert "another data set" in capsys.readouterr().err


def test_a_results_file_that_stops_fitting_on_the_disk_ends_the_run_in_one_line_and_resumes(mistral_dir, tmp_path):
    """The disk fills mid-run (a file-size limit: writes past it fail as on a full disk): one
    line, exit 1, the records before kept; with room again the same command does the rest."""
    import os
    import resource
    import subprocess
    import sys

    data = write_problems(tmp_path / "problems.jsonl", 6, seed=3)
    out = tmp_path / "results.jsonl"
    argv = [sys.executable, "-m", "mistol", "math", "--model", str(mistral_dir), "--data", str(data), "--strategy", "cot",
            "--max-tokens", "4", "--out", str(out), "--quiet"]
    full = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=os.environ,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (900, 900)))
    assert full.returncode == 1 and "Traceback" not in full.stderr, full.stderr
    (line,) = full.stderr.strip().splitlines()
    assert f"cannot write to {out}: File too large" in line and "run the same command again" in line
    kept = read_records(out)
    assert 0 < len(kept) < 6 and out.stat().st_size == 900
    again = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=os.environ)
    assert again.returncode == 0 and "Traceback" not in again.stderr, again.stderr
    records = read_records(out)
    assert records[:len(kept)] == kept and sorted(r["id"] for r in records) == sorted(p.id for p in load_problems(data))


# -- the demo model, end to end --------------------------------------------------------------------
@pytest.fixture
def one_thread():
    """The demo model is tiny: one thread runs it as fast, and far faster on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


needs_demo = pytest.mark.skipif(not (DEMO_MODEL / "config.json").is_file(),
                                reason="the demo model is not built (python scripts/train_demo.py writes mistol/demo_model/)")


@needs_demo
@pytest.mark.slow
def test_demo_code_strategy(tmp_path, capsys, one_thread):
    data = write_problems(tmp_path / "problems.jsonl", 20, seed=11)
    out = tmp_path / "results.jsonl"
    assert main(["math", "--model", "demo", "--data", str(data), "--strategy", "code", "--out", str(out), "--quiet"]) == 0
    records = read_records(out)
    assert len(records) == 20
    accuracy = sum(r["correct"] for r in records) / 20
    wrong = [(r["question"], r["reference"], r["chosen"]) for r in records if not r["correct"]]
    assert accuracy >= 0.9, wrong
    assert all(r["code_checked"] for r in records if r["correct"])  # each answer came from its code's output
    assert "code" in capsys.readouterr().out


@needs_demo
@pytest.mark.slow
def test_demo_vote_and_verify_print_their_table(tmp_path, capsys, one_thread):
    data = write_problems(tmp_path / "problems.jsonl", 3, seed=12)
    out = tmp_path / "results.jsonl"
    argv = ["math", "--model", "demo", "--data", str(data), "--strategy", "vote,verify", "--samples", "3", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    table = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split() for line in table if line.split() and line.split()[0] in ("vote", "verify")}
    assert set(rows) == {"vote", "verify"} and rows["vote"][1] == rows["verify"][1] == "3"
    records = read_records(out)
    assert len(records) == 6
    for r in records:
        assert len(r["answers"]) == 3
    assert all(len(r["scores"]) == 3 for r in records if r["strategy"] == "verify")


@needs_demo
def test_demo_solves_one_question(capsys, one_thread):
    assert main(["math", "--model", "demo", "Solve x^2 - 5x + 6 = 0"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("```python\n") and "\nOutput:\n```\n" in out  # the reasoning, the code and its output
    last = out.rstrip().splitlines()[-1]
    assert last.startswith("Answer: ")
    printed = out.split("\nOutput:\n```\n")[1].split("\n```")[0]
    assert is_equivalent(last.removeprefix("Answer: "), printed)  # the answer its code printed
