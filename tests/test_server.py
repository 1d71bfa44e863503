"""The merge server against real processes on loopback: ``contmerge serve`` started as a
subprocess, real safetensors files with small random tensors, a real base, real HTTP."""

from __future__ import annotations

import io
import json
import os
import shutil
import ssl
import struct
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load, save, save_file
from server_helpers import (
    STRATEGY,
    TOKEN,
    Served,
    assert_same_model,
    drop,
    final_events,
    finetune,
    inbox_outcome,
    journal,
    make_base,
    sequential_fold,
    serve_args,
    wait_for,
    wait_scans,
)

from contmerge import Merger
from contmerge.cli import main
from contmerge.server.client import MergeClient
from contmerge.server.launcher import ServerProcess

MAX_UPLOAD = 200_000


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    server = Served(
        tmp_path_factory.mktemp("served"), "--max-upload-bytes", str(MAX_UPLOAD),
        "--queue-size", "16",
    )  # fmt: skip
    yield server
    server.close()


# --- authentication ------------------------------------------------------------------------------
PROTECTED = [
    ("GET", "/status"),
    ("GET", "/metrics"),
    ("GET", "/manifest"),
    ("GET", "/model"),
    ("GET", "/uploads/00000001-abcdef"),
    ("POST", "/checkpoints?name=x.safetensors"),
]


def test_health_is_open_and_every_other_endpoint_needs_the_token(served: Served) -> None:
    url = served.process.url
    assert httpx.get(f"{url}/healthz").json() == {"status": "ok"}
    lines_before = len(journal(served.state))
    body = save(finetune(served.base_tensors, 99))
    for method, path in PROTECTED:
        missing = httpx.request(method, url + path, content=body if method == "POST" else None)
        assert missing.status_code == 401, path
        assert missing.headers["www-authenticate"] == "Bearer"
        basic = httpx.request(method, url + path, headers={"Authorization": "Basic dXNlcjpwdw=="})
        assert basic.status_code == 401, path
        wrong = httpx.request(
            method,
            url + path,
            headers={"Authorization": "Bearer " + TOKEN[:-1] + "X"},
            content=body if method == "POST" else None,
        )
        assert wrong.status_code == 403, path
    # refused requests leave no trace on disk: no journal line, no spooled body
    assert len(journal(served.state)) == lines_before
    assert not list((served.state / "spool").iterdir())
    assert served.client.http.get("/status").status_code == 200


# --- round trip ----------------------------------------------------------------------------------
def test_upload_fold_download_equals_a_direct_sequential_fold(served: Served) -> None:
    files = [served.checkpoint(seed) for seed in range(4)]
    ids = [served.upload(path) for path in files]
    again = served.upload(files[0], name="same-content-again.safetensors")
    outcomes = served.client.wait([*ids, again])
    assert [outcomes[i]["status"] for i in ids] == ["folded"] * 4
    assert outcomes[again]["status"] == "duplicate"
    assert outcomes[again]["content_hash"] == outcomes[ids[0]]["content_hash"]

    manifest = served.client.manifest()
    folded_ids = [a["source"].split("/")[1] for a in manifest["arrivals"]]
    assert folded_ids[-4:] == ids  # folded in arrival order
    response = served.client.http.get("/model")
    assert response.headers["x-contmerge-count"] == str(manifest["globals"]["count"])
    expected = sequential_fold(
        served.base, manifest["strategy"], [served.uploaded[i] for i in folded_ids]
    )
    assert_same_model(load(response.content), expected)

    status = served.client.status()
    assert status["state"]["count"] == len(folded_ids)
    assert status["queue"]["depth"] == 0
    # both are built from the writer's typed manifest: the state's manifest.json as committed
    assert manifest == json.loads((served.state / "manifest.json").read_bytes())
    assert status["folded"] == manifest["arrivals"][::-1][:20]
    assert status["state"]["generation"] == manifest["generation"]
    metrics = served.client.metrics()
    assert f"contmerge_state_count {len(folded_ids)}" in metrics
    assert 'contmerge_duplicates_total{origin="http"} 1' in metrics
    assert "contmerge_fold_seconds_count" in metrics
    assert not list((served.state / "spool").iterdir())  # folded uploads leave the spool


# --- bad input ------------------------------------------------------------------------------------
def _truncated(base: dict) -> bytes:
    data = save(finetune(base, 50))
    return data[: len(data) // 2]


def _malformed_header(base: dict) -> bytes:
    header = b'{"w": {"dtype": "F32", "shape": [2'
    return struct.pack("<Q", len(header)) + header + b"\0" * 8


def _changed(change: Callable[[dict], None]) -> Callable[[dict], bytes]:
    def build(base: dict) -> bytes:
        tensors = finetune(base, 51)
        change(tensors)
        return save(tensors)

    return build


def _torch_pickle(base: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(finetune(base, 52), buffer)  # what someone uploads by mistake: a pickle
    return buffer.getvalue()


def _set(name: str, value: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[dict], None]:
    def change(tensors: dict) -> None:
        tensors[name] = value(tensors[name])

    return change


def _with_nan(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t[0, 0] = float("nan")
    return t


def _with_inf(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t[-1] = float("inf")
    return t


BAD_INPUTS = {
    # name: (body builder, HTTP status of the upload, fragment of the recorded reason)
    "truncated": (_truncated, 422, "truncated"),
    "malformed-header": (_malformed_header, 422, "malformed"),
    "torch-pickle": (_torch_pickle, 422, "pickle"),
    "empty": (lambda base: b"", 422, "too short"),
    "wrong-shape": (_changed(_set("layers.0.weight", lambda t: t[:, :40].clone())), 202, "shape"),
    "wrong-dtype": (_changed(_set("layers.1.weight", lambda t: t.double())), 202, "dtype F64"),
    "nan": (_changed(_set("layers.0.weight", _with_nan)), 202, "NaN or Inf"),
    "inf": (_changed(_set("layers.1.bias", _with_inf)), 202, "NaN or Inf"),
    "missing-tensor": (_changed(lambda t: t.pop("head.weight")), 202, "missing"),
    "other-base": (lambda base: save(finetune(make_base(seed=5), 53)), 202, "another base"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_rejected_with_a_reason_and_the_state_is_unchanged(
    served: Served, case: str
) -> None:
    build, http_status, fragment = BAD_INPUTS[case]
    before = served.snapshot()
    response = served.client.post(build(served.base_tensors), f"{case}.safetensors")
    assert response.status_code == http_status, response.text
    checkpoint_id = response.json()["id"]
    record = served.client.wait([checkpoint_id])[checkpoint_id]
    assert record["status"] == "rejected"
    assert fragment in record["reason"]
    assert str(served.state) not in record["reason"]  # no server paths in what clients see
    [journaled] = final_events(served.state, checkpoint_id)
    assert journaled["event"] == "rejected" and journaled["reason"] == record["reason"]
    assert served.client.status()["last_error"]["id"] == checkpoint_id
    assert served.snapshot() == before
    assert not list((served.state / "spool").iterdir())


def test_a_tensor_the_base_lacks_is_rejected_naming_it(served: Served) -> None:
    tensors = finetune(served.base_tensors, 54)
    tensors["adapter.extra"] = torch.zeros(3)
    before = served.snapshot()
    response = served.client.post(save(tensors), "extra.safetensors")
    assert response.status_code == 202
    record = served.client.wait([response.json()["id"]])[response.json()["id"]]
    assert record["status"] == "rejected"
    assert "base does not have" in record["reason"] and "adapter.extra" in record["reason"]
    assert served.snapshot() == before


@pytest.mark.parametrize(
    "name",
    ["../evil.safetensors", "../../../tmp/evil", "/etc/evil", "sub/evil", "..\\evil",
     ".evil", "evil\0.safetensors", "e" * 200],
)  # fmt: skip
def test_path_like_names_are_refused(served: Served, name: str) -> None:
    body = save(finetune(served.base_tensors, 60))
    before = served.snapshot()
    by_query = served.client.post(body, name)
    by_header = served.client.http.post(
        "/checkpoints", content=body, headers={"X-Checkpoint-Name": name.replace("\0", "%00")}
    )
    for response in (by_query, by_header):
        assert response.status_code == 400, response.text
        record = served.client.outcome(response.json()["id"])
        assert record["status"] == "rejected" and "name" in record["reason"]
    assert served.snapshot() == before
    escaped = [p for p in served.root.parent.rglob("*evil*")]
    assert escaped == []
    assert not list((served.state / "spool").iterdir())


def test_oversize_uploads_get_413_whether_declared_or_streamed(served: Served) -> None:
    before = served.snapshot()
    body = b"\0" * (MAX_UPLOAD + 1)
    declared = served.client.post(body, "big.safetensors")
    assert declared.status_code == 413
    assert "over the limit" in declared.json()["reason"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit is counted while streaming
        for _ in range(4):
            yield b"\0" * (MAX_UPLOAD // 3)

    streamed = served.client.http.post(
        "/checkpoints", params={"name": "big-streamed.safetensors"}, content=chunks()
    )
    assert streamed.status_code == 413
    for response in (declared, streamed):
        [record] = final_events(served.state, response.json()["id"])
        assert "over the limit" in record["reason"]
    assert served.snapshot() == before
    assert not list((served.state / "spool").iterdir())


def test_a_second_server_on_the_same_state_is_refused(
    served: Served, capsys: pytest.CaptureFixture[str]
) -> None:
    # the real command, in this process: the running server holds the state's lock
    code = main(["serve", *serve_args(served.state, served.base, served.token_file)])
    assert code == 1
    assert "another process is folding into this state" in capsys.readouterr().err
    assert served.client.status()["state"]["count"] >= 0  # the running server is unharmed


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--host", "0.0.0.0", "--insecure-no-auth"], "only allowed on a loopback host"),
        (["--host", "10.1.2.3", "--insecure-no-auth"], "only allowed on a loopback host"),
        ([], "no token"),
        (["--token-file", "/nonexistent/token"], "cannot read --token-file"),
        (["--tls-cert", "cert.pem"], "--tls-cert and --tls-key go together"),
    ],
)
def test_unsafe_or_incomplete_setups_refuse_to_start(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    message: str,
) -> None:
    base = tmp_path / "base.safetensors"
    save_file(make_base(), base)
    monkeypatch.delenv("CONTMERGE_TOKEN", raising=False)
    if "--tls-cert" in extra:
        monkeypatch.setenv("CONTMERGE_TOKEN", TOKEN)
    state = tmp_path / "s"
    args = ["serve", "--state", str(state), "--base", str(base), "--strategy", STRATEGY, *extra]
    assert main(args) == 2
    assert message in capsys.readouterr().err
    assert not state.exists()  # refused before touching the state


# --- backpressure ---------------------------------------------------------------------------------
def test_a_full_queue_answers_503_with_retry_after(tmp_path: Path) -> None:
    # a wide model makes each fold take a while, so uploads outrun the writer
    served = Served(tmp_path, "--queue-size", "1", width=384, layers=3)
    try:
        accepted, refused = [], []
        for seed in range(12):
            response = served.client.post(served.checkpoint(seed).read_bytes(), f"b{seed}")
            (accepted if response.status_code == 202 else refused).append(response)
            if len(refused) >= 2:
                break
        assert refused, "twelve fast uploads never filled a queue of one"
        for response in refused:
            assert response.status_code == 503
            assert int(response.headers["Retry-After"]) >= 1
        ids = [r.json()["id"] for r in accepted]
        outcomes = served.client.wait(ids)
        assert {o["status"] for o in outcomes.values()} == {"folded"}
        metrics = served.client.metrics()
        assert f"contmerge_backpressure_total {len(refused)}" in metrics
        journaled = {r["id"] for r in journal(served.state)}
        assert journaled == set(ids)  # a 503 is not an arrival: nothing was received
    finally:
        served.close()


# --- TLS ------------------------------------------------------------------------------------------
@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_tls_serves_https_only(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    root = tmp_path / "srv"
    root.mkdir()
    base = root / "base.safetensors"
    tensors = make_base()
    save_file(tensors, base)
    (root / "token").write_text(TOKEN)
    args = serve_args(root / "state", base, root / "token", "--tls-cert", str(cert),
                      "--tls-key", str(key))  # fmt: skip
    trust = ssl.create_default_context(cafile=str(cert))
    with ServerProcess(args, root / "server.log", verify=trust) as server:
        assert server.url.startswith("https://127.0.0.1:")
        with MergeClient(server.url, TOKEN, verify=trust) as client:
            receipt = client.upload(save(finetune(tensors, 1)), "over-tls.safetensors")
            assert client.wait([receipt["id"]])[receipt["id"]]["status"] == "folded"
        plain = server.url.replace("https://", "http://")
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{plain}/healthz", timeout=10)


# --- inbox ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def inboxed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("inboxed")
    server = Served(root, "--inbox", str(root / "inbox"), "--poll-interval", "0.05")
    yield server
    server.close()


def test_inbox_takes_a_file_only_once_renamed_into_place(inboxed: Served) -> None:
    inbox = inboxed.root / "inbox"
    data = save(finetune(inboxed.base_tensors, 70))
    count = inboxed.client.manifest()["globals"]["count"]
    (inbox / "step-100.safetensors.partial").write_bytes(data)
    (inbox / ".step-100.safetensors").write_bytes(data)
    (inbox / "step-100.tmp").write_bytes(data)
    wait_scans(inboxed)
    assert inboxed.client.manifest()["globals"]["count"] == count
    assert not [r for r in journal(inboxed.state) if r["name"].startswith(("step-100", ".step"))]

    os.replace(inbox / "step-100.safetensors.partial", inbox / "step-100.safetensors")
    record = inbox_outcome(inboxed, "step-100.safetensors")
    assert record["event"] == "folded"
    wait_for(lambda: (inbox / "done" / "step-100.safetensors").exists(), what="move to done/")
    assert not (inbox / "step-100.safetensors").exists()
    assert inboxed.client.manifest()["globals"]["count"] == count + 1
    # what is still being written stays untouched
    assert (inbox / ".step-100.safetensors").exists() and (inbox / "step-100.tmp").exists()


def _shards(tensors: dict[str, torch.Tensor]) -> tuple[dict, dict, dict]:
    names = sorted(tensors)
    first, second = names[: len(names) // 2], names[len(names) // 2 :]
    shard_names = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
    index = {
        "metadata": {},
        "weight_map": {
            **{n: shard_names[0] for n in first},
            **{n: shard_names[1] for n in second},
        },
    }
    return index, {n: tensors[n] for n in first}, {n: tensors[n] for n in second}


def test_inbox_takes_a_sharded_directory_only_when_every_shard_is_there(inboxed: Served) -> None:
    inbox = inboxed.root / "inbox"
    tensors = finetune(inboxed.base_tensors, 71)
    index, first, second = _shards(tensors)
    staging = inboxed.root / "staging-sharded"
    staging.mkdir()
    (staging / "model.safetensors.index.json").write_text(json.dumps(index))
    save_file(first, staging / "model-00001-of-00002.safetensors")
    count = inboxed.client.manifest()["globals"]["count"]
    os.replace(staging, inbox / "run-a")  # index and one shard of two

    status = wait_scans(inboxed)
    assert "shard" in status["inbox"]["waiting"]["run-a"]
    assert inboxed.client.manifest()["globals"]["count"] == count
    assert not [r for r in journal(inboxed.state) if r["name"] == "run-a"]

    drop(inbox / "run-a" / "model-00002-of-00002.safetensors", save(second))
    record = inbox_outcome(inboxed, "run-a")
    assert record["event"] == "folded", record
    done = inbox / "done" / "run-a"
    wait_for(done.exists, what="move to done/")
    direct = Merger(inboxed.base, STRATEGY).fold(done)
    assert record["content_hash"] == direct.content_hash  # every shard was read
    assert inboxed.client.manifest()["globals"]["count"] == count + 1


def test_inbox_rejects_bad_checkpoints_with_the_reason_beside_them(inboxed: Served) -> None:
    inbox = inboxed.root / "inbox"
    before = inboxed.snapshot()
    tensors = finetune(inboxed.base_tensors, 72)
    tensors["layers.0.bias"][3] = float("nan")
    drop(inbox / "diverged.safetensors", save(tensors))
    drop(inbox / "notes.txt", b"not a checkpoint")
    for name, fragment in (("diverged.safetensors", "NaN or Inf"), ("notes.txt", "truncated")):
        record = inbox_outcome(inboxed, name)
        assert record["event"] == "rejected" and fragment in record["reason"]
        reason = inbox / "rejected" / f"{name}.reason.txt"
        wait_for(reason.exists, what=f"{name}.reason.txt")
        assert fragment in reason.read_text()
        assert (inbox / "rejected" / name).exists() and not (inbox / name).exists()
    assert inboxed.snapshot() == before


def _sharded_dir(directory: Path, tensors: dict[str, torch.Tensor], far_shard: str) -> None:
    """A sharded checkpoint whose index sends its second shard to ``far_shard``."""
    index, first, _ = _shards(tensors)
    index["weight_map"] = {
        name: far_shard if shard.startswith("model-00002") else shard
        for name, shard in index["weight_map"].items()
    }
    directory.mkdir()
    save_file(first, directory / "model-00001-of-00002.safetensors")
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))


def test_inbox_rejects_a_shard_index_that_leaves_its_directory(inboxed: Served) -> None:
    inbox = inboxed.root / "inbox"
    tensors = finetune(inboxed.base_tensors, 73)
    _, _, second = _shards(tensors)
    outside = inboxed.root / "outside"
    outside.mkdir()
    save_file(second, outside / "x.safetensors")
    before = inboxed.snapshot()
    for name, far in (
        ("escape-relative", "../../outside/x.safetensors"),
        ("escape-absolute", str(outside / "x.safetensors")),
    ):
        staging = inboxed.root / f"staging-{name}"
        _sharded_dir(staging, tensors, far)
        os.replace(staging, inbox / name)
        # refused, not waited on: the shard it names is never going to be in the directory
        record = inbox_outcome(inboxed, name, timeout=30)
        assert record["event"] == "rejected", record
        assert "shards must lie in its directory" in record["reason"], record["reason"]
        reason = inbox / "rejected" / f"{name}.reason.txt"
        wait_for(reason.exists, what=f"{name}.reason.txt")
        assert "shards must lie in its directory" in reason.read_text()
        assert not (inbox / name).exists()
    assert inboxed.snapshot() == before
    assert (outside / "x.safetensors").exists()  # never read, never moved


def test_inbox_rejects_a_shard_that_cannot_be_resolved_without_stalling(inboxed: Served) -> None:
    """A shard that is a symlink loop is refused at once, by the CLI's shard rule when it is
    deeper in the directory: neither waited on as missing nor left to fail every scan (which
    held up every entry behind it)."""
    inbox = inboxed.root / "inbox"
    tensors = finetune(inboxed.base_tensors, 78)
    before = inboxed.snapshot()
    for name, shard, fragment in (
        ("loop-shard", "model-00002-of-00002.safetensors", "symbolic link loop"),
        ("loop-nested", "sub/loop/x.safetensors", "shards must lie in its directory"),
    ):
        staging = inboxed.root / f"staging-{name}"
        _sharded_dir(staging, tensors, shard)
        link = staging / shard.rsplit("/", 1)[0] if "/" in shard else staging / shard
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(link.name)  # itself
        os.replace(staging, inbox / name)
        record = inbox_outcome(inboxed, name, timeout=30)
        assert record["event"] == "rejected", record
        assert fragment in record["reason"], record["reason"]
        assert shard.split("/")[0] in record["reason"], record["reason"]
    drop(inbox / "behind-the-loops.safetensors", save(finetune(inboxed.base_tensors, 79)))
    assert inbox_outcome(inboxed, "behind-the-loops.safetensors", timeout=30)["event"] == "folded"
    assert inboxed.snapshot()[:2] == (before[0] + 1, before[1] + 1)


def test_inbox_bounds_a_shard_index_by_max_header_bytes(tmp_path: Path) -> None:
    """--max-header-bytes bounds the index the inbox and the fold read, as the CLI's does."""
    server = Served(
        tmp_path, "--inbox", str(tmp_path / "inbox"), "--poll-interval", "0.05",
        "--max-header-bytes", "4096",
    )  # fmt: skip
    try:
        tensors = finetune(server.base_tensors, 76)
        index, first, second = _shards(tensors)
        index["metadata"] = {"note": "x" * 8192}  # a valid index, over the bound
        staging = tmp_path / "staging-big-index"
        staging.mkdir()
        (staging / "model.safetensors.index.json").write_text(json.dumps(index))
        save_file(first, staging / "model-00001-of-00002.safetensors")
        save_file(second, staging / "model-00002-of-00002.safetensors")
        os.replace(staging, tmp_path / "inbox" / "big-index")
        record = inbox_outcome(server, "big-index", timeout=30)
        assert record["event"] == "rejected", record
        assert "larger than the 4096-byte limit" in record["reason"], record["reason"]
        assert server.client.manifest()["globals"]["count"] == 0
    finally:
        server.close()


def _passwd_like() -> bytes:
    return b"root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n"


def _reasons_served(server: Served, checkpoint_id: str) -> list[str]:
    """Every place a client can read the reason of an arrival."""
    status = server.client.status()
    recent = [r["reason"] for r in status["recent"] if r["id"] == checkpoint_id]
    return [server.client.outcome(checkpoint_id)["reason"], *recent]


def test_inbox_refuses_symlinks_out_of_it_and_never_echoes_file_bytes(inboxed: Served) -> None:
    inbox = inboxed.root / "inbox"
    secret = inboxed.root / "secret.txt"
    secret.write_bytes(_passwd_like())
    # what the first 8 bytes read as a header length: must never reach a client
    leaked = str(struct.unpack("<Q", _passwd_like()[:8])[0])
    elsewhere = inboxed.root / "elsewhere.safetensors"
    save_file(finetune(inboxed.base_tensors, 74), elsewhere)
    linked_dir = inboxed.root / "staging-linked-dir"
    linked_dir.mkdir()
    (linked_dir / "model.safetensors").symlink_to(elsewhere)
    before = inboxed.snapshot()

    (inbox / "linked-out.safetensors").symlink_to(elsewhere)
    (inbox / "linked-secret.safetensors").symlink_to(secret)
    os.replace(linked_dir, inbox / "linked-dir")
    drop(inbox / "copied-secret.safetensors", _passwd_like())
    for name in ("linked-out.safetensors", "linked-secret.safetensors", "linked-dir"):
        record = inbox_outcome(inboxed, name, timeout=30)
        assert record["event"] == "rejected", record
        assert "symbolic link" in record["reason"] and "outside the inbox" in record["reason"]
    record = inbox_outcome(inboxed, "copied-secret.safetensors", timeout=30)
    assert record["event"] == "rejected"
    assert "not a safetensors file" in record["reason"], record["reason"]
    for name in ("linked-secret.safetensors", "copied-secret.safetensors"):
        checkpoint_id = inbox_outcome(inboxed, name)["id"]
        reason_file = inbox / "rejected" / f"{name}.reason.txt"
        wait_for(reason_file.exists, what=f"{name}.reason.txt")
        for text in [*_reasons_served(inboxed, checkpoint_id), reason_file.read_text()]:
            assert leaked not in text and "root:x" not in text, text
    # the same bytes uploaded over HTTP: refused up front, just as plainly
    response = inboxed.client.post(_passwd_like(), "secret.safetensors")
    assert response.status_code == 422
    for text in (response.text, *_reasons_served(inboxed, response.json()["id"])):
        assert leaked not in text and "root:x" not in text, text
    assert inboxed.snapshot() == before
    assert secret.read_bytes() == _passwd_like() and elsewhere.exists()  # not moved


def test_inbox_follows_a_symlink_that_stays_inside_it(inboxed: Served) -> None:
    inbox = inboxed.root / "inbox"
    store = inbox / ".store"  # a dotted directory: never an entry of its own
    store.mkdir()
    save_file(finetune(inboxed.base_tensors, 75), store / "real.safetensors")
    count = inboxed.client.manifest()["globals"]["count"]
    (inbox / "alias.safetensors").symlink_to(".store/real.safetensors")
    record = inbox_outcome(inboxed, "alias.safetensors", timeout=30)
    assert record["event"] == "folded", record
    wait_for((inbox / "done" / "alias.safetensors").is_symlink, what="the link moved to done/")
    assert inboxed.client.manifest()["globals"]["count"] == count + 1


# --- crash safety ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_kill_9_during_folds_loses_nothing_and_folds_nothing_twice(tmp_path: Path) -> None:
    # wide tensors make a fold take long enough that SIGKILL lands inside one
    server = Served(tmp_path, width=384, layers=3)
    try:
        files = [server.checkpoint(seed) for seed in range(14)]
        ids = [server.upload(path) for path in files]
        kills = 0
        for _ in range(2):
            folded = server.client.manifest()["globals"]["count"]
            wait_for(
                lambda n=folded: (
                    (s := server.client.status())["state"]["count"] >= n + 2
                    and s["queue"]["folding"] is not None
                ),
                what="a fold in progress",
            )
            server.restart(kill=True)
            kills += 1
        outcomes = server.client.wait(ids)
    finally:
        server.close()
    assert kills == 2
    assert {o["status"] for o in outcomes.values()} == {"folded"}

    # exactly once: one arrival per accepted upload in the state, one final line in the journal
    state = json.loads((server.state / "manifest.json").read_text())
    folded_ids = [a["source"].split("/")[1] for a in state["arrivals"]]
    assert folded_ids == ids  # and in the order they were accepted
    assert len({a["hash"] for a in state["arrivals"]}) == len(ids)
    for checkpoint_id in ids:
        assert [r["event"] for r in final_events(server.state, checkpoint_id)] == ["folded"]
    assert not list((server.state / "spool").iterdir())
    assert len(list(server.state.glob("state-*.safetensors"))) == 1  # no torn generations

    merged = load_emitted(server)
    assert_same_model(merged, sequential_fold(server.base, state["strategy"], files))


def load_emitted(server: Served) -> dict[str, torch.Tensor]:
    """The state as committed on disk, emitted by the engine (the server is stopped)."""
    with Merger(server.base, state_dir=server.state) as merger:
        return merger.emit_state_dict()


@pytest.mark.slow
def test_restart_completes_whatever_step_a_crash_interrupted(tmp_path: Path) -> None:
    """The disk as SIGKILL leaves it in each window between the durable steps of an arrival,
    made exactly: restart must fold each accepted checkpoint once and clear the rest."""
    inbox = tmp_path / "inbox"
    server = Served(tmp_path, "--inbox", str(inbox), "--poll-interval", "0.05")
    try:
        a, b, c = (server.upload(server.checkpoint(seed)) for seed in range(3))
        drop(inbox / "i1.safetensors", save(finetune(server.base_tensors, 10)))
        drop(inbox / "i2.safetensors", save(finetune(server.base_tensors, 11)))
        server.client.wait([a, b, c])
        for name in ("i1.safetensors", "i2.safetensors"):
            assert inbox_outcome(server, name)["event"] == "folded"
            wait_for((inbox / "done" / name).exists, what=f"{name} in done/")
        before = server.client.manifest()
    finally:
        server.client.close()
        server.process.stop()

    spool = server.state / "spool"
    lines = (server.state / "journal.jsonl").read_text().splitlines()
    i1_id = inbox_outcome(server, "i1.safetensors")["id"]

    def final_line_of(checkpoint_id: str) -> str:
        [line] = [x for x in lines if f'"id":"{checkpoint_id}"' in x and '"event":"folded"' in x]
        return line

    # A: fold committed, killed before its outcome was journaled (spool file still there)
    shutil.copy(server.uploaded[a], spool / f"{a}__ckpt-0.safetensors.safetensors")
    lines.remove(final_line_of(a))
    # B: outcome journaled, killed before the spool file was removed
    shutil.copy(server.uploaded[b], spool / f"{b}__ckpt-1.safetensors.safetensors")
    # D: renamed into the spool, killed before the "accepted" line (and before the 202)
    d = "00000099-abcdef"
    d_file = server.checkpoint(12)
    shutil.copy(d_file, spool / f"{d}__d.safetensors.safetensors")
    # I1: inbox entry folded, not journaled, not moved; I2: journaled, not moved
    os.replace(inbox / "done" / "i1.safetensors", inbox / "i1.safetensors")
    lines.remove(final_line_of(i1_id))
    os.replace(inbox / "done" / "i2.safetensors", inbox / "i2.safetensors")
    (server.state / "journal.jsonl").write_text("\n".join(lines) + "\n")

    server.process = ServerProcess(server.args, tmp_path / "server.log").start()
    server.client = MergeClient(server.process.url, TOKEN)
    try:
        assert server.client.wait([d])[d]["status"] == "folded"
        wait_for(lambda: not (inbox / "i1.safetensors").exists(), what="i1 cleared")
        wait_for(lambda: not (inbox / "i2.safetensors").exists(), what="i2 cleared")
        wait_for(lambda: not list(spool.iterdir()), what="an empty spool")
        after = server.client.manifest()
        merged = load(server.client.http.get("/model").content)
    finally:
        server.close()

    assert after["arrivals"][:-1] == before["arrivals"]  # nothing folded twice
    assert after["arrivals"][-1]["source"] == f"upload/{d}/d.safetensors"
    for checkpoint_id in (a, b, c, i1_id, d):
        assert [r["event"] for r in final_events(server.state, checkpoint_id)] == ["folded"]
    [a_again] = final_events(server.state, a)
    assert a_again.get("recovered") is True
    assert final_events(server.state, i1_id)[0].get("recovered") is True
    d_lines = [r for r in journal(server.state) if r["id"] == d]
    assert [r["event"] for r in d_lines] == ["accepted", "folded"] and d_lines[0]["recovered"]
    assert sorted(p.name for p in (inbox / "done").iterdir()) == [
        "i1.safetensors",
        "i2.safetensors",
    ]

    files = {f"upload/{k}/{v.name}": v for k, v in server.uploaded.items()}
    files[f"upload/{d}/d.safetensors"] = d_file
    for name in ("i1.safetensors", "i2.safetensors"):
        record = next(r for r in journal(server.state) if r["name"] == name)
        files[record["label"]] = inbox / "done" / name
    order = [files[arrival["source"]] for arrival in after["arrivals"]]
    assert_same_model(merged, sequential_fold(server.base, after["strategy"], order))
