"""How often PocketSphinx with the arithmetic grammar hears an espeak-ng question exactly.

    python scripts/eval_voice.py                     # 50 questions at 130 and 175 words/minute
    python scripts/eval_voice.py -n 20 --wpm 175 -v  # fewer, one rate, each miss printed

The questions are generated (seeded) in the phrasings the grammar covers: with or without
"what is / what's / compute / calculate / how much is", numbers from 0 to 9999 written as
digits or as words, every operator. Each is synthesized by espeak-ng (mistol.voice.tts),
recognized in file mode (PocketSphinxSTT.transcribe) and compared with the sentence the
recognizer should write ("what is twelve times thirteen" -> "What is 12 times 13?").
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mistol.voice.stt import as_sentence, words_to_numbers  # noqa: E402

PREFIXES = ["what is", "what's", "compute", "calculate", "how much is", ""]
OPERATORS = ["plus", "minus", "times", "multiplied by", "divided by", "to the power of", "modulo", "mod"]
_ONES = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen " \
        "sixteen seventeen eighteen nineteen".split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def number_words(n: int) -> str:
    """0..9999 as the grammar says them: 4821 -> "four thousand eight hundred twenty one"."""
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else " " + _ONES[n % 10])
    if n < 1000:
        return _ONES[n // 100] + " hundred" + ("" if n % 100 == 0 else " " + number_words(n % 100))
    return number_words(n // 1000) + " thousand" + ("" if n % 1000 == 0 else " " + number_words(n % 1000))


def random_number(rng: random.Random) -> int:
    size = rng.choice(["digit", "teen", "tens", "hundreds", "thousands"])
    return {"digit": lambda: rng.randint(0, 9), "teen": lambda: rng.randint(10, 19),
            "tens": lambda: rng.randint(20, 99), "hundreds": lambda: rng.randint(100, 999),
            "thousands": lambda: rng.randint(1000, 9999)}[size]()


def questions(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """(text given to espeak-ng, transcript expected) pairs."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prefix, op = rng.choice(PREFIXES), rng.choice(OPERATORS)
        a, b = random_number(rng), random_number(rng)
        words = " ".join(w for w in (prefix, number_words(a), op, number_words(b)) if w)
        if rng.random() < 0.5:  # the numbers as digits: espeak-ng reads them out itself
            spoken = " ".join(w for w in (prefix, str(a), op, str(b)) if w)
        else:
            spoken = words
        out.append((spoken, as_sentence(words_to_numbers(words))))
    return out


def measure(stt, items: list[tuple[str, str]], wpm: int, verbose: bool = False) -> float:
    """The share of `items` transcribed exactly at `wpm` words per minute."""
    from mistol.voice.tts import EspeakTTS

    tts = EspeakTTS("en-us", wpm)
    right = 0
    for i, (spoken, expected) in enumerate(items):
        heard = stt.transcribe(tts.synthesize(spoken))
        right += heard == expected
        if verbose and heard != expected:
            print(f"  {wpm} wpm: #{i} {spoken!r}: heard {heard!r}, expected {expected!r}", flush=True)
    return right / len(items)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-n", type=int, default=50, help="questions (default 50)")
    p.add_argument("--wpm", type=int, nargs="+", default=[130, 175], help="espeak-ng rates (default 130 175)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--grammar", default="arithmetic", help="a built-in grammar or a JSGF file")
    p.add_argument("-v", "--verbose", action="store_true", help="print each miss")
    args = p.parse_args()

    from mistol.voice.stt import PocketSphinxSTT

    stt = PocketSphinxSTT(args.grammar)
    items = questions(args.n, args.seed)
    for wpm in args.wpm:
        t0 = time.perf_counter()
        rate = measure(stt, items, wpm, args.verbose)
        print(f"{wpm} wpm: {rate:.0%} exact ({round(rate * len(items))}/{len(items)}, "
              f"{time.perf_counter() - t0:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
