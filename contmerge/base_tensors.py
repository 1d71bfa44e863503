"""The base model as folds read it: mapped between folds when small, let go tensor by tensor
when large; its fingerprint and the norms ‖θ0‖² the another-base check divides by."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from .checks import squared_norm
from .elementwise import flat_base
from .hashing import ContentHash
from .sources import Checkpoint
from .strategy import TensorInfo

#: a base up to this size stays mapped between folds (its pages are in the page cache anyway;
#: mapping them again for every fold costs a fault per 64 KiB); a larger one is let go tensor by
#: tensor, so resident memory stays bounded for models larger than RAM
MAPPED_BASE_LIMIT = 1 << 30


class BaseTensors:
    """The base ``checkpoint`` for the fold: ``flat`` views, ``release``, ``sum_sq``."""

    def __init__(self, checkpoint: Checkpoint, keep_mapped: bool | None = None) -> None:
        self.checkpoint = checkpoint
        if keep_mapped is None:
            keep_mapped = sum(m.nbytes for m in checkpoint.meta.values()) <= MAPPED_BASE_LIMIT
        self.keep_mapped = keep_mapped
        self.float_names = [n for n, m in checkpoint.meta.items() if m.is_float]
        #: ‖θ0‖² per float tensor, in its compute dtype (``fingerprint``, or the state's record)
        self.sum_sq: dict[str, float] = {}
        # the base's tensors as batches take them, while the base stays mapped
        self._views: dict[str, tuple[torch.Tensor, np.ndarray | None]] = {}

    def flat(self, info: TensorInfo) -> tuple[torch.Tensor, np.ndarray | None]:
        """The base's tensor in place, as batches take it (``elementwise.flat_base``)."""
        if not self.keep_mapped:
            return flat_base(info, self.checkpoint.view(info.name))
        view = self._views.get(info.name)
        if view is None:
            view = self._views[info.name] = flat_base(info, self.checkpoint.view(info.name))
        return view

    def read(self, info: TensorInfo) -> torch.Tensor:
        """θ0 of one tensor in its compute dtype (a tensor the caller may keep)."""
        return self.checkpoint.read(info.name).to(info.compute_dtype)

    def release(self, name: str) -> None:
        if not self.keep_mapped:
            self.checkpoint.release(name)

    def fingerprint(self, infos: Mapping[str, TensorInfo]) -> str:
        """Hash of the base; also keeps ‖θ0‖² (fixed for the base) in ``sum_sq``."""
        content = ContentHash()
        self.sum_sq = {}
        for name, info in infos.items():
            tensor = self.checkpoint.view(name)
            content.add_tensor(name, tensor)
            if info.meta.is_float:
                self.sum_sq[name] = squared_norm(tensor.to(info.compute_dtype))
            del tensor
            self.release(name)
        return content.hexdigest()

    def close(self) -> None:
        self._views.clear()  # before the base, so its map can close
        self.checkpoint.close()
