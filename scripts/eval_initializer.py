"""A meta-trained initializer against the shipped one, with the picked short-budget update (issue 5).

    splatopt meta-train --config figures/data/meta/remeta_longer.toml --out runs/longer --device cuda
    python scripts/eval_initializer.py runs/longer/initializer.safetensors --device cuda --out figures/data/meta/remeta_longer.json

On validation prompts (stdlib:validation, seed 0; never the test split), N = L/4, each initializer
fits for 0, 10 and 20 inner steps (a separate fit per budget) with the update picked in the
decoder's Fisher metric for the shipped one (figures/studies/learned_metric_test.toml's optimizer),
and the candidate also with that update's geometry rates rescaled by its own learned scales (the
pick's were the shipped network's scales times the defaults). Token accuracy is averaged per prompt.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from dataclasses import replace
from pathlib import Path

import torch

import splatopt
from splatopt.bench import device_label
from splatopt.learned import LearnedInitializer

sys.path.insert(0, str(Path(__file__).parent))
from eval_by_splat_count import validation_setup  # noqa: E402

BUDGETS = [0, 10, 20]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("initializer", help="a LearnedInitializer file (splatopt meta-train writes out/initializer.safetensors)")
    parser.add_argument("--prompts", type=int, default=512)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    model, prompts, name, picked, shipped = validation_setup(args.prompts, args.device)
    candidate = LearnedInitializer.load(args.initializer, device=args.device).eval().requires_grad_(False)
    scale_v = float(candidate.log_lr_scale.exp()[3])
    own = candidate.inner_optimizer(replace(picked, lr_mu=0.1, lr_log_sigma=0.05, lr_weight=0.05, lr_v=picked.lr_v / scale_v))
    runs = {f"shipped, {name}": (shipped, picked), f"candidate, {name}": (candidate, picked),
            f"candidate, {name} with its own learned geometry scales": (candidate, own)}
    results = {}
    for label, (init, optimizer) in runs.items():
        for steps in BUDGETS:
            r = splatopt.fit(prompts, model, n_splats=0.25, device=args.device, progress=False, record_every=0,
                             init=init, optimizer=optimizer, steps=steps)
            results.setdefault(label, {})[str(steps)] = float(r.token_accuracy.float().mean())
            print(label, steps, f"{100 * results[label][str(steps)]:.2f} %", flush=True)
    Path(args.out).write_text(json.dumps({
        "command": shlex.join(["python", *sys.argv]), "device": device_label(args.device),
        "prompts": f"stdlib:validation, {args.prompts} prompts (seed 0, L <= 64), N = L/4",
        "candidate": {"path": args.initializer, "meta": candidate.meta, "lr_scales": candidate.log_lr_scale.exp().tolist()},
        "token_accuracy": results}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
