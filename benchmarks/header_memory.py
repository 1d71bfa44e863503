"""Peak RSS of parsing one safetensors header at the size bound (16 MiB by default).

A header is untrusted input that the reader must parse before it can refuse anything else, so
its bound is what a hostile file can make contmerge allocate. For each layout a file whose
header is ``--mb`` MiB is written (tensors of zero elements: the data section stays empty), then
a fresh process opens it with ``SafetensorsReader`` and reports its peak RSS above the RSS just
before (``/proc/self/clear_refs`` ← 5, then VmHWM). Layouts:

- ``llm``: entries as a large model's (``model.layers.N.mlp.experts.M.down_proj.weight``, BF16)
- ``dense``: the most entries per byte (one-letter names, ``U8`` of shape ``[0]``)
- ``metadata``: one string in ``__metadata__`` as large as the header
- ``llm ×6``: the ``llm`` layout at 6 × the size (~100 MB, the old 100 MB limit), opened with
  the default bound: refused (``refused`` in the tensors column) before it is read

``--compare DIR`` runs the same probe on another checkout too (e.g. the code before a change),
side by side: the ratio of the two is the figure to report.

    python benchmarks/header_memory.py                # 16 MiB headers
    python benchmarks/header_memory.py --quick        # 2 MiB headers, seconds
    python benchmarks/header_memory.py --compare /tmp/old-checkout
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import MiB, human  # noqa: E402

PROBE = """
import sys
sys.path.insert(0, sys.argv[2])
from _common import peak_rss_bytes, reset_peak_rss, rss_bytes
from contmerge.tensorfile import SafetensorsReader
before = rss_bytes()
reset_peak_rss()
try:
    if sys.argv[3] == "raised":
        reader = SafetensorsReader(sys.argv[1], max_header_bytes=1 << 30)
    else:
        reader = SafetensorsReader(sys.argv[1])
    tensors = len(reader.meta)
except TypeError:  # a checkout from before the bound (its limit was 100 MB)
    tensors = len(SafetensorsReader(sys.argv[1]).meta)
except ValueError:  # CheckpointError: refused
    tensors = -1
print(peak_rss_bytes() - before, tensors)
"""


def entries(layout: str):
    """(name, entry) pairs of the layout, endlessly."""
    i = 0
    while True:
        if layout == "llm":
            name = f"model.layers.{i // 384}.mlp.experts.{i % 384}.down_proj.weight"
            yield name, {"dtype": "BF16", "shape": [0, 7168], "data_offsets": [0, 0]}
        else:
            yield f"t{i}", {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]}
        i += 1


def write_header_file(path: Path, layout: str, nbytes: int) -> int:
    """A valid file whose header is about ``nbytes``; returns the header's exact size."""
    if layout == "metadata":
        header: dict[str, object] = {"__metadata__": {"note": "x" * nbytes}}
    else:
        header = {}
        size = 2
        for name, entry in entries(layout):
            size += len(json.dumps({name: entry})) - 1
            if size > nbytes:
                break
            header[name] = entry
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    return len(raw)


def probe(path: Path, code: str | None, limit: str) -> tuple[int, int]:
    env = dict(os.environ)
    if code:
        env["PYTHONPATH"] = code + os.pathsep + env.get("PYTHONPATH", "")
    here = str(Path(__file__).resolve().parent)
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(path), here, limit],
        env=env,
        cwd=path.parent,  # not a checkout: ``python -c`` imports from the working directory first
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return int(out[0]), int(out[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=16.0, help="header size in MiB (default 16)")
    parser.add_argument("--quick", action="store_true", help="2 MiB headers")
    parser.add_argument("--compare", metavar="DIR", help="also probe the checkout in DIR")
    parser.add_argument("--workdir", help="where to write the files (default: a temp dir)")
    args = parser.parse_args()
    nbytes = int((2.0 if args.quick else args.mb) * MiB)
    codes = [("this", None)] + ([("compare", args.compare)] if args.compare else [])
    with tempfile.TemporaryDirectory(dir=args.workdir) as work:
        print(f"{'layout':9s} {'header':>10s} {'tensors':>8s}", end="")
        for label, _ in codes:
            print(f" {label + ' peak':>14s} {'×header':>8s}", end="")
        print(" ratio (compare / this)" if args.compare else "")
        rows = [("llm", 1, "raised"), ("dense", 1, "raised"), ("metadata", 1, "raised")]
        for layout, times, limit in [*rows, ("llm", 6, "default")]:
            path = Path(work) / f"{layout}.safetensors"
            size = write_header_file(path, layout, nbytes * times)
            peaks, counts = [], []
            for _, code in codes:
                peak, tensors = probe(path, code, limit)
                peaks.append(peak)
                counts.append("refused" if tensors < 0 else str(tensors))
            label = layout if times == 1 else f"{layout} ×{times}"
            print(f"{label:9s} {human(size):>10s} {'/'.join(counts):>8s}", end="")
            for peak in peaks:
                print(f" {human(peak):>14s} {peak / size:8.1f}", end="")
            if args.compare:  # a refused header costs nothing measurable: no ratio then
                print(f" {peaks[1] / peaks[0]:5.1f}" if peaks[0] >= MiB else "     —")
            else:
                print()


if __name__ == "__main__":
    main()
