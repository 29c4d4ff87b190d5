"""Core acceptance: token accuracy of fitted splats on 512 test-split prompts and 512 out-of-domain prompts.

    python scripts/eval_core.py --out figures/data/core_acceptance.json            # the acceptance run
    python scripts/eval_core.py --split validation --sweep --out figures/data/core_sweep.json  # tuning (never on test)

Prompts are <= 64 tokens (fixedpos.sample_prompts), default model and layer, heuristic (grid) init,
at most 300 steps, N = L/2 and N = L/4 (and L/8 reported).
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

import fixedpos
import splatopt
from splatopt.bench import device_label

SWEEP = {
    "default": {},
    "tokens-init": {"init": "tokens"},
    "erf": {"kernel": "erf"},
    "ce-only": {"objective": "ce"},
    "lr_v-0.1": {"optimizer": {"lr_v": 0.1}},
    "lr_mu-0.3": {"optimizer": {"lr_mu": 0.3}},
    "lr-all-x2": {"optimizer": {"lr_mu": 0.2, "lr_log_sigma": 0.1, "lr_weight": 0.1, "lr_v": 0.1}},
}


def run(prompts: list[str], model, frac: float, steps: int, device, seed: int, variant: dict) -> dict:
    opt = splatopt.InnerOptimizer(**variant.get("optimizer", {}))
    result = splatopt.fit(
        prompts, model, n_splats=frac, steps=steps, objective=variant.get("objective", "mse+ce"),
        init=variant.get("init", "grid"), kernel=variant.get("kernel", "gaussian"), optimizer=opt, seed=seed,
        device=device, record_every=max(steps // 10, 1), progress=False,
    )
    s = result.summary()
    acc = result.token_accuracy
    s["token_accuracy_ci95"] = float(1.96 * acc.std() / len(acc) ** 0.5)
    s["prompts_perfect"] = float((acc == 1).float().mean())
    s["curve"] = {"step": result.history["step"].tolist(), "token_accuracy": result.history["token_accuracy"].mean(1).tolist()}
    return s


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=512)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--split", default="test", choices=["validation", "test"])
    parser.add_argument("--fracs", type=float, nargs="+", default=[0.5, 0.25, 0.125])
    parser.add_argument("--sweep", action="store_true", help="try the SWEEP variants (use with --split validation)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layer", type=int, default=None)
    parser.add_argument("--select", action="store_true",
                        help="sweep the variants on --select-n validation prompts at N = L/4, then evaluate default and the best "
                             "on --split (write it to figures/data/core_selection.json with --out)")
    parser.add_argument("--select-n", type=int, default=256, help="validation prompts for --select")
    parser.add_argument("--out", default="figures/data/core_acceptance.json")
    args = parser.parse_args()

    model = fixedpos.load(layer=args.layer)
    header = {
        "device": device_label(args.device),
        "torch": torch.__version__, "python": platform.python_version(), "model": model.name, "layer": model.layer,
        "split": args.split, "n": args.n, "command": shlex.join(["python", *sys.argv]),
    }

    def write(rows: list[dict]) -> None:  # after every row: an interrupted run keeps what it measured
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({**header, "rows": rows}, indent=1))

    corpora = {
        f"stdlib:{args.split}": fixedpos.load_corpus("stdlib", args.split),
        "licenses": fixedpos.load_corpus("licenses"),
    }
    variants = SWEEP if args.sweep else {"default": {}}
    rows = []
    if args.select:
        val = fixedpos.sample_prompts(model, fixedpos.load_corpus("stdlib", "validation"), args.select_n, seed=args.seed)
        scores = {}
        for name, variant in SWEEP.items():
            s = run(val, model, 0.25, args.steps, args.device, args.seed, variant)
            scores[name] = s["token_accuracy"]
            rows.append({"corpus": "stdlib:validation", "variant": name, "n_splats": 0.25, "steps": args.steps, **s})
            write(rows)
            print(f"select stdlib:validation {name:<12} N=L*0.25 acc {s['token_accuracy']:.4f}", flush=True)
        best = max(scores, key=scores.get)
        print(f"selected on validation: {best}", flush=True)
        variants = {"default": {}, best: SWEEP[best]} if best != "default" else {"default": {}}
    for corpus, texts in corpora.items():
        prompts = fixedpos.sample_prompts(model, texts, args.n, seed=args.seed)
        for name, variant in variants.items():
            for frac in args.fracs:
                t0 = time.perf_counter()
                s = run(prompts, model, frac, args.steps, args.device, args.seed, variant)
                row = {"corpus": corpus, "variant": name, "n_splats": frac, "steps": args.steps, **s,
                       "wall_s": round(time.perf_counter() - t0, 2)}
                rows.append(row)
                write(rows)
                print(f"{corpus:<18} {name:<12} N=L*{frac:<6} acc {s['token_accuracy']:.4f} ±{s['token_accuracy_ci95']:.4f} "
                      f"pooled {s['token_accuracy_pooled']:.4f} err {s['field_error']:.3f} cos {s['cosine']:.3f} "
                      f"{row['wall_s']} s", flush=True)
    write(rows)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
