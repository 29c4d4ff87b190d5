"""Would a second-order update fix the two-splat prompts? Levenberg-Marquardt Gauss-Newton on their embeddings.

    python scripts/probe_newton_two_splat.py --prompts 24 --out figures/data/meta/newton_two_splat_cpu.json

The prompts: the first ``--prompts`` of the 512-prompt validation sample (seed 0, L <= 64) that
get two splats at N = L/4. From the learned start's splats, the geometry is frozen (on these
prompts frozen geometry decodes as well as moving geometry after 10 picked steps: 83.3 % vs 83.2 %,
papers/report.md, section 4) and the embeddings v [2, d] take damped Gauss-Newton steps on the fit
objective: the generalised Gauss-Newton matrix of the decoder's cross-entropy (each token's
softmax Hessian over its ``--top-k`` most likely tokens, through the head's Jacobian), plus the
relative MSE's exact Hessian, a [2d, 2d] solve per step; a step that does not lower the objective
is retried with 4x the damping (the retries are extra evaluations, not counted as steps); an
accepted one divides it by 10. Beside it: the picked Adam (fit(init="learned") with the
optimizer shipped beside the initializer) on the same prompts, geometry moving. Token accuracy
after each step, for the objective mse+ce and for the cross-entropy alone.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import fixedpos
import splatopt
from splatopt.bench import device_label
from splatopt.learned import load_learned
from splatopt.render import splat_weights


def gauss_newton_curve(model, learned, text: str, steps: int, mse_weight: float, top_k: int) -> list[float]:
    """Token accuracy after 0..steps damped Gauss-Newton steps on one two-splat prompt's embeddings."""
    head = model._head_for(torch.zeros(1, learned.arch.dim))
    E, bias = head.embeddings, head.bias
    batch = model.tokenize([text])
    T = model.encode(batch)[0]  # [L, d]
    L, d = T.shape
    ids = batch.ids[0, :L]
    with torch.no_grad():
        start = learned(T[None], torch.ones(1, L, dtype=torch.bool), torch.tensor([2]))
    A = splat_weights(start, L)[0]  # [L, 2] frozen geometry
    norm = (T ** 2).sum()

    def objective(v):
        field = A @ v
        return mse_weight * ((field - T) ** 2).sum() / norm + F.cross_entropy(model.decode(field), ids)

    def accuracy(v) -> float:
        with torch.no_grad():
            return (model.decode(A @ v).argmax(-1) == ids).float().mean().item()

    v, damping, curve = start.v[0].clone(), None, []
    curve.append(accuracy(v))
    for _ in range(steps):
        v_ = v.clone().requires_grad_(True)
        loss = objective(v_)
        (g,) = torch.autograd.grad(loss, v_)
        field = (A @ v).detach()
        J = torch.func.vmap(torch.func.jacrev(head.features))(field)  # [L, d, d] the head's Jacobian per token
        with torch.no_grad():
            p = (head.features(field) @ E.T + bias).softmax(-1)
            H = torch.zeros(2 * d, 2 * d)
            for t in range(L):
                top = p[t].topk(top_k)
                Ek, pk = E[top.indices], top.values
                Q = Ek.T @ (pk[:, None] * Ek) - torch.outer(Ek.T @ pk, Ek.T @ pk)  # softmax Hessian in query space
                G = J[t].T @ Q @ J[t] / L + (2 * mse_weight / norm) * torch.eye(d)
                H += torch.kron(torch.outer(A[t], A[t]), G)
            damping = damping if damping is not None else 1e-6 * H.diagonal().mean().item()
            for _ in range(12):
                step = torch.linalg.solve(H + damping * torch.eye(2 * d), -g.flatten()).view(2, d)
                if objective(v + step) < loss:
                    v, damping = v + step, damping / 10
                    break
                damping *= 4
        curve.append(accuracy(v))
    return curve


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=24)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--top-k", type=int, default=4096)
    parser.add_argument("--out", default="figures/data/meta/newton_two_splat_cpu.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = fixedpos.load()
    sample = fixedpos.sample_prompts(model, fixedpos.load_corpus("stdlib", "validation"), 512, max_tokens=64, seed=0)
    lengths = model.tokenize(sample).mask.sum(-1).tolist()
    texts = [p for p, L in zip(sample, lengths) if round(L * 0.25) == 2][: args.prompts]
    learned = load_learned(model)
    picked = learned.picked_optimizer
    t0 = time.perf_counter()
    adam = splatopt.fit(texts, model, n_splats=0.25, steps=args.steps, init="learned", optimizer=picked, device="cpu",
                        progress=False, record_every=1)
    out = {"device": device_label("cpu"), "torch": torch.__version__, "command": shlex.join(["python", *sys.argv]),
           "prompts": len(texts), "steps": args.steps, "top_k": args.top_k,
           "picked_adam": adam.history["token_accuracy"].mean(1).tolist()}
    for name, mse_weight in (("gauss_newton_mse_ce", 1.0), ("gauss_newton_ce", 0.0)):
        curves = [gauss_newton_curve(model, learned, t, args.steps, mse_weight, args.top_k) for t in texts]
        out[name] = [sum(c[i] for c in curves) / len(curves) for i in range(args.steps + 1)]
        print(name, [round(100 * a, 1) for a in out[name]], flush=True)
    print("picked_adam", [round(100 * a, 1) for a in out["picked_adam"]])
    out["seconds"] = round(time.perf_counter() - t0, 1)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
