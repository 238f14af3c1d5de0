"""``memdec generate``: continue a prompt with a base model mixed with any memory."""

from __future__ import annotations

import sys

import click

from memdec_core.command_kit import eval_settings, parse_assignments, set_option, window_options


@click.command("generate")
@click.option("--base", required=True, help="The base model (a name, folder, .gguf file or hub id).")
@click.option("--memory", default=None, metavar="NAME|FOLDER",
              help="A memory model (memdec list memory-models) or a folder one of them opens (a memory from "
                   "`memdec train`, a datastore from `memdec datastore build`); without it the base generates alone.")
@click.option("--domain", default=None,
              help="The domain a memory is built for, when it is not a folder (a cached datastore, a unigram...).")
@click.option("--combiner", default="linear", show_default=True,
              help="How the memory is mixed with the base: a registered name or path/to/file.py:Name.")
@click.option("--lam", type=click.FloatRange(0, 1), default=0.6, show_default=True,
              help="The combiner's λ (the memory's weight), for combiners that have one.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--sample", is_flag=True, help="Sample instead of greedy / beam search.")
@click.option("--temperature", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True,
              help="Sampling temperature, applied to the mixture.")
@click.option("--top-k", type=click.IntRange(min=0), default=0, show_default=True,
              help="Sampling: keep the k best tokens (0: all).")
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=1.0, show_default=True,
              help="Sampling: nucleus mass.")
@click.option("--num-beams", type=click.IntRange(min=1), default=1, show_default=True, help="Beam search width.")
@click.option("--repetition-penalty", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True,
              help="Lower the score of tokens already in the text (1: none; 1.1–1.3 is typical).")
@click.option("--stop", multiple=True, metavar="TEXT",
              help="Stop where the continuation first contains TEXT, which is cut off (repeatable).")
@click.option("--num-return-sequences", type=click.IntRange(min=1), default=1, show_default=True,
              help="Continuations to print: samples with --sample, else the best beams (needs as many).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for sampling.")
@set_option
@window_options
@click.argument("prompt")
def generate(base, memory, domain, combiner, lam, max_new_tokens, sample, temperature, top_k, top_p, num_beams,
             repetition_penalty, stop, num_return_sequences, seed, assignments, context, stride, batch_size,
             max_train_tokens, max_eval_tokens, prompt):
    """Continue PROMPT with BASE mixed with a memory, streamed to the terminal (`-`: read the
    prompt from standard input).

    Base and memory run as one model whose next-token scores are the combiner's mixture, so
    greedy decoding, sampling, beam search and the repetition penalty all act on the mixture;
    the memory keeps its own cache. One continuation streams; several (beams, or
    --num-return-sequences) are printed when done, separated by a line of dashes.
    Knobs are fixed here: --lam for the combiner, --set NAME.KEY=VALUE for the memory's own
    (a kNN datastore tunes T over a grid in eval; pick one: --set knn-datastore.temperatures=10).
    A combiner that learns (--combiner adaptive) is fitted on --domain's validation split first
    (cached: the next run reads the fit back).
    A prompt longer than the model's (or the memory's) positions keeps its last tokens, and
    generation stops at the last position; stderr says so.

    \b
    Examples:
      memdec generate --base memdec-demo-m --memory finance-memory --sample --top-p 0.9 "The central bank"
      memdec generate --base memdec-demo-l --memory knn-datastore --domain finance \\
                      --set knn-datastore.temperatures=10 --lam 0.3 "Shares of the bank"
      echo "Interest rates" | memdec generate --base memdec-demo-m --sample --num-return-sequences 3 --stop . -
    """
    import torch
    from transformers import TextStreamer

    from memdec_core import api
    from memdec_core.components.combiner_files import resolve_combiner

    torch.manual_seed(seed)
    component_settings = parse_assignments(assignments)
    combiner_class = resolve_combiner(combiner)
    if any(name == "lam" for name in combiner_class.Config.__dataclass_fields__):
        component_settings = _with_lam(component_settings, combiner_class, lam)

    class _Streamer(TextStreamer):
        def on_finalized_text(self, text, stream_end=False):
            click.echo(text, nl=stream_end)

    generation = dict(max_new_tokens=max_new_tokens, do_sample=sample, temperature=temperature, top_k=top_k,
                      top_p=top_p, num_beams=num_beams, repetition_penalty=repetition_penalty, stop=stop,
                      num_return_sequences=num_return_sequences)
    _check_generation(generation)
    prompt = _read_prompt(prompt)
    # A stream prints tokens as they come, so it cannot cut at a stop string it has not seen yet.
    streams = num_beams == 1 and num_return_sequences == 1 and not stop
    streamer_factory = (lambda tokenizer: _Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)) \
        if streams else None
    started = _PromptEcho(prompt, streamer_factory)
    texts = api.generate(base, [prompt], memory=memory, domain=domain, combiner=combiner_class,
                         component_settings=component_settings,
                         settings=eval_settings(context, stride, batch_size, max_train_tokens, max_eval_tokens),
                         streamer_factory=started.factory, **generation)
    if not streams:
        click.echo("\n----\n".join(prompt + text for text in texts))


def _with_lam(component_settings: dict, combiner_class, lam: float) -> dict:
    """--lam for the combiner: given on the command line, a --set of that λ must agree with it;
    left at its default, a --set of it wins."""
    from click.core import ParameterSource

    from memdec_core.components.plan import set_by_shorthand

    if click.get_current_context().get_parameter_source("lam") is ParameterSource.DEFAULT:
        component_settings.setdefault(combiner_class.name or "", {}).setdefault("lam", lam)
        return component_settings
    return set_by_shorthand(component_settings, combiner_class, "lam", lam, "--lam")


def _read_prompt(prompt: str) -> str:
    """PROMPT, or standard input for `-` (a trailing newline is not part of the prompt). An empty
    prompt is a usage error from either: a continuation of nothing is rarely what was meant."""
    if prompt != "-":
        if not prompt.strip():
            raise click.UsageError("the prompt is empty")
        return prompt
    if sys.stdin is None or sys.stdin.closed:  # started with `<&-`: Python has no sys.stdin at all
        raise click.UsageError("standard input is closed; pipe the prompt in, or give it as an argument")
    text = sys.stdin.read().removesuffix("\n")
    if not text.strip():
        raise click.UsageError("the prompt read from standard input is empty")
    return text


def _check_generation(generation: dict) -> None:
    """Bad generation settings fail before anything is loaded or printed."""
    from memdec_core.engine.generation import generation_settings

    generation_settings(**generation)


class _PromptEcho:
    """Prints the prompt only once generation starts streaming (after every check passed)."""

    def __init__(self, prompt: str, streamer_factory):
        self.prompt, self.streamer_factory = prompt, streamer_factory

    def factory(self, tokenizer):
        if self.streamer_factory is None:
            return None
        click.echo(self.prompt, nl=False)
        return self.streamer_factory(tokenizer)
