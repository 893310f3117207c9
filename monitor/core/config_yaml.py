"""The YAML form of a configuration: reading it safely, reporting every problem with its path
and line, laying one file over another, and writing it back.

Nothing in a configuration executes code: files are read with ``yaml.safe_load``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from qcloop.monitor.core.config_sections import QcloopConfig

__all__ = [
    "ConfigError",
    "config_schema",
    "dump_config",
    "load_config",
    "override_config",
    "parse_config",
    "save_config",
]


class ConfigError(ValueError):
    """An invalid configuration; ``problems`` holds one ``"path: message"`` line per problem."""

    def __init__(self, problems: list[str], source: str = "<config>") -> None:
        self.problems = list(problems)
        self.source = source
        count = len(self.problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{source}: {count} problem{'s' if count != 1 else ''}\n{lines}")


def _render_loc(loc: tuple[int | str, ...]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(top level)"


def _node_line(root: yaml.Node | None, loc: tuple[int | str, ...]) -> int | None:
    """1-based line of the deepest node of ``loc`` present in the composed YAML tree."""
    if root is None:
        return None
    node, line = root, root.start_mark.line + 1
    for part in loc:
        child = None
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode) and key.value == str(part):
                    child, line = value, key.start_mark.line + 1
        elif (
            isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value)
        ):
            child = node.value[part]
            line = child.start_mark.line + 1
        if child is None:
            break
        node = child
    return line


def _duplicate_keys(
    node: yaml.Node | None, path: tuple[int | str, ...] = ()
) -> list[tuple[int, str]]:
    """(line, problem) for keys repeated within one mapping (``safe_load`` keeps only the last)."""
    problems: list[tuple[int, str]] = []
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key, value in node.value:
            name = key.value if isinstance(key, yaml.ScalarNode) else str(key)
            if name in seen:
                line = key.start_mark.line + 1
                problems.append(
                    (line, f"{_render_loc((*path, name))}: duplicate key (line {line})")
                )
            seen.add(name)
            problems += _duplicate_keys(value, (*path, name))
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            problems += _duplicate_keys(item, (*path, index))
    return problems


def _yaml_problem(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    context = getattr(exc, "context", None)
    context_mark = getattr(exc, "context_mark", None)
    text = f"YAML syntax error: {problem}"
    if mark is not None:
        text = f"line {mark.line + 1}, column {mark.column + 1}: {text}"
    if context and context_mark is not None:
        text += f" ({context} at line {context_mark.line + 1})"
    return text


def parse_config(text: str, source: str = "<string>") -> QcloopConfig:
    """Validate the YAML ``text`` of a configuration; an empty document means all defaults.

    Raises:
        ConfigError: listing every problem with its path (and line, where known), in file order.
    """
    root, data = _read_yaml(text, source)
    return _validated(data, root, source)


def _read_yaml(text: str, source: str) -> tuple[yaml.Node | None, dict[str, Any]]:
    """The YAML node tree (for line numbers) and the mapping of ``text``."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError([_yaml_problem(exc)], source) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            [f"(top level): expected a mapping of sections, got {type(data).__name__}"], source
        )
    return root, data


def _validated(data: dict[str, Any], root: yaml.Node | None, source: str) -> QcloopConfig:
    """``data`` as a configuration; problems located on the lines of ``root`` where it has them."""
    located = _duplicate_keys(root)
    config = None
    try:
        config = QcloopConfig.model_validate(data)
    except ValidationError as exc:
        for error in exc.errors(include_url=False):
            loc = tuple(error["loc"])
            line = _node_line(root, loc) if loc else None
            suffix = f" (line {line})" if line is not None else ""
            located.append((line or 0, f"{_render_loc(loc)}: {error['msg']}{suffix}"))
    if located or config is None:
        located.sort(key=lambda item: item[0])  # stable: file order, then report order
        raise ConfigError([text for _line, text in located], source)
    return config


def load_config(path: str | os.PathLike[str] | None = None) -> QcloopConfig:
    """The configuration in the YAML file ``path``, or the built-in default when None.

    Raises:
        ConfigError: the file cannot be read or is not a valid configuration.
    """
    if path is None:
        return QcloopConfig()
    return parse_config(_read_text(path), str(path))


def _read_text(path: str | os.PathLike[str]) -> str:
    """The text of a configuration file; ``ConfigError`` naming it when it cannot be read."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"(file): cannot read: {exc}"], str(path)) from None


def override_config(base: QcloopConfig, path: str | os.PathLike[str]) -> QcloopConfig:
    """``base`` with the settings of the YAML file ``path`` laid over it, key by key.

    Problems (unknown keys, types, ranges) are reported with the file's lines. Mappings merge
    recursively, so ``qc: {module: {params: {dropout: 0.3}}}`` changes one parameter and keeps
    the others; a component whose ``name`` changes takes the file's ``params`` only.

    Raises:
        ConfigError: the file is not a valid configuration, or the merged result is not.
    """
    root, overrides = _read_yaml(_read_text(path), str(path))
    return _validated(_merge(base.model_dump(mode="json"), overrides), root, str(path))


def _merge(base: Any, override: Any) -> Any:
    """``override`` laid over ``base``: mappings recursively, anything else replaced."""
    if not isinstance(base, dict) or not isinstance(override, dict):
        return override
    if "name" in override and "params" in base and override["name"] != base.get("name"):
        base = {**base, "params": {}}  # another component: the old one's params do not apply
    out = dict(base)
    for key, value in override.items():
        out[key] = _merge(base[key], value) if key in base else value
    return out


def dump_config(cfg: QcloopConfig) -> str:
    """The configuration as YAML, every setting spelled out, sections in declaration order;
    credentials in URIs redacted (:mod:`qcloop.monitor.core.redact`)."""
    from qcloop.monitor.core.redact import redact

    data = redact(cfg.model_dump(mode="json"))
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=None)


def save_config(cfg: QcloopConfig, path: str | os.PathLike[str]) -> Path:
    """Write ``cfg`` as YAML to ``path`` atomically; return the path."""
    from qcloop.monitor.core.atomic import write_text

    write_text(path, dump_config(cfg))
    return Path(path)


def config_schema() -> dict[str, Any]:
    """The JSON Schema of a configuration file."""
    return QcloopConfig.model_json_schema()
