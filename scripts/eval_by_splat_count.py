"""Where the 10-step gap lies: token accuracy by the prompt's splat count N = L/4 (issue 5).

    python scripts/eval_by_splat_count.py --prompts 512 --device cuda --out figures/data/meta/by_splat_count.json

On validation prompts (stdlib:validation, seed 0; never the test split), the learned start with
the update picked in the decoder's Fisher metric (figures/studies/learned_metric_test.toml's
optimizer) after 10, 20 and 25 inner steps, and the grid start with the default Adam after 300
(the bar), at N = L/4. Token accuracy is averaged per prompt, as in every study, then over the
prompts of each splat-count bucket.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tomllib
from pathlib import Path

import torch

import fixedpos
import splatopt
from splatopt import InnerOptimizer
from splatopt.bench import device_label
from splatopt.learned import load_learned

BUCKETS = [(1, 2), (3, 4), (5, 8), (9, 16)]  # splats per prompt, inclusive


def picked_optimizer(study_name: str = "learned_metric_test") -> tuple[str, InnerOptimizer]:
    """(name, InnerOptimizer) of the one method of ``figures/studies/<study_name>.toml``: the update a
    select_learned_momentum.py run picked on validation and wrote into its test study."""
    study = tomllib.loads((Path(__file__).resolve().parents[1] / "figures" / "studies" / f"{study_name}.toml").read_text())
    (name, method), = study["factors"]["method"].items()
    return name, InnerOptimizer(**method["optimizer"])


def validation_setup(n_prompts: int, device: str):
    """What the issue-5 probes share: (model, n_prompts stdlib:validation prompts (seed 0, L <= 64; never
    the test split), the picked update's name and InnerOptimizer, the shipped initializer on ``device``)."""
    model = fixedpos.load()
    prompts = fixedpos.sample_prompts(model, fixedpos.load_corpus_spec("stdlib:validation"), n_prompts, max_tokens=64, seed=0)
    name, optimizer = picked_optimizer()
    return model, prompts, name, optimizer, load_learned(model).to(device)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=512)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="figures/data/meta/by_splat_count.json")
    args = parser.parse_args()
    model, prompts, name, optimizer, learned = validation_setup(args.prompts, args.device)
    runs = {f"learned, {name}, {k} steps": dict(init=learned, optimizer=optimizer, steps=k) for k in (10, 20, 25)}
    runs["grid, default Adam, 300 steps"] = dict(init="grid", optimizer=None, steps=300)
    out = {}
    for label, kw in runs.items():
        r = splatopt.fit(prompts, model, n_splats=0.25, device=args.device, progress=False, record_every=0, **kw)
        acc, counts = r.token_accuracy.float().cpu(), r.splats.counts.cpu()
        row = {"all": {"prompts": len(acc), "token_accuracy": float(acc.mean())}}
        for lo, hi in BUCKETS:
            m = (counts >= lo) & (counts <= hi)
            row[f"N {lo}-{hi}"] = {"prompts": int(m.sum()), "token_accuracy": float(acc[m].mean()) if m.any() else None,
                                  "prompts_below_100": int((acc[m] < 1).sum())}
        out[label] = row
        print(label, json.dumps({k: round(100 * v["token_accuracy"], 2) for k, v in row.items() if v["token_accuracy"] is not None}), flush=True)
    device = device_label(args.device)
    Path(args.out).write_text(json.dumps({"command": shlex.join(["python", *sys.argv]), "device": device,
                                          "prompts": f"stdlib:validation, {args.prompts} prompts (seed 0), N = L/4",
                                          "results": out}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
