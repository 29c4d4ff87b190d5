"""What limits 10 inner steps: start from the converged geometry with least-squares embeddings (issue 5).

    python scripts/eval_oracle_geometry.py --prompts 64 --device cpu --out figures/data/meta/oracle_geometry.json

Fits validation prompts for 300 steps at N = L/4 (from the grid, and from the learned start), then
keeps each fit's geometry (centres, widths, weights) and replaces its embeddings by the
least-squares ones (``closed_form_v``), i.e. an initializer that predicts the converged splat
placement exactly but knows nothing of the decoder. Token accuracy of that start after 0 and 10
inner steps (the picked short-budget Adam and the default solved update), against the learned
start's own (10 steps, picked Adam) and the converged fits' with their own embeddings.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from dataclasses import replace
from pathlib import Path

import torch

import fixedpos
import splatopt
from splatopt import InnerOptimizer, WarmStart, closed_form_v
from splatopt.bench import device_label
from splatopt.learned import load_learned
from splatopt.render import splat_weights

sys.path.insert(0, str(Path(__file__).parent))
from eval_by_splat_count import picked_optimizer  # noqa: E402

# the learned start's short-budget inner Adam, picked on validation (scripts/select_learned_momentum.py)
_, PICKED = picked_optimizer("learned_momentum_test")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="figures/data/meta/oracle_geometry.json")
    args = parser.parse_args()
    model = fixedpos.load()
    learned = load_learned(model).to(args.device)
    prompts = fixedpos.sample_prompts(model, fixedpos.load_corpus_spec("stdlib:validation"), args.prompts, max_tokens=64, seed=0)
    common = dict(device=args.device, progress=False, record_every=0)
    acc = lambda r: float(r.token_accuracy.mean())  # noqa: E731
    out = {"learned start, picked Adam, 10 steps": acc(splatopt.fit(prompts, model, n_splats=0.25, steps=10, init=learned,
                                                                   optimizer=PICKED, **common))}
    batch = model.tokenize(prompts, device=args.device)
    field = model.encode(batch)
    for name, init in (("grid", "grid"), ("learned", learned)):
        converged = splatopt.fit(prompts, model, n_splats=0.25, steps=300, init=init, **common)
        s, counts = converged.splats, [int(c) for c in converged.splats.counts]
        out[f"{name} start, 300 steps (converged)"] = acc(converged)
        least_squares = replace(s, v=closed_form_v(splat_weights(s, batch.ids.shape[1]), field, batch.mask, s.mask))
        for label, optimizer, steps in (("0 steps", None, 0), ("picked Adam, 10 steps", PICKED, 10),
                                        ("default solved update, 10 steps", InnerOptimizer(embeddings="solve"), 10)):
            r = splatopt.fit(prompts, model, n_splats=counts, steps=steps, init=WarmStart(least_squares), optimizer=optimizer, **common)
            out[f"{name}-300 geometry + least-squares embeddings, {label}"] = acc(r)
        for k, v in out.items():
            print(f"{100 * v:6.2f}  {k}", flush=True)
    device = device_label(args.device)
    Path(args.out).write_text(json.dumps({"command": shlex.join(["python", *sys.argv]), "device": device,
                                          "prompts": f"stdlib:validation, {args.prompts} prompts (seed 0), N = L/4",
                                          "token_accuracy": out}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
