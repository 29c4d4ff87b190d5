"""SplatSet: a batch of Gaussian text splats with an active mask, and its file format.

Each prompt ``b`` holds up to ``N`` splats (its capacity); ``mask[b, i]`` says whether slot ``i`` is
in use, so prompts with different splat counts share one batch. A splat has a centre ``mu`` in token
units (token ``t`` sits at ``t``), a width stored as ``log_sigma``, a weight stored as an
unconstrained logit (``weight = sigmoid(logit)``) and an embedding ``v`` in R^d.

Files: safetensors holding the tensors, with JSON metadata (format version, model name and hash,
layer, texts, token ids, rendering options), written atomically.
"""

from __future__ import annotations

import json
import math
import numbers
from dataclasses import dataclass, field as dc_field, replace
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from fixedpos.cache import check_has_data, read_safetensors, strict_json, write_safetensors

FORMAT_VERSION = 1
SIGMA_MIN = 0.05  # tokens: below this a splat no longer overlaps even its own token centre smoothly
SIGMA_MAX = 4096.0


def check_model_hash(path: str | Path, meta: dict, expect_model_hash: str | None) -> None:
    """ValueError when a saved fit's metadata (``model``, ``model_hash``) names other model weights than
    ``expect_model_hash``; a file that records no hash, or no expectation, passes."""
    if expect_model_hash is not None and meta.get("model_hash") not in (None, expect_model_hash):
        raise ValueError(
            f"{path} was fitted with model {meta.get('model')} ({str(meta.get('model_hash'))[:12]}), "
            f"not the model given ({expect_model_hash[:12]}); load it with the same model"
        )


def first_of_each(values: list, noun: str) -> str:
    """The first of ``values`` to hold each distinct value, named: "set 0 is torch.float32, set 2 is
    torch.float64" (``noun`` "set"), for an error that says which input differs."""
    first: dict = {}
    for i, value in enumerate(values):
        first.setdefault(value, i)
    return ", ".join(f"{noun} {i} is {value}" for value, i in first.items())


def _meta_json(meta: dict, path: Path) -> str:
    """``meta`` as JSON text for a file; TypeError naming the key that JSON cannot hold (json's own error,
    "Object of type Tensor is not JSON serializable", named neither the key nor the file)."""
    try:
        return strict_json(meta, sort_keys=True)
    except (TypeError, ValueError) as err:
        bad = [k for k, v in meta.items() if not _json_ok(v)]
        raise TypeError(f"not saving {path}: meta{bad[:1]} is not JSON ({err}); store plain numbers, strings, lists "
                        "and dicts in meta (e.g. t.tolist() for a tensor)") from None


def _json_ok(value) -> bool:
    try:
        strict_json(value)
    except (TypeError, ValueError):
        return False
    return True


@dataclass
class SplatSet:
    """Batched splats.

    mu: [B, N] centres in token units. log_sigma: [B, N] log widths (tokens; read clamped to
    [SIGMA_MIN, SIGMA_MAX]). weight_logit: [B, N], weight = sigmoid(weight_logit) in (0, 1).
    v: [B, N, d] embeddings. All float, one dtype and device. mask: [B, N] bool, active slots
    (inactive slots may hold anything and render nothing). meta: free-form JSON-able metadata
    carried into files (every derived set, by ``select``, ``to``, ``with_params``..., holds its own copy).
    ValueError for shapes that disagree or tensors on different devices,
    TypeError for a mask that is not bool or parameters of different dtypes.
    """

    mu: Tensor
    log_sigma: Tensor
    weight_logit: Tensor
    v: Tensor
    mask: Tensor
    meta: dict = dc_field(default_factory=dict)

    def __post_init__(self) -> None:
        names = ("mu", "log_sigma", "weight_logit", "v", "mask")
        for name in names:
            t = getattr(self, name)
            if not isinstance(t, Tensor):
                raise TypeError(f"SplatSet.{name} must be a tensor, not {type(t).__name__}: convert it with torch.as_tensor")
            if name != "mask" and not t.is_floating_point():  # integer centres round every gradient step away
                raise TypeError(f"SplatSet.{name} must be floating point, not {t.dtype}")
        if self.mu.dim() != 2:
            raise ValueError(f"SplatSet.mu has shape {tuple(self.mu.shape)}, expected (B, N)")
        B, N = self.mu.shape
        for name in ("log_sigma", "weight_logit", "mask"):
            if getattr(self, name).shape != (B, N):
                raise ValueError(f"SplatSet.{name} has shape {tuple(getattr(self, name).shape)}, expected {(B, N)} like mu")
        if self.v.dim() != 3 or self.v.shape[:2] != (B, N):
            raise ValueError(f"SplatSet.v has shape {tuple(self.v.shape)}, expected ({B}, {N}, d)")
        if self.mask.dtype != torch.bool:
            raise TypeError(f"SplatSet.mask must be bool, not {self.mask.dtype}")
        dtypes = {k: getattr(self, k).dtype for k in names[:4]}
        if len(set(dtypes.values())) > 1:  # render computed in mu's dtype: a float64 v was silently rounded to float32
            kinds = ", ".join(f"{k} {str(t).removeprefix('torch.')}" for k, t in dtypes.items())
            raise TypeError(f"SplatSet parameters must share one dtype, not {kinds}: convert them, e.g. v.to(mu.dtype)")
        # named here: rendering mixed devices fails deep in torch ("Tensor on device meta is not on the expected device cpu!")
        if len({getattr(self, k).device for k in names}) > 1:
            where = ", ".join(f"{k} on {getattr(self, k).device}" for k in names)
            raise ValueError(f"SplatSet tensors lie on different devices ({where}): move them to one device, e.g. t.to(mu.device)")

    # ---------------------------------------------------------------- views
    @property
    def sigma(self) -> Tensor:
        """[B, N] widths in tokens, clamped to [SIGMA_MIN, SIGMA_MAX]."""
        # clamped in log space: exp() first would overflow to inf and give NaN gradients
        return self.log_sigma.clamp(math.log(SIGMA_MIN), math.log(SIGMA_MAX)).exp()

    @property
    def weight(self) -> Tensor:
        """[B, N] weights in (0, 1)."""
        return torch.sigmoid(self.weight_logit)

    @property
    def batch_size(self) -> int:
        """B, the number of prompts."""
        return self.mu.shape[0]

    @property
    def capacity(self) -> int:
        """N, the slots per prompt (active or not)."""
        return self.mu.shape[1]

    @property
    def dim(self) -> int:
        """d, the embedding width."""
        return self.v.shape[-1]

    @property
    def counts(self) -> Tensor:
        """[B] long: active splats per prompt."""
        return self.mask.sum(-1)

    def __repr__(self) -> str:
        """One line of its sizes (the dataclass default printed every tensor, pages for one fit); the
        tensors are the fields themselves."""
        counts = self.counts.tolist()
        shown = ", ".join(map(str, counts[:8])) + (", ..." if len(counts) > 8 else "")
        return (f"SplatSet(B={self.batch_size}, N={self.capacity} slots, d={self.dim}, active per prompt [{shown}], "
                f"{str(self.mu.dtype).removeprefix('torch.')} on {self.mu.device}; fields: mu, log_sigma, weight_logit, v, mask)")

    def nonfinite(self) -> Tensor:
        """[B] bool: prompts with NaN or inf in an active splat's parameters (a diverged fit), which
        :meth:`save` refuses; inactive slots may hold anything."""
        bad = torch.zeros(self.batch_size, dtype=torch.bool, device=self.mask.device)
        for t in self.params().values():
            bad |= (~torch.isfinite(t) & (self.mask[..., None] if t.dim() == 3 else self.mask)).flatten(1).any(1)
        return bad

    def params(self) -> dict[str, Tensor]:
        """The four optimizable tensors, by name (the functional optimizer's state is keyed alike)."""
        return {"mu": self.mu, "log_sigma": self.log_sigma, "weight_logit": self.weight_logit, "v": self.v}

    def _replaced(self, **fields: Any) -> "SplatSet":
        """A copy with ``fields`` replaced and a copy of meta: a derived set that shared the dict changed the
        original's meta when its own was edited (``sub = s.select(0); sub.meta["note"] = ...``)."""
        return replace(self, **{"meta": dict(self.meta), **fields})

    def with_params(self, params: dict[str, Tensor]) -> "SplatSet":
        """A copy with some of the four tensors (by the names of :meth:`params`) replaced; mask and meta kept
        (meta copied: every derived set owns its own dict, as :meth:`cat` gives it)."""
        # dict[str, Any] here and below: mypy cannot tell that the tensors' names leave out the dict field meta
        unknown = sorted(set(params) - {"mu", "log_sigma", "weight_logit", "v"})
        if unknown:  # "SplatSet.__init__() got an unexpected keyword argument" named neither the method nor the names
            raise ValueError(f"with_params: {unknown} are not parameters; the parameters are mu, log_sigma, weight_logit "
                             "and v (widths and weights as log_sigma and weight_logit)")
        fields: dict[str, Any] = params
        return self._replaced(**fields)

    def detach(self) -> "SplatSet":
        """The same splats, detached from any autograd graph."""
        return self.with_params({k: t.detach() for k, t in self.params().items()})

    def to(self, *args: torch.device | str | int | torch.dtype, device: torch.device | str | int | None = None,
           dtype: torch.dtype | None = None) -> "SplatSet":
        """The splats on ``device`` and/or in floating ``dtype``, given as ``torch.Tensor.to`` takes them:
        ``to("cuda")``, ``to(torch.float64)``, ``to("cuda", torch.float64)`` or by keyword. The mask
        stays bool. TypeError for another kind of argument, one given twice, or a dtype that is not
        floating point; ValueError for a string that names no device."""
        for arg in args:
            if isinstance(arg, torch.dtype) and dtype is None:
                dtype = arg
            elif isinstance(arg, (str, torch.device, int)) and not isinstance(arg, bool) and device is None:
                device = arg
            else:
                given = ", ".join([*map(repr, args)] + [f"{k}={v!r}" for k, v in (("device", device), ("dtype", dtype)) if v is not None])
                raise TypeError(f"SplatSet.to({given}): give a device (str, torch.device or index), a dtype, or one "
                                "of each, positional or as device=/dtype=, each once")
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"SplatSet.to(dtype={dtype!r}): splats' parameters are floating point; give a torch dtype "
                            "such as torch.float32")
        if isinstance(device, str):
            try:
                device = torch.device(device)
            except RuntimeError:
                raise ValueError(f"SplatSet.to: device={device!r} is not a device; give e.g. 'cpu' or 'cuda:0'") from None
        moved: dict[str, Any] = {k: t.to(device=device, dtype=dtype) for k, t in self.params().items()}
        return self._replaced(mask=self.mask.to(device=device), **moved)

    def select(self, index: int | slice | Sequence[int] | Sequence[bool] | Tensor) -> "SplatSet":
        """Prompts ``index`` (int, slice, list or long / bool index tensor), keeping the batch
        dimension; IndexError for a prompt number out of range or a bool mask of another length than B."""
        if isinstance(index, Tensor) and index.ndim == 0:
            index = int(index)
        if isinstance(index, (int, numbers.Integral)):  # NumPy integers too: indexing with one would drop the batch dimension
            index = int(index)
            if not -self.batch_size <= index < self.batch_size:
                raise IndexError(f"select({index}): this set holds prompts 0..{self.batch_size - 1}")
            i = range(self.batch_size)[index]  # negative indices count from the end
            index = slice(i, i + 1)
        elif not isinstance(index, slice):  # prompt numbers or a bool mask: torch's own errors named neither
            flags = torch.as_tensor(index if isinstance(index, Tensor) else list(index))
            if flags.dtype == torch.bool and flags.shape != (self.batch_size,):
                raise IndexError(f"select: a bool mask needs one entry per prompt ({self.batch_size}), not {tuple(flags.shape)}")
            if flags.dtype != torch.bool and len(flags) and not (-self.batch_size <= int(flags.min()) and int(flags.max()) < self.batch_size):
                raise IndexError(f"select({flags.tolist()}): this set holds prompts 0..{self.batch_size - 1}")
        taken: dict[str, Any] = {k: t[index] for k, t in self.params().items()}
        return self._replaced(mask=self.mask[index], **taken)

    def trimmed(self) -> "SplatSet":
        """Drop trailing slots that no prompt uses."""
        used = self.mask.any(0).nonzero()
        n = int(used.max()) + 1 if len(used) else 0
        kept: dict[str, Any] = {k: t[:, :n] for k, t in self.params().items()}
        return self._replaced(mask=self.mask[:, :n], **kept)

    @staticmethod
    def cat(sets: list["SplatSet"]) -> "SplatSet":
        """Concatenate along the batch, padding capacities with inactive slots (zeros); meta is the
        first set's. ValueError for no sets, different widths d, dtypes or devices (convert them first:
        nothing is promoted or moved behind the caller's back)."""
        if not sets:
            raise ValueError("SplatSet.cat needs at least one set")
        if len({s.dim for s in sets}) > 1:
            raise ValueError(f"SplatSet.cat: the sets' embeddings have different widths d {sorted({s.dim for s in sets})}")
        dtypes, devices = [s.mu.dtype for s in sets], [s.mu.device for s in sets]
        if len(set(dtypes)) > 1:  # torch.cat promoted float32 and float64 to float64 without a word
            raise ValueError(f"SplatSet.cat: the sets hold different dtypes ({first_of_each(dtypes, 'set')}); convert them "
                             f"to one first, e.g. [s.to({dtypes[0]}) for s in sets]")
        if len(set(devices)) > 1:
            raise ValueError(f"SplatSet.cat: the sets lie on different devices ({first_of_each(devices, 'set')}); move them "
                             f"to one first, e.g. [s.to('{devices[0]}') for s in sets]")
        N = max(s.capacity for s in sets)

        def pad(t: Tensor, fill=0.0) -> Tensor:
            extra = N - t.shape[1]
            if extra == 0:
                return t
            shape = (t.shape[0], extra) + tuple(t.shape[2:])
            return torch.cat([t, torch.full(shape, fill, dtype=t.dtype, device=t.device)], 1)

        out = {k: torch.cat([pad(s.params()[k]) for s in sets]) for k in sets[0].params()}
        mask = torch.cat([pad(s.mask, False) for s in sets])
        return SplatSet(mask=mask, meta=dict(sets[0].meta), **out)

    # ---------------------------------------------------------------- files
    def save(self, path: str | Path, extra_tensors: dict[str, Tensor] | None = None) -> Path:
        """Write ``path`` (safetensors + JSON metadata) atomically: a temporary file, then a rename.

        Parameters are stored in at least float32; ``extra_tensors`` (name -> tensor, e.g. token ids)
        come back from :meth:`load`. Returns the path. ValueError, before writing, for NaN or inf in an
        active splat (a diverged fit), which :meth:`load` would refuse: the file would be unreadable."""
        path = Path(path)
        check_has_data(path, {**self.params(), "mask": self.mask})
        for k, t in self.params().items():
            bad = (~torch.isfinite(t) & (self.mask[..., None] if t.dim() == 3 else self.mask)).flatten(1).any(1)
            if bool(bad.any()):
                prompts = bad.nonzero().flatten().tolist()
                raise ValueError(f"not saving {path}: {k} holds NaN or inf in active splats of prompt(s) {prompts[:8]} (the "
                                 "fit diverged: lower its learning rates); select the other prompts to save them")
        # at least float32 (half precision widened), never narrowed: a float64 fit must load back as it was fitted
        tensors = {k: t.to(torch.promote_types(t.dtype, torch.float32)) for k, t in self.params().items()}
        tensors["mask"] = self.mask
        for k, t in (extra_tensors or {}).items():
            tensors[f"extra.{k}"] = t
        meta = {"format": "splatopt.splats", "format_version": str(FORMAT_VERSION), "meta": _meta_json(self.meta, path)}
        write_safetensors(path, tensors, meta)
        return path

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device | None = None, expect_model_hash: str | None = None) -> tuple["SplatSet", dict[str, Tensor]]:
        """Read a splat file; returns the set and its extra tensors (e.g. token ids), both on
        ``device`` (default: the CPU).

        Refuses, with a ValueError naming the file, a corrupt file, another format or version,
        inconsistent shapes, non-finite values, or a file made with another model than
        ``expect_model_hash``; FileNotFoundError for a missing file.
        """
        path = Path(path)
        tensors, header = read_safetensors(path, "splat file")
        if header.get("format") != "splatopt.splats":
            raise ValueError(f"{path} is a safetensors file but not a splatopt splat file (format={header.get('format')!r})")
        if header.get("format_version") != str(FORMAT_VERSION):
            raise ValueError(f"{path} has splat format version {header.get('format_version')}, this splatopt reads {FORMAT_VERSION}")
        try:
            meta = json.loads(header.get("meta", "{}"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} has corrupt metadata ({err})") from err
        if not isinstance(meta, dict):
            raise ValueError(f"{path} has corrupt metadata (a JSON {type(meta).__name__}, not an object)")
        missing = {"mu", "log_sigma", "weight_logit", "v", "mask"} - set(tensors)
        if missing:
            raise ValueError(f"{path} lacks tensors {sorted(missing)}")
        try:
            splats = cls(tensors["mu"], tensors["log_sigma"], tensors["weight_logit"], tensors["v"], tensors["mask"].bool(), meta)
        except (ValueError, TypeError) as err:
            raise ValueError(f"{path}: {err}") from err
        for k, t in splats.params().items():
            # active slots only: inactive ones may hold anything (a warm start's NaN padding is saved as it was fitted)
            if not torch.isfinite(t[splats.mask]).all():
                raise ValueError(f"{path}: tensor {k} holds NaN or infinite values in an active splat")
        check_model_hash(path, meta, expect_model_hash)
        extras = {k.removeprefix("extra."): t for k, t in tensors.items() if k.startswith("extra.")}
        if device is not None:
            splats = splats.to(device)
            extras = {k: t.to(device) for k, t in extras.items()}
        return splats, extras
