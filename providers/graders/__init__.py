"""Graders: OpenAI's grader shapes (string_check, text_similarity, score_model, multi) as reward functions.

A grader is declared data, never code from the client: `models.py` holds the request shapes (the same JSON
OpenAI's fine-tuning API takes under `method.reinforcement.grader`), `rewards.py` turns them into TRL reward
functions (`reward_func(prompts, completions, **columns) -> list[float]`), templates (`{{ item.answer }}`,
`{{ sample.output_text }}`) are rendered by a sandboxed, size-bounded engine (`templates.py`).
"""

from .models import Grader, GraderList, StringCheckGrader
from .rewards import check_graders, reward_functions

__all__ = ["Grader", "GraderList", "StringCheckGrader", "check_graders", "reward_functions"]
