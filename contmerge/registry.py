"""Find strategies by name: the built-ins, and any package's through entry points.

A third-party package adds its own rule with, in its pyproject.toml::

    [project.entry-points."contmerge.strategies"]
    my_rule = "my_package.module:MyRule"

Specs are small expressions, parsed without ``eval``: ``opcm``, ``opcm(alpha=0.3)``,
``chain(dare(p=0.9, seed=1), magmax())``.
"""

from __future__ import annotations

import ast
import importlib
from importlib.metadata import entry_points
from typing import Any

from .errors import StrategyError
from .strategy import Chain, Preprocessor, Strategy

ENTRY_POINT_GROUP = "contmerge.strategies"

BUILTINS: dict[str, str] = {
    "average": "contmerge.strategies.average:Average",
    "task_arithmetic": "contmerge.strategies.task_arithmetic:TaskArithmetic",
    "ties": "contmerge.strategies.ties:ContinualTies",
    "magmax": "contmerge.strategies.magmax:MagMax",
    "opcm": "contmerge.strategies.opcm:OPCM",
    "fisher": "contmerge.strategies.fisher:Fisher",
    "regmean": "contmerge.strategies.regmean:RegMean",
    "dare": "contmerge.strategies.dare:Dare",
}


def _load(target: str) -> type:
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def available() -> dict[str, str]:
    """Every strategy name that resolves, with where it comes from."""
    found = dict(BUILTINS)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(ep.name, ep.value)
    return found


def lookup(name: str) -> type:
    """The class registered under ``name`` (built-ins win over entry points of the same name)."""
    if name in BUILTINS:
        return _load(BUILTINS[name])
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == name:
            return ep.load()
    raise StrategyError(f"unknown strategy {name!r}; available: {', '.join(sorted(available()))}")


def make(name: str, **hparams: Any) -> Strategy | Preprocessor:
    cls = lookup(name)
    try:
        return cls(**hparams)
    except (TypeError, ValueError) as exc:
        raise StrategyError(f"bad settings for strategy {name!r}: {exc}") from exc


def parse_strategy(spec: str | Strategy, **overrides: Any) -> Strategy:
    """Turn a spec string into a strategy; ``overrides`` set hyper-parameters of the rule."""
    if isinstance(spec, Strategy):
        if overrides:
            raise StrategyError("settings can only be given with a strategy name, not an object")
        return spec
    try:
        tree = ast.parse(spec.strip(), mode="eval").body
    except SyntaxError as exc:
        raise StrategyError(f"cannot parse strategy spec {spec!r}: {exc.msg}") from exc
    built = _build(tree, spec)
    if overrides:
        target = built.rule if isinstance(built, Chain) else built
        merged = {**target.hparams(), **overrides}
        target = make(target.name, **merged)  # type: ignore[assignment]
        built = Chain(*built.pre, target) if isinstance(built, Chain) else target
    if not isinstance(built, Strategy):
        raise StrategyError(f"{spec!r} is a pre-processor; use chain({spec}, <rule>)")
    return built


def _build(node: ast.expr, spec: str) -> Strategy | Preprocessor:
    if isinstance(node, ast.Name):
        return make(node.id)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        if node.func.id == "chain":
            if node.keywords:
                raise StrategyError("chain(...) takes strategies, not settings")
            return Chain(*(_build(arg, spec) for arg in node.args))
        if node.args:
            raise StrategyError(f"settings of {node.func.id} must be named, as in opcm(alpha=0.5)")
        try:
            kwargs = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords if kw.arg}
        except ValueError as exc:
            raise StrategyError(f"settings in {spec!r} must be literals") from exc
        return make(node.func.id, **kwargs)
    raise StrategyError(f"cannot parse strategy spec {spec!r}")


def parse_value(text: str) -> Any:
    """A ``--set KEY=VALUE`` value: a Python literal when it is one, else the string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text
