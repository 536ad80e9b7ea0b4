"""Graders: OpenAI's grader shapes (string_check, text_similarity, score_model, multi) as reward functions.

A grader is declared data, never code from the client: `models.py` holds the request shapes (the same JSON
OpenAI's fine-tuning API takes under `method.reinforcement.grader`), `rewards.py` turns them into TRL reward
functions (`reward_func(prompts, completions, **columns) -> list[float]`), templates (`{{ item.answer }}`,
`{{ sample.output_text }}`) are rendered by a sandboxed, size-bounded engine (`templates.py`), score_model
graders run a local model (`scorer.py`), and `openai_method.py` maps OpenAI's reinforcement `method`.
"""

from .models import (Grader, GraderList, MultiGrader, PythonGrader, ScoreModelGrader, StringCheckGrader,
                     TextSimilarityGrader)
from .openai_method import openai_method_to_graders
from .rewards import (check_graders, grade, make_sample, parse_graders, resolve_models, reward_functions,
                      score_models)

__all__ = ["Grader", "GraderList", "MultiGrader", "PythonGrader", "ScoreModelGrader", "StringCheckGrader",
           "TextSimilarityGrader", "check_graders", "grade", "make_sample", "openai_method_to_graders",
           "parse_graders", "resolve_models", "reward_functions", "score_models"]
