"""Zero-shot downstream classification scored with DCPMI, as kNN-prompt and the Memory Decoder paper do.

A task is a YAML spec (docs/tasks.md): a labelled data file, a prompt template, a short domain
premise, and verbaliser words per class. Each class is scored by domain-conditional PMI,

    score(class) = Σ_word [log P(word | template(x)) − log P(word | premise)]

(kNN-prompt's sum over a class's words; ``aggregate: logsumexp`` takes the log of the class's total
probability instead), and the prediction is the best-scoring class. A word of several tokens
contributes the sum of its tokens' log-probs. Everything goes through one ``LogLikelihood``
callable (``MethodResult.loglikelihood``), so every method is scored the way it runs at inference.

memdec ships the specs of the paper's tasks (``memdec_core/runs/task_specs``), not their data: files are
read from the tasks folder (``--tasks-dir`` or ``$MEMDEC_TASKS_DIR``; DATA_LICENSES.md says why).
Every spec and data file is read and checked before any model is loaded.
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from memdec_core.errors import ArtifactError, ConfigError, UnknownComponentError
from memdec_core.runtime.progress import log, progress_bar
from memdec_core.runtime.renames import renamed_keywords

SPEC_FOLDER = Path(__file__).parent / "task_specs"
TASKS_DIR_VARIABLE = "MEMDEC_TASKS_DIR"
FORMATS = ("jsonl", "csv", "tsv")
AGGREGATES = ("sum", "logsumexp")
REQUIRED_KEYS = ("data", "template", "premise", "label")
OPTIONAL_KEYS = ("description", "note", "validation", "labels", "skip", "verbalizers", "verbalizers_file",
                 "classes", "equal_word_counts", "aggregate", "word_prefix")
#: Requests handed to the LogLikelihood at once: long enough to batch well, short enough for a live bar.
REQUEST_CHUNK = 1024
#: Validation examples tried per knob setting by default (each setting re-scores all of them).
DEFAULT_VALIDATION_EXAMPLES = 100


# ----------------------------------------------------------------------------------------------
# The spec


@dataclass(frozen=True)
class DataFile:
    """One labelled file of a task: where it is, how to read it."""

    path: Path
    format: str  # jsonl, csv or tsv
    columns: tuple[str, ...] | None = None  # the field names of a csv/tsv without a header row


@dataclass(frozen=True)
class TaskSpec:
    """A task as its spec describes it, with paths resolved and verbaliser words read."""

    name: str
    data: DataFile
    validation: DataFile | None
    template: str  # "{text} It was": the prompt of one example, from its fields
    premise: str  # " It was": the domain premise of DCPMI's denominator
    label_field: str
    labels: dict[str, str]  # raw label value → class; empty: the raw values are the class names
    skip: frozenset[str]  # raw label values whose examples are left out (SST's neutral sentences)
    classes: tuple[str, ...]
    verbalizers: tuple[tuple[str, ...], ...]  # per class, its words
    aggregate: str = "sum"
    word_prefix: str = " "  # what comes before each word: the words follow the prompt
    description: str = ""
    note: str = ""  # shown when a data file is missing: where to get it


def task_names() -> list[str]:
    """The tasks whose specs memdec ships."""
    return sorted(path.stem for path in SPEC_FOLDER.glob("*.yaml"))


def resolve_tasks_dir(given: str | Path | None) -> Path | None:
    """``--tasks-dir``, else ``$MEMDEC_TASKS_DIR``, else None (only spec files of your own then)."""
    value = given or os.environ.get(TASKS_DIR_VARIABLE) or None
    if value is None:
        return None
    folder = Path(value).expanduser()
    if not folder.is_dir():
        raise ArtifactError(f"tasks folder not found: {folder}")
    return folder


def load_spec(name: str, tasks_dir: str | Path | None) -> TaskSpec:
    """A shipped task by name (its files in ``tasks_dir``) or a spec file of your own (``.yaml``,
    its files relative to its folder)."""
    if name.endswith((".yaml", ".yml")):
        path = Path(name).expanduser()
        if not path.is_file():
            raise ConfigError(f"task spec not found: {path}")
        return parse_spec(_read_yaml(path), path.stem, path.parent)
    if name not in task_names():
        raise UnknownComponentError("task", name, task_names(), hint="or give a spec file (path/to/task.yaml)")
    if tasks_dir is None:
        raise ConfigError(f"task {name}: memdec ships its spec, not its data; give the folder that holds it "
                          f"with --tasks-dir or ${TASKS_DIR_VARIABLE} (docs/tasks.md)")
    return parse_spec(_read_yaml(SPEC_FOLDER / f"{name}.yaml"), name, Path(tasks_dir).expanduser())


def _read_yaml(path: Path) -> dict:
    import yaml

    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise ConfigError(f"task spec {path}: not valid YAML{where}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"task spec {path}: must be a mapping of keys (docs/tasks.md)")
    return values


def parse_spec(values: dict, name: str, folder: Path) -> TaskSpec:
    """Check a spec's keys and values (ConfigError naming the task and the key) and read its words."""
    _check_keys(values, name)
    classes, verbalizers = _verbalizers(values, name, folder)
    labels = {str(raw): _text(cls, name, f"labels.{raw}") for raw, cls in _mapping(values, "labels", name).items()}
    unknown = sorted(set(labels.values()) - set(classes))
    if unknown:
        raise ConfigError(f"task {name}: labels map to {', '.join(unknown)}, which no verbaliser names "
                          f"(classes: {', '.join(classes)})")
    aggregate = values.get("aggregate", "sum")
    if aggregate not in AGGREGATES:
        raise ConfigError(f"task {name}: aggregate must be one of {', '.join(AGGREGATES)}, got {aggregate!r}")
    template = _text(values["template"], name, "template")
    if not _template_fields(template, name):
        raise ConfigError(f"task {name}: the template names no field of the examples (e.g. \"{{text}} It was\")")
    validation = values.get("validation")
    return TaskSpec(
        name=name, data=_data_file(values["data"], name, "data", folder),
        validation=None if validation is None else _data_file(validation, name, "validation", folder),
        template=template, premise=_text(values["premise"], name, "premise", empty=True),
        label_field=_text(values["label"], name, "label"), labels=labels,
        skip=frozenset(str(raw) for raw in _list(values, "skip", name)), classes=classes, verbalizers=verbalizers,
        aggregate=aggregate, word_prefix=_text(values.get("word_prefix", " "), name, "word_prefix", empty=True),
        description=str(values.get("description", "")).strip(), note=str(values.get("note", "")).strip())


def _check_keys(values: dict, name: str) -> None:
    import difflib

    for key in values:
        if key not in REQUIRED_KEYS + OPTIONAL_KEYS:
            close = difflib.get_close_matches(str(key), REQUIRED_KEYS + OPTIONAL_KEYS, n=1)
            raise ConfigError(f"task {name}: unknown key {key!r}" + (f"; did you mean {close[0]!r}?" if close else ""))
    missing = [key for key in REQUIRED_KEYS if key not in values]
    if missing:
        raise ConfigError(f"task {name}: the spec has no {', '.join(missing)} (docs/tasks.md)")
    if ("verbalizers" in values) == ("verbalizers_file" in values):
        raise ConfigError(f"task {name}: give the words of each class in verbalizers or verbalizers_file (one)")


def _text(value: Any, name: str, key: str, *, empty: bool = False) -> str:
    if not isinstance(value, str) or (not empty and not value.strip()):
        raise ConfigError(f"task {name}: {key} must be {'text' if empty else 'non-empty text'}, got {value!r}"
                          + (" (quote yes/no/true/false in YAML)" if isinstance(value, bool) else ""))
    return value


def _mapping(values: dict, key: str, name: str) -> dict:
    found = values.get(key) or {}
    if not isinstance(found, dict):
        raise ConfigError(f"task {name}: {key} must be a mapping, got {found!r}")
    return found


def _list(values: dict, key: str, name: str) -> list:
    found = values.get(key) or []
    if not isinstance(found, list):
        raise ConfigError(f"task {name}: {key} must be a list, got {found!r}")
    return found


def _template_fields(template: str, name: str) -> list[str]:
    try:
        return [field for _, field, _, _ in string.Formatter().parse(template) if field]
    except ValueError as error:
        raise ConfigError(f"task {name}: template {template!r}: {error} (write a literal brace as {{{{ or }}}})") \
            from None


def _data_file(value: Any, name: str, key: str, folder: Path) -> DataFile:
    """``file.csv`` or ``{file: file.tsv, columns: [label, text], format: tsv}``."""
    entry = {"file": value} if isinstance(value, str) else value
    if not isinstance(entry, dict) or not isinstance(entry.get("file"), str) \
            or set(entry) - {"file", "format", "columns"}:
        raise ConfigError(f"task {name}: {key} must be a file name or {{file, format, columns}}, got {value!r}")
    path = folder / Path(entry["file"]).expanduser()
    suffix = path.suffix.lstrip(".")
    file_format = entry.get("format", suffix)
    if file_format not in FORMATS:
        raise ConfigError(f"task {name}: {key} {entry['file']}: format must be one of {', '.join(FORMATS)}, "
                          f"got {file_format!r} (name it with format:)")
    columns = entry.get("columns")
    if columns is not None and (file_format == "jsonl" or not isinstance(columns, list)
                                or not all(isinstance(item, str) for item in columns)):
        raise ConfigError(f"task {name}: {key}.columns must be a list of field names, for a csv or tsv file")
    return DataFile(path, file_format, tuple(columns) if columns is not None else None)


def _verbalizers(values: dict, name: str, folder: Path) -> tuple[tuple[str, ...], tuple[tuple[str, ...], ...]]:
    """The classes in order and their words: inline, from a ", "-separated text file (one line per
    class, named by ``classes``) or from a JSON object class → words."""
    if "verbalizers" in values:
        words_by_class = _mapping(values, "verbalizers", name)
    else:
        words_by_class = _verbalizer_file(values, name, folder)
    if len(words_by_class) < 2:
        raise ConfigError(f"task {name}: a classification needs at least two classes, got {len(words_by_class)}")
    classes, verbalizers = [], []
    for cls, words in words_by_class.items():
        words = [words] if isinstance(words, str) else words
        if not isinstance(words, list) or not words:
            raise ConfigError(f"task {name}: the words of class {cls!r} must be a non-empty list")
        classes.append(str(cls))
        verbalizers.append(tuple(_text(word, name, f"a word of class {cls!r}") for word in words))
    if values.get("equal_word_counts"):  # kNN-prompt keeps each class's first n words, n the fewest any has
        fewest = min(len(words) for words in verbalizers)
        verbalizers = [words[:fewest] for words in verbalizers]
    return tuple(classes), tuple(verbalizers)


def _verbalizer_file(values: dict, name: str, folder: Path) -> dict[str, list[str]]:
    path = folder / _text(values["verbalizers_file"], name, "verbalizers_file")
    if not path.is_file():
        raise ArtifactError(f"task {name}: verbaliser file {path} not found" + _where(values.get("note")))
    if path.suffix == ".json":
        words_by_class = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(words_by_class, dict):
            raise ArtifactError(f"task {name}: {path} must hold a JSON object class → words")
        return words_by_class
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    classes = _list(values, "classes", name)
    if len(classes) != len(lines):
        raise ConfigError(f"task {name}: classes names {len(classes)} classes but {path.name} has {len(lines)} "
                          f"lines (one line of words per class)")
    return {str(cls): line.split(", ") for cls, line in zip(classes, lines)}


def _where(note: Any) -> str:
    """A missing file's error ends with the spec's note on where to get it."""
    note = str(note or "").strip()
    return f"; {note}" if note else ""


# ----------------------------------------------------------------------------------------------
# The data


@dataclass(frozen=True)
class Example:
    """One labelled example: its prompt (the template filled in) and its class's index."""

    prompt: str
    label: int


@dataclass
class Task:
    """A task with its examples read: the test examples and the validation slice (maybe empty)."""

    spec: TaskSpec
    test: list[Example]
    validation: list[Example] = field(default_factory=list)
    test_total: int = 0  # examples in the file, before --max-examples
    #: Why there is no validation slice, for the report: "the spec names none", "... not found".
    validation_note: str = ""

    def summary(self) -> dict[str, Any]:
        spec = self.spec
        return {"name": spec.name, "description": spec.description, "data": str(spec.data.path),
                "examples": len(self.test), "examples_in_file": self.test_total,
                "validation": str(spec.validation.path) if self.validation else None,
                "validation_examples": len(self.validation), "validation_note": self.validation_note,
                "classes": list(spec.classes), "words": [len(words) for words in spec.verbalizers],
                "template": spec.template, "premise": spec.premise, "aggregate": spec.aggregate}


def load_task(name: str, tasks_dir: str | Path | None, *, max_examples: int | None = None,
              validation_examples: int = DEFAULT_VALIDATION_EXAMPLES, seed: int = 0) -> Task:
    """Read a task's spec and files, checking every example (ArtifactError naming file and line).

    ``max_examples`` takes a seeded sample of the test file (files are often sorted by label), in
    file order; the validation slice is a seeded sample of ``validation_examples``. A validation
    file the spec names but the folder lacks is no error: λ then comes from perplexity, and the
    report says so (kNN-prompt's own dev files are not in every copy of its data).
    """
    spec = load_spec(name, tasks_dir)
    test = read_examples(spec, spec.data)
    task = Task(spec, _sample(test, max_examples, seed), test_total=len(test))
    if spec.validation is None:
        task.validation_note = "the spec names no validation file"
    elif not spec.validation.path.is_file():
        task.validation_note = f"no {spec.validation.path.name} in {spec.validation.path.parent}"
        log(f"task {spec.name}: {task.validation_note}; a mixture's λ is the one chosen on perplexity")
    else:
        task.validation = _sample(read_examples(spec, spec.validation), validation_examples, seed)
    return task


def _sample(examples: list[Example], limit: int | None, seed: int) -> list[Example]:
    if limit is None or limit >= len(examples):
        return examples
    kept = sorted(random.Random(seed).sample(range(len(examples)), limit))
    return [examples[i] for i in kept]


def read_examples(spec: TaskSpec, data: DataFile) -> list[Example]:
    if not data.path.is_file():
        raise ArtifactError(f"task {spec.name}: data file {data.path} not found{_where(spec.note)}")
    fields = _template_fields(spec.template, spec.name)
    examples = []
    try:
        for line, record in _records(spec, data):
            example = _example(spec, data, line, record, fields)
            if example is not None:
                examples.append(example)
    except (UnicodeDecodeError, csv.Error) as error:
        raise ArtifactError(f"task {spec.name}: {data.path} cannot be read as {data.format}: {error}") from None
    if not examples:
        raise ArtifactError(f"task {spec.name}: {data.path} holds no examples")
    return examples


def _example(spec: TaskSpec, data: DataFile, line: int, record: dict, fields: list[str]) -> Example | None:
    where = f"task {spec.name}: {data.path.name} line {line}"
    for key in [spec.label_field, *fields]:
        if record.get(key) is None:
            raise ArtifactError(f"{where} has no field {key!r} (fields: {', '.join(map(str, record)) or 'none'})")
    raw = str(record[spec.label_field]).strip()
    if raw in spec.skip:
        return None
    cls = spec.labels.get(raw, raw if not spec.labels else None)
    if cls not in spec.classes:
        known = sorted(spec.labels) or list(spec.classes)
        raise ArtifactError(f"{where}: label {raw!r} is not one of {', '.join(known)}")
    prompt = spec.template.format_map({key: str(record[key]).strip() for key in fields})
    return Example(prompt, spec.classes.index(cls))


def _records(spec: TaskSpec, data: DataFile) -> Iterable[tuple[int, dict]]:
    """(line number, record) of a jsonl, csv or tsv file."""
    with open(data.path, encoding="utf-8", newline="") as handle:
        if data.format == "jsonl":
            for number, text in enumerate(handle, 1):
                if text.strip():
                    yield number, _json_record(spec, data, number, text)
            return
        # SST's tsv holds bare quotes (`` '' "): a tab-separated file is read without csv quoting.
        options = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if data.format == "tsv" else {}
        reader = csv.DictReader(handle, fieldnames=list(data.columns) if data.columns else None, **options)
        for record in reader:
            yield reader.line_num, record


def _json_record(spec: TaskSpec, data: DataFile, number: int, text: str) -> dict:
    try:
        record = json.loads(text)
    except json.JSONDecodeError:
        raise ArtifactError(f"task {spec.name}: {data.path.name} line {number} is not JSON") from None
    if not isinstance(record, dict):
        raise ArtifactError(f"task {spec.name}: {data.path.name} line {number} is not a JSON object")
    return record


# ----------------------------------------------------------------------------------------------
# DCPMI scoring through one LogLikelihood

Request = tuple[tuple[int, ...], tuple[int, ...]]
LogLikelihood = Callable[..., "list[float]"]


@dataclass
class ScoringPlan:
    """The unique (context, word) requests of a set of examples, and where each class's DCPMI reads them.

    The premise requests are the same for every example, and identical prompts share theirs: each
    distinct request is scored once.
    """

    requests: list[Request]
    conditional: list[list[list[int]]]  # [example][class] → request indices of its words after the prompt
    domain: list[list[int]]  # [class] → request indices of its words after the premise
    labels: list[int]
    aggregate: str

    def accuracy(self, loglikelihood: LogLikelihood, knobs: dict | None = None,
                 advance: Callable[[int], None] | None = None) -> float:
        predictions = self.predict(score_requests(self.requests, loglikelihood, knobs, advance))
        return sum(p == label for p, label in zip(predictions, self.labels)) / len(self.labels)

    def class_scores(self, values: Sequence[float]) -> list[list[float]]:
        """Per example, the DCPMI score of every class."""
        combine = _AGGREGATE[self.aggregate]
        domain = [[values[i] for i in indices] for indices in self.domain]
        return [[combine([values[i] for i in indices], domain[cls]) for cls, indices in enumerate(example)]
                for example in self.conditional]

    def predict(self, values: Sequence[float]) -> list[int]:
        """The best class of each example (the first among ties; a NaN score, from a word that both
        contexts give −inf, never wins)."""
        return [max(range(len(scores)), key=lambda cls: -math.inf if math.isnan(scores[cls]) else scores[cls])
                for scores in self.class_scores(values)]


def _logsumexp(values: Sequence[float]) -> float:
    top = max(values)
    return top + math.log(sum(math.exp(value - top) for value in values)) if math.isfinite(top) else top


_AGGREGATE = {
    # kNN-prompt: the PMIs of a class's words, summed
    "sum": lambda conditional, domain: sum(c - d for c, d in zip(conditional, domain)),
    # the PMI of the event "one of the class's words comes next"
    "logsumexp": lambda conditional, domain: _logsumexp(conditional) - _logsumexp(domain),
}


def encode_words(spec: TaskSpec, tokenizer) -> list[list[tuple[int, ...]]]:
    """Each class's words as token ids (``word_prefix`` + word, no special tokens)."""
    encoded = []
    for cls, words in zip(spec.classes, spec.verbalizers):
        ids = [tuple(tokenizer(spec.word_prefix + word, add_special_tokens=False)["input_ids"]) for word in words]
        empty = [word for word, tokens in zip(words, ids) if not tokens]
        if empty:
            raise ConfigError(f"task {spec.name}: verbaliser word {empty[0]!r} of class {cls!r} has no tokens")
        encoded.append(ids)
    return encoded


def plan_scoring(spec: TaskSpec, examples: Sequence[Example], tokenizer) -> ScoringPlan:
    """The requests that score ``examples`` of ``spec`` with this tokenizer."""
    words = encode_words(spec, tokenizer)
    index: dict[Request, int] = {}

    def indices(context: tuple[int, ...]) -> list[list[int]]:
        return [[index.setdefault((context, word), len(index)) for word in class_words] for class_words in words]

    domain = indices(_ids(tokenizer, spec.premise))
    conditional = [indices(_ids(tokenizer, example.prompt)) for example in examples]
    return ScoringPlan(list(index), conditional, domain, [example.label for example in examples], spec.aggregate)


def _ids(tokenizer, text: str) -> tuple[int, ...]:
    return tuple(tokenizer(text)["input_ids"])


def score_requests(requests: Sequence[Request], loglikelihood: LogLikelihood, knobs: dict | None = None,
                   advance: Callable[[int], None] | None = None) -> list[float]:
    """Every request's log-likelihood, asked in chunks (so that a progress bar moves)."""
    values: list[float] = []
    for first in range(0, len(requests), REQUEST_CHUNK):
        chunk = [(list(context), list(word)) for context, word in requests[first:first + REQUEST_CHUNK]]
        scored = loglikelihood(chunk, knobs=knobs) if knobs else loglikelihood(chunk)
        if len(scored) != len(chunk):
            raise ConfigError(f"the method's loglikelihood returned {len(scored)} values for {len(chunk)} requests")
        values.extend(float(value) for value in scored)
        if advance:
            advance(len(chunk))
    bad = next((value for value in values if math.isnan(value) or value == math.inf), None)
    if bad is not None:
        raise ConfigError(f"the method's loglikelihood returned {bad} (a component gave NaN or +inf log-probs)")
    return values


# ----------------------------------------------------------------------------------------------
# Knobs per task


def mixing_knobs(combiner_class, chosen: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The combiner's knobs as chosen on perplexity and its grid as knob dicts, when the method mixes
    through the combiner (its chosen knobs name every knob of the combiner); else nothing. The grid
    is empty when there is nothing to tune (one point: the knob was fixed, ``--lam``). A combiner
    that learns has nothing to choose per task: the method's loglikelihood mixes with its fitted
    weights, which a task's knobs must not override."""
    import dataclasses

    if combiner_class.learns:
        return {}, []
    names = [item.name for item in dataclasses.fields(combiner_class.Config)]
    if not names or not set(names) <= set(chosen):
        return {}, []
    grid = [combiner_class(point).knobs() for point in combiner_class.grid()]
    return {name: chosen[name] for name in names}, grid if len(grid) > 1 else []


def choose_knobs(accuracies: list[tuple[dict, float]], chosen: dict[str, Any]) -> dict[str, Any]:
    """The best on validation; among ties (a small slice ties often), the nearest to the knobs
    chosen on perplexity, so that a tie does not drift to the grid's edge."""
    best = max(accuracy for _, accuracy in accuracies)
    tied = [knobs for knobs, accuracy in accuracies if accuracy == best]
    return min(tied, key=lambda knobs: sum(_distance(value, chosen.get(key)) for key, value in knobs.items()))


def _distance(a: Any, b: Any) -> float:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return abs(a - b)
    return 0.0 if a == b else 1.0


# ----------------------------------------------------------------------------------------------
# A run: every base × method, every task


@renamed_keywords(method_settings="component_settings")
def evaluate_tasks(domain: str, tasks: Sequence[str], tasks_dir: str | Path | None = None,
                   bases: Iterable[str] = (), methods: Iterable[str] = ("base",), *,
                   max_examples: int | None = None, validation_examples: int = DEFAULT_VALIDATION_EXAMPLES,
                   settings=None, combiner: Any = "linear", component_settings: dict | None = None,
                   command: list[str] | None = None, previous: dict | None = None,
                   on_row: Callable[[dict], None] | None = None) -> dict:
    """Adapt every base with every method on ``domain`` as ``evaluate`` does, then score every
    task with each method's ``loglikelihood``: accuracy by DCPMI, the combiner's knobs tuned per
    task on its validation slice where it has one (else those chosen on perplexity).

    Returns ``{"domain", "tasks": [...], "results": [{"base", "method", "test_ppl", "knobs",
    "tasks": {name: {"accuracy", "examples", "knobs", "knob_source", "validation"}}, "mean_accuracy"}],
    "meta", "complete"}`` (docs/tasks.md).

    ``on_row(report)`` is called after each method with the report so far (``complete`` False
    until the last row), so a long run can be written as it goes. ``previous``, such a report of
    an earlier run with the same domain, tasks and settings, gives back the rows it holds instead
    of scoring them again; one of other settings is refused.
    """
    from memdec_core.runs.meta import call_config, context_entry, run_meta
    from memdec_core.runs.prepare import methods_for_base, prepare_run

    folder = resolve_tasks_dir(tasks_dir)
    seed = settings.seed if settings is not None else 0
    loaded = [load_task(name, folder, max_examples=max_examples, validation_examples=validation_examples,
                        seed=seed) for name in _unique(tasks)]  # every file checked before a model loads
    run = prepare_run(domain, bases, methods, settings=settings, combiner=combiner,
                      component_settings=component_settings)
    names = [method.name for method in run.methods]
    options = {"tasks": list(tasks), "tasks_dir": str(folder) if folder else None, "max_examples": max_examples,
               "validation_examples": validation_examples}
    config = call_config(domain=domain, bases=run.bases, methods=names, combiner=run.combiner, settings=run.settings,
                         component_settings=component_settings, options=options)
    done = _reusable_rows(previous, config, run.caps)
    rows, contexts = [], {}

    def report(complete: bool) -> dict:
        meta = run_meta(settings=run.settings, bases=run.bases, methods=names, combiner=run.combiner,
                        contexts=contexts, config=config, command=command,
                        extra={"scoring": "dcpmi", "token_caps": run.caps_facts()})
        return {"domain": run.corpus.name, "tasks": [task.summary() for task in loaded], "results": list(rows),
                "meta": meta, "complete": complete}

    for base_name in run.bases:
        ctx = run.context(base_name)
        contexts[ctx.base.model_id] = context_entry(ctx)
        plans = [(task, _plans(task, ctx.base.tokenizer)) for task in loaded]
        for method in methods_for_base(ctx, run.methods):
            row = done.get((ctx.base.model_id, method.name))
            if row is not None:
                log(f"{method.name} on {ctx.base.short_name}: scored by an earlier run, kept")
            rows.append(row or _method_row(ctx, method, plans))
            if on_row is not None:
                on_row(report(complete=False))
    return report(complete=True)


def _reusable_rows(previous: dict | None, config: dict, caps: str) -> dict[tuple[str, str], dict]:
    """The rows of an earlier report of this run, keyed by (base, method); another run's are refused,
    and so is one whose caps read other text (``caps``: a base of another tokenizer was added or dropped)."""
    if not previous:
        return {}

    rows = previous.get("results", [])
    scored = {row.get("method") for row in rows}

    def comparable(values: dict) -> dict:
        """What a kept row depends on, as JSON reads back: not the bases and methods (more may be
        added), nor the settings of a method the earlier run did not score (they may change)."""
        kept = {key: value for key, value in values.items() if key not in ("bases", "methods", "settings")}
        methods = set(values.get("methods", []))
        kept["settings"] = {name: value for name, value in (values.get("settings") or {}).items()
                            if name not in methods or name in scored}
        return json.loads(json.dumps(kept, sort_keys=True, default=str))

    earlier = previous.get("meta", {}).get("config", {}).get("values")
    if not isinstance(earlier, dict) or comparable(earlier) != comparable(config["values"]):
        raise ConfigError("the earlier report was made with other settings (domain, tasks, windows or method "
                          "settings); give another --output, or run without --resume")
    from memdec_core.runs.prepare import TEXT_CAPS

    earlier_caps = (previous.get("meta", {}).get("token_caps") or {}).get("applied_as")
    if (earlier_caps == TEXT_CAPS) != (caps == TEXT_CAPS):
        raise ConfigError(f"the earlier report applied the token caps as {earlier_caps or 'tokens'}, this run as "
                          f"{caps} (bases of different tokenizers read the caps as text); give another --output, "
                          f"or run without --resume")
    return {(row["base"], row["method"]): row for row in rows}


def _unique(names: Sequence[str]) -> list[str]:
    if not names:
        raise ConfigError("give at least one task")
    return list(dict.fromkeys(names))


def _plans(task: Task, tokenizer) -> tuple[ScoringPlan, ScoringPlan | None]:
    test = plan_scoring(task.spec, task.test, tokenizer)
    return test, plan_scoring(task.spec, task.validation, tokenizer) if task.validation else None


def _method_row(ctx, method, plans) -> dict:
    result = method.evaluate(ctx)
    if result.loglikelihood is None:
        raise ConfigError(f"method {method.name} gives no loglikelihood, so it cannot score tasks "
                          f"(its plugin sets none in MethodResult)")
    chosen, grid = mixing_knobs(ctx.combiner, result.knobs)
    scored = {task.spec.name: score_task(task, test, validation, result.loglikelihood, chosen, grid,
                                         f"{task.spec.name} {method.name} {ctx.base.short_name}")
              for task, (test, validation) in plans}
    if (result.details or {}).get("knobs_from") == "fit":  # mixed with the weights fitted on validation
        for entry in scored.values():
            entry["knob_source"] = "fit"
    accuracies = [entry["accuracy"] for entry in scored.values()]
    return {"base": ctx.base.model_id, "method": method.name, "test_ppl": result.test_ppl, "knobs": result.knobs,
            "tasks": scored, "mean_accuracy": sum(accuracies) / len(accuracies)}


def score_task(task: Task, test: ScoringPlan, validation: ScoringPlan | None, loglikelihood: LogLikelihood,
               chosen: dict[str, Any], grid: list[dict], description: str) -> dict[str, Any]:
    """One task's accuracy for one method. ``chosen``: the combiner's knobs chosen on perplexity
    (empty for a method that does not mix); ``grid``: the settings to try on the task's validation
    slice, where it has one (``mixing_knobs``)."""
    tune = bool(grid) and validation is not None
    total = len(test.requests) + (len(validation.requests) * len(grid) if tune else 0)
    with progress_bar(description, total, "requests") as advance:
        tried = [(knobs, validation.accuracy(loglikelihood, knobs, advance)) for knobs in grid] if tune else []
        knobs = choose_knobs(tried, chosen) if tried else chosen
        accuracy = test.accuracy(loglikelihood, knobs or None, advance)
    entry = {"accuracy": accuracy, "examples": len(test.labels), "knobs": knobs,
             "knob_source": "validation" if tried else ("perplexity" if grid else "fixed") if chosen else None,
             "validation": [{**point, "accuracy": value} for point, value in tried]}
    if grid and not tried:
        entry["validation_note"] = task.validation_note
    return entry


__all__ = ["TaskSpec", "Task", "Example", "ScoringPlan", "task_names", "load_spec", "parse_spec", "load_task",
           "plan_scoring", "score_requests", "score_task", "evaluate_tasks", "resolve_tasks_dir"]
