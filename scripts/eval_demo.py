#!/usr/bin/env python3
"""Evaluate the demo model through the real chat code path: questions it never saw, greedy.

Each question is one `mistol chat` turn (ChatApp, LocalLLM, the code-block detector, the
sandbox with --yes), then /reset. A reply counts as correct when the sentence after the
code's output states the right answer.

    python scripts/eval_demo.py              # 200 questions, seed 2024 (training used 1234)
"""

from __future__ import annotations

import argparse
import contextlib
import io
import random
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mistol.chat.log import ChatLog  # noqa: E402
from mistol.chat.repl import ChatApp, ChatOptions  # noqa: E402
from mistol.demo_problems import make_problem  # noqa: E402
from mistol.engine import Engine  # noqa: E402
from mistol.llm import LocalLLM  # noqa: E402
from mistol.sampling import SamplingParams  # noqa: E402
from mistol.sandbox.code_turn import CODE_SYSTEM_PROMPT, CodeOptions, CodeRunner  # noqa: E402


def is_correct(problem, reply: str) -> bool:
    if problem.code is None:
        return problem.final in reply
    if "\nOutput:\n```\n" not in reply:
        return False
    after_output = reply.rsplit("```\n", 1)[-1]
    return problem.final.rstrip(".") in after_output


def evaluate(model: str, n: int, seed: int, log_dir: Path, verbose: bool = False) -> float:
    engine = Engine.load(model)
    rng = random.Random(seed)
    runner = CodeRunner(CodeOptions(auto_yes=True), ask=None, notice=lambda text: None)
    log = ChatLog.create(log_dir)
    messages = [{"role": "system", "content": CODE_SYSTEM_PROMPT}]
    app = ChatApp(LocalLLM(engine), SamplingParams(temperature=0, max_tokens=200), log, messages,
                  ChatOptions(interactive=False), runner)
    right, by_kind, wrong_kind = 0, Counter(), Counter()
    start = time.time()
    try:
        for i in range(n):
            problem = make_problem(rng)
            with contextlib.redirect_stdout(io.StringIO()):
                app.user_turn(problem.question)
            reply = app.messages[-1]["content"]
            ok = is_correct(problem, reply)
            right += ok
            by_kind[problem.kind] += 1
            wrong_kind[problem.kind] += not ok
            if verbose or not ok:
                print(f"{'ok ' if ok else 'BAD'} {problem.question!r} -> {reply!r}", file=sys.stderr)
            app.command("/reset")
    finally:
        runner.close()
        log.close()
    accuracy = right / n
    print(f"demo model: {right}/{n} correct = {accuracy:.1%} ({time.time() - start:.0f} s)")
    for kind in sorted(by_kind):
        print(f"  {kind:10s} {by_kind[kind] - wrong_kind[kind]:3d}/{by_kind[kind]}")
    return accuracy


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="demo")
    p.add_argument("-n", type=int, default=200)
    p.add_argument("--seed", type=int, default=2024)
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    import tempfile

    with tempfile.TemporaryDirectory() as logs:
        evaluate(args.model, args.n, args.seed, Path(logs), args.verbose)


if __name__ == "__main__":
    main()
