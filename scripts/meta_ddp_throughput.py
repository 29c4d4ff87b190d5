"""Meta-training throughput of 2 DDP processes (one GPU each) against one process, on one host.

    python scripts/meta_ddp_throughput.py --out figures/data/meta/ddp_throughput.json

Runs ``splatopt meta-train`` with the shipped initializer's config (outer steps cut to --steps, no
evaluation, no checkpoint in between) once as one process and once under ``torchrun`` with 2
processes. Each rank takes ``batch`` prompts per outer step, so 2 processes train on twice the
prompts per step. Throughput: prompts per second over outer steps (--skip, --steps], from the
``elapsed_s`` that rank 0 logs (the first steps, with CUDA's and the allocator's warm-up, are
skipped); ratio: 2-process over 1-process. Both runs draw their prompts and budget fractions from
the same seeded generator, but the 2-process run draws twice the prompts per step, so the sequence
of fractions differs: over 100+ steps the mix is the same in expectation.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

CONFIG = Path(__file__).resolve().parents[1] / "splatopt" / "initializers" / "minilm-l6-layer2.toml"


def run(world: int, out: Path, steps: int, log_every: int) -> list[dict]:
    cli = ["-m", "splatopt.cli", "meta-train", "--config", str(CONFIG), "--out", str(out), "--quiet",
           "--set", f"outer_steps={steps}", "--set", "eval_every=0", "--set", f"checkpoint_every={10 * steps}",
           "--set", f"log_every={log_every}", "--set", "time_limit_s=1e9"]
    launcher = [sys.executable] if world == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    f"--nproc_per_node={world}"]
    # NVLink multicast stays off (NCCL_NVLS_ENABLE=0) on shared hosts: a fault there can take the GPUs down
    env = {**os.environ, "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
    started = time.perf_counter()
    subprocess.run(launcher + cli, check=True, env=env)
    print(f"world {world}: {time.perf_counter() - started:.1f} s including model load and encoding", flush=True)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=300, help="outer steps per run")
    parser.add_argument("--skip", type=int, default=50, help="outer steps left out of the timing (warm-up)")
    parser.add_argument("--out", default="figures/data/meta/ddp_throughput.json")
    args = parser.parse_args()
    if torch.cuda.device_count() < 2:
        raise SystemExit(f"this measurement needs 2 GPUs; {torch.cuda.device_count()} visible")
    if not 0 < args.skip < args.steps:
        raise SystemExit(f"--skip {args.skip} must lie between 0 and --steps {args.steps}")
    log_every = 10 if args.skip % 10 == 0 == args.steps % 10 else 1
    batch = int(__import__("tomllib").loads(CONFIG.read_text())["batch"])
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for world in (1, 2):
            rows = {r["step"]: r for r in run(world, Path(tmp) / f"world{world}", args.steps, log_every)}
            seconds = rows[args.steps]["elapsed_s"] - rows[args.skip]["elapsed_s"]
            prompts = (args.steps - args.skip) * batch * world
            runs[world] = {"world_size": world, "prompts_per_step": batch * world, "timed_steps": args.steps - args.skip,
                           "seconds": round(seconds, 3), "prompts_per_s": prompts / seconds,
                           "outer_steps_per_s": (args.steps - args.skip) / seconds,
                           "final_loss": rows[args.steps]["loss"]}
            print(json.dumps(runs[world]), flush=True)
    out = {
        "device": torch.cuda.get_device_name(0), "gpus": 2, "torch": torch.__version__,
        "command": shlex.join(["python", *sys.argv]), "config": str(CONFIG.relative_to(CONFIG.parents[2])),
        "runs": [runs[1], runs[2]], "throughput_ratio": runs[2]["prompts_per_s"] / runs[1]["prompts_per_s"],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"2-process / 1-process throughput: x{out['throughput_ratio']:.2f}; wrote {args.out}")


if __name__ == "__main__":
    main()
