"""Wall time of edit() against a cold fit, and of learned-init fits against the grid's 300 steps, on one GPU.

    python scripts/time_edit.py --out figures/data/edit_wall/after.json

200 validation prompts with the random single-span edits of scripts/eval_edit.py (seed 0), N = L/4:
the old fit (300 steps), then the edited texts fitted cold (300 steps, three times) and re-fitted
by edit() with its defaults (60 steps, four times: the first call includes one-off warm-ups). Then
512 test prompts fitted from the learned start with the picked optimizer (10 and 26 steps, three
times each) and from the grid (300 steps). Times are synchronized wall-clock seconds per call.
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import sys
import time
from pathlib import Path

import torch

import fixedpos
import splatopt
from splatopt.bench import device_label

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_edit import random_edit  # noqa: E402


def timed(f, device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t = time.perf_counter()
    r = f()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return r, time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="figures/data/edit_wall/after.json")
    args = parser.parse_args()
    dev = args.device
    model = fixedpos.load()
    prompts = fixedpos.sample_prompts(model, fixedpos.load_corpus("stdlib", "validation"), 200, max_tokens=56, seed=0)
    vocab = sorted({w for p in fixedpos.load_corpus("stdlib", "validation")[:300] for w in p.split() if w.isalpha()})
    rng = random.Random(0)
    edited = [random_edit(p, rng, vocab)[0] for p in prompts]
    common = dict(n_splats=0.25, progress=False, record_every=0, device=dev)
    out: dict = {"device": device_label(dev), "torch": torch.__version__, "command": shlex.join(["python", *sys.argv])}
    old, _ = timed(lambda: splatopt.fit(prompts, model, steps=300, **common), dev)
    out["cold_fit_s"], out["edit_s"] = [], []
    for _ in range(3):
        cold, t = timed(lambda: splatopt.fit(edited, model, steps=300, **common), dev)
        out["cold_fit_s"].append(t)
    for _ in range(4):
        w, t = timed(lambda: splatopt.edit(old, edited, model=model, steps=60, progress=False, record_every=0), dev)
        out["edit_s"].append(t)
    out.update(cold_acc=float(cold.token_accuracy.mean()), edit_acc=float(w.token_accuracy.mean()), edit_fit_seconds=w.seconds,
               edit_starts={s: sum(r["start"] == s for r in w.edit) for s in sorted({r["start"] for r in w.edit})})
    test = fixedpos.sample_prompts(model, fixedpos.load_corpus("stdlib", "test"), 512, max_tokens=64, seed=0)
    for steps in (10, 26):
        out[f"learned_{steps}_s"] = []
        for _ in range(3):
            r, t = timed(lambda: splatopt.fit(test, model, steps=steps, init="learned", optimizer="picked", **common), dev)
            out[f"learned_{steps}_s"].append(t)
        out[f"learned_{steps}_acc"], out[f"learned_{steps}_graphs"] = float(r.token_accuracy.mean()), r.config["cuda_graphs"]
    g, out["grid_300_s"] = timed(lambda: splatopt.fit(test, model, steps=300, **common), dev)
    out["grid_300_acc"] = float(g.token_accuracy.mean())
    print(json.dumps(out), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
