"""Configuration: the whole `Config` (its sections in config_sections.py), loaded from None,
a dict, a YAML path or a Config.

`GRADMON_<SECTION>__<KEY>` environment variables override file and dict values; they are
read only here, when a config is loaded, never at import time.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import (
    BaseModel,
    Field,
    ValidationError,
)

from gradmon.config_sections import (
    BasicAuthConfig,
    CollectConfig,
    ExporterConfig,
    HealthConfig,
    PushConfig,
    PushTLSConfig,
    RecordConfig,
    Section,
    TensorboardConfig,
    TLSConfig,
)
from gradmon.errors import GradmonError

# The sections are importable from here too: gradmon.config is their public home.
__all__ = [
    "ENV_PREFIX",
    "BasicAuthConfig",
    "CollectConfig",
    "Config",
    "ExporterConfig",
    "HealthConfig",
    "PushConfig",
    "PushTLSConfig",
    "RecordConfig",
    "TLSConfig",
    "TensorboardConfig",
    "dump_config",
    "key_path",
    "load_config",
    "merge_dicts",
    "read_yaml",
]

ENV_PREFIX = "GRADMON_"
_NULLS = {"", "null", "none", "~"}
_PLAIN_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class Config(Section):
    """The whole gradmon configuration: collect, exporter, health, tensorboard, record."""

    run_id: str | None = Field(None, description="identity of the run in gradmon_info")
    collect: CollectConfig = Field(default_factory=CollectConfig)
    exporter: ExporterConfig = Field(default_factory=ExporterConfig)
    health: HealthConfig = Field(default_factory=HealthConfig)
    tensorboard: TensorboardConfig = Field(default_factory=TensorboardConfig)
    record: RecordConfig = Field(default_factory=RecordConfig)


def key_path(loc: tuple[int | str, ...]) -> str:
    """`collect.include`; a key that is not a plain name is JSON-quoted (`"a.b"`, `""`), so
    a path names exactly one place even when keys hold dots or spaces."""
    parts = [p if isinstance(p, int) or _PLAIN_KEY.match(p) else json.dumps(p) for p in loc]
    return ".".join(str(p) for p in parts) or "<root>"


def _format_errors(exc: ValidationError, source: str) -> str:
    lines = [f"invalid gradmon config ({source}):"]
    for err in exc.errors():
        key = key_path(err["loc"])
        if err["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key; allowed here: {_allowed_keys(err['loc'])}")
        else:
            lines.append(f"  {key}: {err['msg']} (got {err['input']!r})")
    return "\n".join(lines)


def _allowed_keys(loc: tuple[int | str, ...]) -> str:
    model: type[BaseModel] = Config
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        annotation = field.annotation if field else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return "?"
        model = annotation
    return ", ".join(model.model_fields)


def _env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """`GRADMON_EXPORTER__PORT=0` -> {"exporter": {"port": "0"}}.

    Values stay strings (pydantic coerces "0", "true", "1e-6"); an empty value or
    null/none/~ means null. Not YAML: a regex such as `[ab].*` must stay a string.
    """
    tree: dict[str, Any] = {}
    for name, raw in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        path = name[len(ENV_PREFIX) :].lower().split("__")
        if not all(path):
            raise GradmonError(f"environment variable {name}: empty key in path")
        value: str | None = None if raw.strip().lower() in _NULLS else raw
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise GradmonError(f"environment variable {name}: {part} is not a section")
        node[path[-1]] = value
    return tree


def merge_dicts(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """Nested dict merge: `over` wins, sections are merged key by key."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge_dicts(dict(out[key]), value)
        else:
            out[key] = value
    return out


def read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise GradmonError(f"gradmon config file {p} is not UTF-8 text: {exc.reason}") from None
    except (OSError, ValueError) as exc:  # ValueError: e.g. a NUL byte in the path
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise GradmonError(f"cannot read gradmon config file {p!r}: {reason}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise GradmonError(f"gradmon config file {p} is not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise GradmonError(
            f"gradmon config file {p} must hold a mapping of sections "
            f"(collect, exporter, health, ...), not a {type(data).__name__}"
        )
    return data


def load_config(
    config: Config | Mapping[str, Any] | str | os.PathLike[str] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Resolve what `attach(config=...)` accepts into a validated Config.

    A Config object is used as is; for None, a dict or a YAML path, GRADMON_* environment
    variables are applied on top (so operators can override a committed file).
    """
    if isinstance(config, Config):
        return config
    if config is None:
        data: dict[str, Any] = {}
        source = "defaults"
    elif isinstance(config, Mapping):
        data = dict(config)
        source = "dict"
    elif isinstance(config, str | os.PathLike):
        data = read_yaml(config)
        source = f"file {os.fspath(config)}"
    else:
        raise GradmonError(
            "config must be None, a dict, a YAML file path or gradmon.Config, "
            f"not {type(config).__name__}"
        )
    env = _env_overrides(os.environ if environ is None else environ)
    if env:
        data = merge_dicts(data, env)
        source += " + GRADMON_* environment"
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise GradmonError(_format_errors(exc, source)) from None


def dump_config(config: Config) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
