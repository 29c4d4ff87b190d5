"""Estimate the decoder's Fisher in field space for the default model and ship it (issue 5).

    python scripts/estimate_field_fisher.py --prompts 256 --device cpu

Measured at the fields the learned start passes through in a short fit: its proposal (0 steps)
and after 10 inner steps of the short-budget Adam picked on validation (scripts/select_learned_momentum.py),
N = L/4, on training prompts only (stdlib:train). Writes
``splatopt/initializers/<model>-layer<k>.fisher.safetensors``, which ``InnerOptimizer(metric="fisher")``
reads (:mod:`splatopt.fisher`).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import torch

import fixedpos
from splatopt.fisher import estimate_field_fisher, save_field_fisher, shipped_fisher_path
from splatopt.learned import load_learned

sys.path.insert(0, str(Path(__file__).parent))
from eval_by_splat_count import picked_optimizer  # noqa: E402

# the learned start's short-budget inner Adam in the field's own coordinates, picked on validation
_, PICKED = picked_optimizer("learned_momentum_test")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None, help="default: the shipped file for the default model")
    args = parser.parse_args()
    model = fixedpos.load()
    texts = fixedpos.sample_prompts(model, fixedpos.load_corpus_spec("stdlib:train"), args.prompts, max_tokens=64, seed=args.seed)
    started = time.perf_counter()
    fisher = estimate_field_fisher(model, texts, init=load_learned(model), optimizer=PICKED, steps=(0, 10), device=args.device)
    out = args.out or shipped_fisher_path(model)
    save_field_fisher(out, fisher, model, {
        "command": shlex.join(["python", *sys.argv]), "corpus": "stdlib:train", "prompts": args.prompts, "seed": args.seed,
        "max_tokens": 64, "n_splats": 0.25, "init": "learned", "steps": [0, 10], "optimizer": PICKED.to_dict(),
        "seconds": round(time.perf_counter() - started, 1), "device": str(args.device)})
    evals = torch.linalg.eigvalsh(fisher.double())
    print(f"wrote {out}: d={fisher.shape[0]}, eigenvalues {float(evals[-1]):.3g} (largest) / {float(evals.median()):.3g} (median)")


if __name__ == "__main__":
    main()
