"""Checkpoint directories over HTTP: a PEFT LoRA adapter or a sharded model sent as a tar, unpacked
safely by a real server on loopback; hostile tars refused with true reasons; the client's errors
carry the server's reason."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save, save_file
from server_helpers import STRATEGY, TOKEN, Served, final_events, finetune, journal, wait_for
from torch import nn

from contmerge import Merger
from contmerge.errors import ContmergeError

MAX_UPLOAD = 2_000_000
MAX_MEMBERS = 50


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    server = Served(
        tmp_path_factory.mktemp("tar"), "--max-upload-bytes", str(MAX_UPLOAD),
        "--max-tar-members", str(MAX_MEMBERS),
    )  # fmt: skip
    yield server
    server.close()


class Net(nn.Module):
    """The module whose state dict is the servers' test base (make_base)."""

    def __init__(self, width: int = 48) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(2))
        self.head = nn.Linear(width, 10, bias=False)
        self.register_buffer("steps", torch.zeros(2, dtype=torch.int64))


def make_adapter(server: Served, directory: Path, seed: int) -> Path:
    """A real PEFT LoRA adapter of the server's base, with a nonzero B."""
    peft = pytest.importorskip("peft")
    net = Net()
    net.load_state_dict(server.base_tensors)
    model = peft.get_peft_model(
        net, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["layers.0", "layers.1"])
    )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:  # B starts at zero: make the adapter change something
                param.copy_(0.01 * torch.randn(param.shape, generator=g))
    model.save_pretrained(directory)
    assert (directory / "adapter_config.json").is_file()
    return directory


def direct_hash(server: Served, checkpoint: Path) -> str:
    """What the engine folds from the same directory, read in place (the inbox's way)."""
    return Merger(server.base, STRATEGY).fold(checkpoint).content_hash


def tar_of(directory: Path, top: str | None = None) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for path in sorted(directory.iterdir()):
            tar.add(path, arcname=f"{top}/{path.name}" if top else path.name)
    return buffer.getvalue()


def post_tar(server: Served, data: bytes, name: str):
    return server.client.http.post(
        "/checkpoints",
        params={"name": name},
        content=data,
        headers={"Content-Type": "application/x-tar"},
    )


def test_a_lora_adapter_directory_is_uploaded_as_a_tar_and_folded(
    served: Served, tmp_path: Path
) -> None:
    adapter = make_adapter(served, tmp_path / "adapter", seed=1)
    count = served.client.manifest()["globals"]["count"]
    receipt = served.client.upload(adapter)  # a directory: the client tars it
    assert receipt["status"] == "queued"
    outcome = served.client.wait([receipt["id"]])[receipt["id"]]
    assert outcome["status"] == "folded", outcome
    assert outcome["content_hash"] == direct_hash(served, adapter)
    assert served.client.manifest()["globals"]["count"] == count + 1
    wait_for(lambda: not list((served.state / "spool").iterdir()), what="an empty spool")


def test_a_sharded_directory_is_uploaded_as_a_tar_with_a_top_folder(
    served: Served, tmp_path: Path
) -> None:
    tensors = finetune(served.base_tensors, 7)
    names = sorted(tensors)
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    weight_map = {}
    for i, part in enumerate((names[:3], names[3:])):
        shard = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, sharded / shard)
        weight_map.update({n: shard for n in part})
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    # as `tar -cf run.tar run/` makes it: everything under one folder
    response = post_tar(served, tar_of(sharded, top="run-7"), "run-7")
    assert response.status_code == 202, response.text
    checkpoint_id = response.json()["id"]
    outcome = served.client.wait([checkpoint_id])[checkpoint_id]
    assert outcome["status"] == "folded", outcome
    assert outcome["content_hash"] == direct_hash(served, sharded)


def test_an_adapter_weights_file_alone_is_refused_saying_how_to_send_it(
    served: Served, tmp_path: Path
) -> None:
    adapter = make_adapter(served, tmp_path / "adapter", seed=2)
    weights = (adapter / "adapter_model.safetensors").read_bytes()
    response = served.client.post(weights, "adapter_model.safetensors")
    assert response.status_code == 422, response.text
    reason = response.json()["reason"]
    assert "LoRA adapter" in reason and "adapter_config.json" in reason, reason
    assert "application/x-tar" in reason, reason


def _member(name: str, data: bytes = b"x", kind: bytes = tarfile.REGTYPE, **fields) -> bytes:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    for key, value in fields.items():
        setattr(info, key, value)
    block = info.tobuf(format=tarfile.GNU_FORMAT)
    if info.size:
        block += data + b"\0" * (-len(data) % 512)
    return block


def _tar(*members: bytes) -> bytes:
    return b"".join(members) + b"\0" * 1024


def _claims_a_terabyte() -> bytes:
    info = tarfile.TarInfo("model.safetensors")
    info.size = 1 << 40  # the header says 1 TB; only a few bytes follow
    return info.tobuf(format=tarfile.GNU_FORMAT) + b"\0" * 1024


HOSTILE = {
    # name: (tar body, fragment of the reason)
    "absolute": (_tar(_member("/tmp/evil-absolute")), "absolute"),
    "dotdot": (_tar(_member("../evil-dotdot")), ".."),
    "nested-dotdot": (_tar(_member("a/../../evil-nested")), ".."),
    "symlink": (_tar(_member("model.safetensors", kind=tarfile.SYMTYPE, linkname="/etc/passwd")),
                "symbolic link"),
    "hardlink": (_tar(_member("model.safetensors", kind=tarfile.LNKTYPE, linkname="/etc/passwd")),
                 "hard link"),
    "device": (_tar(_member("null", kind=tarfile.CHRTYPE, devmajor=1, devminor=3)), "device"),
    "fifo": (_tar(_member("pipe", kind=tarfile.FIFOTYPE)), "FIFO"),
    "duplicate": (_tar(_member("model.safetensors"), _member("model.safetensors")), "twice"),
    "too-many": (_tar(*(_member(f"f{i}") for i in range(MAX_MEMBERS + 1))), "members"),
    "too-big-unpacked": (_claims_a_terabyte(), "unpacked"),
    "not-a-tar": (b"hello, I am not a tar archive" * 40, "not a tar"),
    "no-checkpoint": (_tar(_member("README.md", b"# notes")), "no checkpoint"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_or_useless_tars_are_refused_with_a_true_reason(served: Served, case: str) -> None:
    body, fragment = HOSTILE[case]
    before = served.snapshot()
    response = post_tar(served, body, f"{case}.tar")
    assert response.status_code in (413, 422), response.text
    reason = response.json()["reason"]
    assert fragment in reason, reason
    [record] = final_events(served.state, response.json()["id"])
    assert record["event"] == "rejected" and record["reason"] == reason
    assert served.snapshot() == before
    assert not list((served.state / "spool").iterdir())  # nothing unpacked is left behind
    assert not list(served.root.parent.rglob("*evil*"))
    assert not Path("/tmp/evil-absolute").exists()


def test_the_client_raises_an_error_carrying_the_servers_reason(served: Served) -> None:
    from contmerge.server.client import UploadError

    buffer = io.BytesIO()
    torch.save(finetune(served.base_tensors, 8), buffer)
    with pytest.raises(UploadError) as caught:
        served.client.upload(buffer.getvalue(), "model.pt")
    error = caught.value
    assert isinstance(error, ContmergeError)
    assert error.status_code == 422
    assert "pickle" in error.reason and "pickle" in str(error)
    assert error.record["status"] == "rejected" and error.record["id"]


def test_the_client_uploads_a_file_without_reading_it_whole(served: Served, tmp_path: Path) -> None:
    path = tmp_path / "file.safetensors"
    path.write_bytes(save(finetune(served.base_tensors, 9)))
    receipt = served.client.upload(path)
    assert receipt["name"] == "file.safetensors" and receipt["bytes"] == path.stat().st_size
    assert served.client.wait([receipt["id"]])[receipt["id"]]["status"] == "folded"


def test_an_unpacked_directory_in_the_spool_is_folded_after_a_crash(tmp_path: Path) -> None:
    """The disk as SIGKILL leaves it between the spool rename of an unpacked tar and its journal
    line: the restart must fold it (and journal it as accepted, recovered)."""
    (tmp_path / "srv").mkdir()
    server = Served(tmp_path / "srv")
    try:
        adapter = make_adapter(server, tmp_path / "adapter", seed=3)
        server.process.stop()
        checkpoint_id = "00000042-abcdef"
        shutil.copytree(adapter, server.state / "spool" / f"{checkpoint_id}__crashed.dir")
        (server.state / "spool" / ".00000043-abcdef.unpack").mkdir()  # cut short: never accepted
        server.restart(kill=False, already_stopped=True)
        outcome = server.client.wait([checkpoint_id])[checkpoint_id]
        assert outcome["status"] == "folded", outcome
        assert outcome["content_hash"] == direct_hash(server, adapter)
        [accepted] = [r for r in journal(server.state) if r["event"] == "accepted"]
        assert accepted["recovered"] is True
        assert accepted["bytes"] == sum(f.stat().st_size for f in adapter.iterdir())
        wait_for(lambda: not list((server.state / "spool").iterdir()), what="an empty spool")
    finally:
        server.close()


def _readme_command(starting: str) -> str:
    """The README's shell command that starts with ``starting`` (with its continuation lines)."""
    lines = (Path(__file__).resolve().parents[1] / "README.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(starting))
    command = [lines[start]]
    while command[-1].endswith("\\"):
        command.append(lines[start + len(command)])
    return "\n".join(command)


@pytest.mark.skipif(not (shutil.which("tar") and shutil.which("curl")), reason="needs tar, curl")
def test_the_readme_tar_and_curl_upload_of_an_adapter_works(served: Served, tmp_path: Path) -> None:
    make_adapter(served, tmp_path / "my-adapter", seed=4)
    command = _readme_command("tar -cf - -C my-adapter .")
    env = {**os.environ, "TOKEN": TOKEN, "URL": served.process.url}
    run = subprocess.run(
        ["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    receipt = json.loads(run.stdout)
    assert receipt["status"] == "queued" and receipt["name"] == "my-adapter"
    outcome = served.client.wait([receipt["id"]])[receipt["id"]]
    assert outcome["status"] == "folded", outcome
    assert outcome["content_hash"] == direct_hash(served, tmp_path / "my-adapter")
