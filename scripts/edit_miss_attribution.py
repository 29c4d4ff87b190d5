"""Where a warm re-fit misses: attribute each wrongly decoded token of the re-fit to the splat that dominates it.

    python scripts/edit_miss_attribution.py --out figures/data/edit_short_deletions.json

Takes the edits recorded by scripts/eval_edit.py (``--from``, default: the four validation samples
in figures/data/edit_seeds/, gzipped JSON) that match the filter (default: deletions in texts of at most 16 tokens
that keep a far splat, the case where the re-fit falls short of the cold fit), fits the old and
the edited texts again (300 steps), re-fits with ``splatopt.edit`` (its defaults, 60 steps), and
for every token of the edited text records which splat dominates it (the largest rendering
weight, whatever the norm of its embedding), whether that splat is frozen (far from the edit),
and whether the token decodes right after the re-fit and after the cold fit. Also per prompt:
how many tokens the near (free) splats dominate per near splat, against the edited text's tokens
per splat.
"""

from __future__ import annotations

import argparse
import glob
import json
import shlex
import sys
from pathlib import Path

import torch

import fixedpos
import splatopt
from splatopt.bench import device_label
from splatopt.render import render, splat_weights

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "figures"))
from figure_io import read_json, write_json  # noqa: E402  (figures/ is not a package; it reads results gzipped or not)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--from", dest="sources", nargs="+",
                        default=sorted(glob.glob("figures/data/edit_seeds/validation_seed[0-9].json.gz")))
    parser.add_argument("--op", default="delete")
    parser.add_argument("--max-tokens", type=int, default=16, help="edited texts of at most this many tokens")
    parser.add_argument("--min-tokens", type=int, default=1, help="edited texts of at least this many tokens")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="figures/data/edit_short_deletions.json")
    args = parser.parse_args()

    edits = []
    for source in args.sources:
        data = read_json(Path(source))
        edits += [r for r in data["rows"] if r["variant"] == "default" and r["op"] == args.op
                  and args.min_tokens <= r["L"] <= args.max_tokens and r["far_splats"] > 0]
    if not edits:
        raise ValueError(f"no recorded edit in {args.sources} matches op={args.op}, {args.min_tokens} <= L <= {args.max_tokens}, "
                         "far splats > 0")
    model = fixedpos.load()
    old_texts, new_texts = [r["old_text"] for r in edits], [r["new_text"] for r in edits]
    common = dict(n_splats=0.25, device=args.device, progress=False)
    old = splatopt.fit(old_texts, model, steps=300, record_every=0, **common)
    cold = splatopt.fit(new_texts, model, steps=300, record_every=0, **common)
    warm = splatopt.edit(old, new_texts, model=model, steps=60, record_every=0, progress=False)

    batch = model.tokenize(new_texts, device=args.device)
    L_max = batch.ids.shape[1]
    with torch.no_grad():
        right = {name: (model.decode(render(r.splats, L_max)).argmax(-1) == batch.ids).cpu() for name, r in (("warm", warm), ("cold", cold))}
        dominant = splat_weights(warm.splats, L_max).argmax(-1).cpu()  # [B, L] the splat with the largest weight
    prompts = []
    for b in range(len(edits)):
        L = int(batch.mask[b].sum())
        far = set(warm.edit[b]["far_from_edit"])
        n_warm, n_cold = int(warm.splats.mask[b].sum()), int(cold.splats.mask[b].sum())
        under_far = [int(dominant[b, t]) in far for t in range(L)]
        near_tokens = L - sum(under_far)
        prompts.append({
            "new_text": new_texts[b], "L": L, "splats_warm": n_warm, "splats_cold": n_cold, "far_splats": len(far),
            "start": warm.edit[b]["start"], "warm_accuracy": float(warm.token_accuracy[b]), "cold_accuracy": float(cold.token_accuracy[b]),
            "tokens_under_far": sum(under_far), "tokens_per_near_splat": near_tokens / max(n_warm - len(far), 1),
            "tokens_per_splat_cold": L / n_cold,
            "warm_wrong_under_far": sum(1 for t in range(L) if under_far[t] and not right["warm"][b, t]),
            "warm_wrong_under_near": sum(1 for t in range(L) if not under_far[t] and not right["warm"][b, t]),
            "cold_wrong": sum(1 for t in range(L) if not right["cold"][b, t]),
        })
    total = lambda key: sum(p[key] for p in prompts)  # noqa: E731
    tokens = total("L")
    summary = {
        "edits": len(prompts), "tokens": tokens,
        "warm_accuracy": sum(p["warm_accuracy"] for p in prompts) / len(prompts),
        "cold_accuracy": sum(p["cold_accuracy"] for p in prompts) / len(prompts),
        "tokens_under_far": total("tokens_under_far"), "warm_wrong_under_far": total("warm_wrong_under_far"),
        "tokens_under_near": tokens - total("tokens_under_far"), "warm_wrong_under_near": total("warm_wrong_under_near"),
        "cold_wrong": total("cold_wrong"),
        "tokens_per_near_splat_mean": sum(p["tokens_per_near_splat"] for p in prompts) / len(prompts),
        "tokens_per_splat_cold_mean": sum(p["tokens_per_splat_cold"] for p in prompts) / len(prompts),
        "tokens_per_near_splat_where_warm_loses": [round(p["tokens_per_near_splat"], 2) for p in prompts if p["warm_accuracy"] < p["cold_accuracy"]],
        "tokens_per_splat_cold_where_warm_loses": [round(p["tokens_per_splat_cold"], 2) for p in prompts if p["warm_accuracy"] < p["cold_accuracy"]],
    }
    print(json.dumps(summary, indent=1))
    out = {"command": shlex.join(["python", *sys.argv]), "device": device_label(args.device), "torch": torch.__version__, "sources": args.sources,
           "filter": {"op": args.op, "min_tokens": args.min_tokens, "max_tokens": args.max_tokens, "far_splats": "> 0"}, "summary": summary, "prompts": prompts}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, out)  # gzipped where the name ends in .gz
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
