"""The recipe programs of the documentation (docs/recipes/*.py) run and check themselves.

docs/recipes.md includes these files as they are, so they must keep working:
each runs as a program of its own (run_example of test_examples.py: its own
pool, no process or /dev/shm file left behind) and must print its result line.
"""

from __future__ import annotations

import os

import pytest
from helpers import REPO
from test_examples import run_example

RECIPES = os.path.join(REPO, "docs", "recipes")

EXPECTED = {
    "pool_methods.py": "Pool map/imap/starmap/apply_async: ok\n",
    "queue_and_pipe.py": "Queue and Pipe: ok\n",
    "manager_dict.py": "Manager dict: ok\n",
    "process_pool_executor.py": "".join(
        f"ProcessPoolExecutor ({m}): ok\n" for m in ("fork", "spawn", "forkserver")
    ),
    "joblib_loky.py": "joblib loky: ok\n",
    "copies.py": "copies: ok\n",
    "pandas_frames.py": "pandas: ok\n",
}


@pytest.mark.parametrize("recipe", sorted(EXPECTED))
def test_recipe(recipe):
    # pandas_frames.py needs pandas: PY_DEPS and NP1_DEPS install it in every
    # venv of the suite, so a missing pandas fails here rather than skips.
    assert run_example(os.path.join(RECIPES, recipe)) == EXPECTED[recipe]


def test_every_recipe_is_run_here():
    assert {f for f in os.listdir(RECIPES) if f.endswith(".py")} == set(EXPECTED)
