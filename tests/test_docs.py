"""The documentation cannot drift: hook signatures, the example plugin, configuration sections."""

from __future__ import annotations

import ast
import inspect
import json
import re
import types
from pathlib import Path

import pytest

from qcloop.monitor.core import hookspecs
from qcloop.monitor.core.config import QcloopConfig, parse_config
from qcloop.monitor.core.plugin_manager import make_plugin_manager

DOCS = Path(__file__).resolve().parents[1] / "docs"
HOOKS_PAGE = DOCS / "plugin-hooks.md"
CONFIG_PAGE = DOCS / "configuration.md"

Signature = tuple[list[tuple[str, str | None]], str | None]

_HOOK_SECTION = re.compile(r"^### `(\w+)`\s*\n+```python\n(.*?)\n```", re.MULTILINE | re.DOTALL)
_FENCE = re.compile(r"^```(\w*)\n(.*?)\n```", re.MULTILINE | re.DOTALL)


def _normalise(annotation: str | None) -> str | None:
    """An annotation as source text, spacing normalised."""
    return None if annotation is None else ast.unparse(ast.parse(annotation, mode="eval"))


def documented_hooks(page: str) -> dict[str, Signature]:
    """Hook name -> (parameters with annotations, return annotation) from a docs page."""
    hooks: dict[str, Signature] = {}
    for heading, block in _HOOK_SECTION.findall(page):
        tree = ast.parse(f"def {block.strip()}: ...")
        func = tree.body[0]
        assert isinstance(func, ast.FunctionDef)
        assert func.name == heading, f"section {heading!r} documents {func.name!r}"
        params = [
            (arg.arg, None if arg.annotation is None else ast.unparse(arg.annotation))
            for arg in func.args.args
        ]
        returns = None if func.returns is None else ast.unparse(func.returns)
        hooks[heading] = (params, returns)
    return hooks


def specified_hooks() -> dict[str, Signature]:
    """Hook name -> (parameters with annotations, return annotation) from the hook specs."""
    hooks: dict[str, Signature] = {}
    for name, func in vars(hookspecs).items():
        if not callable(func) or not hasattr(func, "qcloop_spec"):
            continue
        signature = inspect.signature(func)
        params = []
        for param in signature.parameters.values():
            annotation = param.annotation
            if annotation is inspect.Parameter.empty:
                params.append((param.name, None))
            else:
                text = (
                    annotation
                    if isinstance(annotation, str)
                    else inspect.formatannotation(annotation)
                )
                params.append((param.name, _normalise(text)))
        ret = signature.return_annotation
        returns = None if ret is inspect.Signature.empty else _normalise(str(ret))
        hooks[name] = (params, returns)
    return hooks


def signature_problems(page: str) -> list[str]:
    """Differences between the documented and the specified hooks."""
    documented = documented_hooks(page)
    specified = specified_hooks()
    problems = [f"{name}: not documented" for name in specified if name not in documented]
    problems += [
        f"{name}: documented but not a hook" for name in documented if name not in specified
    ]
    for name in specified.keys() & documented.keys():
        if documented[name] != specified[name]:
            problems.append(f"{name}: documented {documented[name]}, specified {specified[name]}")
    return problems


def test_specs_are_found() -> None:
    names = set(specified_hooks())
    assert {"register_segmenters", "register_commands", "on_case_scored"} <= names
    assert len(names) == 23


def test_every_hook_is_documented_with_its_signature() -> None:
    assert signature_problems(HOOKS_PAGE.read_text(encoding="utf-8")) == []


def test_signature_check_detects_drift() -> None:
    page = HOOKS_PAGE.read_text(encoding="utf-8")
    renamed = page.replace(
        "on_model_refined(event: ModelRefined)", "on_model_refined(refined: ModelRefined)"
    )
    retyped = page.replace("on_case_scored(event: CaseScored)", "on_case_scored(event: dict)")
    missing = re.sub(r"### `on_drift_alert`\s*\n+```python\n.*?\n```", "", page, flags=re.DOTALL)
    extra = page + "\n### `on_coffee_break`\n\n```python\non_coffee_break() -> None\n```\n"
    for changed, expected in [
        (renamed, "on_model_refined: documented"),
        (retyped, "on_case_scored: documented"),
        (missing, "on_drift_alert: not documented"),
        (extra, "on_coffee_break: documented but not a hook"),
    ]:
        assert changed != page
        problems = signature_problems(changed)
        assert len(problems) == 1 and problems[0].startswith(expected), problems


def test_example_plugin_works(tmp_path: Path) -> None:
    page = HOOKS_PAGE.read_text(encoding="utf-8")
    example = page.split("### Example plugin", 1)[1]
    source = next(body for lang, body in _FENCE.findall(example) if lang == "python")
    module = types.ModuleType("qcloop_jsonl_doc_example")
    exec(compile(source, "plugin-hooks.md", "exec"), module.__dict__)

    pm = make_plugin_manager(load_entrypoints=False, builtins=False)
    pm.register(module, name="jsonl")
    log = tmp_path / "runs.jsonl"
    tracker = pm.trackers().create("jsonl", {"path": str(log)})
    with tracker.start_run("demo", tags={"view": "SA"}):
        tracker.log_metrics({"ood_cases": 2.0}, step=1)
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    assert entries == [
        {"run": "demo", "tags": {"view": "SA"}},
        {"metrics": {"ood_cases": 2.0}, "step": 1},
    ]
    assert pm.hooks_of("jsonl") == ["on_drift_alert", "register_trackers"]


def test_entry_point_declaration_is_valid_toml() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    page = HOOKS_PAGE.read_text(encoding="utf-8")
    toml_blocks = [body for lang, body in _FENCE.findall(page) if lang == "toml"]
    assert len(toml_blocks) == 1
    project = tomllib.loads(toml_blocks[0])["project"]
    assert project["entry-points"]["qcloop"] == {"jsonl": "qcloop_jsonl"}


def test_configuration_page_mentions_every_section() -> None:
    page = CONFIG_PAGE.read_text(encoding="utf-8")
    missing = [name for name in QcloopConfig.model_fields if f"`{name}`" not in page]
    assert missing == []


def test_configuration_page_default_block_is_the_default() -> None:
    page = CONFIG_PAGE.read_text(encoding="utf-8")
    section = page.split("## The default configuration", 1)[1]
    block = next(body for lang, body in _FENCE.findall(section) if lang == "yaml")
    assert parse_config(block) == QcloopConfig()
    # Every top-level section is spelled out in the block, not left to the defaults.
    top_level = {line.split(":")[0] for line in block.splitlines() if re.match(r"^\w+:", line)}
    assert top_level == set(QcloopConfig.model_fields)


@pytest.mark.parametrize("page", [HOOKS_PAGE, CONFIG_PAGE], ids=lambda p: p.name)
def test_code_fences_are_closed(page: Path) -> None:
    assert page.read_text(encoding="utf-8").count("```") % 2 == 0
