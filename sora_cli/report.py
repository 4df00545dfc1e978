"""What survived: per-module ranks and gate magnitudes, by module type and by layer (`sora inspect`).

Pure functions over adapter tensors and adapter.json; `render.py` draws the tables, `plot` the figure.
"""

from __future__ import annotations

import re
import statistics
from pathlib import Path
from typing import Any

import torch

from sora_cli.errors import InputError

_LAYER = re.compile(r"\.(\d+)\.(.+)$")


def module_type(name: str) -> str:
    """`bert.encoder.layer.3.attention.self.query` -> `attention.self.query`; no layer index: the name."""
    m = _LAYER.search(name)
    return m.group(2) if m else name


def layer_index(name: str) -> int | None:
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def inspect_adapter(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """Stable, JSON-ready numbers: `modules` (one row each), `by_type`, `by_layer`, `summary`."""
    from sora_cli.adapters import method_class

    method = method_class(meta["method"])
    rows = []
    for name, m in meta["modules"].items():
        gate = method.gate_values(tensors, name) if m["r"] else None
        alive = gate[gate != 0].abs().tolist() if gate is not None else []
        rank = len(method.surviving(tensors, name, m, 0.0)) if m["r"] else 0
        per_rank = method.rank_params(m)
        rows.append({
            "module": name, "type": module_type(name), "layer": layer_index(name),
            "r_max": m.get("r_max", m["r"]), "r": m["r"], "rank": rank,
            "gate_l1": float(gate.abs().sum()) if gate is not None else None,
            "gate_min": min(alive) if alive else None,
            "gate_median": statistics.median(alive) if alive else None,
            "gate_max": max(alive) if alive else None,
            "params": m["r"] * per_rank, "params_pruned": rank * per_rank,
        })

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
    return {
        "method": meta["method"], "base_model": meta.get("base_model"), "step": meta.get("step"),
        "pruned": "pruned" in meta, "gated": any(r["gate_l1"] is not None for r in rows),
        "modules": rows, "by_type": group("type"), "by_layer": group("layer"),
        "summary": {"modules": len(rows), "modules_alive": sum(1 for r in rows if r["rank"]), "r_max": r_max,
                    "r": sum(r["r"] for r in rows),
                    "rank": rank, "rank_kept_percent": 100 * rank / r_max if r_max else 0.0,
                    "params": params, "params_pruned": pruned,
                    "base_parameters": base, "percent_of_base": 100 * pruned / base if base else None},
    }


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
    """PNG: heatmap layer × module type -> surviving rank, and a histogram of |g| (SoRA)."""
    plt = pyplot()
    types = list(dict.fromkeys(r["type"] for r in report["modules"] if r["layer"] is not None))
    layers = sorted({r["layer"] for r in report["modules"] if r["layer"] is not None})
    grid = [[float("nan")] * len(types) for _ in layers]
    for r in report["modules"]:
        if r["layer"] is not None:
            grid[layers.index(r["layer"])][types.index(r["type"])] = r["rank"]
    from sora_cli.adapters import method_class

    method = method_class(report["method"])
    gates = [v for r in report["modules"] if (g := method.gate_values(tensors, r["module"])) is not None
             for v in g.abs().tolist()]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    image = ax1.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=max(r["r_max"] for r in report["modules"]))
    ax1.set_xticks(range(len(types)), types, rotation=30, ha="right", fontsize=8)
    ax1.set_yticks(range(len(layers)), [str(i) for i in layers])
    ax1.set_xlabel("module type")
    ax1.set_ylabel("layer")
    ax1.set_title("surviving rank")
    fig.colorbar(image, ax=ax1)
    ax2.hist(gates, bins=40)
    ax2.set_xlabel("|g|")
    ax2.set_title(f"gate magnitudes ({sum(1 for g in gates if g == 0)} of {len(gates)} exactly zero)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
