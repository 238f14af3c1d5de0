"""Base models: load from a registered name, a local folder, a GGUF file or a hub id.

Also the two facts memdec needs about a model beyond its logits: the fingerprint of its
tokenizer (so a memory is never mixed with a base of another vocabulary) and the input of its
last block's MLP (``last_ffn_input``), the key of a kNN-LM datastore.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from memdec_core.errors import ArtifactError, ConfigError, ModelError, UnknownComponentError
from memdec_core.inputs.gguf import check_gguf_file
from memdec_core.inputs.model_cards import hub_id, looks_like_path
from memdec_core.runtime import collector
from memdec_core.runtime.timings import timed

#: model_type → dotted path of the list of decoder blocks, whose last one holds the MLP.
BLOCK_PATHS = {
    "gpt2": "transformer.h",
    "llama": "model.layers",
    "mistral": "model.layers",
    "qwen2": "model.layers",
    "qwen3": "model.layers",
    "gemma": "model.layers",
    "gemma2": "model.layers",
    "gemma3_text": "model.layers",
    "gemma3": "model.language_model.layers",
}


@dataclass
class LoadedModel:
    """A causal LM ready to score, with what identifies it.

    ``load_model(..., lazy=True)`` reads the weights on the first use of ``model``: a run that
    finds its artifacts built (an index of a stored datastore) never imports the architecture's
    code or reads a weight. The tokenizer of a local folder is loaded on the first use of
    ``tokenizer`` too: what memdec reads from it (``TokenizerFacts``) is remembered by the
    folder's files, so a run whose token streams are cached never loads it.
    """

    _model: Any
    _tokenizer: Any
    model_id: str  # what the user named
    fingerprint: str  # changes when the weights change; part of artifact cache keys
    tokenizer_fingerprint: str
    _loader: Callable[[], Any] | None = field(default=None, repr=False, compare=False)
    _positions: int | None = field(default=None, repr=False, compare=False)  # its config's, before the model
    _tokenizer_loader: Callable[[], Any] | None = field(default=None, repr=False, compare=False)
    tokenization_key: str | None = field(default=None, compare=False)  # names its token streams (inputs.data)

    @property
    def model(self) -> Any:
        if self._model is None and self._loader is not None:
            self._model, self._loader = self._loader(), None
        return self._model

    @model.setter
    def model(self, model: Any) -> None:
        self._model, self._loader = model, None

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None and self._tokenizer_loader is not None:
            self._tokenizer, self._tokenizer_loader = self._tokenizer_loader(), None
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, tokenizer: Any) -> None:
        self._tokenizer, self._tokenizer_loader = tokenizer, None

    @property
    def short_name(self) -> str:
        """For progress bars: the last part of a path (its folder for a ``model.gguf``-style file)."""
        path = Path(self.model_id)
        return path.parent.name if path.suffix == ".gguf" and path.parent.name else path.name or self.model_id

    @property
    def vocab_size(self) -> int:
        return self.model.get_output_embeddings().weight.shape[0]

    @property
    def max_positions(self) -> int | None:
        if self._model is None and self._positions is not None:
            return self._positions
        config = self.model.config
        config = getattr(config, "text_config", None) or config
        return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def default_device():
    """Where models run: ``$MEMDEC_DEVICE`` (cpu, cuda, cuda:1, mps), else the GPU when there is one.

    Models compute there; everything memdec does with their outputs (mixing, kNN, targets) stays
    on the CPU, so only the forward and backward passes move.
    """
    import torch

    from memdec_core.runtime.distributed import world

    name = os.environ.get("MEMDEC_DEVICE", "").strip()
    if not name:  # under a launcher, each rank has its own GPU
        return torch.device("cuda", world().local_rank) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ConfigError(f"MEMDEC_DEVICE={name!r} is not a torch device ({_first_line(error)})") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"MEMDEC_DEVICE={name!r} but torch sees no CUDA GPU")
    return device


#: ``--dtype`` / ``$MEMDEC_DTYPE`` names → torch dtypes; "auto" is bf16 on GPUs that have it, else fp32.
DTYPE_NAMES = ("auto", "fp32", "bf16", "fp16")


def compute_dtype() -> str:
    """The precision forward and backward passes run in: ``$MEMDEC_DTYPE`` (``--dtype``), checked
    against the device. Weights stay fp32 (training's master copy); the passes run under
    autocast; the mixture, the KL and kNN distances are computed in fp32, keys stored in fp16."""
    import torch

    name = os.environ.get("MEMDEC_DTYPE", "").strip().lower() or "auto"
    if name not in DTYPE_NAMES:
        raise ConfigError(f"MEMDEC_DTYPE={name!r} is not one of {', '.join(DTYPE_NAMES)}")
    device = default_device()
    if name == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if name != "fp32" and device.type == "cpu":
        raise ConfigError(f"--dtype {name} needs a GPU: on the CPU memdec computes in fp32 (bf16 is several times "
                          f"slower there and fp16 is not supported); drop --dtype or pass --dtype fp32")
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"--dtype bf16: {torch.cuda.get_device_name(device)} has no bf16; use --dtype fp16")
    return name


@contextlib.contextmanager
def autocast(dtype: str | None = None):
    """Run the block's model passes in ``dtype`` (default :func:`compute_dtype`); fp32 is a no-op."""
    import torch

    dtype = dtype or compute_dtype()
    if dtype == "fp32":
        yield
        return
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    with torch.autocast(device_type=default_device().type, dtype=torch_dtype):
        yield


def model_device(model):
    """The device of a model's weights."""
    return next(model.parameters()).device


@timed("load")
def load_model(name: str, cache_dir: Path | None = None, *, lazy: bool = False) -> LoadedModel:
    """Load a model in fp32 on :func:`default_device`, in eval mode.

    ``lazy``: the weights on the first use of ``.model`` (checked then), where the folder's
    config.json names the model's positions; otherwise now. The tokenizer of a local folder whose
    facts are remembered (``remembered_tokenizer``) is loaded on the first use of ``.tokenizer``.
    """
    location = loadable_location(name, cache_dir)
    facts, tokenizer = remembered_tokenizer(location, name)
    identity = dict(model_id=name, fingerprint=_model_fingerprint(name, location),
                    tokenizer_fingerprint=facts.fingerprint, tokenization_key=facts.tokenization_key,
                    _tokenizer_loader=None if tokenizer is not None else lambda: _tokenizer(location, name))
    positions = _configured_positions(location) if lazy else None
    if positions is not None:
        return LoadedModel(None, tokenizer, _loader=lambda: _load_weights(location, name, facts),
                           _positions=positions, **identity)
    return LoadedModel(_load_weights(location, name, facts), tokenizer, **identity)


@timed("load")
def _load_weights(location: str, name: str, facts: "TokenizerFacts"):
    """The model of a base, checked against the facts of its tokenizer."""
    model, _ = _from_pretrained(location, name, facts=facts)
    model = model.to(default_device()).eval()
    collector.settle()  # start-up's imports and the model are in: they need no more collecting
    return model


@dataclass(frozen=True)
class TokenizerFacts:
    """What memdec reads from a tokenizer, so that it need not be loaded to be named: its
    fingerprint (vocabulary and merges), the key of its token streams (``data.tokenization_key``),
    the ids it can give and whether it holds special tokens only (``_check_tokenizer_fits``)."""

    fingerprint: str
    tokenization_key: str
    ids: int
    special_only: bool

    @classmethod
    def of(cls, tokenizer) -> "TokenizerFacts":
        from memdec_core.inputs.data import tokenization_key

        vocab = tokenizer.get_vocab()
        return cls(tokenizer_fingerprint(tokenizer), tokenization_key(tokenizer),
                   max(len(tokenizer), max(vocab.values(), default=-1) + 1),
                   len(vocab) <= len(set(tokenizer.all_special_tokens)))


#: Bumped when TokenizerFacts or what it is computed from changes: older memos are not read.
TOKENIZER_MEMO_FORMAT = 1
#: Files of a model folder that do not decide its tokenizer (the weights): left out of the memo's name.
WEIGHT_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".onnx"}


def remembered_tokenizer(location: str, name: str) -> "tuple[TokenizerFacts, Any]":
    """``(facts, tokenizer)`` of ``location``'s tokenizer: for a local folder whose facts were
    remembered, ``(facts, None)`` without loading it; otherwise it is loaded, and a folder's facts
    remembered (``store.memo``) under the contents of every file of the folder but the weights,
    with the versions of transformers and tokenizers."""
    from memdec_core.store.memo import recall, remember

    _check_tokenizer_files(location, name)  # before any memo: a folder that lost its files is refused
    memo = _tokenizer_memo_name(Path(location))
    known = recall(memo) if memo is not None else None
    if isinstance(known, dict):
        with contextlib.suppress(TypeError):  # a memo of another shape: the tokenizer itself below
            return TokenizerFacts(**known), None
    tokenizer = _tokenizer(location, name)
    facts = TokenizerFacts.of(tokenizer)
    if memo is not None and not facts.special_only:  # an empty tokenizer is refused, never remembered
        remember(memo, dataclasses.asdict(facts))
    return facts, tokenizer


def _tokenizer_memo_name(folder: Path) -> str | None:
    """The memo's name for a local folder's tokenizer; None for a hub id or an unreadable folder."""
    from importlib.metadata import PackageNotFoundError, version

    if not folder.is_dir():
        return None
    try:
        versions = [version(package) for package in ("transformers", "tokenizers")]
        files = [f"{file.name}:{_file_digest(file)}" for file in sorted(folder.iterdir())
                 if file.is_file() and file.suffix not in WEIGHT_SUFFIXES]
    except (OSError, PackageNotFoundError):
        return None
    payload = "|".join([str(TOKENIZER_MEMO_FORMAT), *versions, *files])
    return f"tokenizer-{hashlib.sha256(payload.encode()).hexdigest()[:32]}.json"


def _configured_positions(location: str) -> int | None:
    """The positions a local folder's config.json names (its text model's, for a multimodal one), as
    ``LoadedModel.max_positions`` reads them from the loaded config; None where it names none (a
    value left at its class's default is not written) or there is no local config."""
    try:
        config = json.loads((Path(location) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    config = config.get("text_config") or config
    value = config.get("max_position_embeddings") or config.get("n_positions")
    return value if isinstance(value, int) and value > 0 else None


def _tokenizer(location: str, name: str):
    from transformers import AutoTokenizer

    _check_tokenizer_files(location, name)
    try:
        return AutoTokenizer.from_pretrained(location)
    except (OSError, ValueError) as error:
        raise ModelError(f"cannot load model {name!r}: {_first_line(error)}") from error
    except Exception as error:  # a local folder's broken file (a corrupt tokenizer.json) raises what its reader raises
        if not Path(location).is_dir():
            raise
        raise ModelError(f"cannot load model {name!r}: {_first_line(error)}") from error


def loadable_location(name: str, cache_dir: Path | None = None) -> str:
    """The folder (or hub id) transformers loads ``name`` from: a GGUF file, which carries its
    tokenizer inside, is dequantised into a folder once (``_gguf_as_hf_folder``, then cached)."""
    location, gguf_file = resolve_model_location(name)
    return _gguf_as_hf_folder(Path(location), gguf_file, cache_dir) if gguf_file else location


def resolve_model_location(name: str) -> tuple[str, str | None]:
    """``(folder or hub id, gguf file name or None)`` for what a user typed."""
    from memdec_core.components import registry

    if name in registry.components("models"):
        return registry.get("models", name)().path(), None
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"model file not found: {path}")
        check_gguf_file(path)  # garbage after the magic: one line here, not the reader's UnicodeDecodeError
        return str(path.parent), path.name
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelError(f"{path} is not a model folder (no config.json)")
        return str(path), None
    if looks_like_path(name):
        raise ModelError(f"model path not found: {name}")
    _check_hub_model(name)
    return name, None


#: Seconds to wait for the hub's answer about a model: an unreachable hub fails at once or after this.
HUB_PROBE_TIMEOUT = 3.0


def _check_hub_model(name: str) -> None:
    """Refuse a hub id that cannot be loaded, in one line: not in the local HF cache and the hub
    (huggingface_hub's ``HF_ENDPOINT``, through any proxy it is given) is offline, unreachable or
    without it. Checked up front because an unreachable hub makes transformers retry for most of
    a minute."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url, try_to_load_from_cache
    from huggingface_hub.utils import (
        EntryNotFoundError,
        GatedRepoError,
        HFValidationError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    local = "pass a local model folder or a registered name"
    try:
        if isinstance(try_to_load_from_cache(name, "config.json"), str):
            return
        url = hf_hub_url(name, "config.json")
    except HFValidationError:
        raise _unknown_model(name, f"neither a local path nor a hub id; {local}") from None
    if constants.HF_HUB_OFFLINE:  # huggingface_hub's own switch: HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE
        raise _unknown_model(name, f"not in the local Hugging Face cache, and HF_HUB_OFFLINE is set; {local}, "
                                   f"or unset HF_HUB_OFFLINE")
    not_there = f"not a local path, and {constants.ENDPOINT} has no such model; {local}"
    try:
        get_hf_file_metadata(url, timeout=HUB_PROBE_TIMEOUT)
    except GatedRepoError:
        return  # it exists; transformers explains the access it needs
    except (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError):
        raise _unknown_model(name, not_there) from None
    except Exception as error:  # no answer (DNS, refused, timeout, proxy, server error): the hub is unreachable
        if getattr(getattr(error, "response", None), "status_code", None) == 404:  # a mirror's plain "not found"
            raise _unknown_model(name, not_there) from None
        cause = f"{type(error).__name__}: {_first_line(error)[:120]}"
        raise _unknown_model(name, f"not a local path, and the hub ({constants.ENDPOINT}) is unreachable ({cause}); "
                                   f"{local}, or set HF_ENDPOINT to a reachable mirror (HF_HUB_OFFLINE=1 uses the "
                                   f"local cache only, without trying)") from None


def _unknown_model(name: str, hint: str) -> UnknownComponentError:
    from memdec_core.components import registry

    return UnknownComponentError("model", name, registry.names("models"), hint=hint)


def model_skeleton(name: str, cache_dir: Path | None = None):
    """``(model, tokenizer)`` of ``name`` with the model built from its config on torch's meta
    device: its parameters and blocks can be counted without reading (or holding) a weight."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    location = loadable_location(name, cache_dir)  # a GGUF file tells its shapes once dequantised
    _check_tokenizer_files(location, name)
    try:
        config = AutoConfig.from_pretrained(location)
        tokenizer = AutoTokenizer.from_pretrained(location)
    except (OSError, ValueError) as error:
        raise ModelError(f"cannot load model {name!r}: {_first_line(error)}") from error
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config), tokenizer


def tokenizer_facts(name: str, cache_dir: Path | None = None) -> TokenizerFacts:
    """The facts of the tokenizer ``load_model(name)`` would give (remembered for a local folder,
    which is then not loaded)."""
    return remembered_tokenizer(loadable_location(name, cache_dir), name)[0]


def load_tokenizer(name: str, cache_dir: Path | None = None):
    """The tokenizer ``load_model(name)`` would give, without reading the weights."""
    from transformers import AutoTokenizer

    location = loadable_location(name, cache_dir)
    _check_tokenizer_files(location, name)
    try:
        return AutoTokenizer.from_pretrained(location)
    except (OSError, ValueError) as error:
        raise ModelError(f"cannot load the tokenizer of {name!r}: {_first_line(error)}") from error


def _from_pretrained(location: str, name: str, facts: TokenizerFacts | None = None, **kwargs):
    """``(model, tokenizer)``; with the tokenizer's ``facts`` given, ``(model, None)``: the
    tokenizer is not loaded, the model is checked against its facts."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # memdec shows its own progress
    if not kwargs.get("gguf_file") and facts is None:  # a GGUF file carries its tokenizer inside
        _check_tokenizer_files(location, name)
    tokenizer = None
    try:
        with _held_logs() as held:  # transformers' load report reaches stderr only if memdec keeps the model
            if facts is None:  # (transformers' tokenizer code is imported only then: 0.1 s)
                from transformers import AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
            # Mismatched shapes are reported below, not raised with a pointer to a report left unshown.
            model, info = AutoModelForCausalLM.from_pretrained(location, dtype=torch.float32, output_loading_info=True,
                                                               ignore_mismatched_sizes=True, **kwargs)
    except (OSError, ValueError) as error:
        raise ModelError(f"cannot load model {name!r}: {_first_line(error)}") from error
    except Exception as error:
        # A local folder's broken files (a truncated safetensors, a corrupt tokenizer.json) surface as
        # whatever the reader raises. An ImportError for a GGUF file is load_model's to explain.
        if not Path(location).is_dir() or (isinstance(error, ImportError) and kwargs.get("gguf_file")):
            raise
        raise ModelError(f"cannot load model {name!r}: {_first_line(error)}") from error
    _check_loaded_weights(model, info, name)
    _check_tokenizer_fits(model, facts or TokenizerFacts.of(tokenizer), name)
    for handler, record in held:  # unexpected extra weights and the like stay warnings
        handler.handle(record)
    return model, tokenizer


#: Files that hold a tokenizer's vocabulary, one of which a model folder needs: without them
#: transformers falls back to an empty tokenizer, and every text scores as nothing.
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "vocab.txt", "tekken.json")
TOKENIZER_PATTERNS = ("*.model", "*.tiktoken")  # SentencePiece (tokenizer.model, spiece.model), tiktoken


def _check_tokenizer_files(location: str, name: str) -> None:
    """Refuse a local folder with no tokenizer files: transformers would load an empty tokenizer."""
    folder = Path(location)
    if not folder.is_dir() or any((folder / file).is_file() for file in TOKENIZER_FILES):
        return
    if any(next(folder.glob(pattern), None) for pattern in TOKENIZER_PATTERNS):
        return
    raise ModelError(f"cannot load model {name!r}: {folder} has no tokenizer files (tokenizer.json, vocab.json "
                     f"and merges.txt, or a SentencePiece tokenizer.model); copy in the tokenizer it was trained with")


def _check_tokenizer_fits(model, facts: TokenizerFacts, name: str) -> None:
    """Refuse a tokenizer that is empty, or has ids past the model's embedding rows (each such id
    would be an IndexError in the middle of a run)."""
    if facts.special_only:  # a hub repo without tokenizer files loads so
        raise ModelError(f"cannot load model {name!r}: its tokenizer holds special tokens only "
                         f"(are its tokenizer files missing?)")
    rows = min(layer.weight.shape[0] for layer in (model.get_input_embeddings(), model.get_output_embeddings())
               if layer is not None)
    if facts.ids > rows:
        raise ModelError(f"cannot load model {name!r}: its tokenizer has {facts.ids:,} ids but the model only "
                         f"{rows:,} embedding rows; use the tokenizer the model was trained with, or resize its "
                         f"embeddings")


@contextlib.contextmanager
def _held_logs():
    """Keep back what transformers logs meanwhile: yields the ``(handler, record)`` pairs to replay."""
    import logging

    held: list = []
    filters = []
    for handler in logging.getLogger("transformers").handlers:
        def hold(record, handler=handler):
            held.append((handler, record))
            return False

        handler.addFilter(hold)
        filters.append((handler, hold))
    try:
        yield held
    finally:
        for handler, hold in filters:
            handler.removeFilter(hold)


def _check_loaded_weights(model, info: dict, name: str) -> None:
    """Refuse weights that transformers would silently initialise at random: missing or of the wrong shape."""
    missing = _untied_missing_weights(model, info.get("missing_keys") or ())
    if missing:
        raise ModelError(f"cannot load model {name!r}: its weights lack {_some(missing)} "
                         f"(a renamed or missing tensor would be randomly initialised)")
    mismatched = sorted(info.get("mismatched_keys") or (), key=str)
    if mismatched:
        shown = [f"{entry[0]} ({tuple(entry[1])} in the file, {tuple(entry[2])} in the config)"
                 if isinstance(entry, (tuple, list)) and len(entry) == 3 else str(entry) for entry in mismatched]
        raise ModelError(f"cannot load model {name!r}: weights of the wrong shape: {_some(shown)}")


def _some(items: list[str]) -> str:
    return ", ".join(items[:3]) + (f" and {len(items) - 3} more" if len(items) > 3 else "")


def _untied_missing_weights(model, missing_keys) -> list[str]:
    """The missing parameters that are not tied to a loaded one (a tied lm_head shares the embeddings)."""
    if not missing_keys:
        return []
    missing = set(missing_keys)
    parameters = dict(model.named_parameters(remove_duplicate=False))
    loaded = {parameter.data_ptr() for key, parameter in parameters.items() if key not in missing}
    return sorted(key for key in missing if key in parameters and parameters[key].data_ptr() not in loaded)


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def _gguf_as_hf_folder(folder: Path, gguf_file: str, cache_dir: Path | None) -> str:
    """Dequantise a GGUF file once into a safetensors folder: later loads take seconds, not a minute."""
    target_file = folder / gguf_file
    stat = target_file.stat()
    key = hashlib.sha256(f"{target_file.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    from memdec_core.inputs.model_cards import write_readme
    from memdec_core.store.artifacts import atomic_directory
    from memdec_core.store.cache_dir import cache_folder, entry_lock

    models = Path(cache_dir) / "models" if cache_dir is not None else cache_folder("models")
    converted = models / f"{target_file.stem}-{key}"

    with entry_lock(converted):  # two runs loading one GGUF file convert it once
        if (converted / "config.json").exists():
            return str(converted)
        try:
            model, tokenizer = _from_pretrained(str(folder), str(target_file), gguf_file=gguf_file)
        except ImportError as error:
            raise ModelError(f"loading {target_file.name} needs the gguf package: pip install gguf") from error
        with atomic_directory(converted) as temporary:
            _save_dequantised(model, tokenizer, temporary)
            # A README only: memdec.json (a .json file, with a timestamp) would enter the model's fingerprint.
            write_readme(temporary, f"{target_file.name}, dequantised", [
                f"- The weights of `{target_file}` ({stat.st_size:,} bytes) dequantised to safetensors once, "
                "so that later loads take seconds; memdec loads this folder whenever that file is named.",
                "- A plain Hugging Face model folder: `AutoModelForCausalLM.from_pretrained(THIS_FOLDER)`."],
                tags=("gguf", "dequantised"))
    return str(converted)


def _save_dequantised(model, tokenizer, folder: Path) -> None:
    # A GGUF-loaded model refuses save_pretrained (it carries a quantization config): rebuild it
    # from its plain config and copy the dequantised weights over.
    from transformers import AutoModelForCausalLM

    config = model.config
    with contextlib.suppress(AttributeError):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config)
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    plain.tie_weights()
    tied = set(getattr(plain, "_tied_weights_keys", None) or [])
    if unexpected or set(missing) - tied:
        raise ModelError(f"converting the GGUF model lost weights: missing {sorted(set(missing) - tied)[:3]}, "
                         f"unexpected {sorted(unexpected)[:3]}")
    save_model(plain, folder)
    tokenizer.save_pretrained(folder)


def save_model(model, folder: Path, state_dict: dict | None = None) -> None:
    """``model.save_pretrained(folder)`` on whichever process calls it, checked to have written something
    (``state_dict``: the weights to write instead of the model's own, e.g. gathered from FSDP shards).

    Once a process group exists, transformers writes nothing from a rank other than 0 (it assumes
    every rank saves the same model). memdec builds a cache entry in the one rank that holds its
    lock, which may be any rank, so that rank must write.
    """
    from transformers import PreTrainedModel

    inner = [module for module in (model, getattr(model, "get_base_model", lambda: None)())
             if isinstance(module, PreTrainedModel)]
    for module in inner:
        module.should_save_on_this_rank = lambda is_main_process: is_main_process
    try:
        model.save_pretrained(folder, **({"state_dict": state_dict} if state_dict is not None else {}))
    finally:
        for module in inner:
            del module.should_save_on_this_rank
    if not any(Path(folder).iterdir()):
        from memdec_core.runtime.distributed import world

        raise ModelError(f"saving {type(model).__name__} to {folder} wrote nothing (rank {world().rank})")


def base_reference(base: LoadedModel) -> dict:
    """How an artifact names its base so that another machine can find it: a registered name or a
    hub id (the same model everywhere), else its path (relative to the cache inside it); and the
    fingerprints that tell whether the model found under that name is the same one."""
    from memdec_core.components import registry
    from memdec_core.store.artifacts import artifact_reference

    name = base.model_id
    source = "registered" if name in registry.components("models") else "hub" if hub_id(name) else "path"
    return {"name": artifact_reference(name) if source == "path" else name, "source": source,
            "fingerprint": base.fingerprint, "tokenizer_fingerprint": base.tokenizer_fingerprint}


def referenced_base(manifest: dict) -> tuple[str | None, str | None]:
    """The name to load an artifact's base by, and its fingerprint: from the manifest's ``base``
    reference, or ``base_model`` and ``model_fingerprint`` in manifests written before it."""
    from memdec_core.store.artifacts import resolve_reference

    reference = manifest.get("base")
    if not isinstance(reference, dict) or not reference.get("name"):
        return manifest.get("base_model"), manifest.get("model_fingerprint")
    name = str(reference["name"])
    if reference.get("source") == "path":
        return str(resolve_reference(name)), reference.get("fingerprint")
    if looks_like_path(name):  # a registered name or hub id never does: this one was edited in
        raise ArtifactError(f"the manifest's {reference.get('source')} base {name!r} is a path, not a name; refused")
    return name, reference.get("fingerprint")


def model_fingerprint(name: str) -> str:
    """The fingerprint ``load_model(name)`` would give, without loading the weights."""
    return _model_fingerprint(name, resolve_model_location(name)[0])


def _model_fingerprint(name: str, location: str) -> str:
    """A hash of the weight and config files' contents (a hub id not yet downloaded: its name).

    Content, not paths or times: a copied folder, a fresh clone or a reinstall keeps its cached
    artifacts. Each file is hashed once; the digest is remembered by path, size and mtime.
    """
    folder = Path(location)
    if not folder.is_dir():
        return hashlib.sha256(name.encode()).hexdigest()[:16]
    parts = [f"{file.name}:{_file_digest(file)}" for file in sorted(folder.iterdir())
             if file.suffix in {".safetensors", ".bin", ".gguf", ".json"} and file.is_file()]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def _file_digest(file: Path) -> str:
    """The sha256 of a file's contents, remembered (``store.memo``) by its path, size and mtime."""
    from memdec_core.store.memo import remembered

    def contents_digest() -> str:
        digest = hashlib.sha256()
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
        return digest.hexdigest()

    stat = file.stat()
    key = hashlib.sha256(f"{file.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:32]
    value = remembered(f"file-{key}.json", contents_digest)
    return value if isinstance(value, str) else contents_digest()  # a memo of another shape: not trusted


def tokenizer_fingerprint(tokenizer) -> str:
    """A stable hash of the vocabulary (with added tokens) and the BPE merges."""
    vocab = sorted(tokenizer.get_vocab().items())
    merges: list = []
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        model = json.loads(backend.to_str()).get("model", {})
        merges = [" ".join(m) if isinstance(m, list) else m for m in model.get("merges", [])]
    payload = json.dumps({"vocab": vocab, "merges": merges}, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def decoder_blocks(model):
    """The decoder blocks (a ModuleList) of a causal LM of a supported architecture."""
    model_type = model.config.model_type
    if model_type not in BLOCK_PATHS:
        raise ModelError(f"architecture {model_type!r} is not supported: memdec needs its decoder blocks "
                         f"(supported: {', '.join(sorted(BLOCK_PATHS))})")
    blocks = model
    for attribute in BLOCK_PATHS[model_type].split("."):
        blocks = getattr(blocks, attribute)
    return blocks


def last_block_mlp(model):
    """The MLP module of the last decoder block; its input is the datastore key."""
    return decoder_blocks(model)[-1].mlp


class ForwardStopped(Exception):
    """A forward pass ended by ``capture_last_ffn_input(stop=True)`` once it had the hidden states."""


@contextlib.contextmanager
def capture_last_ffn_input(model, stop: bool = False):
    """Record the input of the last block's MLP (already normalised) on every forward pass.

    Yields a dict whose ``"hidden"`` entry holds the latest ``[batch, length, dim]`` tensor.
    ``stop``: nothing after it is needed (a datastore's keys), so the pass ends there, raising
    ``ForwardStopped`` for the caller to catch: the last MLP and the final norm are not run.
    """
    captured: dict[str, Any] = {}

    def hook(_module, args):
        captured["hidden"] = args[0].detach()
        if stop:
            raise ForwardStopped

    handle = last_block_mlp(model).register_forward_pre_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()
