"""Real offline tasks: shapes, labels, transforms, splits, determinism, digits-only fallback."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from contmerge.errors import Notice
from contmerge.simulations import data
from contmerge.simulations.data import DataConfig, load_suite

HAS_FASHION = data.fashion_available()
needs_fashion = pytest.mark.skipif(
    not HAS_FASHION,
    reason=f"Fashion-MNIST missing: {data.FASHION_INSTALL_HINT}",
)
SMALL = {"n_train": 300, "n_test": 200, "n_pretrain": 1000}


def _row_hashes(x: torch.Tensor) -> set[bytes]:
    return {row.tobytes() for row in x.numpy()}


@pytest.fixture(scope="module")
def suite() -> data.TaskSuite:
    return load_suite(DataConfig(**SMALL))


def test_suite_has_eight_real_tasks_with_valid_shapes_and_labels(suite: data.TaskSuite) -> None:
    assert len(suite.tasks) >= 8
    assert len(set(suite.names)) == len(suite.names)
    assert suite.pretrain.name not in suite.names
    for task in [suite.pretrain, *suite.tasks]:
        for x, y in ((task.x_train, task.y_train), (task.x_test, task.y_test)):
            assert x.dtype == torch.float32 and x.shape[1] == 28 * 28
            assert y.dtype == torch.int64 and y.shape == (x.shape[0],)
            assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
            assert float(x.std()) > 0.1  # real images, not blanks
            # every class of the task is present (balanced-ish real data)
            assert set(y.tolist()) == set(range(task.num_classes))
        assert len(task.x_train) >= 300 or task.spec.source == "digits"
        assert len(task.x_test) > 0


@needs_fashion
def test_fashion_tasks_are_real_fashion_images_transformed() -> None:
    x_train, y_train, x_test, y_test = data.load_fashion()
    assert x_train.shape == (60000, 28, 28) and x_test.shape == (10000, 28, 28)
    assert set(np.unique(y_train)) == set(range(10))
    suite = load_suite(DataConfig(**SMALL, tasks=("fashion_rot90", "fashion_invert")))
    assert suite.sources == "fashion+digits"
    raw_test = {img.tobytes() for img in x_test}

    def as_bytes(img: np.ndarray) -> bytes:  # back to the 8-bit pixels of the IDX file
        return np.ascontiguousarray(np.rint(img * 255.0).astype(np.uint8)).tobytes()

    rot = suite.tasks[0].x_test.numpy().reshape(-1, 28, 28)
    undone = np.rot90(rot, k=-1, axes=(1, 2))  # rotate back: must be an original test image
    assert all(as_bytes(img) in raw_test for img in undone)
    inv = 1.0 - suite.tasks[1].x_test.numpy().reshape(-1, 28, 28)
    assert all(as_bytes(img) in raw_test for img in inv)


def test_digits_are_upsampled_sklearn_digits() -> None:
    from sklearn.datasets import load_digits

    x, y = data.load_digits_28()
    assert x.shape == (1797, 28, 28) and y.shape == (1797,)
    assert np.array_equal(y, load_digits().target)
    # the frame outside the centred 20x20 box is empty, the box is not
    assert x[:, :4].max() == 0 and x[:, :, 24:].max() == 0 and x[:, 4:24, 4:24].max() > 0.9
    # area-downsampling the box back to 8x8 gives (nearly) the original digit
    box = torch.from_numpy(x[:, 4:24, 4:24])[:, None]
    small = torch.nn.functional.interpolate(box, size=8, mode="area")[:, 0].numpy()
    assert np.corrcoef(small.ravel(), (load_digits().images / 16.0).ravel())[0, 1] > 0.95


def test_tasks_are_deterministic_given_seed_and_change_with_it() -> None:
    names = ("digits_invert", "fashion_patch") if HAS_FASHION else ("digits_patch",)
    a = load_suite(DataConfig(**SMALL, tasks=names, seed=3))
    b = load_suite(DataConfig(**SMALL, tasks=names, seed=3))
    c = load_suite(DataConfig(**SMALL, tasks=names, seed=4))
    for ta, tb, tc in zip(a.tasks, b.tasks, c.tasks):
        assert torch.equal(ta.x_train, tb.x_train) and torch.equal(ta.y_train, tb.y_train)
        assert torch.equal(ta.x_test, tb.x_test)
        assert not torch.equal(ta.x_train, tc.x_train)


def test_pretraining_images_are_disjoint_from_task_training_images() -> None:
    suite = load_suite(DataConfig(**SMALL))
    pre = _row_hashes(suite.pretrain.x_train)
    plain = [t for t in suite.tasks if t.spec.transform == "none"]
    if HAS_FASHION:  # no upright fashion task: compare with the un-flipped vflip task
        vflip = suite.tasks[suite.names.index("fashion_vflip")]
        unflipped = vflip.x_train.reshape(-1, 28, 28).flip(1).reshape(-1, 784).contiguous()
        assert not pre & _row_hashes(unflipped)
    for task in plain:
        assert not pre & _row_hashes(task.x_train)
    for task in suite.tasks:  # and no test image is a training image of the same task
        assert not _row_hashes(task.x_train) & _row_hashes(task.x_test)


def test_fixed_permutations_are_shared_by_train_and_test() -> None:
    rng = np.random.default_rng(0)
    x = rng.random((3, 28, 28)).astype(np.float32)
    for name in ("permute", "patch_shuffle"):
        state = np.random.default_rng(5)
        a = data.apply_transform(x, name, state)
        b = data.apply_transform(x, name, np.random.default_rng(5))
        assert np.array_equal(a, b)
        assert not np.array_equal(a, x)
        assert np.allclose(np.sort(a.reshape(3, -1)), np.sort(x.reshape(3, -1)))  # a permutation
    with pytest.raises(ValueError, match="unknown transform"):
        data.apply_transform(x, "blur", rng)


def test_missing_fashion_falls_back_to_digits_with_install_hint(tmp_path: Path) -> None:
    with pytest.warns(Notice, match=r"apt-get update && apt-get install -y dataset-fashion-mnist"):
        suite = load_suite(DataConfig(**SMALL, fashion_dir=str(tmp_path)))
    assert suite.sources == "digits-only"
    assert len(suite.tasks) >= 8
    assert all(t.spec.source == "digits" for t in [suite.pretrain, *suite.tasks])
    assert any("dataset-fashion-mnist" in n for n in suite.notes)
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        load_suite(DataConfig(**SMALL, fashion_dir=str(tmp_path), use_fashion=True))


def test_idx_reader_reads_and_rejects_truncated_files(tmp_path: Path) -> None:
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    good = tmp_path / "ok-idx3-ubyte.gz"
    with gzip.open(good, "wb") as f:
        f.write(struct.pack(">HBB", 0, 8, 3) + struct.pack(">III", 2, 3, 4) + arr.tobytes())
    assert np.array_equal(data.read_idx_gz(good), arr)
    bad = tmp_path / "bad-idx3-ubyte.gz"
    with gzip.open(bad, "wb") as f:
        f.write(struct.pack(">HBB", 0, 8, 3) + struct.pack(">III", 2, 3, 4) + arr.tobytes()[:-1])
    with pytest.raises(ValueError, match="truncated"):
        data.read_idx_gz(bad)
