"""FW-Merging through Flower's simulation engine: two clients fine-tune the broadcast model on
their own classes and send it as a candidate; the server's FwStrategy adds each to a durable
pool and runs the FW step with its objective."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("flwr")
pytest.importorskip("ray")

import torch  # noqa: E402
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402
from flwr.simulation import run_simulation  # noqa: E402
from fwdoor_models import mlp, train, write_fw_setup  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from contmerge.datastate import read_data_manifest  # noqa: E402
from contmerge.flower import from_array_record, to_array_record  # noqa: E402
from contmerge.flower.fw import FwStrategy  # noqa: E402
from contmerge.flower.simulate import backend_config  # noqa: E402
from contmerge.objectives import load_objective  # noqa: E402
from contmerge.strategies.frank_wolfe import FrankWolfeMerger  # noqa: E402

CLIENTS = 2
ROUNDS = 2
ITERATIONS = 2


def _train(msg: Message, context: Context) -> Message:
    pid = int(context.node_config["partition-id"])
    config = msg.content["config"]
    shard = load_file(Path(str(config["data"])) / f"shard{pid}.safetensors")
    model = mlp()
    model.load_state_dict(from_array_record(msg.content["arrays"]))
    train(model, shard["x"], shard["y"], steps=20, seed=10 * pid + int(config["server-round"]))
    state = {k: v.detach() for k, v in model.state_dict().items()}
    metrics = MetricRecord({"num-examples": len(shard["y"])})
    return Message(RecordDict({"arrays": to_array_record(state), "metrics": metrics}), reply_to=msg)


def _client_app() -> ClientApp:
    app = ClientApp()
    app.train()(_train)
    return app


def _server(grid: Grid, out: dict[str, Any], setup: dict, state_dir: Path, data: Path) -> None:
    while len(list(grid.get_node_ids())) < CLIENTS:
        time.sleep(0.5)
    strategy = FwStrategy(
        base=setup["base"], objective=str(setup["objective"]), state_dir=state_dir,
        settings={"iterations": ITERATIONS}, fraction_evaluate=0.0, min_train_nodes=CLIENTS,
        min_available_nodes=CLIENTS,
    )  # fmt: skip
    initial = to_array_record(load_file(setup["base"]))
    result = strategy.start_streaming(
        grid,
        initial,
        num_rounds=ROUNDS,
        timeout=300,
        train_config=ConfigRecord({"data": str(data)}),
    )
    out["final"] = from_array_record(result.arrays)
    out["reports"] = strategy.reports
    strategy.close()


@pytest.mark.slow  # a Ray simulation: about a minute on the shared machine
def test_clients_send_candidates_and_the_server_runs_fw_durably(tmp_path):
    setup = write_fw_setup(tmp_path / "fw")
    data = tmp_path / "shards"
    data.mkdir()
    objective = load_file(setup["objective"])
    for pid in range(CLIENTS):  # each client: the labelled samples of one target task
        save_file({"x": objective[f"x.task{pid}"], "y": objective[f"y.task{pid}"]},
                  data / f"shard{pid}.safetensors")  # fmt: skip
    state_dir = tmp_path / "state"
    out: dict[str, Any] = {}
    server = ServerApp()
    server.main()(lambda grid, context: _server(grid, out, setup, state_dir, data))
    run_simulation(server, _client_app(), num_supernodes=CLIENTS, backend_config=backend_config(1))
    assert [len(r.folded) for r in out["reports"]] == [CLIENTS] * ROUNDS
    manifest = read_data_manifest(state_dir)
    assert manifest is not None and len(manifest["pool"]) == CLIENTS * ROUNDS
    assert manifest["iteration"] == CLIENTS * ROUNDS * ITERATIONS and manifest["owed"] == 0
    # the same FW run offline, over the pool's copies in the order they joined
    paths = [record["path"] for record in manifest["pool"]]
    fw_objective = load_objective(str(setup["objective"]))
    with FrankWolfeMerger.from_preset("hard", setup["base"], paths[:1], fw_objective) as fw:
        fw.run(ITERATIONS)
        for path in paths[1:]:
            fw.add(path, iterations=ITERATIONS)
        want = fw.merged()
    final = out["final"]
    assert sorted(final) == sorted(want)
    for name in want:
        assert torch.equal(final[name], want[name]), name
    base = load_file(setup["base"])
    assert any(not torch.equal(final[n], base[n]) for n in base)
