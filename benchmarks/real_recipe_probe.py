"""Probe fine-tuning recipes of a real-model continual scenario: the gap over θ0 per task.

For each task and each recipe setting, fine-tunes the scenario's suffix once from θ0 (the same
``_train`` loop as the scenario, fixed class-mean heads) and prints the test accuracy of θ0 and
of the fine-tuned model on that task, the training accuracy (first 256 training examples),
‖τ‖/‖θ0‖ and the seconds per step. Nothing is cached but the frozen prefix outputs (the
scenario's own cache). This is how the default recipes in ``simulations/real_continual.py``
were chosen: the papers' regime needs each fine-tuned model clearly above θ0 on its own task.

Run, e.g.::

    python benchmarks/real_recipe_probe.py --model minilm --tasks rt_sentiment \\
        --setting steps=20 --setting steps=100,lr=3e-4 --config n_train=2048

``--setting`` is repeatable (RealConfig fields, plus ``last_only=K``: train only the last K
suffix blocks); ``--config`` sets RealConfig fields of the scenario itself (its prefix cache).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import time
from typing import Any

import torch

from contmerge.simulations.continual import default_cache_dir
from contmerge.simulations.heads import cosine_logits
from contmerge.simulations.real_continual import RealConfig, RealScenario, _train, trim_padding


def parse_fields(text: str) -> dict[str, Any]:
    """``a=1,b=3e-4`` → dict; values are Python literals, else strings."""
    out: dict[str, Any] = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        key, _, value = item.partition("=")
        try:
            out[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            out[key.strip()] = value.strip()
    return out


def rel_norm(state: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> float:
    keys = [k for k, v in base.items() if v.is_floating_point()]
    num = sum(float(((state[k].double() - base[k].double()) ** 2).sum()) for k in keys)
    den = sum(float((base[k].double() ** 2).sum()) for k in keys)
    return (num / den) ** 0.5


def probe(scenario: RealScenario, name: str, setting: dict[str, Any]) -> dict[str, float]:
    setting = dict(setting)
    last = int(setting.pop("last_only", 0))
    config = dataclasses.replace(scenario.config, **setting)
    module = scenario._suffix_with(scenario.base)
    blocks = list(module.encoder.layer.values())
    params = (
        [p for b in blocks[len(blocks) - last :] for p in b.parameters()]
        if last
        else list(module.parameters())
    )
    for p in params:
        p.requires_grad_(True)
    t0 = time.perf_counter()
    _train(module, params, scenario.tasks[name], config, seed=1)
    seconds = time.perf_counter() - t0
    module.requires_grad_(False)
    state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    task = scenario.tasks[name]
    with torch.no_grad():
        scenario._suffix_with(state)
        feats = scenario.suffix(*trim_padding(task.h_train[:256], task.m_train[:256]))
        train_acc = float((cosine_logits(feats, task.heads).argmax(1) == task.y_train[:256])
                          .float().mean())  # fmt: skip
    return {
        "pretrained": scenario.accuracy(scenario.base, [name])[name],
        "finetuned": scenario.accuracy(state, [name])[name],
        "train": train_acc,
        "rel_norm": rel_norm(state, scenario.base),
        "s_per_step": seconds / config.steps,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm", choices=("minilm", "vit-s", "smollm2-lora"))
    parser.add_argument("--tasks", required=True, help="comma-separated task names")
    parser.add_argument("--setting", action="append", default=None,
                        help="repeatable: recipe fields, e.g. steps=100,lr=3e-4")  # fmt: skip
    parser.add_argument("--config", default="", help="scenario fields, e.g. n_train=2048")
    parser.add_argument("--cache-dir", default=str(default_cache_dir()))
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 32 train / 16 test examples, 2 steps")  # fmt: skip
    args = parser.parse_args(argv)
    if args.quick:
        args.config = ",".join(filter(None, [args.config, "n_train=32,n_test=16"]))
        args.setting = ["steps=2"]
    torch.set_num_threads(1)  # as the scenario runs
    tasks = tuple(t.strip() for t in args.tasks.split(",") if t.strip())
    config = RealConfig(model=args.model, tasks=tasks, **parse_fields(args.config))
    scenario = RealScenario(config, args.cache_dir, progress=False)
    print(f"scenario cache {scenario.root}", flush=True)
    for name in tasks:
        for text in args.setting or [""]:
            r = probe(scenario, name, parse_fields(text))
            print(f"{name:20s} [{text or 'defaults'}] θ0 {100 * r['pretrained']:.1f} "
                  f"fine-tuned {100 * r['finetuned']:.1f} "
                  f"(gap {100 * (r['finetuned'] - r['pretrained']):+.1f}; train "
                  f"{100 * r['train']:.1f}) ‖τ‖/‖θ0‖ {r['rel_norm']:.4f} "
                  f"{r['s_per_step']:.2f} s/step", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
