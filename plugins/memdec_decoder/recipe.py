"""The recipe that fills a memory's training settings left at ``auto``.

A recipe is keyed by the size of the model the memory starts from (its init):

- ``whole``: an init of at most ``CUT_ABOVE`` parameters (the demo family's -s, GPT-2 small) is
  small enough to be the memory as it is: all its blocks, lr 1e-3, the paper's T = 16,
  3 epochs of 8 windows per step.
- ``cut``: a larger init (Qwen2.5-0.5B, SmolLM2-135M) is cut to its first blocks, keeping its
  embedding rows (and, above 32k tokens, only those of the datastore's tokens), and the kNN
  temperature is tuned on the teacher's kNN-LM (squared-L2 distances of real models' hidden
  states are in the hundreds, where T = 16 makes every target one-hot). Its numbers are the
  recipe study's best (benchmarks/memory_recipes.py, benchmarks/RESULTS.md "Memory recipes").

Every setting the user gives wins over the recipe's, one by one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from memdec_core.errors import ConfigError

#: Inits larger than this are cut to their first blocks by the ``auto`` recipe.
CUT_ABOVE = 100_000_000
AUTO = "auto"
TUNED = "tuned"


@dataclass(frozen=True)
class Recipe:
    """Values for the settings a user left at ``auto``."""

    name: str
    init_layers: int  # 0: every block
    lr: float
    temperature: float | str  # a number, or TUNED: the T the teacher's kNN-LM picks on validation
    epochs: int
    batch_size: int

    def describe(self) -> str:
        blocks = "every block" if not self.init_layers else f"the first {self.init_layers} blocks"
        temperature = "T tuned" if self.temperature == TUNED else f"T = {self.temperature:g}"
        return (f"{self.name}: {blocks} of the init, lr {self.lr:g}, {temperature}, {self.epochs} epochs "
                f"of {self.batch_size} windows a step")


RECIPES = {
    "whole": Recipe("whole", init_layers=0, lr=1e-3, temperature=16.0, epochs=3, batch_size=8),
    "cut": Recipe("cut", init_layers=2, lr=5e-4, temperature=TUNED, epochs=4, batch_size=2),
}

#: The settings a recipe fills; each may be given explicitly instead.
RECIPE_SETTINGS = ("init_layers", "lr", "temperature", "epochs", "batch_size")


def recipe_for(choice: str, init_parameters: int) -> Recipe:
    """The recipe ``choice`` names, or for ``auto`` the one for an init of this size."""
    check_recipe_name(choice)
    if choice == AUTO:
        return RECIPES["cut" if init_parameters > CUT_ABOVE else "whole"]
    return RECIPES[choice]


def check_recipe_name(choice: str) -> None:
    if choice != AUTO and choice not in RECIPES:
        raise ConfigError(f"recipe must be auto or one of {', '.join(RECIPES)}, got {choice!r}")


def apply_recipe(config, recipe: Recipe):
    """``config`` with every setting left at ``auto`` taken from ``recipe``, and ``recipe`` set to
    its name. A tuned temperature becomes ``tune_temperature``."""
    values = {name: getattr(recipe, name) for name in RECIPE_SETTINGS if getattr(config, name) == AUTO}
    if values.get("temperature") == TUNED:
        values.update(temperature=AUTO, tune_temperature=True)
    return dataclasses.replace(config, recipe=recipe.name, **values)


def number_or_auto(value, kind: type, label: str):
    """A setting that is a number of ``kind`` or ``auto`` (text from --set arrives as a string)."""
    if value == AUTO:
        return value
    if isinstance(value, bool):
        raise ConfigError(f"{label} must be a number or auto, got {value!r}")
    try:
        number = kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{label} must be {'an integer' if kind is int else 'a number'} or auto, "
                          f"got {value!r}") from None
    if kind is int and isinstance(value, float) and number != value:
        raise ConfigError(f"{label} must be an integer or auto, got {value!r}")
    return number
