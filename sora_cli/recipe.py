"""Recipes: frozen, typed dataclasses. YAML is only their serialisation.

YAML keys = dataclass field names = override paths (`train.lr=5e-4`). `load_recipe`
validates at the edge and reports every problem at once, each with its field path.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from sora_cli.errors import InputError, RecipeError

GLUE_TASKS = ("cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte")
_REQUIRED: Any = dataclasses.MISSING

# Field checks, by name in `metadata={"check": ...}`: (predicate, what "must be").
_CHECKS: dict[str, tuple[typing.Callable[[Any], bool], str]] = {
    "positive": (lambda v: v > 0, "must be positive"),
    "non_negative": (lambda v: v >= 0, "must be >= 0"),
    "probability": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
    "unit_interval": (lambda v: 0 < v <= 1, "must be in (0, 1]"),
    "seed": (lambda v: 0 <= v < 2**32, "must be in 0 .. 2**32 - 1"),
}


def _check(name: str) -> dict[str, str]:
    return {"check": name}


@dataclass(frozen=True)
class ModelConfig:
    name_or_path: str = _REQUIRED  # local dir, hub id, or `packaged:all-MiniLM-L6-v2`
    revision: str | None = None
    dtype: Literal["float32", "bfloat16", "float16", "float64", "auto"] = "float32"  # float64: exact numerics checks
    gguf_file: str | None = None
    trust_remote_code: bool = False
    ignore_mismatched_sizes: bool = False  # let a task head of another size be re-initialised
    # A quantized base under the adapters (QLoRA, README "Big models"), through bitsandbytes: 4-bit nf4 or fp4, or
    # 8-bit int8. The adapters, norms and output head stay in full precision. null: every weight in model.dtype
    quantization: Literal["nf4", "fp4", "int8"] | None = None
    double_quantization: bool | None = None  # 4-bit: quantize the block scales too (QLoRA's); null: true
    # 4-bit matmuls (W0 x and the adapter product); null: bfloat16 under train.precision bf16, else float32
    compute_dtype: Literal["float32", "bfloat16", "float16"] | None = None
    # A BERT-style classifier's sentence summary: cls, the first token's state (transformers' heads), or mean, the
    # masked mean of the token states, as sentence-transformers checkpoints were trained (sora_cli/pooling.py)
    pooling: Literal["cls", "mean"] = "cls"


@dataclass(frozen=True)
class TargetConfig:
    """SoRA to a budget (README "SoRA to a budget"): what survives, in one unit, and when it must be reached."""

    ranks: int | None = field(default=None, metadata=_check("positive"))  # surviving ranks over all modules
    fraction: float | None = field(default=None, metadata=_check("unit_interval"))  # of the initial ranks (r · n)
    params: int | None = field(default=None, metadata=_check("positive"))  # inference parameters, as inspect counts
    reach_at: float = field(default=0.8, metadata=_check("positive"))  # a step, or a fraction of training below 1

    @property
    def unit(self) -> str:
        return "params" if self.params is not None else "ranks"


@dataclass(frozen=True)
class AdapterConfig:
    method: Literal["sora", "lora", "roselora", "lors"] = "sora"
    r: int = field(default=8, metadata=_check("positive"))
    alpha: float = field(default=8.0, metadata=_check("positive"))  # s = alpha / r (PEFT's default alpha)
    dropout: float = field(default=0.0, metadata=_check("probability"))
    target_modules: str | tuple[str, ...] = "all-linear"
    modules_to_save: tuple[str, ...] | None = None  # None: the task head and what the checkpoint lacks
    use_rslora: bool = False  # s = alpha / √r (rank-stabilised, PEFT's name; the LoRS reference), every method
    # Train on W_eff = (W0 + s·B·A) ⊙ (W0 ≠ 0), so a sparse base's zeros stay zero, through training and merge
    # (README "LoRS"). Any method (SoRA: its gates inside the mask); method lors always; None = false
    keep_sparsity: bool | None = None
    grad: Literal["approx", "exact"] | None = None  # keep_sparsity's adapter gradients; None: approx (the reference)
    # SoRA only (None = the method's default; an error for other methods)
    gate_init: Literal["normal", "ones"] | None = None
    sparse_lambda: float | None = field(default=None, metadata=_check("non_negative"))
    threshold: Literal["scaled", "fixed", "reference"] | None = None
    gate_lr: float | None = field(default=None, metadata=_check("positive"))  # None: train.lr
    l1_loss_weight: float | None = field(default=None, metadata=_check("non_negative"))
    target: TargetConfig | None = None  # a budget: the controller sets λ (sparse_lambda stays unset)
    # RoseLoRA only (see README "RoseLoRA"); None = the method's default
    density: float | None = field(default=None, metadata=_check("unit_interval"))  # τ: kept fraction per row / col
    sparsify_start: float | None = field(default=None, metadata=_check("non_negative"))  # t_i: step, or fraction < 1
    sparsify_end: float | None = field(default=None, metadata=_check("non_negative"))  # t_f: density reaches τ
    importance_beta: float | None = field(default=None, metadata=_check("probability"))  # EMA β of |p ⊙ ∇p|
    mask_rule: Literal["budget", "reference"] | None = None
    clamp: float | None = field(default=None, metadata=_check("positive"))  # clip A, B to ±clamp when masking
    # LoRS only: A from the top-r right singular vectors of the averaged base-weight gradient (LoRA-GA), or kaiming
    init: Literal["zeros", "gradient"] | None = None  # zeros: B = 0 and A kaiming, as LoRA (the default)
    init_samples: int | None = field(default=None, metadata=_check("positive"))  # training examples it averages


SORA_DEFAULTS: dict[str, Any] = {
    "gate_init": "normal",
    "sparse_lambda": 0.1,
    "threshold": "scaled",
    "l1_loss_weight": 0.0,
}
ROSELORA_DEFAULTS: dict[str, Any] = {  # clamp's default is None (off)
    "density": 0.05,
    "sparsify_start": 0.1,
    "sparsify_end": 0.8,
    "importance_beta": 0.8,
    "mask_rule": "budget",
}
LORS_DEFAULTS: dict[str, Any] = {"init": "zeros", "init_samples": 128}
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {"sora": SORA_DEFAULTS, "roselora": ROSELORA_DEFAULTS,
                                              "lors": {**LORS_DEFAULTS, "keep_sparsity": True}}
METHOD_FIELDS: dict[str, tuple[str, ...]] = {  # settings that only one method reads
    "sora": (*SORA_DEFAULTS, "gate_lr", "target"),
    "roselora": (*ROSELORA_DEFAULTS, "clamp"),
    "lors": tuple(LORS_DEFAULTS),
}


@dataclass(frozen=True)
class DataConfig:
    dataset: str | None = None  # `packaged:rotten_tomatoes`, or a hub id
    config_name: str | None = None
    train_file: str | None = None
    validation_file: str | None = None
    test_file: str | None = None
    task: Literal[GLUE_TASKS] | None = None  # type: ignore[valid-type]
    task_type: Literal["classification", "regression", "causal_lm", "edit"] | None = None
    text_fields: tuple[str, ...] | None = None  # one field, or a pair
    label_field: str = "label"
    num_labels: int | None = field(default=None, metadata=_check("positive"))
    split: tuple[float, ...] = (0.8, 0.1, 0.1)  # train/dev/test fractions when only train data is given
    split_seed: int = field(default=0, metadata=_check("seed"))
    # glue: GLUE's validation is dev (its test labels are hidden); sora: the SoRA paper's dev/test (data.task only;
    # the paper's with split_seed 42)
    glue_split: Literal["glue", "sora"] = "glue"
    max_length: int = field(default=128, metadata=_check("positive"))
    max_train_samples: int | None = field(default=None, metadata=_check("positive"))
    max_eval_samples: int | None = field(default=None, metadata=_check("positive"))
    # causal_lm only (see README "Causal LMs")
    format: Literal["auto", "alpaca", "prompt_completion", "chat", "text"] = "auto"
    prompt_field: str = "prompt"  # prompt_completion's column names
    completion_field: str = "completion"
    chat_template: bool = False  # render alpaca / prompt_completion with the tokenizer's chat template
    train_on_prompt: bool = False  # loss on the prompt too (default: on the response only)
    choices: tuple[str, ...] | None = None  # a fixed answer set: also score accuracy by the choices' likelihoods
    max_new_tokens: int = field(default=16, metadata=_check("positive"))  # greedy generation for exact match
    exact_match: bool = True  # generate and score exact match (off for long free-form answers)
    packing: bool = False  # training rows of several examples, up to max_length tokens (evaluation stays unpacked)


@dataclass(frozen=True)
class TrainConfig:
    output_dir: str | None = None  # None: runs/<recipe file stem>
    lr: float = field(default=5e-4, metadata=_check("positive"))
    batch_size: int = field(default=16, metadata=_check("positive"))
    eval_batch_size: int = field(default=64, metadata=_check("positive"))
    grad_accum: int = field(default=1, metadata=_check("positive"))
    max_steps: int | None = field(default=None, metadata=_check("positive"))
    epochs: float | None = field(default=None, metadata=_check("positive"))  # None: 3, unless max_steps
    warmup_ratio: float = field(default=0.0, metadata=_check("probability"))
    warmup_steps: int | None = field(default=None, metadata=_check("non_negative"))
    lr_scheduler: Literal["linear", "cosine", "constant"] = "linear"
    weight_decay: float = field(default=0.0, metadata=_check("non_negative"))
    max_grad_norm: float | None = field(default=1.0, metadata=_check("positive"))
    log_every: int = field(default=10, metadata=_check("positive"))
    eval_every: int | None = field(default=None, metadata=_check("positive"))
    save_every: int | None = field(default=None, metadata=_check("positive"))
    keep_last: int = field(default=2, metadata=_check("positive"))
    patience: int | None = field(default=None, metadata=_check("positive"))
    metric_for_best: str | None = None  # None: the task's metric
    seed: int = field(default=42, metadata=_check("seed"))
    precision: Literal["fp32", "bf16"] = "fp32"
    device: str = "auto"
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% more time
    compile: bool = False  # torch.compile each repeated block for training (evaluation stays eager)
    report_to: tuple[Literal["tensorboard"], ...] = ()  # also log to TensorBoard (<output_dir>/tensorboard)
    # under torchrun: auto / ddp, every process holds the whole model; fsdp, FSDP2 shards the frozen base
    strategy: Literal["auto", "ddp", "fsdp"] = "auto"
    fsdp_cpu_offload: bool = False  # fsdp: keep the base's shards in CPU memory between uses (CUDA)
    # a step whose loss or gradient is not finite is never applied; stop: end the run there; skip: drop that step's
    # update and go on, ending the run after max_nonfinite such steps in a row
    on_nonfinite: Literal["stop", "skip"] = "stop"
    max_nonfinite: int = field(default=5, metadata=_check("positive"))
    # a collapse (the training loss back at the chance level after it was clearly below it, collapse.py): warn, or
    # stop with the last checkpoint from before it as --resume's
    on_collapse: Literal["warn", "stop"] = "warn"


@dataclass(frozen=True)
class ScheduleConfig:
    """The sparsifying scheduler (`sora schedule`): stage thresholds λ_0 < λ_1 < … < λ_K, or stage budgets."""

    thresholds: tuple[float, ...] | None = None  # explicit λ per stage; or start / stop / num / spacing
    # or budgets: falling fractions of the initial ranks, one per stage (each stage trains to its adapter.target)
    budgets: tuple[float, ...] | None = None
    reach_at: float | None = field(default=None, metadata=_check("positive"))  # budgets: within each stage; 0.8
    start: float | None = field(default=None, metadata=_check("non_negative"))
    stop: float | None = field(default=None, metadata=_check("positive"))
    num: int | None = field(default=None, metadata=_check("positive"))
    spacing: Literal["linear", "log", "exp"] = "linear"
    steps_per_stage: int | None = field(default=None, metadata=_check("positive"))
    epochs_per_stage: float | None = field(default=None, metadata=_check("positive"))
    lr_reset: bool = True  # false: later stages keep the decayed LR (the reference code)
    # true: stage 1 starts from stage 0's best adapter (with stage 0's last optimizer state), as the reference code
    # does; false: from stage 0's last. Later stages always continue from the stage before.
    from_best: bool = False
    memorization_samples: int = field(default=1000, metadata=_check("positive"))


@dataclass(frozen=True)
class EditConfig:
    """Knowledge editing (data.task_type: edit): how the requests are applied and scored (README "Knowledge
    editing"). train.max_steps counts passes over the requests being edited (EasyEdit's num_steps), each pass
    one optimizer step per train.batch_size requests; data.max_train_samples takes the first N requests."""

    mode: Literal["single", "batch", "sequential"] = "single"  # single: a fresh adapter per edit (EasyEdit)
    stop_loss: float | None = field(default=None, metadata=_check("positive"))  # end an edit once below it ...
    stop_after: int = field(default=0, metadata=_check("non_negative"))  # ... from this pass on (RoseLoRA: t_f)
    exact_match: bool = False  # also generate greedily from each prompt and score exact match


CAUSAL_FIELDS = ("format", "prompt_field", "completion_field", "chat_template", "train_on_prompt", "choices",
                 "max_new_tokens", "exact_match", "packing")

# Names users know from transformers / PEFT, accepted as synonyms of a field.
_ALIASES: dict[str, dict[str, str]] = {"train": {"learning_rate": "lr"}, "adapter": {"lora_alpha": "alpha"}}


@dataclass(frozen=True)
class Recipe:
    model: ModelConfig
    adapter: AdapterConfig
    data: DataConfig
    train: TrainConfig
    schedule: ScheduleConfig | None = None  # only `sora schedule` needs it
    edit: EditConfig | None = None  # only knowledge editing (data.task_type: edit) reads it

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (lists, not tuples) that YAML serialises and `load_recipe` reads back."""
        data = _plain(dataclasses.asdict(self))
        for optional in ("schedule", "edit"):
            if data[optional] is None:
                del data[optional]
        return data


SECTIONS: dict[str, type] = {"model": ModelConfig, "adapter": AdapterConfig, "data": DataConfig, "train": TrainConfig,
                             "schedule": ScheduleConfig, "edit": EditConfig}
OPTIONAL_SECTIONS = ("schedule", "edit")


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------------
# Loading


def load_recipe(path: str | Path, overrides: typing.Sequence[str] = ()) -> Recipe:
    """Read, override and validate a recipe; raise RecipeError listing every problem."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: recipe file not found; pass the path of a YAML recipe (see recipes/)")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise InputError(f"{path}: not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    if raw is None and not overrides:
        raise InputError(f"{path}: the recipe is empty; it needs at least model.name_or_path and data (see recipes/)")
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RecipeError(str(path), [f"top level: expected a mapping of sections {list(SECTIONS)}, got {_show(raw)}"])
    problems: list[str] = []
    apply_overrides(raw, overrides, problems)
    recipe = recipe_from_dict(raw, problems, default_output=f"runs/{path.stem}")
    if problems or recipe is None:
        raise RecipeError(str(path), problems or ["model: required section (at least model.name_or_path)"])
    return recipe


@dataclass(frozen=True)
class _Override:
    """An override's value as YAML read it, and its text: a string field takes the text (revision=1.0)."""

    text: str
    value: Any


def apply_overrides(raw: dict[str, Any], overrides: typing.Sequence[str], problems: list[str]) -> None:
    """`section.field=value` (value read as YAML: 3, 1e-3, true, null, [a, b]) into `raw`, in place."""
    for item in overrides:
        key, sep, text = item.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) not in (2, 3) or not all(parts):
            problems.append(f"override {item!r}: expected section.field=value, e.g. train.lr=5e-4 (or "
                            "section.field.key=value, e.g. adapter.target.ranks=64)")
            continue
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            value = text
        if raw.get(parts[0]) is None:  # absent, or a section left empty in the YAML
            raw[parts[0]] = {}
        section = raw[parts[0]]
        if len(parts) == 3:  # a field that is a mapping itself (adapter.target)
            if isinstance(section, dict) and section.get(parts[1]) is None:
                section[parts[1]] = {}
            section = section.get(parts[1]) if isinstance(section, dict) else section
        if not isinstance(section, dict):
            problems.append(f"{'.'.join(parts[:-1])}: expected a mapping, got {_show(section)}")
            continue
        section[parts[-1]] = _Override(text.strip(), value)


def recipe_from_dict(raw: dict[str, Any], problems: list[str], default_output: str = "runs/run") -> Recipe | None:
    """Build a Recipe from plain data, appending every problem (with its field path) to `problems`."""
    for key in raw:
        if key not in SECTIONS:
            problems.append(f"{key}: unknown section{_did_you_mean(str(key), SECTIONS)}")
    if "model" not in raw:
        problems.append("model: required section (at least model.name_or_path)")
    built: dict[str, Any] = {}
    for name, cls in SECTIONS.items():
        section = raw.get(name) or {}
        if not isinstance(section, dict):
            problems.append(f"{name}: expected a mapping of fields, got {_show(section)}")
            section = {}
        built[name] = _build_section(name, cls, dict(section), problems, present=name in raw) \
            if name not in OPTIONAL_SECTIONS or name in raw else None
    return _resolve(built, problems, default_output)


def _build_section(name: str, cls: type, data: dict[str, Any], problems: list[str], present: bool) -> Any:
    spelled: dict[str, str] = {}  # field -> the key the user wrote (an alias is named back as written)
    for alias, target in _ALIASES.get(name, {}).items():
        if alias in data:
            if target in data:
                problems.append(f"{name}.{alias}: same field as {name}.{target}; give only one of them")
            data[target] = data.pop(alias)
            spelled[target] = alias
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    known = list(fields) + list(_ALIASES.get(name, {}))
    kwargs: dict[str, Any] = {}
    ok = True
    for key, value in data.items():
        if key not in fields:
            problems.append(f"{name}.{key}: unknown field{_did_you_mean(str(key), known)}")
            ok = False
            continue
        where = f"{name}.{spelled.get(key, key)}"
        nested = _section_type(hints[key])
        if nested is not None:  # a mapping of its own fields (adapter.target), reported by their full paths
            ok = _build_nested(where, nested, value, problems, kwargs, key) and ok
            continue
        try:
            value = _coerce(value, hints[key])
        except _Invalid as e:
            problems.append(f"{where}: {e}")
            ok = False
            continue
        check = fields[key].metadata.get("check")
        if check and value is not None:
            predicate, must = _CHECKS[check]
            if not predicate(value):
                problems.append(f"{where}: {must}, got {_show(value)}")
                ok = False
                continue
        kwargs[key] = value
    for key, f in fields.items():
        if key not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            if key not in data and present:  # an absent section is reported once, by the caller
                problems.append(f"{name}.{key}: required")
            ok = False
    return cls(**kwargs) if ok else None


def _section_type(hint: Any) -> type | None:
    """The dataclass a field holds (`X | None` included), or None for a plain field."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (Union, types.UnionType) else (hint,)
    return next((o for o in options if dataclasses.is_dataclass(o) and isinstance(o, type)), None)


def _build_nested(where: str, cls: type, value: Any, problems: list[str], kwargs: dict[str, Any], key: str) -> bool:
    """kwargs[key] = cls built from the mapping `value` (null: None); False when a problem was reported."""
    if isinstance(value, _Override):
        value = value.value
    if value is None:
        kwargs[key] = None
        return True
    if not isinstance(value, dict):
        problems.append(f"{where}: expected a mapping of fields ({', '.join(f.name for f in dataclasses.fields(cls))})"
                        f", got {_show(value)}")
        return False
    built = _build_section(where, cls, dict(value), problems, present=True)
    kwargs[key] = built
    return built is not None


class _Invalid(ValueError):
    pass


def _coerce(value: Any, hint: Any) -> Any:
    """Check `value` against a type hint and convert what YAML leaves loose (1e-3 is a string in YAML 1.1)."""
    if isinstance(value, _Override):
        if hint is str and value.text and value.value is not None and not isinstance(value.value, (list, dict)):
            return value.text
        if typing.get_origin(hint) not in (Union, types.UnionType):
            value = value.value
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        options = typing.get_args(hint)
        if (value.value if isinstance(value, _Override) else value) is None:
            if type(None) in options:
                return None
            raise _Invalid(f"must not be null; expected {_describe(hint)}")
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option)
            except _Invalid as e:
                errors.append(str(e))
        raise _Invalid(errors[0] if len(errors) == 1 else f"expected {_describe(hint)}, got {_show(value)}")
    if origin is Literal:
        choices = typing.get_args(hint)
        if value in choices and not isinstance(value, bool):
            return value
        raise _Invalid(f"expected one of {', '.join(map(str, choices))}, got {_show(value)}"
                       + _did_you_mean(str(value), [str(c) for c in choices]))
    if origin is tuple:
        (item,) = typing.get_args(hint)[:1]
        if isinstance(value, (str, int, float)) and not isinstance(value, bool) and item is str:
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise _Invalid(f"expected a list, got {_show(value)}")
        return tuple(_coerce(v, item) for v in value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise _Invalid(f"expected true or false, got {_show(value)}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        number = _float(value)
        if number is not None and number.is_integer():
            return int(number)
        raise _Invalid(f"expected an integer, got {_show(value)}")
    if hint is float:
        number = _float(value)
        if number is not None:
            return number
        raise _Invalid(f"expected a finite number, got {_show(value)}")
    if hint is str:
        if isinstance(value, str) and value:
            return value
        raise _Invalid(f"expected a non-empty string, got {_show(value)}")
    raise TypeError(f"unsupported recipe type {hint}")  # a bug in this file, not user input


def _float(value: Any) -> float | None:
    """A finite number from YAML: ints, floats, and strings such as '1e-3' (not bools, inf or nan)."""
    number = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return None
    return number if number is not None and math.isfinite(number) else None


def _describe(hint: Any) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false", type(None): "null"}
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(hint))
    if origin is tuple:
        return "a list"
    if origin is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(hint)))
    return names.get(hint, str(hint))


def _show(value: Any) -> str:
    if isinstance(value, _Override):
        value = value.value
    return "null" if value is None else repr(value) if isinstance(value, str) else str(value)


def _did_you_mean(key: str, known: typing.Iterable[str]) -> str:
    known = list(known)
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6) or [k for k in known if key.startswith(k)][:1]
    if close:
        return f"; did you mean '{close[0]}'?"
    return f"; known: {', '.join(known)}"


# ---------------------------------------------------------------------------------------------
# Cross-field rules and method defaults


def with_method_defaults(a: AdapterConfig) -> AdapterConfig:
    """The adapter config with every unset setting of its method at its default (METHOD_DEFAULTS, the one source),
    and keep_sparsity's own: off, else with the approx gradient."""
    defaults = METHOD_DEFAULTS.get(a.method, {})
    if a.target is not None:  # the budget controller sets λ itself
        defaults = {k: v for k, v in defaults.items() if k != "sparse_lambda"}
    a = dataclasses.replace(a, **{k: v for k, v in defaults.items() if getattr(a, k) is None})
    keep = bool(a.keep_sparsity)
    return dataclasses.replace(a, keep_sparsity=keep, grad=(a.grad or "approx") if keep else a.grad)


def _resolve(built: dict[str, Any], problems: list[str], default_output: str) -> Recipe | None:
    """Rules across fields of one section, checked for every section that parsed; method defaults."""
    a = _resolve_adapter(built["adapter"], problems) if built["adapter"] is not None else None
    if built["model"] is not None:
        built["model"] = _resolve_model(built["model"], a, built["train"], problems)
    d = built["data"]
    if d is not None:
        _check_data(d, problems)
    t = _resolve_train(built["train"], problems, default_output) if built["train"] is not None else None
    if a is not None and t is not None and a.threshold == "reference":
        _check_reference(a, t, problems)
    sched = built["schedule"]
    if sched is not None:
        _check_schedule(sched, a, t, problems)
    edit = built["edit"]
    if d is not None and (edit is not None or d.task_type == "edit"):
        edit = _check_edit(edit, d, problems)
        if a is not None and a.target is not None:
            problems.append("adapter.target: knowledge editing trains a few passes per edit, too short to steer to "
                            "a budget; remove it (set adapter.sparse_lambda instead)")
    if t is not None and built["model"] is not None and a is not None:
        _check_strategy(t, built["model"], a, edit is not None, problems)
    if problems or built["model"] is None or a is None or d is None or t is None:
        return None  # a section that did not parse has its problems listed already
    return Recipe(model=built["model"], adapter=a, data=d, train=t, schedule=sched, edit=edit)


def _resolve_adapter(a: AdapterConfig, problems: list[str]) -> AdapterConfig:
    """The method's defaults filled in; settings of another method and bad target_modules reported."""
    for method, names in METHOD_FIELDS.items():
        for name in names if method != a.method else ():
            if getattr(a, name) is not None:
                problems.append(f"adapter.{name}: only applies to method {method}, not {a.method}; remove it")
    if a.method == "lors" and a.keep_sparsity is False:
        problems.append("adapter.keep_sparsity: method lors always keeps the base's zeros; remove the setting, or "
                        "use method lora for an update that may fill them")
    if a.method == "sora" and a.target is not None:
        _check_target(a, problems)
    a = with_method_defaults(a)
    if a.method == "roselora":
        _check_sparsify_window(a, problems)
    _check_keep_sparsity(a, problems)
    if isinstance(a.target_modules, tuple) and not a.target_modules:
        problems.append("adapter.target_modules: empty list; give module-name suffixes, a regex, or all-linear")
    if isinstance(a.target_modules, str) and a.target_modules != "all-linear":
        try:
            re.compile(a.target_modules)
        except re.error as e:
            problems.append(f"adapter.target_modules: '{a.target_modules}' is not a valid regex ({e}); "
                            "give a list of module-name suffixes, a regex, or all-linear")
    return a


def _resolve_model(m: ModelConfig, a: AdapterConfig | None, t: TrainConfig | None,
                   problems: list[str]) -> ModelConfig:
    """model.quantization's settings checked and filled in: double quantization on, the compute dtype from
    train.precision (bfloat16 under bf16, else float32)."""
    four_bit = m.quantization in ("nf4", "fp4")
    for name in ("double_quantization", "compute_dtype"):
        if getattr(m, name) is not None and not four_bit:
            problems.append(f"model.{name}: only applies to a 4-bit base (model.quantization: nf4 or fp4), got "
                            f"quantization {m.quantization or 'null'}; remove it")
    if m.quantization is None:
        return m
    if m.dtype == "float64":
        problems.append("model.dtype: float64 cannot hold a quantized base (bitsandbytes computes in 32 bits at "
                        "most); use float32, or remove model.quantization")
    if a is not None and a.keep_sparsity:
        problems.append(f"model.quantization: {m.quantization} cannot keep a sparse base's zero pattern exactly (the "
                        "quantized weights round small non-zero weights to zero, so (W0 ≠ 0) is no longer the pruned "
                        f"mask); remove model.quantization for adapter.method {a.method} / keep_sparsity")
    if not four_bit:
        return m
    precision: Literal["bfloat16", "float32"] = "bfloat16" if t is not None and t.precision == "bf16" else "float32"
    return dataclasses.replace(m, double_quantization=m.double_quantization is not False,
                               compute_dtype=m.compute_dtype or precision)


def _check_strategy(t: TrainConfig, m: ModelConfig, a: AdapterConfig, edit: bool, problems: list[str]) -> None:
    """What FSDP2 (train.strategy: fsdp) cannot shard yet: each refused with what to use instead."""
    if t.strategy != "fsdp":
        if t.fsdp_cpu_offload:
            problems.append(f"train.fsdp_cpu_offload: only applies to train.strategy: fsdp, not {t.strategy}; "
                            "remove it")
        return
    use = "; use train.strategy: ddp"
    if t.fsdp_cpu_offload and t.device == "cpu":
        problems.append("train.fsdp_cpu_offload: the run is on the CPU already (train.device: cpu); remove it")
    if a.keep_sparsity:
        problems.append(f"adapter.method: {a.method} with keep_sparsity needs each base weight whole (its zero mask "
                        f"and, for LoRS's gradient init, its whole gradient), which FSDP2 shards{use}")
    if m.quantization == "int8":
        problems.append("model.quantization: int8 under FSDP2: bitsandbytes' 8-bit weights keep their scales on the "
                        f"parameter, which sharding drops{use}, or quantization nf4")
    if edit:
        problems.append(f"train.strategy: fsdp, but knowledge editing gives each process its own requests{use}")


def _check_target(a: AdapterConfig, problems: list[str]) -> None:
    """One unit of budget; reach_at a step or a fraction of training; λ left to the controller. (What needs the
    model or the run's length, a budget above r · modules or reach_at past the end, SoRA.setup checks.)"""
    t = a.target
    assert t is not None
    given = [name for name in ("ranks", "fraction", "params") if getattr(t, name) is not None]
    if len(given) != 1:
        problems.append("adapter.target: give exactly one of ranks, fraction or params, got "
                        + (", ".join(given) if given else "none"))
    if t.reach_at >= 1 and not float(t.reach_at).is_integer():
        problems.append(f"adapter.target.reach_at: give a step (an integer) or a fraction of training below 1, "
                        f"got {t.reach_at}")
    if a.sparse_lambda is not None:
        problems.append("adapter.sparse_lambda: adapter.target sets λ itself (the budget controller); remove "
                        "sparse_lambda, or remove target to train with a fixed λ")


def _check_keep_sparsity(a: AdapterConfig, problems: list[str]) -> None:
    """grad belongs to keep_sparsity, whose folded update has no separate adapter path for dropout."""
    if not a.keep_sparsity and a.grad is not None:
        problems.append("adapter.grad: only applies with adapter.keep_sparsity: true (or method lors); remove it")
    if a.keep_sparsity and a.dropout:
        problems.append(f"adapter.dropout: {a.dropout} cannot apply with keep_sparsity, which folds B·A into the "
                        "masked weight (W0 + s·B·A) ⊙ M, leaving no separate adapter input to drop; set it to 0")


def _check_reference(a: AdapterConfig, t: TrainConfig, problems: list[str]) -> None:
    """`threshold: reference` promises the reference code's run: refuse what that code cannot express."""
    cannot = "the reference code (threshold: reference) cannot express it"
    if t.lr_scheduler != "linear":
        problems.append(f"train.lr_scheduler: {t.lr_scheduler}, but {cannot} (its schedule is linear with warm-up); "
                        "use linear")
    for name in ("keep_sparsity", "use_rslora"):
        if getattr(a, name):
            problems.append(f"adapter.{name}: true, but {cannot}; remove it, or choose threshold scaled or fixed")


def _check_sparsify_window(a: AdapterConfig, problems: list[str]) -> None:
    """t_i and t_f: each an integer step or a fraction of training in (0, 1); t_i before t_f when both are alike."""
    for name in ("sparsify_start", "sparsify_end"):
        value = getattr(a, name)
        if value >= 1 and not float(value).is_integer():
            problems.append(f"adapter.{name}: give a step (an integer) or a fraction of training below 1, "
                            f"got {value}")
    start, end = a.sparsify_start or 0.0, a.sparsify_end or 0.0
    if (start < 1) == (end < 1) and end <= start:
        problems.append(f"adapter.sparsify_end: must come after adapter.sparsify_start ({start}), got {end}")


def _check_data(d: DataConfig, problems: list[str]) -> None:
    """A data source, one of each pair of exclusive fields, settings of another task type."""
    if d.dataset is None and d.train_file is None and d.task is None:
        problems.append("data: give data.dataset (packaged:rotten_tomatoes or a hub id), data.train_file, "
                        "or data.task")
    if d.dataset is not None and d.train_file is not None:
        problems.append("data.train_file: give either data.dataset or data files, not both")
    if d.train_file is None and (d.validation_file or d.test_file):
        problems.append("data.train_file: required when data.validation_file or data.test_file is given")
    if d.text_fields is not None and len(d.text_fields) not in (1, 2):
        problems.append(f"data.text_fields: expected one field or a pair, got {len(d.text_fields)}")
    if d.task_type != "causal_lm":
        defaults = DataConfig()
        for name in CAUSAL_FIELDS:  # an edit task generates too (edit.exact_match)
            if getattr(d, name) != getattr(defaults, name) and not (d.task_type == "edit" and name == "max_new_tokens"):
                problems.append(f"data.{name}: only applies to data.task_type: causal_lm; remove it or set the "
                                "task type")
    elif d.choices is not None and (len(d.choices) < 2 or len(set(d.choices)) != len(d.choices)):
        problems.append(f"data.choices: expected at least two different answers, got {list(d.choices)}")
    if d.task_type == "regression" and d.num_labels not in (None, 1):
        problems.append(f"data.num_labels: a regression task has 1 output, got {d.num_labels}")
    if d.glue_split == "sora" and d.task is None:
        problems.append("data.glue_split: sora is the SoRA paper's split of a GLUE task; set data.task too, or "
                        "remove it")
    if d.glue_split == "sora" and d.test_file is not None:
        problems.append("data.test_file: glue_split sora cuts its own test split from GLUE's data; remove "
                        "data.test_file, or use glue_split: glue")
    if len(d.split) not in (2, 3) or not all(x > 0 for x in d.split) or abs(sum(d.split) - 1) > 1e-6:
        problems.append("data.split: expected 2 or 3 positive fractions (train, dev[, test]) that sum to 1, "
                        f"got {list(d.split)}")


def _check_edit(edit: EditConfig | None, d: DataConfig, problems: list[str]) -> EditConfig | None:
    """The edit section belongs to edit tasks (which get its defaults when it is absent)."""
    if d.task_type != "edit":
        problems.append("edit: only applies to data.task_type: edit; remove the section or set the task type")
        return edit
    if d.dataset is not None and d.dataset != "packaged:country-edits":
        problems.append(f"data.dataset: an edit task reads packaged:country-edits or data.train_file (EasyEdit, "
                        f"ZsRE or CounterFact JSON), got {d.dataset!r}")
    if d.validation_file or d.test_file:
        problems.append("data.validation_file: an edit task scores the edited requests themselves; give only "
                        "data.train_file")
    return edit or EditConfig()


def _resolve_train(t: TrainConfig, problems: list[str], default_output: str) -> TrainConfig:
    """Exclusive fields reported; epochs (3) and output_dir (runs/<recipe name>) filled in when absent."""
    if t.warmup_steps is not None and t.warmup_ratio:
        problems.append("train.warmup_steps: give either train.warmup_steps or train.warmup_ratio, not both")
    if t.device != "auto" and not (t.device == "cpu" or t.device.startswith("cuda")):
        problems.append(f"train.device: expected auto, cpu, cuda or cuda:N, got {t.device!r}")
    if t.max_steps is not None and t.epochs is not None:
        problems.append("train.epochs: give either train.max_steps or train.epochs, not both")
    if t.max_steps is None and t.epochs is None:
        t = dataclasses.replace(t, epochs=3.0)
    if t.output_dir is None:
        t = dataclasses.replace(t, output_dir=default_output)
    return t


def _check_schedule(sched: ScheduleConfig, a: AdapterConfig | None, t: TrainConfig | None,
                    problems: list[str]) -> None:
    """Thresholds given one way, rising (or budgets, falling); a stage length; an LR that can still move the
    gates."""
    given = [sched.start is not None, sched.stop is not None, sched.num is not None]
    if a is not None and a.target is not None:
        problems.append("adapter.target: a schedule sets each stage's budget (schedule.budgets); remove adapter.target")
    if sched.budgets is None and sched.reach_at is not None:
        problems.append("schedule.reach_at: only applies to schedule.budgets; remove it")
    if sched.budgets is not None:
        _check_budget_stages(sched, given, problems)
    elif sched.thresholds is not None:
        if any(given):
            problems.append("schedule.thresholds: give either schedule.thresholds or start/stop/num, not both")
        values = sched.thresholds
        if not values or any(v < 0 for v in values) or any(b <= a for a, b in zip(values, values[1:])):
            problems.append(f"schedule.thresholds: expected rising non-negative values, got {list(values)}")
    elif not all(given):
        problems.append("schedule: give schedule.thresholds, or schedule.start, stop and num, or schedule.budgets")
    elif sched.stop is not None and sched.start is not None and sched.stop <= sched.start:
        problems.append(f"schedule.stop: must be above schedule.start ({sched.start}), got {sched.stop}")
    elif sched.spacing == "log" and sched.start == 0:
        problems.append("schedule.start: log spacing needs a start above 0")
    if sched.steps_per_stage is not None and sched.epochs_per_stage is not None:
        problems.append("schedule.epochs_per_stage: give either steps_per_stage or epochs_per_stage, not both")
    if sched.steps_per_stage is None and sched.epochs_per_stage is None:
        problems.append("schedule: give schedule.steps_per_stage or schedule.epochs_per_stage")
    if sched.thresholds is None and sched.budgets is None and sched.num is not None and sched.num < 2:
        problems.append(f"schedule.num: a schedule needs at least 2 stages, got {sched.num}")
    if (not sched.lr_reset and a is not None and a.threshold == "scaled" and t is not None
            and t.lr_scheduler != "constant"):
        problems.append("schedule.lr_reset: false keeps stage 0's decayed learning rate (0), so the scaled "
                        "threshold λ·lr never moves a gate; set adapter.threshold: fixed or reference")


def _check_budget_stages(sched: ScheduleConfig, given: list[bool], problems: list[str]) -> None:
    """Budgets instead of thresholds: falling fractions in (0, 1]; reach_at a step or a fraction of a stage."""
    values = sched.budgets or ()
    if sched.thresholds is not None or any(given):
        problems.append("schedule.budgets: give either schedule.budgets or thresholds (or start/stop/num), not both")
    if not values or any(not 0 < v <= 1 for v in values) or any(b >= a for a, b in zip(values, values[1:])):
        problems.append(f"schedule.budgets: expected falling fractions of the initial ranks in (0, 1], e.g. "
                        f"[0.9, 0.75, 0.5, 0.25], got {list(values)}")
    if sched.reach_at is not None and sched.reach_at >= 1 and not float(sched.reach_at).is_integer():
        problems.append(f"schedule.reach_at: give a step (an integer) or a fraction of each stage below 1, got "
                        f"{sched.reach_at}")


def dump_recipe(recipe: Recipe, header: str = "") -> str:
    """YAML of a recipe; `header` (e.g. the command that runs it) becomes its opening comment."""
    comment = "".join(f"# {line}\n" for line in header.splitlines())
    return comment + yaml.safe_dump(recipe.to_dict(), sort_keys=False)


def recipe_diff(a: Recipe, b: Recipe) -> list[str]:
    """Field paths whose values differ between two recipes."""
    da, db = a.to_dict(), b.to_dict()
    sections = set(da) | set(db)
    return sorted(f"{s}.{k}" for s in sections for k in set(da.get(s, {})) | set(db.get(s, {}))
                  if da.get(s, {}).get(k) != db.get(s, {}).get(k))
