"""Load test of the merge server: concurrent uploads on loopback, then proof of exactly-once.

Starts ``contmerge serve`` on 127.0.0.1 (a free port), uploads checkpoints from several client
threads (httpx; a 503 is retried after its Retry-After), waits until every accepted upload is
folded or found duplicate, then checks:

- every accepted upload has exactly one outcome, and each distinct content is folded once;
- the downloaded merged model equals a clean sequential fold (in memory, same strategy) of the
  folded checkpoints in the order the server recorded (max abs diff printed; must be 0).

Prints throughput (uploads/s, folds/s) and the server's peak RSS (psutil, sampled). Bounded:
loopback only, a fixed number of requests, a deadline. Exit code 0 when every check passes.

    python benchmarks/server_load.py                    # 200 uploads, 8 clients
    python benchmarks/server_load.py --uploads 24 --clients 4
"""

from __future__ import annotations

import argparse
import queue
import secrets
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import torch
from safetensors.torch import load, save_file

from contmerge import Merger
from contmerge.server.client import MergeClient
from contmerge.server.launcher import ServerProcess


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--uploads", type=int, default=200, help="uploads in total (200)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent client threads (8)")
    parser.add_argument(
        "--duplicate-every",
        type=int,
        default=20,
        help="every N-th upload re-sends an earlier checkpoint, to exercise dedupe (20; 0: none)",
    )
    parser.add_argument("--width", type=int, default=256, help="width of the model's layers")
    parser.add_argument("--layers", type=int, default=4, help="linear layers in the model")
    parser.add_argument("--strategy", default="ties", help="strategy (ties: order-sensitive)")
    parser.add_argument("--queue-size", type=int, default=64, help="server queue bound")
    parser.add_argument("--threads", type=int, default=1, help="server torch threads")
    parser.add_argument("--timeout", type=float, default=600.0, help="give up after (s)")
    parser.add_argument("--workdir", help="keep files here (default: a temp dir, removed)")
    return parser.parse_args(argv)


def make_model(width: int, layers: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(layers):
        tensors[f"layers.{i}.weight"] = torch.randn(width, width, generator=gen)
        tensors[f"layers.{i}.bias"] = torch.randn(width, generator=gen)
    tensors["norm.weight"] = torch.ones(width)
    return tensors


def finetune(base: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(10_000 + seed)
    return {n: v + 0.01 * torch.randn(v.shape, generator=gen) for n, v in base.items()}


@dataclass
class Sent:
    index: int  # position in the upload plan
    file: Path
    id: str | None = None
    status: int = 0


@dataclass
class RssSampler:
    pid: int
    peak: int = 0
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        process = psutil.Process(self.pid)
        while not self.stop.is_set():
            try:
                self.peak = max(self.peak, process.memory_info().rss)
            except psutil.Error:
                return
            self.stop.wait(0.02)


def upload_all(url: str, token: str, plan: list[Sent], clients: int, deadline: float) -> int:
    """Upload the plan from ``clients`` threads; returns how many 503s were met."""
    todo: queue.Queue[Sent] = queue.Queue()
    for sent in plan:
        todo.put(sent)
    busy = [0] * clients
    errors: list[BaseException] = []

    def client(slot: int) -> None:
        with MergeClient(url, token) as merge:
            while True:
                try:
                    sent = todo.get_nowait()
                except queue.Empty:
                    return
                data = sent.file.read_bytes()
                while True:
                    response = merge.post(data, sent.file.name)
                    if response.status_code != 503 or time.monotonic() > deadline:
                        break
                    busy[slot] += 1
                    time.sleep(float(response.headers.get("Retry-After", "1")))
                sent.status = response.status_code
                if response.status_code == 202:
                    sent.id = response.json()["id"]

    def guarded(slot: int) -> None:
        try:
            client(slot)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return sum(busy)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="contmerge-load-") as temp:
        work = Path(args.workdir) if args.workdir else Path(temp)
        work.mkdir(parents=True, exist_ok=True)
        return run(args, work)


def run(args: argparse.Namespace, work: Path) -> int:
    base_tensors = make_model(args.width, args.layers, seed=0)
    base = work / "base.safetensors"
    save_file(base_tensors, base)
    plan: list[Sent] = []
    for i in range(args.uploads):
        if args.duplicate_every and i % args.duplicate_every == args.duplicate_every - 1:
            plan.append(Sent(i, plan[i // 2].file))  # the same bytes again
            continue
        path = work / f"ckpt-{i:04d}.safetensors"
        save_file(finetune(base_tensors, i), path)
        plan.append(Sent(i, path))
    token = secrets.token_hex(24)
    state = work / "state"
    server = ServerProcess(
        ["--state", str(state), "--base", str(base), "--strategy", args.strategy,
         "--host", "127.0.0.1", "--port", "0", "--queue-size", str(args.queue_size),
         "--threads", str(args.threads), "--log-level", "warning"],
        work / "server.log",
        env={"CONTMERGE_TOKEN": token},
    ).start()  # fmt: skip
    sampler = RssSampler(server.pid)
    threading.Thread(target=sampler.run, daemon=True).start()
    deadline = time.monotonic() + args.timeout
    try:
        started = time.perf_counter()
        busy = upload_all(server.url, token, plan, args.clients, deadline)
        uploaded = time.perf_counter()
        accepted = [s for s in plan if s.id is not None]
        with MergeClient(server.url, token) as client:
            outcomes = client.wait([s.id for s in accepted], timeout=deadline - time.monotonic())
            finished = time.perf_counter()
            manifest = client.manifest()
            merged = load(client.http.get("/model").content)
            metrics = client.metrics()
    finally:
        sampler.stop.set()
        server.stop()
    by_id = {s.id: s for s in accepted}
    order = [a["source"].split("/")[1] for a in manifest["arrivals"]]
    statuses = [outcomes[s.id]["status"] for s in accepted]
    distinct = {s.file for s in accepted}
    checks = {
        "every upload accepted (202)": len(accepted) == len(plan),
        "every accepted upload has an outcome": len(outcomes) == len(accepted),
        "no rejections": "rejected" not in statuses,
        "each distinct checkpoint folded exactly once": len(order) == len(set(order))
        and sorted(by_id[i].file for i in order) == sorted(distinct),
        "state count = folded": manifest["globals"]["count"] == statuses.count("folded"),
    }
    torch.set_num_threads(args.threads)  # as the server: no threads spinning on a busy machine
    reference = Merger(base, manifest["strategy"])
    for checkpoint_id in order:
        reference.fold(by_id[checkpoint_id].file)
    expected = reference.emit_state_dict()
    diff = max(float((merged[n].double() - expected[n].double()).abs().max()) for n in expected)
    checks["merged model equals a clean sequential fold"] = diff == 0.0

    folds = len(outcomes)
    print(
        f"uploads: {len(plan)} from {args.clients} clients, {len(accepted)} accepted, "
        f"{busy} refused with 503 (retried)"
    )
    print(
        f"outcomes: {statuses.count('folded')} folded, {statuses.count('duplicate')} duplicate, "
        f"{statuses.count('rejected')} rejected"
    )
    print(
        f"model: {args.layers} x {args.width}x{args.width} ({base.stat().st_size / 1e6:.2f} MB "
        f"per checkpoint), strategy {manifest['strategy']}"
    )
    print(
        f"throughput: {len(accepted) / (uploaded - started):.1f} uploads/s (upload phase "
        f"{uploaded - started:.2f} s), {folds / (finished - started):.1f} folds/s "
        f"(all folded after {finished - started:.2f} s)"
    )
    print(
        f"server peak RSS: {sampler.peak / 2**20:.1f} MiB (pid {server.pid}, sampled every 20 ms)"
    )
    print(f"max abs diff vs sequential fold: {diff:g}")
    fold_sum = sum(
        float(line.split()[1])
        for line in metrics.splitlines()
        if line.startswith("contmerge_fold_seconds_sum")
    )
    each = fold_sum / max(folds, 1) * 1e3
    print(f"server-side time in folds: {fold_sum:.2f} s ({each:.0f} ms each)")
    for name, ok in checks.items():
        print(f"  [{'ok' if ok else 'FAIL'}] {name}")
    everything = all(checks.values())
    print("exactly once and equal: " + ("yes" if everything else "NO"))
    return 0 if everything else 1


if __name__ == "__main__":
    sys.exit(main())
