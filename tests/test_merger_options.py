"""One options layer for ``merge`` and ``serve``: ``MergerOptions`` from either command's
parsed options, and the strategy's settings given to the Merger apart from its own options."""

from __future__ import annotations

import argparse

import pytest

from contmerge import Merger
from contmerge.cli import build_parser
from contmerge.merger_options import MergerOptions

from helpers import write_models

COMMON = ["--strategy", "ties", "--set", "scaling_factor=0.5", "--set", "threshold=40",
          "--linear", ".*weight", "--state", "s", "--base", "b"]  # fmt: skip


@pytest.mark.parametrize("command", [["merge", *COMMON, "a.safetensors"], ["serve", *COMMON]])
def test_merge_and_serve_give_the_same_options(command) -> None:
    args = build_parser(command).parse_args(command)
    options = MergerOptions.from_args(args)
    assert options.strategy == "ties" and options.linear == ".*weight"
    assert dict(options.settings) == {"scaling_factor": 0.5, "threshold": 40}
    lifted = MergerOptions.from_args(build_parser(command).parse_args([*command, "--any-base"]))
    assert options.max_relative_delta is not None and lifted.max_relative_delta is None


SHARED = ("--state", "--strategy", "--set", "--linear", "--max-relative-delta", "--any-base",
          "--threads", "--out-dtype", "--max-header-bytes")  # fmt: skip


def _options(command: str) -> dict[str, argparse.Action]:
    parser = build_parser([command])
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {
        flag: action for action in sub.choices[command]._actions for flag in action.option_strings
    }


def test_merge_and_serve_share_each_option_with_one_help_text() -> None:
    merge, serve = _options("merge"), _options("serve")
    for flag in SHARED:
        assert merge[flag].help == serve[flag].help, flag
        assert merge[flag].type is serve[flag].type and merge[flag].default == serve[flag].default
    for command in (["merge", *COMMON, "--max-header-bytes", "64M", "a.safetensors"],
                    ["serve", *COMMON, "--max-header-bytes", "64M"]):  # fmt: skip
        assert build_parser(command).parse_args(command).max_header_bytes == 64 << 20


def test_settings_reach_the_strategy_as_its_spec_does(tmp_path) -> None:
    base, _ = write_models(tmp_path, 0)
    options = MergerOptions(strategy="ties", settings={"scaling_factor": 0.5})
    with Merger(base, options.strategy, **options.merger_kwargs()) as merger:
        spec = merger.strategy.spec()
    with Merger(base, "ties(scaling_factor=0.5)") as merger:
        assert merger.strategy.spec() == spec
    assert "scaling_factor=0.5" in spec


def test_hyper_parameters_are_not_the_mergers_keywords(tmp_path) -> None:
    base, _ = write_models(tmp_path, 0)
    with pytest.raises(TypeError, match="scaling_factor"):
        Merger(base, "ties", scaling_factor=0.5)  # type: ignore[call-arg]
