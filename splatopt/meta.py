"""Bilevel meta-training of the splat initializer.

    cfg = MetaConfig(outer_steps=2000, inner_steps=10, mode="full")
    initializer = splatopt.meta.train(cfg, out="runs/meta")        # or: splatopt meta-train --config cfg.toml

Outer loop: sample a batch of prompts (fields encoded once, kept on the device), let the
:class:`~splatopt.learned.LearnedInitializer` propose splats, run K inner steps of the fit
(:func:`unroll`: render -> objective -> gradient -> functional Adam, nothing in place), and take an
outer Adam step on the fit objective after K steps (or its mean over steps 0..K). Prompts are
independent, so a plain batch dimension with a summed loss gives exact per-prompt gradients.

Modes of the inner differentiation (``MetaConfig.mode``):

- ``"full"``: every inner step is differentiated exactly (second order, ``create_graph=True``).
- ``"first-order"``: inner gradients are constants (first-order MAML): each step's update is
  detached, so d params_K / d params_0 = I, and the initializer gets the gradient of the loss at
  the fitted splats; learning-rate scales still get their (first-order) gradient.
- ``"truncated"``: the last ``truncate_k`` steps exactly, the earlier ones first-order. Cutting
  the early steps off entirely, as truncated backprop does for an optimizer's own parameters,
  would leave an initializer with no gradient at all; the first-order bridge keeps one.

Known traps, handled: Adam's root takes its epsilon inside (``optim.adam_step``), so its
derivative at v = 0 is finite; the inner optimizer never updates in place; second-order unrolls run
uncompiled; memory of a full unroll grows linearly with K (``checkpoint_inner`` recomputes each
step's forward in the backward); ``curriculum`` lengthens the horizon from 1 to K over the first
outer steps; an outer step whose gradient is not finite (an inner fit that blew up on that batch)
is skipped, so NaN never reaches the weights, and ``NONFINITE_LIMIT`` such steps in a row stop the
run with an error instead of writing a broken initializer. Checkpoints (safetensors + JSON:
network, outer Adam, data RNG, step, skipped-step counters) are written atomically every
``checkpoint_every`` steps; ``resume=True`` continues exactly. Under ``torchrun``
the network is wrapped in DistributedDataParallel (gloo on CPU, NCCL on CUDA); every rank draws
the same global batch indices from one generator and takes its own slice.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import threading
import time
import tomllib
import warnings
from dataclasses import asdict, dataclass, field as dc_field, fields, replace
from pathlib import Path

import torch
from torch import Tensor

from fixedpos.cache import append_json_line, atomic_write_bytes, check_output_folder, read_safetensors, write_safetensors
from fixedpos.corpus import check_corpus_spec

from .fisher import resolve_metric
from .learned import Architecture, LearnedInitializer
from .objectives import Objective, objective_terms
from .optim import InnerOptimizer, adam_init, adam_step, offset_for, solve_embeddings, target_rms
from .render import render, splat_weights
from .splats import SplatSet

MODES = ("full", "truncated", "first-order")
CHECKPOINT_FORMAT = "splatopt.meta-checkpoint"
LR_GROUPS = ("mu", "log_sigma", "weight_logit", "v")
NONFINITE_LIMIT = 20  # consecutive outer steps with a non-finite gradient before train() gives up


@dataclass(frozen=True)
class MetaConfig:
    """Everything that decides a meta-training run (a TOML file's keys, flat; see ``from_file``).

    Data: ``corpus`` (``stdlib:train``, ``licenses`` or a .txt/.jsonl path), ``prompts`` sampled
    from it with ``min_tokens..max_tokens`` tokens (a cap: a smaller corpus gives fewer, with a
    warning), ``fractions``: N/L, one drawn per outer step, each in (0, 1]. Field model:
    ``model`` (a ``fixedpos.load`` name) and ``layer`` (None: its default). Network: ``width``,
    ``heads`` (dividing width), ``layers`` (:class:`~splatopt.learned.Architecture`).
    Inner: ``inner_steps`` K, ``mode`` ("full", "first-order", "truncated"), ``truncate_k`` (the
    exact last steps of "truncated", 1..K), ``objective``, ``inner_optimizer`` (InnerOptimizer
    fields over its defaults; the table ``[inner_optimizer]`` in TOML), ``loss_over`` ("final": the
    loss after K steps; "mean": mean over steps 0..K), ``learn_lr`` (meta-learn a scale per group
    of the inner learning rates), ``curriculum`` (outer steps over which the horizon grows from 1
    to K; 0 = off), ``checkpoint_inner`` (recompute each inner step's forward in the backward).
    Outer: ``outer_steps``, ``batch`` (prompts per step and rank), Adam ``lr`` with ``warmup``
    steps and cosine decay to a tenth (``lr_scale_lr`` for the four learning-rate scales, which
    need larger moves), ``weight_decay`` (Adam's L2 term, not on the scales), ``clip`` (global
    gradient norm), ``amp`` (bf16 autocast of the network on CUDA; the unrolled fit stays fp32),
    ``seed`` (prompt sampling, network initialization, batches). ``time_limit_s``: stop early
    (with a checkpoint) after this wall time in seconds, of the whole run, resumes included (so
    resuming a run stopped by it needs a larger one: a resume whose limit is already spent takes no
    outer step and says so, and ``--set time_limit_s=<more>`` gives it more). Logging: ``log_every`` (JSONL;
    TensorBoard with ``tensorboard = true``), ``checkpoint_every``, ``eval_every`` (0 = never) on
    ``eval_prompts`` prompts of ``eval_corpus``. Every value is checked on construction, the
    corpora's names and the objective included: ValueError naming the key.
    """

    corpus: str = "stdlib:train"
    prompts: int = 16384
    min_tokens: int = 8
    max_tokens: int = 64
    fractions: tuple[float, ...] = (0.125, 0.25, 0.5)
    model: str = "minilm-l6"
    layer: int | None = None
    width: int = 192
    heads: int = 4
    layers: int = 2
    inner_steps: int = 10
    mode: str = "full"
    truncate_k: int = 3
    objective: str = "mse+ce"
    loss_over: str = "final"
    learn_lr: bool = True
    curriculum: int = 0
    checkpoint_inner: bool = False
    inner_optimizer: dict = dc_field(default_factory=dict)
    outer_steps: int = 1000
    batch: int = 64
    lr: float = 3e-4
    lr_scale_lr: float = 3e-3
    warmup: int = 50
    weight_decay: float = 0.0
    clip: float = 1.0
    amp: bool = False
    seed: int = 0
    time_limit_s: float | None = None
    log_every: int = 10
    checkpoint_every: int = 100
    eval_every: int = 0
    eval_prompts: int = 128
    eval_corpus: str = "stdlib:validation"
    tensorboard: bool = False

    def __post_init__(self) -> None:
        # types first: a string "10" or a float width would otherwise fail after the data is encoded
        kinds = {str: ("corpus", "model", "mode", "objective", "loss_over", "eval_corpus"),
                 bool: ("learn_lr", "checkpoint_inner", "amp", "tensorboard"), dict: ("inner_optimizer",),
                 int: ("prompts", "min_tokens", "max_tokens", "width", "heads", "layers", "inner_steps", "truncate_k",
                       "curriculum", "outer_steps", "batch", "warmup", "seed", "log_every", "checkpoint_every",
                       "eval_every", "eval_prompts"),
                 float: ("lr", "lr_scale_lr", "weight_decay", "clip")}
        for kind, names in kinds.items():
            for name in names:
                value = getattr(self, name)
                ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
                if kind is float:
                    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                if not ok:
                    raise ValueError(f"{name}={value!r} must be {dict([(float, 'a finite number'), (int, 'an int')]).get(kind, 'a ' + kind.__name__)}")
        if self.layer is not None and (isinstance(self.layer, bool) or not isinstance(self.layer, int)):
            raise ValueError(f"layer={self.layer!r} must be an int (a hidden layer of the model), or left out")
        if self.time_limit_s is not None and (isinstance(self.time_limit_s, bool) or not isinstance(self.time_limit_s, (int, float))):
            raise ValueError(f"time_limit_s={self.time_limit_s!r} must be a number, or left out")
        for name in ("width", "heads", "layers", "min_tokens", "truncate_k", "eval_prompts"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        for name in ("warmup", "curriculum", "eval_every", "lr_scale_lr", "weight_decay"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        for name in ("lr", "clip"):  # a clip <= 0 would scale the outer gradient by a negative factor, or by zero
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")
        if self.max_tokens < self.min_tokens:
            raise ValueError(f"max_tokens={self.max_tokens} must be >= min_tokens={self.min_tokens}")
        # inf was written to config.json as Infinity, which is not JSON: no limit is the key left out
        if self.time_limit_s is not None and not 0 < self.time_limit_s < math.inf:
            raise ValueError(f"time_limit_s={self.time_limit_s} must be a finite number > 0, or left out for no limit")
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r}: choose one of {MODES}")
        if self.loss_over not in ("final", "mean"):
            raise ValueError(f"loss_over={self.loss_over!r}: choose 'final' or 'mean'")
        for name in ("inner_steps", "outer_steps", "batch", "prompts", "log_every", "checkpoint_every"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                raise ValueError(f"{name}={getattr(self, name)!r} must be an int >= 1")
        if self.mode == "truncated" and not 1 <= self.truncate_k <= self.inner_steps:
            raise ValueError(f"truncate_k={self.truncate_k} must lie in 1..inner_steps={self.inner_steps}")
        if not self.fractions or not all(0 < f <= 1 for f in self.fractions):
            raise ValueError(f"fractions={self.fractions!r}: each N/L must lie in (0, 1]")
        if self.width % self.heads:
            raise ValueError(f"width={self.width} must be divisible by heads={self.heads}")
        try:  # fail now, not after the data is encoded, on a misspelt field
            InnerOptimizer(**self.inner_optimizer)
        except TypeError as err:
            raise ValueError(f"inner_optimizer={self.inner_optimizer!r}: {err}; its keys are InnerOptimizer's fields") from err
        # the objective and the corpora too: train() reads them only after encoding the training prompts
        Objective.parse(self.objective)
        for name in ("corpus", "eval_corpus"):
            try:
                check_corpus_spec(getattr(self, name))
            except ValueError as err:
                raise ValueError(f"{name}={err}") from None

    @classmethod
    def from_file(cls, path: str | Path) -> "MetaConfig":
        """Read a TOML file of ``MetaConfig`` keys, or a run's ``config.json`` (a ``.json`` file);
        unknown keys are an error naming them."""
        path = Path(path)
        kind = "JSON" if path.suffix.lower() == ".json" else "TOML"
        if path.is_dir():
            hint = f" (a run folder's config is {path / 'config.json'})" if (path / "config.json").is_file() else ""
            raise ValueError(f"meta-training config {path} is a folder: give a TOML file of MetaConfig keys{hint}")
        if not path.is_file():
            raise FileNotFoundError(f"meta-training config {path} does not exist")
        try:
            text = path.read_text(encoding="utf-8")
            raw = json.loads(text) if kind == "JSON" else tomllib.loads(text)
        except (tomllib.TOMLDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{path}: not valid {kind} ({err})") from err
        except UnicodeDecodeError:  # e.g. a .safetensors file given as the config
            raise ValueError(f"meta-training config {path} is not a text file: give a TOML file of MetaConfig keys") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: a config is an object of MetaConfig keys, not {type(raw).__name__}")
        return cls.from_dict(raw, str(path))

    @classmethod
    def from_dict(cls, raw: dict, where: str = "config") -> "MetaConfig":
        """From a dict of ``MetaConfig`` keys (``fractions`` as a list); ValueError naming ``where`` for
        an unknown key or a bad value."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"{where}: unknown keys {unknown}; the keys are {sorted(known)}")
        raw = dict(raw)
        if "fractions" in raw:
            if not isinstance(raw["fractions"], (list, tuple)) or not all(
                    isinstance(f, (int, float)) and not isinstance(f, bool) for f in raw["fractions"]):
                raise ValueError(f"{where}: fractions={raw['fractions']!r} must be a list of N/L values, e.g. [0.125, 0.25, 0.5]")
            raw["fractions"] = tuple(float(f) for f in raw["fractions"])
        return cls(**raw)

    def to_dict(self) -> dict:
        """The keys as a JSON-able dict (``fractions`` as a list); :meth:`from_dict` reads it back."""
        out = asdict(self)
        out["fractions"] = list(self.fractions)
        return out


# ---------------------------------------------------------------------------- the unrolled fit
def unroll(
    splats: SplatSet,
    target: Tensor,
    mask: Tensor,
    ids: Tensor | None,
    decode,
    objective: Objective | str,
    optimizer: InnerOptimizer,
    steps: int,
    mode: str = "full",
    truncate_k: int = 1,
    log_lr_scale: Tensor | None = None,
    checkpoint_inner: bool = False,
    metric: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Run ``steps`` inner Adam steps from ``splats``, differentiably. Returns (losses [steps + 1, B], final params).

    splats: SplatSet [B, N(, d)] whose parameters may carry a graph (the initializer's output).
    target [B, L, d], mask [B, L], ids [B, L] (for a "ce" term); decode: the model's differentiable
    decoder (field [..., d] -> logits), for a "ce" term; objective: what each step descends and each
    loss measures. mode: "full" (second order), "truncated" (the last ``truncate_k`` steps exact,
    earlier ones first order) or "first-order" (no derivative through the steps' gradients).
    checkpoint_inner: recompute each step in backward (gradient checkpointing: memory flat in
    ``steps``, one more forward per step). The learning-rate schedule runs
    over ``steps`` (as ``fit`` would for a ``steps``-step fit). log_lr_scale: [4] log scales of the
    groups' learning rates (mu, log_sigma, weight_logit, v). losses[k] is the loss at step k
    (k = 0: the initializer's splats), each still attached to the graph. With
    ``optimizer.embeddings == "solve"`` Adam moves the geometry and the field-space offset that
    gives back the initializer's embeddings (``optim.offset_for``, differentiable), and the
    embeddings are solved for at every step, as in ``fit``; the final params hold the solved v.
    metric: [d, d], the whitening of ``optimizer.metric`` (``fisher.resolve_metric``), or None.
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: choose one of {MODES}")
    if optimizer.metric != "identity" and metric is None:
        raise ValueError(f"optimizer.metric={optimizer.metric!r} but no metric tensor was passed: pass "
                         "metric=splatopt.fisher.resolve_metric(optimizer, model, device, dtype)")
    objective = Objective.parse(objective)
    # inner gradients are needed even where the caller runs without grad (evaluation, finite
    # differences): splats that carry no graph become leaves of a local one
    with torch.enable_grad():
        params = {k: t if t.requires_grad else t.detach().requires_grad_(True) for k, t in splats.params().items()}
        return _unroll(splats, params, target, mask, ids, decode, objective, optimizer, steps, mode, truncate_k,
                       log_lr_scale, checkpoint_inner, metric)


def _unroll(splats, params, target, mask, ids, decode, objective, optimizer, steps, mode, truncate_k, log_lr_scale,
            checkpoint_inner, metric) -> tuple[Tensor, dict[str, Tensor]]:
    L = target.shape[1]
    solve, ridge = optimizer.embeddings == "solve", optimizer.solve_ridge
    if solve:
        a0 = splat_weights(replace(splats, **params), L)
        offset = offset_for(a0, params["v"], target, mask, splats.mask, ridge)
        # the inner steps take partial derivatives, as fit's do: the geometry they differentiate is
        # a copy, so the path geometry -> a0 -> offset counts only in the outer gradient
        params = {**{k: t.clone() for k, t in params.items() if k != "v"}, "offset": offset}
    state = adam_init(params)
    v_scale = target_rms(target, mask)

    def solved(p: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """(embeddings [B, N, d], field [B, L, d]) of geometry + offset ``p``."""
        a = splat_weights(replace(splats, **{k: t for k, t in p.items() if k != "offset"}), L)
        v = solve_embeddings(a, target, p["offset"], mask, splats.mask, ridge)
        return v, a @ v

    def loss_of(*values: Tensor) -> Tensor:
        p = dict(zip(params, values))
        field = solved(p)[1] if solve else render(replace(splats, **p), L)
        # the chunked cross-entropy stores its own gradient and cannot be differentiated twice
        return objective_terms(objective, field, target, mask, ids, decode, fused_ce=mode == "first-order" and None)[0]

    losses = []
    for k in range(steps + 1):
        values = tuple(params.values())
        if checkpoint_inner:
            loss = torch.utils.checkpoint.checkpoint(loss_of, *values, use_reentrant=False)
        else:
            loss = loss_of(*values)
        losses.append(loss)
        if k == steps:
            break
        exact = mode == "full" or (mode == "truncated" and k >= steps - truncate_k)
        grads = torch.autograd.grad(loss.sum(), values, create_graph=exact, retain_graph=True)
        lrs = optimizer.learning_rates(k, steps, v_scale)
        if log_lr_scale is not None:
            scale = log_lr_scale.exp()
            lrs = {g: lrs[g] * scale[i] for i, g in enumerate(LR_GROUPS)}
        if solve:
            lrs["offset"] = lrs.pop("v")
        params, state, _ = adam_step(params, dict(zip(params, grads)), state, lrs, optimizer, metric)
    if solve:
        params = {**{k: t for k, t in params.items() if k != "offset"}, "v": solved(params)[0]}
    return torch.stack(losses), params


# ---------------------------------------------------------------------------- data
@dataclass
class FieldBank:
    """Encoded prompts kept on the device: field [P, L, d], mask [P, L], ids [P, L], texts."""

    field: Tensor
    mask: Tensor
    ids: Tensor
    texts: list[str]

    def batch(self, idx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(field, mask, ids) of prompts ``idx``, trimmed to their longest prompt."""
        mask = self.mask[idx]
        L = int(mask.sum(-1).max())
        return self.field[idx, :L].float(), mask[:, :L], self.ids[idx, :L]


def encode_bank(model, texts: list[str], device, dtype=torch.float32, chunk: int = 256, progress: bool = False) -> FieldBank:
    """Tokenize and encode ``texts`` once (frozen model) into a :class:`FieldBank` on ``device``."""
    from tqdm.auto import tqdm

    batches = [model.tokenize(texts[i : i + chunk], device=device) for i in range(0, len(texts), chunk)]
    L = max(b.mask.shape[1] for b in batches)
    fields_, masks, ids = [], [], []
    for b in tqdm(batches, desc="encode", disable=not progress, leave=False):
        f = model.encode(b).to(dtype)
        pad = L - f.shape[1]
        fields_.append(torch.nn.functional.pad(f, (0, 0, 0, pad)))
        masks.append(torch.nn.functional.pad(b.mask, (0, pad)))
        ids.append(torch.nn.functional.pad(b.ids, (0, pad)))
    return FieldBank(torch.cat(fields_), torch.cat(masks), torch.cat(ids), list(texts))


# ---------------------------------------------------------------------------- checkpoints
def save_checkpoint(path: Path, net: LearnedInitializer, opt: torch.optim.Optimizer, generator: torch.Generator,
                    step: int, cfg: MetaConfig, elapsed_s: float, nonfinite: dict[str, int] | None = None) -> None:
    """Network, outer Adam state, the data generator, the step and the skipped-step counters
    (``nonfinite``: in a row, and since the last log row), as one safetensors file (atomic)."""
    tensors = {f"net.{k}": t for k, t in net.state_dict().items()}
    names = {id(p): n for n, p in net.named_parameters()}
    for group in opt.param_groups:
        for p in group["params"]:
            for key, value in opt.state.get(p, {}).items():
                tensors[f"opt.{names[id(p)]}.{key}"] = value if isinstance(value, Tensor) else torch.tensor(value)
    tensors["rng.data"] = generator.get_state()
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    meta = {"format": CHECKPOINT_FORMAT, "step": str(step), "elapsed_s": repr(elapsed_s),
            "config": json.dumps(cfg.to_dict(), sort_keys=True), "param_groups": json.dumps(groups),
            "net_meta": json.dumps(net.meta, sort_keys=True), "nonfinite": json.dumps(nonfinite or {})}
    write_safetensors(path, tensors, meta)


def load_checkpoint(path: Path, net: LearnedInitializer, opt: torch.optim.Optimizer, generator: torch.Generator,
                    cfg: MetaConfig) -> tuple[int, float, dict[str, int]]:
    """Restore a :func:`save_checkpoint` file in place; returns (step, elapsed seconds, skipped-step counters).
    Refuses another run's file."""
    tensors, header = read_safetensors(path, "meta-training checkpoint")
    if header.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a meta-training checkpoint (format {header.get('format')!r})")
    try:
        saved = json.loads(header["config"])
        step, elapsed = int(header["step"]), float(header.get("elapsed_s", "0"))
        groups, nonfinite = json.loads(header["param_groups"]), json.loads(header.get("nonfinite", "{}"))
        if not isinstance(saved, dict) or "rng.data" not in tensors:
            raise ValueError("no config object or data generator state")
    except (KeyError, ValueError) as err:  # JSONDecodeError is a ValueError
        raise ValueError(f"{path} is a damaged meta-training checkpoint ({type(err).__name__}: {err}); move it away "
                         "to start the run over, or use another --out") from None
    changed = sorted(k for k, v in cfg.to_dict().items()
                     if saved.get(k) != v and k not in ("outer_steps", "time_limit_s", "log_every", "checkpoint_every"))
    if changed:  # each with both values: the keys alone left the user to find what the run had been given
        given = cfg.to_dict()
        values = ", ".join(f"{k} = {json.dumps(saved.get(k))} in the run, {json.dumps(given[k])} now" for k in changed)
        raise ValueError(f"{path} was written by a run with other settings ({values}); resume with the same config (the "
                         f"run's is {path.parent / 'config.json'}) or use another --out")
    skipped_in_row = int(nonfinite.get("in_row", 0)) if isinstance(nonfinite, dict) else 0
    problems = _checkpoint_problems(tensors, net, step, int(saved.get("outer_steps", cfg.outer_steps)), skipped_in_row)
    if problems:  # checked whole before anything is restored: a damaged file leaves the network as it was
        raise ValueError(f"{path} is a damaged meta-training checkpoint ({'; '.join(problems[:4])}); move it away to start "
                         "the run over, or use another --out")
    device = next(net.parameters()).device
    net.load_state_dict({k.removeprefix("net."): t.to(device) for k, t in tensors.items() if k.startswith("net.")})
    params = dict(net.named_parameters())
    for k, t in tensors.items():
        if k.startswith("opt."):
            name, key = k.removeprefix("opt.").rsplit(".", 1)
            opt.state[params[name]][key] = t if key == "step" else t.to(device)
    for group, saved_group in zip(opt.param_groups, groups):
        group.update(saved_group)
    generator.set_state(tensors["rng.data"])
    return step, elapsed, nonfinite


ADAM_STATE = {"step", "exp_avg", "exp_avg_sq"}  # what torch.optim.Adam keeps per parameter (no amsgrad)


def _checkpoint_problems(tensors: dict[str, Tensor], net: LearnedInitializer, step: int, outer_steps: int,
                         skipped_in_row: int) -> list[str]:
    """What in a checkpoint's tensors does not fit ``net`` and an outer Adam at ``step``: net tensors
    missing, unknown, of another shape or not finite; a parameter's Adam state partial or of another
    shape; no Adam state at all after a step that was taken (``skipped_in_row``: the last steps,
    skipped for a non-finite outer gradient, took none); the step outside 0..outer_steps; a data
    generator state of the wrong size. Empty for a sound file."""
    problems = []
    own = net.state_dict()
    saved = {k.removeprefix("net."): t for k, t in tensors.items() if k.startswith("net.")}
    if set(saved) != set(own):
        problems.append(f"network tensors missing {sorted(set(own) - set(saved))[:3]}, unknown {sorted(set(saved) - set(own))[:3]}")
    for k in set(saved) & set(own):
        if saved[k].shape != own[k].shape:
            problems.append(f"net.{k} has shape {tuple(saved[k].shape)}, the network {tuple(own[k].shape)}")
        elif saved[k].is_floating_point() and not bool(torch.isfinite(saved[k]).all()):
            problems.append(f"net.{k} holds NaN or inf")
    params = dict(net.named_parameters())
    state: dict[str, dict[str, Tensor]] = {}
    for k, t in tensors.items():
        if k.startswith("opt."):
            name, key = k.removeprefix("opt.").rsplit(".", 1)
            state.setdefault(name, {})[key] = t
    for name, entries in state.items():
        if name not in params:
            problems.append(f"Adam state for an unknown parameter {name}")
        elif set(entries) != ADAM_STATE:
            problems.append(f"Adam state of {name} has {sorted(entries)}, not {sorted(ADAM_STATE)}")
        elif any(entries[m].shape != params[name].shape for m in ("exp_avg", "exp_avg_sq")):
            problems.append(f"Adam state of {name} has another shape than the parameter {tuple(params[name].shape)}")
    if step > skipped_in_row and not state:
        problems.append(f"no Adam state after {step} outer steps")
    if not 0 <= step <= outer_steps:
        problems.append(f"step {step} outside 0..{outer_steps}")
    if tensors["rng.data"].shape != torch.Generator().get_state().shape:
        problems.append(f"a data generator state of {tuple(tensors['rng.data'].shape)} bytes, not {tuple(torch.Generator().get_state().shape)}")
    return problems


# ---------------------------------------------------------------------------- the outer loop
def _distributed() -> tuple[int, int]:
    """(rank, world size); initializes the process group under torchrun (WORLD_SIZE set)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), world


def outer_lr(cfg: MetaConfig, step: int) -> float:
    """Linear warm-up, then cosine decay to a tenth, of the outer learning rate."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = (step - cfg.warmup) / max(1, cfg.outer_steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))


def horizon(cfg: MetaConfig, step: int) -> int:
    """Inner steps at outer step ``step``: K, or 1 -> K linearly over the first ``curriculum`` steps."""
    if not cfg.curriculum:
        return cfg.inner_steps
    return max(1, min(cfg.inner_steps, 1 + (cfg.inner_steps * step) // cfg.curriculum))


def train(cfg: MetaConfig, out: str | Path, resume: bool = False, device=None, model=None, bank: FieldBank | None = None,
          progress: bool = True) -> LearnedInitializer:
    """Meta-train a LearnedInitializer; writes ``out/checkpoint.safetensors``, ``out/metrics.jsonl``,
    ``out/config.json`` and, at the end (or at the time limit, or after Ctrl-C or SIGTERM), ``out/initializer.safetensors``.
    Returns the trained initializer, in eval mode; its ``meta["stopped"]`` says why a run ended before
    ``outer_steps`` ("SIGINT", "SIGTERM" or "time limit"; absent when it ran them all).

    cfg: a :class:`MetaConfig`. out: the run's folder (created). resume: continue from
    ``out/checkpoint.safetensors`` (the same config, but for outer_steps, which may grow,
    time_limit_s, log_every and checkpoint_every). device: default cuda if
    available (under torchrun, each rank's ``LOCAL_RANK`` GPU). model: a FieldModel (default:
    ``fixedpos.load(cfg.model, layer=cfg.layer)``). bank: encoded training prompts (default:
    ``cfg.prompts`` sampled from ``cfg.corpus``). progress: a tqdm bar on rank 0.
    Raises TypeError for a ``cfg`` that is not a MetaConfig; ValueError, before the run's folder is
    made, for a device that is none or that this machine lacks (resolved as ``fit`` does), if ``out``
    already holds a run and resume is False, if resume finds no checkpoint or another run's, or if the corpus gives fewer prompts than one batch;
    RuntimeError after ``NONFINITE_LIMIT`` consecutive outer steps with a non-finite gradient (no
    initializer is written then).
    """
    import fixedpos
    from tqdm.auto import tqdm

    from fixedpos.model import resolve_device

    from .fit import versions

    if not isinstance(cfg, MetaConfig):  # a dict failed as "'dict' object has no attribute 'model'"
        raise TypeError(f"cfg must be a MetaConfig, not {type(cfg).__name__}: build it with MetaConfig(**keys), "
                        "MetaConfig.from_dict(keys) or MetaConfig.from_file(path)")
    rank, world = _distributed()
    # checked before the run's folder is made: "gpu", or CUDA on a machine without it, failed with torch's
    # own error, and the meta device only at the first encode, each leaving an empty run folder behind
    device = resolve_device(device)
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
    out = check_output_folder(out, "--out")
    ckpt_path, log_path = out / "checkpoint.safetensors", out / "metrics.jsonl"
    if rank == 0:
        if not resume and ckpt_path.exists():
            raise ValueError(f"{out} already holds a meta-training run; pass --resume to continue it or use another --out")
        if resume and not ckpt_path.exists():  # refused before mkdir: a mistyped --out is not left behind as an empty folder
            raise ValueError(f"--resume: {ckpt_path} does not exist, so there is no run to continue in {out}; "
                             "check --out, or leave out --resume to start a run there")
    model = model or fixedpos.load(cfg.model, layer=cfg.layer)
    if bank is None:
        texts = fixedpos.sample_prompts(model, fixedpos.load_corpus_spec(cfg.corpus, "train"), cfg.prompts,
                                        cfg.max_tokens, cfg.min_tokens, seed=cfg.seed)
        if len(texts) < cfg.batch:
            raise ValueError(f"corpus {cfg.corpus} gives only {len(texts)} prompts of {cfg.min_tokens}..{cfg.max_tokens} "
                             f"tokens, fewer than one batch of {cfg.batch}: use a larger corpus or a smaller batch")
        if len(texts) < cfg.prompts and rank == 0:  # "prompts" is a cap; the shipped run's corpus gives 7555 of 16384
            warnings.warn(f"corpus {cfg.corpus} gives {len(texts)} prompts of {cfg.min_tokens}..{cfg.max_tokens} tokens, "
                          f"fewer than prompts = {cfg.prompts}: meta-training on those {len(texts)}", stacklevel=2)
        bank = encode_bank(model, texts, device, progress=progress and rank == 0)
    # the network's own initialization, seeded: identical on every rank. It is built on the CPU, whose
    # generator alone is seeded and then given back, so the caller's random state is left as it was
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(cfg.seed)
        net = LearnedInitializer(
            Architecture(model.dim, cfg.width, cfg.heads, cfg.layers),
            InnerOptimizer(**cfg.inner_optimizer),
            meta={"model": model.name, "model_hash": model.model_hash, "layer": model.layer, "config": cfg.to_dict(),
                  "versions": versions()},
        )
    net = net.to(device)
    net.log_lr_scale.requires_grad_(cfg.learn_lr)
    metric = resolve_metric(net.optimizer, model, device, torch.float32)  # [d, d] or None
    trainable = [p for p in net.parameters() if p.requires_grad]
    network = [p for p in trainable if p is not net.log_lr_scale]
    groups = [{"params": network, "base_lr": cfg.lr}]
    if cfg.learn_lr:
        groups.append({"params": [net.log_lr_scale], "base_lr": cfg.lr_scale_lr, "weight_decay": 0.0})
    opt = torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    generator = torch.Generator().manual_seed(cfg.seed)
    start, elapsed = 0, 0.0
    nonfinite: dict[str, int] = {}
    if rank == 0:  # made once the model and the corpus are read: a missing one left an empty run folder behind
        out.mkdir(parents=True, exist_ok=True)
    if resume:
        start, elapsed, nonfinite = load_checkpoint(ckpt_path, net, opt, generator, cfg)
    if rank == 0:
        # atomic: a resume without --config reads it, and a kill while it is rewritten must not leave it torn
        atomic_write_bytes(out / "config.json", json.dumps(cfg.to_dict(), indent=1, sort_keys=True).encode())
        _truncate_log(log_path, start)
    module: torch.nn.Module = net  # or its DistributedDataParallel wrapper
    if world > 1:
        module = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    writer = None
    if cfg.tensorboard and rank == 0:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise ValueError("tensorboard = true needs the tensorboard package (pip install tensorboard)") from err
        writer = SummaryWriter(str(out / "tensorboard"))
    evaluator = _Evaluator(cfg, model, device) if cfg.eval_every and rank == 0 else None
    objective = Objective.parse(cfg.objective)
    decode = model.decode if objective.needs_decoder else None
    began = time.perf_counter() - elapsed
    # a resume of a run whose time limit is spent took one more outer step before the limit stopped it
    spent = cfg.time_limit_s is not None and elapsed >= cfg.time_limit_s and start < cfg.outer_steps
    if spent and rank == 0:
        print(f"meta-train: the time limit of {cfg.time_limit_s:g} s (the run's wall time, resumes included) is already "
              f"spent: the run has taken {elapsed:.1f} s; no outer step taken, {start} of {cfg.outer_steps} done. "
              f"--resume --set time_limit_s=<more than {elapsed:.0f}> continues it", file=sys.stderr)
    bar = tqdm(range(start, start if spent else cfg.outer_steps), desc="meta-train", disable=not progress or rank != 0,
               unit="step", initial=start, total=cfg.outer_steps)
    done = start
    # skipped outer steps (non-finite gradient): in a row, and since the last log row; checkpointed
    nonfinite_in_row, skipped_since_log = nonfinite.get("in_row", 0), nonfinite.get("since_log", 0)
    interrupt = _DeferredInterrupt()
    for step in interrupt.guard(bar):
        idx = torch.randint(len(bank.texts), (cfg.batch * world,), generator=generator)[rank * cfg.batch : (rank + 1) * cfg.batch]
        frac = cfg.fractions[int(torch.randint(len(cfg.fractions), (1,), generator=generator))]
        target, mask, ids = bank.batch(idx.to(bank.field.device))
        n = (mask.sum(-1).float() * frac).round().long().clamp(min=1)
        K = horizon(cfg, step)
        for group in opt.param_groups:
            group["lr"] = outer_lr(cfg, step) * group["base_lr"] / cfg.lr
        stats = _outer_step(module, net, opt, trainable, cfg, target, mask, ids, n, K, objective, decode, device, metric)
        done = step + 1
        nonfinite_in_row = nonfinite_in_row + 1 if stats["skipped"] else 0
        skipped_since_log += int(stats.pop("skipped"))
        give_up = nonfinite_in_row >= NONFINITE_LIMIT
        evaluate = evaluator is not None and done % cfg.eval_every == 0
        # an evaluation step writes its row too: evaluated only on log steps, eval_every = 3 with log_every = 2
        # evaluated at step 6 and not at 3, with nothing said
        if rank == 0 and (done % cfg.log_every == 0 or evaluate or done == cfg.outer_steps or give_up):
            # a skipped step's loss may be NaN or inf: written as null, which strict JSON readers accept
            row = {"step": done, **{k: float(v) for k, v in stats.items()}, "nonfinite_skipped": skipped_since_log,
                   "horizon": K, "fraction": frac, "lr": outer_lr(cfg, step), "lr_scales": net.log_lr_scale.detach().exp().tolist(),
                   "elapsed_s": round(time.perf_counter() - began, 3)}
            skipped_since_log = 0
            if evaluate:
                assert evaluator is not None
                row.update(evaluator(net))
            append_json_line(log_path, row)
            if writer is not None:
                for k, v in row.items():
                    if isinstance(v, (int, float)) and k != "step":
                        writer.add_scalar(k, v, done)
            bar.set_postfix(loss=f"{float(stats['loss']):.3f}")
        if give_up:
            raise RuntimeError(
                f"meta-training stopped at outer step {done}: the outer gradient was not finite at {nonfinite_in_row} "
                f"consecutive steps. They were skipped, so the weights are those from before them, but no initializer was "
                f"written. Start a new run (another --out) with lower inner learning rates ([inner_optimizer]), a lower "
                f"outer lr or clip, or mode = \"truncated\"")
        out_of_time = cfg.time_limit_s is not None and time.perf_counter() - began > cfg.time_limit_s or interrupt.requested
        if world > 1:  # every rank must stop at the same step
            flag = torch.tensor([float(out_of_time)], device=device)
            torch.distributed.all_reduce(flag)
            out_of_time = bool(flag.item())
        if rank == 0 and (done % cfg.checkpoint_every == 0 or done == cfg.outer_steps or out_of_time):
            save_checkpoint(ckpt_path, net, opt, generator, done, cfg, time.perf_counter() - began,
                            {"in_row": nonfinite_in_row, "since_log": skipped_since_log})
        if out_of_time:
            if interrupt.requested and rank == 0:
                name = signal.Signals(interrupt.signal).name if interrupt.signal else "a signal"
                print(f"meta-train: interrupted ({name}) at outer step {done} of {cfg.outer_steps}; checkpoint written, "
                      "--resume continues from it", file=sys.stderr)
            elif rank == 0 and done < cfg.outer_steps:
                # the limit bounds the whole run's wall time, earlier resumes included: the same limit
                # would stop a resume after one step
                print(f"meta-train: time limit of {cfg.time_limit_s:g} s (the run's wall time, resumes included) reached at "
                      f"outer step {done} of {cfg.outer_steps}; checkpoint written: --resume --set time_limit_s=<more> "
                      "continues it", file=sys.stderr)
            if interrupt.requested:
                net.meta["stopped"] = signal.Signals(interrupt.signal).name if interrupt.signal else "interrupted"
            elif done < cfg.outer_steps:
                net.meta["stopped"] = "time limit"
            break
    if spent:
        net.meta["stopped"] = "time limit"
    net.meta["outer_steps_done"] = done
    net.meta["outer_steps"] = cfg.outer_steps
    net.meta["wall_s"] = round(time.perf_counter() - began, 1)
    net.meta["world_size"] = world
    if world > 1:  # DDP must have kept every rank's network identical: check, do not assume
        flat = torch.cat([p.detach().flatten() for p in net.parameters()]).double()
        spread = torch.stack([flat, -flat])
        torch.distributed.all_reduce(spread, op=torch.distributed.ReduceOp.MAX)
        net.meta["ranks_in_step"] = bool(torch.allclose(spread[0], -spread[1], rtol=0, atol=1e-6))
        torch.distributed.destroy_process_group()
    if rank == 0:
        net.save(out / "initializer.safetensors")
    if writer is not None:
        writer.close()
    return net.eval()


class _DeferredInterrupt:
    """Ctrl-C (SIGINT) or a batch scheduler's SIGTERM during meta-training ends the current outer step,
    writes a checkpoint and the initializer (as the time limit does) instead of losing the steps since
    the last checkpoint; a second signal of the same kind acts at once. ``signal``: the one received
    (None: none). Only the main thread can take signals: elsewhere they act as usual."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signal: int | None = None

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def guard(self, steps):
        if threading.current_thread() is not threading.main_thread():
            yield from steps
            return
        previous = {s: signal.getsignal(s) for s in self.SIGNALS}

        def request(signum, frame):
            self.signal = self.signal or signum
            signal.signal(signum, previous[signum])  # the second one is not deferred

        for s in self.SIGNALS:
            signal.signal(s, request)
        try:
            yield from steps
        finally:
            for s in self.SIGNALS:
                if signal.getsignal(s) is request:
                    signal.signal(s, previous[s])


def _outer_step(module, net, opt, trainable, cfg, target, mask, ids, n, K, objective, decode, device,
                metric) -> dict[str, Tensor | bool]:
    """Propose, unroll K inner steps, one outer Adam step. Returns detached scalars and ``skipped`` (the
    gradient was not finite and the step was not taken: one host sync per step).

    A function of its own so that the unrolled graph and its tensors die with its frame: nothing of
    one outer step is alive when the next one starts.
    """
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp and device.type == "cuda"):
        splats = module(target, mask, n)
    losses, _ = unroll(splats, target, mask, ids, decode, objective, net.optimizer, K, cfg.mode, min(cfg.truncate_k, K),
                       net.log_lr_scale if cfg.learn_lr else None, cfg.checkpoint_inner, metric)
    outer = (losses[-1] if cfg.loss_over == "final" else losses.mean(0)).mean()
    opt.zero_grad(set_to_none=True)
    outer.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.clip)
    # clipping scales a NaN or inf gradient into every weight: skip the step instead. DDP has
    # averaged the gradients, so every rank sees the same norm and skips alike
    skipped = not bool(torch.isfinite(grad_norm))
    if not skipped:
        opt.step()
    losses = losses.detach()
    return {"loss": outer.detach(), "loss_init": losses[0].mean(), "loss_final": losses[-1].mean(), "grad_norm": grad_norm,
            "skipped": skipped}


class _Evaluator:
    """Token accuracy after K inner steps (and at 0) on validation prompts, through ``fit``."""

    def __init__(self, cfg: MetaConfig, model, device) -> None:
        import fixedpos

        texts = fixedpos.sample_prompts(model, fixedpos.load_corpus_spec(cfg.eval_corpus), cfg.eval_prompts,
                                        cfg.max_tokens, cfg.min_tokens, seed=cfg.seed + 1)
        self.bank, self.model, self.cfg, self.device = encode_bank(model, texts, device), model, cfg, device

    def __call__(self, net: LearnedInitializer) -> dict:
        from .fit import Targets, fit

        was_training = net.training
        net.eval()
        b = self.bank
        out = {}
        for steps in (0, self.cfg.inner_steps):
            r = fit(Targets(b.field.float(), b.mask, b.ids), self.model, n_splats=0.25, steps=steps, init=net,
                    objective=self.cfg.objective, device=self.device, record_every=0, progress=False)
            assert r.token_accuracy is not None  # fit decodes with self.model, and the bank holds the token ids
            out[f"val_token_accuracy_{steps}"] = float(r.token_accuracy.mean())
        net.train(was_training)
        return out


def _truncate_log(path: Path, step: int) -> None:
    """Keep only log rows up to ``step`` (a resumed run re-logs the steps after its checkpoint)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (json.JSONDecodeError, KeyError):
            break  # a torn last line from a killed run
    atomic_write_bytes(path, "".join(k + "\n" for k in keep).encode())
