"""Step time of SoRA vs LoRA at equal r, same model, same batches, interleaved A/B/A/B.

    python bench/step_time.py [--steps 30] [--repeats 5] [--r 8] [--max-length 64]

Prints the median per-step time of each method and the ratio sora / lora. One full training
step each: forward, backward, clip, AdamW step, the method's after-step hook (SoRA: soft-threshold).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from sora_cli.adapters import get_method
from sora_cli.adapters.inject import inject
from sora_cli.data import TrainOrder, collate, encode, load_splits
from sora_cli.engine import load_model
from sora_cli.optim import build_optimizer, trainable_parameters
from sora_cli.recipe import AdapterConfig, DataConfig, ModelConfig, TrainConfig


def build(method_name: str, r: int, splits):
    torch.manual_seed(0)
    model, tokenizer = load_model(ModelConfig(name_or_path="packaged:all-MiniLM-L6-v2"), "classification", 2, None)
    extra = {"sparse_lambda": 1.0, "gate_init": "normal", "threshold": "scaled"} if method_name == "sora" else {}
    method = get_method(AdapterConfig(method=method_name, r=r, alpha=16, **extra), TrainConfig(lr=2e-3))
    inject(model, method)
    optimizer = build_optimizer(model, method.param_groups(model), 2e-3, 0.0)
    model.train()
    return model, tokenizer, method, optimizer


def step(model, method, optimizer, batch) -> None:
    loss = model(**batch).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(trainable_parameters(model), 1.0)
    optimizer.step()
    method.after_step(model, optimizer, 0)
    optimizer.zero_grad(set_to_none=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()

    splits = load_splits(DataConfig(dataset="packaged:rotten_tomatoes"))
    runs = {name: build(name, args.r, splits) for name in ("lora", "sora")}
    tokenizer = runs["lora"][1]
    data = encode(splits.train, tokenizer, args.max_length, "classification")
    order = TrainOrder(len(data), args.batch_size, seed=0)
    batches = [collate(data, order.indices(k)[1], tokenizer.pad_token_id) for k in range(args.steps)]
    for name, (model, _, method, opt) in runs.items():  # warm-up
        for b in batches[:3]:
            step(model, method, opt, b)
    times: dict[str, list[float]] = {"lora": [], "sora": []}
    for repeat in range(args.repeats):
        names = ["lora", "sora"] if repeat % 2 == 0 else ["sora", "lora"]  # A B B A: no order bias
        for name in names:
            model, _, method, opt = runs[name]
            t0 = time.perf_counter()
            for b in batches:
                step(model, method, opt, b)
            times[name].append((time.perf_counter() - t0) / len(batches))
    lora, sora = statistics.median(times["lora"]), statistics.median(times["sora"])
    model, _, method, opt = runs["sora"]
    t0 = time.perf_counter()
    for _ in range(200):
        method.after_step(model, opt, 0)
    hook = (time.perf_counter() - t0) / 200
    print(f"threads {torch.get_num_threads()}  r {args.r}  batch {args.batch_size}  max_length {args.max_length}")
    print(f"lora  {lora * 1000:.1f} ms/step  (runs: {', '.join(f'{t * 1000:.0f}' for t in times['lora'])})")
    print(f"sora  {sora * 1000:.1f} ms/step  (runs: {', '.join(f'{t * 1000:.0f}' for t in times['sora'])})")
    print(f"sora's proximal step alone: {hook * 1000:.2f} ms/step")
    print(f"sora / lora = {sora / lora:.3f}  (median of per-repeat ratios "
          f"{statistics.median(s / l for s, l in zip(times['sora'], times['lora'])):.3f})")


if __name__ == "__main__":
    main()
