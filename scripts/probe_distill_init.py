"""Can the initializer be taught the converged embeddings directly? Distil 300-step grid fits (issue 5).

    python scripts/probe_distill_init.py --device cuda --seconds 270 --v-metric l2 --ce-weight 0 --out figures/data/meta/distill_l2.json
    python scripts/probe_distill_init.py --device cuda --seconds 240 --v-metric fisher --ce-weight 0.1 --out figures/data/meta/distill_fisher_ce.json

scripts/probe_start_precision.py found that 10 gentle steps finish a two-splat fit from its
converged embeddings moved by up to 40 % of their norm in a random direction. This probe asks
whether a network can land that close. The training prompts are sampled as for the shipped
initializer: stdlib:train, 8 to 64 tokens, seed 0. Each is fitted from the grid for 300 steps at
N = L/4 with the default Adam. The shipped initializer is then trained for ``--seconds`` (Adam,
lr 3e-4, 256 prompts a step, gradient norm clipped at 1) to reproduce each slot's converged splat.
Slot k starts on grid slot k, so the slots are matched by index. The loss is the embedding error
relative to the converged embedding's size (``l2``, or ``fisher``: both measured in the decoder's
Fisher metric F / mean eigenvalue + 0.3 I), plus 0.1 x (centre error in spacings squared +
log-width error squared + 0.25 x weight-logit error squared), plus ``--ce-weight`` x the decoder's
cross-entropy of the proposal's field.

It reports token accuracy on 512 validation prompts (seed 0, L <= 64), over all prompts and over the
two-splat ones. It compares the shipped and the distilled start after 0 and 10 steps of the picked
update, with every rate x1, x0.5, x0.25 and x0.125, against the grid's 300 steps. It also reports the
median relative distance of each start's embeddings from the converged validation fits.
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

import fixedpos
import splatopt
from splatopt.bench import device_label
from splatopt.fisher import load_field_fisher
from splatopt.learned import load_learned
from splatopt.meta import encode_bank

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_by_splat_count import picked_optimizer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seconds", type=float, default=240, help="distillation wall time")
    parser.add_argument("--v-metric", choices=("l2", "fisher"), default="fisher")
    parser.add_argument("--ce-weight", type=float, default=0.1)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    dev = args.device
    torch.manual_seed(0)
    model = fixedpos.load()
    common = dict(device=dev, progress=False, record_every=0)
    train_texts = fixedpos.sample_prompts(model, fixedpos.load_corpus_spec("stdlib", "train"), 16384, 64, 8, seed=0)
    val_texts = fixedpos.sample_prompts(model, fixedpos.load_corpus_spec("stdlib:validation"), 512, max_tokens=64, seed=0)
    converged = splatopt.fit(train_texts, model, n_splats=0.25, steps=300, batch_size=2048, **common).splats.to(dev)
    bank = encode_bank(model, train_texts, dev)
    counts = converged.counts.to(dev)
    shipped = load_learned(model).to(dev)
    net = copy.deepcopy(shipped)
    net.train()
    net.requires_grad_(True)
    opt = torch.optim.Adam([p for name, p in net.named_parameters() if name != "log_lr_scale"], lr=3e-4)
    d = model.dim
    if args.v_metric == "fisher":
        fisher = load_field_fisher("fisher", model).to(dev).double()
        metric = (fisher / torch.linalg.eigvalsh(fisher).clamp_min(0).mean() + 0.3 * torch.eye(d, device=dev, dtype=fisher.dtype)).float()
    else:
        metric = torch.eye(d, device=dev)
    generator = torch.Generator().manual_seed(0)
    step, started = 0, time.time()
    while time.time() - started < args.seconds:
        idx = torch.randint(0, len(train_texts), (256,), generator=generator).to(dev)
        field, mask, ids = bank.batch(idx)
        n = counts[idx]
        pred = net(field, mask, n)
        C, slots = pred.capacity, pred.mask
        tv, tmu, tls, tlg = (t[idx, :C] for t in (converged.v, converged.mu, converged.log_sigma, converged.weight_logit))
        spacing = (mask.sum(-1).float() / n.float())[:, None]
        dv = pred.v - tv
        v_loss = ((dv @ metric) * dv).sum(-1) / ((tv @ metric) * tv).sum(-1).clamp_min(1e-6)
        geometry = ((pred.mu - tmu) / spacing).pow(2) + (pred.log_sigma - tls).pow(2) + 0.25 * (pred.weight_logit - tlg).pow(2)
        loss = ((v_loss + 0.1 * geometry) * slots).sum() / slots.sum()
        if args.ce_weight > 0:
            logits = model.decode(splatopt.render(pred, field.shape[1]))
            loss = loss + args.ce_weight * F.cross_entropy(logits[mask], ids[mask])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        step += 1
    net.eval()
    _, picked = picked_optimizer()
    rates = ("lr_mu", "lr_log_sigma", "lr_weight", "lr_v")
    val = splatopt.fit(val_texts, model, n_splats=0.25, steps=300, **common)
    two = val.splats.counts.cpu() == 2
    accuracy = lambda r: [float(r.token_accuracy.cpu().mean()), float(r.token_accuracy.cpu()[two].mean())]  # noqa: E731
    results = {"grid, 300 steps": accuracy(val)}
    with torch.no_grad():
        for name, init in (("shipped", shipped), ("distilled", net)):
            for scale in (1.0, 0.5, 0.25, 0.125):
                update = replace(picked, **{k: getattr(picked, k) * scale for k in rates})
                for k in ((0, 10) if scale == 1.0 else (10,)):
                    r = splatopt.fit(val_texts, model, n_splats=0.25, steps=k, init=init, optimizer=update, **common)
                    results[f"{name}, picked x{scale}, {k} steps"] = accuracy(r)
            start = splatopt.fit(val_texts, model, n_splats=0.25, steps=0, init=init, optimizer=picked, **common).splats
            rel = ((start.v - val.splats.v).norm(dim=-1) / val.splats.v.norm(dim=-1).clamp_min(1e-9))[val.splats.mask]
            results[f"{name}, embedding distance to the converged fit (median, relative)"] = float(rel.median())
    out = {"command": shlex.join(["python", *sys.argv]), "device": device_label(dev), "torch": torch.__version__,
           "distillation_steps": step, "train_prompts": len(train_texts),
           "prompts": "stdlib:validation, 512 prompts (seed 0), N = L/4; each accuracy pair: [all prompts, two-splat prompts]",
           "token_accuracy": results}
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
