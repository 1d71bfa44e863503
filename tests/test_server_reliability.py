"""The merge server when things go wrong around it: a full disk (a real tmpfs filled up),
clients that trickle their uploads, a huge header. Real servers on loopback, real sockets."""

from __future__ import annotations

import asyncio
import os
import re
import select
import socket
import struct
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
import torch
from safetensors.torch import load, save, save_file
from server_helpers import (
    STRATEGY,
    TOKEN,
    Served,
    assert_same_model,
    final_events,
    finetune,
    journal,
    make_base,
    sequential_fold,
    serve_args,
    wait_for,
)

from contmerge.server.client import MergeClient
from contmerge.server.launcher import ServerProcess


# --- a real full disk -------------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 24 MiB tmpfs: writes past its size fail with a real ENOSPC."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs for a real full disk needs root")
    run = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if run.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs for a real full disk: {run.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path, leave: int) -> Path:
    """Take all the free space of ``disk`` but ``leave`` bytes, in one ballast file."""
    ballast = disk / "ballast"
    stat = os.statvfs(disk)
    room = stat.f_bavail * stat.f_frsize - leave
    block = b"\0" * (1 << 20)
    with open(ballast, "wb") as handle:
        while room > 0:
            try:
                room -= handle.write(block[: min(room, len(block))])
            except OSError:
                break
    return ballast


def test_a_fold_that_fails_for_lack_of_space_is_retried_not_rejected(
    tmp_path: Path, small_disk: Path
) -> None:
    server = Served(tmp_path, width=256, layers=2, state=small_disk / "state")
    try:
        path = server.checkpoint(1)
        data = path.read_bytes()
        # room for the spooled upload and its journal line, not for a new state generation
        ballast = fill(small_disk, leave=len(data) + 96 * 1024)
        response = server.client.post(data, "full-disk.safetensors")
        assert response.status_code == 202, response.text
        checkpoint_id = response.json()["id"]
        status = wait_for(
            lambda: (
                ((s := server.client.status())["queue"].get("retrying") and s)
                or final_events(server.state, checkpoint_id)
            ),
            timeout=60,
            what="a retry or an outcome",
        )
        assert final_events(server.state, checkpoint_id) == []  # not rejected: still promised
        retrying = status["queue"]["retrying"]
        assert retrying["id"] == checkpoint_id
        assert "no space left on device" in retrying["reason"], retrying
        assert re.search(r"^retrying: .*, next attempt in \d+ s$", retrying["message"]), retrying
        assert str(server.state) not in retrying["reason"]  # no server paths for clients
        assert server.client.outcome(checkpoint_id)["status"] == "retrying"
        spooled = [p.name for p in (server.state / "spool").iterdir()]
        assert [n for n in spooled if n.startswith(checkpoint_id)], spooled  # kept
        metrics = server.client.metrics()
        retries = re.search(r'^contmerge_retries_total\{origin="http"\} (\d+)$', metrics, re.M)
        assert retries and int(retries.group(1)) >= 1, metrics
        assert re.search(r"^contmerge_stalled_arrivals 1$", metrics, re.M), metrics

        ballast.unlink()  # the operator frees space: the next attempt folds it
        outcome = server.client.wait([checkpoint_id], timeout=120)[checkpoint_id]
        assert outcome["status"] == "folded", outcome
        assert server.client.status()["queue"]["retrying"] is None
        assert "contmerge_stalled_arrivals 0" in server.client.metrics()
        assert not list((server.state / "spool").iterdir())
        merged = load(server.client.http.get("/model").content)
    finally:
        server.close()
    assert_same_model(merged, sequential_fold(server.base, "ties", [path]))


def test_an_upload_to_a_full_disk_gets_507_with_a_reason(tmp_path: Path, small_disk: Path) -> None:
    server = Served(tmp_path, state=small_disk / "state")
    try:
        body = save(finetune(server.base_tensors, 2))
        ballast = fill(small_disk, leave=0)
        response = server.client.post(body, "no-room.safetensors")
        assert response.status_code == 507, response.text
        assert "no space left on device" in response.json()["reason"]
        assert int(response.headers["Retry-After"]) >= 1
        assert not list((server.state / "spool").iterdir())  # no half upload left behind
        # the merged model cannot be emitted either: the same answer, not a bare 500
        model = server.client.http.get("/model")
        assert model.status_code == 507, model.text
        assert "no space left on device" in model.json()["reason"], model.text
        assert str(server.state) not in model.text  # no server paths for clients
        assert int(model.headers["Retry-After"]) >= 1
        assert not list((server.state / "server-cache").iterdir())  # no partial emit

        ballast.unlink()
        receipt = server.client.upload(body, "room-again.safetensors")
        assert server.client.wait([receipt["id"]])[receipt["id"]]["status"] == "folded"
        assert server.client.http.get("/model").status_code == 200
    finally:
        server.close()


def test_a_merged_model_that_cannot_be_emitted_is_a_reason_not_a_bare_500(tmp_path: Path) -> None:
    """The fold is fine in the float32 state, but the float16 model would overflow: GET /model
    says so, without the server's paths, and the state is untouched."""
    base = {"w": torch.full((4,), 60000.0, dtype=torch.float16)}
    save_file(base, tmp_path / "base.safetensors")
    (tmp_path / "token").write_text(TOKEN + "\n")
    args = serve_args(tmp_path / "state", tmp_path / "base.safetensors", tmp_path / "token")
    args[args.index("--strategy") + 1] = "task_arithmetic"
    process = ServerProcess([*args, "--set", "scaling_factor=1.0"], tmp_path / "log").start()
    client = MergeClient(process.url, TOKEN)
    try:
        receipts = [
            client.upload(save({"w": torch.full((4,), value, dtype=torch.float16)}), f"ft-{i}")
            for i, value in enumerate((65000.0, 64000.0))
        ]  # 60000 + 5000 + 4000 does not fit in float16 (max 65504)
        outcomes = client.wait([r["id"] for r in receipts])
        assert {o["status"] for o in outcomes.values()} == {"folded"}, outcomes
        model = client.http.get("/model")
        assert model.status_code == 500, model.text
        reason = model.json()["reason"]
        assert "'w' is Inf or NaN in F16" in reason and "nothing was written" in reason, reason
        assert str(tmp_path) not in reason
        assert client.manifest()["globals"]["count"] == 2
    finally:
        client.close()
        process.stop()


# --- slow clients -----------------------------------------------------------------------------
class Trickle(threading.Thread):
    """A real client that sends an upload's body a byte at a time, until the server answers
    or closes, or ``patience`` runs out."""

    def __init__(
        self, url: str, name: str, every: float = 0.3, stop_after: int | None = None,
        patience: float = 40.0, size: int = 100_000,
    ) -> None:  # fmt: skip
        super().__init__(daemon=True)
        parts = urlsplit(url)
        self.address = (parts.hostname, parts.port)
        self.request = (
            f"POST /checkpoints?name={name} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
            f"Authorization: Bearer {TOKEN}\r\nContent-Length: {size}\r\n\r\n"
        ).encode()
        self.every, self.stop_after, self.patience = every, stop_after, patience
        self.sent = 0
        self.answer: str | None = None  # the status line, or "closed"
        self.seconds = 0.0
        self.sending = threading.Event()
        self._quit = threading.Event()

    def run(self) -> None:
        started = time.monotonic()
        with socket.create_connection(self.address, timeout=10) as sock:
            sock.sendall(self.request)
            self.sending.set()
            while time.monotonic() - started < self.patience and not self._quit.is_set():
                readable, _, _ = select.select([sock], [], [], self.every)
                if readable:
                    data = sock.recv(4096)
                    self.answer = data.split(b"\r\n", 1)[0].decode() if data else "closed"
                    break
                if self.stop_after is None or self.sent < self.stop_after:
                    try:
                        sock.sendall(b"\0")
                    except OSError:
                        self.answer = "closed"
                        break
                    self.sent += 1
        self.seconds = time.monotonic() - started

    def quit(self) -> None:
        self._quit.set()
        self.join(30)


def test_slow_uploads_do_not_hold_the_queue(tmp_path: Path) -> None:
    server = Served(tmp_path, "--queue-size", "2")
    trickles = [Trickle(server.process.url, f"slow-{i}") for i in range(2)]
    try:
        for trickle in trickles:
            trickle.start()
            trickle.sending.wait(10)
        time.sleep(1.0)  # both bodies are arriving, a byte at a time
        response = server.client.post(save(finetune(server.base_tensors, 3)), "normal")
        assert response.status_code == 202, response.text
        checkpoint_id = response.json()["id"]
        assert server.client.wait([checkpoint_id])[checkpoint_id]["status"] == "folded"
    finally:
        for trickle in trickles:
            trickle.quit()
        server.close()


def test_a_trickling_or_stalled_upload_is_cut_with_408(tmp_path: Path) -> None:
    server = Served(
        tmp_path, "--upload-idle-timeout", "2", "--upload-min-rate", "1000",
        "--max-concurrent-uploads", "2",
    )  # fmt: skip
    trickle = Trickle(server.process.url, "trickle", every=0.3)
    stalled = Trickle(server.process.url, "stalled", every=0.3, stop_after=5)
    try:
        for client in (trickle, stalled):
            client.start()
            client.sending.wait(10)
        time.sleep(0.5)
        # both in flight: a third upload is refused at once, not queued behind them
        busy = server.client.post(save(finetune(server.base_tensors, 4)), "third")
        assert busy.status_code == 503, busy.text
        assert "uploads in progress" in busy.json()["reason"]
        assert int(busy.headers["Retry-After"]) >= 1
        for client in (trickle, stalled):
            client.join(40)
            assert client.answer is not None and client.answer.startswith("HTTP/1.1 408"), (
                client.answer
            )
            assert client.seconds < 20, client.seconds  # cut after its grace, not at patience
        reasons = {r["name"]: r["reason"] for r in server.client.status()["recent"] if r["id"]}
        assert "below the minimum" in reasons["trickle"], reasons
        assert "no data for" in reasons["stalled"], reasons
        # the slots are free again
        response = server.client.post(save(finetune(server.base_tensors, 5)), "after")
        assert response.status_code == 202, response.text
        metrics = server.client.metrics()
        assert "contmerge_uploads_in_progress 0" in metrics
        assert "contmerge_uploads_timed_out_total 2" in metrics
    finally:
        trickle.quit()
        stalled.quit()
        server.close()


def test_a_client_that_goes_away_mid_body_gives_its_slot_and_files_back(tmp_path: Path) -> None:
    """The upload handle is aborted when the client disconnects: with one upload slot, a leak
    would refuse the next upload (503); nothing is left in the spool, nothing journaled."""
    server = Served(tmp_path, "--max-concurrent-uploads", "1")
    try:
        body = save(finetune(server.base_tensors, 7, scale=0.02), metadata={"pad": "x" * (3 << 20)})
        parts = urlsplit(server.process.url)
        request = (
            f"POST /checkpoints?name=gone HTTP/1.1\r\nHost: {parts.netloc}\r\n"
            f"Authorization: Bearer {TOKEN}\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
            sock.sendall(request + body[: 2 << 20])  # past one ~1 MiB write: a temp file exists
            spool = server.state / "spool"
            wait_for(lambda: list(spool.glob(".*.tmp")), what="the upload's temp file")
        wait_for(
            lambda: "contmerge_uploads_in_progress 0" in server.client.metrics(),
            what="the slot given back",
        )
        assert not list((server.state / "spool").iterdir())
        assert not [r for r in journal(server.state) if r["name"] == "gone"]
        response = server.client.post(save(finetune(server.base_tensors, 8)), "after")
        assert response.status_code == 202, response.text
    finally:
        server.close()


# --- a huge (valid) header ----------------------------------------------------------------------
def huge_header_body(megabytes: int) -> bytes:
    """A valid safetensors file whose header is ``megabytes`` MiB: padded ``__metadata__``."""
    header = (
        b'{"__metadata__":{"pad":"' + b"x" * (megabytes << 20) + b'"},'
        b'"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}'
    )
    return struct.pack("<Q", len(header)) + header + b"\0" * 8


def test_a_huge_header_is_refused_at_once_and_health_stays_responsive(tmp_path: Path) -> None:
    server = Served(tmp_path)
    body = huge_header_body(24)  # over the default --max-header-bytes (16 MiB)
    answers: list[httpx.Response] = []
    latencies: list[float] = []
    uploading = threading.Event()

    def upload() -> None:
        with httpx.Client(base_url=server.process.url, timeout=120) as http:
            answers.append(
                http.post(
                    "/checkpoints",
                    params={"name": "huge-header"},
                    content=body,
                    headers={"Authorization": f"Bearer {TOKEN}"},
                )
            )

    def probe() -> None:
        while uploading.is_set():
            started = time.monotonic()
            httpx.get(f"{server.process.url}/healthz", timeout=60)
            latencies.append(time.monotonic() - started)
            time.sleep(0.05)

    try:
        uploading.set()
        prober = threading.Thread(target=probe, daemon=True)
        prober.start()
        uploads = [threading.Thread(target=upload) for _ in range(3)]
        started = time.monotonic()
        for thread in uploads:
            thread.start()
        for thread in uploads:
            thread.join(120)
        seconds = time.monotonic() - started
        uploading.clear()
        prober.join(60)
        assert [a.status_code for a in answers] == [413] * 3, [a.text for a in answers]
        for answer in answers:
            reason = answer.json()["reason"]
            assert "header" in reason and "--max-header-bytes" in reason, reason
            [record] = final_events(server.state, answer.json()["id"])
            assert record["event"] == "rejected"
        # measured, with a bound loose enough for a loaded shared machine
        assert latencies and max(latencies) < 5.0, latencies
        assert seconds < 60, seconds
        print(f"3 huge-header uploads: {seconds:.2f} s; /healthz max {max(latencies):.3f} s")
    finally:
        uploading.clear()
        server.close()


def test_a_header_within_a_raised_max_header_bytes_is_checked_and_folded(tmp_path: Path) -> None:
    """--max-header-bytes reaches every reader of the upload: its check before the 202 and the
    writer's fold, not only the first 8 bytes (a 20 MiB header is over the 16 MiB default)."""
    server = Served(tmp_path, "--max-header-bytes", str(32 << 20))
    try:
        tensors = finetune(server.base_tensors, 5)
        body = save(tensors, metadata={"pad": "x" * (20 << 20)})
        assert struct.unpack("<Q", body[:8])[0] > 16 << 20
        answer = server.client.http.post(
            "/checkpoints", params={"name": "big-header"}, content=body
        )
        assert answer.status_code == 202, answer.text
        checkpoint_id = answer.json()["id"]
        [record] = wait_for(lambda: final_events(server.state, checkpoint_id), what="the fold")
        assert record["event"] == "folded", record
        want = sequential_fold(server.base, STRATEGY, [server.checkpoint(5)])
        assert_same_model(load(server.client.http.get("/model").content), want)
    finally:
        server.close()


def test_the_services_max_header_bytes_reaches_its_upload_check_and_fold(tmp_path: Path) -> None:
    """The same through MergeService from Python (no CLI, whose option also sets the limit of
    the thread it runs in): the setting alone must bound every reader."""
    from contmerge.server.service import MergeService, ServeSettings

    base_tensors = make_base()
    save_file(base_tensors, tmp_path / "base.safetensors")
    settings = ServeSettings(
        tmp_path / "state", str(tmp_path / "base.safetensors"), STRATEGY,
        max_header_bytes=32 << 20,
    )  # fmt: skip
    service = MergeService(settings)
    service.start()
    try:
        body = save(finetune(base_tensors, 6), metadata={"pad": "x" * (20 << 20)})
        upload = service.begin_upload("big-header", declared=len(body))

        async def whole() -> AsyncIterator[tuple[bytes, bool]]:
            yield body, False

        asyncio.run(upload.receive(whole()))
        accepted = upload.finish(None)  # a Refusal (422) when the check ignores the setting
        status = wait_for(
            lambda: (s := service.upload_status(accepted.id))["event"] != "accepted" and s,
            what="the fold",
        )
        assert status["event"] == "folded", status
    finally:
        service.stop()
        service.close()


def test_a_journal_line_cut_short_by_a_full_disk_is_not_left_behind(small_disk: Path) -> None:
    from contmerge.server.journal import Arrival, Journal, JournalRecord

    def line(event: str, checkpoint_id: str, pad: str = "") -> JournalRecord:
        return JournalRecord(event, Arrival(checkpoint_id, "http", "x", None), reason=pad or None)

    journal = Journal(small_disk / "journal.jsonl")
    appended = 0
    # end the file a few bytes before a page boundary: the next line straddles it
    while (small_disk / "journal.jsonl").stat().st_size % 4096 < 4096 - 64:
        journal.append(line("accepted", f"{appended:08d}", "x" * 40))
        appended += 1
    ballast = fill(small_disk, leave=0)
    with pytest.raises(OSError):
        journal.append(line("folded", "lost", "y" * 400))
    ballast.unlink()
    journal.append(line("folded", "after"))
    journal.close()
    lines = (small_disk / "journal.jsonl").read_text().splitlines()
    records = list(Journal(small_disk / "journal.jsonl").records())
    assert len(records) == len(lines) == appended + 1  # every line whole, none glued together
    assert records[-1].arrival.id == "after"
