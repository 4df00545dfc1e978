"""Sparsify: make a pruned (sparse) base model for LoRS (METHODS.md "Making a sparse base").

For every target weight W (d_out, d_in), a score S of the same shape, then a keep-mask M; W ← W ⊙ M:

    magnitude   S = |W|
    wanda       S_ij = |W_ij| · ‖X_j‖₂     ‖X_j‖₂² = Σ over every calibration token of input feature j squared

    --sparsity ρ   magnitude: the int(numel·ρ) lowest S of the whole matrix are zeroed (one threshold per matrix)
                   wanda:     every row loses its int(d_in·ρ) lowest S (compared within the output row)
    --pattern n:m  both: in every group of m consecutive inputs of a row, the n highest S are kept

Ties are broken by index (stable sorts): the lower index is zeroed first, and kept first within an n:m group.
Wanda's statistics are collected block by block as in the reference code: the inputs of block 0 are captured once,
each block is scored from one pass and pruned, and its pruned outputs feed the next block.

The result is an ordinary transformers model directory (any recipe can name it) plus `sparsify.json`.
"""

from __future__ import annotations

import contextlib
import inspect
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sora_cli import __version__
from sora_cli.adapters.inject import inside, select_heads, select_targets
from sora_cli.checkpoint import atomic_dir, write_json
from sora_cli.dist import SINGLE, World, current, on_main
from sora_cli.errors import InputError, SoraError
from sora_cli.precision import wide_dtype
from sora_cli.recipe import Recipe, load_recipe

SPARSIFY_REPORT = "sparsify.json"  # beside the sparse model: what was pruned, how, and on which data
METHODS = ("magnitude", "wanda")
PATTERN_MEANING = "n:m keeps n of every m consecutive inputs of a row"
Batch = dict[str, Any]  # a model's keyword inputs: (1, T) tensors, and use_cache=False where the model takes it
BlockInputs = tuple[tuple[Any, ...], dict[str, Any]]  # (args, kwargs) one block receives for one sample


@dataclass(frozen=True)
class Rule:
    """What to zero: `method` (magnitude | wanda) and exactly one of `sparsity` (unstructured) or `pattern` (n, m)."""

    method: str
    sparsity: float | None = None
    pattern: tuple[int, int] | None = None

    def meta(self) -> dict[str, Any]:
        """This rule's fields of sparsify.json."""
        if self.pattern is not None:
            return {"pattern": f"{self.pattern[0]}:{self.pattern[1]}", "pattern_meaning": PATTERN_MEANING}
        return {"sparsity": self.sparsity}


# ---------------------------------------------------------------------------------------------
# Options


def parse_pattern(text: str) -> tuple[int, int]:
    """`n:m` → (n, m) with integers 0 < n < m (n = weights kept per group of m)."""
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", text)
    n, m = (int(match.group(1)), int(match.group(2))) if match else (0, 0)
    if not 0 < n < m:
        raise InputError(f"--pattern: expected n:m with integers 0 < n < m (e.g. 2:4 keeps 2 of every 4 "
                         f"consecutive inputs of a row), got {text!r}")
    return n, m


def make_rule(method: str, sparsity: float | None, pattern: str | None) -> Rule:
    """The rule of `--method` with exactly one of `--sparsity` / `--pattern`, checked."""
    if method not in METHODS:
        raise InputError(f"--method: expected one of {', '.join(METHODS)}, got {method!r}")
    if (sparsity is None) == (pattern is None):
        raise InputError("--sparsity / --pattern: give exactly one of them, e.g. --sparsity 0.5 (unstructured) "
                         "or --pattern 2:4 (n:m)")
    if pattern is not None:
        return Rule(method, pattern=parse_pattern(pattern))
    if not (sparsity is not None and 0 < sparsity < 1):  # also refuses NaN
        raise InputError(f"--sparsity: must be in (0, 1), got {sparsity}; e.g. --sparsity 0.5 zeroes half of "
                         "the weights")
    return Rule(method, sparsity=sparsity)


def parse_targets(text: str) -> str | tuple[str, ...]:
    """`--targets` as recipe `adapter.target_modules`: `all-linear`; module-name suffixes separated by commas
    (`q_proj,v_proj`, `self_attn.o_proj`); anything else is a regex matched against the full module name."""
    text = text.strip()
    if text == "all-linear":
        return text
    if re.fullmatch(r"[\w.]+(\s*,\s*[\w.]+)*", text):
        return tuple(s.strip() for s in text.split(","))
    try:
        re.compile(text)
    except re.error as e:
        raise InputError(f"--targets: {text!r} is neither module-name suffixes separated by commas nor a valid "
                         f"regex ({e}); e.g. --targets q_proj,v_proj or --targets '.*mlp.*'") from None
    return text


def weight_of(model: nn.Module, name: str) -> torch.Tensor:
    """The (d_out, d_in) weight of the Linear `name`."""
    linear = model.get_submodule(name)
    assert isinstance(linear, nn.Linear), name
    return linear.weight


def targets_of(model: nn.Module, target_modules: str | tuple[str, ...], heads: list[str]) -> list[str]:
    """The target Linear names (select_targets), its errors told in terms of `--targets`."""
    try:
        return select_targets(model, target_modules, heads)
    except InputError as e:
        raise InputError(str(e).replace("adapter.target_modules:", "--targets:", 1)) from None


def check_pattern(model: nn.Module, targets: list[str], rule: Rule) -> None:
    """n:m needs d_in to be a multiple of m in every target (checked before any work)."""
    if rule.pattern is None:
        return
    n, m = rule.pattern
    for name in targets:
        d_in = weight_of(model, name).shape[1]
        if d_in % m:
            raise InputError(f"--pattern {n}:{m}: {name} has d_in = {d_in}, not a multiple of {m}; choose another "
                             "pattern or leave that module out with --targets")


# ---------------------------------------------------------------------------------------------
# Scores and masks (pure, over tensors)


def score(weight: torch.Tensor, sq_norm: torch.Tensor | None = None) -> torch.Tensor:
    """(d_out, d_in) scores in float32 (float64 for a float64 weight): |W| (magnitude), or |W_ij| · ‖X_j‖₂ (wanda)
    with `sq_norm` (d_in,) = ‖X_j‖₂² summed over the calibration tokens."""
    wide = wide_dtype(weight.dtype)
    s = weight.detach().abs().to(wide)  # (d_out, d_in)
    return s if sq_norm is None else s * sq_norm.to(wide).sqrt()  # (d_out, d_in) · (d_in,), broadcast over rows


def matrix_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask (d_out, d_in): the int(numel·ρ) lowest scores of the whole matrix are zeroed (one threshold per
    matrix; stable ascending sort of the flattened matrix, so among ties the lower flat index goes first).

    The Wanda / SparseGPT repos zero every score ≤ the k-th (ties can take more); here exactly k, whatever the ties."""
    k = int(scores.numel() * sparsity)
    drop = torch.sort(scores.flatten(), stable=True).indices[:k]  # (k,) flat indices
    keep = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    keep[drop] = False
    return keep.view_as(scores)


def row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask (d_out, d_in): every row loses its int(d_in·ρ) lowest scores (stable ascending sort along dim 1,
    ties: the lower index first), as the Wanda reference does with `torch.sort(W_metric, dim=-1, stable=True)`."""
    k = int(scores.shape[1] * sparsity)
    drop = torch.sort(scores, dim=1, stable=True).indices[:, :k]  # (d_out, k)
    return torch.ones_like(scores, dtype=torch.bool).scatter_(1, drop, False)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep-mask (d_out, d_in): in every group of m consecutive inputs of a row the n highest scores are kept and
    the other m − n zeroed (stable descending sort within the group: among ties the lower index is kept).

    n counts the weights KEPT (2:4 keeps two of every four). The Wanda reference's `prune_n` counts the pruned ones
    (and picks them with `torch.topk(largest=False)`, which breaks ties in no set order); the two agree for 2:4 only."""
    d_out, d_in = scores.shape
    groups = scores.reshape(d_out, d_in // m, m)  # (d_out, d_in / m, m)
    kept = torch.sort(groups, dim=-1, descending=True, stable=True).indices[..., :n]  # (d_out, d_in / m, n)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, kept, True)
    return keep.reshape(d_out, d_in)


def keep_mask(scores: torch.Tensor, rule: Rule) -> torch.Tensor:
    """The rule's keep-mask (d_out, d_in) over `scores`."""
    if rule.pattern is not None:
        return nm_mask(scores, *rule.pattern)
    assert rule.sparsity is not None
    return matrix_mask(scores, rule.sparsity) if rule.method == "magnitude" else row_mask(scores, rule.sparsity)


def prune_weight(weight: torch.Tensor, rule: Rule, sq_norm: torch.Tensor | None = None) -> None:
    """W ← W ⊙ M in place, M = keep_mask(score(W, sq_norm)). Weights already zero stay zero (and may be dropped)."""
    mask = keep_mask(score(weight, sq_norm), rule)
    with torch.no_grad():
        weight.masked_fill_(~mask, 0)


# ---------------------------------------------------------------------------------------------
# Wanda calibration, block by block


class _Captured(Exception):
    """Raised by the pre-hook on block 0: the inputs it receives are all that is needed of this forward."""


def find_blocks(model: nn.Module, targets: list[str]) -> tuple[str, nn.ModuleList] | None:
    """(name, list) of the model's blocks: the longest nn.ModuleList whose children hold target Linears, e.g.
    `model.layers` (Llama) or `bert.encoder.layer` (BERT); lists inside such a list (MoE experts) do not count."""
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and name
             and any(inside(t, [name]) for t in targets)]
    outer = [(name, m) for name, m in found if not any(name.startswith(other + ".") for other, _ in found)]
    return max(outer, key=lambda item: len(item[1]), default=None)  # first of the longest


def capture_block_inputs(model: nn.Module, blocks: list[nn.Module], batches: list[Batch]) -> list[list[BlockInputs]]:
    """The (args, kwargs) each block receives in each sample's forward: [block][sample]. Only block 0's hidden states
    are kept (the pruned blocks make the others'); the rest of each block's inputs are its own, as the model builds
    them per layer (Gemma 2 and 3 give sliding-window layers another attention mask and rotary table than full
    ones, so block 0's cannot stand for all)."""
    captured: list[list[BlockInputs]] = [[] for _ in blocks]

    def hook_for(i: int) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if not args and "hidden_states" not in kwargs:
                raise SoraError(f"wanda: the model's blocks ({type(module).__name__}) receive no hidden states as "
                                "their first argument or as hidden_states=; this architecture is not supported")
            captured[i].append((args, dict(kwargs)) if i == 0 else _with_hidden((args, dict(kwargs)), None))
            if i == len(blocks) - 1:
                raise _Captured  # the last block's inputs are known: the rest of the forward is not needed
        return hook

    handles = [block.register_forward_pre_hook(hook_for(i), with_kwargs=True) for i, block in enumerate(blocks)]
    try:
        for batch in batches:
            with contextlib.suppress(_Captured):
                model(**batch)
    finally:
        for h in handles:
            h.remove()
    if any(len(c) != len(batches) for c in captured):
        raise SoraError(f"wanda: the model's blocks ({type(blocks[0]).__name__}) were not all reached by every "
                        "calibration sample; this architecture is not supported")
    return captured


@contextlib.contextmanager
def input_norms(model: nn.Module, names: list[str]) -> Iterator[dict[str, torch.Tensor]]:
    """While open, forward hooks sum x_j² over every token of each named Linear's input: {name: (d_in,)}, in float32
    (float64 for a float64 weight). Wanda's code keeps a running mean over samples instead; a factor shared by a
    whole matrix changes no row's order."""
    norms: dict[str, torch.Tensor] = {}

    def hook_for(name: str) -> Any:
        def hook(module: nn.Linear, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            x = inputs[0].detach()  # (..., d_in)
            wide = wide_dtype(module.weight.dtype)
            sq = x.reshape(-1, x.shape[-1]).to(wide).pow(2).sum(0)  # (d_in,)
            norms[name] = norms[name] + sq if name in norms else sq
        return hook

    handles = [model.get_submodule(n).register_forward_hook(hook_for(n)) for n in names]
    try:
        yield norms
    finally:
        for h in handles:
            h.remove()


def _prune_scored(model: nn.Module, names: list[str], rule: Rule, norms: dict[str, torch.Tensor],
                  world: World = SINGLE) -> None:
    """Prune each named Linear by its Wanda scores. Under torchrun each rank calibrated on its share of the samples:
    the input norms are summed over the ranks first, so every rank prunes alike."""
    if world.size > 1:
        seen = set().union(*world.gather(set(norms)))
        for name in names:
            if name in seen and name not in norms:  # this rank's samples never reached it
                w = weight_of(model, name)
                norms[name] = torch.zeros(w.shape[1], dtype=wide_dtype(w.dtype), device=w.device)
        world.sum_([norms[n] for n in names if n in norms])
    for name in names:
        if name not in norms:
            raise SoraError(f"wanda: {name} saw no input during calibration, so it cannot be scored; leave it out "
                            "with --targets, or calibrate on more --samples")
        prune_weight(weight_of(model, name), rule, norms[name])


def _hidden(output: Any) -> torch.Tensor:
    """A block's hidden states: its output, or the first item of a tuple (older transformers, outputs with extras)."""
    return output[0] if isinstance(output, (tuple, list)) else output


def _hidden_of(inputs: BlockInputs) -> torch.Tensor:
    """The hidden states of block inputs (args[0], or kwargs["hidden_states"])."""
    args, kwargs = inputs
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(inputs: BlockInputs, hidden: torch.Tensor | None) -> BlockInputs:
    """The same block inputs with the hidden states replaced (args[0], or kwargs["hidden_states"])."""
    args, kwargs = inputs
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def prune_block(model: nn.Module, block: nn.Module, names: list[str], inputs: list[BlockInputs],
                rule: Rule, world: World = SINGLE) -> list[BlockInputs]:
    """Score all of the block's target Linears from one pass over every sample, prune them, run the pruned block
    again and return its outputs as the next block's inputs."""
    with input_norms(model, names) as norms:
        for args, kwargs in inputs:
            block(*args, **kwargs)
    _prune_scored(model, names, rule, norms, world)
    return [_with_hidden((args, kwargs), _hidden(block(*args, **kwargs))) for args, kwargs in inputs]


def wanda_prune(model: nn.Module, targets: list[str], batches: list[Batch], rule: Rule,
                world: World = SINGLE) -> None:
    """Prune `targets` in place by Wanda scores over the calibration `batches` (each a model's keyword inputs):
    block by block, each block's pruned outputs feeding the next; targets outside every block (BERT's pooler) at the
    end, from one full forward per sample through the pruned blocks. Under torchrun `batches` are this rank's share;
    the norms are summed over the ranks before each pruning."""
    model.eval()
    done: set[str] = set()
    with torch.no_grad():
        found = find_blocks(model, targets)
        if found is not None:
            prefix, blocks = found
            captured = capture_block_inputs(model, list(blocks), batches)
            inputs = captured[0]
            for i, block in enumerate(blocks):
                names = [t for t in targets if inside(t, [f"{prefix}.{i}"])]
                outputs = prune_block(model, block, names, inputs, rule, world)
                done.update(names)
                if i + 1 < len(blocks):  # the next block's own inputs, with the pruned block's hidden states
                    inputs = [_with_hidden(own, _hidden_of(out)) for own, out in zip(captured[i + 1], outputs)]
        rest = [t for t in targets if t not in done]
        if rest:
            with input_norms(model, rest) as norms:
                for batch in batches:
                    model(**batch)
            _prune_scored(model, rest, rule, norms, world)


def magnitude_prune(model: nn.Module, targets: list[str], rule: Rule) -> None:
    """Prune `targets` in place by |W| (no data)."""
    for name in targets:
        prune_weight(weight_of(model, name), rule)


def sparsity_report(model: nn.Module, targets: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """({module: shape, weights, zeros, sparsity}, totals), zeros counted as they are now (old ones included)."""
    modules: dict[str, Any] = {}
    for name in targets:
        w = weight_of(model, name)
        zeros = int(torch.count_nonzero(w == 0))
        modules[name] = {"shape": list(w.shape), "weights": w.numel(), "zeros": zeros, "sparsity": zeros / w.numel()}
    weights, zeros = sum(m["weights"] for m in modules.values()), sum(m["zeros"] for m in modules.values())
    return modules, {"weights": weights, "zeros": zeros, "sparsity": zeros / weights if weights else 0.0}


# ---------------------------------------------------------------------------------------------
# Sources: a recipe (model + calibration data) or a bare model


@dataclass
class Source:
    model: nn.Module
    tokenizer: Any
    base_model: str  # the model's name_or_path, as given
    heads: list[str]  # output heads `all-linear` leaves out
    recipe: Recipe | None = None  # when the source is one
    task: Any = None  # its Task (data loaded)


def is_recipe(source: str) -> bool:
    return Path(source).suffix in (".yaml", ".yml")


def model_inputs(model: nn.Module, batch: dict[str, torch.Tensor]) -> Batch:
    """The keys of a collated batch the model takes as inputs (no labels), and use_cache=False: a block run twice
    must not see the keys and values of its first run."""
    accepted = inspect.signature(model.forward).parameters
    inputs: Batch = {k: v for k, v in batch.items() if k in accepted and k != "labels"}
    if "use_cache" in accepted:
        inputs["use_cache"] = False
    return inputs


def calibration_batches(source: Source, samples: int, seed: int) -> tuple[list[Batch], dict[str, Any]]:
    """`samples` training examples of the recipe (seeded draw without replacement), each its own batch of one
    (no padding in the statistics), and the `calibration` block of sparsify.json."""
    recipe, task = source.recipe, source.task
    assert recipe is not None and task is not None
    data = task.encode(source.tokenizer, recipe.data.max_length).train
    if len(data) == 0:
        raise InputError(f"{source.base_model}: the recipe's training data has no examples to calibrate on")
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:samples]
    collated = [task.collate(data, [int(i)], source.tokenizer.pad_token_id) for i in order]
    tokens = sum(int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel() for b in collated)
    info = {"data": recipe.data.dataset or recipe.data.train_file, "fingerprint": task.fingerprint(),
            "samples": len(collated), "tokens": tokens, "seed": seed}
    return [model_inputs(source.model, b) for b in collated], info


def load_recipe_source(recipe: Recipe) -> Source:
    """The recipe's model (as training would load it, task head included) with its task's data loaded."""
    from sora_cli.models import load_model
    from sora_cli.tasks import get_task

    if recipe.model.quantization:
        raise InputError(f"model.quantization: sora sparsify prunes full-precision weights, not "
                         f"{recipe.model.quantization} codes; run it without model.quantization (override "
                         "model.quantization=null)")
    task = get_task(recipe.data)
    task.load_data()
    model, tokenizer = load_model(recipe.model, task)
    heads = select_heads(model, None, task.task_heads)
    return Source(model, tokenizer, recipe.model.name_or_path, heads, recipe, task)


def _model_class(config: Any) -> Any:
    """The class `config.architectures[0]` names (so every weight, heads included, round-trips); a config without
    one (a GGUF file's) gets AutoModelForCausalLM for a decoder type, else AutoModel."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    name = (getattr(config, "architectures", None) or [None])[0]
    if name is not None and hasattr(transformers, name):
        return getattr(transformers, name)
    causal = config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    return transformers.AutoModelForCausalLM if causal else transformers.AutoModel


def load_model_source(source: str) -> Source:
    """A bare model (local directory, hub id or packaged:NAME) as its own architecture class, and its tokenizer."""
    import transformers
    from transformers import AutoConfig, AutoTokenizer

    from sora_cli.models import PACKAGED_MODELS, resolve_model_path

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    path = resolve_model_path(source)
    packaged = PACKAGED_MODELS.get(source.removeprefix("packaged:")) if source.startswith("packaged:") else None
    common = {"gguf_file": packaged[2]} if packaged and packaged[2] else {}
    try:
        config = AutoConfig.from_pretrained(path, **common)
        tokenizer = AutoTokenizer.from_pretrained(path, **common)
        model = _model_class(config).from_pretrained(path, config=config, **common)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"SOURCE: could not load the model {source!r}: {first}") from None
    if common and getattr(model, "hf_quantizer", None) is not None:  # dequantised GGUF: let save_pretrained write it
        model.hf_quantizer.remove_quantization_config(model)
    return Source(model, tokenizer, source, heads=[])


def check_output(output: Path, protected: list[Path], force: bool) -> None:
    """Refuse an output that overlaps the source (its model directory, the recipe), or exists without --force."""
    out = output.resolve()
    for path in protected:
        p = path.resolve()
        if out == p or out.is_relative_to(p) or p.is_relative_to(out):
            raise InputError(f"--output: {output} overlaps the source {path}; write the sparse model elsewhere")
    if output.exists() and not force:
        raise InputError(f"--output: {output} already exists; choose another path or pass --force")


def _protected(source: str, recipe: Recipe | None) -> list[Path]:
    """The local paths the output must not touch: the recipe file and the model directory (if local)."""
    from sora_cli.models import resolve_model_path

    model_dir = Path(resolve_model_path(recipe.model.name_or_path if recipe else source))
    return ([Path(source)] if recipe else []) + ([model_dir] if model_dir.exists() else [])


# ---------------------------------------------------------------------------------------------
# The command


def sparsify(source: str, output: Path, method: str, sparsity: float | None = None, pattern: str | None = None,
             samples: int = 128, seed: int | None = None, targets: str = "all-linear",
             force: bool = False) -> dict[str, Any]:
    """`sora sparsify`: prune the target Linears of `source` (a recipe or a model) and write the sparse model with
    its tokenizer and `sparsify.json` to `output`, atomically. Returns that report. Under torchrun the ranks share
    Wanda's calibration samples (every world.size-th each) and rank 0 writes."""
    world = current()
    rule = make_rule(method, sparsity, pattern)
    target_modules = parse_targets(targets)
    if samples < 1:
        raise InputError(f"--samples: must be a positive integer, got {samples}")
    if rule.method == "wanda" and samples < world.size:  # magnitude pruning reads no samples
        raise InputError(f"--samples: {samples} is fewer than the {world.size} processes sharing them; give at "
                         f"least {world.size}")
    if rule.method == "wanda" and not is_recipe(source):
        raise InputError(f"--method wanda: needs calibration data, and {source!r} is a model; pass a recipe whose "
                         "data section gives it (e.g. recipes/quickstart-causal.yaml), or use --method magnitude")
    recipe = load_recipe(source) if is_recipe(source) else None
    on_main(check_output, output, _protected(source, recipe), force, world=world)
    src = load_recipe_source(recipe) if recipe else load_model_source(source)
    names = targets_of(src.model, target_modules, src.heads)
    check_pattern(src.model, names, rule)
    calibration = None
    if rule.method == "wanda":
        assert recipe is not None  # wanda without a recipe was refused above
        batches, calibration = calibration_batches(src, samples, recipe.train.seed if seed is None else seed)
        if len(batches) < world.size:
            raise InputError(f"--samples: the recipe's data has only {len(batches)} examples to share among "
                             f"{world.size} processes; launch at most {len(batches)}")
        wanda_prune(src.model, names, batches[world.rank::world.size], rule, world)
    else:
        magnitude_prune(src.model, names, rule)
    modules, total = sparsity_report(src.model, names)
    report = {"sora_version": __version__, "source": source, "base_model": src.base_model, "method": rule.method,
              **rule.meta(), "targets": names, "calibration": calibration, "modules": modules, "total": total}
    model: Any = src.model  # a transformers PreTrainedModel
    if not world.main:
        return report
    with atomic_dir(output) as tmp:
        model.save_pretrained(tmp)
        src.tokenizer.save_pretrained(tmp)
        write_json(tmp / SPARSIFY_REPORT, report)
    return report

