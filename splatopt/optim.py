"""The inner-loop optimizer: functional Adam over plain tensors, and closed-form embeddings.

Functional (TorchOpt / ``torch.func`` style): ``adam_step`` returns new parameter and state
tensors and never updates in place, so an unrolled inner loop stays differentiable (meta-training
backpropagates through it with ``create_graph=True``). The square root takes its epsilon inside
(``sqrt(v_hat + eps_root)``): its derivative at v = 0 is then finite, not NaN.

Learning rates are per parameter group (position, width, weight, embedding) and in natural units:
Adam moves a parameter by about its learning rate per step, so ``lr_mu = 0.1`` is a tenth of a
token, and ``lr_v`` is relative to the target field's per-dimension RMS (one number works for every
model). Prompts are independent: clipping and NaN guards act per prompt, never across the batch.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, replace

import torch
from torch import Tensor

GROUPS = ("mu", "log_sigma", "weight_logit", "v")
SCHEDULES = ("constant", "cosine", "linear", "wsd")
EMBEDDINGS = ("adam", "solve")
METRICS = ("identity", "fisher")  # or a path to a Fisher file (splatopt.fisher.save_field_fisher)
# the groups that live in field space [..., d]: the metric acts on their last dimension
FIELD_GROUPS = ("v", "offset")


@dataclass(frozen=True)
class InnerOptimizer:
    """Adam hyper-parameters of the inner loop.

    lr_mu: tokens per step. lr_log_sigma, lr_weight: per step in log-width / logit units.
    lr_v: per step, relative to the target's per-dimension RMS. mu_decay: the position learning
    rate decays log-linearly to ``lr_mu * mu_decay`` over the fit (3DGS). schedule: decay of the
    other groups ("cosine" (default) or "linear" to ``final_lr_factor``, "constant", or "wsd":
    constant, then linear to ``final_lr_factor`` over the last ``decay_fraction`` of the steps,
    "warmup-stable-decay" with its warm-up the separate ``warmup``; decay_fraction is read by "wsd"
    only). Every schedule is evaluated at ``step / total``, so it reaches ``final_lr_factor`` at
    step ``total``, one past the last step taken. clip: per-prompt, per-group gradient-norm clip
    (None: off). warmup: steps of linear learning-rate warm-up of every group (Adam's first steps
    are full-size whatever the gradient: a warm start wants them small).
    beta1, beta2, eps: Adam's; eps_root: added inside the square root, ``sqrt(v_hat + eps_root)``,
    so that the step's derivative stays finite (meta-training differentiates through it).
    embeddings: how the embeddings v move. "adam": v is a parameter and Adam moves it. "solve": v
    is the least-squares solution for the target plus a field-space offset [B, L, d], and Adam
    moves the offset (with ``lr_v``, in the same units) and the geometry (variable projection with
    a learned offset, :func:`solve_embeddings`). The solve undoes the ill-conditioning of A^T A that
    overlapping splats cause (per-coordinate Adam cannot), and the embeddings follow the splats
    as they move; for a fixed basis (``fit(basis=...)``) the coefficients are solved the same way,
    so a rate-distortion comparison can give every method the same update. solve_ridge: that
    solve's ridge, relative to the mean diagonal of A^T A.
    metric: the coordinates in which Adam moves the embeddings (or the offset). "identity": the
    field's own dimensions. "fisher": the decoder's empirical Fisher F in field space, shipped for
    the model (:mod:`splatopt.fisher`); a path names a Fisher file instead. Adam then scales the
    decoder's principal directions, not the field's arbitrary axes: its moments are kept for
    ``g @ R`` and it steps ``update @ R``, R = (F + metric_damping * mean eigenvalue * I)^(-1/2)
    scaled to a mean diagonal of 1 (:func:`splatopt.fisher.whitening`), i.e. Adam on ``x R^-1``.
    ``fit(varpro=True)`` refuses a metric other than "identity" (no embedding parameter moves).
    Every field is checked on construction: ValueError naming the field for a value out of range.
    """

    lr_mu: float = 0.1
    lr_log_sigma: float = 0.05
    lr_weight: float = 0.05
    lr_v: float = 0.1
    mu_decay: float = 0.05
    schedule: str = "cosine"
    final_lr_factor: float = 0.05
    decay_fraction: float = 0.2
    beta1: float = 0.9
    beta2: float = 0.99
    eps: float = 1e-8
    eps_root: float = 1e-16
    clip: float | None = None
    warmup: int = 0
    embeddings: str = "adam"
    solve_ridge: float = 1e-4
    metric: str = "identity"
    metric_damping: float = 1.0

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():  # NumPy scalars (a sweep's np.float32, np.int64) as Python numbers
            if isinstance(value, numbers.Integral) and not isinstance(value, int):
                object.__setattr__(self, name, int(value))
            elif isinstance(value, numbers.Real) and not isinstance(value, (int, float)):
                object.__setattr__(self, name, float(value))
        numeric = ("lr_mu", "lr_log_sigma", "lr_weight", "lr_v", "mu_decay", "final_lr_factor", "decay_fraction", "beta1",
                   "beta2", "eps", "eps_root", "solve_ridge", "metric_damping") + (("clip",) if self.clip is not None else ())
        for name in numeric:  # a string from a config would otherwise fail in a comparison below, unnamed
            if isinstance(getattr(self, name), bool) or not isinstance(getattr(self, name), (int, float)):
                raise ValueError(f"{name}={getattr(self, name)!r} must be a number")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule={self.schedule!r}: choose one of {SCHEDULES}")
        for name in ("lr_mu", "lr_log_sigma", "lr_weight", "lr_v"):
            if getattr(self, name) < 0 or not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name}={getattr(self, name)} must be a finite number >= 0")
        # a negative mu_decay makes mu_decay**frac complex; a negative final factor or clip ascends
        if not (self.mu_decay > 0 and math.isfinite(self.mu_decay)):
            raise ValueError(f"mu_decay={self.mu_decay} must be a finite number > 0")
        if not (self.final_lr_factor >= 0 and math.isfinite(self.final_lr_factor)):
            raise ValueError(f"final_lr_factor={self.final_lr_factor} must be a finite number >= 0")
        if isinstance(self.decay_fraction, bool) or not isinstance(self.decay_fraction, (int, float)) or not 0 < self.decay_fraction <= 1:
            raise ValueError(f"decay_fraction={self.decay_fraction} must lie in (0, 1] (the share of the steps that decay)")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must lie in [0, 1)")
        for name in ("eps", "eps_root"):
            if not (getattr(self, name) >= 0 and math.isfinite(getattr(self, name))):
                raise ValueError(f"{name}={getattr(self, name)} must be a finite number >= 0")
        if isinstance(self.warmup, bool) or not (isinstance(self.warmup, int) and self.warmup >= 0):
            raise ValueError(f"warmup={self.warmup!r} must be an int >= 0 (steps)")
        if self.embeddings not in EMBEDDINGS:
            raise ValueError(f"embeddings={self.embeddings!r}: choose one of {EMBEDDINGS}")
        if not (self.solve_ridge > 0 and math.isfinite(self.solve_ridge)):
            raise ValueError(f"solve_ridge={self.solve_ridge} must be a finite number > 0")
        if not isinstance(self.metric, str) or not (self.metric in METRICS or self.metric.endswith(".safetensors")):
            raise ValueError(f"metric={self.metric!r}: choose one of {METRICS} or a path to a Fisher file (*.safetensors)")
        if not (self.metric_damping > 0 and math.isfinite(self.metric_damping)):
            raise ValueError(f"metric_damping={self.metric_damping} must be a finite number > 0")
        if self.clip is not None and not self.clip > 0:
            raise ValueError(f"clip={self.clip} must be > 0 (or None: no clipping)")

    def learning_rates(self, step: int, total: int, v_scale: Tensor | float) -> dict[str, Tensor | float]:
        """Per-group learning rates at ``step`` of ``total`` (v's is lr_v times ``v_scale``: a [B, 1, 1] tensor of
        target RMS in a fit, 1.0 for a per-step table)."""
        frac = step / max(total, 1)
        if self.schedule == "constant":
            factor = 1.0
        elif self.schedule == "linear":
            factor = 1.0 - (1.0 - self.final_lr_factor) * frac
        elif self.schedule == "wsd":
            decayed = max(0.0, frac - (1.0 - self.decay_fraction)) / self.decay_fraction
            factor = 1.0 - (1.0 - self.final_lr_factor) * decayed
        else:
            factor = self.final_lr_factor + (1.0 - self.final_lr_factor) * 0.5 * (1.0 + math.cos(math.pi * frac))
        ramp = min(1.0, (step + 1) / self.warmup) if self.warmup else 1.0
        factor *= ramp
        return {
            "mu": self.lr_mu * self.mu_decay**frac * ramp,
            "log_sigma": self.lr_log_sigma * factor,
            "weight_logit": self.lr_weight * factor,
            "v": self.lr_v * factor * v_scale,
        }

    def to_dict(self) -> dict:
        """The fields as a plain dict (JSON-able; ``InnerOptimizer(**d)`` gives the optimizer back)."""
        return asdict(self)

    def with_fields(self, fields: dict, what: str = "optimizer") -> "InnerOptimizer":
        """This optimizer with ``fields`` (field name -> value, a config file's spelling) replaced;
        ValueError naming ``what`` for a name that is not a field, or for a bad value."""
        unknown = set(fields) - set(self.__dataclass_fields__)
        if unknown:
            raise ValueError(f"{what}: unknown InnerOptimizer fields {sorted(unknown)}; the fields are "
                             f"{sorted(self.__dataclass_fields__)}")
        return replace(self, **fields)


def target_rms(target: Tensor, mask: Tensor) -> Tensor:
    """[B, 1, 1] per-prompt RMS of the target per dimension over its tokens: the unit of ``lr_v``."""
    tok = mask[..., None].to(target.dtype)
    return ((torch.where(mask[..., None], target, 0.0) ** 2).sum((1, 2)) / (tok.sum((1, 2)) * target.shape[-1])).sqrt()[:, None, None]


def adam_init(params: dict[str, Tensor]) -> dict:
    """Adam state of ``params`` (name -> [B, ...]): first and second moments (zeros of each parameter's
    shape, dtype and device) and a step count: ``{"m": {name: Tensor}, "v": {name: Tensor}, "t": 0}``."""
    return {
        "m": {k: torch.zeros_like(p) for k, p in params.items()},
        "v": {k: torch.zeros_like(p) for k, p in params.items()},
        "t": 0,
    }


def _per_prompt_norm(g: Tensor) -> Tensor:
    """[B, 1, ...] gradient norm of each prompt, broadcastable to g."""
    return g.flatten(1).norm(dim=1).view((-1,) + (1,) * (g.dim() - 1))


def adam_step(
    params: dict[str, Tensor],
    grads: dict[str, Tensor],
    state: dict,
    lrs: dict[str, Tensor | float],
    cfg: InnerOptimizer,
    metric: Tensor | None = None,
) -> tuple[dict[str, Tensor], dict, Tensor]:
    """One functional Adam step. Returns (new params, new state, skipped [B] bool).

    params, grads: name -> tensor [B, ...] (batch first, as ``SplatSet.params()``); state: from
    :func:`adam_init` or a previous step; lrs: name -> a float or a tensor broadcastable to the
    parameter (e.g. [B, 1, 1]), as :meth:`InnerOptimizer.learning_rates` gives them. A prompt
    whose gradient holds NaN or inf is skipped: its parameters and moments stay as they
    were (``skipped`` reports it), and no other prompt is affected. Nothing is updated in place.
    metric: [d, d] symmetric R (``cfg.metric``'s whitening) or None. For the field-space groups
    (``v``, ``offset``) the moments are kept for ``g @ R`` and the step is ``update @ R``: Adam
    on ``x R^-1``, without forming the inverse. ValueError if grads, lrs or the state lack a name of
    params (extra names are ignored).
    """
    for what, given in (("grads", grads), ("lrs", lrs), ("state['m']", state["m"]), ("state['v']", state["v"])):
        missing = sorted(set(params) - set(given))
        if missing:  # a bare KeyError named one parameter, not the argument that lacked it
            raise ValueError(f"adam_step: {what} lacks {missing}; it needs an entry for every parameter in params "
                             f"{sorted(params)} (to hold a group fixed, leave it out of params, or give it a learning rate of 0)")
    t = state["t"] + 1
    b1, b2 = cfg.beta1, cfg.beta2
    ok = None
    for k, g in grads.items():
        finite = torch.isfinite(g).flatten(1).all(1)
        ok = finite if ok is None else ok & finite
    if ok is None:  # was an assert (gone under python -O): an empty step has no prompts to report on
        raise ValueError("adam_step: params is empty; give at least one parameter group to step")
    new_p, new_m, new_v = {}, {}, {}
    for k, p in params.items():
        g = grads[k]
        keep = ok.view((-1,) + (1,) * (g.dim() - 1))
        g = torch.where(keep, g, torch.zeros_like(g))
        whiten = metric if k in FIELD_GROUPS else None  # the metric R, for the field-space groups only
        if whiten is not None:
            g = g @ whiten
        if cfg.clip is not None:
            g = g * (cfg.clip / (_per_prompt_norm(g) + 1e-12)).clamp(max=1.0)
        m = b1 * state["m"][k] + (1 - b1) * g
        v = b2 * state["v"][k] + (1 - b2) * g * g
        m_hat = m / (1 - b1**t)
        v_hat = v / (1 - b2**t)
        update = lrs[k] * m_hat / (torch.sqrt(v_hat + cfg.eps_root) + cfg.eps)
        if whiten is not None:
            update = update @ whiten
        new_p[k] = torch.where(keep, p - update, p)
        new_m[k] = torch.where(keep, m, state["m"][k])
        new_v[k] = torch.where(keep, v, state["v"][k])
    return new_p, {"m": new_m, "v": new_v, "t": t}, ~ok


def closed_form_v(a: Tensor, target: Tensor, token_mask: Tensor, splat_mask: Tensor, ridge: float = 1e-4) -> Tensor:
    """Embeddings v [B, N, d] minimising |A v - T|^2 over the prompt's tokens (variable projection).

    a: [B, L, N] splat coefficients (``render.splat_weights``). target: [B, L, d]. token_mask:
    [B, L] bool; splat_mask: [B, N] bool. Returns a's dtype (half precision is solved in float32). A small ridge,
    relative to the mean diagonal of A^T A, keeps the solve well posed when splats coincide; slots
    with mask False get v = 0; padding slots change nothing (a prompt gets the same v in any batch).
    Differentiable in ``a`` (batched ``torch.linalg.solve_ex``).
    """
    out_dtype = a.dtype
    # LU has no half-precision kernels ("lu_cpu" not implemented for 'Half'); float32 and float64 stay as they are
    a = torch.where(token_mask[..., None] & splat_mask[:, None, :], a, 0.0).to(torch.promote_types(a.dtype, torch.float32))
    gram = a.transpose(1, 2) @ a  # [B, N, N]
    N = gram.shape[-1]
    # the mean over the prompt's own splats: over every slot, a prompt padded to a batch's larger
    # capacity got a smaller ridge, and so other embeddings than when fitted alone
    active = splat_mask.to(a.dtype)
    diag_mean = ((gram.diagonal(dim1=1, dim2=2) * active).sum(-1) / active.sum(-1).clamp_min(1)).clamp_min(1e-12)
    eye = torch.eye(N, device=a.device, dtype=a.dtype)
    # inactive slots get a unit diagonal so the system stays regular; their right-hand side is 0
    inactive = (~splat_mask).to(a.dtype)
    system = gram + eye * (ridge * diag_mean[:, None, None]) + torch.diag_embed(inactive)
    # masked positions may hold anything (NaN padding): 0 * NaN would still reach the solve
    rhs = a.transpose(1, 2) @ torch.where(token_mask[..., None], target.to(a.dtype), 0.0)
    # solve_ex: the same LU solve without reading its status back to the host (a stall per call on
    # CUDA); the ridge and the unit diagonal of inactive slots keep the system positive definite
    return (torch.linalg.solve_ex(system, rhs)[0] * splat_mask[..., None].to(a.dtype)).to(out_dtype)


def solve_embeddings(
    a: Tensor, target: Tensor, offset: Tensor, token_mask: Tensor, splat_mask: Tensor, ridge: float = 1e-4,
    held: Tensor | None = None, held_v: Tensor | None = None,
) -> Tensor:
    """Embeddings v [B, N, d] of ``embeddings="solve"``: least squares for ``target + offset``.

    a: [B, L, N] splat coefficients; target, offset: [B, L, d]; token_mask [B, L] bool; splat_mask
    [B, N] bool. held: [B, N] bool, active slots whose embeddings stay ``held_v`` [B, N, d] (frozen
    splats; give both or neither); the others solve for what the held ones leave unexplained.
    ridge: as :func:`closed_form_v`'s. Returns a's dtype. Differentiable in ``a`` and ``offset``.
    """
    if held is None and held_v is not None:  # silently ignored before: the caller meant to hold slots
        raise ValueError("solve_embeddings: held_v is given but held is None; give held [B, N] bool, the slots that "
                         "keep held_v, or leave held_v out to solve every slot")
    goal = torch.where(token_mask[..., None], target + offset, 0.0)
    if held is None:
        return closed_form_v(a, goal, token_mask, splat_mask, ridge)
    if held_v is None:  # an assert vanished under python -O, and the solve then failed inside torch.where
        raise ValueError("solve_embeddings: held is given but held_v is None; give held_v [B, N, d], the embeddings "
                         "the held slots keep, or leave held out to solve every slot")
    held = held & splat_mask
    fixed = torch.where(held[..., None], held_v, 0.0).to(a.dtype)
    v = closed_form_v(a, goal - a @ fixed, token_mask, splat_mask & ~held, ridge)
    return torch.where(held[..., None], fixed, v)


def offset_for(a: Tensor, v: Tensor, target: Tensor, token_mask: Tensor, splat_mask: Tensor, ridge: float = 1e-4) -> Tensor:
    """The offset [B, L, d] whose :func:`solve_embeddings` gives back ``v`` [B, N, d] (up to the ridge).

    A (v - v_ls), with v_ls the least-squares embeddings of the target itself: zero for splats that
    start at the least-squares optimum (the grid initializer), and it carries a warm start's
    embeddings into ``embeddings="solve"``. Zero at masked tokens.
    """
    v_ls = closed_form_v(a, target, token_mask, splat_mask, ridge)
    delta = torch.where(splat_mask[..., None], v - v_ls, 0.0).to(a.dtype)
    return torch.where(token_mask[..., None], a @ delta, 0.0)
