"""What survived: per-module ranks and gate magnitudes, by module type and by layer (`sora inspect`); for a method
with sparse factors (RoseLoRA) also the support of A, B and ΔW and the fraction of each base matrix it touches.

Pure functions over adapter tensors and adapter.json; `render.py` draws the tables, `plot` the figure.
"""

from __future__ import annotations

import re
import statistics
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from sora_cli.errors import InputError
from sora_cli.quantization import recorded

if TYPE_CHECKING:
    from sora_cli.adapters.method import Method

_LAYER = re.compile(r"\.(\d+)\.(.+)$")
# A base whose adapted weights are at least this share zeros is "sparse": inspect and merge then show its sparsity
# (a dense model dequantised from GGUF has a few exact zeros, which are not a pattern worth keeping)
SPARSE_BASE_SHARE = 0.01


def module_type(name: str) -> str:
    """`bert.encoder.layer.3.attention.self.query` -> `attention.self.query`; no layer index: the name."""
    m = _LAYER.search(name)
    return m.group(2) if m else name


def layer_index(name: str) -> int | None:
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def inspect_adapter(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """Stable, JSON-ready numbers: `modules` (one row each), `by_type`, `by_layer`, `summary`; for a method with
    sparse factors (RoseLoRA) also `support` (see `update_support`)."""
    from sora_cli.adapters import method_class

    method = method_class(meta["method"])
    rows = [_module_row(method, tensors, name, m) for name, m in meta["modules"].items()]

    def group(key: str) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for row in rows:
            label = "other" if row[key] is None else str(row[key])
            g = out.setdefault(label, {"modules": 0, "r_max": 0, "rank": 0})
            g["modules"] += 1
            g["r_max"] += row["r_max"]
            g["rank"] += row["rank"]
        return out

    r_max = sum(r["r_max"] for r in rows)
    rank = sum(r["rank"] for r in rows)
    params, pruned = sum(r["params"] for r in rows), sum(r["params_pruned"] for r in rows)
    base = meta.get("base_parameters")
    report = {
        "method": meta["method"], "base_model": meta.get("base_model"), "step": meta.get("step"),
        "pruned": "pruned" in meta, "gated": any(r["gate_l1"] is not None for r in rows),
        "keep_sparsity": bool(meta.get("keep_sparsity")),  # (W0 + ΔW) ⊙ (W0 ≠ 0): the base's zeros stay zero
        # the base's quantization (None: full precision); a quantized base's zeros are its rounding's, not a pattern
        "quantization": recorded(meta),
        "sparse_base": not recorded(meta) and (_base_sparsity(meta) or 0.0) >= SPARSE_BASE_SHARE,
        "modules": rows, "by_type": group("type"), "by_layer": group("layer"),
        "summary": {"modules": len(rows), "modules_alive": sum(1 for r in rows if r["rank"]), "r_max": r_max,
                    "r": sum(r["r"] for r in rows),
                    "rank": rank, "rank_kept_percent": 100 * rank / r_max if r_max else 0.0,
                    "params": params, "params_pruned": pruned, "base_sparsity": _base_sparsity(meta),
                    "base_parameters": base, "percent_of_base": 100 * pruned / base if base else None},
    }
    if method.sparse_factors:  # other methods' reports keep exactly their keys
        report["support"] = update_support(tensors, meta)
    budget = meta.get("method_config", {}).get("budget")
    if budget:  # SoRA to a budget: the target, the final cut, λ's trajectory
        report["budget"] = budget
    return report


def _module_row(method: type[Method], tensors: dict[str, torch.Tensor], name: str,
                m: dict[str, Any]) -> dict[str, Any]:
    """One module's row of `inspect`: ranks, gate magnitudes (where the method has gates), parameters."""
    gate = method.gate_values(tensors, name) if m["r"] else None
    alive = gate[gate != 0].abs().tolist() if gate is not None else []
    rank = len(method.surviving(tensors, name, m, 0.0)) if m["r"] else 0
    per_rank = method.rank_params(m)
    return {
        "module": name, "type": module_type(name), "layer": layer_index(name),
        "r_max": m.get("r_max", m["r"]), "r": m["r"], "rank": rank,
        "gate_l1": float(gate.abs().sum()) if gate is not None else None,
        "gate_min": min(alive) if alive else None,
        "gate_median": statistics.median(alive) if alive else None,
        "gate_max": max(alive) if alive else None,
        "params": m["r"] * per_rank, "params_pruned": rank * per_rank,
        # zeros of the base weight W0 (d_out, d_in), as recorded in training (older checkpoints: None)
        "base_sparsity": m["base_zeros"] / (m["d_out"] * m["d_in"]) if "base_zeros" in m else None,
    }


def _base_sparsity(meta: dict[str, Any]) -> float | None:
    """Zeros over weights of all adapted base matrices together (None when the checkpoint does not record them)."""
    modules = meta["modules"].values()
    if not all("base_zeros" in m for m in modules):
        return None
    return _ratio(sum(m["base_zeros"] for m in modules), sum(m["d_out"] * m["d_in"] for m in modules))


def _ratio(part: int, whole: int) -> float | None:
    return part / whole if whole else None


def module_support(method: type[Method], tensors: dict[str, torch.Tensor], name: str,
                   m: dict[str, Any]) -> dict[str, Any]:
    """Where one module's update is non-zero: nnz and density of A and B, the exact nnz(ΔW), the bound of
    METHODS.md Proposition 1 `min(d_out·d_in, Σ_i nnz(B[:, i])·nnz(A[i, :]))`, and the fraction of W0 touched.

    B is the method's B̃ (every scale folded in: s ≠ 0 keeps B's zeros exactly; a SoRA gate of 0 would zero its
    column). ΔW is the method's own `delta` in float32, counted entry by entry."""
    weights = int(m["d_out"]) * int(m["d_in"])  # entries of W0 (d_out, d_in)
    nnz_a = nnz_b = numel_a = numel_b = nnz_delta = bound = 0
    if m["r"]:  # a module pruned to rank 0 has no tensors and no update
        b, a = method.factors(tensors, name, m)  # B̃ (d_out, r), A (r, d_in), float32
        nnz_a, nnz_b, numel_a, numel_b = int(torch.count_nonzero(a)), int(torch.count_nonzero(b)), a.numel(), b.numel()
        per_rank = torch.count_nonzero(b, dim=0) * torch.count_nonzero(a, dim=1)  # (r,): nnz(B̃[:, i])·nnz(A[i, :])
        bound = min(weights, int(per_rank.sum()))
        nnz_delta = int(torch.count_nonzero(method.delta(tensors, name, m)))  # (d_out, d_in) != 0
    return {"module": name, "nnz_A": nnz_a, "numel_A": numel_a, "density_A": _ratio(nnz_a, numel_a),
            "nnz_B": nnz_b, "numel_B": numel_b, "density_B": _ratio(nnz_b, numel_b),
            "nnz_delta": nnz_delta, "bound": bound, "base_weights": weights,
            "touched_fraction": _ratio(nnz_delta, weights)}


def update_support(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """`modules`: `module_support` of each module; `total`: the counts summed, densities and the touched fraction
    over the sums (so a big module weighs more than a small one)."""
    from sora_cli.adapters import method_class

    method = method_class(meta["method"])
    rows = [module_support(method, tensors, name, m) for name, m in meta["modules"].items()]
    counts = ("nnz_A", "numel_A", "nnz_B", "numel_B", "nnz_delta", "bound", "base_weights")
    total: dict[str, Any] = {k: sum(r[k] for r in rows) for k in counts}
    total.update(density_A=_ratio(total["nnz_A"], total["numel_A"]),
                 density_B=_ratio(total["nnz_B"], total["numel_B"]),
                 touched_fraction=_ratio(total["nnz_delta"], total["base_weights"]))
    return {"modules": rows, "total": total}


def pyplot() -> Any:
    """matplotlib.pyplot on the file-only Agg backend; a clear error when matplotlib (optional) is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InputError("--plot needs matplotlib, which is not installed: pip install matplotlib") from None
    return plt


def plot(report: dict[str, Any], tensors: dict[str, torch.Tensor], path: Path) -> None:
    """PNG: heatmap layer × module type -> surviving rank, and beside it a histogram of |g| (SoRA) or, for sparse
    factors (RoseLoRA, no gates), a heatmap layer × module type -> % of the base matrix the update touches."""
    plt = pyplot()
    budget = report.get("budget")
    fig, axes = plt.subplots(1, 3 if budget else 2, figsize=(18 if budget else 12, 4.5))
    ax1, ax2 = axes[0], axes[1]
    ranks = {r["module"]: float(r["rank"]) for r in report["modules"]}
    _heatmap(fig, ax1, report, ranks, "surviving rank", vmax=max(r["r_max"] for r in report["modules"]))
    if "support" in report:
        touched = {r["module"]: 100 * (r["touched_fraction"] or 0.0) for r in report["support"]["modules"]}
        total = report["support"]["total"]["touched_fraction"] or 0.0
        _heatmap(fig, ax2, report, touched, f"% of W0 touched by ΔW (all modules: {100 * total:.2f}%)", vmax=None)
    else:
        _gate_histogram(ax2, report, tensors)
    if budget:
        _budget_path(axes[2], budget)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _heatmap(fig: Any, ax: Any, report: dict[str, Any], values: dict[str, float], title: str,
             vmax: float | None) -> None:
    """values[module] on a grid layer × module type (modules without a layer index are left out)."""
    types = list(dict.fromkeys(r["type"] for r in report["modules"] if r["layer"] is not None))
    layers = sorted({r["layer"] for r in report["modules"] if r["layer"] is not None})
    grid = [[float("nan")] * len(types) for _ in layers]  # (layers, types); NaN: no such module
    for r in report["modules"]:
        if r["layer"] is not None:
            grid[layers.index(r["layer"])][types.index(r["type"])] = values[r["module"]]
    image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=vmax)
    ax.set_xticks(range(len(types)), types, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(layers)), [str(i) for i in layers])
    ax.set_xlabel("module type")
    ax.set_ylabel("layer")
    ax.set_title(title)
    fig.colorbar(image, ax=ax)


def _gate_histogram(ax: Any, report: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    from sora_cli.adapters import method_class

    method = method_class(report["method"])
    gates = [v for r in report["modules"] if (g := method.gate_values(tensors, r["module"])) is not None
             for v in g.abs().tolist()]
    ax.hist(gates, bins=40)
    ax.set_xlabel("|g|")
    ax.set_title(f"gate magnitudes ({sum(1 for g in gates if g == 0)} of {len(gates)} exactly zero)")


def _budget_path(ax: Any, budget: dict[str, Any]) -> None:
    """The count against the path the controller followed (left axis) and λ (right axis, log) by step."""
    from sora_cli.budget import path

    steps = [p[0] for p in budget["path"]]
    ax.plot(steps, [p[2] for p in budget["path"]], label=f"surviving {budget['unit']}")
    if budget["start"] is not None:
        ax.plot(steps, [path(budget["start"], budget["aim"], s, budget["reach_at"]) for s in steps], "--",
                label="path (budget + 5% margin)")
    ax.axhline(budget["budget"], color="black", linewidth=0.8, label=f"budget {budget['budget']:,d}")
    ax.set_xlabel("step")
    ax.set_ylabel(budget["unit"])
    ax.set_title(f"SoRA to a budget: the final cut took {budget['final_cut']} ranks")
    ax.legend(loc="upper right", fontsize=8)
    lam = ax.twinx()
    lam.plot(steps, [p[1] for p in budget["path"]], color="tab:red", linewidth=1)
    lam.set_yscale("log")
    lam.yaxis.set_major_formatter("{x:g}")
    lam.yaxis.set_minor_formatter("{x:g}")
    lam.tick_params(axis="y", which="both", labelsize=7, colors="tab:red")
    lam.set_ylabel("λ", color="tab:red")
