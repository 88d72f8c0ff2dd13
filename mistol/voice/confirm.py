"""Asking aloud before code runs: the question, the words that count as an answer, and what
is said when the code was not run.

Only a clear yes runs code. With PocketSphinx the answer is recognized with the `yes_no`
grammar (mistol.voice.stt), which can only write one of the phrases below; faster-whisper
writes open text, so any word of refusal wins over a yes ("yes, no, wait" is a no), and
anything that is neither, silence, or a long utterance (speech the grammar forced onto a
short phrase) is not a yes.
"""

from __future__ import annotations

import re

QUESTION = "Shall I run it?"
NOT_RUN_DECLINED = "Okay, I did not run it. Say yes when I ask, or start mistol voice with --yes to run code without asking."
NOT_RUN_UNHEARD = ("I did not hear a yes, so I did not run it. Say yes when I ask, "
                   "or start mistol voice with --yes to run code without asking.")
ANSWER_TIMEOUT_S = 6.0  # of microphone audio with no speech after the question, before giving up
MAX_ANSWER_S = 3.5  # a longer utterance is not a yes or a no (the VAD pads 0.2 s on each side)

YES_PHRASES = ("yes", "yeah", "yep", "sure", "okay", "do it", "go ahead", "run it", "yes please", "please do")
NO_PHRASES = ("no", "nope", "don't", "do not", "cancel", "stop", "no thanks", "don't run it", "never mind", "wait")
_NO_WORDS = frozenset({"no", "nope", "don't", "dont", "not", "cancel", "stop", "never", "wait", "nah"})
# Everything else a person might say: without somewhere for it to go, a closed grammar puts
# "maybe later" on "please do" and "I am not sure" on "sure". None of these is a yes.
OTHER_WORDS = ("i am not maybe later what is how the and in that he she we they this hello hi hey thanks why "
               "when where which can could would should will three five six seven nine plus minus times um "
               "well let me think about so good bad fine right wrong first tell read again more less what's "
               "see").split()


def yes_no_grammar() -> str:
    """The JSGF grammar of the phrases above, and of any run of other words."""
    return ("#JSGF V1.0;\ngrammar yes_no;\npublic <answer> = /20/ <yes> | /20/ <no> | /1/ <other>;\n"
            f"<yes> = ({' | '.join(YES_PHRASES)})+;\n<no> = ({' | '.join(NO_PHRASES)})+;\n"
            f"<other> = ({' | '.join(OTHER_WORDS)})+;\n")


def is_clear_yes(transcript: str | None) -> bool:
    """True only for an answer made of yes phrases alone ("Yes.", "Sure, go ahead.")."""
    if not transcript:
        return False
    text = " ".join(re.findall(r"[a-z']+", transcript.lower().replace("’", "'")))
    if not text or _NO_WORDS.intersection(text.split()):
        return False
    phrases = "|".join(re.escape(p) for p in sorted(YES_PHRASES, key=len, reverse=True))
    return re.fullmatch(rf"(?:{phrases})(?: (?:{phrases}))*", text) is not None
