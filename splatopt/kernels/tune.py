"""Time the fused field loss's launch configurations at one shape (GPU only) and print the best.

    python -m splatopt.kernels.tune --batch 4096 --length 64 --splats 16 --dim 384 --objective mse
    python -m splatopt.kernels.tune --step      # the fused MSE step instead: SPLATOPT_STEP_CONFIG

Each configuration runs forward + backward on random splats and a random target; its loss must
equal the default configuration's. Prints one JSON line per configuration as it goes, the ten
fastest, and always, last, one line ``SPLATOPT_FUSED_CONFIG='{...}'`` on stdout: the fastest
configuration whose loss matches the default's, or the default itself when none beats it (a line
before it says which). Exit status 1 when no configuration ran at all. A new default goes into
``fused.launch_config``. With ``--step`` the same for :func:`.step.fused_adam_step` (loss, backward
and Adam; its new first moment of v, linear in the gradient, must match the default's), ending in ``SPLATOPT_STEP_CONFIG='{...}'``
(``step.step_config``).

    python -m splatopt.kernels.tune --compile-only --arch 90      # no GPU needed

compiles the default configuration's kernels for an architecture with Triton's bundled ptxas and
prints registers and spills (``stack`` bytes) per variant: the check that chose the defaults.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import tempfile

import torch

from .fused import _pow2, fused_field_terms, launch_config

ENV = "SPLATOPT_FUSED_CONFIG"  # read by fused.launch_config


def candidates(L: int, N: int, D: int) -> list[dict]:
    """Launch configurations worth timing: tiles, warps and pipeline stages."""
    block_n = _pow2(N)
    out = []
    for bl, bd, warps, stages in itertools.product((16, 32, 64), (16, 32, 64, 128), (4, 8, 16), (1, 2)):
        if bl > _pow2(L) or bd > _pow2(D) or bl * block_n > 8192 or bd * block_n > 8192 or bl * bd > 8192:
            continue
        out.append({"BLOCK_L": bl, "BLOCK_N": block_n, "BLOCK_D": bd, "num_warps": warps, "num_stages": stages})
    return out


def choose(rows: list[dict], default: dict) -> tuple[dict, str]:
    """(configuration to use, why) from the tuner's rows: the fastest timed one whose loss matched the
    default's, if it beat the default; else the default.

    rows: ``{"config", "ms", "matches_default"}`` for timed configurations, ``{"config", "error"}``
    for those that failed (out of resources, ...).
    """
    base = next((r["ms"] for r in rows if r["config"] == default and "ms" in r), None)
    valid = sorted((r for r in rows if "ms" in r and r["matches_default"]), key=lambda r: r["ms"])
    if not valid:
        if base is None:
            return default, "the default, untimed: no configuration ran (see the errors above)"
        return default, f"the default, {base:.3f} ms: no configuration's loss matched the default's"
    best = valid[0]
    if base is None:
        return best["config"], f"the fastest, {best['ms']:.3f} ms (the default failed)"
    if best["config"] == default or best["ms"] >= base:
        return default, f"the default, {base:.3f} ms: no configuration beat it"
    return best["config"], f"the fastest, {best['ms']:.3f} ms; default: {base:.3f} ms"


def env_value(config: dict) -> str:
    """The ``SPLATOPT_FUSED_CONFIG`` (or ``_STEP_``) JSON that selects ``config`` (BLOCK_N follows from N, not set)."""
    return json.dumps({k: v for k, v in config.items() if k != "BLOCK_N"})


def compile_report(L: int, N: int, D: int, has_cos: bool, need_grad: bool = True, precision: str = "ieee",
                   target_dtype: str = "fp32", arch: int = 90, config: dict | None = None) -> dict:
    """Compile the kernel ahead of time for CUDA ``arch`` (no GPU needed; not under TRITON_INTERPRET).

    Returns the launch configuration with ``shared`` memory bytes and, where Triton ships cuobjdump,
    ``registers`` and ``stack`` (spill) bytes per thread.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from .triton_field import field_loss_kernel

    cfg = config or launch_config(L, N, D, precision)
    consts = {"HAS_COS": has_cos, "NEED_GRAD": need_grad, "PRECISION": precision,
              **{k: cfg[k] for k in ("BLOCK_L", "BLOCK_N", "BLOCK_D")}}
    pointers = {"on_ptr": "*u8", "m_ptr": "*u8", "t_ptr": f"*{target_dtype}"}
    floats = {"log_sigma_min", "log_sigma_max", "w_mse", "w_cos", "cos_eps"}
    names = field_loss_kernel.arg_names
    signature = {n: "constexpr" if n in consts else pointers.get(n, "*fp32") if n.endswith("_ptr")
                 else "fp32" if n in floats else "i32" for n in names}
    src = ASTSource(fn=field_loss_kernel, signature=signature, constexprs={(names.index(k),): v for k, v in consts.items()})
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                            options={"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]})
    out = {**cfg, "has_cos": has_cos, "need_grad": need_grad, "precision": precision, "target": target_dtype,
           "arch": arch, "shared": kernel.metadata.shared}
    return {**out, **cubin_resources(kernel.asm["cubin"])}


def cubin_resources(cubin: bytes) -> dict:
    """{"registers", "stack"} per thread of a compiled kernel, read by the cuobjdump that ships with
    Triton's NVIDIA backend; {} where it is missing."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        usage = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True).stdout
    found = {name: re.search(rf"\b{key}:(\d+)", usage) for key, name in (("REG", "registers"), ("STACK", "stack"))}
    return {name: int(m.group(1)) for name, m in found.items() if m}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m splatopt.kernels.tune", description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--length", type=int, default=64)
    p.add_argument("--splats", type=int, default=16)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--objective", default="mse")
    p.add_argument("--dtype", default="float32", help="the target's dtype")
    p.add_argument("--precision", default=None, choices=["ieee", "tf32x3", "tf32"],
                   help="tl.dot precision (default: the kernel's, ieee for the loss, tf32x3 for --step)")
    p.add_argument("--step", action="store_true", help="tune the fused MSE step (fused_adam_step), not the loss")
    p.add_argument("--limit", type=int, default=0, help="time only the first LIMIT candidates (0: all)")
    p.add_argument("--compile-only", action="store_true", help="compile the defaults for --arch, print registers and spills")
    p.add_argument("--arch", type=int, default=90, help="with --compile-only: CUDA compute capability, e.g. 80, 90")
    args = p.parse_args(argv)
    if args.compile_only:
        args.precision = args.precision or "ieee"
        tdt = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[args.dtype]
        for has_cos in (False, True):
            for need_grad in (True, False):
                print(json.dumps(compile_report(args.length, args.splats, args.dim, has_cos, need_grad, args.precision,
                                                tdt, args.arch)), flush=True)
        return 0
    if not torch.cuda.is_available():
        raise SystemExit("tune: needs a CUDA device")
    from triton.testing import do_bench

    if args.step:
        return _tune_step(args, do_bench)
    args.precision = args.precision or "ieee"
    B, L, N, D = args.batch, args.length, args.splats, args.dim
    g = torch.Generator(device="cuda").manual_seed(0)
    # a 4-tuple, so that fused_field_terms(*params, ...) reads as its mu, log_sigma, weight_logit, v
    params = (torch.rand(B, N, device="cuda", generator=g) * (L - 1), torch.full((B, N), 0.5, device="cuda"),
              torch.zeros(B, N, device="cuda"), torch.randn(B, N, D, device="cuda", generator=g))
    for t in params:
        t.requires_grad_(True)
    slot_mask = torch.ones(B, N, dtype=torch.bool, device="cuda")
    target = torch.randn(B, L, D, device="cuda", generator=g).to(getattr(torch, args.dtype))
    token_mask = torch.ones(B, L, dtype=torch.bool, device="cuda")

    def run(config):
        loss = fused_field_terms(*params, slot_mask, target, token_mask, args.objective, precision=args.precision,
                                 config=config)[0]
        torch.autograd.grad(loss.sum(), params)
        return loss

    with torch.no_grad():
        reference = fused_field_terms(*params, slot_mask, target, token_mask, args.objective, precision=args.precision)[0]
    default = launch_config(L, N, D, args.precision)
    todo = [default] + [c for c in candidates(L, N, D) if c != default]
    rows = _sweep(todo[: args.limit or None], default, run,
                  lambda config: bool(torch.allclose(run(config), reference, rtol=1e-3, atol=1e-6)), do_bench)
    return _report(rows, default, ENV)


def _sweep(todo: list[dict], default: dict, run, matches, do_bench) -> list[dict]:
    """Time ``run(config)`` for each configuration of ``todo``; ``matches(config)``: whether its result is the default's.

    A row per configuration ({config, ms, matches_default, default} or {config, error}), printed as it
    goes: a sweep cut short still reports.
    """
    rows: list[dict] = []
    for config in todo:
        try:
            ok = matches(config)
            ms = do_bench(lambda: run(config), warmup=10, rep=50)
        except Exception as err:  # an out-of-resources configuration is a result, not a failure
            rows.append({"config": config, "error": f"{type(err).__name__}: {err}"[:200]})
        else:
            rows.append({"config": config, "ms": ms, "matches_default": ok, "default": config == default})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def _report(rows: list[dict], default: dict, env: str) -> int:
    timed = sorted((r for r in rows if "ms" in r), key=lambda r: r["ms"])
    print("fastest first:")
    for r in timed[:10]:
        print(json.dumps(r))
    config, why = choose(rows, default)
    print(f"chosen: {why}")
    print(f"{env}='{env_value(config)}'", flush=True)
    return 0 if timed else 1


def _tune_step(args, do_bench) -> int:
    """Time :func:`.step.fused_adam_step` per configuration; its gradient (first moment) must match the default's."""
    from ..init import GridInit
    from ..optim import InnerOptimizer, adam_init, target_rms
    from .step import fused_adam_step, mse_coefficients, step_config

    B, L, N, D = args.batch, args.length, args.splats, args.dim
    g = torch.Generator(device="cuda").manual_seed(0)
    target = torch.randn(B, L, D, device="cuda", generator=g).to(getattr(torch, args.dtype))
    token_mask = torch.ones(B, L, dtype=torch.bool, device="cuda")
    splats = GridInit()(target.float(), token_mask, torch.full((B,), N, device="cuda"))
    params = {k: t.contiguous() for k, t in splats.params().items()}
    state = adam_init(params)
    opt = InnerOptimizer()
    coef = mse_coefficients(target, token_mask, args.objective)
    lrs = opt.learning_rates(1, 2, target_rms(target.float(), token_mask))

    def run(config):
        # the first moment is linear in the gradient; the new v is not (Adam's first step is
        # lr * sign(g): a gradient within rounding of 0 may flip it in any configuration)
        return fused_adam_step(params, state, splats.mask, target, token_mask, coef, lrs, opt, config=config)[1]["m"]["v"]

    default = step_config(L, N, D)
    if args.precision:
        default = {**default, "precision": args.precision}
    reference = run(default)
    # the single-tile sweep is one loop the compiler pipelines: deeper stages and fewer warps pay there
    grid = [{"BLOCK_L": bl, "BLOCK_N": default["BLOCK_N"], "BLOCK_D": bd, "num_warps": warps, "num_stages": stages,
             "precision": default["precision"], "one_tile": one}
            for one, bl, bd, warps, stages in itertools.product((True, False), (32, 64, 128), (16, 32, 64), (2, 4, 8), (1, 2, 3, 4))
            if bl <= max(_pow2(L), 32) and bd <= _pow2(D) and (one or stages <= 2) and (not one or bl >= L)]
    todo = [default] + [c for c in grid if c != default]
    tolerance = 1e-4 * reference.abs().max().item()
    rows = _sweep(todo[: args.limit or None], default, run,
                  lambda config: bool(torch.allclose(run(config), reference, rtol=1e-4, atol=tolerance)), do_bench)
    return _report(rows, default, "SPLATOPT_STEP_CONFIG")


if __name__ == "__main__":
    raise SystemExit(main())
