"""Does weighting the decoder's cross-entropy more raise the learned start's short-budget accuracy? (issue 5)

    python scripts/probe_objective_weights.py --prompts 512 --device cuda --out figures/data/meta/objective_weights.json

The 10-step fits of the learned start trade field error for decodability, and token accuracy is what
the bar counts, so the inner objective's balance between the field's MSE and the decoder's
cross-entropy is a natural knob the selections of section 4 left at the default (mse + ce). On
validation prompts (stdlib:validation, seed 0; never the test split), the learned start with the
update picked in the decoder's Fisher metric (figures/studies/learned_metric_test.toml's optimizer)
fits each objective for 10 and 20 inner steps at N = L/4. Token accuracy is averaged per prompt.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import torch

import splatopt
from splatopt.bench import device_label

sys.path.insert(0, str(Path(__file__).parent))
from eval_by_splat_count import validation_setup  # noqa: E402

OBJECTIVES = ["mse+ce", "mse+3*ce", "mse+10*ce", "ce", "0.3*mse+ce", "3*mse+ce"]
BUDGETS = [10, 20]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=512)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="figures/data/meta/objective_weights.json")
    args = parser.parse_args()
    model, prompts, name, optimizer, learned = validation_setup(args.prompts, args.device)
    results = {}
    for objective in OBJECTIVES:
        for steps in BUDGETS:
            r = splatopt.fit(prompts, model, n_splats=0.25, device=args.device, progress=False, record_every=0,
                             init=learned, optimizer=optimizer, steps=steps, objective=objective)
            results.setdefault(objective, {})[str(steps)] = {
                "token_accuracy": float(r.token_accuracy.float().mean()),
                "field_error": float(r.field_error.float().mean())}
            print(objective, steps, f"{100 * results[objective][str(steps)]['token_accuracy']:.2f} %", flush=True)
    Path(args.out).write_text(json.dumps({
        "command": shlex.join(["python", *sys.argv]), "device": device_label(args.device), "optimizer": name,
        "prompts": f"stdlib:validation, {args.prompts} prompts (seed 0, L <= 64), N = L/4", "results": results}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
