"""`contmerge serve --strategy fw --objective ...`: a real server on loopback takes uploads into
the FW pool, runs the FW step on each, durably; a restart after SIGKILL keeps the pool."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("fastapi")

from fwdoor_models import write_fw_setup  # noqa: E402
from server_helpers import TOKEN  # noqa: E402

from contmerge.objectives import load_objective  # noqa: E402
from contmerge.server.client import MergeClient  # noqa: E402
from contmerge.server.launcher import ServerProcess  # noqa: E402
from contmerge.strategies.frank_wolfe import FrankWolfeMerger  # noqa: E402

TESTS = os.path.dirname(__file__)


@pytest.mark.slow  # two server starts (each imports torch): ~50 s on the shared machine
def test_uploads_join_the_pool_and_the_served_model_is_the_fw_merge(tmp_path):
    setup = write_fw_setup(tmp_path / "data")
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    state = tmp_path / "state"
    args = [
        "--state", str(state), "--base", str(setup["base"]), "--strategy", "fw",
        "--objective", str(setup["objective"]), "--set", "iterations=2", "--port", "0",
        "--token-file", str(token), "--threads", "1",
    ]  # fmt: skip
    env = {"PYTHONPATH": os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")])}
    pool = setup["pool"]
    server = ServerProcess(args, tmp_path / "server.log", env=env).start()
    try:
        with MergeClient(server.url, TOKEN) as client:
            ids = [client.upload(p)["id"] for p in pool[:2]]
            outcomes = client.wait(ids)
            assert [outcomes[i]["event"] for i in ids] == ["folded", "folded"]
            again = client.upload(pool[0])["id"]
            assert client.wait([again])[again]["event"] == "duplicate"
            status = client.status()
            assert status["state"]["strategy"] == "fw" and status["state"]["count"] == 2
        server.kill()  # SIGKILL: the pool and θ are on disk
        server = ServerProcess(args, tmp_path / "server.log", env=env).start()
        with MergeClient(server.url, TOKEN) as client:
            third = client.upload(pool[2])["id"]
            assert client.wait([third])[third]["event"] == "folded"
            got = load_file(client.download(tmp_path / "served.safetensors"))
    finally:
        server.stop()
    objective = load_objective(str(setup["objective"]))
    with FrankWolfeMerger.from_preset("hard", setup["base"], pool[:1], objective) as fw:
        fw.run(2)  # each arrival: it joins, then two iterations
        for path in pool[1:]:
            fw.add(path, iterations=2)
        want = fw.merged()
    assert sorted(got) == sorted(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name
    # the pool keeps its own copies: the spool files are gone
    assert len(list((state / "pool").glob("*.safetensors"))) == 3
