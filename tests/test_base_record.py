"""The state's record of its base (identity, linear weights, norms) and the no-op ``merge``.

A state remembers which files its base was when it last read them; opening it again with those
files unchanged reads no base tensor and builds no transformers model, and a ``merge`` of
checkpoints that are all folded already is answered without importing torch. A changed base is
read and fingerprinted as before; ``--verify-base`` (and ``verify``) always read it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from contmerge import Merger, StateError
from contmerge.cli import main

from helpers import assert_same, merged_after, write_models

REPO = Path(__file__).resolve().parent.parent


def manifest_of(state: Path) -> dict:
    return json.loads((state / "manifest.json").read_text())


def run_cli(*args: str, probe: str = "") -> subprocess.CompletedProcess[str]:
    """``contmerge ARGS`` in a fresh interpreter, then ``probe`` (Python) in the same process."""
    code = (
        "import sys\nfrom contmerge.cli import main\n"
        f"code = main({list(args)!r})\n{probe}\nsys.exit(code)\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300
    )


def one_folded(tmp_path: Path, strategy: str, count: int) -> tuple[Path, list[Path], Path]:
    """``count`` fine-tunes written, the first folded into a new state."""
    base, ft = write_models(tmp_path, count)
    state = tmp_path / "state"
    with Merger(base, strategy, state_dir=state) as merger:
        merger.fold(ft[0])
    return base, ft, state


def rewrite_keeping_identity(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """New tensor bytes in the same file (same inode, size, header), its mtime put back."""
    before = os.stat(path)
    scratch = path.with_suffix(".scratch")
    save_file(tensors, scratch)
    data = scratch.read_bytes()
    scratch.unlink()
    assert len(data) == before.st_size
    with open(path, "r+b") as handle:
        handle.write(data)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert os.stat(path).st_ino == before.st_ino


def test_a_new_state_records_its_base_and_a_resume_trusts_an_unchanged_one(tmp_path):
    base, ft, state = one_folded(tmp_path, "opcm", 2)
    with Merger(base, state_dir=state, read_only=True) as merger:
        linear = {n for n, i in merger.infos.items() if i.is_linear}
    record = manifest_of(state)["base"]["record"]
    assert set(record["linear"]) == linear == {"encoder.0.weight", "encoder.1.weight"}
    assert record["sum_sq"]["encoder.0.weight"] == pytest.approx(
        float((load_file(base)["encoder.0.weight"].double() ** 2).sum())
    )
    # the base's bytes change behind the state's back, its file identity does not: trusted
    original = {k: v.clone() for k, v in load_file(base).items()}  # not views of the file
    rewrite_keeping_identity(
        base, {k: v + 1 if v.is_floating_point() else v for k, v in original.items()}
    )
    with Merger(base, state_dir=state) as merger:
        assert {n for n, i in merger.infos.items() if i.is_linear} == linear
    # ... unless asked to read it
    with pytest.raises(StateError, match="is not the base this state was started from"):
        Merger(base, state_dir=state, verify_base=True)
    assert main(["verify", "--state", str(state), "--base", str(base)]) == 1
    rewrite_keeping_identity(base, original)
    with Merger(base, state_dir=state, verify_base=True) as merger:
        merger.fold(ft[1])
    with Merger(base, state_dir=state, read_only=True) as merger:
        assert_same(merger.emit_state_dict(), merged_after(base, ft, "opcm"))


def test_a_base_whose_files_changed_is_read_again_and_refused_if_it_is_another(tmp_path):
    base, ft, state = one_folded(tmp_path, "average", 1)
    tensors = load_file(base)
    tensors["norm.bias"] = tensors["norm.bias"] + 1
    save_file(tensors, base)  # a new file: another inode and mtime
    with pytest.raises(StateError, match="is not the base this state was started from"):
        Merger(base, state_dir=state)
    assert main(["merge", "--base", str(base), "--state", str(state), str(ft[0])]) == 1


def test_a_state_without_a_record_reads_its_base_and_records_it_at_the_next_commit(tmp_path):
    base, ft, state = one_folded(tmp_path, "average", 2)
    manifest = manifest_of(state)
    recorded = manifest["base"].pop("record")
    (state / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    with Merger(base, state_dir=state, read_only=True) as merger:
        merger.emit_state_dict()  # reads and fingerprints the base; writes nothing
    assert "record" not in manifest_of(state)["base"]
    with Merger(base, state_dir=state) as merger:
        merger.fold(ft[1])
    assert manifest_of(state)["base"]["record"] == recorded


@pytest.mark.parametrize(
    "damage",
    [
        lambda r: r.update(linear="encoder.0.weight"),
        lambda r: r["sum_sq"].pop("norm.bias"),
        lambda r: r["sum_sq"].update({"norm.bias": "1.0"}),
        lambda r: r.update(identity="0" * 64),
    ],
)
def test_a_malformed_or_foreign_record_is_not_used(tmp_path, damage):
    base, _, state = one_folded(tmp_path, "opcm", 1)
    expected = {"encoder.0.weight", "encoder.1.weight"}
    manifest = manifest_of(state)
    damage(manifest["base"]["record"])
    (state / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    with Merger(base, state_dir=state, read_only=True) as merger:
        assert {n for n, i in merger.infos.items() if i.is_linear} == expected
        assert merger.base_sq["norm.bias"] == pytest.approx(
            float((load_file(base)["norm.bias"].double() ** 2).sum())
        )


def test_a_noop_merge_answers_without_torch_and_a_new_checkpoint_still_folds(tmp_path):
    base, ft = write_models(tmp_path, 2)
    state = tmp_path / "state"
    common = ["merge", "--quiet", "--base", str(base), "--state", str(state)]
    assert main([*common, "--strategy", "average", str(ft[0])]) == 0
    probe = "print('torch imported:', 'torch' in sys.modules)"
    noop = run_cli(*common, "--strategy", "average()", str(ft[0]), probe=probe)
    assert noop.returncode == 0, noop.stderr
    assert noop.stdout.splitlines() == [
        f"state {state}: average(), 1 folded so far",
        f"already folded as #1: {ft[0]} (0.00 s)",
        "torch imported: False",
    ]
    # anything the record cannot settle goes through the Merger, as before
    wrong = run_cli(*common, "--strategy", "opcm", str(ft[0]), probe=probe)
    assert wrong.returncode == 1 and "state was made with average(), not opcm(" in wrong.stderr
    more = run_cli(*common, str(ft[0]), str(ft[1]), probe=probe)
    assert more.returncode == 0, more.stderr
    assert f"folded as #2: {ft[1]}" in more.stdout and "torch imported: True" in more.stdout
    out = tmp_path / "out.safetensors"
    again = run_cli(*common, str(ft[1]), "--out", str(out), probe=probe)
    assert again.returncode == 0 and out.exists() and "torch imported: True" in again.stdout
    assert_same(load_file(out), merged_after(base, ft, "average"))


def test_a_noop_merge_with_a_missing_state_file_goes_through_the_merger(tmp_path):
    base, ft = write_models(tmp_path, 1)
    state = tmp_path / "state"
    common = ["merge", "--quiet", "--base", str(base), "--state", str(state)]
    assert main([*common, "--strategy", "average", str(ft[0])]) == 0
    (state / manifest_of(state)["state_file"]).unlink()
    result = run_cli(*common, str(ft[0]))
    assert result.returncode == 1 and "state-00000001.safetensors" in result.stderr


def test_a_model_directory_resumed_unchanged_builds_no_transformers_model(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=64,
    )
    torch.manual_seed(0)
    base_model = transformers.LlamaForCausalLM(config)
    base = tmp_path / "base"
    base_model.save_pretrained(base)
    with torch.no_grad():
        for param in base_model.parameters():
            param.add_(1e-3 * torch.randn_like(param))
    tuned = tmp_path / "tuned"
    base_model.save_pretrained(tuned)
    state = tmp_path / "state"
    with Merger(base, "opcm", state_dir=state) as merger:
        expected = sorted(n for n, i in merger.infos.items() if i.is_linear)
    assert "lm_head.weight" in expected and "model.embed_tokens.weight" not in expected
    probe = (
        "from contmerge import Merger\n"
        f"m = Merger({str(base)!r}, state_dir={str(state)!r})\n"
        "print(sorted(n for n, i in m.infos.items() if i.is_linear))\n"
        "print('transformers imported:', 'transformers' in sys.modules)\n"
        "m.close()"
    )
    result = run_cli(
        "merge", "--quiet", "--base", str(base), "--state", str(state), str(tuned), probe=probe
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "folded as #1" in lines[1]
    assert lines[-2:] == [str(expected), "transformers imported: False"]
