"""Strategies by name: built-ins, specs, chains, and third-party entry points."""

from __future__ import annotations

import sys
import textwrap
from dataclasses import fields

import pytest
import torch

from contmerge import Merger, StrategyError, parse_strategy
from contmerge.catalog import entries, entry, render_list
from contmerge.registry import BUILTINS, available, lookup
from contmerge.strategy import settings_of, summary_of

from helpers import fine_tuned, random_base


def test_specs_round_trip():
    for spec in [
        "opcm",
        "opcm(alpha=0.3)",
        "chain(dare(p=0.9, seed=2), ties(threshold=10.0))",
        "magmax(scaling_factor=1.0)",
    ]:
        strategy = parse_strategy(spec)
        assert parse_strategy(strategy.spec()).spec() == strategy.spec()
    assert parse_strategy("opcm", alpha=0.2).spec() == "opcm(alpha=0.2)"
    assert parse_strategy("chain(dare(), magmax())", scaling_factor=0.7).rule.scaling_factor == 0.7


@pytest.mark.parametrize(
    "spec, message",
    [
        ("nope", "unknown strategy"),
        ("opcm(beta=1)", "bad settings"),
        ("opcm(0.5)", "must be named"),
        ("dare(p=0.5)", "pre-processor"),
        ("chain(magmax(), dare())", "must end with a merge rule"),
        ("opcm(alpha=__import__('os'))", "literals"),
        ("opcm(alpha=2.0)", "alpha"),
    ],
)
def test_bad_specs_are_explained(spec, message):
    with pytest.raises(StrategyError, match=message):
        parse_strategy(spec)


def test_a_wrong_setting_lists_the_valid_ones_with_the_closest_match():
    with pytest.raises(StrategyError) as caught:
        parse_strategy("ties(lam=0.1)")  # the λ of the README's table, as `demo --help` wrote it
    message = str(caught.value)
    assert "no setting 'lam'; did you mean 'scaling_factor'?" in message
    assert all(f"{name}:" in message for name in ("scaling_factor", "threshold", "merge_func"))
    assert "scaling_factor: float = 0.3" in message
    with pytest.raises(StrategyError, match="did you mean 'alpha'"):
        parse_strategy("opcm(aplha=0.3)")  # a typo of the name
    with pytest.raises(StrategyError, match="did you mean 'p'"):
        parse_strategy("chain(dare(P=0.5), magmax())")  # inside a chain, case aside
    with pytest.raises(StrategyError, match="did you mean 'scaling_factor'"):
        Merger(random_base(), "magmax", settings={"lam": 0.1})  # the Python API's settings
    with pytest.raises(StrategyError, match="no setting 'beta'. Its settings: alpha"):
        parse_strategy("opcm(beta=1)")  # nothing close: the valid ones still listed


def test_unknown_strategy_names_the_closest_and_where_dimat_and_fw_are_used():
    with pytest.raises(StrategyError) as caught:
        parse_strategy("opmc")
    message = str(caught.value)
    assert "did you mean 'opcm'?" in message
    assert "contmerge simulate decentralized" in message and "contmerge simulate fw" in message
    for name in ("dimat", "fw", "frank-wolfe", "FW-Merging"):
        with pytest.raises(StrategyError, match="not a one-pass fold") as caught:
            parse_strategy(name)
        assert "contmerge simulate" in str(caught.value), name


@pytest.mark.parametrize("name", sorted(BUILTINS))
def test_every_builtin_declares_what_it_does_and_each_setting(name):
    cls = lookup(name)
    assert summary_of(cls) and not summary_of(cls).startswith(cls.__name__ + "(")
    declared = [f.name for f in fields(cls)]
    described = settings_of(cls)
    assert [s.name for s in described] == declared
    assert all(s.help for s in described), [s.name for s in described if not s.help]


def test_the_listing_is_read_from_the_classes():
    listing = " ".join(render_list(entries()).split())
    for name in BUILTINS:
        cls = lookup(name)
        assert f"{name} — {summary_of(cls)}" in listing
        for s in settings_of(cls):
            assert f"{s.describe()} — {s.help}" in listing, (name, s.name)
    for name in ("chain", "dimat", "fw"):
        assert f" {name} — " in listing
    assert "'fisher' statistics" in listing and "'gram' statistics" in listing
    ties = " ".join(render_list([entry("ties")]).split())
    assert "one-pass fold: yes" in ties and "whole-model statistics" in ties
    fw = entry("fw")
    assert "contmerge simulate fw" in fw.one_pass and fw.one_pass.startswith("no")
    assert {"variant", "max_iters", "step_size"} <= {s.name for s in fw.settings}
    assert "contmerge simulate decentralized" in entry("dimat").one_pass


PLUGIN = textwrap.dedent('''
    from dataclasses import dataclass
    from contmerge.strategy import Strategy, setting

    @dataclass
    class KeepFirst(Strategy):
        """Keeps the first arrival's task vector: a toy third-party rule."""
        name = "keep_first"
        scale: float = setting(1.0, "factor applied to the kept task vector")

        def fold(self, info, state, delta, base, ctx):
            return {"value": delta if ctx.index == 1 else state["value"]}

        def emit(self, info, state, base, globals):
            return base + self.scale * state["value"]
''')


def test_third_party_strategy_through_entry_points(tmp_path, monkeypatch):
    (tmp_path / "my_rules.py").write_text(PLUGIN)
    dist = tmp_path / "my_rules-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-rules\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[contmerge.strategies]\nkeep_first = my_rules:KeepFirst\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "keep_first" in available()
    listed = " ".join(render_list(entries()).split())
    assert "keep_first — Keeps the first arrival's task vector: a toy third-party rule." in listed
    assert "scale: float = 1.0 — factor applied to the kept task vector" in listed
    with pytest.raises(StrategyError, match="did you mean 'scale'"):
        parse_strategy("keep_first(scal=2.0)")
    base = random_base()
    first, second = fine_tuned(base, 0), fine_tuned(base, 1)
    merger = Merger(base, "keep_first")
    merger.fold(first)
    merger.fold(second)
    merged = merger.emit_state_dict()
    assert torch.allclose(merged["encoder.0.weight"], first["encoder.0.weight"], atol=1e-6)
    sys.modules.pop("my_rules", None)
