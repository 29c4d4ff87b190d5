"""Peak GPU memory of fitting one 10,000-token document at N = L/4 (issue 7), per objective.

    python scripts/long_fit_memory.py --out figures/data/bench      # writes long-fit-memory.json

The document is cut from the stdlib test split joined into one text; fit renders it with the tiled
local renderer (texts over 1,024 tokens get truncate = 4) and, on CUDA, the chunked cross-entropy.
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="figures/data/bench")
    parser.add_argument("--tokens", type=int, default=10_000)
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("long_fit_memory: needs a CUDA device (it measures GPU memory)")
    model = fixedpos.load()
    doc = fixedpos.sample_prompts(model, [" ".join(fixedpos.load_corpus("stdlib", "test"))], 1,
                                  max_tokens=args.tokens, min_tokens=args.tokens - 100)
    out = {"command": "python scripts/long_fit_memory.py " + shlex.join(argv if argv is not None else sys.argv[1:])}
    for objective in ("mse", "mse+ce"):
        torch.cuda.reset_peak_memory_stats()
        r = splatopt.fit(doc, model, n_splats=0.25, steps=args.steps, objective=objective, device="cuda", progress=False,
                         record_every=0)
        out[objective] = {"peak_gb": torch.cuda.max_memory_allocated() / 1e9, "device": torch.cuda.get_device_name(),
                          **r.summary(), "truncate": r.config["truncate"]}
        print(objective, out[objective])
    path = Path(args.out) / "long-fit-memory.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
