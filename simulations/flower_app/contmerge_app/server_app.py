"""ServerApp: a contmerge strategy as the Flower strategy, folding client replies as they arrive.

Settings come from ``[tool.flwr.app.config]`` (override with ``flwr run --run-config``). The
server evaluates the global backbone on every task's test set after each round and, when
``out-dir`` is set, writes ``results.json`` and the final ``merged.safetensors`` there.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.serverapp import Grid, ServerApp

from contmerge.flower import ContmergeStrategy, from_array_record, to_array_record
from contmerge.flower.arrays import record_digest
from contmerge.simulations.federated.client import HEADS_KEY, SCENARIO_KEY
from contmerge.simulations.federated.scenario import (
    DEFAULT_CACHE,
    Scenario,
    heads_to_bytes,
    prepare,
)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

app = ServerApp()


class CheckedStrategy(ContmergeStrategy):
    """Also checks that every client received the broadcast bit-exactly (its reply says what
    digest it computed over the arrays it got)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.transport: list[dict[str, Any]] = []

    def on_reply(self, server_round: int, reply: Message, status: str) -> None:
        if reply.has_error() or "received" not in reply.content.config_records:
            return
        sent = self.broadcast_arrays(server_round)
        got = reply.content.config_records["received"].get("sha256")
        self.transport.append(
            {
                "round": server_round,
                "node": reply.metadata.src_node_id,
                "status": status,
                "bit_exact": sent is not None and got == record_digest(sent),
            }
        )


def scenario_from(cfg: dict[str, Any]) -> Scenario:
    tasks = tuple(t.strip() for t in str(cfg.get("tasks", "")).split(",") if t.strip())
    return Scenario(
        partition=str(cfg.get("partition", "iid")),
        tasks=tasks or None,
        n_train=int(cfg.get("n-train", 1000)),
        n_test=int(cfg.get("n-test", 500)),
        seed=int(cfg.get("seed", 0)),
        local_epochs=int(cfg.get("local-epochs", 1)),
        lr=float(cfg.get("lr", 5e-4)),
    )


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = dict(context.run_config)
    scenario = scenario_from(cfg)
    prepared = prepare(scenario, str(cfg.get("cache-dir") or DEFAULT_CACHE))
    dtype = DTYPES[str(cfg.get("transport-dtype", "float32"))]
    base = {k: v.to(dtype) if v.is_floating_point() else v for k, v in prepared.base.items()}
    min_nodes = int(cfg.get("min-nodes", 2))
    strategy = CheckedStrategy(
        str(cfg.get("strategy", "opcm")),
        merge=str(cfg.get("merge", "round")),  # type: ignore[arg-type]
        min_replies=int(cfg.get("min-replies", 1)),
        fraction_train=1.0,
        fraction_evaluate=0.0,
        min_train_nodes=min_nodes,
        min_available_nodes=min_nodes,
    )

    def evaluate(_round: int, arrays: ArrayRecord) -> MetricRecord:
        return MetricRecord(prepared.accuracy(from_array_record(arrays)))

    start = strategy.start_streaming if bool(cfg.get("streaming", True)) else strategy.start
    result = start(
        grid=grid,
        initial_arrays=to_array_record(base),
        num_rounds=int(cfg.get("num-server-rounds", 3)),
        timeout=float(cfg.get("round-timeout", 600.0)),
        train_config=ConfigRecord(
            {SCENARIO_KEY: scenario.to_json(), HEADS_KEY: heads_to_bytes(prepared.heads)}
        ),
        evaluate_fn=evaluate,
    )
    strategy.close()
    out_dir = str(cfg.get("out-dir", ""))
    if out_dir:
        _write(Path(out_dir), cfg, strategy, result.arrays, result.evaluate_metrics_serverapp)


def _write(
    out: Path,
    cfg: dict[str, Any],
    strategy: CheckedStrategy,
    arrays: ArrayRecord,
    accuracy: dict[int, MetricRecord],
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    merged = from_array_record(arrays)
    safetensors.torch.save_file(merged, str(out / "merged.safetensors"))
    results = {
        "config": cfg,
        "accuracy": {r: dict(m) for r, m in accuracy.items()},
        "rounds": [asdict(r) for r in strategy.reports],
        "transport": strategy.transport,
        "dtypes": sorted({str(t.dtype).removeprefix("torch.") for t in merged.values()}),
    }
    # Written last and atomically: its presence means the run completed.
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=2, default=str))
    tmp.replace(out / "results.json")
