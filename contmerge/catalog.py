"""What each strategy takes, for ``contmerge strategies``, read from the classes themselves.

Settings are the dataclass fields declared with :func:`contmerge.strategy.setting`, summaries the
class docstrings, per-arrival needs ``needs_extras``: a third-party strategy installed through
the entry-point group is described the same way. DIMAT and FW-Merging, which are not one-pass
folds, are described from their Python API's signature and where they are used.
"""

from __future__ import annotations

import dataclasses
import inspect
import textwrap
from dataclasses import dataclass, field

from .errors import StrategyError
from .registry import (
    BUILTINS,
    ELSEWHERE,
    Elsewhere,
    available,
    elsewhere,
    load_target,
    lookup,
    unknown_strategy_message,
)
from .strategy import (
    Chain,
    Preprocessor,
    Setting,
    Strategy,
    doc_of,
    first_paragraph,
    settings_of,
)

WIDTH = 100
INDENT = 4

#: groups of the listing, in order, with the singular each entry's detailed view is headed with
GROUPS = {
    "one-pass merge rules": "a one-pass merge rule",
    "pre-processors": "a pre-processor",
    "composition": "composition",
    "not one-pass folds": "not a one-pass fold",
}
RULES, PRE, COMPOSE, OTHER = GROUPS


@dataclass(frozen=True)
class Entry:
    """One strategy as ``contmerge strategies`` shows it."""

    name: str
    group: str
    doc: str
    settings: list[Setting]
    per_arrival: str
    one_pass: str
    source: str
    #: said instead of the list of settings in the short listing (when there is one)
    settings_note: str = ""
    #: further lines of the detailed view, (label, text)
    details: list[tuple[str, str]] = field(default_factory=list)

    @property
    def summary(self) -> str:
        return first_paragraph(self.doc)


def entries() -> list[Entry]:
    """Every strategy that resolves, then chain, then the methods that are not folds."""
    found = []
    for name, target in sorted(available().items()):
        try:
            found.append(_describe_class(name, lookup(name), target))
        except Exception as exc:  # a broken third-party package must not hide the others
            found.append(Entry(name, RULES, f"(cannot be loaded: {exc})", [], "?", "?", target))
    found.append(_describe_chain())
    found.extend(_describe_elsewhere(name, entry) for name, entry in ELSEWHERE.items())
    return found


def entry(name: str) -> Entry:
    """The entry of ``name`` (a strategy, ``chain``, or DIMAT/FW-Merging by name or alias)."""
    if name == "chain":
        return _describe_chain()
    other = elsewhere(name)
    if other:
        return _describe_elsewhere(*other)
    if name not in available():
        raise StrategyError(unknown_strategy_message(name))
    return _describe_class(name, lookup(name), available()[name])


def _describe_class(name: str, cls: type, target: str) -> Entry:
    origin = "built in" if name in BUILTINS else "installed by another package"
    settings = settings_of(cls)
    if issubclass(cls, Preprocessor):
        return Entry(
            name,
            PRE,
            doc_of(cls),
            settings,
            "nothing beyond what the rule needs",
            f"a transform of each arrival's task vector before the rule: chain({name}(), RULE)",
            f"{target} ({origin})",
            details=[("elementwise", _elementwise(cls))],
        )
    needs = getattr(cls, "needs_extras", ())
    per_arrival = "the checkpoint only"
    if needs:
        per_arrival = "; ".join(
            f"its {kind!r} statistics: NAME.{kind}.safetensors beside the checkpoint "
            f"NAME.safetensors, or extras={{{kind!r}: …}} in Python"
            for kind in needs
        )
    one_pass = "yes: each arrival is folded once into a state of constant size"
    if getattr(cls, "passes", Strategy.passes) is not Strategy.passes:
        one_pass += " (and read a few times during that fold, for whole-model statistics)"
    details = [("elementwise", _elementwise(cls))]
    if settings and all(not s.required for s in settings):
        details.append(
            ("spec", f"{name}({', '.join(f'{s.name}={s.default!r}' for s in settings)})")
        )
    return Entry(name, RULES, doc_of(cls), settings, per_arrival, one_pass, f"{target} ({origin})",
                 details=details)  # fmt: skip


def _elementwise(cls: type) -> str:
    if getattr(cls, "elementwise", False):
        return "yes: folded in chunks of each tensor, on several threads (--threads)"
    return "no: one tensor at a time"


def _describe_chain() -> Entry:
    return Entry(
        "chain",
        COMPOSE,
        doc_of(Chain),
        [],
        "what its rule needs",
        "as its rule",
        "contmerge.strategy:Chain (built in)",
        settings_note="those of its parts, inside each: chain(dare(p=0.9), ties(threshold=10.0)); "
        "--set KEY=VALUE sets the rule's",
    )


def _describe_elsewhere(name: str, method: Elsewhere) -> Entry:
    api = load_target(method.api)
    module_doc = inspect.cleandoc(inspect.getmodule(api).__doc__ or "")  # type: ignore[union-attr]
    return Entry(
        name,
        OTHER,
        module_doc,
        _signature_settings(api),
        method.needs,
        "no: not usable as --strategy; used through " + method.where(),
        method.api,
        f"its Python API's arguments (`contmerge strategies {name}`), explained in {method.docs}",
        details=[("settings explained in", method.docs)],
    )


def _signature_settings(api: type) -> list[Setting]:
    found = []
    for param in inspect.signature(api).parameters.values():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        default = dataclasses.MISSING if param.default is param.empty else param.default
        kind = param.annotation if param.annotation is not param.empty else "?"
        found.append(Setting(param.name, str(kind), default, ""))
    return found


# --- text -------------------------------------------------------------------------------
def render_list(found: list[Entry]) -> str:
    """All entries, grouped, each with its settings, per-arrival needs and whether it folds."""
    out = _wrap(
        "Strategies for contmerge merge, contmerge serve and the Flower strategy. Give settings "
        "in the spec, 'opcm(alpha=0.3)', or with --set alpha=0.3; `contmerge strategies NAME` "
        "shows one in detail.",
        0,
        0,
    )
    for group in GROUPS:
        members = [e for e in found if e.group == group]
        if members:
            out += ["", f"{group.capitalize()}:"]
        for e in members:
            out.append("")
            out += _wrap(f"{e.name} — {_plain(e.summary)}", 2, INDENT + 2)
            out += _fields(e, INDENT, brief=True)
    return "\n".join(out) + "\n"


def render_one(e: Entry) -> str:
    """One entry in full: its whole docstring, every setting, where it comes from."""
    out = [f"{e.name}: {GROUPS[e.group]}", ""]
    for paragraph in e.doc.split("\n\n"):
        out += _paragraph(paragraph) + [""]
    out += _fields(e, 0, brief=False)
    for label, text in [*e.details, ("from", e.source)]:
        out += _wrap(f"{label}: {text}", 0, INDENT)
    return "\n".join(out) + "\n"


def _fields(e: Entry, indent: int, brief: bool) -> list[str]:
    lines = []
    if e.settings_note and (brief or not e.settings):
        lines += _wrap(f"settings: {e.settings_note}", indent, indent + 2)
    elif e.settings:
        lines += _wrap("settings:", indent, indent)
        for s in e.settings:
            text = s.describe() + (f" — {s.help}" if s.help else "")
            lines += _wrap(text, indent + 2, indent + 6)
    else:
        lines += _wrap("settings: none", indent, indent)
    lines += _wrap(f"per arrival: {e.per_arrival}", indent, indent + 2)
    lines += _wrap(f"one-pass fold: {e.one_pass}", indent, indent + 2)
    return lines


def _paragraph(text: str) -> list[str]:
    """A docstring paragraph re-wrapped; lines starting with "- " stay list items."""
    items: list[str] = []
    for line in text.splitlines():
        if line.lstrip().startswith("- ") or not items:
            items.append(line.strip())
        else:
            items[-1] += " " + line.strip()
    lines = []
    for item in items:
        hang = 2 if item.startswith("- ") else 0
        lines += _wrap(_plain(" ".join(item.split())), 0, hang)
    return lines


def _plain(text: str) -> str:
    return text.replace("``", "`")  # docstrings' reST literals, as a terminal shows code


def _wrap(text: str, first: int, rest: int) -> list[str]:
    return textwrap.wrap(text, WIDTH, initial_indent=" " * first, subsequent_indent=" " * rest,
                         break_on_hyphens=False, break_long_words=False)  # fmt: skip
