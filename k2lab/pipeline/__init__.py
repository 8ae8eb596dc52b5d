"""`make run` / `k2lab demo`: the K2.6 recipe end to end (recipe.py), its settings per preset (presets.py), the
data and eval-set builders (builders.py), resumable stages (stages.py), evals through the server (evaluate.py)
and the report card (card.py)."""

from k2lab.pipeline.presets import PRESETS, Recipe, preset
from k2lab.pipeline.recipe import run_demo

__all__ = ["PRESETS", "Recipe", "preset", "run_demo"]
