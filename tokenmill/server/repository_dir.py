"""A model repository directory: one folder per served model, each with a `tokenmill.toml`
saying what to load and how (as Triton's model repository, with tokenmill's own config).

    DIR/
      chat/tokenmill.toml       kind = "generate"   model = "smollm2"
      minilm/tokenmill.toml     kind = "embedding"  model = "minilm"   load = false

    # DIR/chat/tokenmill.toml
    kind = "generate"           # "generate" (an LLM) or "embedding" (an encoder)
    model = "smollm2"           # a built-in name, or a path (relative to this folder)
    load = true                 # load at start (the default); false: listed as unavailable
                                # until POST /v2/repository/models/chat/load
    [engine]                    # this model's engine settings, named as the serve flags
    max_num_seqs = 4
    dtype = "float32"

The folder's name is the name clients use. Every file is read and checked before the server
starts; a mistake is a RepositoryConfigError naming the file and the field.
"""

from __future__ import annotations

import re
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenmill.config import EngineConfig

CONFIG_FILE = "tokenmill.toml"
KINDS = ("generate", "embedding")
# An embedding model has no KV cache nor scheduler: only these settings mean something to it.
EMBEDDING_SETTINGS = {"num_threads": int, "max_batch_tokens": int, "max_batch_inputs": int, "dtype": str}
# An encoder's linear dtypes (tokenmill/model/bert.py DTYPES, which this layer may not import).
ENCODER_DTYPES = ("auto", "float32", "bfloat16")
_TOP_FIELDS = ("kind", "model", "load", "engine")
NAME_PATTERN = r"[\w.:-]+"  # the names --model NAME=... accepts


class RepositoryConfigError(ValueError):
    """A repository directory or one of its config files is wrong; the message says where."""


@dataclass(frozen=True)
class ModelEntry:
    """One served model: its name, what to load, and its settings (the serve flags' values
    are the defaults; `settings` holds only what its config file sets)."""

    name: str
    model: str
    kind: str
    load_at_start: bool = True
    settings: dict[str, Any] = field(default_factory=dict)
    source: str = ""  # the config file, for messages


def read_repository(directory: str | Path) -> list[ModelEntry]:
    """Every model folder of `directory`, in name order (hidden folders and loose files are
    not models and are skipped)."""
    root = Path(directory).expanduser()
    if not root.is_dir():
        raise RepositoryConfigError(f"--model-repository {directory}: not a directory")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise RepositoryConfigError(f"--model-repository {root}: no model folders in it "
                                    f"(each model is a folder holding a {CONFIG_FILE})")
    return [read_model_folder(folder) for folder in folders]


def read_model_folder(folder: Path) -> ModelEntry:
    path = folder / CONFIG_FILE
    if not re.fullmatch(NAME_PATTERN, folder.name):
        raise RepositoryConfigError(f"{folder}: a model folder's name is the model's name, and may hold only "
                                    f"letters, digits and . _ : -")
    if not path.is_file():
        raise RepositoryConfigError(f"{folder}: no {CONFIG_FILE} in this model folder")
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise RepositoryConfigError(f"{path}: not valid TOML: {e}") from None
    where = str(path)
    unknown = sorted(set(doc) - set(_TOP_FIELDS))
    if unknown:
        raise RepositoryConfigError(f"{where}: unknown field {unknown[0]!r}; the fields are {', '.join(_TOP_FIELDS)}")
    kind = _required(doc, "kind", str, where)
    if kind not in KINDS:
        raise RepositoryConfigError(f"{where}: field 'kind' is {kind!r}; it must be one of {', '.join(KINDS)}")
    model = _required(doc, "model", str, where)
    if not model:
        raise RepositoryConfigError(f"{where}: field 'model' is empty")
    load = doc.get("load", True)
    if not isinstance(load, bool):
        raise RepositoryConfigError(f"{where}: field 'load' must be true or false, not {load!r}")
    engine = doc.get("engine", {})
    if not isinstance(engine, dict):
        raise RepositoryConfigError(f"{where}: 'engine' must be a table ([engine]) of settings")
    settings = _embedding_settings(engine, where) if kind == "embedding" else _engine_settings(engine, where)
    # A path is relative to the model's folder, so a repository can move as a whole.
    local = folder / Path(model).expanduser()
    return ModelEntry(folder.name, str(local) if local.exists() else model, kind, load, settings, where)


def _required(doc: dict, key: str, kind: type, where: str):
    if key not in doc:
        raise RepositoryConfigError(f"{where}: field {key!r} is missing")
    value = doc[key]
    if not isinstance(value, kind):
        raise RepositoryConfigError(f"{where}: field {key!r} must be a {kind.__name__}, not {value!r}")
    return value


def _engine_settings(engine: dict, where: str) -> dict[str, Any]:
    known = EngineConfig.settings()
    for key, value in engine.items():
        if key == "model":
            raise RepositoryConfigError(f"{where}: [engine] model: the model is the top-level field 'model'")
        if key not in known:
            raise RepositoryConfigError(f"{where}: [engine] unknown setting {key!r}; the settings are the serve "
                                        f"command's engine flags: {', '.join(k for k in known if k != 'model')}")
        group = known[key][0]
        _check_type(key, value, typing.get_type_hints(EngineConfig.groups()[group])[key], where)
    try:  # the ranges and choices, checked as the flags are
        EngineConfig.from_flat(**engine)
    except (TypeError, ValueError) as e:
        raise RepositoryConfigError(f"{where}: [engine] {e}") from None
    return dict(engine)


def _embedding_settings(engine: dict, where: str) -> dict[str, Any]:
    for key, value in engine.items():
        if key not in EMBEDDING_SETTINGS:
            raise RepositoryConfigError(f"{where}: [engine] {key!r} is not a setting of an embedding model; "
                                        f"those are {', '.join(EMBEDDING_SETTINGS)}")
        _check_type(key, value, EMBEDDING_SETTINGS[key], where)
        if key == "dtype":
            if value not in ENCODER_DTYPES:
                raise RepositoryConfigError(f"{where}: [engine] dtype of an embedding model is one of "
                                            f"{', '.join(ENCODER_DTYPES)}, not {value!r}")
        elif value < 1:
            raise RepositoryConfigError(f"{where}: [engine] {key} must be positive, not {value}")
    return dict(engine)


def _check_type(key: str, value: Any, hint, where: str) -> None:
    # `int | None` -> int: a file sets a value or leaves the setting out
    base = next((t for t in typing.get_args(hint) if t is not type(None)), hint)
    ok = (isinstance(value, bool) if base is bool
          else isinstance(value, (int, float)) and not isinstance(value, bool) if base is float
          else isinstance(value, base) and not isinstance(value, bool))
    if not ok:
        raise RepositoryConfigError(f"{where}: [engine] {key} must be a {base.__name__}, not {value!r}")
