"""Server peak RSS aggregating N simulated clients: contmerge streaming vs Flower's FedAvg.

Every (method, N) runs in a fresh Python process running one round of Flower's simulation
engine (Ray backend, one CPU per client); the server process's peak RSS (``ru_maxrss``: the
ServerApp, the in-memory SuperLink state and the Ray driver, not the client actors) is reported.
Clients return the broadcast model plus a little noise, so every reply is a full model.

- ``contmerge``: ``ContmergeStrategy(..., max_in_flight=4).start_streaming``: replies pulled
  as they arrive, folded, dropped; at most 4 messages out at once, so replies cannot pile up
  in the SuperLink while the server folds (folding a reply can be slower than a client).
- ``contmerge-unbounded`` (not run by default): the same with every message pushed at once.
- ``fedavg``: Flower's ``FedAvg().start``: ``send_and_receive`` gathers every reply, then
  averages them.

Expected: flat in N for contmerge, linear for FedAvg (≈ N model copies). Prints a table and the
ratios, from one run.

Measurement notes. Workers run with ``MALLOC_MMAP_THRESHOLD_=131072`` (both methods; turn off
with ``--glibc-default``): glibc otherwise raises its mmap threshold after the first multi-MB
buffer is freed, later model-sized buffers then come from the heap and are not returned, and RSS
records allocator history rather than live memory. RSS also counts the Ray object store pages
the server maps (``RssShmem``, printed separately), which grow with the number of client calls
for both methods. Example::

    python benchmarks/flower_memory.py                    # 10, 50, 100 clients, 16 MB model
    python benchmarks/flower_memory.py --clients 10 20 --model-mb 64
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from typing import Any

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

METHODS = ("contmerge", "contmerge-unbounded", "fedavg")
DEFAULT_METHODS = ("contmerge", "fedavg")
MB = 1024 * 1024


def _model(model_mb: float) -> dict[str, Any]:
    """float32 linear layers of 1024 columns totalling about ``model_mb`` MB."""
    import torch

    rows = max(1, int(model_mb * MB / 4 / 1024))
    g = torch.Generator().manual_seed(0)
    layers, left = {}, rows
    for i in range(0, rows, 2048):
        n = min(2048, left)
        layers[f"layer{i // 2048}.weight"] = torch.randn(n, 1024, generator=g) * 0.02
        left -= n
    return layers


def _client_app() -> Any:
    import torch
    from flwr.app import Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    from contmerge.flower import from_array_record, to_array_record

    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        g = torch.Generator().manual_seed(pid)
        model = from_array_record(msg.content["arrays"])
        tuned = {k: v + 1e-3 * torch.randn(v.shape, generator=g) for k, v in model.items()}
        metrics = MetricRecord({"num-examples": 1})
        return Message(RecordDict({"arrays": to_array_record(tuned), "metrics": metrics}),
                       reply_to=msg)  # fmt: skip

    return app


def worker(
    method: str, clients: int, model_mb: float, strategy: str, max_in_flight: int
) -> dict[str, Any]:
    """One measurement, in this process: run one round, return peak RSS and timings."""
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.simulation import run_simulation

    from contmerge.flower import ContmergeStrategy, to_array_record
    from contmerge.flower.simulate import backend_config

    base = _model(model_mb)
    model_bytes = sum(t.numel() * t.element_size() for t in base.values())
    initial = to_array_record(base)
    del base
    before = _peak_rss()
    out: dict[str, Any] = {}
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        sampling = {"fraction_evaluate": 0.0, "min_train_nodes": clients,
                    "min_available_nodes": clients}  # fmt: skip
        started = time.perf_counter()
        if method.startswith("contmerge"):
            window = None if method == "contmerge-unbounded" else max_in_flight
            s = ContmergeStrategy(strategy, max_in_flight=window, **sampling)
            result = s.start_streaming(grid, initial, num_rounds=1, timeout=3600)
            out["folded"] = len(s.reports[0].folded)
        else:
            result = FedAvg(**sampling).start(grid, initial, num_rounds=1, timeout=3600)
        out["seconds"] = time.perf_counter() - started
        out["updated"] = bool(result.arrays)

    with _Sampler() as sampler:
        run_simulation(server, _client_app(), num_supernodes=clients,
                       backend_config=backend_config())  # fmt: skip
    return {"method": method, "clients": clients, "model_bytes": model_bytes,
            "peak_rss": _peak_rss(), "rss_before_run": before,
            **{f"peak_{k}": v for k, v in sampler.peak.items()}, **out}  # fmt: skip


class _Sampler:
    """Peak of /proc/self/status fields (RssAnon, RssShmem...), sampled every 20 ms."""

    def __init__(self, fields: tuple[str, ...] = ("RssAnon", "RssFile", "RssShmem")) -> None:
        import threading

        self.fields = fields
        self.peak = dict.fromkeys(fields, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _read(self) -> dict[str, int]:
        values = {}
        with open("/proc/self/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in self.fields:
                    values[key] = int(rest.split()[0]) * 1024
        return values

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            for key, value in self._read().items():
                self.peak[key] = max(self.peak[key], value)

    def __enter__(self) -> _Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _measure(method: str, clients: int, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--worker", method, "--clients", str(clients),
           "--model-mb", str(args.model_mb), "--strategy", args.strategy,
           "--max-in-flight", str(args.max_in_flight)]  # fmt: skip
    env = dict(os.environ)
    if not args.glibc_default:
        env.setdefault("MALLOC_MMAP_THRESHOLD_", str(128 * 1024))
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{method} with {clients} clients failed:\n{done.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Server peak RSS aggregating N simulated Flower clients: contmerge "
        "streaming fold vs Flower's FedAvg (one round each, fresh process per measurement)."
    )
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 50, 100],
                        help="numbers of clients to measure (default 10 50 100)")  # fmt: skip
    parser.add_argument("--model-mb", type=float, default=16.0, help="model size in MB (16)")
    parser.add_argument("--strategy", default="average", help="contmerge strategy (average)")
    parser.add_argument(
        "--max-in-flight",
        type=int,
        default=4,
        help="contmerge: messages out at once (default 4); 'contmerge-unbounded' pushes all",
    )
    parser.add_argument(
        "--glibc-default",
        action="store_true",
        help="keep glibc's dynamic mmap threshold (see the module docstring)",
    )
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(DEFAULT_METHODS),
                        help="what to measure (default: contmerge fedavg)")  # fmt: skip
    parser.add_argument("--timeout", type=float, default=1200, help="per measurement (s)")
    parser.add_argument("--json", help="also write the measurements here")
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        result = worker(args.worker, args.clients[0], args.model_mb, args.strategy,
                        args.max_in_flight)  # fmt: skip
        print("RESULT " + json.dumps(result), flush=True)
        return 0

    rows = []
    for clients in args.clients:
        for method in args.methods:
            row = _measure(method, clients, args)
            rows.append(row)
            print(f"{method:10s} {clients:4d} clients: peak RSS {row['peak_rss'] / MB:8.0f} MB "
                  f"(before the run {row['rss_before_run'] / MB:.0f} MB; peak anon "
                  f"{row['peak_RssAnon'] / MB:.0f}, shmem {row['peak_RssShmem'] / MB:.0f}, "
                  f"file {row['peak_RssFile'] / MB:.0f} MB), "
                  f"{row['seconds']:.1f} s", flush=True)  # fmt: skip
    _report(rows, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


def _report(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    model_mb = rows[0]["model_bytes"] / MB
    for key, what in (("peak_rss", "peak RSS"), ("peak_RssAnon", "peak anonymous (private) RSS")):
        _table({(r["method"], r["clients"]): r[key] / MB for r in rows}, args, model_mb, what)


def _table(
    peak: dict[tuple[str, int], float], args: argparse.Namespace, model_mb: float, what: str
) -> None:
    first, last = args.clients[0], args.clients[-1]
    print(f"\nserver {what} in MB, model {model_mb:.1f} MB (ratio to {first} clients)")
    print("| clients | " + " | ".join(args.methods) + " | fedavg / contmerge |")
    print("|---:|" + "---:|" * (len(args.methods) + 1))
    for n in args.clients:
        cells = [f"{peak[m, n]:.0f} ({peak[m, n] / peak[m, first]:.2f}×)" for m in args.methods]
        ratio = (f"{peak['fedavg', n] / peak['contmerge', n]:.2f}×"
                 if {"fedavg", "contmerge"} <= set(args.methods) else "–")  # fmt: skip
        print(f"| {n} | " + " | ".join(cells) + f" | {ratio} |")
    for m in args.methods:
        growth = (peak[m, last] - peak[m, first]) / (last - first) if last != first else 0.0
        print(f"{m}: {growth:+.1f} MB per extra client ({growth / model_mb:+.2f} model copies)")


if __name__ == "__main__":
    sys.exit(main())
