"""Learned vs grid starts, each with Adam or solved embeddings, on the same prompts (issue 5).

    python scripts/eval_learned_init.py --init splatopt/initializers/minilm-l6-layer2.safetensors \
        --out figures/data/meta/eval_solve.json

512 prompts per corpus (stdlib test, licences), N = L/4; token accuracy after each step budget,
a separate fit per budget. "learned" fits with the inner update its file records; "grid-adam" and
"grid-solve" start from GridInit with the default Adam or with ``embeddings="solve"``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import torch

import fixedpos
import splatopt
from splatopt import InnerOptimizer
from splatopt.bench import device_label
from splatopt.learned import LearnedInitializer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--init", required=True, help="a learned initializer file (splatopt meta-train)")
    parser.add_argument("--prompts", type=int, default=512)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    model = fixedpos.load()
    learned = LearnedInitializer.load(args.init, device=args.device)
    starts = {"learned": (learned, None, (0, 5, 10, 20, 30, 50, 100, 300)), "grid-adam": ("grid", None, (10, 300)),
              "grid-solve": ("grid", InnerOptimizer(embeddings="solve"), (10, 30, 100))}
    acc = {}
    for corpus in ("stdlib:test", "licenses"):
        prompts = fixedpos.sample_prompts(model, fixedpos.load_corpus_spec(corpus), args.prompts, max_tokens=64, seed=0)
        for name, (init, optimizer, budgets) in starts.items():
            for steps in budgets:
                r = splatopt.fit(prompts, model, n_splats=0.25, steps=steps, init=init, optimizer=optimizer,
                                 device=args.device, progress=False, record_every=0)
                acc[f"{corpus} {name} {steps}"] = r.summary()["token_accuracy"]
                print(corpus, name, steps, f"{100 * acc[f'{corpus} {name} {steps}']:.2f}", flush=True)
    device = device_label(args.device)
    out = {"device": device, "command": shlex.join(["python", *sys.argv]), "inner_optimizer": learned.optimizer.to_dict(),
           "token_accuracy": acc}
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
