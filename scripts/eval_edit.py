"""Editing acceptance: warm-started re-fits after random single-span edits vs cold fits of the edited text.

    python scripts/eval_edit.py --out figures/data/edit_acceptance.json

200 test-split prompts (<= 64 tokens), one random edit each: insert, delete or replace 1-4 words
(the token count of each edit is recorded). Each prompt is fitted (300 steps), then the edited
text is fitted cold (300 steps) and warm-started from the transported splats (--warm-steps).
Measured:
- the warm fit's token accuracy per step against the cold fit's final one;
- each prompt's steps to recover;
- how much splats farther than 3 sigma from the edit change their embeddings (free re-fit vs
  local re-fit);
- the final field's relative MSE and cosine to the new target, warm and cold;
- wall times: the re-fit's fits (``warm_seconds``, FitResult.seconds) and the whole edit() call
  (``warm_wall_seconds``), against the cold fit's.
With second starts, each prompt's curve is that of the start it kept at the last step, so the
curve before the last step is the best start's by hindsight, not a re-fit one could stop early.
"""

from __future__ import annotations

import argparse
import inspect
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "figures"))
from figure_io import write_json  # noqa: E402  (figures/ is not a package)


def random_edit(text: str, rng: random.Random, vocabulary: list[str]) -> tuple[str, str]:
    words = text.split()
    op = rng.choice(["insert", "delete", "replace"])
    k = rng.randint(1, 4)
    pos = rng.randint(0, len(words) - (0 if op == "insert" else 1))
    filler = [rng.choice(vocabulary) for _ in range(k)]
    if op == "insert":
        words[pos:pos] = filler
    elif op == "delete":
        k = min(k, len(words) - 1)  # keep at least one word
        del words[pos : pos + k]
    else:
        words[pos : pos + k] = filler
    return " ".join(words), op


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--splats", type=float, default=0.25)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--warm-steps", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--variants", default='{"default": {}, "free": {"local": false}}',
                        help='JSON: name -> edit() options (the rest: edit()\'s defaults); "optimizer" takes InnerOptimizer '
                             "fields over --optimizer's (the cosine schedule unless it names another); without it, "
                             "edit()'s default: the old fit's optimizer with a constant schedule")
    parser.add_argument("--optimizer", default="{}",
                        help="JSON: InnerOptimizer fields for the old and cold fits, and under a variant's own")
    parser.add_argument("--objective", default="mse+ce",
                        help="objective of the old and cold fits, and of the warm re-fits unless a variant names its own "
                             "(edit() re-fits on the old fit's objective): e.g. ce, to compare like with like")
    parser.add_argument("--fit-options", default="{}",
                        help='JSON: further fit() options of the old and cold fits, e.g. \'{"mode": "normalized"}\' '
                             "(edit() re-fits with the old fit's kernel and mode)")
    parser.add_argument("--split", default="test", help="corpus split of the prompts (select on validation)")
    parser.add_argument("--same-budget-cold", action="store_true",
                        help="also fit each edited text cold at the splat count its re-fit ended with, per variant "
                             "(row cold_same_budget_final): the like-for-like budget where a variant does not hold "
                             "the density budget (hold_budget=false)")
    parser.add_argument("--out", default="figures/data/edit_acceptance.json")
    args = parser.parse_args()

    model = fixedpos.load()
    rng = random.Random(args.seed)
    prompts = fixedpos.sample_prompts(model, fixedpos.load_corpus("stdlib", args.split), args.n, max_tokens=56, seed=args.seed)
    vocabulary = sorted({w for p in fixedpos.load_corpus("stdlib", "validation")[:300] for w in p.split() if w.isalpha()})
    edited, ops = zip(*(random_edit(p, rng, vocabulary) for p in prompts))
    base_opt = json.loads(args.optimizer)
    # the cold fit uses the warm fit's optimizer: the criterion compares like with like
    common = dict(n_splats=args.splats, device=args.device, progress=False, optimizer=splatopt.InnerOptimizer(**base_opt),
                  objective=args.objective, **json.loads(args.fit_options))
    t0 = time.perf_counter()
    old = splatopt.fit(prompts, model, steps=args.steps, record_every=0, **common)
    cold = splatopt.fit(list(edited), model, steps=args.steps, record_every=5, **common)
    cold_final = cold.token_accuracy.cpu()
    rows, seconds = [], {}
    variants = json.loads(args.variants)
    for variant, opts in variants.items():
        opts = dict(opts)
        if "optimizer" in opts:
            opts["optimizer"] = splatopt.InnerOptimizer(**{**base_opt, **opts["optimizer"]})
        # one batched re-fit of every edited prompt (edit() keeps prompts independent: the same
        # per-prompt result as editing each alone, tests/test_edit.py)
        started = time.perf_counter()
        w = splatopt.edit(old, list(edited), model=model, steps=args.warm_steps, record_every=5, progress=False, **opts)
        if str(args.device).startswith("cuda"):
            torch.cuda.synchronize()
        seconds[variant] = (w.seconds, time.perf_counter() - started)
        steps = w.history["step"].tolist()
        final_all = w.splats.to("cpu")
        for b in range(len(prompts)):
            record = w.edit[b]
            curve = w.history["token_accuracy"][:, b].tolist()
            reached = [s for s, a in zip(steps, curve) if a >= float(cold_final[b]) - 1e-6]
            warm0, final = record["start_splats"], final_all.select(b)
            far = record["far_from_edit"]
            v_change = ((final.v[0, far] - warm0.v[0, far]).norm(dim=-1) / warm0.v[0, far].norm(dim=-1).clamp_min(1e-9)).tolist()
            mu_shift = (final.mu[0, far] - warm0.mu[0, far]).abs().tolist()
            edit_tokens = sum(max(i2 - i1, j2 - j1) for tag, i1, i2, j1, j2 in record["script"] if tag != "equal")
            rows.append({
                "variant": variant, "prompt": b, "op": ops[b], "old_text": prompts[b], "new_text": edited[b],
                "edit_tokens": edit_tokens, "L": int(w.mask[b].sum()),
                "cold_final": float(cold_final[b]), "warm_curve": curve, "steps": steps,
                "cold_field_error": float(cold.field_error[b]), "warm_field_error": float(w.field_error[b]),
                "cold_cosine": float(cold.cosine[b]), "warm_cosine": float(w.cosine[b]),
                "steps_to_recover": reached[0] if reached else None, "far_splats": len(far),
                "far_v_rel_change": v_change, "far_mu_shift": mu_shift,
                "spawned_for_density": record.get("spawned_for_density", 0), "start": record.get("start", "warm"),
                # the re-fit's splats against the cold fit's (a like-for-like budget when equal)
                "warm_splats": int(w.splats.counts[b]), "cold_splats": int(cold.splats.counts[b]),
                "far_pruned_for_budget": record.get("far_pruned_for_budget", 0),
                "start_initializer": record.get("start_initializer"), "starts_tried": record.get("starts_tried", 1),
            })
        if args.same_budget_cold:
            # the cold fit given the re-fit's own splat count, prompt by prompt (no text holds more
            # splats than tokens, edit() keeps that too); equal counts fit exactly like the cold fit above
            counts = [int(c) for c in w.splats.counts]
            same = splatopt.fit(list(edited), model, steps=args.steps, record_every=0, **{**common, "n_splats": counts})
            for b in range(len(prompts)):
                rows[-len(prompts) + b].update(cold_same_budget_final=float(same.token_accuracy[b]),
                                               cold_same_budget_splats=int(same.splats.counts[b]))
        print(f"{variant}: done {len(prompts)} edits, {time.perf_counter() - t0:.1f} s", flush=True)

    summary = {}
    for variant in variants:
        rs = [r for r in rows if r["variant"] == variant]
        steps = rs[0]["steps"]
        mean_curve = [sum(r["warm_curve"][i] for r in rs) / len(rs) for i in range(len(steps))]
        cold_mean = sum(r["cold_final"] for r in rs) / len(rs)
        match = [s for s, a in zip(steps, mean_curve) if a >= cold_mean]
        recovered = [r["steps_to_recover"] for r in rs if r["steps_to_recover"] is not None]
        changes = sorted(c for r in rs for c in r["far_v_rel_change"])
        shifts = sorted(c for r in rs for c in r["far_mu_shift"])
        summary[variant] = {
            "cold_final_mean": cold_mean, "cold_steps": args.steps, "warm_mean_curve": dict(zip(steps, mean_curve)),
            "warm_steps_to_match_cold_mean": match[0] if match else None,
            "fraction_recovered_within_warm_steps": len(recovered) / len(rs),
            "far_splats": len(changes),
            "far_v_rel_change_median": changes[len(changes) // 2] if changes else None,
            "far_v_rel_change_p90": changes[int(0.9 * len(changes))] if changes else None,
            "far_fraction_under_5pct": sum(c < 0.05 for c in changes) / max(len(changes), 1),
            "far_mu_shift_median": shifts[len(shifts) // 2] if shifts else None,
            "fresh_starts_kept": sum(r["start"] == "fresh" for r in rs),
            "more_splats_than_cold": sum(r["warm_splats"] > r["cold_splats"] for r in rs),
            "fewer_splats_than_cold": sum(r["warm_splats"] < r["cold_splats"] for r in rs),
            "starts_kept": {start: sum(r["start"] == start for r in rs) for start in sorted({r["start"] for r in rs})},
            "starts_tried_mean": sum(r["starts_tried"] for r in rs) / len(rs),
            # wall time of every start's re-fit against the cold fit's (the same GPU, one run)
            "warm_seconds": round(seconds[variant][0], 2), "warm_wall_seconds": round(seconds[variant][1], 2),
            "cold_seconds": round(cold.seconds, 2),
            # the field itself, not only what it decodes to: a re-fit on the cross-entropy alone may trade one for the other
            "cold_field_error_mean": sum(r["cold_field_error"] for r in rs) / len(rs),
            "warm_field_error_mean": sum(r["warm_field_error"] for r in rs) / len(rs),
            "cold_cosine_mean": sum(r["cold_cosine"] for r in rs) / len(rs),
            "warm_cosine_mean": sum(r["warm_cosine"] for r in rs) / len(rs),
        }
        if args.same_budget_cold:
            summary[variant]["cold_same_budget_final_mean"] = sum(r["cold_same_budget_final"] for r in rs) / len(rs)
        print(variant, json.dumps(summary[variant]), flush=True)
    out = {
        "device": device_label(args.device),
        "torch": torch.__version__, "command": shlex.join(["python", *sys.argv]),
        "edit_defaults": {k: repr(v.default) for k, v in inspect.signature(splatopt.edit).parameters.items()
                          if v.default is not inspect.Parameter.empty}, "n": len(prompts), "split": args.split, "n_splats": args.splats, "optimizer": base_opt, "objective": args.objective,
        "fit_options": json.loads(args.fit_options),
        "cold_curve": {"step": cold.history["step"].tolist(), "token_accuracy": cold.history["token_accuracy"].mean(1).tolist()},
        "summary": summary, "rows": rows, "seconds": round(time.perf_counter() - t0, 1),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, out)  # gzipped where the name ends in .gz
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
