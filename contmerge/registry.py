"""Find strategies by name: the built-ins, and any package's through entry points.

A third-party package adds its own rule with, in its pyproject.toml::

    [project.entry-points."contmerge.strategies"]
    my_rule = "my_package.module:MyRule"

Specs are small expressions, parsed without ``eval``: ``opcm``, ``opcm(alpha=0.3)``,
``chain(dare(p=0.9, seed=1), magmax())``. A misspelt name or setting is answered with the valid
ones and the closest match, for the CLI, the server and the Python API alike.

DIMAT and FW-Merging are not one-pass folds (they need whole neighbourhoods or pools, and data):
they are listed in :data:`ELSEWHERE` with where they are used, so that asking for them as a
strategy says where to go.
"""

from __future__ import annotations

import ast
import difflib
import importlib
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, is_dataclass
from importlib.metadata import entry_points
from typing import Any

from .errors import StrategyError
from .strategy import Chain, Preprocessor, Setting, Strategy, settings_of

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


@dataclass(frozen=True)
class Elsewhere:
    """A merge method of this package that is not a one-pass fold, and where it is used."""

    #: its name in prose
    title: str
    #: ``module:object`` of its Python API (its signature gives the settings)
    api: str
    #: what it needs besides the checkpoints
    needs: str
    #: commands and APIs that run it
    used_through: tuple[str, ...]
    #: where its settings are explained
    docs: str
    #: other names users try for it
    aliases: tuple[str, ...] = ()

    def where(self) -> str:
        return "; ".join(self.used_through)


ELSEWHERE: dict[str, Elsewhere] = {
    "dimat": Elsewhere(
        title="DIMAT",
        api="contmerge.strategies.dimat:DimatFold",
        needs="each neighbour's whole model and calibration inputs (activations are matched)",
        used_through=(
            "contmerge merge --strategy dimat --calibration DATA --state DIR ANCHOR NEIGHBOUR... "
            "(a durable per-agent fold)",
            "contmerge simulate decentralized",
            "python -m contmerge.simulations.decentralized_flower",
            "Python: contmerge.strategies.dimat (DimatFold, dimat_merge)",
        ),
        docs="docs/dimat.md, `contmerge simulate decentralized --help`",
    ),
    "fw": Elsewhere(
        title="FW-Merging",
        api="contmerge.strategies.frank_wolfe:FrankWolfeMerger",
        needs="the whole pool (streamed from disk every iteration) and ~100 labelled samples "
        "per target task",
        used_through=(
            "contmerge merge/serve --strategy fw --objective DATA (a durable pool state)",
            "Flower: contmerge.flower.fw.FwStrategy",
            "contmerge simulate fw",
            "Python: contmerge.strategies.frank_wolfe.FrankWolfeMerger",
        ),
        docs="docs/frank_wolfe.md, `contmerge simulate fw --help`",
        aliases=("frank_wolfe", "fw_merging", "fwmerging", "frankwolfe"),
    ),
}

ELSEWHERE_NOTE = (
    "DIMAT and FW-Merging are not one-pass folds: use `contmerge merge --strategy dimat "
    "--calibration DATA` / `--strategy fw --objective DATA`, `contmerge simulate decentralized` / "
    "`contmerge simulate fw` or their Python APIs (contmerge.strategies.dimat, "
    "contmerge.strategies.frank_wolfe)"
)


def load_target(target: str) -> type:
    """The object a ``module:attribute`` target names."""
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
        return load_target(BUILTINS[name])
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == name:
            return ep.load()
    raise StrategyError(unknown_strategy_message(name))


def elsewhere(name: str) -> tuple[str, Elsewhere] | None:
    """The non-fold method ``name`` refers to (by name or alias), if it is one."""
    key = name.lower().replace("-", "_")
    for method, entry in ELSEWHERE.items():
        if key == method or key in entry.aliases:
            return method, entry
    return None


def unknown_strategy_message(name: str) -> str:
    """Why ``name`` is not a strategy: where DIMAT/FW-Merging live, else the closest names."""
    names = sorted({*available(), "chain"})
    found = elsewhere(name)
    if found:
        method, entry = found
        return (
            f"{entry.title} ({method}) is not a one-pass fold, so it is not a fold rule: it needs "
            f"{entry.needs}. It is used through {entry.where()}. Strategies: "
            f"{', '.join(names)}"
        )
    hint = _closest(name, names)
    return (
        f"unknown strategy {name!r}" + (f" (did you mean {hint!r}?)" if hint else "")
        + f". Available: {', '.join(names)} (`contmerge strategies` lists their settings). "
        + ELSEWHERE_NOTE
    )  # fmt: skip


def make(name: str, **hparams: Any) -> Strategy | Preprocessor:
    cls = lookup(name)
    check_settings(name, cls, hparams)
    try:
        return cls(**hparams)
    except (TypeError, ValueError) as exc:
        raise StrategyError(f"bad settings for strategy {name!r}: {exc}") from exc


def check_settings(name: str, cls: type, hparams: Iterable[str]) -> None:
    """Refuse a setting the class does not have, naming the valid ones and the closest match."""
    if not is_dataclass(cls):
        return  # its settings are not declared as fields: its constructor is the judge
    valid = settings_of(cls)
    for key in hparams:
        if key in {s.name for s in valid}:
            continue
        hint = _closest_setting(key, valid)
        listing = ", ".join(s.describe() for s in valid) or "none"
        raise StrategyError(
            f"bad settings for strategy {name!r}: it has no setting {key!r}"
            + (f"; did you mean {hint!r}?" if hint else ".")
            + f" Its settings: {listing} (`contmerge strategies {name}` explains them)"
        )


def _closest(word: str, candidates: Iterable[str]) -> str | None:
    """The candidate ``word`` was probably meant to be (case does not count), if any."""
    folded = {c.casefold(): c for c in candidates}
    matches = difflib.get_close_matches(word.casefold(), list(folded), n=1, cutoff=0.6)
    return folded[matches[0]] if matches else None


def _closest_setting(word: str, settings: list[Setting]) -> str | None:
    """The setting ``word`` was meant to be: by its spelling, or by the paper's symbol for it
    (``lam``, ``lambda`` or ``λ`` all point to the setting whose symbol is λ)."""
    spellings = {s.name: s.name for s in settings}
    for s in settings:
        spellings.update(dict.fromkeys(_spellings(s.symbol) if s.symbol else (), s.name))
    hint = _closest(word, spellings)
    return spellings[hint] if hint else None


def _spellings(symbol: str) -> list[str]:
    if symbol.isascii():
        return [symbol]
    word = unicodedata.name(symbol, "").split()[-1].lower()  # "alpha"; "lamda", as Unicode has it
    return [symbol, word, *(["lambda"] if word == "lamda" else [])]


def parse_strategy(spec: str | Strategy, **overrides: Any) -> Strategy:
    """Turn a spec string into a strategy; ``overrides`` set hyper-parameters of the rule."""
    if isinstance(spec, Strategy):
        if overrides:
            raise StrategyError("settings can only be given with a strategy name, not an object")
        return spec
    if elsewhere(spec.strip()):  # "frank-wolfe" would not even parse
        raise StrategyError(unknown_strategy_message(spec.strip()))
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
