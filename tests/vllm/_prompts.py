"""Deterministic prompts for the engine tests (token counts are SmolLM2's)."""

from __future__ import annotations

import random

_SUBJECTS = ["The river", "A quiet village", "The old library", "Our garden", "The harbour",
             "A mountain road", "The market square", "The train station", "An orchard",
             "The lighthouse"]
_VERBS = ["looked calm", "was busy", "felt warm", "seemed empty", "grew louder", "stayed dry",
          "turned golden", "was freshly painted", "smelled of bread", "filled with visitors"]
_TIMES = ["in the morning", "after the rain", "during the festival", "at dusk", "all week",
          "before winter", "on Sundays", "at noon", "last spring", "every evening"]


def filler(num_sentences: int, seed: int) -> str:
    """Plain, varied sentences with nothing worth retrieving."""
    rng = random.Random(seed)
    return " ".join(f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_TIMES)}."
                    for _ in range(num_sentences))


NEEDLE_KEY = "7294031"


def needle_messages(num_sentences: int = 240, depth: float = 0.5, seed: int = 0) -> list[dict]:
    """A haystack with one fact in it and a question about that fact (chat format)."""
    text = filler(num_sentences, seed).split(". ")
    at = int(len(text) * depth)
    needle = f"The secret number of the blue door is {NEEDLE_KEY}"
    body = ". ".join(text[:at] + [needle] + text[at:])
    question = "What is the secret number of the blue door? Answer with the number only."
    return [{"role": "user", "content": f"Read the text below.\n\n{body}\n\n{question}"}]
