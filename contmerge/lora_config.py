"""A PEFT LoRA adapter's ``adapter_config.json``, checked before any factor is read.

Only what the low-rank delta B·A·scale depends on is read: ``r``, ``lora_alpha``,
``rank_pattern``/``alpha_pattern`` (a module's own rank and alpha), ``use_rslora`` and
``fan_in_fan_out``. Anything that cannot be a real adapter's value is refused with a reason
naming the key, before it can become a division by zero, a broadcast, or a scale of 10⁴.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import jsonfile
from .errors import CheckpointError, clip

Fail = Callable[[str], CheckpointError]
CONFIG_FILE = "adapter_config.json"
#: an adapter config is a few kilobytes; this only stops a hostile one from filling memory
MAX_CONFIG_BYTES = 1 << 20


@dataclass(frozen=True)
class LoraConfig:
    path: Path  # the adapter_config.json it came from (named in every error)
    r: int
    alpha: float
    use_rslora: bool
    fan_in_fan_out: bool
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]

    def rank_of(self, module: str) -> int:
        """The rank PEFT gives ``module`` (its path in the base, without PEFT's prefix)."""
        pattern = _pattern_for(self.rank_pattern, module)
        return self.r if pattern is None else self.rank_pattern[pattern]

    def scale_of(self, module: str, rank: int) -> float:
        """PEFT's ``scaling``: alpha / r, or alpha / √r with rsLoRA."""
        pattern = _pattern_for(self.alpha_pattern, module)
        alpha = self.alpha if pattern is None else self.alpha_pattern[pattern]
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank


def _pattern_for(patterns: Mapping[str, object], module: str) -> str | None:
    """The first pattern matching ``module``, by peft.utils.other.get_pattern_key's rule."""
    for pattern in patterns:
        if re.match(rf"(.*\.)?({pattern})$", module):
            return pattern
    return None


def read_lora_config(directory: Path) -> LoraConfig:
    """The adapter's LoRA settings; CheckpointError naming adapter_config.json if any is bad."""
    path = directory / CONFIG_FILE
    config = jsonfile.read_object(path, MAX_CONFIG_BYTES)

    def fail(reason: str) -> CheckpointError:
        return CheckpointError(str(path), reason)

    peft_type = config.get("peft_type", "LORA")
    if not isinstance(peft_type, str) or peft_type.upper() != "LORA":
        raise fail(f"unsupported PEFT type {_shown(peft_type)} (only LORA adapters fold)")
    for flag, what in (("use_dora", "DoRA"), ("lora_bias", "LoRA bias")):
        if _flag(config, flag, fail):
            raise fail(f"{what} adapters are not supported (not a B·A delta)")
    if "r" not in config:
        raise fail("no 'r' (the adapter's rank)")
    r = _rank(config["r"], "'r'", fail)
    alpha = _alpha(config.get("lora_alpha", r), "'lora_alpha'", fail)
    return LoraConfig(
        path=path,
        r=r,
        alpha=alpha,
        use_rslora=_flag(config, "use_rslora", fail),
        fan_in_fan_out=_flag(config, "fan_in_fan_out", fail),
        rank_pattern=_patterns(config, "rank_pattern", _rank, fail),
        alpha_pattern=_patterns(config, "alpha_pattern", _alpha, fail),
    )


def _shown(value: object) -> str:
    return clip(repr(value), 60)


def _flag(config: Mapping[str, Any], key: str, fail: Fail) -> bool:
    value = config.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise fail(f"{key!r} must be true or false, not {_shown(value)}")
    return value


def _rank(value: object, what: str, fail: Fail) -> int:
    # JSON 4.0 is a float: PEFT would fail building a layer of width 4.0
    if type(value) is not int or value < 1:
        raise fail(f"{what} must be a positive integer (a rank), not {_shown(value)}")
    return value


def _alpha(value: object, what: str, fail: Fail) -> float:
    if type(value) not in (int, float) or not math.isfinite(value) or value <= 0:  # type: ignore[arg-type]
        raise fail(f"{what} must be a positive finite number, not {_shown(value)}")
    return float(value)  # type: ignore[arg-type]


def _patterns(
    config: Mapping[str, Any], key: str, check: Callable[[Any, str, Fail], Any], fail: Fail
) -> dict[str, Any]:
    value = config.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise fail(f"{key!r} must be an object of regex -> value, not {_shown(value)}")
    out = {}
    for pattern, item in value.items():
        try:
            re.compile(rf"(.*\.)?({pattern})$")
        except re.error as exc:
            raise fail(f"{key!r} holds a bad regex {_shown(pattern)}: {exc}") from None
        out[pattern] = check(item, f"{key!r} value for {_shown(pattern)}", fail)
    return out
