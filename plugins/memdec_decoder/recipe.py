"""The recipe that fills a memory's training settings left at ``auto``.

A recipe is chosen by the size of the model the memory starts from (its init) and by the compute
the run allows:

- ``whole``: an init of at most ``CUT_ABOVE`` parameters (the demo family's -s, GPT-2 small) is
  small enough to be the memory as it is: all its blocks, lr 1e-3, the paper's T = 16,
  3 epochs of 8 windows per step and at least 48 optimizer steps (6 epochs of compare's 32k-token
  slice in windows of 512). With 24 steps the demo memories were undertrained: law's still gained
  8 % validation perplexity in its last epoch, and on memdec-demo-m it gave 65.30 against 57.09
  with 48 steps (benchmarks/RESULTS.md, "The demo memory's length").
- ``paper``: a larger init (Qwen2.5-0.5B, SmolLM2-135M) trained whole, as the paper trains its
  Qwen memories: lr 1e-4, the kNN temperature tuned on the teacher's kNN-LM (squared-L2 distances
  of real models' hidden states are in the hundreds, where T = 16 makes every target one-hot), at
  least 160 optimizer steps of 1,024 tokens. The recipe study's best on both packs it ran on
  (benchmarks/memory_recipes.py, benchmarks/RESULTS.md "Memory recipes").
- ``cut``: the init's first 2 blocks with its embedding rows (and, above 32k tokens, only those of
  the datastore's tokens), lr 5e-4, T tuned, the same length: about a twelfth of the paper
  recipe's training FLOPs for a 24-block init, and the study's best of the cheap recipes.

``auto`` takes ``paper`` where its training FLOPs fit ``PAPER_FLOPS`` for where the run trains
(about an hour of a 2-core CPU, or of one GPU), and ``cut`` elsewhere. Lengths are counted in
optimizer steps of 1,024 tokens, not in epochs: with windows of 1,024 and 4 epochs of a
32k-token slice, a memory got 64 steps and stayed undertrained (memdec eval's defaults on
biomed: 44.14 against 41.82 with 160 steps; benchmarks/RESULTS.md).

Every setting the user gives wins over the recipe's, one by one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from memdec_core.errors import ConfigError

#: Inits larger than this are trained by the ``paper`` or the ``cut`` recipe under ``auto``.
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

    def training_flops(self, parameters: int, train_tokens: int) -> float:
        """6·N per token over the tokens this recipe trains on a split of ``train_tokens``."""
        tokens = max(self.epochs * train_tokens, self.min_steps * self.batch_tokens)
        return 6.0 * parameters * tokens

    def length(self) -> str:
        steps = f" (at least {self.min_steps} optimizer steps)" if self.min_steps else ""
        batch = f"{self.batch_size} windows" if self.batch_size else f"{self.batch_tokens:,} tokens"
        return f"{self.epochs} epochs{steps} of {batch} a step"

    def describe(self) -> str:
        blocks = "every block" if not self.init_layers else f"the first {self.init_layers} blocks"
        temperature = "T tuned" if self.temperature == TUNED else f"T = {self.temperature:g}"
        return f"{self.name}: {blocks} of the init, lr {self.lr:g}, {temperature}, {self.length()}"


RECIPES = {
    "whole": Recipe("whole", init_layers=0, lr=1e-3, temperature=16.0, epochs=3, batch_size=8, min_steps=48),
    "cut": Recipe("cut", init_layers=2, lr=5e-4, temperature=TUNED, epochs=4, batch_tokens=1024, min_steps=160),
    # the paper's memory for Qwen: the whole small model at lr 1e-4, with the cut recipe's length
    "paper": Recipe("paper", init_layers=0, lr=1e-4, temperature=TUNED, epochs=4, batch_tokens=1024, min_steps=160),
}
#: Training FLOPs (6 × the init's parameters × the tokens its length trains) that ``auto`` lets the
#: paper's memory spend, by where training runs. On the study's 2-core CPU the whole Qwen2.5-0.5B
#: trained its 4.9e14 FLOPs in about half an hour; 1e15 is about an hour there, and 1e18 about an
#: hour of one GPU at a third of a H100's bf16 peak. Above them, ``cut`` (2 of 24 blocks).
PAPER_FLOPS = {"cpu": 1e15, "accelerator": 1e18}

#: How ``auto`` chooses, for help texts.
AUTO_RULE = (f"auto: whole for an init of at most {CUT_ABOVE:,} parameters; above, paper where its training "
             f"FLOPs fit {PAPER_FLOPS['cpu']:.0e} on a CPU or {PAPER_FLOPS['accelerator']:.0e} on an accelerator, "
             f"else cut")

#: The settings a recipe fills; each may be given explicitly instead.
RECIPE_SETTINGS = ("init_layers", "lr", "temperature", "epochs", "min_steps", "batch_size")


def recipe_for(choice: str, init_parameters: int, train_tokens: int = 0, accelerator: bool = False) -> Recipe:
    """The recipe ``choice`` names, or for ``auto`` the best of the recipe study for an init of this
    size that the run's compute allows: the paper's memory (the whole init) when training it on
    ``train_tokens`` fits ``PAPER_FLOPS`` where it runs, else the init's first blocks (``cut``)."""
    check_recipe_name(choice)
    if choice != AUTO:
        return RECIPES[choice]
    if init_parameters <= CUT_ABOVE:
        return RECIPES["whole"]
    paper = RECIPES["paper"]
    _, allowed = paper_allowance(accelerator)
    return paper if paper.training_flops(init_parameters, train_tokens) <= allowed else RECIPES["cut"]


def paper_allowance(accelerator: bool) -> tuple[str, float]:
    """Where the run trains, in words, and the FLOPs ``auto`` lets the paper's memory spend there."""
    return ("an accelerator", PAPER_FLOPS["accelerator"]) if accelerator else ("a CPU", PAPER_FLOPS["cpu"])


def why_auto(init_parameters: int, train_tokens: int, accelerator: bool) -> str:
    """Why ``auto`` chose what it chose for this init and train split (the log line)."""
    if init_parameters <= CUT_ABOVE:
        return f"an init of at most {CUT_ABOVE:,} parameters"
    flops = RECIPES["paper"].training_flops(init_parameters, train_tokens)
    where, allowed = paper_allowance(accelerator)
    return f"the whole init would train for {flops:.1e} FLOPs, {where} allows {allowed:.0e}"


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
