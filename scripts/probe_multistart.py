"""Does a best-of-k start close the 10-step gap (issue 5)? A probe on validation prompts.

    python scripts/probe_multistart.py --prompts 512 --device cuda --out figures/data/meta/multistart.json

stdlib:validation (seed 0, L <= 64; never the test split), N = L/4. Each start is fitted for 10
inner steps with the update picked in the decoder's Fisher metric; per prompt the start that
decodes the most tokens is kept (ties: the lower relative field error). k starts cost k fits, so
this trades compute for steps: the result says whether starts, not steps, are what is missing.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import torch

import splatopt
from splatopt import GridInit
from splatopt.bench import device_label

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_by_splat_count import BUCKETS, validation_setup  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=512)
    parser.add_argument("--steps", type=int, nargs="+", default=[10])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="figures/data/meta/multistart.json")
    args = parser.parse_args()
    model, prompts, name, optimizer, learned = validation_setup(args.prompts, args.device)
    starts = {"learned": dict(init=learned, optimizer=optimizer),
              "learned, meta-trained update": dict(init=learned, optimizer=None),
              "grid": dict(init="grid", optimizer=optimizer),
              **{f"grid jitter 0.5 seed {s}": dict(init=GridInit(jitter=0.5), optimizer=optimizer, seed=s) for s in (1, 2, 3, 4)},
              "tokens": dict(init="tokens", optimizer=optimizer)}
    out = {}
    for steps in args.steps:
        acc, err = {}, {}
        for label, kw in starts.items():
            r = splatopt.fit(prompts, model, n_splats=0.25, steps=steps, device=args.device, progress=False, record_every=0, **kw)
            acc[label], err[label] = r.token_accuracy.double().cpu(), r.field_error.double().cpu()
            counts = r.splats.counts.cpu()
        labels = list(starts)
        rows = {}
        for k in range(1, len(labels) + 1):
            chosen = labels[:k]
            a = torch.stack([acc[c] for c in chosen])  # [k, P]
            e = torch.stack([err[c] for c in chosen])
            score = a - 1e-6 * e / (1 + e)  # most tokens first, then the lower field error
            best = a.gather(0, score.argmax(0, keepdim=True))[0]
            row = {"starts": chosen, "all": float(best.mean())}
            for lo, hi in BUCKETS:
                m = (counts >= lo) & (counts <= hi)
                row[f"N {lo}-{hi}"] = float(best[m].mean()) if m.any() else None
            rows[f"best of {k}"] = row
            print(steps, "steps, best of", k, json.dumps({kk: round(100 * v, 2) for kk, v in row.items() if isinstance(v, float)}),
                  flush=True)
        out[f"{steps} steps"] = {"single": {c: float(acc[c].mean()) for c in labels}, "best_of": rows}
        print(steps, "steps single:", json.dumps({c: round(100 * float(acc[c].mean()), 2) for c in labels}), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"command": shlex.join(["python", *sys.argv]), "device": device_label(args.device),
                                          "prompts": f"stdlib:validation, {args.prompts} prompts (seed 0), N = L/4",
                                          "update": name, "results": out}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
