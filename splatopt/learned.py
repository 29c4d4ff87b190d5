"""LearnedInitializer: a network that proposes the first splats of a fit from the target field.

It implements the initializer protocol of :mod:`splatopt.init`
(``init(target, mask, n_splats, generator) -> SplatSet``) and is meta-trained by
:mod:`splatopt.meta` so that a few inner steps from its proposal fit as well as hundreds from the
grid. The proposal is a correction of the grid:

1. each prompt's N splats start on GridInit's grid (centre ``mu0``, width ``sigma_scale`` x the
   spacing ``L_b / N_b``);
2. a query per splat pools the projected field around its centre, then ``layers`` blocks of
   cross-attention (queries -> tokens) and self-attention (queries -> queries) refine it; every
   attention logit carries a learned per-head penalty ``-c_h ((t - mu0) / spacing)^2``, so locality
   is the default and any L, N (up to the model's window) and batch of masks work alike;
3. heads give a move of the centre (at most one spacing), a change of log-width, the weight logit,
   and a correction of the embedding added to the least-squares embeddings of the predicted
   geometry (``closed_form_v``), in units of the target's per-dimension RMS.

The output layer starts at zero, so an untrained initializer *is* GridInit; meta-training can only
move away from it where that helps. ``optimizer`` carries the inner-loop Adam settings it was
meta-trained with, and ``inner_optimizer()`` applies its learned per-group learning-rate scales to
them: ``fit(init="learned")`` uses that when no optimizer is given.

Files: safetensors (fp32 or fp16 weights) plus JSON metadata (architecture, model name/hash/layer,
inner optimizer, training config), written atomically; never pickle.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fixedpos.cache import read_safetensors, write_safetensors

from .init import Generators, grid_geometry
from .optim import InnerOptimizer, closed_form_v, target_rms
from .render import splat_weights
from .splats import SplatSet

FORMAT = "splatopt.learned-initializer"
SHIPPED_DIR = Path(__file__).parent / "initializers"


@dataclass(frozen=True)
class Architecture:
    """Shape of the network. dim: the field width d; width: hidden size; heads: attention heads."""

    dim: int
    width: int = 192
    heads: int = 4
    layers: int = 2
    sigma_scale: float = 0.6
    weight: float = 0.5


class _Block(nn.Module):
    """Pre-norm cross-attention (queries -> tokens), self-attention (queries -> queries), MLP."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm_q, self.norm_x, self.norm_s, self.norm_m = (nn.LayerNorm(width) for _ in range(4))
        self.cross_q, self.cross_kv, self.cross_o = nn.Linear(width, width), nn.Linear(width, 2 * width), nn.Linear(width, width)
        self.self_qkv, self.self_o = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
        # per-head locality: softplus(raw) is the penalty per squared spacing; heads start at
        # different reaches (from a tenth of a spacing to several) and learn their own
        self.cross_reach = nn.Parameter(torch.linspace(1.0, -3.0, heads))
        self.self_reach = nn.Parameter(torch.linspace(1.0, -3.0, heads))

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, dist2: Tensor, reach: Tensor, key_mask: Tensor) -> Tensor:
        """q [B, N, W], k/v [B, M, W], dist2 [B, N, M] squared distances in spacings, key_mask [B, M]."""
        B, N, W = q.shape
        h = self.heads
        split = lambda t: t.view(B, t.shape[1], h, W // h).transpose(1, 2)  # noqa: E731
        bias = -F.softplus(reach)[None, :, None, None] * dist2[:, None]  # [B, h, N, M]
        bias = bias.masked_fill(~key_mask[:, None, None, :], -math.inf)
        out = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=bias.to(q.dtype))
        return out.transpose(1, 2).reshape(B, N, W)

    def forward(self, q: Tensor, x: Tensor, cross_d2: Tensor, self_d2: Tensor, token_mask: Tensor, slot_mask: Tensor) -> Tensor:
        k, v = self.cross_kv(self.norm_x(x)).chunk(2, -1)
        q = q + self.cross_o(self._attend(self.cross_q(self.norm_q(q)), k, v, cross_d2, self.cross_reach, token_mask))
        sq, sk, sv = self.self_qkv(self.norm_s(q)).chunk(3, -1)
        q = q + self.self_o(self._attend(sq, sk, sv, self_d2, self.self_reach, slot_mask))
        return q + self.mlp(self.norm_m(q))


class LearnedInitializer(nn.Module):
    """Meta-trained splat initializer (see the module docstring).

    ``init(target [B, L, d], mask [B, L] bool (right-padded), n_splats [B] long (1 <= n_b <= L_b),
    generator) -> SplatSet`` [B, max(n_splats)] in the target's dtype, differentiable in the
    network's parameters (meta-training backpropagates through it); under ``torch.no_grad`` it is
    an ordinary initializer. It is deterministic (the generator is unused), and d must be
    ``arch.dim`` (ValueError otherwise). ``optimizer``: the inner Adam settings it was
    meta-trained with (:meth:`inner_optimizer` adds the learned learning-rate scales).
    ``picked_optimizer``: the inner optimizer picked on validation that ships beside a shipped
    initializer (``fit(optimizer="picked")``), or None. ``meta``: JSON-able provenance (model,
    model_hash, layer, config). The embeddings it proposes are least squares plus a learned
    correction for the render it was meta-trained with (Gaussian, additive, untruncated). Under
    another render (``kernel``, ``mode``, ``truncate``, set by :meth:`for_render`, as
    :func:`splatopt.fit` does for its own) they are solved to render that same starting field.
    """

    kernel: str = "gaussian"
    mode: str = "additive"
    truncate: float | None = None

    def __init__(self, arch: Architecture, optimizer: InnerOptimizer | None = None, meta: dict | None = None) -> None:
        super().__init__()
        self.arch = arch
        self.optimizer = optimizer or InnerOptimizer()
        self.meta = dict(meta or {})
        # the inner optimizer picked on validation for short budgets, where one ships beside the
        # weights (load_learned sets it; see picked_optimizer_path); None: none was picked
        self.picked_optimizer: InnerOptimizer | None = None
        d, w = arch.dim, arch.width
        self.norm_in = nn.LayerNorm(d)
        self.proj_in = nn.Linear(d, w)
        self.spacing_embed = nn.Linear(2, w)  # log spacing and relative position in the prompt
        self.blocks = nn.ModuleList(_Block(w, arch.heads) for _ in range(arch.layers))
        self.norm_out = nn.LayerNorm(w)
        self.out = nn.Linear(w, 3 + d)
        nn.init.zeros_(self.out.weight)  # an untrained initializer is exactly the grid
        nn.init.zeros_(self.out.bias)
        # inner-loop learning-rate scales per group (log), meta-learned with the network
        self.log_lr_scale = nn.Parameter(torch.zeros(4))

    # ------------------------------------------------------------------ protocol
    def forward(self, target: Tensor, mask: Tensor, n_splats: Tensor, generator: Generators = None) -> SplatSet:
        if target.dim() != 3 or target.shape[-1] != self.arch.dim:
            raise ValueError(f"LearnedInitializer for d={self.arch.dim} got a target of shape {tuple(target.shape)}")
        a = self.arch
        net_dtype = self.proj_in.weight.dtype
        mu0, log_sigma0, slot_mask = grid_geometry(mask, n_splats, a.sigma_scale, 0.0, None)
        lengths = mask.sum(-1).to(torch.float32)
        spacing = lengths[:, None] / n_splats.to(lengths.device)[:, None].to(torch.float32)  # [B, 1] tokens per splat
        pos = torch.arange(target.shape[1], device=target.device, dtype=torch.float32)
        # squared distances in spacings: token to splat [B, N, L], splat to splat [B, N, N]
        cross_d2 = ((pos[None, None, :] - mu0[:, :, None]) / spacing[:, :, None]) ** 2
        self_d2 = ((mu0[:, None, :] - mu0[:, :, None]) / spacing[:, :, None]) ** 2
        clean = torch.where(mask[..., None], target, 0.0).to(net_dtype)
        x = self.proj_in(self.norm_in(clean))  # [B, L, w]
        pool = torch.exp(-0.5 * cross_d2) * mask[:, None, :]
        pool = pool / pool.sum(-1, keepdim=True).clamp_min(1e-6)
        where = torch.stack([spacing.log().expand_as(mu0), (mu0 + 0.5) / lengths[:, None]], -1)
        q = pool.to(net_dtype) @ x + self.spacing_embed(where.to(net_dtype))  # [B, N, w]
        for block in self.blocks:
            q = block(q, x, cross_d2, self_d2, mask, slot_mask)
        o = self.out(self.norm_out(q)).to(target.dtype)  # [B, N, 3 + d]
        mu = mu0.to(target.dtype) + torch.tanh(o[..., 0]) * spacing.to(target.dtype)
        mu = torch.minimum(mu.clamp(min=0), (lengths[:, None] - 1).to(target.dtype))
        log_sigma = log_sigma0.to(target.dtype) + o[..., 1]
        logit = math.log(a.weight / (1 - a.weight)) + o[..., 2]
        zeros = torch.zeros(*mu.shape, target.shape[-1], device=target.device, dtype=target.dtype)
        geometry = SplatSet(mu, log_sigma, logit, zeros, slot_mask)
        a_trained = splat_weights(geometry, target.shape[1])  # the render it was meta-trained for
        v_ls = closed_form_v(a_trained, target, mask, slot_mask)
        v = (v_ls + o[..., 3:] * target_rms(target, mask)) * slot_mask[..., None]
        if (self.kernel, self.mode, self.truncate) != ("gaussian", "additive", None):
            # the learned correction is a field-space offset for the additive sum: under another render
            # the embeddings are solved to render the same starting field (a least-squares fit of it)
            a_render = splat_weights(geometry, target.shape[1], self.kernel, self.mode, self.truncate)
            v = closed_form_v(a_render, a_trained @ v, mask, slot_mask)
        zero = lambda t: torch.where(slot_mask, t, torch.zeros_like(t))  # noqa: E731
        return SplatSet(zero(mu), zero(log_sigma), zero(logit), v, slot_mask)

    def __call__(self, target: Tensor, mask: Tensor, n_splats: Tensor, generator: Generators = None) -> SplatSet:
        return super().__call__(target, mask, n_splats, generator)

    def for_render(self, kernel: str, mode: str, truncate: float | None = None) -> "LearnedInitializer":
        """This network for a fit's render (a shallow copy sharing every parameter; itself for the
        render it was trained with). Normalized rendering divides each token's field by the splats'
        summed weights, so embeddings meant for the additive sum rendered a field several times off
        (relative error 4-6 at the start, against 0.9)."""
        if (kernel, mode, truncate) == (self.kernel, self.mode, self.truncate):
            return self
        other = copy.copy(self)
        other.kernel, other.mode, other.truncate = kernel, mode, truncate
        return other

    def inner_optimizer(self, base: InnerOptimizer | None = None) -> InnerOptimizer:
        """``base`` (default: the one meta-trained with) with the learned per-group learning-rate scales applied."""
        base = base or self.optimizer
        s = self.log_lr_scale.detach().exp().tolist()
        return replace(base, lr_mu=base.lr_mu * s[0], lr_log_sigma=base.lr_log_sigma * s[1],
                       lr_weight=base.lr_weight * s[2], lr_v=base.lr_v * s[3])

    # ------------------------------------------------------------------ files
    def save(self, path: str | Path, half: bool = False) -> Path:
        """Write weights (fp16 if ``half``) and metadata as safetensors + JSON, atomically."""
        tensors = {k: (t.half() if half and t.is_floating_point() else t) for k, t in self.state_dict().items()}
        meta = {"format": FORMAT, "architecture": json.dumps(asdict(self.arch)),
                "optimizer": json.dumps(self.optimizer.to_dict()), "meta": json.dumps(self.meta, sort_keys=True)}
        write_safetensors(Path(path), tensors, meta)
        return Path(path)

    @classmethod
    def load(cls, path: str | Path, device=None) -> "LearnedInitializer":
        """Read a file written by :meth:`save` (weights as float32), onto ``device`` if given; ValueError
        naming the file if it is not one or its weights do not match its architecture,
        FileNotFoundError if it does not exist. ``picked_optimizer`` stays None (:func:`load_learned` sets it)."""
        tensors, header = read_safetensors(Path(path), "learned initializer")
        if header.get("format") != FORMAT:
            raise ValueError(f"{path} is not a learned initializer (format {header.get('format')!r}, expected {FORMAT!r})")
        try:
            arch = Architecture(**json.loads(header["architecture"]))
            opt = InnerOptimizer(**json.loads(header["optimizer"]))
            meta = json.loads(header.get("meta", "{}"))
        except (KeyError, TypeError, json.JSONDecodeError) as err:
            raise ValueError(f"{path}: unreadable learned-initializer metadata ({err}); re-create it with splatopt meta-train") from err
        with torch.random.fork_rng(devices=[]):  # its random initialization is overwritten: the caller's random state is kept
            init = cls(arch, opt, meta)
        try:
            init.load_state_dict({k: t.float() for k, t in tensors.items()})
        except RuntimeError as err:
            raise ValueError(f"{path}: weights do not match the architecture {arch}: {err}") from err
        return init.to(device) if device is not None else init


def shipped_path(model_name: str | None, layer: int | None) -> Path:
    """Where the initializer meta-trained for ``model_name`` at ``layer`` ships (it may not exist)."""
    return SHIPPED_DIR / f"{model_name}-layer{layer}.safetensors"


def picked_optimizer_path(model_name: str | None, layer: int | None) -> Path:
    """The JSON beside a shipped initializer that names its inner optimizer picked on validation."""
    return SHIPPED_DIR / f"{model_name}-layer{layer}.optimizer.json"


def load_picked_optimizer(path: str | Path) -> InnerOptimizer:
    """The ``optimizer`` of a picked-optimizer JSON (format 1), checked; ValueError naming the file if not."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a readable picked-optimizer JSON ({err}); restore it from the repository") from err
    if not isinstance(doc, dict) or doc.get("format") != 1 or not isinstance(doc.get("optimizer"), dict):
        raise ValueError(f"{path}: expected a JSON object with format 1 and an 'optimizer' object of InnerOptimizer "
                         "fields; restore it from the repository")
    try:
        return InnerOptimizer().with_fields(doc["optimizer"], "its optimizer")
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: {err}") from err


def load_learned(model) -> LearnedInitializer:
    """The shipped initializer meta-trained for ``model`` (its name, layer and weights hash must match),
    in eval mode without gradients, with its ``picked_optimizer`` where one ships; ValueError if none
    ships for that model and layer, or it was meta-trained for other weights."""
    name, layer, model_hash = getattr(model, "name", None), getattr(model, "layer", None), getattr(model, "model_hash", None)
    path = shipped_path(name, layer)
    if not path.is_file():
        # the Fisher files beside them are not initializers
        shipped = sorted(p.stem for p in SHIPPED_DIR.glob("*.safetensors") if not p.stem.endswith(".fisher")) if SHIPPED_DIR.is_dir() else []
        raise ValueError(f"init='learned': no initializer is shipped for model {name!r} layer {layer} (shipped: {shipped}); "
                         "meta-train one with `splatopt meta-train --config CFG` and pass init=LearnedInitializer.load(PATH)")
    init = LearnedInitializer.load(path)
    if init.meta.get("model_hash") not in (None, model_hash):
        raise ValueError(f"{path} was meta-trained for model weights {init.meta['model_hash'][:12]}, not {str(model_hash)[:12]}")
    picked = picked_optimizer_path(name, layer)
    if picked.is_file():
        init.picked_optimizer = load_picked_optimizer(picked)
    return init.eval().requires_grad_(False)
