"""State dicts through Flower's ArrayRecord: bit-exact for every dtype, bf16 included, and
checked against lying metadata; Flower's real (de)serialisation is used, not a stand-in."""

from __future__ import annotations

import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import Array, ArrayRecord
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents

from contmerge import CheckpointError, Merger
from contmerge.flower.arrays import (
    ArrayRecordCheckpoint,
    array_to_tensor,
    from_array_record,
    record_digest,
    tensor_to_array,
    to_array_record,
)


def _wire(record: ArrayRecord) -> ArrayRecord:
    """Deflate a record into bytes and inflate it back, as Flower does between processes."""
    contents = {oid: obj.deflate() for oid, obj in get_all_nested_objects(record).items()}
    back = inflate_object_from_contents(record.object_id, contents)
    assert isinstance(back, ArrayRecord) and back is not record
    return back


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _special_bf16() -> torch.Tensor:
    values = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 1e-40, 3.14159, -2.5])
    bf16 = values.bfloat16()
    # a NaN with a non-default payload: only a raw-bits transport keeps it
    return torch.cat([bf16, torch.tensor([0x7FC1], dtype=torch.int16).view(torch.bfloat16)])


def test_every_dtype_round_trips_bit_exactly_through_flower_serialisation() -> None:
    g = torch.Generator().manual_seed(0)
    state = {
        "bf16.weight": torch.randn(33, 17, generator=g).bfloat16(),
        "bf16.special": _special_bf16(),
        "f8": torch.randn(4, 4, generator=g).to(torch.float8_e4m3fn),
        "f8b": torch.randn(4, generator=g).to(torch.float8_e5m2),
        "f16": torch.randn(5, generator=g).half(),
        "f32": torch.randn(2, 3, generator=g),
        "f64": torch.randn(3, generator=g).double(),
        "i64": torch.arange(7),
        "u16": torch.arange(5, dtype=torch.int32).to(torch.uint16),
        "flag": torch.tensor([True, False]),
        "scalar": torch.tensor(1.5).bfloat16(),
    }
    back = from_array_record(_wire(to_array_record(state)))
    assert list(back) == list(state)
    for name, tensor in state.items():
        assert back[name].dtype == tensor.dtype, name
        assert back[name].shape == tensor.shape, name
        assert _bits(back[name]) == _bits(tensor), name


def test_flower_itself_refuses_bf16_and_sees_our_bits_as_int16() -> None:
    t = torch.randn(3, 3).bfloat16()
    with pytest.raises(TypeError):
        ArrayRecord({"w": t})  # why the bit transport exists
    array = tensor_to_array(t)
    assert array.dtype == "bfloat16"
    assert array.numpy().dtype.name == "int16"  # generic consumers still get a valid array


def test_digest_is_equal_only_for_identical_records() -> None:
    a = {"w": torch.randn(4, 4).bfloat16()}
    record = to_array_record(a)
    assert record_digest(_wire(record)) == record_digest(record)
    b = {"w": a["w"].clone()}
    b["w"][0, 0] = b["w"][0, 0] + 1
    assert record_digest(to_array_record(b)) != record_digest(record)


def test_array_whose_payload_contradicts_its_metadata_is_refused() -> None:
    good = tensor_to_array(torch.zeros(2, 2))
    lying_shape = Array(dtype="float32", shape=(4, 4), stype=good.stype, data=good.data)
    with pytest.raises(CheckpointError, match="declares"):
        array_to_tensor(lying_shape, "w", "node 7")
    lying_dtype = Array(dtype="bfloat16", shape=(2, 2), stype=good.stype, data=good.data)
    with pytest.raises(CheckpointError, match="payload is float32"):
        array_to_tensor(lying_dtype, "w", "node 7")
    with pytest.raises(CheckpointError, match="unsupported array dtype"):
        odd = Array(dtype="complex64", shape=(1,), stype=good.stype, data=good.data)
        ArrayRecordCheckpoint(ArrayRecord({"w": odd}))


def test_merger_folds_array_records_and_rejects_bad_ones_untouched() -> None:
    g = torch.Generator().manual_seed(1)
    base = {
        "fc.weight": torch.randn(8, 6, generator=g).bfloat16(),
        "fc.bias": torch.zeros(8).bfloat16(),
    }
    merger = Merger(ArrayRecordCheckpoint(to_array_record(base), "base"), "average")
    tuned = [{k: (v.float() + 0.01 * torch.randn(v.shape, generator=g)).bfloat16()
              for k, v in base.items()} for _ in range(2)]  # fmt: skip
    for i, sd in enumerate(tuned):
        merger.fold(ArrayRecordCheckpoint(_wire(to_array_record(sd)), f"node {i}"))
    before = merger.emit_state_dict()
    bad_nan = {k: v.clone() for k, v in tuned[0].items()}
    bad_nan["fc.weight"][1, 1] = float("nan")
    bad_shape = {"fc.weight": torch.zeros(8, 7).bfloat16(), "fc.bias": base["fc.bias"]}
    bad_dtype = {k: v.double() for k, v in tuned[0].items()}  # float64 would be rounded
    for bad, reason in ((bad_nan, "NaN"), (bad_shape, "shape"), (bad_dtype, "dtype")):
        with pytest.raises(CheckpointError, match=reason):
            merger.fold(ArrayRecordCheckpoint(to_array_record(bad), "node 9"))
    assert merger.count == 2
    after = merger.emit_state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    expected = ((tuned[0]["fc.weight"].float() + tuned[1]["fc.weight"].float()) / 2).bfloat16()
    assert after["fc.weight"].dtype == torch.bfloat16
    torch.testing.assert_close(after["fc.weight"].float(), expected.float(), atol=1e-2, rtol=0)
