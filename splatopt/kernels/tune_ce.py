"""Time the fused linear cross-entropy kernel's launch configurations (GPU), or compile them (no GPU).

    python -m splatopt.kernels.tune_ce --rows 32768 --dim 384 --vocab 30522
    python -m splatopt.kernels.tune_ce --compile-only --arch 90

Timing: forward with gradient (what a fit step runs) on random q, a random bf16 head and random
targets, for each candidate; its loss must match the chunked path's within bf16 tolerance.
Prints one JSON line per candidate as it goes and, last, ``SPLATOPT_LINEAR_CE_CONFIG='{...}'``
for the fastest (a new default goes into ``triton_linear_ce.launch_config``). ``--compile-only``
compiles each candidate for an architecture with Triton's bundled ptxas and prints shared memory,
registers and spills (``stack`` bytes per thread): what chose the defaults.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os

import torch

from .triton_linear_ce import CONFIG_ENV, RESCALE, launch_config
from .tune import cubin_resources

KEYS = ("BLOCK_M", "BLOCK_V", "num_warps", "num_stages")


def candidates(d: int, V: int) -> list[dict]:
    """The default first, then rows x words x warps x stages around it."""
    default = launch_config(d, V)
    out = [default]
    for bm, bv, warps, stages in itertools.product((32, 64), (64, 128), (4, 8), (1, 2, 3)):
        cfg = {**default, "BLOCK_M": bm, "BLOCK_V": bv, "num_warps": warps, "num_stages": stages}
        if cfg != default:
            out.append(cfg)
    return out


def compile_report(cfg: dict, need_grad: bool = True, arch: int = 90) -> dict:
    """Shared memory, registers and spill bytes of the kernel for ``cfg`` on CUDA ``arch`` (no GPU needed)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from .triton_linear_ce import linear_ce_kernel

    consts = {"NEED_GRAD": need_grad, "RESCALE_AT": RESCALE, "INTERPRET": False,
              **{k: cfg[k] for k in ("BLOCK_M", "BLOCK_V", "BLOCK_K", "NUM_K")}}
    pointers = {"q_ptr": "*fp32", "w_ptr": "*bf16", "ids_ptr": "*i64", "rows_ptr": "*i32", "n_ptr": "*i32"}
    names = linear_ce_kernel.arg_names
    sig = {n: "constexpr" if n in consts else pointers.get(n, "*fp32") if n.endswith("_ptr") else "i32" for n in names}
    sig["w_desc"] = f"tensordesc<bf16[{cfg['BLOCK_V']}, {cfg['BLOCK_K']}]>"
    # what the launcher specializes at run time: 16-byte aligned pointers, strides and d multiples of 16
    aligned = [i for i, n in enumerate(names) if n.endswith("_ptr") or n in ("q_stride", "w_stride", "grad_stride", "d")]
    src = ASTSource(fn=linear_ce_kernel, signature=sig, constexprs={(names.index(k),): v for k, v in consts.items()},
                    attrs={(i,): [["tt.divisibility", 16]] for i in aligned})
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                            options={"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]})
    out = {**cfg, "need_grad": need_grad, "shared": kernel.metadata.shared}
    return {**out, **cubin_resources(kernel.asm["cubin"])}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m splatopt.kernels.tune_ce", description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=32768, help="tokens (B x L)")
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--vocab", type=int, default=30522)
    p.add_argument("--compile-only", action="store_true", help="compile for --arch, print shared memory, registers, spills")
    p.add_argument("--arch", type=int, default=90)
    args = p.parse_args(argv)
    todo = candidates(args.dim, args.vocab)
    if args.compile_only:
        for cfg in todo:
            try:
                print(json.dumps(compile_report(cfg, arch=args.arch)), flush=True)
            except Exception as err:  # a configuration that does not compile is a result
                print(json.dumps({**cfg, "error": f"{type(err).__name__}: {err}"[:200]}), flush=True)
        return 0
    if not torch.cuda.is_available():
        raise SystemExit("tune_ce: needs a CUDA device (or --compile-only)")
    from triton.testing import do_bench

    from .linear_ce import linear_cross_entropy

    g = torch.Generator(device="cuda").manual_seed(0)
    R, d, V = args.rows, args.dim, args.vocab
    q = torch.randn(1, R, d, device="cuda", generator=g).requires_grad_(True)
    weight = torch.randn(V, d, device="cuda", generator=g) / d**0.25
    bias = torch.randn(V, device="cuda", generator=g)
    ids = torch.randint(V, (1, R), device="cuda", generator=g)
    mask = torch.ones(1, R, dtype=torch.bool, device="cuda")

    def run(impl):
        return linear_cross_entropy(q, weight, bias, ids, mask, compute_dtype=torch.bfloat16, impl=impl)

    reference = run("chunked").detach()
    rows = []
    for cfg in todo:
        os.environ[CONFIG_ENV] = json.dumps({k: cfg[k] for k in KEYS})
        try:
            ok = bool(torch.allclose(run("fused").detach(), reference, rtol=1e-2, atol=1e-2))
            ms = do_bench(lambda: run("fused"), warmup=5, rep=50)
            rows.append({"config": {k: cfg[k] for k in KEYS}, "ms": ms, "matches": ok})
        except Exception as err:  # out of shared memory etc.: a result, not a failure
            rows.append({"config": {k: cfg[k] for k in KEYS}, "error": f"{type(err).__name__}: {err}"[:200]})
        print(json.dumps(rows[-1]), flush=True)
    os.environ.pop(CONFIG_ENV, None)
    chunked_ms = do_bench(lambda: run("chunked"), warmup=5, rep=50)
    print(json.dumps({"chunked_ms": chunked_ms}))
    timed = sorted((r for r in rows if "ms" in r and r["matches"]), key=lambda r: r["ms"])
    if not timed:
        return 1
    print(f"{CONFIG_ENV}='{json.dumps(timed[0]['config'])}'", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
