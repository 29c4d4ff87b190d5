"""How close must a start be for 10 steps to finish a two-splat fit? (issue 5)

    python scripts/probe_start_precision.py --device cpu --out figures/data/meta/start_precision_two_splat_cpu.json

The prompts: those of the 512-prompt validation sample (seed 0, L <= 64) that get two splats at
N = L/4, where the learned start loses most against the grid's 300 steps (by_splat_count.json).
Each is fitted from the grid for 300 steps (default Adam: the bar). Starts: that converged fit
itself, and with each splat's embedding moved by ``eps`` of its norm in a random direction
(geometry kept), the learned start, and the learned start's geometry with the converged
embeddings (slot k of both starts on grid slot k). Each start then takes 10 steps of each update: the picked
one (Adam in the decoder's Fisher metric, shipped for the learned start), the same with every
rate x0.25, the default solved update and the default Adam. Token accuracy after 0 and 10 steps,
and how far the learned start lies from the converged fit (splats matched in centre order).
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
from splatopt import InnerOptimizer, WarmStart
from splatopt.bench import device_label
from splatopt.learned import load_learned

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_by_splat_count import picked_optimizer  # noqa: E402


def in_centre_order(splats) -> tuple[torch.Tensor, torch.Tensor]:
    """(v [B, N, d], mu [B, N]) of each prompt's splats sorted by centre (all slots active here)."""
    order = splats.mu.argsort(1)
    return torch.gather(splats.v, 1, order[..., None].expand_as(splats.v)), torch.gather(splats.mu, 1, order)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="figures/data/meta/start_precision_two_splat_cpu.json")
    args = parser.parse_args()
    model = fixedpos.load()
    sample = fixedpos.sample_prompts(model, fixedpos.load_corpus_spec("stdlib:validation"), 512, max_tokens=64, seed=0)
    prompts = [p for p in sample if max(1, round(int(model.tokenize([p]).mask.sum()) / 4)) == 2]
    common = dict(device=args.device, progress=False, record_every=0)
    accuracy = lambda r: float(r.token_accuracy.float().mean())  # noqa: E731
    converged = splatopt.fit(prompts, model, n_splats=0.25, steps=300, **common)
    assert bool(converged.splats.mask.all()), "every two-splat prompt keeps both slots active"
    picked_name, picked = picked_optimizer()
    rates = ("lr_mu", "lr_log_sigma", "lr_weight", "lr_v")
    updates = {f"picked ({picked_name})": picked,
               "picked, every rate x0.25": replace(picked, **{k: getattr(picked, k) / 4 for k in rates}),
               "default solved update": InnerOptimizer(embeddings="solve"), "default Adam": InnerOptimizer()}
    learned = load_learned(model).to(args.device)
    learned_start = splatopt.fit(prompts, model, n_splats=0.25, steps=0, init=learned, optimizer=picked, **common).splats
    v_learned, mu_learned = in_centre_order(learned_start)
    v_conv, mu_conv = in_centre_order(converged.splats)
    generator = torch.Generator().manual_seed(0)
    starts = {}
    for eps in (0.0, 0.1, 0.2, 0.4):
        noise = torch.randn(converged.splats.v.shape, generator=generator).to(converged.splats.v)
        v = converged.splats.v + eps * converged.splats.v.norm(dim=-1, keepdim=True) * noise / noise.norm(dim=-1, keepdim=True)
        starts[f"converged, embeddings moved by {eps:.0%}"] = WarmStart(replace(converged.splats, v=v))
    starts["learned start"] = WarmStart(learned_start)
    # the learned start's geometry (centres, widths, weights) carrying the converged embeddings, slot for slot
    starts["learned geometry, converged embeddings"] = WarmStart(replace(learned_start, v=converged.splats.v))
    results = {}
    for start_name, start in starts.items():
        results[start_name] = {"0 steps": accuracy(splatopt.fit(prompts, model, n_splats=2, steps=0, init=start, **common))}
        for update_name, update in updates.items():
            r = splatopt.fit(prompts, model, n_splats=2, steps=10, init=start, optimizer=update, **common)
            results[start_name][f"10 steps, {update_name}"] = accuracy(r)
        print(start_name, json.dumps({k: round(100 * v, 1) for k, v in results[start_name].items()}), flush=True)
    out = {
        "command": shlex.join(["python", *sys.argv]), "device": device_label(args.device), "torch": torch.__version__,
        "prompts": f"stdlib:validation, the {len(prompts)} of 512 prompts (seed 0, L <= 64) with two splats at N = L/4",
        "grid_300_steps": accuracy(converged),
        "learned_start_vs_converged": {
            "embedding_relative_distance_median": float(((v_learned - v_conv).norm(dim=-1) / v_conv.norm(dim=-1)).median()),
            "centre_distance_median_tokens": float((mu_learned - mu_conv).abs().median())},
        "token_accuracy": results,
    }
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
