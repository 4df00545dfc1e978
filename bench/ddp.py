"""Data-parallel training under torchrun: throughput of 1 and N processes, and parity of N processes with one.

    python bench/ddp.py                         # CPU (gloo): 1 process x all threads vs 2 processes x 1 thread
    python bench/ddp.py --device cuda --nprocs 1 8    # a GPU machine: 1 GPU vs 8 (NCCL)
    python bench/ddp.py --smoke                 # CI: tiny random BERT, a few steps
    python bench/ddp.py --from-json bench/results/<folder>/ddp.json   # rewrite ddp.md only

Part `speed`: `torchrun --nproc_per_node=N bench/ddp.py --worker` for each N. Every process builds the quickstart's
MiniLM and three contestants on it, and times one optimizer step of each over the same global batches (each rank
its slice), interleaved as bench/speed.py does:
- sora LoRA and sora SoRA r_max=8: `engine.train_step` with the torchrun world, i.e. one coalesced all-reduce of
  the adapter gradients per step after backward;
- PEFT LoRA in torch's DistributedDataParallel (bucketed all-reduce overlapped with backward), what a PEFT user
  launching with torchrun gets; in one process, plain PEFT LoRA.
The global batch is the recipe's (16) at every N, so N processes share the same work: examples/s, speed-up over one
process, scaling efficiency (speed-up / N) and the step time relative to PEFT + DDP at the same N.

Part `parity`: `sora train recipes/quickstart-causal.yaml` (SmolLM2 has no dropout) for --parity-steps steps with
2 processes, against 1 process and against 1 process that cuts each batch into the same 2 micro-batches
(grad_accum 2): the largest difference of the logged losses and of the final adapter tensors. Writes ddp.json and
ddp.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from speed import interleaved_steps, ratio, spread  # noqa: E402

from sora_cli.data import TrainOrder  # noqa: E402
from sora_cli.engine import train_step  # noqa: E402
from sora_cli.recipe import load_recipe  # noqa: E402
from sora_cli.strategy import ONE, Strategy  # noqa: E402
from sora_cli.tasks.classification import collate  # noqa: E402

CONTESTANTS = {"sora-lora": "sora LoRA r=8", "sora-r8": "sora SoRA r_max=8", "peft-lora": "PEFT LoRA r=8 + DDP"}
COLUMNS = ["contestant", "processes × threads", "ms / step", "examples / s", "speed-up", "scaling efficiency",
           "step / PEFT+DDP"]
PARITY_RECIPE = common.REPO / "recipes" / "quickstart-causal.yaml"


# ---------------------------------------------------------------------------------------------
# Worker: one process of a torchrun launch


def worker(args: argparse.Namespace) -> None:
    from sora_cli import dist

    world = dist.start(args.device)
    device = world.device if world.size > 1 else torch.device(args.device)
    s = common.settings(args.smoke, steps=args.steps)
    setup = common.load_setup(s, args.smoke, Path(args.work), device=str(device))
    order = TrainOrder(len(setup.train), s.batch_size, 0)
    batches = [{k: v.to(device) for k, v in collate(setup.train, world.part(order.indices(k)[1]), setup.pad_id)
                .items()} for k in range(args.steps)]
    steps = {key: stepper(key, setup, s, world) for key in CONTESTANTS}
    times = interleaved_steps(steps, batches, args.repeats)
    if world.main:
        Path(args.result).write_text(json.dumps({
            "processes": world.size, "threads": torch.get_num_threads(), "global_batch": s.batch_size,
            "device": device.type, "times": times}))
    dist.stop()


def stepper(key: str, setup: common.Setup, s: common.Settings, world: Any) -> Any:
    """step(batch): one optimizer step of the contestant on this rank's slice of a global batch."""
    c = common.build(key, setup, s, 0)
    model, own = c.model, Strategy(world)
    if key.startswith("peft") and world.size > 1:  # DDP averages the gradients itself, during backward
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(c.model, device_ids=[world.device] if world.device.type == "cuda" else None)
        own = ONE
    params, max_norm, counter = c.params, s.recipe.train.max_grad_norm or 0.0, iter(range(10**9))
    model.train()

    def step(batch: dict[str, torch.Tensor]) -> None:
        train_step(model, setup.task, c.hooks, c.optimizer, [batch], params, max_norm, contextlib.nullcontext(),
                   next(counter), own)
        common.sync(setup.device)

    return step


# ---------------------------------------------------------------------------------------------
# Driver


def launch(nproc: int, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    result = work / f"speed-{nproc}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(Path(__file__).resolve()), "--worker", "--result", str(result), "--work", str(work),
           "--device", args.device, "--steps", str(args.steps), "--repeats", str(args.repeats),
           *(["--smoke"] if args.smoke else [])]
    # N processes x 1 thread on CPU, whatever OMP_NUM_THREADS says (torchrun sets 1 only where it is unset)
    threads = {"OMP_NUM_THREADS": "1"} if nproc > 1 and args.device == "cpu" else {}
    subprocess.run(cmd, check=True, env={**os.environ, "PYTHONPATH": str(common.REPO), **threads})
    return json.loads(result.read_text())


def speed_rows(runs: list[dict[str, Any]]) -> tuple[list[list[str]], list[dict[str, Any]]]:
    one = runs[0]
    rows, data = [], []
    for run in runs:
        for key, label in CONTESTANTS.items():
            ms = 1000 * statistics.median(run["times"][key])
            base = 1000 * statistics.median(one["times"][key])
            speedup = base / ms
            vs_peft = ratio(run["times"], key, "peft-lora")
            row = {"contestant": key, "processes": run["processes"], "threads": run["threads"], "ms_per_step": ms,
                   "examples_per_s": run["global_batch"] / (ms / 1000), "speedup": speedup,
                   "efficiency": speedup / run["processes"], "step_vs_peft_ddp": vs_peft}
            data.append(row)
            rows.append([label, f"{run['processes']} × {run['threads']}", f"{ms:.1f}", f"{row['examples_per_s']:.1f}",
                         f"{speedup:.2f}", f"{row['efficiency']:.2f}", f"{vs_peft:.3f}"])
    return rows, data


def parity(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """`sora train` of the causal quickstart for a few steps: with 1 process, with 2 processes, and with 1 process
    cutting each batch into the 2 micro-batches the 2 processes take (train.batch_size halved, train.grad_accum 2,
    one thread as each of the 2 processes has). The largest loss and adapter differences of 2 processes from each."""
    from safetensors.torch import load_file

    batch = load_recipe(PARITY_RECIPE).train.batch_size
    over = [f"train.max_steps={args.parity_steps}", "train.log_every=1", "train.eval_every=null",
            "data.max_eval_samples=8", "train.save_every=null"]
    split = [f"train.batch_size={batch // 2}", "train.grad_accum=2"]
    runs = {}
    for name, n, extra, threads in (("one", 1, [], None), ("two", 2, [], None), ("split", 1, split, "1")):
        out = work / f"parity-{name}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", "-m",
               "sora_cli", "train", str(PARITY_RECIPE), "-o", str(out), "--overwrite", *over, *extra]
        env = {**os.environ, **({"OMP_NUM_THREADS": threads} if threads else {})}
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=env)
        losses = [e["loss"] for e in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
                  if e["event"] == "train"]
        runs[name] = (losses, load_file(out / "final" / "adapter.safetensors"))

    def gap(name: str) -> dict[str, float]:
        (la, ta), (lb, tb) = runs[name], runs["two"]
        return {"max_rel_loss_diff": max(abs(x - y) / abs(x) for x, y in zip(la, lb)),
                "max_tensor_diff": max(float((ta[k].double() - tb[k].double()).abs().max()) for k in ta)}

    return {"recipe": str(PARITY_RECIPE.relative_to(common.REPO)), "steps": args.parity_steps, "batch": batch,
            "vs_one": gap("one"), "vs_split": gap("split"),
            "max_tensor_abs": max(float(t.double().abs().max()) for t in runs["one"][1].values()),
            "losses": {name: losses for name, (losses, _) in runs.items()}}


def markdown(data: dict[str, Any]) -> str:
    """ddp.md from ddp.json (what a run wrote, or --from-json)."""
    facts, par, how = data["machine"], data["parity"], data["settings"]
    where = facts.get("gpu") or f"{facts['cpu']}, {facts['cores']} cores"
    text = [f"### Data parallel (torchrun): {where}\n",
            f"`{' '.join(['python bench/ddp.py', *how['argv']])}` (commit {facts['commit']}). "
            f"{'A tiny random BERT (smoke)' if how['smoke'] else 'MiniLM quickstart'}, global batch 16, "
            f"{how['steps']} steps × {how['repeats']} interleaved repeats; the "
            "speed-up is over the same contestant in one process.\n",
            common.markdown_table(COLUMNS, speed_rows(data["runs"])[0]) if data["runs"] else "", ""]
    if facts["device"] == "cpu" and data["runs"]:
        most = max(run["processes"] for run in data["runs"])
        widest = max(spread(t) for run in data["runs"] for t in run["times"].values())
        text.append(f"On a CPU the processes share the machine's {facts['cores']} cores: {most} processes × 1 thread "
                    f"have no more compute than 1 process × {data['runs'][0]['threads']} threads, so a speed-up "
                    "here only measures how well each uses the cores (the repeats of one contestant spread by up to "
                    f"{100 * widest:.0f}%); scaling needs more devices (`--device cuda --nprocs 1 N`).\n")
    if par is not None:
        one, split = par["vs_one"], par["vs_split"]
        text.append(f"Parity, `sora train {par['recipe']}` for {par['steps']} steps (SmolLM2 has no dropout), 2 "
                    f"processes on the global batch of {par['batch']}: against 1 process, the logged losses differ "
                    f"by at most {one['max_rel_loss_diff']:.1e} (relative) and the final adapter tensors by "
                    f"{one['max_tensor_diff']:.1e} (largest entry {par['max_tensor_abs']:.3g}): each process pads its "
                    f"half of the batch to its own length, so the sums run in another order. Against 1 process "
                    f"cutting the batch the same way (batch_size {par['batch'] // 2}, grad_accum 2, one thread): "
                    f"{split['max_rel_loss_diff']:.1e} and {split['max_tensor_diff']:.1e}.\n")
    return "\n".join(text)


def main(argv: list[str] | None = None) -> Path | None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["speed", "parity", "all"], default="all")
    parser.add_argument("--nprocs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--parity-steps", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--from-json", type=Path, help="rewrite ddp.md beside this ddp.json; run nothing")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.steps = args.steps or (2 if args.smoke else 8)
    args.repeats = args.repeats or (2 if args.smoke else 5)
    if args.worker:
        worker(args)
        return None
    if args.from_json is not None:  # rewrite ddp.md beside it; run nothing
        (args.from_json.parent / "ddp.md").write_text(markdown(json.loads(args.from_json.read_text())))
        return args.from_json.parent
    args.argv = argv if argv is not None else sys.argv[1:]
    facts = common.machine(torch.device(args.device))
    out = common.results_dir(args.out, facts, args.smoke)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        runs = [launch(n, args, work) for n in args.nprocs] if args.part in ("speed", "all") else []
        par = parity(args, work) if args.part in ("parity", "all") and not args.smoke else None
    data = {"machine": facts, "settings": {"argv": args.argv, "smoke": args.smoke, "steps": args.steps,
                                           "repeats": args.repeats}, "speed": speed_rows(runs)[1] if runs else [],
            "runs": runs, "parity": par}
    common.write_json(out / "ddp.json", data)
    (out / "ddp.md").write_text(markdown(data))
    return out


if __name__ == "__main__":
    main()
