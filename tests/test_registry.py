"""Strategies by name: built-ins, specs, chains, and third-party entry points."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch

from contmerge import Merger, StrategyError, parse_strategy
from contmerge.registry import available

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


PLUGIN = textwrap.dedent('''
    from dataclasses import dataclass
    from contmerge.strategy import Strategy

    @dataclass
    class KeepFirst(Strategy):
        """Keeps the first arrival's task vector: a toy third-party rule."""
        name = "keep_first"

        def fold(self, info, state, delta, base, ctx):
            return {"value": delta if ctx.index == 1 else state["value"]}

        def emit(self, info, state, base, globals):
            return base + state["value"]
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
    base = random_base()
    first, second = fine_tuned(base, 0), fine_tuned(base, 1)
    merger = Merger(base, "keep_first")
    merger.fold(first)
    merger.fold(second)
    merged = merger.emit_state_dict()
    assert torch.allclose(merged["encoder.0.weight"], first["encoder.0.weight"], atol=1e-6)
    sys.modules.pop("my_rules", None)
