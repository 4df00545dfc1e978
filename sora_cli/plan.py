"""`sora plan`: the memory one training process needs, from the model's config and the recipe; no weights read.

    peak = weights + gradients + optimizer states + activations + the largest transient

Parameters are counted exactly on a model built on the `meta` device from its config (any architecture transformers
can build). Bytes follow the recipe: weights in model.dtype, or bitsandbytes' 4-bit / 8-bit layouts; trainable
tensors (adapters in float32, modules_to_save in the model's dtype) with one gradient and AdamW's two states each.
Activations follow a written model of what autograd saves for backward in a transformer block (README "sora plan"),
checked against `saved_tensors_hooks` measurements. Excluded: the runtime's own memory (CUDA context, the caching
allocator's reserve and fragmentation, Python and library code), the data loader, evaluation, and a method's own
running state (RoseLoRA's importance: one float32 per adapter entry, the size of the adapters).

Per process: data parallel gives each process the whole model and 1/N of the global batch. FSDP2 (sora_cli/fsdp.py)
keeps 1/N of every unit's weights (each block, and the root: everything outside the blocks) and gathers whole units
for compute: the root for the whole step, and at most two blocks at a time (the one computing and the one
prefetched); the adapters, their gradients and AdamW's states stay whole on every process (strategy.py says why).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sora_cli import quantization
from sora_cli.adapters import LoRALinear, method_class
from sora_cli.adapters.inject import inside, select_heads, select_targets
from sora_cli.errors import InputError
from sora_cli.models import PACKAGED_MODELS, resolve_model_path
from sora_cli.recipe import ModelConfig, Recipe
from sora_cli.tasks import GLUE, Task, get_task

BYTES = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2}
UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
BLOCKSIZE = 64  # bitsandbytes' 4-bit block: one absmax per 64 weights
NESTED_BLOCKSIZE = 256  # double quantization: one float32 scale per 256 absmaxes

# A block's linears by role, from their names inside the block (Llama, Mistral, Qwen, Gemma, Phi-3, OPT, BERT ...)
ATTN_OUT = re.compile(r"(^|\.)(o_proj|out_proj|wo|attention\.output\.dense|self_attn\.dense|attention\.dense|"
                      r"attn\.c_proj)$")
MLP_OUT = re.compile(r"(^|\.)(down_proj|output\.dense|fc2|w2|c_proj|dense_4h_to_h)$")


def parse_size(text: str) -> int:
    """Bytes of a size such as 24GiB, 80GB or 16000MiB (binary and decimal units, case-insensitive)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([A-Za-z]+)\s*", text)
    if not m or m.group(2).lower() not in UNITS or float(m.group(1)) <= 0:
        raise InputError(f"--memory: {text!r} is not a size; give a number and a unit, e.g. 24GiB, 80GB or 16000MiB")
    return int(float(m.group(1)) * UNITS[m.group(2).lower()])


# ---------------------------------------------------------------------------------------------
# The model, read once from its config


@dataclass(frozen=True)
class Linear:
    """One nn.Linear of the model, as the plan sees it."""

    name: str
    d_in: int
    d_out: int
    block: int | None  # its transformer block; None: outside the blocks (output head, pooler, classifier)
    role: str  # attn_in | attn_out | mlp_in | mlp_out (inside a block), head (outside)
    quantizable: bool  # bitsandbytes would quantize it (transformers' rule; the GGUF path's)
    adapted: bool


@dataclass(frozen=True)
class Facts:
    """What the plan needs of the model: dimensions, every linear, parameter counts by kind."""

    architecture: str
    causal: bool  # a causal LM: logits over the vocabulary at the labelled positions
    dtype: str  # the checkpoint's own dtype (for model.dtype auto)
    hidden: int
    q_dim: int  # heads x head_dim
    kv_dim: int
    heads: int
    head_dim: int
    intermediate: int
    vocab: int
    blocks: int
    gated: bool  # gate and up projections, their product into down (SwiGLU); else one activation
    rms: bool  # RMSNorm, pre-norm (Llama family); else LayerNorm after each sub-block (BERT family)
    rotary: bool
    hidden_dropout: bool
    attention_dropout: bool  # the math attention (probabilities saved) instead of the fused kernel
    linears: tuple[Linear, ...]
    base: int  # parameters, tied ones once
    norm_params: int  # in norm layers (float32 under quantization)
    block_params: tuple[int, ...]  # each block's parameters (FSDP2's units, besides the root)
    block_norms: tuple[int, ...]  # each block's parameters in norm layers
    buffer_bytes: int
    head_params: int  # the trained modules (modules_to_save)
    head_tensors: int


def read_config(cfg: ModelConfig) -> Any:
    """The model's transformers config: config.json, or a GGUF file's header. No weights are read."""
    from transformers import AutoConfig

    path = resolve_model_path(cfg.name_or_path)
    gguf = gguf_file(cfg)
    kwargs: dict[str, Any] = {"revision": cfg.revision, "trust_remote_code": cfg.trust_remote_code}
    if gguf:
        if importlib.util.find_spec("gguf") is None:
            raise InputError("model.gguf_file: reading a GGUF file needs the 'gguf' package: pip install gguf==0.19.0")
        kwargs["gguf_file"] = gguf
    try:
        return AutoConfig.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"model.name_or_path: could not read the config of {cfg.name_or_path!r}: {first}") from None


def gguf_file(cfg: ModelConfig) -> str | None:
    """The GGUF file the model loads from: model.gguf_file, or the packaged model's."""
    entry = PACKAGED_MODELS.get(cfg.name_or_path.removeprefix("packaged:"))
    packaged = entry[2] if entry is not None and cfg.name_or_path.startswith("packaged:") else None
    return cfg.gguf_file or packaged


def plan_task(recipe: Recipe) -> Task:
    """The recipe's task, configured without its data: a classifier's label count from data.num_labels, the GLUE
    preset's, else 2 (the head's size barely matters to memory)."""
    task = get_task(recipe.data)
    if hasattr(task, "num_labels") and task.num_labels is None:
        preset = GLUE.get(recipe.data.task) if recipe.data.task else None
        task.num_labels = recipe.data.num_labels or (preset.num_labels if preset else 2)
    return task


def meta_model(recipe: Recipe, config: Any, task: Task) -> nn.Module:
    """The task's model on the meta device: shapes and dtypes, no memory, no weights."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    task.configure(config)
    dtype = recipe.model.dtype if recipe.model.dtype != "auto" else config_dtype(config)
    try:
        with torch.device("meta"):
            model: nn.Module = task.auto_class().from_config(config, dtype=getattr(torch, dtype),
                                                             trust_remote_code=recipe.model.trust_remote_code)
    except (OSError, ValueError) as e:
        raise InputError(f"model.name_or_path: transformers cannot build {recipe.model.name_or_path!r} for "
                         f"{task.name}: {str(e).strip().splitlines()[0]}") from None
    return model


def config_dtype(config: Any) -> str:
    """The dtype a checkpoint was saved in (model.dtype auto), float32 when the config does not say."""
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    name = str(dtype).removeprefix("torch.")
    return name if name in BYTES else "float32"


def read_model(recipe: Recipe) -> Facts:
    """Everything `budget` needs, from the config alone: the meta model, its targets and heads, its dimensions."""
    config = read_config(recipe.model)
    task = plan_task(recipe)
    model = meta_model(recipe, config, task)
    heads = select_heads(model, recipe.adapter.modules_to_save, task.task_heads)
    targets = select_targets(model, recipe.adapter.target_modules, heads)
    clash = [t for t in targets if inside(t, heads)]
    if clash:
        raise InputError(f"adapter.target_modules: {clash[0]!r} is also in adapter.modules_to_save; "
                         "a module is either adapted or trained in full, not both")
    linears = linear_table(model, set(targets), recipe.model, list(task.task_heads))
    if recipe.model.quantization:
        coded = [lin.name for lin in linears if lin.quantizable and inside(lin.name, heads)]
        if coded:
            raise InputError(f"adapter.modules_to_save: {coded[0]} is quantized (model.quantization), so it cannot "
                             "be trained in full; leave it out of modules_to_save, or adapt it with target_modules")
    return facts_of(model, config, task, linears, heads)


def blocks_of(model: nn.Module) -> tuple[str, int]:
    """(name, length) of the transformer blocks: the longest ModuleList ("model.layers", "bert.encoder.layer")."""
    lists = [(name, len(m)) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
    if not lists:
        raise InputError(f"model.name_or_path: {type(model).__name__} has no list of transformer blocks that the "
                         "activation model knows")
    return max(lists, key=lambda x: x[1])


def role(relative: str) -> str:
    """A block linear's role from its name inside the block."""
    if ATTN_OUT.search(relative):
        return "attn_out"
    if "attn" in relative or "attention" in relative:
        return "attn_in"
    return "mlp_out" if MLP_OUT.search(relative) else "mlp_in"


def linear_table(model: nn.Module, targets: set[str], cfg: ModelConfig, task_heads: list[str]) -> tuple[Linear, ...]:
    """Every nn.Linear: shape, block, role, whether bitsandbytes would quantize it, whether it is adapted."""
    prefix, _ = blocks_of(model)
    keep = quantization_keep(model, cfg, task_heads)
    table = []
    for name, m in model.named_modules():
        if not isinstance(m, nn.Linear):
            continue
        block, relative = None, name
        if name.startswith(prefix + "."):
            index, _, relative = name.removeprefix(prefix + ".").partition(".")
            block = int(index)
        quantizable = type(m) is nn.Linear and keep(name)
        table.append(Linear(name, m.in_features, m.out_features, block, role(relative) if block is not None
                            else "head", quantizable, name in targets))
    return tuple(table)


def quantization_keep(model: nn.Module, cfg: ModelConfig, task_heads: list[str]) -> Callable[[str], bool]:
    """Which linears a quantized load quantizes: all but the output embedding, what is tied to it, the last module and
    the task heads (models.load_model through quantization.kept_modules; for a GGUF base, quantize_linears)."""
    from transformers.quantizers.quantizers_utils import should_convert_module

    kept = quantization.output_modules(model)
    if gguf_file(cfg):
        return lambda name: not inside(name, kept + task_heads)
    # what models.load_model names to transformers (quantization.kept_modules), and what transformers adds to it
    skip = kept + task_heads + list(getattr(model, "_keep_in_fp32_modules", None) or [])
    return lambda name: should_convert_module(name, skip)


def facts_of(model: nn.Module, config: Any, task: Task, linears: tuple[Linear, ...], heads: list[str]) -> Facts:
    """Dimensions from the (text) config and from block 0's linears (q_dim: the output projection's input; i: the
    down projection's), the rest from the meta model's modules."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    first = [lin for lin in linears if lin.block == 0]
    hidden = int(text.hidden_size)
    heads_n = int(text.num_attention_heads)
    q_dim = next((lin.d_in for lin in first if lin.role == "attn_out"), hidden)
    head_dim = int(getattr(text, "head_dim", None) or q_dim // heads_n)
    mlp_in = [lin for lin in first if lin.role == "mlp_in"]
    intermediate = next((lin.d_in for lin in first if lin.role == "mlp_out"), 4 * hidden)
    norms = [m for m in model.modules() if quantization.is_norm(m)]
    get_output: Any = getattr(model, "get_output_embeddings", None)
    output = get_output() if get_output is not None else None
    head_params = [p for h in heads for p in model.get_submodule(h).parameters()]
    blocks: list[nn.Module] = list(model.get_submodule(blocks_of(model)[0]).children())
    return Facts(
        architecture=type(model).__name__, causal=task.peft_task_type == "CAUSAL_LM", dtype=config_dtype(config),
        hidden=hidden, q_dim=q_dim, kv_dim=int(getattr(text, "num_key_value_heads", None) or heads_n) * head_dim,
        heads=heads_n, head_dim=head_dim, intermediate=intermediate,
        vocab=int(output.out_features if isinstance(output, nn.Linear) else text.vocab_size),
        blocks=blocks_of(model)[1],
        gated=len(mlp_in) > 1 or any(lin.d_out == 2 * intermediate for lin in mlp_in),  # gate_proj, up_proj
        rms=any("rmsnorm" in type(m).__name__.lower() for m in norms),
        rotary=any("rotary" in type(m).__name__.lower() for m in model.modules()),
        hidden_dropout=_dropout(text, "hidden_dropout_prob", "hidden_dropout", "resid_pdrop", "dropout"),
        attention_dropout=_dropout(text, "attention_probs_dropout_prob", "attention_dropout", "attn_pdrop"),
        linears=linears,
        base=sum(p.numel() for p in model.parameters()),  # named_parameters drops the tied duplicates
        norm_params=sum(p.numel() for m in norms for p in m.parameters(recurse=False)),
        block_params=tuple(sum(p.numel() for p in b.parameters()) for b in blocks),
        block_norms=tuple(sum(p.numel() for m in b.modules() if quantization.is_norm(m)
                              for p in m.parameters(recurse=False)) for b in blocks),
        buffer_bytes=sum(b.numel() * b.element_size() for b in model.buffers()),
        head_params=sum(p.numel() for p in head_params), head_tensors=len(head_params))


def _dropout(config: Any, *names: str) -> bool:
    return any(isinstance(getattr(config, n, None), (int, float)) and getattr(config, n) > 0 for n in names)


# ---------------------------------------------------------------------------------------------
# The recipe's settings, and the bytes they give


@dataclass(frozen=True)
class Setup:
    """The settings memory depends on, from the recipe and the command line (advice changes them)."""

    dtype: str  # model.dtype, resolved
    quantization: str | None
    double_quantization: bool
    compute_dtype: str | None  # 4-bit matmuls
    autocast: bool  # train.precision bf16
    checkpointing: bool
    batch_size: int  # global micro-batch (train.batch_size)
    grad_accum: int
    length: int  # data.max_length: every example as long as allowed, the upper bound
    label_tokens: int | None  # labelled positions per example; None: every position, the upper bound
    processes: int
    strategy: str  # single | ddp | fsdp
    cpu_offload: bool  # fsdp: the shards live in CPU memory between uses
    method: str
    r: int
    keep_sparsity: bool
    exact: bool  # keep_sparsity's exact gradients (a d_out x d_in transient in backward)
    dropout: bool = False  # adapter.dropout > 0

    @property
    def fused(self) -> bool:
        """Whether the adapted linears run as one autograd node (adapters/fused.py: one dtype, no autocast, no
        dropout, a dense, unquantized base), which saves only z = A x of the r-wide tensors."""
        return not (self.keep_sparsity or self.autocast or self.dropout or self.quantization) and \
            self.dtype in ("float32", "float64")

    @property
    def micro_batch(self) -> int:
        """This process's examples per micro-batch: the first ranks take the extra (dist.World.part)."""
        return math.ceil(self.batch_size / self.processes)

    @property
    def labelled(self) -> int:
        """Labelled positions of a causal LM's micro-batch: N rows of logits (the LM head runs on those only)."""
        per = self.length - 1 if self.label_tokens is None else min(self.label_tokens, self.length - 1)
        return self.micro_batch * per


def setup_of(recipe: Recipe, facts: Facts, processes: int, label_tokens: int | None,
             strategy: str | None = None) -> Setup:
    """The recipe's settings (model.dtype auto: the checkpoint's) with the command line's (`strategy`: --strategy,
    else train.strategy; auto is data parallel)."""
    m, a, t = recipe.model, recipe.adapter, recipe.train
    strategy = strategy or t.strategy
    if strategy == "fsdp" and processes < 2:
        raise InputError("--strategy fsdp: FSDP2 shards the model over processes; give --processes N (N >= 2)")
    strategy = "single" if processes == 1 else "ddp" if strategy == "auto" else strategy
    return Setup(dtype=m.dtype if m.dtype != "auto" else facts.dtype, quantization=m.quantization,
                 double_quantization=bool(m.double_quantization), compute_dtype=m.compute_dtype,
                 autocast=t.precision == "bf16", checkpointing=t.gradient_checkpointing, batch_size=t.batch_size,
                 grad_accum=t.grad_accum, length=recipe.data.max_length, label_tokens=label_tokens,
                 processes=processes, strategy=strategy, cpu_offload=strategy == "fsdp" and t.fsdp_cpu_offload,
                 method=a.method, r=a.r, keep_sparsity=bool(a.keep_sparsity),
                 exact=a.grad == "exact", dropout=bool(a.dropout))


def quantized_bytes(d_in: int, d_out: int, s: Setup) -> int:
    """One weight as bitsandbytes stores it (its quant state included):

        int8: codes (d_out, d_in) int8 + SCB, one float32 scale per output row
        4-bit: codes numel/2 (two per uint8) + a 16-entry float32 level map; per block of 64 weights an absmax:
               float32, or with double quantization uint8 plus one float32 scale per 256 blocks, a float32 offset
               and a 256-entry float32 code table
    """
    numel = d_in * d_out
    if s.quantization == "int8":
        return numel + 4 * d_out
    blocks = math.ceil(numel / BLOCKSIZE)
    codes = math.ceil(numel / 2) + 4 * 16
    if not s.double_quantization:
        return codes + 4 * blocks
    return codes + blocks + 4 * math.ceil(blocks / NESTED_BLOCKSIZE) + 4 + 4 * 256


def weight_bytes(f: Facts, s: Setup) -> dict[str, int]:
    """The base model in memory: quantized linears, and everything else in model.dtype (norms in float32 under
    quantization, as quantization.settle leaves them), buffers in their own dtype."""
    coded = [lin for lin in f.linears if lin.quantizable] if s.quantization else []
    coded_numel = sum(lin.d_in * lin.d_out for lin in coded)
    norm = BYTES["float32"] if s.quantization else BYTES[s.dtype]
    other = (f.base - coded_numel - f.norm_params) * BYTES[s.dtype] + f.norm_params * norm + f.buffer_bytes
    return {"quantized_linears": sum(quantized_bytes(lin.d_in, lin.d_out, s) for lin in coded), "other": other}


def unit(f: Facts, s: Setup, block: int | None) -> tuple[int, int, int, int]:
    """One FSDP2 unit, block `block` or (None) the root (everything outside the blocks but the heads trained in
    full, which stay whole): (bytes of its quantized linears' codes, bytes of their statistics, parameters in
    model.dtype, parameters in norms)."""
    coded = [lin for lin in f.linears if lin.block == block and lin.quantizable] if s.quantization else []
    numel = [lin.d_in * lin.d_out for lin in coded]
    codes = sum(n if s.quantization == "int8" else math.ceil(n / 2) for n in numel)
    stats = sum(quantized_bytes(lin.d_in, lin.d_out, s) for lin in coded) - codes
    params, norms = ((f.base - sum(f.block_params) - f.head_params, f.norm_params - sum(f.block_norms)) if block is None
                     else (f.block_params[block], f.block_norms[block]))
    return codes, stats, params - sum(numel) - norms, norms


def sharded_weights(f: Facts, s: Setup) -> dict[str, int]:
    """The base under FSDP2, per process: 1/N of every unit's codes and parameters ("shards"); what stays whole on
    every process ("whole": the quantization statistics, which bitsandbytes keeps on the layer, the heads trained in
    full, and the buffers);
    and the units gathered for compute ("gathered": the root for the whole step, two blocks at a time), in bf16
    under train.precision bf16 (MixedPrecisionPolicy), else in their stored dtypes."""
    norm = BYTES["float32"] if s.quantization else BYTES[s.dtype]
    cast = BYTES["bfloat16"] if s.autocast else None
    units = [unit(f, s, b) for b in range(f.blocks)]
    root = unit(f, s, None)

    def stored(u: tuple[int, int, int, int]) -> int:
        return u[0] + u[2] * BYTES[s.dtype] + u[3] * norm

    def gathered(u: tuple[int, int, int, int]) -> int:
        return u[0] + u[2] * (cast or BYTES[s.dtype]) + u[3] * (cast or norm)

    return {"shards": sum(math.ceil(stored(u) / s.processes) for u in [*units, root]),
            "whole": sum(u[1] for u in [*units, root]) + f.head_params * BYTES[s.dtype] + f.buffer_bytes,
            "gathered": gathered(root) + min(2, len(units)) * max((gathered(u) for u in units), default=0)}


def trained(f: Facts, s: Setup) -> dict[str, int]:
    """Trainable parameters and their memory: adapters in float32 (float64 on a float64 model), modules_to_save in
    model.dtype; one gradient each; AdamW's exp_avg and exp_avg_sq in the parameter's dtype and a float32 step per
    tensor."""
    method = method_class(s.method)
    adapted = [lin for lin in f.linears if lin.adapted]
    adapters = sum(s.r * method.rank_params({"d_in": lin.d_in, "d_out": lin.d_out}) for lin in adapted)
    wide = BYTES["float64" if s.dtype == "float64" else "float32"]
    gradients = adapters * wide + f.head_params * BYTES[s.dtype]
    tensors = len(adapted) * len(method.rank_dims) + f.head_tensors
    return {"adapters": adapters, "trainable": adapters + f.head_params, "gradients": gradients,
            "optimizer_states": 2 * gradients + 4 * tensors}


# ---------------------------------------------------------------------------------------------
# Activations: what autograd keeps for backward (README "sora plan" writes the model down)


@dataclass(frozen=True)
class Kinds:
    """The dtype of each kind of activation under the recipe's dtype, quantization and autocast (as measured)."""

    residual: str  # the hidden states between blocks: what checkpointing keeps
    normed: str  # a norm's output, the input of the attention's and the MLP's first linears
    attention: str  # q, k, v and the attention's output
    mlp: str  # the MLP's intermediate activations
    adapter: str  # what A and B multiply in: float32 (float64), or the 4-bit compute dtype
    saved: str  # an adapter's own copy of its input, and its r-wide activations: bfloat16 under autocast
    autocast: bool

    def shares(self, dtype: str) -> bool:
        """An adapter saves the very input tensor (no copy) when nothing casts it on the way to A."""
        return dtype == self.adapter and (not self.autocast or self.adapter == "bfloat16")


def kinds(f: Facts, s: Setup) -> Kinds:
    """The residual stream is in model.dtype (a quantized base's float32 norms return their input's dtype:
    quantization.settle); autocast runs the linears and the attention in bfloat16, but a bitsandbytes linear returns
    its input's dtype, so on a quantized base the MLP stays in the normed input's; a LayerNorm under autocast returns
    float32."""
    wide = "float64" if s.dtype == "float64" else "float32"
    four_bit = s.quantization in ("nf4", "fp4")
    adapter = (s.compute_dtype or "float32") if four_bit else wide
    normed = "float32" if s.autocast and not f.rms else s.dtype
    linear_out = "bfloat16" if s.autocast else s.dtype
    return Kinds(residual=s.dtype, normed=normed, attention="bfloat16" if s.autocast else s.dtype,
                 mlp=normed if s.quantization else linear_out, adapter=adapter,
                 saved="bfloat16" if s.autocast else adapter, autocast=s.autocast)


def block_frozen(f: Facts, k: Kinds, n: int, batch: int, length: int, first: bool) -> int:
    """Bytes one block saves for the input gradients through its frozen weights, for n = batch x length tokens:

        norms      RMSNorm (pre-norm): float32 input + 1/rms, per norm (none before the first block's attention,
                   whose input, the frozen embeddings, needs no gradient); LayerNorm: input + mean + 1/std
        attention  fused kernel: q, k, v (k and v repeated to every head when a padding mask is given), output,
                   log-sum-exp (heads, float32), and its own copy of the (batch, 1, T, T) mask; with attention
                   dropout the math kernel: q, kᵀ, v and three (heads, T, T) tensors
        MLP        gated: gate, act(gate), up (3 i); otherwise the activation's input (i)
        dropout    a mask per residual dropout (2 h), in the activations' dtype
    """
    h, total = f.hidden, 0
    if f.rms:
        total += (1 if first else 2) * n * (BYTES["float32"] * h + 4)
    else:
        total += 2 * n * (BYTES[k.normed] * h + 8)
    if f.attention_dropout:
        total += n * (3 * f.q_dim + 3 * f.heads * length) * BYTES[k.attention]
    else:
        total += n * (4 * f.q_dim * BYTES[k.attention] + 4 * f.heads) + batch * length * length * BYTES[k.attention]
    if f.hidden_dropout:
        total += 2 * n * h * BYTES[k.residual]
    return total + n * (3 if f.gated else 1) * f.intermediate * BYTES[k.mlp]


def block_adapters(f: Facts, s: Setup, k: Kinds, layer: list[Linear], n: int) -> int:
    """Bytes the adapters of one block add: each adapted linear's input x (n, d_in), shared by the linears that read
    the same tensor unless each casts its own copy on the way to A (autocast, or a dtype other than A's), and already
    saved for the attention's output projection behind the fused kernel; z (n, r) before B, and A x too when a
    tensor scales the ranks (SoRA's gate); A and B cast for the product when autocast or a 4-bit compute dtype
    differs from theirs. LoRS (keep_sparsity) saves x as given and nothing r-wide."""
    inputs = {"attn_in": (k.normed, False), "attn_out": (k.attention, not f.attention_dropout),
              "mlp_in": (k.normed, False), "mlp_out": (k.mlp, False)}
    wide = "float64" if s.dtype == "float64" else "float32"
    total = 0
    for name, (dtype, saved_anyway) in inputs.items():
        adapted = [lin for lin in layer if lin.adapted and lin.role == name]
        if adapted and (s.keep_sparsity or k.shares(dtype)):
            total += 0 if saved_anyway else n * adapted[0].d_in * BYTES[dtype]
        else:
            total += sum(n * lin.d_in * BYTES[k.saved] for lin in adapted)
    adapted = [lin for lin in layer if lin.adapted]
    if not s.keep_sparsity:
        total += sum(r_wide(s) * n * s.r * BYTES[k.saved] for _ in adapted)
        if k.saved != wide:
            total += sum(s.r * (lin.d_in + lin.d_out) * BYTES[k.saved] for lin in adapted)
    return total


def r_wide(s: Setup) -> int:
    """The (n, r) tensors an adapted linear saves: z = s·(A x) for B's gradient, and A x as well when the scale is a
    trained tensor (the method's layer overrides LoRALinear.rank_scale, as SoRA's gate does); the fused node saves
    A x alone and scales it again in backward."""
    if s.fused:
        return 1
    return 2 if getattr(method_class(s.method).layer, "rank_scale", None) is not LoRALinear.rank_scale else 1


def weight_copies(s: Setup, layer: list[Linear], first: bool) -> int:
    """Autocast casts a frozen float32 (or float16) weight to bfloat16 at every call and, when the linear's input
    needs a gradient, autograd keeps that copy: bytes of the copies one block (or the heads) keeps."""
    if not s.autocast or s.quantization or s.dtype == "bfloat16":
        return 0
    kept = [lin for lin in layer if not (first and lin.role == "attn_in")]
    return sum(lin.d_in * lin.d_out * BYTES["bfloat16"] for lin in kept)


def outside(f: Facts, s: Setup, k: Kinds, n: int, batch: int) -> int:
    """Bytes saved outside the blocks: rotary cos and sin (T, head_dim), shared by the blocks; a causal LM's final
    norm, its labelled-position mask, the log-probabilities (N, V) in float32 (float64 stays) and the targets;
    a classifier's few (batch, h) tensors around the pooler and the head."""
    total = 2 * s.length * f.head_dim * BYTES[s.dtype] if f.rotary else 0
    heads = [lin for lin in f.linears if lin.block is None]
    total += weight_copies(s, heads, first=False)
    if not f.causal:
        return total + 4 * batch * f.hidden * BYTES[k.residual]
    norm = n * (BYTES["float32"] * f.hidden + 4) if f.rms else n * (BYTES[k.normed] * f.hidden + 8)
    logprobs = s.labelled * f.vocab * (8 if s.dtype == "float64" else 4)
    return total + norm + batch * (s.length - 1) + logprobs + 8 * s.labelled


def activations(f: Facts, s: Setup) -> dict[str, Any]:
    """Bytes saved for backward over one micro-batch, with checkpointing as `s` says, and the transients: tensors
    that live for a moment on top of what is saved (README "sora plan"). {"saved": bytes, "transient": {name: bytes}}"""
    k = kinds(f, s)
    batch = s.micro_batch
    n = batch * s.length
    per_block = []
    for b in range(f.blocks):
        layer = [lin for lin in f.linears if lin.block == b]
        per_block.append(block_frozen(f, k, n, batch, s.length, b == 0) + block_adapters(f, s, k, layer, n)
                         + weight_copies(s, layer, b == 0))
    rest = outside(f, s, k, n, batch)
    # a block's temporaries: the (n, h) and (n, i) tensors that are not saved (a frozen output before the adapter's)
    temporaries = n * (f.hidden * BYTES[k.residual] + f.intermediate * BYTES[k.mlp])
    transient = {"loss": loss_transient(f, s, k), **weight_transients(f, s, k)}
    if s.checkpointing:  # each block's input (n, h) and their shared boolean (batch, 1, T, T) mask; in backward one
        # block at a time is recomputed, its saved tensors and temporaries live until its backward is done
        saved = f.blocks * n * f.hidden * BYTES[k.residual] + batch * s.length * s.length + rest
        transient["recompute"] = max(per_block, default=0) + temporaries
    else:  # the forward's end: the last block's temporaries and the boolean mask, until the forward returns (the
        # causal task runs the decoder with use_cache=False: no KV cache)
        saved = sum(per_block) + rest
        transient["forward"] = temporaries + batch * s.length * s.length
    return {"saved": saved, "transient": transient}


def loss_transient(f: Facts, s: Setup, k: Kinds) -> int:
    """A causal LM's loss: in its backward, the gradients of the log-probabilities and of the logits (N, V) in float32
    beside the saved log-probabilities (and the logits' own dtype again when they are not float32)."""
    if not f.causal:
        return 0
    logits = "bfloat16" if s.autocast else s.dtype
    wide = 8 if s.dtype == "float64" else 4
    return s.labelled * f.vocab * (2 * wide + (BYTES[logits] if BYTES[logits] != wide else 0))


def weight_transients(f: Facts, s: Setup, k: Kinds) -> dict[str, int]:
    """Weight-sized temporaries, one linear at a time: a quantized weight dequantized for its matmul (forward and
    backward); LoRS's W_eff = (W0 + B A) ⊙ M in float32 and in the matmul dtype (and G_W with exact gradients)."""
    out: dict[str, int] = {}
    if s.quantization:
        largest = max((lin.d_in * lin.d_out for lin in f.linears if lin.quantizable), default=0)
        out["dequantize"] = largest * BYTES[s.compute_dtype or k.normed]
    if s.keep_sparsity:
        largest = max((lin.d_in * lin.d_out for lin in f.linears if lin.adapted), default=0)
        out["effective_weight"] = largest * (4 + BYTES[k.attention] + (4 if s.exact else 0))
    return out


# ---------------------------------------------------------------------------------------------
# The plan: bytes per process, the peak, and what to change when it does not fit


def budget(f: Facts, s: Setup) -> dict[str, Any]:
    """Bytes per process for one setting: its weights (whole, or FSDP2's shards and gathered units; offloaded
    shards live in CPU memory, outside the peak), the adapters' gradients and optimizer states (whole on every
    process whatever the strategy) and its share of the batch."""
    weights = sharded_weights(f, s) if s.strategy == "fsdp" else weight_bytes(f, s)
    train = trained(f, s)
    cpu = weights["shards"] if s.cpu_offload else 0
    held = sum(weights.values()) - cpu + train["gradients"] + train["optimizer_states"]
    out: dict[str, Any] = {"weights": weights, "weights_cpu": cpu, **train}
    for checkpointing in (False, True):
        act = activations(f, dataclasses.replace(s, checkpointing=checkpointing))
        transient = act["transient"]
        if s.processes > 1:  # dist.World.sum_: the gradients flattened into one buffer per dtype for the all-reduce
            transient["all_reduce"] = train["gradients"]
        largest = max(transient, key=lambda t: transient[t])
        key = "with" if checkpointing else "without"
        out[f"activations_{key}_checkpointing"] = act["saved"]
        out[f"peak_{key}_checkpointing"] = held + act["saved"] + transient[largest]
        if checkpointing == s.checkpointing:
            out.update(peak=out[f"peak_{key}_checkpointing"], transient=transient[largest], largest_transient=largest)
    return out


def advise(f: Facts, s: Setup, memory: int) -> list[dict[str, Any]]:
    """Changes that lower the peak, in order, each on top of the ones before, until the plan fits: shard the base
    with FSDP2 (several processes; it changes no number), quantize the base to NF4, checkpoint the activations,
    then halve the micro-batch and double grad_accum (same effective batch) down to one example per process."""
    steps: list[dict[str, Any]] = []
    overrides: list[str] = []

    def step(change: str, new: Setup, *changed: str) -> Setup:
        overrides.extend(o for o in changed if o not in overrides)
        peak = budget(f, new)["peak"]
        steps.append({"change": change, "overrides": list(overrides), "peak": peak, "fits": peak <= memory})
        return new

    def fits(setup: Setup) -> bool:
        return bool(budget(f, setup)["peak"] <= memory)

    def lowers(new: Setup) -> bool:
        return bool(budget(f, new)["peak"] < budget(f, s)["peak"])

    sharded = dataclasses.replace(s, strategy="fsdp")
    if (not fits(s) and s.strategy == "ddp" and not s.keep_sparsity and s.quantization != "int8"
            and lowers(sharded)):  # a few blocks: the gathered units are all
        s = step("shard the base over the processes with FSDP2", sharded, "train.strategy=fsdp")
    four_bit = dataclasses.replace(s, quantization="nf4", double_quantization=True,
                                   compute_dtype="bfloat16" if s.autocast else "float32")
    if (not fits(s) and s.quantization is None and s.dtype != "float64" and not s.keep_sparsity
            and lowers(four_bit)):  # a tiny model: its unfused adapters save more than 4 bits save
        s = step("quantize the base to 4-bit NF4", four_bit, "model.quantization=nf4")
    if not fits(s) and not s.checkpointing:
        s = step("turn on gradient checkpointing", dataclasses.replace(s, checkpointing=True),
                 "train.gradient_checkpointing=true")
    while not fits(s) and s.micro_batch > 1:
        s = dataclasses.replace(s, batch_size=math.ceil(s.batch_size / 2), grad_accum=s.grad_accum * 2)
        overrides[:] = [o for o in overrides if not o.startswith(("train.batch_size=", "train.grad_accum="))]
        s = step(f"halve the batch, double grad_accum ({s.micro_batch} per process)", s,
                 f"train.batch_size={s.batch_size}", f"train.grad_accum={s.grad_accum}")
    if not fits(s):
        more = ("more processes shard it finer" if s.strategy == "fsdp" else
                "more processes with train.strategy=fsdp shard the base" if not s.keep_sparsity else
                "more processes do not help: keep_sparsity cannot be sharded, so each process holds the whole model")
        steps.append({"change": f"still too large: shorten data.max_length; {more}",
                      "overrides": list(overrides), "peak": None, "fits": False})
    return steps


def plan(recipe: Recipe, processes: int = 1, memory: int | None = None, label_tokens: int | None = None,
         strategy: str | None = None) -> dict[str, Any]:
    """Parameters and bytes per process of training `recipe` on `processes` processes (data-parallel, or FSDP2 with
    `strategy` fsdp; None: train.strategy), its peak, and (given `memory`, bytes per process) whether it fits and
    what to change if not. Reads the model's config only."""
    if processes < 1:
        raise InputError(f"--processes: must be a positive integer, got {processes}")
    if label_tokens is not None and label_tokens < 1:
        raise InputError(f"--label-tokens: must be a positive integer, got {label_tokens}")
    f = read_model(recipe)
    s = setup_of(recipe, f, processes, label_tokens, strategy)
    b = budget(f, s)
    w = b["weights"]
    adapted = [lin for lin in f.linears if lin.adapted]
    return {
        "model": recipe.model.name_or_path, "architecture": f.architecture, "strategy": s.strategy,
        "fsdp_cpu_offload": s.cpu_offload,
        "processes": processes, "micro_batch": s.micro_batch, "grad_accum": s.grad_accum, "max_length": s.length,
        "label_tokens": s.labelled if f.causal else None, "dtype": s.dtype, "quantization": s.quantization,
        "double_quantization": s.double_quantization if s.quantization in ("nf4", "fp4") else None,
        "precision": recipe.train.precision, "gradient_checkpointing": s.checkpointing,
        "parameters": {"base": f.base, "adapted": sum(lin.d_in * lin.d_out for lin in adapted),
                       "adapted_modules": len(adapted), "trainable": b["trainable"]},
        # weights: on the device; data parallel, all of it (quantized linears, other); FSDP2, the shards, what stays
        # whole and the units gathered for compute (weights_cpu: offloaded shards, outside the peak)
        "bytes": {"weights_quantized_linears": w.get("quantized_linears"), "weights_other": w.get("other"),
                  "weights_shards": w.get("shards"), "weights_whole": w.get("whole"),
                  "weights_gathered": w.get("gathered"), "weights_cpu": b["weights_cpu"],
                  "weights": sum(w.values()) - b["weights_cpu"],
                  "gradients": b["gradients"], "optimizer_states": b["optimizer_states"],
                  "activations_without_checkpointing": b["activations_without_checkpointing"],
                  "activations_with_checkpointing": b["activations_with_checkpointing"],
                  "transient": b["transient"], "peak": b["peak"],
                  "peak_without_checkpointing": b["peak_without_checkpointing"],
                  "peak_with_checkpointing": b["peak_with_checkpointing"]},
        "largest_transient": b["largest_transient"],
        "memory": memory, "fits": None if memory is None else b["peak"] <= memory,
        "advice": [] if memory is None else advise(f, s, memory),
    }
