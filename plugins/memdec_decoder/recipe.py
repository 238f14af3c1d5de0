"""The recipe that fills a memory's training settings left at ``auto``.

A recipe is keyed by the size of the model the memory starts from (its init):

- ``whole``: an init of at most ``CUT_ABOVE`` parameters (the demo family's -s, GPT-2 small) is
  small enough to be the memory as it is: all its blocks, lr 1e-3, the paper's T = 16,
  3 epochs of 8 windows per step.
- ``cut``: a larger init (Qwen2.5-0.5B, SmolLM2-135M) is cut to its first blocks, keeping its
  embedding rows (and, above 32k tokens, only those of the datastore's tokens), and the kNN
  temperature is tuned on the teacher's kNN-LM (squared-L2 distances of real models' hidden
  states are in the hundreds, where T = 16 makes every target one-hot). Its numbers are the
  recipe study's best (benchmarks/memory_recipes.py, benchmarks/RESULTS.md "Memory recipes"). Its
  length is counted in optimizer steps of 1,024 tokens, not in epochs: with windows of 1,024 and
  4 epochs of a 32k-token slice, a memory got 64 steps and stayed undertrained (memdec eval's
  defaults on biomed: 44.14 against 41.82 with 160 steps; benchmarks/RESULTS.md).

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
    batch_size: int = 0  # windows a step; 0: as many as make batch_tokens
    batch_tokens: int = 0  # tokens a step, whatever the window's length
    min_steps: int = 0  # at least this many optimizer steps, whatever the train split's size

    def windows_per_step(self, context: int) -> int:
        return self.batch_size or max(1, self.batch_tokens // context)

    def length(self) -> str:
        steps = f" (at least {self.min_steps} optimizer steps)" if self.min_steps else ""
        batch = f"{self.batch_size} windows" if self.batch_size else f"{self.batch_tokens:,} tokens"
        return f"{self.epochs} epochs{steps} of {batch} a step"

    def describe(self) -> str:
        blocks = "every block" if not self.init_layers else f"the first {self.init_layers} blocks"
        temperature = "T tuned" if self.temperature == TUNED else f"T = {self.temperature:g}"
        return f"{self.name}: {blocks} of the init, lr {self.lr:g}, {temperature}, {self.length()}"


RECIPES = {
    "whole": Recipe("whole", init_layers=0, lr=1e-3, temperature=16.0, epochs=3, batch_size=8),
    "cut": Recipe("cut", init_layers=2, lr=5e-4, temperature=TUNED, epochs=4, batch_tokens=1024, min_steps=160),
    # the paper's memory for Qwen: the whole small model at lr 1e-4, with the cut recipe's length
    "paper": Recipe("paper", init_layers=0, lr=1e-4, temperature=TUNED, epochs=4, batch_tokens=1024, min_steps=160),
}
#: How ``auto`` chooses, for help texts.
AUTO_RULE = f"auto: cut for an init above {CUT_ABOVE:,} parameters, else whole"

#: The settings a recipe fills; each may be given explicitly instead.
RECIPE_SETTINGS = ("init_layers", "lr", "temperature", "epochs", "min_steps", "batch_size")


def recipe_for(choice: str, init_parameters: int) -> Recipe:
    """The recipe ``choice`` names, or for ``auto`` the one for an init of this size."""
    check_recipe_name(choice)
    if choice == AUTO:
        return RECIPES["cut" if init_parameters > CUT_ABOVE else "whole"]
    return RECIPES[choice]


def described() -> str:
    """Every recipe in one line, and how ``auto`` chooses (help texts)."""
    return "; ".join([*(recipe.describe() for recipe in RECIPES.values()), AUTO_RULE])


def check_recipe_name(choice: str) -> None:
    if choice != AUTO and choice not in RECIPES:
        raise ConfigError(f"recipe must be auto or one of {', '.join(RECIPES)}, got {choice!r}")


def apply_recipe(config, recipe: Recipe, context: int):
    """``config`` with every setting left at ``auto`` taken from ``recipe`` for training windows of
    ``context`` tokens, and ``recipe`` set to its name. A tuned temperature becomes
    ``tune_temperature``; epochs given alone are not stretched by the recipe's minimum of steps (a
    user who asks for 1 epoch gets 1)."""
    values = {name: getattr(recipe, name) for name in RECIPE_SETTINGS if getattr(config, name) == AUTO}
    if "batch_size" in values:
        values["batch_size"] = recipe.windows_per_step(context)
    if config.epochs != AUTO and config.min_steps == AUTO:
        values["min_steps"] = 0
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
