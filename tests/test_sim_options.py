"""The scenario commands share one set of option names, document every option, and answer a bad
value with one line naming the option and the valid choices."""

from __future__ import annotations

import argparse

import pytest

from contmerge.cli import build_parser, main

pytest.importorskip("flwr")

COMMANDS = [
    ["simulate", "continual"],
    ["simulate", "federated"],
    ["simulate", "decentralized"],
    ["simulate", "fw"],
    ["demo"],
]


def _parser_of(command: list[str]) -> argparse.ArgumentParser:
    parser = build_parser(command)
    for word in command:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[word]
    return parser


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_option_is_documented_and_spelt_like_the_others(command: list[str]) -> None:
    parser = _parser_of(command)
    flags = {flag for action in parser._actions for flag in action.option_strings}
    for action in parser._actions:
        if action.help == argparse.SUPPRESS or not action.option_strings:
            continue
        assert action.help, f"{' '.join(command)} {action.option_strings} has no help"
    assert "--output-dir" in flags and "--no-progress" in flags
    # one spelling is listed: the older ones are accepted but not shown
    listed = parser.format_help()
    assert "--out " not in listed and "--out," not in listed


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["simulate", "continual", "--tasks", "bogus"], "fashion_rot90"),
        (["simulate", "continual", "--model", "minilm", "--tasks", "bogus"], "rt_sentiment"),
        (["simulate", "continual", "--model", "vit-s", "--tasks", "bogus,mnist"], "opencv_digits"),
        (["simulate", "continual", "--model", "smollm2-lora", "--tasks", "bogus"], "wordnet_pos"),
        (["simulate", "fw", "--targets", "bogus", "--quick"], "valid:"),
    ],
)
def test_an_unknown_task_is_one_line_listing_the_valid_ones(argv, needle, tmp_path, capsys) -> None:
    code = main([*argv, "--output-dir", str(tmp_path / "out"), "--cache-dir", str(tmp_path),
                 "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: --") and "'bogus'" in err and needle in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "argv",
    [
        ["simulate", "continual", "--orders", "0"],
        ["simulate", "federated", "--clients", "0"],
        ["simulate", "decentralized", "--agents", "-2"],
        ["simulate", "continual", "--n-train", "ten"],
    ],
)
def test_a_bad_count_is_a_usage_error(argv, capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert "must be at least 1" in err or "is not an integer" in err
    assert "Traceback" not in err


def test_help_lists_the_tasks_of_each_model(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["simulate", "continual", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name in ("fashion_rot90", "digits_invert_rot180", "wordnet_verb_sense", "opencv_digits"):
        assert name in text


def test_the_older_spellings_still_parse() -> None:
    args = _parser_of(["simulate", "federated"]).parse_args(["--out", "o", "--quiet"])
    assert args.output_dir == "o"
    args = _parser_of(["simulate", "decentralized"]).parse_args(["--quiet"])
    assert args.no_progress
    args = build_parser(["merge"]).parse_args(
        ["merge", "--base", "b", "--state", "s", "--quiet", "x"]
    )
    assert args.quiet


def test_a_real_model_without_its_extra_names_the_extra(tmp_path, capsys) -> None:
    import importlib.util

    if importlib.util.find_spec("onnx") is not None:
        pytest.skip("the [real] extra is installed here")
    code = main(["simulate", "continual", "--model", "vit-s", "--cache-dir", str(tmp_path),
                 "--output-dir", str(tmp_path / "out"), "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.splitlines()[-1].startswith("contmerge simulate continual needs the [real] extra")
    assert "Traceback" not in err
