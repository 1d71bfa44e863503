"""The thread policy (``contmerge.threads``): one budget for a fold's compute threads, reaching
the fold threads and torch from the CLI, the server and the Python API; torch's own setting
restored after every fold; results that do not depend on the budget."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
import torch
from safetensors.torch import load_file

from contmerge import Merger
from contmerge.cli import build_parser, main
from contmerge.errors import SettingError
from contmerge.strategy import State, Strategy
from contmerge.threads import DEFAULT_MAX_THREADS, available_cores, default_threads

from helpers import assert_same, write_models


@pytest.fixture()
def models(tmp_path):
    return write_models(tmp_path, 3)


@pytest.fixture()
def torch_at_two():
    """torch's thread count as a library user set it (2), put back as it was after the test."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield 2
    torch.set_num_threads(before)


@dataclass
class ThreadProbe(Strategy):
    """Adds δ, recording the torch thread count and the thread each tensor is folded on."""

    name = "thread_probe"
    seen: list[tuple[int, str]] | None = None

    def fold(self, info, state, delta, base, ctx) -> State:
        assert self.seen is not None
        self.seen.append((torch.get_num_threads(), threading.current_thread().name))
        return {"value": state["value"] + delta}

    def emit(self, info, state, base, globals) -> torch.Tensor:
        assert self.seen is not None
        self.seen.append((torch.get_num_threads(), threading.current_thread().name))
        return base + state["value"]


@dataclass
class ParallelProbe(ThreadProbe):
    name = "parallel_probe"
    per_tensor_parallel = True


@contextmanager
def started_threads() -> Iterator[set[str]]:
    """The names of the threads started inside the block (a trace hook each new thread runs)."""
    names: set[str] = set()

    def note(frame, event, arg):
        names.add(threading.current_thread().name)
        return None

    threading.settrace(note)
    try:
        yield names
    finally:
        threading.settrace(None)  # type: ignore[arg-type]


def _pools(names: set[str], prefix: str) -> set[str]:
    return {n for n in names if n.startswith(prefix)}


def test_a_serial_fold_gets_torch_pool_of_the_budget_and_restores_the_callers(models, torch_at_two):
    base, paths = models
    for budget in (1, 3):
        probe = ThreadProbe(seen=[])
        with Merger(base, probe, threads=budget) as merger:
            merger.fold(paths[0])
            assert torch.get_num_threads() == torch_at_two  # restored after the fold
            folded = len(probe.seen)
            merger.emit_state_dict()
            assert torch.get_num_threads() == torch_at_two  # and after the emit
        assert folded > 0 and len(probe.seen) > folded
        assert {count for count, _ in probe.seen} == {budget}
        assert {name for _, name in probe.seen} == {"MainThread"}


def test_a_parallel_fold_runs_on_the_budget_with_torch_single_threaded(models, torch_at_two):
    base, paths = models
    probe = ParallelProbe(seen=[])
    with Merger(base, probe, threads=3) as merger:
        merger.fold(paths[0])
    assert torch.get_num_threads() == torch_at_two
    folded_on = {name for _, name in probe.seen}
    assert {count for count, _ in probe.seen} == {1}
    assert _pools(folded_on, "contmerge-tensor") == folded_on
    assert 1 <= len(folded_on) <= 3  # threads are started as needed, never past the budget


def test_an_error_in_a_fold_still_restores_torch_threads(models, torch_at_two):
    base, paths = models

    @dataclass
    class Fails(ThreadProbe):
        def fold(self, info, state, delta, base, ctx) -> State:
            raise RuntimeError("boom")

    with Merger(base, Fails(seen=[]), threads=3) as merger:
        with pytest.raises(RuntimeError, match="boom"):
            merger.fold(paths[0])
        assert merger.count == 0
    assert torch.get_num_threads() == torch_at_two


@pytest.mark.parametrize(
    "options, tensor_threads",
    [(["--threads", "1"], 0), (["--threads", "3"], 3), (["--workers", "2"], 2)],
)
def test_the_cli_option_reaches_the_fold_threads(models, tmp_path, options, tensor_threads):
    """``--threads`` (and its older name ``--workers``) sets how many threads fold OPCM's
    tensors: none of ours with 1, at most N otherwise."""
    base, paths = models
    command = ["merge", "--base", str(base), "--state", str(tmp_path / "run"), "--quiet"]
    with started_threads() as names:
        code = main([*command, "--strategy", "opcm", *options, *map(str, paths)])
    assert code == 0
    pool = _pools(names, "contmerge-tensor")
    assert (len(pool) > 0) == (tensor_threads > 0)
    assert len(pool) <= tensor_threads


def test_the_help_examples_run(models, tmp_path, capsys):
    """``--threads 1``, the example of merge, emit and serve --help."""
    base, paths = models
    state = str(tmp_path / "run")
    merge = ["merge", "--base", str(base), "--state", state, "--strategy", "ties", "--quiet"]
    assert main([*merge, "--threads", "1", *map(str, paths)]) == 0
    out = tmp_path / "merged.safetensors"
    assert main(["emit", "--state", state, "--out", str(out), "--threads", "1"]) == 0
    with Merger(base, "ties", threads=2) as merger:
        for path in paths:
            merger.fold(path)
        assert_same(load_file(out), merger.emit_state_dict())
    serve = ["serve", "--base", str(base), "--state", state]
    assert build_parser(["serve"]).parse_args([*serve, "--threads", "1"]).threads == 1
    capsys.readouterr()
    for command in (merge, serve, ["emit", "--state", state, "--out", str(out)]):
        with pytest.raises(SystemExit):
            build_parser(command[:1]).parse_args([*command, "--threads", "0"])
        assert "--threads must be a whole number of threads >= 1" in capsys.readouterr().err


def test_the_server_hands_its_budget_to_the_merger(models, tmp_path):
    pytest.importorskip("fastapi")
    from contmerge.server.service import MergeService, ServeSettings

    base, _ = models
    settings = ServeSettings(state=tmp_path / "run", base=str(base), strategy="opcm", threads=1)
    service = MergeService(settings)
    try:
        assert service.merger.threads == 1 and service.merger._runner.workers == 1
    finally:
        service.stop()
        service.close()


def test_the_default_budget_follows_the_environment(models, monkeypatch):
    base, _ = models
    monkeypatch.delenv("CONTMERGE_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert default_threads() == min(DEFAULT_MAX_THREADS, available_cores())
    monkeypatch.setenv("OMP_NUM_THREADS", "3,1")
    assert default_threads() == 3
    monkeypatch.setenv("CONTMERGE_THREADS", "5")  # ours wins over OpenMP's
    with Merger(base, "average") as merger:
        assert merger.threads == 5 and merger._runner.workers == 5
    with Merger(base, "average", threads=2) as merger:  # given wins over the environment
        assert merger.threads == 2
    monkeypatch.setenv("CONTMERGE_THREADS", "many")
    with pytest.raises(SettingError, match=r"\$CONTMERGE_THREADS must be a whole number"):
        Merger(base, "average")


@pytest.mark.parametrize("bad", [0, -2, 1.5, True])
def test_a_bad_budget_is_refused(models, bad):
    with pytest.raises(SettingError, match="threads"):
        Merger(models[0], "average", threads=bad)


def test_threads_and_workers_must_agree(models):
    with pytest.raises(SettingError, match="workers is the older name"):
        Merger(models[0], "average", threads=2, workers=3)
    with Merger(models[0], "average", workers=3) as merger:
        assert merger.threads == 3


@pytest.mark.parametrize("strategy", ["average", "ties", "opcm"])
def test_results_are_bit_equal_across_budgets(models, strategy):
    """Elementwise rules fold each chunk the same whatever thread takes it; OPCM folds each
    tensor on one thread with torch single-threaded at any budget, and hands results on in
    order: the merged models are equal bit for bit, not just within float32 rounding."""
    base, paths = models
    merged = []
    for budget in (1, 2, 3):
        with Merger(base, strategy, threads=budget) as merger:
            for path in paths:
                merger.fold(path)
            merged.append(merger.emit_state_dict())
    assert_same(merged[0], merged[1])
    assert_same(merged[0], merged[2])
