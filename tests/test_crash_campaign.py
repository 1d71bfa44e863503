"""Crash campaign: folds of mixed strategies in child processes, SIGKILLed at random moments.

Each strategy has its own state directory and list of checkpoints. A child opens the state (or
creates it) and folds the list in order, telling the parent through a pipe where it is: opened,
folding #i, each commit step, done #i. The parent kills it (SIGKILL) after a random delay, or
has it pause at a chosen commit step and kills it there, then checks the state: it opens, its
data matches its checksum, the folds recorded are exactly a prefix of the list (none lost of
those the child reported done, none twice). Then it starts the next child, until every list is
folded; the emitted models must equal a clean in-memory replay bit for bit.

Children are forked from this process once the fold loops are compiled, so a restart costs
milliseconds instead of an interpreter start. Out of the default run; run it with

    pytest -m campaign -s

``CONTMERGE_CRASH_CHECKPOINTS`` (default 18 per strategy) and ``CONTMERGE_CRASH_SECONDS`` (the
budget, default 1500) scale it.
"""

from __future__ import annotations

import collections
import faulthandler
import multiprocessing
import os
import random
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import contmerge.state
from contmerge import Merger

from helpers import assert_same, merged_after, write_models

STRATEGIES = [
    "average",
    "task_arithmetic",
    "magmax",
    "ties",
    "opcm",
    "chain(dare(p=0.5, seed=1), magmax())",
]
#: the commit's steps, in order, at which a child can be told to pause (then be killed)
STEPS = ["seal", "publish", "manifest", "retire"]
CHECKPOINTS = int(os.environ.get("CONTMERGE_CRASH_CHECKPOINTS", "18"))
BUDGET = float(os.environ.get("CONTMERGE_CRASH_SECONDS", "1500"))


def _child(conn: Any, base: Path, strategy: str, state: Path, paths: list[Path], pause: str):
    """Fold ``paths`` into ``state``, reporting each step; sleep at commit step ``pause``."""
    # a child that hangs writes every thread's stack where the parent looks for it
    faulthandler.dump_traceback_later(240, file=open(_stacks(state, os.getpid()), "w"))
    _own_tqdm_lock()

    def step(name: str) -> None:
        conn.send(("commit", name))
        if name == pause:
            time.sleep(600)  # the parent kills us here

    def around(owner: Any, attribute: str, name: str, when: Any = None) -> None:
        original = getattr(owner, attribute)

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            if when is None or when():
                step(name)
            return original(*args, **kwargs)

        setattr(owner, attribute, wrapped)

    committing = [False]
    around(contmerge.state._DiskStaging, "seal", "seal")
    around(contmerge.state._DiskStaging, "publish", "publish")
    around(contmerge.state, "atomic_write_bytes", "manifest")
    # the reader of the new generation is opened after the manifest, before the old file is
    # kept aside as the spare
    around(contmerge.state.DiskStore, "_set_reader", "retire", lambda: committing[0])
    seal = contmerge.state._DiskStaging.seal

    def sealing(*args: Any, **kwargs: Any) -> Any:
        committing[0] = True
        return seal(*args, **kwargs)

    contmerge.state._DiskStaging.seal = sealing  # type: ignore[method-assign]
    with Merger(base, strategy, state) as merger:
        conn.send(("open", merger.count))
        committing[0] = False
        for index, path in enumerate(paths):
            conn.send(("fold", index))
            result = merger.fold(path)
            committing[0] = False
            conn.send(("done", index, result.status))
    conn.send(("finished",))


def _own_tqdm_lock() -> None:
    """tqdm's lock (taken by every bar, even a disabled one) is a semaphore shared by all the
    processes forked from this one: a sibling killed while holding it would hang every later
    child. Real runs are separate processes, each with its own; so is each child here."""
    from tqdm import std
    from tqdm.auto import tqdm  # the class every engine bar is made from

    std.TqdmDefaultWriteLock.mp_lock = multiprocessing.get_context("fork").RLock()
    tqdm.set_lock(std.TqdmDefaultWriteLock())


def _stacks(state: Path, pid: int) -> Path:
    return state.parent / f"stacks-{pid}.txt"


class Campaign:
    def __init__(self, base: Path, paths: list[Path], root: Path, seed: int = 11) -> None:
        self.base, self.paths, self.root = base, paths, root
        self.random = random.Random(seed)
        self.kills: collections.Counter[str] = collections.Counter()
        self.runs = 0
        self.fold_seconds: dict[str, float] = {}

    def time_folds(self) -> None:
        """One durable fold per strategy, timed here, so kill delays scale with the machine's
        load; it also compiles every fold loop before the children are forked."""
        for strategy in STRATEGIES:
            with Merger(self.base, strategy, self.root / f"timing-{len(self.fold_seconds)}") as m:
                m.fold(self.paths[0])
                started = time.perf_counter()
                m.fold(self.paths[1])
                self.fold_seconds[strategy] = time.perf_counter() - started

    def run(self, strategy: str, state: Path, deadline: float) -> None:
        """Children fold into ``state`` until every checkpoint is in, each killed at random."""
        count = 0
        context = multiprocessing.get_context("fork")
        while count < len(self.paths):
            assert time.monotonic() < deadline, f"over the time budget: {self.summary()}"
            pause = self.random.choice(STEPS) if self.random.random() < 0.25 else ""
            # mostly timed from the open (kills mid-fold), sometimes from the start (opening)
            from_start = self.random.random() < 0.1
            delay = self.random.uniform(0.0, 2.5) * self.fold_seconds[strategy]
            receive, send = context.Pipe(duplex=False)
            child = context.Process(
                target=_child, args=(send, self.base, strategy, state, self.paths, pause)
            )
            child.start()
            send.close()
            self.runs += 1
            events = self._drive(child, receive, pause, delay, from_start)
            count = self._check(strategy, state, count, events)

    def _drive(
        self, child: Any, receive: Any, pause: str, delay: float, from_start: bool
    ) -> list[tuple]:
        """Kill ``child`` once it paused at ``pause``, or ``delay`` seconds after it opened
        the state (or started); every event it reported, in order."""
        events: list[tuple] = []
        opened_at = time.monotonic() if from_start else None
        limit = time.monotonic() + 300
        while True:
            if time.monotonic() > limit:
                time.sleep(1)
                stacks = _stacks(self.root / "x", child.pid)
                raise AssertionError(
                    f"a child made no progress: {events[-3:]}\n"
                    + (stacks.read_text() if stacks.exists() else "(no stacks)")
                )
            if receive.poll(0.001):
                try:
                    events.append(receive.recv())
                except EOFError:
                    break
                if events[-1][0] == "open" and opened_at is None:
                    opened_at = time.monotonic()
                if events[-1] == ("finished",):
                    break
                if pause and events[-1] == ("commit", pause):
                    break
            elif not child.is_alive():
                break
            if not pause and opened_at is not None and time.monotonic() - opened_at > delay:
                break
        if child.is_alive():
            os.kill(child.pid, signal.SIGKILL)
        child.join()
        while receive.poll():  # what it reported before it died
            try:
                events.append(receive.recv())
            except EOFError:
                break
        receive.close()
        if child.exitcode == -signal.SIGKILL:
            self.kills[self._moment(events)] += 1
        else:
            assert child.exitcode == 0 and events[-1] == ("finished",), events[-3:]
        return events

    @staticmethod
    def _moment(events: list[tuple]) -> str:
        """Where the child was when it died: the last step it reported."""
        last = events[-1] if events else ("start",)
        if last[0] == "commit":
            return f"commit:{last[1]}"
        return {"start": "opening", "fold": "mid-fold"}.get(last[0], "between folds")

    def _check(self, strategy: str, state: Path, before: int, events: list[tuple]) -> int:
        """The state after a kill: loadable, intact, a prefix of the list, nothing lost."""
        done = [e[1] for e in events if e[0] == "done"]
        begun = [e[1] for e in events if e[0] == "fold"]
        if not (state / "manifest.json").exists():
            assert before == 0 and not done, (strategy, events[-3:])
            return 0
        with Merger(self.base, state_dir=state, read_only=True) as merger:
            assert isinstance(merger.store, contmerge.state.DiskStore)
            merger.store.verify()
            folded = [Path(a.source) for a in merger.arrivals]
        count = len(folded)
        assert folded == self.paths[:count], (strategy, folded)
        assert count >= before and (not done or count >= done[-1] + 1), (strategy, events)
        assert count <= max(before, begun[-1] + 1 if begun else 0), (strategy, events)
        return count

    def summary(self) -> str:
        mid_commit = sum(n for k, n in self.kills.items() if k.startswith("commit:"))
        return (
            f"{len(STRATEGIES) * len(self.paths)} folds, {self.runs} runs, "
            f"{sum(self.kills.values())} kills ({self.kills['mid-fold']} mid-fold, "
            f"{mid_commit} mid-commit, {self.kills['between folds']} between folds, "
            f"{self.kills['opening']} while opening or creating); by commit step: "
            + ", ".join(f"{s} {self.kills[f'commit:{s}']}" for s in STEPS)
        )


@pytest.mark.slow
@pytest.mark.campaign
def test_sigkill_at_random_moments_across_mixed_strategies(tmp_path):
    torch.set_num_threads(1)  # as the children and the replay: one summation order
    started = time.monotonic()
    base, paths = write_models(tmp_path, CHECKPOINTS, scale=4)
    campaign = Campaign(base, paths, tmp_path)
    campaign.time_folds()
    deadline = started + BUDGET
    for k, strategy in enumerate(STRATEGIES):
        state = tmp_path / f"state-{k}"
        campaign.run(strategy, state, deadline)
        with Merger(base, state_dir=state, read_only=True) as merger:
            assert merger.count == len(paths)
            assert_same(merger.emit_state_dict(), merged_after(base, paths, strategy))
    seconds = time.monotonic() - started
    print(f"\ncrash campaign: {campaign.summary()}; 0 failures; {seconds:.0f} s")
    kills = campaign.kills
    assert sum(kills.values()) >= 100 and kills["mid-fold"] >= 30
    assert sum(n for k, n in kills.items() if k.startswith("commit:")) >= 10
