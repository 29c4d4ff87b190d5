"""Meta-training of the splat initializer: the learned initializer, the differentiable unroll (against
finite differences and the documented first-order gradient), exact resume, memory over outer steps,
DistributedDataParallel on 2 gloo processes, and init="learned" in fit."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch

import fixedpos
import splatopt
from splatopt import meta
from splatopt.init import GridInit
from splatopt.learned import Architecture, LearnedInitializer
from splatopt.optim import InnerOptimizer

ROOT = Path(__file__).resolve().parents[1]


def tiny_problem(dtype=torch.float64, seed=0):
    """A 2-prompt field problem (d = 6, V = 5) with a random linear decoder, small enough for finite differences."""
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(2, 7, 6, generator=g, dtype=dtype)
    mask = torch.tensor([[True] * 7, [True] * 5 + [False] * 2])
    ids = torch.randint(0, 5, (2, 7), generator=g)
    W = torch.randn(6, 5, generator=g, dtype=dtype)
    torch.manual_seed(seed)
    net = LearnedInitializer(Architecture(dim=6, width=8, heads=2, layers=1)).to(dtype)
    with torch.no_grad():  # leave GridInit: give every output a gradient path and a non-trivial value
        net.out.weight.normal_(0, 0.05, generator=g)
        net.log_lr_scale.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0], dtype=dtype))
    return net, target, mask, ids, (lambda f: f @ W), torch.tensor([3, 2])


def outer_loss(net, target, mask, ids, decode, n, mode="full", k=1, steps=3, optimizer=None):
    splats = net(target, mask, n)
    losses, _ = meta.unroll(splats, target, mask, ids, decode, "mse+ce", optimizer or InnerOptimizer(), steps, mode, k,
                            net.log_lr_scale)
    return losses[-1].sum()


def test_untrained_learned_initializer_is_exactly_the_grid():
    model_free = torch.randn(3, 11, 16)
    mask = torch.arange(11)[None] < torch.tensor([11, 8, 4])[:, None]
    n = torch.tensor([3, 4, 1])
    net = LearnedInitializer(Architecture(dim=16, width=8, heads=2, layers=1))
    got, want = net(model_free, mask, n), GridInit()(model_free, mask, n)
    assert torch.equal(got.mask, want.mask)
    for k in ("mu", "log_sigma", "weight_logit", "v"):  # inactive slots hold nothing by protocol
        torch.testing.assert_close(getattr(got, k)[got.mask], getattr(want, k)[want.mask], atol=1e-5, rtol=1e-5)


def test_learned_initializer_keeps_masks_positions_and_inactive_slots_clean():
    g = torch.Generator().manual_seed(3)
    target = torch.randn(4, 20, 16, generator=g)
    lengths = torch.tensor([20, 13, 5, 1])
    mask = torch.arange(20)[None] < lengths[:, None]
    target = torch.where(mask[..., None], target, torch.nan)  # padding may hold anything
    n = torch.tensor([10, 4, 5, 1])
    net = LearnedInitializer(Architecture(dim=16, width=8, heads=2, layers=2))
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.3, generator=g)
    s = net(target, mask, n)
    assert s.mask.sum(-1).tolist() == n.tolist()
    for k, t in s.params().items():
        assert torch.isfinite(t).all(), k
        assert (t[~s.mask] == 0).all(), f"inactive slots of {k} must be zero"
    assert ((s.mu >= 0) & (s.mu <= (lengths[:, None] - 1))).all()


@pytest.mark.parametrize("embeddings", ["adam", "solve"])
def test_unrolled_gradient_matches_finite_differences_float64(embeddings):
    """Through Adam on v, or through the solved embeddings (the offset, the solve and offset_for)."""
    net, target, mask, ids, decode, n = tiny_problem()
    params = {"out.weight": (0, 3), "proj_in.weight": (2, 1), "blocks.0.cross_reach": (1,), "log_lr_scale": (3,),
              "out.bias": (7,)}
    opt = InnerOptimizer(embeddings=embeddings)
    loss = outer_loss(net, target, mask, ids, decode, n, optimizer=opt)
    grads = dict(zip(dict(net.named_parameters()), torch.autograd.grad(loss, list(net.parameters()), allow_unused=True)))
    named = dict(net.named_parameters())
    h = 1e-6
    for name, index in params.items():
        p = named[name]
        with torch.no_grad():
            old = p[index].clone()
            p[index] = old + h
            up = outer_loss(net, target, mask, ids, decode, n, optimizer=opt)
            p[index] = old - h
            down = outer_loss(net, target, mask, ids, decode, n, optimizer=opt)
            p[index] = old
        fd = (up - down) / (2 * h)
        assert grads[name] is not None, name
        torch.testing.assert_close(grads[name][index], fd, rtol=1e-5, atol=1e-8, msg=name)


def test_first_order_gradient_is_the_loss_gradient_at_the_fitted_splats():
    net, target, mask, ids, decode, n = tiny_problem()
    got = torch.autograd.grad(outer_loss(net, target, mask, ids, decode, n, mode="first-order"), net.out.weight)[0]
    # independently: fit to the end without any graph, take dL/dp_K, pull it back through the initializer
    splats = net(target, mask, n)
    with torch.no_grad():
        _, final = meta.unroll(splats.detach(), target, mask, ids, decode, "mse+ce", InnerOptimizer(), 3, "first-order", 1,
                               net.log_lr_scale)
    live = {k: t.detach().requires_grad_(True) for k, t in final.items()}
    from splatopt.objectives import objective_terms
    from splatopt.render import render

    fld = render(splats.with_params(live), target.shape[1])
    dl_dp = torch.autograd.grad(objective_terms(splatopt.Objective.parse("mse+ce"), fld, target, mask, ids, decode)[0].sum(),
                                list(live.values()))
    want = torch.autograd.grad(list(splats.params().values()), net.out.weight, grad_outputs=list(dl_dp))[0]
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    full = torch.autograd.grad(outer_loss(net, target, mask, ids, decode, n, mode="full"), net.out.weight)[0]
    assert not torch.allclose(got, full), "first-order must drop the second-order terms"


def test_truncated_over_every_step_is_the_full_unroll_and_shorter_lies_between():
    net, target, mask, ids, decode, n = tiny_problem()
    grad = lambda mode, k: torch.autograd.grad(outer_loss(net, target, mask, ids, decode, n, mode, k), net.out.weight)[0]  # noqa: E731
    full, first = grad("full", 1), grad("first-order", 1)
    torch.testing.assert_close(grad("truncated", 3), full, rtol=1e-12, atol=1e-14)
    one, two = grad("truncated", 1), grad("truncated", 2)
    assert not torch.allclose(one, full) and not torch.allclose(one, first)
    # between: each step of second-order terms kept brings the gradient closer to the full unroll's
    gaps = [float((g - full).norm()) for g in (first, one, two)]
    assert gaps[0] > gaps[1] > gaps[2] > 0, gaps


def test_unroll_losses_match_fit_of_the_same_steps():
    net, target, mask, ids, decode, n = tiny_problem(torch.float32)
    net = LearnedInitializer(Architecture(dim=6, width=8, heads=2, layers=1))  # untrained: the grid
    with torch.no_grad():
        splats = net(target, mask, n)
        losses, final = meta.unroll(splats, target, mask, ids, decode, "mse", InnerOptimizer(), 5)
    result = splatopt.fit(splatopt.Targets(target, mask), n_splats=n.tolist(), steps=5, objective="mse", init="grid",
                          device="cpu", progress=False, record_every=1)
    torch.testing.assert_close(losses.float(), result.history["loss"], rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def model():
    return fixedpos.load()


@pytest.fixture(scope="module")
def bank(model):
    texts = ["Return the sum of a and b.", "Sort the list in place.", "Open the file for reading and writing.",
             "A custom key function can be supplied.", "Raise ValueError if the value is negative.",
             "Yield successive chunks from the iterable."]
    return meta.encode_bank(model, texts, "cpu")


def tiny_config(**over):
    base = dict(prompts=6, outer_steps=4, batch=3, width=16, heads=2, layers=1, inner_steps=2, log_every=1,
                checkpoint_every=2, warmup=1, fractions=(0.25, 0.5))
    return meta.MetaConfig(**{**base, **over})


def test_validation_runs_every_eval_every_steps_whatever_log_every_is(tmp_path, model, bank):
    """Evaluation ran only on log steps: eval_every = 3 with log_every = 2 evaluated at step 6, not at 3."""
    import json

    cfg = tiny_config(outer_steps=4, log_every=2, eval_every=3, eval_prompts=2)
    meta.train(cfg, tmp_path / "run", model=model, bank=bank, device="cpu", progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 3, 4]
    assert [r["step"] for r in rows if "val_token_accuracy_0" in r] == [3]


def train_until_killed_at_step_3(monkeypatch, cfg, out, model, bank) -> None:
    """Meta-train into ``out`` and kill the run as it logs step 3 (after the step-2 checkpoint)."""
    original = meta.append_json_line

    def crash_at_step_3(path, row):
        if row["step"] == 3:
            raise KeyboardInterrupt("killed")
        original(path, row)

    with monkeypatch.context() as patch:
        patch.setattr(meta, "append_json_line", crash_at_step_3)
        with pytest.raises(KeyboardInterrupt):
            meta.train(cfg, out, model=model, bank=bank, device="cpu", progress=False)


def test_resume_reproduces_the_uninterrupted_run(tmp_path, model, bank, monkeypatch):
    whole = meta.train(tiny_config(), tmp_path / "whole", model=model, bank=bank, device="cpu", progress=False)
    rows = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]

    train_until_killed_at_step_3(monkeypatch, tiny_config(), tmp_path / "cut", model, bank)
    with pytest.raises(ValueError, match="--resume"):
        meta.train(tiny_config(), tmp_path / "cut", model=model, bank=bank, device="cpu", progress=False)
    # each changed setting with both values (the keys alone left the user to find what the run had been given)
    with pytest.raises(ValueError, match=r"other settings \(lr = 0.0003 in the run, 0.01 now\); .*config.json"):
        meta.train(tiny_config(lr=1e-2), tmp_path / "cut", resume=True, model=model, bank=bank, device="cpu", progress=False)
    resumed = meta.train(tiny_config(), tmp_path / "cut", resume=True, model=model, bank=bank, device="cpu", progress=False)
    again = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in again] == [1, 2, 3, 4]
    for a, b in zip(rows, again):
        for key in ("loss", "loss_init", "loss_final", "grad_norm", "fraction"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), (a["step"], key)
    for (name, p), q in zip(whole.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-8, msg=name)
    loaded = LearnedInitializer.load(tmp_path / "cut" / "initializer.safetensors")
    torch.testing.assert_close(loaded.log_lr_scale, resumed.log_lr_scale)


def test_ctrl_c_ends_the_step_writes_a_checkpoint_and_resume_matches_the_whole_run(tmp_path, model, bank, monkeypatch):
    import os
    import signal

    whole = meta.train(tiny_config(), tmp_path / "whole", model=model, bank=bank, device="cpu", progress=False)
    original, calls = meta._outer_step, []

    def press_ctrl_c_in_step_2(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)  # arrives mid-step, as a real Ctrl-C would
        return original(*args, **kwargs)

    handler = signal.getsignal(signal.SIGINT)
    with monkeypatch.context() as patch:
        patch.setattr(meta, "_outer_step", press_ctrl_c_in_step_2)
        cut = meta.train(tiny_config(), tmp_path / "cut", model=model, bank=bank, device="cpu", progress=False)
    assert signal.getsignal(signal.SIGINT) is handler, "the Ctrl-C handler is put back"
    assert len(calls) == 2 and cut.meta["outer_steps_done"] == 2
    assert (tmp_path / "cut" / "initializer.safetensors").is_file()
    resumed = meta.train(tiny_config(), tmp_path / "cut", resume=True, model=model, bank=bank, device="cpu", progress=False)
    for (name, p), q in zip(whole.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-8, msg=name)


def test_memory_does_not_grow_over_outer_steps(tmp_path, model, bank, monkeypatch):
    """Each outer step's unrolled graph must be freed before the next one: no loss tensor survives its step."""
    alive_at_next_call = []
    previous: list[weakref.ref] = []
    original = meta.unroll

    def watched(*args, **kwargs):
        if previous:
            alive_at_next_call.append(previous[-1]() is not None)
        losses, params = original(*args, **kwargs)
        previous.append(weakref.ref(losses))
        return losses, params

    monkeypatch.setattr(meta, "unroll", watched)
    meta.train(tiny_config(outer_steps=5), tmp_path / "run", model=model, bank=bank, device="cpu", progress=False)
    assert alive_at_next_call == [False] * 4


@pytest.mark.cuda
def test_cuda_memory_does_not_grow_over_outer_steps(tmp_path, model, monkeypatch):
    allocated = []
    original = meta.unroll

    def watched(*args, **kwargs):
        allocated.append(torch.cuda.memory_allocated())
        return original(*args, **kwargs)

    monkeypatch.setattr(meta, "unroll", watched)
    cuda_bank = meta.encode_bank(model, ["Return the sum of a and b.", "Sort the list in place.", "Open the file."], "cuda")
    meta.train(tiny_config(outer_steps=6, batch=3), tmp_path / "run", model=model, bank=cuda_bank, device="cuda", progress=False)
    assert max(allocated[2:]) - min(allocated[2:]) < 1e6


def test_config_errors_name_the_key(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('inner_step = 10\n')
    with pytest.raises(ValueError, match="inner_step"):
        meta.MetaConfig.from_file(bad)
    with pytest.raises(ValueError, match="mode"):
        meta.MetaConfig(mode="second-order")
    with pytest.raises(ValueError, match="lr_muu"):
        meta.MetaConfig(inner_optimizer={"lr_muu": 0.1})
    shipped = meta.MetaConfig.from_file(ROOT / "splatopt" / "initializers" / "minilm-l6-layer2.toml")
    assert shipped.model == "minilm-l6" and shipped.layer == 2


@pytest.mark.parametrize("override, message", [
    ({"clip": -1.0}, "clip=-1.0 must be > 0"), ({"lr_scale_lr": -1.0}, "lr_scale_lr=-1.0 must be >= 0"),
    ({"time_limit_s": "10"}, "time_limit_s='10' must be a number"), ({"lr": "0.1"}, "lr='0.1' must be a finite number"),
    ({"learn_lr": "false"}, "learn_lr='false' must be a bool"), ({"width": 16.0}, "width=16.0 must be an int"),
    ({"heads": 0}, "heads=0 must be >= 1"), ({"min_tokens": 9, "max_tokens": 8}, "max_tokens=8 must be >= min_tokens=9"),
    ({"fractions": 0.5}, "fractions=0.5 must be a list"),
    ({"layer": 2.5}, r"layer=2.5 must be an int"),  # fixedpos.load refused it only inside train()
    # read by train() only after the training prompts were encoded (minutes), now at once
    ({"objective": "mse+cee"}, "cannot read term 'cee'"), ({"eval_corpus": "stdlib:valid"}, "eval_corpus='stdlib:valid': use .*stdlib:validation"),
    ({"corpus": "stdlb:train"}, "corpus='stdlb:train': use"),
])
def test_config_values_of_the_wrong_type_or_range_are_named_before_any_work(override, message):
    with pytest.raises(ValueError, match=message):
        meta.MetaConfig.from_dict({**meta.MetaConfig().to_dict(), **override})


@pytest.mark.parametrize("header", [{}, {"config": "{not json", "step": "2", "param_groups": "[]"}])
def test_resuming_from_a_damaged_checkpoint_names_the_file_and_the_fix(tmp_path, model, bank, header):
    """A checkpoint of the right format but without its config or with broken JSON raised a bare
    KeyError or JSONDecodeError."""
    from fixedpos.cache import write_safetensors

    out = tmp_path / "run"
    out.mkdir()
    write_safetensors(out / "checkpoint.safetensors", {"rng.data": torch.Generator().get_state()},
                      {"format": meta.CHECKPOINT_FORMAT, **header})
    with pytest.raises(ValueError, match=r"checkpoint.safetensors is a damaged meta-training checkpoint .*move it away"):
        meta.train(tiny_config(), out, resume=True, model=model, bank=bank, device="cpu", progress=False)


@pytest.mark.parametrize("damage, message", [
    ("no Adam state", "no Adam state after 4 outer steps"),
    ("one moment missing", r"Adam state of .* has \['exp_avg', 'step'\]"),
    ("NaN weights", r"net\..* holds NaN or inf"),
    ("step beyond the run", "step 99 outside 0..4"),
    ("short generator state", "a data generator state of"),
])
def test_a_checkpoint_damaged_inside_is_refused_before_anything_is_restored(tmp_path, model, bank, damage, message):
    """Each of these resumed silently (a fresh outer Adam, NaN weights written out as an initializer, 99
    steps "done") or failed with a bare KeyError or a torch shape error naming no file."""
    from fixedpos.cache import read_safetensors, write_safetensors

    out = tmp_path / "run"
    meta.train(tiny_config(), out, model=model, bank=bank, device="cpu", progress=False)
    path = out / "checkpoint.safetensors"
    tensors, header = read_safetensors(path)
    if damage == "no Adam state":
        tensors = {k: t for k, t in tensors.items() if not k.startswith("opt.")}
    elif damage == "one moment missing":
        del tensors[next(k for k in tensors if k.endswith(".exp_avg_sq"))]
    elif damage == "NaN weights":
        key = next(k for k in tensors if k.startswith("net.") and tensors[k].is_floating_point())
        tensors[key] = torch.full_like(tensors[key], float("nan"))
    elif damage == "step beyond the run":
        header["step"] = "99"
    else:
        tensors["rng.data"] = tensors["rng.data"][:100].clone()
    write_safetensors(path, tensors, header)
    with pytest.raises(ValueError, match=f"checkpoint.safetensors is a damaged meta-training checkpoint .*{message}.*move it away"):
        meta.train(tiny_config(), out, resume=True, model=model, bank=bank, device="cpu", progress=False)


def test_cli_set_overrides_one_field_of_a_table_and_reads_bare_strings():
    from splatopt.cli import _with_overrides

    config = {"corpus": "stdlib:train", "inner_optimizer": {"embeddings": "solve", "lr_mu": 0.05}}
    out = _with_overrides(config, ["inner_optimizer.lr_mu=0.1", "corpus=stdlib:validation", "fractions=[0.25, 0.5]"])
    assert out == {"corpus": "stdlib:validation", "inner_optimizer": {"embeddings": "solve", "lr_mu": 0.1}, "fractions": [0.25, 0.5]}
    assert config["inner_optimizer"]["lr_mu"] == 0.05  # the loaded config is left as it was
    with pytest.raises(ValueError, match="write KEY=VALUE"):
        _with_overrides(config, ["lr"])


def test_learned_initializer_file_roundtrip_and_corrupt_file(tmp_path):
    net, *_ = tiny_problem(torch.float32)
    path = net.save(tmp_path / "init.safetensors")
    back = LearnedInitializer.load(path)
    for (k, a), b in zip(net.state_dict().items(), back.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 40)
    with pytest.raises(ValueError, match="junk"):
        LearnedInitializer.load(tmp_path / "junk.safetensors")


def test_fit_with_a_learned_initializer_uses_its_inner_optimizer(tmp_path, model):
    net = LearnedInitializer(Architecture(dim=model.dim, width=16, heads=2, layers=1), InnerOptimizer(lr_v=0.3))
    with torch.no_grad():
        net.log_lr_scale[3] = torch.log(torch.tensor(2.0))
    path = net.save(tmp_path / "init.safetensors")
    result = splatopt.fit("Return the sum of a and b.", model, n_splats=0.5, steps=2, init={"name": "learned", "path": str(path)},
                          device="cpu", progress=False)
    assert result.config["optimizer"]["lr_v"] == pytest.approx(0.6)
    grid = splatopt.fit("Return the sum of a and b.", model, n_splats=0.5, steps=0, device="cpu", progress=False)
    learned0 = splatopt.fit("Return the sum of a and b.", model, n_splats=0.5, steps=0, init={"name": "learned", "path": str(path)},
                            device="cpu", progress=False)
    torch.testing.assert_close(learned0.splats.v, grid.splats.v, rtol=1e-4, atol=1e-5)  # untrained: the grid


def test_a_learned_initializer_is_refused_for_a_layer_it_was_not_meta_trained_on(model):
    import fixedpos

    shipped = splatopt.learned.load_learned(model)
    with pytest.raises(ValueError, match="meta-trained on model minilm-l6 layer 2, not minilm-l6 layer 3"):
        splatopt.fit("Return the sum of a and b.", fixedpos.load(layer=3), n_splats=0.5, steps=1, init=shipped,
                     device="cpu", progress=False)


def test_init_learned_for_a_model_without_a_shipped_initializer_says_how_to_get_one(model):
    from splatopt.learned import load_learned

    class Other:
        name, layer, model_hash = "some-other-encoder", 4, "0" * 64

    with pytest.raises(ValueError, match="meta-train"):
        load_learned(Other())


def test_shipped_initializer_loads_for_the_default_model(model):
    from splatopt.learned import shipped_path

    if not shipped_path(model.name, model.layer).is_file():
        pytest.fail("the default model's learned initializer must ship with the package")
    result = splatopt.fit("Return the sum of a and b.", model, n_splats=0.25, steps=3, init="learned", device="cpu", progress=False)
    assert result.config["initializer_meta"]["model_hash"] == model.model_hash
    assert torch.isfinite(result.field_error).all()


def test_ddp_on_two_gloo_processes_keeps_ranks_in_step(tmp_path):
    cfg = tmp_path / "tiny.toml"
    cfg.write_text("prompts = 12\nouter_steps = 3\nbatch = 2\nwidth = 16\nheads = 2\nlayers = 1\ninner_steps = 2\n"
                   "log_every = 1\ncheckpoint_every = 3\nwarmup = 1\nmax_tokens = 24\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "splatopt",
         "meta-train", "--config", str(cfg), "--out", str(tmp_path / "run"), "--device", "cpu", "--quiet"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    init = LearnedInitializer.load(tmp_path / "run" / "initializer.safetensors")
    assert init.meta["world_size"] == 2 and init.meta["ranks_in_step"] is True
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]


def test_checkpointed_inner_steps_give_the_same_second_order_gradient():
    net, target, mask, ids, decode, n = tiny_problem()

    def grad(checkpoint_inner):
        splats = net(target, mask, n)
        losses, _ = meta.unroll(splats, target, mask, ids, decode, "mse+ce", InnerOptimizer(), 3, "full", 1,
                                net.log_lr_scale, checkpoint_inner)
        return torch.autograd.grad(losses.mean(0).sum(), [net.out.weight, net.log_lr_scale])

    for a, b in zip(grad(False), grad(True)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_curriculum_lengthens_the_horizon_to_k():
    cfg = meta.MetaConfig(inner_steps=10, curriculum=100)
    horizons = [meta.horizon(cfg, s) for s in range(0, 150, 10)]
    assert horizons[0] == 1 and horizons[-1] == 10 and horizons == sorted(horizons)
    assert meta.horizon(meta.MetaConfig(inner_steps=10), 0) == 10


def test_a_study_with_a_learned_init_fits_with_its_meta_trained_optimizer(tmp_path, model):
    from splatopt import ablate

    net = LearnedInitializer(Architecture(dim=model.dim, width=16, heads=2, layers=1))
    with torch.no_grad():
        net.log_lr_scale[3] = torch.log(torch.tensor(2.0))
    path = net.save(tmp_path / "init.safetensors")
    study = tmp_path / "study.toml"
    study.write_text(f'corpus = "stdlib:validation"\nprompts = 2\nmax_tokens = 16\nseeds = [0]\n[base]\nsteps = 1\nrecord_every = 0\n'
                     f'[factors.start]\ngrid = {{ init = "grid" }}\nlearned = {{ init = {{ name = "learned", path = "{path}" }} }}\n'
                     f'learned-fixed-lr = {{ init = {{ name = "learned", path = "{path}" }}, optimizer.lr_v = 0.1 }}\n')
    rows = {r["levels"]["start"]: r for r in ablate.run(study, tmp_path / "out", progress=False, device="cpu")}
    assert rows["grid"]["config"]["optimizer"]["lr_v"] == pytest.approx(0.1)
    assert rows["learned"]["config"]["optimizer"]["lr_v"] == pytest.approx(0.2)
    assert rows["learned-fixed-lr"]["config"]["optimizer"]["lr_v"] == pytest.approx(0.1)


def test_unroll_with_solved_embeddings_follows_fit():
    """The unrolled solve is fit's: the same losses step by step from the same warm start (MSE, float64)."""
    from splatopt.init import WarmStart

    g = torch.Generator().manual_seed(5)
    target = torch.randn(2, 9, 6, generator=g, dtype=torch.float64)
    mask = torch.tensor([[True] * 9, [True] * 6 + [False] * 3])
    splats = GridInit()(target, mask, torch.tensor([3, 2]))
    splats = splats.with_params({"v": splats.v + 0.1 * torch.randn(splats.v.shape, generator=g, dtype=torch.float64)})
    opt = InnerOptimizer(embeddings="solve")
    losses, final = meta.unroll(splats, target, mask, None, None, "mse", opt, 4)
    fitted = splatopt.fit(splatopt.Targets(target, mask), None, n_splats=[3, 2], steps=4, objective="mse", init=WarmStart(splats),
                          optimizer=opt, device="cpu", dtype=torch.float64, record_every=1, progress=False)
    torch.testing.assert_close(losses.detach(), fitted.history["loss"].double(), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(final["v"][splats.mask].detach(), fitted.splats.v[splats.mask], rtol=1e-5, atol=1e-7)


def test_meta_training_through_solved_embeddings_ships_them_with_the_initializer(tmp_path, model, bank):
    net = meta.train(tiny_config(inner_optimizer={"embeddings": "solve"}), tmp_path / "run", model=model, bank=bank,
                     device="cpu", progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0 for r in rows)
    loaded = LearnedInitializer.load(tmp_path / "run" / "initializer.safetensors")
    assert loaded.inner_optimizer().embeddings == "solve" == net.optimizer.embeddings


def nan_bank(bank, prompts):
    """``bank`` with the fields of ``prompts`` (indices) set to NaN: those batches' inner fits blow up."""
    field = bank.field.clone()
    field[list(prompts)] = float("nan")
    return meta.FieldBank(field, bank.mask, bank.ids, bank.texts)


def count_adam_steps(monkeypatch) -> list[int]:
    calls = [0]
    original = torch.optim.Adam.step

    def counted(self, *args, **kwargs):
        calls[0] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", counted)
    return calls


def skip_pattern(out) -> list[int]:
    return [r["nonfinite_skipped"] for r in (json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines())]


def test_a_nonfinite_outer_step_is_skipped_and_never_reaches_the_weights(tmp_path, model, bank, monkeypatch):
    adam_steps = count_adam_steps(monkeypatch)
    net = meta.train(tiny_config(outer_steps=8), tmp_path / "run", model=model, bank=nan_bank(bank, [0]), device="cpu",
                     progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    skipped = [r["nonfinite_skipped"] for r in rows]  # log_every = 1: one row per step
    assert set(skipped) <= {0, 1} and 0 < sum(skipped) < 8, skipped
    # a step is skipped exactly when its batch blew up (its loss is written as null), and Adam steps on the others only
    assert [s == 1 for s in skipped] == [r["loss"] is None for r in rows]
    assert adam_steps[0] == 8 - sum(skipped)
    assert all(torch.isfinite(p).all() for p in net.parameters())
    saved = LearnedInitializer.load(tmp_path / "run" / "initializer.safetensors")
    assert all(torch.isfinite(t).all() for t in saved.state_dict().values())


def test_the_nonfinite_limit_counts_steps_in_a_row_not_in_all(tmp_path, model, bank, monkeypatch):
    cfg, nan = tiny_config(outer_steps=8), nan_bank(bank, [0])
    meta.train(cfg, tmp_path / "free", model=model, bank=nan, device="cpu", progress=False)
    pattern = skip_pattern(tmp_path / "free")
    runs = [len(r) for r in "".join(map(str, pattern)).split("0") if r]
    longest = max(runs)
    assert sum(pattern) > longest, pattern  # the data must tell a count in a row from a count in all
    monkeypatch.setattr(meta, "NONFINITE_LIMIT", longest + 1)
    meta.train(cfg, tmp_path / "above", model=model, bank=nan, device="cpu", progress=False)
    assert skip_pattern(tmp_path / "above") == pattern
    monkeypatch.setattr(meta, "NONFINITE_LIMIT", longest)
    with pytest.raises(RuntimeError, match=f"not finite at {longest} consecutive steps"):
        meta.train(cfg, tmp_path / "at", model=model, bank=nan, device="cpu", progress=False)
    end = "".join(map(str, pattern)).index("1" * longest) + longest  # the step the streak completes
    assert skip_pattern(tmp_path / "at") == pattern[:end]  # the failing step's row is written before the error
    assert not (tmp_path / "at" / "initializer.safetensors").exists()


def test_resume_keeps_counting_a_streak_of_nonfinite_steps(tmp_path, model, bank, monkeypatch):
    monkeypatch.setattr(meta, "NONFINITE_LIMIT", 4)
    cfg, nan = tiny_config(outer_steps=8, checkpoint_every=2), nan_bank(bank, range(6))
    with pytest.raises(RuntimeError, match="not finite at 4 consecutive steps"):
        meta.train(cfg, tmp_path / "whole", model=model, bank=nan, device="cpu", progress=False)
    train_until_killed_at_step_3(monkeypatch, cfg, tmp_path / "cut", model, nan)
    with pytest.raises(RuntimeError, match="outer step 4: the outer gradient was not finite at 4 consecutive steps"):
        meta.train(cfg, tmp_path / "cut", resume=True, model=model, bank=nan, device="cpu", progress=False)
    assert skip_pattern(tmp_path / "cut") == skip_pattern(tmp_path / "whole") == [1, 1, 1, 1]


def test_cli_resume_without_a_checkpoint_refuses_and_creates_nothing(tmp_path, capsys):
    from splatopt.cli import main

    cfg = tmp_path / "tiny.toml"
    cfg.write_text("prompts = 6\nouter_steps = 2\nbatch = 3\n")
    missing = tmp_path / "missing" / "run"
    assert main(["meta-train", "--config", str(cfg), "--out", str(missing), "--resume", "--device", "cpu", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("splatopt: error: --resume: ") and "does not exist" in err
    assert not (tmp_path / "missing").exists()


def test_train_names_a_bad_device_or_config_before_making_the_run_folder(tmp_path, model, bank):
    """meta.train took device="gpu" (torch's list of device types), CUDA on a machine without it (a bare
    AssertionError) or "meta" (failed at the first encode), each leaving an empty run folder behind; a dict
    config failed with "'dict' object has no attribute 'model'"."""
    out = tmp_path / "run"
    bad = ["gpu", "meta"] + ([] if torch.cuda.is_available() else ["cuda"])
    for device in bad:
        with pytest.raises(ValueError, match=f"device='{device}'"):
            meta.train(tiny_config(), out, model=model, bank=bank, device=device, progress=False)
    with pytest.raises(TypeError, match="cfg must be a MetaConfig, not dict: build it with"):
        meta.train(tiny_config().to_dict(), out, model=model, bank=bank, device="cpu", progress=False)
    assert not out.exists()


def test_a_missing_corpus_or_model_leaves_no_run_folder_behind(tmp_path):
    """The run folder was made before the model and the corpus were read, so a config naming a missing corpus
    (or model) failed leaving an empty folder, which looked like a run that had started."""
    out = tmp_path / "run"
    for bad in (dict(corpus=str(tmp_path / "missing.txt")), dict(model=str(tmp_path / "no-model"))):
        with pytest.raises((FileNotFoundError, ValueError)):
            meta.train(tiny_config(**bad), out, device="cpu", progress=False)
        assert not out.exists()


def test_cli_meta_train_reports_the_device_it_used_not_auto(tmp_path, model, bank, capsys, monkeypatch):
    from splatopt.cli import main

    cfg = tmp_path / "tiny.toml"
    cfg.write_text("prompts = 6\nouter_steps = 2\nbatch = 3\n")
    train = meta.train
    monkeypatch.setattr(meta, "train", lambda _, out, **kw: train(tiny_config(outer_steps=2), out, model=model, bank=bank, **kw))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # auto is the CPU here
    assert main(["meta-train", "--config", str(cfg), "--out", str(tmp_path / "run"), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "s on cpu; inner learning-rate scales mu x" in printed and "on auto" not in printed
    # each scale is named by its group: a bare list of four numbers said nothing of which was whose
    assert all(f"{group} x" in printed for group in ("log_sigma", "weight_logit", ", v")), printed


def test_meta_training_and_loading_an_initializer_leave_the_callers_random_state(tmp_path, model, bank):
    """train() reseeded the global generator (torch.manual_seed) and every LearnedInitializer.load drew
    from it (a module's initialization, then overwritten): a researcher's own seeded stream changed."""
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    net = meta.train(tiny_config(outer_steps=1), tmp_path / "run", model=model, bank=bank, device="cpu", progress=False)
    LearnedInitializer.load(tmp_path / "run" / "initializer.safetensors")
    assert torch.equal(torch.rand(4), expected)
    again = meta.train(tiny_config(outer_steps=1), tmp_path / "again", model=model, bank=bank, device="cpu", progress=False)
    for (name, p), q in zip(net.state_dict().items(), again.state_dict().values()):
        assert torch.equal(p, q), name  # still seeded by cfg.seed alone


def test_cli_resume_reads_the_runs_own_config_without_repeating_config_and_set(tmp_path, model, bank, capsys, monkeypatch):
    """A resume needed --config and every --set of the first run again, and the refusal pointed at the
    run's config.json, which --config could not read (it took TOML only)."""
    import json

    from splatopt.cli import main

    cfg = tmp_path / "tiny.toml"
    cfg.write_text("prompts = 6\nouter_steps = 2\nbatch = 3\nwidth = 16\nheads = 2\nlayers = 1\ninner_steps = 2\n"
                   "log_every = 1\ncheckpoint_every = 2\nwarmup = 1\nfractions = [0.25, 0.5]\n")
    given = []
    train = meta.train
    monkeypatch.setattr(meta, "train", lambda c, out, **kw: given.append(c) or train(c, out, model=model, bank=bank, **kw))
    run = tmp_path / "run"
    assert main(["meta-train", "--config", str(cfg), "--set", "lr=0.002", "--out", str(run), "--device", "cpu", "--quiet"]) == 0
    assert main(["meta-train", "--out", str(run), "--resume", "--set", "outer_steps=3", "--device", "cpu", "--quiet"]) == 0
    assert given[1] == meta.MetaConfig.from_dict({**given[0].to_dict(), "outer_steps": 3})  # lr=0.002 carried over
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3] and json.loads((run / "config.json").read_text())["outer_steps"] == 3
    assert main(["meta-train", "--config", str(run / "config.json"), "--out", str(run), "--resume", "--device", "cpu",
                 "--quiet"]) == 0  # the config.json the refusal names is a config --config reads
    capsys.readouterr()
    assert main(["meta-train", "--out", str(tmp_path / "other"), "--device", "cpu"]) == 2
    assert "give --config (a TOML file of MetaConfig keys), or --resume" in capsys.readouterr().err
    assert main(["meta-train", "--out", str(tmp_path / "none"), "--resume", "--device", "cpu"]) == 2
    assert "config.json does not exist, so there is no run to continue" in capsys.readouterr().err


def test_sigterm_from_a_batch_scheduler_ends_the_step_and_writes_a_checkpoint(tmp_path, model, bank, monkeypatch):
    """SIGTERM (what Slurm and other schedulers send before a kill) ended the process at once: every
    outer step since the last checkpoint was lost, and a run killed before its first one could not be
    resumed at all. It must act as Ctrl-C does: finish the step, checkpoint, and resume exactly."""
    import os
    import signal

    whole = meta.train(tiny_config(checkpoint_every=100), tmp_path / "whole", model=model, bank=bank, device="cpu",
                       progress=False)
    original, calls = meta._outer_step, []

    def sigterm_in_step_3(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(*args, **kwargs)

    def terminated(signum, frame):  # the default action would end pytest too
        raise SystemExit("terminated at once: the steps since the last checkpoint are lost")

    handler = signal.signal(signal.SIGTERM, terminated)
    try:
        with monkeypatch.context() as patch:
            patch.setattr(meta, "_outer_step", sigterm_in_step_3)
            cut = meta.train(tiny_config(checkpoint_every=100), tmp_path / "cut", model=model, bank=bank, device="cpu",
                             progress=False)
        assert signal.getsignal(signal.SIGTERM) is terminated, "the SIGTERM handler is put back"
    finally:
        signal.signal(signal.SIGTERM, handler)
    assert len(calls) == 3 and cut.meta["outer_steps_done"] == 3 and cut.meta["stopped"] == "SIGTERM"
    assert (tmp_path / "cut" / "checkpoint.safetensors").is_file(), "no checkpoint before step 100 without the deferral"
    resumed = meta.train(tiny_config(checkpoint_every=100), tmp_path / "cut", resume=True, model=model, bank=bank,
                         device="cpu", progress=False)
    assert "stopped" not in resumed.meta
    for (name, p), q in zip(whole.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-8, msg=name)


def test_cli_an_interrupted_meta_train_says_so_and_exits_nonzero(tmp_path, model, bank, capsys, monkeypatch):
    """After Ctrl-C the command printed "meta-trained 2 outer steps" and exited 0, exactly as a finished
    run: `meta-train ... && evaluate` went on with a half-trained initializer. It must name the stop, the
    steps it was asked for, and exit 130 (128 + SIGINT); a time limit (a budget the config set) exits 0."""
    import os
    import signal

    from splatopt.cli import main

    cfg = tmp_path / "tiny.toml"
    cfg.write_text("prompts = 6\nouter_steps = 4\nbatch = 3\n")
    train, original, calls = meta.train, meta._outer_step, []

    def ctrl_c_in_step_2(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return original(*args, **kwargs)

    monkeypatch.setattr(meta, "_outer_step", ctrl_c_in_step_2)
    monkeypatch.setattr(meta, "train", lambda c, out, **kw: train(tiny_config(outer_steps=c.outer_steps, time_limit_s=c.time_limit_s),
                                                                  out, model=model, bank=bank, **kw))
    assert main(["meta-train", "--config", str(cfg), "--out", str(tmp_path / "run"), "--device", "cpu", "--quiet"]) == 130
    printed = capsys.readouterr()
    assert "meta-trained 2 of 4 outer steps" in printed.out and "stopped early: SIGINT; --resume continues it" in printed.out
    assert "interrupted (SIGINT) at outer step 2 of 4" in printed.err
    monkeypatch.setattr(meta, "_outer_step", original)
    assert main(["meta-train", "--out", str(tmp_path / "run"), "--resume", "--device", "cpu", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "meta-trained 4 outer steps" in printed and "stopped" not in printed
    assert main(["meta-train", "--config", str(cfg), "--set", "time_limit_s=1e-9", "--out", str(tmp_path / "timed"),
                 "--device", "cpu", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "meta-trained 1 of 4 outer steps" in printed and "stopped early: time limit; --resume --set time_limit_s" in printed


def test_a_kill_while_config_json_is_rewritten_leaves_the_old_one_whole(tmp_path, model, bank, monkeypatch):
    """config.json, which a resume without --config reads, was rewritten in place at every start: a
    run killed in that write left a torn file and the run could no longer be resumed from its folder."""
    import json
    from pathlib import Path

    run = tmp_path / "run"
    meta.train(tiny_config(outer_steps=2), run, model=model, bank=bank, device="cpu", progress=False)
    before = (run / "config.json").read_text()
    write_text = Path.write_text

    def killed_mid_write(self, data, *args, **kwargs):
        if self.name == "config.json":
            write_text(self, data[: len(data) // 2], *args, **kwargs)
            raise KeyboardInterrupt("killed")
        return write_text(self, data, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", killed_mid_write)
    try:
        meta.train(tiny_config(outer_steps=3), run, resume=True, model=model, bank=bank, device="cpu", progress=False)
    except KeyboardInterrupt:
        pass
    after = json.loads((run / "config.json").read_text())  # JSONDecodeError: the torn file
    assert after == json.loads(before) or after == {**json.loads(before), "outer_steps": 3}


def test_a_resume_whose_time_limit_is_spent_takes_no_outer_step_and_says_how_to_give_more(tmp_path, model, bank, capsys):
    """A run stopped by its time limit and resumed with the same limit took one more outer step (and
    wrote it into the checkpoint) before the limit stopped it again; it must take none, say that the
    limit is spent and how to give more time, and stop as the time limit does."""
    from fixedpos.cache import read_safetensors

    cfg = tiny_config(time_limit_s=1e-9, checkpoint_every=100)
    first = meta.train(cfg, tmp_path / "run", model=model, bank=bank, device="cpu", progress=False)
    assert first.meta["outer_steps_done"] == 1 and first.meta["stopped"] == "time limit"
    capsys.readouterr()
    again = meta.train(cfg, tmp_path / "run", resume=True, model=model, bank=bank, device="cpu", progress=False)
    assert again.meta["outer_steps_done"] == 1 and again.meta["stopped"] == "time limit"
    assert read_safetensors(tmp_path / "run" / "checkpoint.safetensors")[1]["step"] == "1"
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1]
    err = capsys.readouterr().err
    assert "time limit of 1e-09 s" in err and "already spent" in err and "no outer step taken, 1 of 4 done" in err
    assert "--resume --set time_limit_s=<more than" in err
    for (name, p), q in zip(first.state_dict().items(), again.state_dict().values()):
        assert torch.equal(p, q), name


def test_a_meta_trained_initializer_records_the_versions_and_no_limit_is_not_written_as_infinity(tmp_path, model, bank):
    """The initializer a run wrote named no splatopt, torch or python version, and time_limit_s = inf was
    accepted and written to config.json as Infinity, which is not JSON (strict readers refused the file)."""
    import platform

    import splatopt

    with pytest.raises(ValueError, match="time_limit_s=inf must be a finite number > 0, or left out"):
        tiny_config(time_limit_s=float("inf"))
    meta.train(tiny_config(outer_steps=1), tmp_path / "run", model=model, bank=bank, device="cpu", progress=False)
    saved = LearnedInitializer.load(tmp_path / "run" / "initializer.safetensors").meta
    assert saved["versions"] == {"splatopt": splatopt.__version__, "torch": torch.__version__,
                                 "python": platform.python_version()}
