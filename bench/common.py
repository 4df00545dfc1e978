"""What bench/quality.py and bench/speed.py share.

- The setup: the offline quickstart model and data (ASSETS.md), or with `smoke` a tiny random BERT with
  MiniLM's tokenizer on a few hundred of the same sentences (CI's smoke mode).
- The contestants, each built on its own deep copy of one base model per seed, so the base weights and the
  freshly initialised head are identical; every contestant with a plain LoRA `A` gets the same `A`.
- The training loop: every contestant, PEFT's included, is stepped by sora's own `engine.train_step` on the
  same batches in the same order, with the same dropout stream, LR schedule, clipping and AdamW.
- The results folder `bench/results/<date>-<machine>/` and the facts that say where numbers came from.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime
import hashlib
import json
import math
import os
import platform
import re
import subprocess
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from sora_cli.adapters import SoRA, adapter_layers, get_method
from sora_cli.adapters.inject import attach, count_parameters, inject, select_heads, select_targets
from sora_cli.adapters.method import Method
from sora_cli.data import TrainOrder
from sora_cli.engine import module_meta, train_step
from sora_cli.merge import merge
from sora_cli.models import load_model, resolve_model_path
from sora_cli.optim import build_optimizer, lr_factor, set_lr, trainable_parameters, warmup_length
from sora_cli.prune import prune
from sora_cli.recipe import AdapterConfig, ModelConfig, Recipe, load_recipe
from sora_cli.tasks.classification import ClassificationTask, Encoded, collate, compute_metrics, encode

# PEFT 0.21 asks transformers 5 for `is_gradient_checkpointing`, which warns on every get_peft_model.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

REPO = Path(__file__).resolve().parent.parent
QUICKSTART = REPO / "recipes" / "quickstart.yaml"
RESULTS = REPO / "bench" / "results"

# Learning rates, each the method's best on the dev split over 600 steps (seed 0; bench/results/*/lr-sweep-dev):
# SoRA's is the quickstart recipe's. LoRA (sora's engine): 2e-3 does not learn (dev stays at the 57.6% majority
# rate), 1e-3 dev 82.43, 5e-4 dev 82.75. AdaLoRA: its paper's SST-2 rate 8e-4 barely moves in 600 steps (test
# 60.3: E starts at 0 and A, B at N(0, 0.02), so its update grows far slower than LoRA's), 2e-3 dev 80.78,
# 5e-3 dev 81.33, 1e-2 dev 81.10. PEFT's LoRA and sora's LoRA are the same math: same rate.
LORA_LR = 5e-4
ADALORA_LR = 5e-3


@dataclass(frozen=True)
class Settings:
    """One training run's shape, taken from the quickstart recipe (smoke mode shortens it)."""

    recipe: Recipe
    steps: int
    batch_size: int
    max_length: int
    warmup_ratio: float
    seeds: tuple[int, ...]
    lrs: dict[str, float]

    @property
    def r(self) -> int:
        return self.recipe.adapter.r

    @property
    def alpha(self) -> float:
        return self.recipe.adapter.alpha


def settings(smoke: bool, seeds: tuple[int, ...] | None = None, steps: int | None = None,
             lrs: dict[str, float] | None = None) -> Settings:
    recipe = load_recipe(QUICKSTART)
    t = recipe.train
    default_lrs = {"peft-lora": LORA_LR, "peft-adalora": ADALORA_LR, "sora-lora": LORA_LR,
                   "sora-r8": t.lr, "sora-r16": t.lr, **{key: LORA_LR for key in ROSELORA}}
    return Settings(recipe=recipe, steps=steps or (6 if smoke else int(t.max_steps or 0)),
                    batch_size=t.batch_size, max_length=recipe.data.max_length, warmup_ratio=t.warmup_ratio,
                    seeds=seeds if seeds is not None else ((0, 1) if smoke else (0, 1, 2)),
                    lrs={**default_lrs, **(lrs or {})})


# ---------------------------------------------------------------------------------------------
# Setup: model, data, targets


@dataclass
class Setup:
    description: str
    model_config: ModelConfig
    tokenizer: Any
    train: Encoded
    test: Encoded  # the held-out split scored: test, or dev when choosing settings (`--split dev`)
    split: str
    targets: list[str]  # the adapted Linear modules, every contestant the same
    heads: list[str]  # the trained head
    device: torch.device
    task: ClassificationTask  # its loss is the one every contestant trains on
    _bases: dict[int, nn.Module] = dataclasses.field(default_factory=dict)

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    def base(self, seed: int) -> nn.Module:
        """The pre-trained model with a head initialised under `seed`: contestants take deep copies."""
        if seed not in self._bases:
            torch.manual_seed(seed)
            self._bases[seed] = load_model(self.model_config, self.task)[0]
        return self._bases[seed]


def tiny_model_dir(root: Path) -> Path:
    """A random 2-layer, 32-wide BERT with MiniLM's tokenizer, saved like a hub model."""
    import transformers
    from transformers import AutoTokenizer, BertConfig, BertModel

    transformers.utils.logging.disable_progress_bar()
    packaged = resolve_model_path("packaged:all-MiniLM-L6-v2")
    tokenizer = AutoTokenizer.from_pretrained(packaged)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    BertModel(config).save_pretrained(root)
    tokenizer.save_pretrained(root)
    return root


def load_setup(s: Settings, smoke: bool, workdir: Path, device: str = "cpu", split: str = "test") -> Setup:
    recipe = s.recipe
    if smoke:
        model_config = ModelConfig(name_or_path=str(tiny_model_dir(workdir / "tiny-bert")))
        data = dataclasses.replace(recipe.data, max_train_samples=256, max_eval_samples=64)
        description = "tiny random BERT (2 layers, 32 wide) with MiniLM's tokenizer, Rotten Tomatoes"
    else:
        model_config, data = recipe.model, recipe.data
        description = f"{recipe.model.name_or_path} on {recipe.data.dataset}"
    task = ClassificationTask(data)
    task.load_data()
    splits = task.splits
    assert splits is not None
    model, tokenizer = load_model(model_config, task)
    heads = select_heads(model, recipe.adapter.modules_to_save)
    targets = select_targets(model, recipe.adapter.target_modules, heads)
    held = splits.test if split == "test" else splits.dev
    assert held is not None
    return Setup(description=f"{description}: {len(splits.train):,d} train / {len(held):,d} {split}",
                 model_config=model_config, tokenizer=tokenizer,
                 train=encode(splits.train, tokenizer, s.max_length, splits.task_type),
                 test=encode(held, tokenizer, s.max_length, splits.task_type), split=split,
                 targets=targets, heads=heads, device=torch.device(device), task=task)


# ---------------------------------------------------------------------------------------------
# Contestants


class Hooks(Method):
    """The engine's per-step hooks for a model sora did not build (PEFT's, the frozen floor)."""

    def __init__(self, name: str, after: Any = None):
        self.name, self._after = name, after

    def after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> dict[str, float]:
        if self._after is not None:
            self._after(step)  # AdaLoRA: update_and_allocate, after optimizer.step() and before zero_grad
        return {}


@dataclass
class Contestant:
    key: str
    label: str
    model: nn.Module
    hooks: Method
    optimizer: torch.optim.Optimizer
    lr: float

    @property
    def params(self) -> list[nn.Parameter]:
        return trainable_parameters(self.model)

    def trainable(self) -> int:
        return count_parameters(self.model)[0]


# RoseLoRA at three densities, r as LoRA's, LoRA's LR: the mask schedule from 10% to 80% of training
ROSELORA = {"roselora-d05": 0.05, "roselora-d10": 0.1, "roselora-d20": 0.2}
LABELS = {
    "peft-lora": "PEFT LoRA r={r}",
    "peft-adalora": "PEFT AdaLoRA r 12→8",
    "sora-lora": "sora LoRA r={r}",
    "sora-r8": "sora SoRA r_max=8",
    "sora-r16": "sora SoRA r_max=16",
    "floor": "frozen base + 1 scalar (floor)",
    **{key: f"sora RoseLoRA r={{r}}, density {density:g}" for key, density in ROSELORA.items()},
}
QUALITY = ("peft-lora", "peft-adalora", "sora-lora", "sora-r8", "sora-r16", *ROSELORA)


def reference_a(seed: int, name: str, r: int, d_in: int) -> torch.Tensor:
    """The shared initial A of one module, (r, d_in): the distribution of `kaiming_uniform_(a=√5)`, which
    PEFT's LoRA and sora's layers both use, U(-1/√d_in, 1/√d_in), from a generator seeded by (seed, module)."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") % 2**63)
    return (torch.rand(r, d_in, generator=gen) * 2 - 1) / math.sqrt(d_in)


def adalora_schedule(steps: int) -> dict[str, int]:
    """AdaLoRA's three phases: 10% warm-up at the initial rank, cubic budget decrease, final 30% fixed."""
    return {"total_step": steps, "tinit": max(1, steps // 10), "tfinal": max(1, (3 * steps) // 10),
            "deltaT": max(1, min(10, steps // 20))}


def build(key: str, setup: Setup, s: Settings, seed: int) -> Contestant:
    """One contestant on a fresh deep copy of the seed's base model (same weights, same head init)."""
    lr, label = s.lrs[key], LABELS[key].format(r=s.r)
    if key == "peft-lora":
        return peft_contestant(key, label, setup, s, seed, lr, s.r)
    if key == "peft-adalora":
        return peft_contestant(key, label, setup, s, seed, lr, 12, adalora={"target_r": s.r,
                                                                           **adalora_schedule(s.steps)})
    adapter = s.recipe.adapter
    if key == "sora-lora":
        adapter = dataclasses.replace(adapter, method="lora", gate_init=None, sparse_lambda=None, threshold=None,
                                      gate_lr=None, l1_loss_weight=None)
    elif key in ("sora-r8", "sora-r16"):
        adapter = dataclasses.replace(adapter, method="sora", r=int(key.removeprefix("sora-r")))
    elif key in ROSELORA:
        adapter = dataclasses.replace(adapter, method="roselora", gate_init=None, sparse_lambda=None, threshold=None,
                                      gate_lr=None, l1_loss_weight=None, density=ROSELORA[key])
    else:
        raise KeyError(key)
    return sora_contestant(key, label, adapter, setup, s, seed, lr)


def peft_contestant(key: str, label: str, setup: Setup, s: Settings, seed: int, lr: float, r: int,
                    adalora: dict[str, Any] | None = None) -> Contestant:
    """PEFT's LoRA at rank r (A set to the shared initial A), or with `adalora` (target_r and its schedule) PEFT's
    AdaLoRA from init_r = r, its budget step after every optimizer step."""
    from peft import AdaLoraConfig, LoraConfig, get_peft_model

    model = copy.deepcopy(setup.base(seed))
    common = {"lora_alpha": s.alpha, "lora_dropout": 0.0, "target_modules": list(setup.targets),
              "modules_to_save": list(setup.heads) or None, "task_type": setup.task.peft_task_type}
    if adalora is None:
        model = get_peft_model(model, LoraConfig(r=r, **common))
        with torch.no_grad():
            for name in setup.targets:
                layer = model.base_model.model.get_submodule(name)
                layer.lora_A["default"].weight.copy_(reference_a(seed, name, r, layer.in_features))
        hooks = Hooks(key)
    else:
        torch.manual_seed(seed)
        model = get_peft_model(model, AdaLoraConfig(init_r=r, beta1=0.85, beta2=0.85, orth_reg_weight=0.5,
                                                    **adalora, **common))
        hooks = Hooks(key, model.base_model.update_and_allocate)
    if setup.task.peft_task_type == "CAUSAL_LM":  # stepped unwrapped: the causal loss calls the decoder itself
        model = model.get_base_model()
    model.to(setup.device)
    optimizer = build_optimizer(model, [], lr, s.recipe.train.weight_decay)
    return Contestant(key, label, model, hooks, optimizer, lr)


def sora_contestant(key: str, label: str, adapter: AdapterConfig, setup: Setup, s: Settings, seed: int,
                    lr: float) -> Contestant:
    """sora's method of `adapter` on the bench's targets and head, every plain A the shared initial A; the method's
    setup as the engine's prepare runs it (RoseLoRA's mask schedule, SoRA's budget controller)."""
    model = copy.deepcopy(setup.base(seed))
    adapter = dataclasses.replace(adapter, target_modules=tuple(setup.targets), modules_to_save=tuple(setup.heads))
    train_cfg = dataclasses.replace(s.recipe.train, lr=lr)
    method = get_method(adapter, train_cfg)
    torch.manual_seed(seed)
    inject(model, method)
    with torch.no_grad():
        for name, layer in adapter_layers(model):
            layer.lora_A.copy_(reference_a(seed, name, layer.r, layer.in_features))
    model.to(setup.device)
    method.setup(model, s.steps, None)
    optimizer = build_optimizer(model, method.param_groups(model), lr, train_cfg.weight_decay)
    return Contestant(key, label, model, method, optimizer, lr)


def frozen_floor(setup: Setup, s: Settings, seed: int) -> Contestant:
    """The physical lower bound of an adapter step: every base weight (and the head) frozen, no adapters,
    one trainable scalar scaling the input embeddings, so backward still runs through every layer."""
    model = copy.deepcopy(setup.base(seed))
    for p in model.parameters():
        p.requires_grad_(False)
    scale = nn.Parameter(torch.ones(()))
    model.register_parameter("bench_input_scale", scale)
    model.get_input_embeddings().register_forward_hook(lambda module, args, out: out * scale)
    model.to(setup.device)
    optimizer = build_optimizer(model, [], s.lrs["sora-lora"], 0.0)
    return Contestant("floor", LABELS["floor"], model, Hooks("floor"), optimizer, s.lrs["sora-lora"])


def adapter_copies(c: Contestant, setup: Setup, seed: int, which: tuple[str, ...] = ("pruned",)) -> dict[str, nn.Module]:
    """A trained sora SoRA contestant as users ship it, each on a clean copy of the seed's base model, in eval
    mode: "pruned" (`sora prune`'s pure function, the adapter left unmerged) and "merged" (`sora merge`'s)."""
    tensors = {n: p.detach().cpu().clone() for n, p in c.model.named_parameters() if p.requires_grad}
    meta = {"method": "sora", "modules": module_meta(c.model), "modules_to_save": setup.heads}
    out = {}
    if "pruned" in which:
        pruned, pruned_meta = prune(tensors, meta)
        out["pruned"] = copy.deepcopy(setup.base(seed))
        attach(out["pruned"], SoRA, pruned_meta["modules"], pruned, "bench")
    if "merged" in which:
        out["merged"] = copy.deepcopy(setup.base(seed))
        out["merged"].load_state_dict(merge(out["merged"].state_dict(), tensors, meta))
    return {k: m.to(setup.device).eval() for k, m in out.items()}


def initial_hashes(c: Contestant) -> dict[str, str]:
    """sha256 of the head's and of every plain LoRA A's initial values (for the fairness test)."""
    head, a = hashlib.sha256(), hashlib.sha256()
    adalora = any("lora_E" in n for n, _ in c.model.named_parameters())  # its own A (Gaussian, E = 0): not shared
    for name, p in c.model.named_parameters():
        if not p.requires_grad:
            continue
        plain = re.sub(r"\.(modules_to_save|original_module)\.default|\.default|^base_model\.model\.", "", name)
        if "lora_A" in plain:
            if not adalora:
                a.update(plain.removesuffix(".weight").encode())
                a.update(p.detach().float().cpu().numpy().tobytes())
        elif "lora_" not in plain and not plain.endswith(".gate") and plain != "bench_input_scale":
            head.update(plain.encode())
            head.update(p.detach().float().cpu().numpy().tobytes())
    return {"head": head.hexdigest(), "lora_A": "" if adalora else a.hexdigest()}


# ---------------------------------------------------------------------------------------------
# Training and evaluation


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fixed_batches(setup: Setup, s: Settings, seed: int, n: int) -> list[dict[str, torch.Tensor]]:
    """The first `n` training batches of the seed's order, on the device."""
    order = TrainOrder(len(setup.train), s.batch_size, seed)
    return [{k: v.to(setup.device) for k, v in collate(setup.train, order.indices(k)[1], setup.pad_id).items()}
            for k in range(n)]


def stepper(c: Contestant, s: Settings, task: ClassificationTask) -> Callable[[dict[str, torch.Tensor], int], Any]:
    """`step(batch, step_index)`: one `engine.train_step` of `c` (train mode, the recipe's clipping)."""
    params, max_norm = c.params, s.recipe.train.max_grad_norm or 0.0
    c.model.train()
    return lambda batch, step: train_step(c.model, task, c.hooks, c.optimizer, [batch], params, max_norm,
                                          contextlib.nullcontext(), step)


def train(c: Contestant, setup: Setup, s: Settings, seed: int, losses: list[float] | None = None) -> dict[str, Any]:
    """Train for s.steps on the seed's batch order; returns wall seconds and the sha256 of every batch fed. With
    `losses`, each step's training loss is appended to it."""
    order = TrainOrder(len(setup.train), s.batch_size, seed)
    warmup = warmup_length(None, s.warmup_ratio, s.steps)
    seen = hashlib.sha256()
    step_once = stepper(c, s, setup.task)
    torch.manual_seed(seed)  # dropout masks: the same stream for every contestant
    sync(setup.device)
    t0 = time.perf_counter()
    for step in range(s.steps):
        set_lr(c.optimizer, lr_factor(step, s.steps, warmup, s.recipe.train.lr_scheduler))
        batch = setup.task.collate(setup.train, order.indices(step)[1], setup.pad_id)
        seen.update(batch["input_ids"].numpy().tobytes())
        seen.update(batch["labels"].numpy().tobytes())
        loss = step_once({k: v.to(setup.device) for k, v in batch.items()}, step)[0]
        if losses is not None:
            losses.append(float(loss))
    sync(setup.device)
    return {"train_seconds": time.perf_counter() - t0, "batches_sha256": seen.hexdigest()}


def held_out_batches(setup: Setup, size: int, n: int | None = None) -> list[dict[str, torch.Tensor]]:
    """The held-out split in order, `size` examples per batch (the first `n` batches), without labels, on the device."""
    batches = []
    for start in range(0, len(setup.test) if n is None else min(n * size, len(setup.test)), size):
        batch = collate(setup.test, list(range(start, min(start + size, len(setup.test)))), setup.pad_id)
        batch.pop("labels")
        batches.append({k: v.to(setup.device) for k, v in batch.items()})
    return batches


@torch.inference_mode()
def held_out_accuracy(model: nn.Module, setup: Setup) -> tuple[float, torch.Tensor]:
    """Accuracy on the held-out split (test, or dev), and the logits in order (for parity checks): one pass."""
    model.eval()
    logits = torch.cat([model(**b).logits.float().cpu() for b in held_out_batches(setup, 64)])
    return compute_metrics("classification", logits.numpy(), setup.test.labels.numpy())["accuracy"], logits


# ---------------------------------------------------------------------------------------------
# Where the numbers come from


def machine(device: torch.device) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    facts: dict[str, Any] = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                             "device": device.type, "python": platform.python_version(), "torch": torch.__version__}
    if device.type == "cuda":
        facts["gpu"] = torch.cuda.get_device_name(device)
    for lib in ("transformers", "peft"):
        with contextlib.suppress(ImportError):
            facts[lib] = __import__(lib).__version__
    try:
        facts["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                         text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "sora_cli", "bench/*.py"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
        facts["commit"] += "+changes" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        facts["commit"] = "unknown"
    return facts


def machine_slug(facts: dict[str, Any]) -> str:
    if facts["device"] == "cuda":
        return re.sub(r"[^a-z0-9]+", "-", facts["gpu"].lower()).strip("-")
    return f"cpu-{facts['cores']}core"


def results_dir(out: Path | None, facts: dict[str, Any], smoke: bool) -> Path:
    if out is None:
        out = RESULTS / f"{datetime.date.today().isoformat()}-{machine_slug(facts)}{'-smoke' if smoke else ''}"
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def target_lines(checks: list[tuple[str, str, bool]]) -> str:
    """A results table's targets, one line each: met or missed, what, and the measured value."""
    return "\n".join(f"- {'met' if ok else '**missed**'}: {what} — measured {value}" for what, value, ok in checks)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
