"""``fit``: splats for a batch of prompts by gradient descent, batched and masked.

    result = splatopt.fit(["some text", "another text"], n_splats=0.5, steps=300)
    result.texts, result.token_accuracy, result.field_error, result.cosine   # [B] each

Prompts are sorted by length and fitted in masked chunks (``batch_size`` prompts at once), never
one by one. The inner loop is render -> objective -> gradient -> functional Adam, K times; metrics
and the splats' geometry are copied to the host only every ``record_every`` steps.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import time
import warnings
from dataclasses import dataclass, field as dc_field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence, cast

import numpy as np
import torch
from torch import Tensor

if TYPE_CHECKING:  # fixedpos.model imports transformers; a hint needs none of it
    from fixedpos import FieldModel

from fixedpos.cache import check_has_data, read_safetensors, strict_json, write_safetensors
from fixedpos.model import resolve_device

from .basis import BASES, design_matrix, floats_per_term, terms_for_budget
from .density import DENSITIES, DensityContext, DensityStrategy, NoDensify, resolve_density
from .fisher import resolve_metric
from .init import INITIALIZERS, GridInit, Initializer, WarmStart, grid_geometry, resolve_initializer
from .graphs import AdamLoop
from .kernels import FusedAdamLoop, available, fused_field_loss, mse_coefficients, unavailable_reason
from .kernels.fused import MAX_SLOTS
from .learned import LearnedInitializer
from .objectives import Objective, mean_cosine, objective_terms, relative_mse, token_accuracy
from .optim import GROUPS, InnerOptimizer, adam_init, adam_step, closed_form_v, offset_for, solve_embeddings, target_rms
from .render import KERNELS, MODES, render, splat_weights
from .render_local import DEFAULT_TRUNCATE, render_local
from .splats import SplatSet, check_model_hash, first_of_each


BASIS_FORMAT = "splatopt.basis-fit"
# tokens: a batch with a longer prompt is fitted with truncated splats (DEFAULT_TRUNCATE sigmas) and
# the local renderer unless truncate is given; shorter batches render densely, untruncated, as always
LONG_LENGTH = 1024
# bytes of one dense coefficient tensor A [B, L, N] that varpro may build per chunk: its kernel
# evaluation and the solve's backward keep several such tensors, and the local renderer has no A
VARPRO_MAX_BYTES = 2**30
# FitResult fields (file names of its extra tensors) that fit keeps on the CPU whatever the device: load
# puts them there too, or FitResult.cat of a loaded result and a new fit mixes devices
SPLAT_META = ("model", "model_hash", "layer", "kernel", "mode", "truncate")  # what a fit's SplatSet.meta holds
HOST_SIDE = ("history.", "trajectory.", "density.", "n_terms", "skipped_steps", "floats_per_token", "edit_start.")


def versions() -> dict[str, str]:
    """The versions that decide a result's bits, as saved files record them: splatopt, torch, python."""
    import platform

    from . import __version__

    return {"splatopt": __version__, "torch": torch.__version__, "python": platform.python_version()}


def counted(n: int, unit: str) -> str:
    """``n`` and its plural unit, singular for one: "1 splat", "3 dct terms", "8 tokens"."""
    return f"{n} {unit.removesuffix('s') if n == 1 else unit}"


@dataclass
class Targets:
    """Fields to fit when there is no text: field [B, L, d] float, mask [B, L] bool, ids [B, L] long.

    mask: True on valid positions, right-padded (a prompt's positions first); None = every position
    valid. ids: the target token ids (optional); without them a cross-entropy objective, and the
    result's token accuracy, read the target tokens off the field with the decoder (argmax of
    decode(field)). ``fit`` checks all three (ValueError / TypeError naming the problem).
    """

    field: Tensor
    mask: Tensor | None = None
    ids: Tensor | None = None


@dataclass
class FitResult:
    """What ``fit`` returns; per-prompt tensors are in the caller's prompt order.

    splats: the fitted SplatSet (B prompts, capacity max N); None for the "dct" and "segments"
    bases, whose coefficients [B, K, d] are in ``coefficients``. ids [B, L] long, mask [B, L] bool:
    target tokens (ids None for a bare field fitted without a decoder). texts: decoded texts of the
    rendered fields (None without a decoder); input_texts: the texts fitted (None for fields);
    offsets: [B, L, 2] long, their tokens' character spans. token_accuracy (a fraction in [0, 1];
    None without a decoder), field_error (relative MSE), cosine: [B] float. history: ``step`` [S]
    and per-prompt metrics [S, B] at recorded steps (``loss``, ``field_error``, ``cosine``,
    ``n_terms``; ``ce`` and ``token_accuracy`` where computed), on the CPU. trajectory: ``step``
    [S], ``mu``/``sigma`` (tokens) and ``weight`` [S, B, N] at recorded steps, NaN in inactive
    slots, on the CPU; empty for a fixed basis. seconds: wall time of the fit (inner loops and
    final metrics); encode_seconds: of the target; a result of :meth:`select` holds its prompts' share
    of both, by their tokens, so that :meth:`cat` of the parts adds back up to the whole. config: fit's
    resolved settings (JSON). edit: for a result of
    :func:`splatopt.edit`, its records (a dict, or a list with one per prompt; see ``edit``; None for a
    prompt of a plain fit that :meth:`cat` joined to an edit's).
    skipped_steps: [B] steps whose gradient held NaN/inf and were skipped (the NaN guard), per prompt.
    basis: "splats" or a fixed basis. floats_per_token: [B] floats the representation stores per
    token (d + 3 per active splat, d per fixed-basis term). density: [B] counts of the density
    strategy's events ("cloned", "split", "pruned", "relocated"; None for a fixed basis). n_terms:
    [B] active splats or basis terms. The [B] counters are long tensors on the CPU.
    """

    splats: SplatSet | None
    ids: Tensor | None
    mask: Tensor
    texts: list[str] | None
    token_accuracy: Tensor | None
    field_error: Tensor
    cosine: Tensor
    history: dict[str, Tensor]
    trajectory: dict[str, Tensor]
    seconds: float
    encode_seconds: float
    config: dict = dc_field(default_factory=dict)
    input_texts: list[str] | None = None
    offsets: Tensor | None = None
    edit: dict | list[dict] | list[dict | None] | None = None
    skipped_steps: Tensor | None = None
    basis: str = "splats"
    coefficients: Tensor | None = None
    floats_per_token: Tensor | None = None
    density: dict[str, Tensor] | None = None
    n_terms: Tensor | None = None

    def __repr__(self) -> str:
        """One line of what the result holds (the dataclass default printed every tensor of it, thousands
        of lines for a notebook's ``result``); the tensors are the fields themselves."""
        s = self.summary()
        unit = "splats" if self.basis == "splats" else f"{self.basis} terms"
        acc = f", token_accuracy={s['token_accuracy']:.2%}" if "token_accuracy" in s else ""
        steps = self.config.get("steps")
        return (f"FitResult({counted(s['prompts'], 'prompts')}, {counted(s['tokens'], 'tokens')}, {counted(s['terms'], unit)}"
                f"{'' if steps is None else f', {steps} steps'}{acc}, field_error={s['field_error']:.3f} (relative MSE), "
                f"cosine={s['cosine']:.3f}, {self.seconds:.2f} s on {self.config.get('device', '?')}; "
                "fields: texts, token_accuracy, field_error, cosine, splats, history, trajectory, config, ...)")

    def summary(self) -> dict:
        """Plain numbers: ``prompts``, ``tokens``, ``basis``, ``terms`` and ``splats`` (totals), means
        over prompts of ``field_error``, ``cosine``, ``floats_per_token`` and ``token_accuracy`` (with
        ``token_accuracy_pooled`` over all tokens), each density event's total, and ``seconds`` (of a
        selection, its prompts' share of the fit's, by tokens: see :meth:`select`)."""
        out = {
            "prompts": int(self.mask.shape[0]),
            "tokens": int(self.mask.sum()),
            "basis": self.basis,
            "terms": int(self._terms().sum()),
            "splats": int(self.splats.counts.sum()) if self.splats is not None else 0,
            "field_error": float(self.field_error.mean()),
            "cosine": float(self.cosine.mean()),
            "seconds": round(self.seconds, 3),
        }
        if self.floats_per_token is not None:
            out["floats_per_token"] = float(self.floats_per_token.mean())
        for k, t in (self.density or {}).items():
            out[k] = int(t.sum())
        if self.token_accuracy is not None:
            tok = self.mask.sum(-1).float()
            out["token_accuracy"] = float(self.token_accuracy.mean())
            out["token_accuracy_pooled"] = float((self.token_accuracy * tok).sum() / tok.sum())
        return out

    def _terms(self) -> Tensor:
        """[B] active splats or basis terms (a file written before n_terms: the splats' counts)."""
        if self.n_terms is not None:
            return self.n_terms
        assert self.splats is not None, "a fixed basis's result always holds n_terms"
        return self.splats.counts

    def fit_options(self) -> dict:
        """``fit``'s keyword arguments that repeat this fit: ``fit(result.input_texts, model,
        **result.fit_options())`` on the same device gives the same bits (see :func:`fit_options`)."""
        return fit_options(self.config)

    def select(self, index: int | slice | Sequence[int] | Sequence[bool] | Tensor) -> "FitResult":
        """The prompts ``index`` (a prompt number, a slice, a list or tensor of them, repeats allowed, or
        a [B] bool mask), every per-prompt field with them; the batch dimension is kept. IndexError for a
        prompt out of range, an empty selection or a mask of another length; TypeError for another kind of
        index or non-integer prompt numbers.

        ``seconds`` and ``encode_seconds`` time the whole batch, not a prompt: the selection holds its
        prompts' share of them, by their tokens (a batched fit's cost grows with its tokens). So the
        selected parts of a partition add back up to the whole (``FitResult.cat`` of them counts the
        fit's time once, not once per part), and ``summary()["seconds"]`` of one prompt is its share."""
        B = self.mask.shape[0]
        picked: Sequence[int] | Sequence[bool] | Tensor
        if isinstance(index, slice):
            picked = list(range(B)[index])
        elif isinstance(index, (int, numbers.Integral)) or (isinstance(index, Tensor) and index.ndim == 0):
            picked = [int(index)]  # NumPy integers too
        elif (isinstance(index, (Sequence, Tensor)) or hasattr(index, "__array__")) and not isinstance(index, (str, bytes)):
            picked = index
        else:
            raise TypeError(f"select({index!r}): give a prompt number, a slice, a list or tensor of prompt numbers, or a "
                            "[B] bool mask")
        flags = torch.as_tensor(picked if isinstance(picked, Tensor) else list(picked))
        if flags.numel() == 0:  # an empty list is a float tensor: say what is wrong, not its dtype
            raise IndexError(f"select({index!r}) selects no prompt; this result holds prompts 0..{B - 1}")
        if flags.is_floating_point() or flags.is_complex():  # 0.5 was truncated to prompt 0
            raise TypeError(f"select({index!r}): prompt numbers are ints, not {flags.dtype}")
        if flags.dtype == torch.bool:  # a mask, not the prompt numbers 1 and 0
            if flags.shape != (B,):
                raise IndexError(f"select: a bool mask needs one entry per prompt ({B}), not {tuple(flags.shape)}")
            flags = flags.nonzero().flatten()
        idx = flags.long().cpu()
        if len(idx) == 0 or int(idx.min()) < -self.mask.shape[0] or int(idx.max()) >= self.mask.shape[0]:
            raise IndexError(f"select({list(picked)}): this result holds prompts 0..{self.mask.shape[0] - 1}")
        take = lambda t: t[idx.to(t.device)]  # noqa: E731
        on = lambda t: None if t is None else take(t)  # noqa: E731
        share = float(take(self.mask).sum()) / float(self.mask.sum())  # of the batch's tokens: its part of the time
        rows = lambda items: None if items is None else [items[i] for i in idx.tolist()]  # noqa: E731
        series = lambda d: {k: v if k == "step" else v[:, idx.to(v.device)] for k, v in d.items()}  # noqa: E731
        return replace(
            self, splats=None if self.splats is None else self.splats.select(idx.to(self.splats.mu.device)),
            ids=on(self.ids), mask=take(self.mask), texts=rows(self.texts), token_accuracy=on(self.token_accuracy),
            field_error=take(self.field_error), cosine=take(self.cosine), history=series(self.history),
            seconds=self.seconds * share, encode_seconds=self.encode_seconds * share,
            trajectory=series(self.trajectory), input_texts=rows(self.input_texts), offsets=on(self.offsets),
            edit=rows(self.edit) if isinstance(self.edit, list) else self.edit, skipped_steps=on(self.skipped_steps),
            coefficients=on(self.coefficients), floats_per_token=on(self.floats_per_token),
            density=None if self.density is None else {k: take(t) for k, t in self.density.items()}, n_terms=on(self.n_terms),
            config={**self.config, **{k: rows(self.config[k]) for k in ("n_splats", "edit") if isinstance(self.config.get(k), list)}},
        )

    @staticmethod
    def cat(results: Sequence["FitResult"]) -> "FitResult":
        """The prompts of ``results``, in order, as one result (e.g. two fits of different prompts).

        They must share the model, the device, the dtype, the basis and the recorded steps (ValueError
        naming the results that differ). Token tensors are
        padded to the longest prompt, splats to the largest capacity (inactive slots). ``edit`` (and
        ``config["edit"]``) become one record per prompt; ``config`` is otherwise the first result's,
        with ``n_splats`` per prompt where they differ; ``seconds`` and ``encode_seconds`` add up (a
        part taken by :meth:`select` holds its share of its fit's, so the parts of one fit add up to its time).
        """
        results = list(results)
        if not results:
            raise ValueError("FitResult.cat needs at least one result")
        if not all(isinstance(r, FitResult) for r in results):
            kinds = sorted({type(r).__name__ for r in results if not isinstance(r, FitResult)})
            raise TypeError(f"FitResult.cat takes FitResults only, not {', '.join(kinds)}")
        first = results[0]
        for r in results[1:]:
            if r.basis != first.basis:
                raise ValueError(f"FitResult.cat: bases differ ({first.basis!r} vs {r.basis!r})")
            if r.config.get("model_hash") != first.config.get("model_hash"):
                models = [f"{r.config.get('model')} ({str(r.config.get('model_hash'))[:12]})" for r in results]
                raise ValueError(f"FitResult.cat: the results come from different models ({first_of_each(models, 'result')})")
            for name in ("history", "trajectory"):
                a, b = getattr(first, name).get("step"), getattr(r, name).get("step")
                if (a is None) != (b is None) or (a is not None and not torch.equal(a, b)) or set(getattr(first, name)) != set(getattr(r, name)):
                    raise ValueError(f"FitResult.cat: the results record different {name} (steps or metrics); fit them with the same steps and record_every")
        devices = [r.field_error.device for r in results]
        if len(set(devices)) > 1:
            raise ValueError(f"FitResult.cat: the results lie on different devices ({first_of_each(devices, 'result')}); "
                             "load them onto one (FitResult.load(path, device=...)) or fit them there")
        # the splats' (or coefficients') dtype: torch.cat promoted float32 and float64 without a word
        dtypes = [cast(Tensor, r.splats.mu if r.splats is not None else r.coefficients).dtype for r in results]
        if len(set(dtypes)) > 1:
            raise ValueError(f"FitResult.cat: the results were fitted in different dtypes ({first_of_each(dtypes, 'result')}); "
                             f"fit them in one (fit(..., dtype={dtypes[0]}))")
        L = max(r.mask.shape[1] for r in results)
        pad_tokens = lambda t: torch.nn.functional.pad(t, (0, 0) * (t.dim() - 2) + (0, L - t.shape[1]))  # noqa: E731

        def joined(get, pad=None):
            parts = [get(r) for r in results]
            if any(p is None for p in parts):
                return None
            return torch.cat([pad(p) if pad else p for p in parts])

        def per_prompt(key: str) -> list | None:
            values = [r.config.get(key) for r in results]
            if key != "edit" and all(v == values[0] and not isinstance(v, list) for v in values):
                return values[0]
            if key == "n_splats":
                return [int(n) for r in results for n in r._terms().tolist()]
            return [x for r, v in zip(results, values) for x in (v if isinstance(v, list) else [v] * r.mask.shape[0])]

        rows = lambda name: None if any(getattr(r, name) is None for r in results) else [x for r in results for x in getattr(r, name)]  # noqa: E731
        K = max(r.coefficients.shape[1] for r in results if r.coefficients is not None) if first.coefficients is not None else 0
        densities = [r.density for r in results if r.density is not None]
        # one basis: every result holds splats where the first does
        splats = None if first.splats is None else [cast(SplatSet, r.splats).to(first.splats.mu.device) for r in results]
        return replace(
            first, splats=None if splats is None else SplatSet.cat(splats),
            ids=joined(lambda r: r.ids, pad_tokens), mask=joined(lambda r: r.mask, pad_tokens), texts=rows("texts"),
            token_accuracy=joined(lambda r: r.token_accuracy), field_error=joined(lambda r: r.field_error),
            cosine=joined(lambda r: r.cosine), history=_merge_series([r.history for r in results]),
            trajectory=_merge_series([r.trajectory for r in results], pad_splats=True),
            seconds=sum(r.seconds for r in results), encode_seconds=sum(r.encode_seconds for r in results),
            input_texts=rows("input_texts"), offsets=joined(lambda r: r.offsets, pad_tokens),
            # one edit record per prompt (a one-prompt edit holds a dict, not a list)
            edit=None if all(r.edit is None for r in results) else
            [x for r in results for x in (r.edit if isinstance(r.edit, list) else [r.edit] * r.mask.shape[0])],
            skipped_steps=joined(lambda r: r.skipped_steps),
            coefficients=joined(lambda r: r.coefficients, lambda t: torch.nn.functional.pad(t, (0, 0, 0, K - t.shape[1]))) if K else None,
            floats_per_token=joined(lambda r: r.floats_per_token), n_terms=joined(lambda r: r.n_terms),
            density=None if len(densities) < len(results) else {k: torch.cat([d[k] for d in densities]) for k in densities[0]},
            config={**first.config, "n_splats": per_prompt("n_splats"),
                    **({"edit": per_prompt("edit")} if any("edit" in r.config for r in results) else {})},
        )

    def save(self, path: str | Path) -> Path:
        """Write splats (or a fixed basis's coefficients), token ids, metrics, history, trajectory, edit
        records and configuration to ``path`` (safetensors + JSON, atomic); returns the path. ValueError,
        before writing, for NaN or inf in active splats or in a fixed basis's coefficients (a diverged
        fit), which :meth:`load` would refuse."""
        check_has_data(path, {"token_mask": self.mask, "field_error": self.field_error, "coefficients": self.coefficients,
                              **({} if self.splats is None else self.splats.params())})
        extra = {"token_mask": self.mask, "field_error": self.field_error, "cosine": self.cosine}
        for name in ("ids", "offsets", "token_accuracy"):
            if getattr(self, name) is not None:
                extra[name] = getattr(self, name)
        extra.update({f"history.{k}": v for k, v in self.history.items()})
        extra.update({f"trajectory.{k}": v for k, v in self.trajectory.items()})
        for name in ("floats_per_token", "n_terms", "skipped_steps"):
            if getattr(self, name) is not None:
                extra[name] = getattr(self, name)
        extra.update({f"density.{k}": v for k, v in (self.density or {}).items()})
        extra.update(_edit_start_tensors(self.edit))  # the rest of each edit record is in config["edit"]
        meta = {"config": self.config, "texts": self.input_texts, "decoded": self.texts, "basis": self.basis,
                "summary": self.summary(), "seconds": self.seconds, "encode_seconds": self.encode_seconds,
                "versions": versions()}
        if self.splats is None:  # a fixed basis: coefficients, no splats
            assert self.coefficients is not None, "a fixed basis's result always holds its coefficients"
            bad = (~torch.isfinite(self.coefficients)).flatten(1).any(1)
            if bool(bad.any()):  # load refuses them, so the file would be written and then unreadable
                prompts = bad.nonzero().flatten().tolist()
                raise ValueError(f"not saving {path}: coefficients hold NaN or inf for prompt(s) {prompts[:8]} (the fit "
                                 "diverged: lower its learning rates); select the other prompts to save them")
            coefficients = self.coefficients.to(torch.promote_types(self.coefficients.dtype, torch.float32))  # as SplatSet.save
            tensors = {"coefficients": coefficients, **{f"extra.{k}": v for k, v in extra.items()}}
            write_safetensors(Path(path), tensors, {"format": BASIS_FORMAT, "meta": strict_json(meta, sort_keys=True)})
            return Path(path)
        return SplatSet(**self.splats.params(), mask=self.splats.mask, meta={**self.splats.meta, **meta}).save(path, extra)

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device | None = None, expect_model_hash: str | None = None) -> "FitResult":
        """Read a file written by :meth:`save`, onto ``device`` (default: as stored, the CPU; history,
        trajectory and counters stay on the CPU, as ``fit`` leaves them). ValueError naming the file
        for a corrupt or inconsistent file, a bare splat file, or one fitted with another model than
        ``expect_model_hash`` (see ``SplatSet.load``); FileNotFoundError for a missing file."""
        # the meta device is allowed here: it loads the shapes alone, and no encoder is moved
        device = resolve_device(device, types=("cpu", "cuda", "meta")) if device is not None else None
        tensors, header = read_safetensors(Path(path), "fit result file")
        if header.get("format") == BASIS_FORMAT:
            try:
                splats, meta = None, json.loads(header.get("meta", "{}"))
            except json.JSONDecodeError as err:
                raise ValueError(f"fit result file {path} has corrupt metadata ({err}): it is damaged") from None
            if not isinstance(meta, dict) or "coefficients" not in tensors:
                raise ValueError(f"fit result file {path} is a fixed-basis fit without its "
                                 f"{'coefficients' if isinstance(meta, dict) else 'metadata object'}: it is damaged")
            if not torch.isfinite(tensors["coefficients"]).all():
                raise ValueError(f"fit result file {path}: tensor coefficients holds NaN or infinite values")
            config = meta.get("config")
            check_model_hash(path, config if isinstance(config, dict) else {}, expect_model_hash)
            extra = {k.removeprefix("extra."): t for k, t in tensors.items() if k.startswith("extra.")}
            coefficients = tensors["coefficients"].to(device) if device is not None else tensors["coefficients"]
        else:
            splats, extra = SplatSet.load(path, expect_model_hash=expect_model_hash)
            meta, coefficients = splats.meta, None
            # the splats keep what fit gives them (model and render), not the result's texts and summary,
            # which select() and cat() would leave stale in result.splats.save()
            splats.meta = {k: meta[k] for k in SPLAT_META if k in meta}
            splats = splats.to(device) if device is not None else splats
        if device is not None:  # where fit leaves them: the host-side counters, series and edit starts stay on the CPU
            extra = {k: t if k.startswith(HOST_SIDE) else t.to(device) for k, t in extra.items()}
        if "token_mask" not in extra:
            raise ValueError(f"{path} holds splats but no fit result (no token mask); load it with SplatSet.load")
        missing = [k for k in ("field_error", "cosine") if k not in extra]
        if missing or not isinstance(meta.get("config", {}), dict):
            what = f"lacks the tensors {missing}" if missing else "has a config that is not a JSON object"
            raise ValueError(f"fit result file {path} {what}: it is damaged or was not written by FitResult.save")
        # per-prompt tensors must agree with the splats (or coefficients): a mismatch fails much later, or never
        B = (splats.mu if splats is not None else coefficients).shape[0]
        mask = extra["token_mask"]
        shapes = {"token_mask": (mask.shape, (B, mask.shape[-1]) if mask.dim() == 2 else (B, "L")),
                  **{k: (extra[k].shape, (B,)) for k in ("field_error", "cosine", "token_accuracy") if k in extra},
                  **{k: (extra[k].shape, tuple(mask.shape)) for k in ("ids",) if k in extra}}
        wrong = [f"{k} {tuple(got)} (expected {tuple(want)})" for k, (got, want) in shapes.items() if tuple(got) != tuple(want)]
        wrong += [f"{k} is {extra[k].dtype}" for k in ("field_error", "cosine", "token_accuracy") if k in extra
                  and not extra[k].is_floating_point()]
        wrong += _wrong_metadata(meta, B)
        if wrong:
            raise ValueError(f"fit result file {path} holds {B} prompts but {', '.join(wrong)}: it is damaged or was not "
                             "written by FitResult.save")
        series = lambda prefix: {k.removeprefix(prefix): v.cpu() for k, v in extra.items() if k.startswith(prefix)}  # noqa: E731
        return cls(
            splats=splats, ids=extra.get("ids"), mask=extra["token_mask"].bool(), texts=meta.get("decoded"),
            token_accuracy=extra.get("token_accuracy"), field_error=extra["field_error"], cosine=extra["cosine"],
            history=series("history."), trajectory=series("trajectory."), seconds=float(meta.get("seconds", 0.0)),
            encode_seconds=float(meta.get("encode_seconds", 0.0)), config=meta.get("config", {}),
            input_texts=meta.get("texts"), offsets=extra.get("offsets"), basis=meta.get("basis", "splats"),
            coefficients=coefficients, floats_per_token=extra.get("floats_per_token"), n_terms=extra.get("n_terms"),
            skipped_steps=extra.get("skipped_steps"), edit=_loaded_edit(meta.get("config", {}).get("edit"), extra),
            density=series("density.") or None,
        )


def _wrong_metadata(meta: dict, B: int) -> list[str]:
    """What in a fit file's JSON metadata does not match what :meth:`FitResult.save` writes for B prompts
    (each a phrase for the error), so that a damaged file is refused on loading, not at its first use."""
    wrong = []
    for key in ("texts", "decoded"):
        value = meta.get(key)
        if value is not None and not (isinstance(value, list) and len(value) == B and all(isinstance(t, str) for t in value)):
            wrong.append(f"metadata {key} is {type(value).__name__}{f' of {len(value)}' if isinstance(value, list) else ''} "
                         f"(expected a list of {B} strings)")
    for key in ("seconds", "encode_seconds"):
        value = meta.get(key, 0.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            wrong.append(f"metadata {key} is {value!r} (expected a number)")
    if meta.get("basis", "splats") not in BASES:
        wrong.append(f"metadata basis is {meta.get('basis')!r} (expected one of {BASES})")
    config = meta.get("config", {})
    for key, valid in (("kernel", KERNELS), ("mode", MODES)):
        if key in config and config[key] not in valid:
            wrong.append(f"config {key} is {config[key]!r} (expected one of {valid})")
    return wrong


def _edit_start_tensors(edit: dict | list[dict] | list[dict | None] | None) -> dict[str, Tensor]:
    """The start splats of an edit result's records as file tensors: ``edit_start.<param>`` [B, N', (d)]
    (each record's SplatSet [1, N'_b], padded with inactive slots) and ``edit_start.capacity`` [B], N'_b,
    -1 for a prompt without a start (FitResult.cat of an edit and a plain fit: its record is None).

    Only the start splats: the records' plain fields are saved in ``config["edit"]``.
    """
    records = edit if isinstance(edit, list) else [edit]
    starts = [r.get("start_splats") if isinstance(r, dict) else None for r in records]
    present = [s for s in starts if isinstance(s, SplatSet)]
    if not present:  # not an edit result, or records without their starts
        return {}
    d, dtype = present[0].dim, present[0].mu.dtype
    none = SplatSet(mu=torch.zeros(1, 0, dtype=dtype), log_sigma=torch.zeros(1, 0, dtype=dtype),
                    weight_logit=torch.zeros(1, 0, dtype=dtype), v=torch.zeros(1, 0, d, dtype=dtype),
                    mask=torch.zeros(1, 0, dtype=torch.bool))
    joined = SplatSet.cat([s.to("cpu") if isinstance(s, SplatSet) else none for s in starts])
    return {**{f"edit_start.{k}": t for k, t in joined.params().items()}, "edit_start.mask": joined.mask,
            "edit_start.capacity": torch.tensor([s.capacity if isinstance(s, SplatSet) else -1 for s in starts])}


def _loaded_edit(records: dict | list | None, extra: dict[str, Tensor]) -> dict | list[dict | None] | None:
    """A loaded result's ``edit``: the records of ``config["edit"]`` (a dict for one prompt, a list for a
    batch; copies, not the config's own), each with its ``start_splats`` [1, N'_b] again where the file
    holds them (on the CPU, as edit gives them)."""
    if records is None:
        return None
    rows = records if isinstance(records, list) else [records]
    if "edit_start.mask" in extra:
        # Any: mypy cannot tell that these names, passed as SplatSet(**params), leave out its dict field meta
        params: dict[str, Any] = {k: extra[f"edit_start.{k}"].cpu() for k in ("mu", "log_sigma", "weight_logit", "v")}
        mask, capacity = extra["edit_start.mask"].cpu().bool(), extra["edit_start.capacity"].tolist()
    else:  # written before the start splats were saved
        capacity = [-1] * len(rows)
    out = [r if not isinstance(r, dict) else dict(r) if n < 0 else
           {**r, "start_splats": SplatSet(mask=mask[b : b + 1, :n], **{k: t[b : b + 1, :n] for k, t in params.items()})}
           for b, (r, n) in enumerate(zip(rows, capacity))]
    return out if isinstance(records, list) else out[0]


def _plain_n_splats(n_splats):
    """``n_splats`` as JSON can hold it (a numpy or torch number becomes a Python one)."""
    if getattr(n_splats, "ndim", None) == 0:
        return n_splats.item()
    if isinstance(n_splats, numbers.Number):
        return float(n_splats) if isinstance(n_splats, float) else int(n_splats)
    return list(map(int, n_splats))


def _resolve_counts(n_splats, lengths: Tensor) -> Tensor:
    """[B] splats per prompt from a fraction of L, an int, or a per-prompt list; each in 1..L_b."""
    B = len(lengths)
    if isinstance(n_splats, bool):
        raise TypeError("n_splats must be a number or a list of ints, not bool")
    if isinstance(n_splats, str):
        raise TypeError(f"n_splats={n_splats!r}: give a number (a fraction of L such as 0.25, or a count) or a list of counts")
    if getattr(n_splats, "ndim", None) == 0:
        n_splats = n_splats.item()  # a 0-d numpy array or tensor: one number for every prompt
    if isinstance(n_splats, numbers.Real) and not isinstance(n_splats, numbers.Integral):
        fraction = float(n_splats)
        if not 0 < fraction <= 1:
            raise ValueError(f"n_splats={n_splats}: a fraction of the prompt length must lie in (0, 1]; use an int for a count")
        return (lengths.float() * fraction).round().long().clamp(min=1)
    if isinstance(n_splats, numbers.Integral):
        counts = torch.full((B,), int(n_splats), dtype=torch.long)
    else:
        try:
            values = torch.as_tensor(list(n_splats))
        except (TypeError, ValueError, RuntimeError):  # None, a dict, ragged or non-numeric entries
            raise TypeError(f"n_splats={n_splats!r}: give a fraction of L (such as 0.25), a count, or a list of "
                            f"{B} counts, one per prompt") from None
        if values.dim() != 1:
            raise ValueError(f"n_splats is a {tuple(values.shape)} array: give a flat list of {B} counts, one per prompt")
        if values.dtype == torch.bool or any(isinstance(n, bool) for n in n_splats):  # [True, 3] fitted 1 splat, silently
            raise TypeError(f"n_splats={list(n_splats)!r}: a per-prompt list holds splat counts (ints), not bools")
        if values.is_floating_point() and not torch.equal(values, values.round()):
            raise ValueError(f"n_splats={list(n_splats)}: a per-prompt list holds splat counts (ints), not fractions; "
                             "round them, or give one fraction for every prompt")
        counts = values.long()
        if counts.shape != (B,):
            raise ValueError(f"n_splats has {counts.numel()} entries for {B} prompts")
    if (counts < 1).any():
        raise ValueError(f"n_splats must be >= 1 for every prompt (got {counts.min().item()}): a prompt needs at least one splat")
    too_many = (counts > lengths.cpu()).nonzero().flatten()
    if len(too_many):
        b = int(too_many[0])
        raise ValueError(
            f"n_splats={int(counts[b])} exceeds prompt {b}'s {int(lengths[b])} tokens: more splats than tokens is not "
            "supported (a splat per token is the limit); use at most L splats or a fraction such as 0.5"
        )
    return counts


def _check_ids(ids, mask: Tensor, model) -> Tensor:
    """``Targets.ids``, checked: an integer tensor of the mask's shape [B, L], token ids of ``model``'s
    vocabulary at every valid position (the cross-entropy would otherwise fail deep in torch)."""
    if not isinstance(ids, Tensor) or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        what = ids.dtype if isinstance(ids, Tensor) else type(ids).__name__
        raise TypeError(f"ids must be a [B, L] integer tensor of token ids, not {what}")
    if ids.shape != mask.shape:
        raise ValueError(f"ids has shape {tuple(ids.shape)} but the field is {tuple(mask.shape)} positions: give one token id per position")
    vocab = getattr(model, "vocab_size", None)
    valid = ids.to(mask.device)[mask]
    if len(valid) and (int(valid.min()) < 0 or (vocab is not None and int(valid.max()) >= vocab)):
        bad = int(valid.min()) if int(valid.min()) < 0 else int(valid.max())
        raise ValueError(f"ids holds token id {bad}, outside {getattr(model, 'name', 'the model')}'s vocabulary 0.."
                         f"{'V-1' if vocab is None else vocab - 1}: give the model's token ids")
    return ids.long()


def _check_field_scale(field: Tensor, mask: Tensor) -> None:
    """ValueError for a prompt whose relative field error the fit cannot compute: a zero target (the
    error over its squared norm is undefined), or one whose squares overflow or underflow the dtype.
    field [B, L, d] (finite), mask [B, L] bool."""
    info = torch.finfo(field.dtype)
    valid = torch.where(mask[..., None], field, 0.0)
    peak = valid.abs().amax((1, 2))  # [B]
    # the squared norm in logs, from the field over its peak (whose squares lie in (0, 1]): it may not
    # be representable itself
    log_norm2 = 2 * peak.double().log() + ((valid / peak.clamp_min(info.tiny)[:, None, None]) ** 2).sum((1, 2)).double().log()
    peak, log_norm2 = peak.double().cpu(), log_norm2.cpu()
    zero, huge = peak == 0, log_norm2 > math.log(info.max)
    tiny = ~zero & (peak < math.sqrt(info.tiny / info.eps))  # its largest square within eps of the subnormal range
    for bad, what in ((zero, "is zero at every valid position: its relative field error (the error over its squared norm) "
                             "is undefined; drop the prompt"),
                      (huge, f"reaches {{:.3g}}: its squared norm overflows {info.dtype}; scale the field down"),
                      (tiny, f"is at most {{:.3g}} in magnitude: its squares lose their digits below {info.dtype}'s normal "
                             "range; scale the field up")):
        if bad.any():
            b = int(bad.nonzero()[0])
            raise ValueError(f"prompt {b} of the given field " + what.format(float(peak[b])))


def _prepare_targets(texts_or_fields, model, device, dtype):
    """(field [B, L, d], mask, ids or None, input texts or None, offsets or None, encode seconds)."""
    started = time.perf_counter()
    if isinstance(texts_or_fields, str):
        texts_or_fields = [texts_or_fields]
    if isinstance(texts_or_fields, Tensor):
        texts_or_fields = Targets(texts_or_fields)
    if isinstance(texts_or_fields, Targets):
        t = texts_or_fields
        if not isinstance(t.field, Tensor):
            raise TypeError(f"Targets.field must be a [B, L, d] floating-point tensor, not {type(t.field).__name__}: "
                            "wrap it with torch.as_tensor(..., dtype=torch.float32)")
        if t.field.dim() != 3:
            raise ValueError(f"a target field must be [B, L, d]; got shape {tuple(t.field.shape)}")
        if not t.field.is_floating_point():
            raise TypeError(f"a target field must be floating point, not {t.field.dtype}")
        for name in ("field", "mask", "ids"):  # copying them failed deep in torch: "Cannot copy out of meta tensor"
            value = getattr(t, name)
            if isinstance(value, Tensor) and value.device.type == "meta":
                raise ValueError(f"Targets.{name} lies on the meta device, which holds shapes but no values: give the "
                                 "tensor itself, on cpu or cuda")
        if 0 in t.field.shape:
            raise ValueError(f"the given field has shape {tuple(t.field.shape)}: it needs at least one prompt, position and "
                             "feature (B, L, d >= 1)")
        field = t.field.to(device=device, dtype=dtype)
        if t.mask is not None and not isinstance(t.mask, Tensor):
            raise TypeError(f"mask must be a [B, L] bool tensor, not {type(t.mask).__name__}")
        if t.mask is not None and t.mask.dtype != torch.bool and not ((t.mask == 0) | (t.mask == 1)).all():
            # .bool() would read 0.5, 2 or NaN as a valid position
            raise ValueError(f"mask is {t.mask.dtype} with values other than 0 and 1: give a bool tensor (True = a valid position)")
        mask = torch.ones(field.shape[:2], dtype=torch.bool, device=device) if t.mask is None else t.mask.to(device).bool()
        if mask.shape != field.shape[:2]:
            raise ValueError(f"mask has shape {tuple(mask.shape)} but the field is {tuple(field.shape[:2])} positions")
        if not mask.any(-1).all():
            b = int((~mask.any(-1)).nonzero()[0])
            raise ValueError(f"prompt {b} of the given field has no valid position (mask all False)")
        if (mask[:, 1:] & ~mask[:, :-1]).any():
            b = int((mask[:, 1:] & ~mask[:, :-1]).any(-1).nonzero()[0])
            raise ValueError(f"mask row {b} is not a prefix (valid positions must come first, padding last): right-pad the field")
        bad = ~torch.isfinite(field).all(-1) & mask
        if bad.any():
            b, pos = (int(x) for x in bad.nonzero()[0])
            raise ValueError(f"the given field holds NaN or inf at prompt {b}, position {pos}: clean the field first")
        _check_field_scale(field, mask)
        if model is not None and field.shape[-1] != model.dim:
            raise ValueError(f"the given field has width {field.shape[-1]} but {getattr(model, 'name', type(model).__name__)} "
                             f"has d={model.dim}")
        ids = None if t.ids is None else _check_ids(t.ids, mask, model).to(device)
        # where, not multiply: NaN in padding must not leak into the fit
        return torch.where(mask[..., None], field, torch.zeros_like(field)), mask, ids, None, None, time.perf_counter() - started
    if hasattr(texts_or_fields, "__array__"):  # a NumPy array would be read as a list of texts
        raise TypeError(f"a target field must be a torch.Tensor [B, L, d], not {type(texts_or_fields).__name__}: "
                        "convert it with torch.as_tensor")
    texts = list(texts_or_fields)
    if model is None:
        raise ValueError("fitting texts needs a model")
    batch = model.tokenize(texts, device=device)
    field = model.encode(batch, dtype=dtype)
    return field, batch.mask, batch.ids, texts, batch.offsets, time.perf_counter() - started


def _json_safe(value):
    """``value`` as JSON can hold it, for a fit's config: numbers, strings, None, and dicts and lists of
    them kept; a 0-d tensor or NumPy number as its Python number; anything else as its repr (a custom
    strategy's tensor field once made ``FitResult.save`` fail after the fit, with "Tensor is not JSON
    serializable")."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
        return _json_safe(value.item())
    return repr(value)


def _settings(obj) -> dict:
    """A strategy object's settings for a fit's config: its dataclass fields, else its attributes (none
    for an object with ``__slots__`` only), made JSON-safe."""
    if dataclasses.is_dataclass(obj):
        values = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    else:
        values = dict(getattr(obj, "__dict__", {}))
    return _json_safe(values)


def _init_setting(init):
    """``init`` for a fit's config, as fit takes it back: a name or dict as given, a shipped initializer
    object as ``{"name": ..., its fields}`` (a jittered ``GridInit(jitter=0.5)`` was recorded as
    "GridInit", losing its settings); any other object by its class name alone."""
    if isinstance(init, (str, dict)):
        return _json_safe(init)
    name = next((n for n, cls in INITIALIZERS.items() if type(init) is cls), None)
    return {"name": name, **_settings(init)} if name is not None else type(init).__name__


def _density_setting(strategy) -> dict:
    """A density strategy for a fit's config: ``{"name": ..., its fields}`` for a shipped one, as fit takes it
    back (it was ``{"strategy": "BudgetDensity", ...}``, which fit refused); a custom one by its class name."""
    name = next((n for n, cls in DENSITIES.items() if type(strategy) is cls), None)
    return {"name": name, **_settings(strategy)} if name is not None else {"strategy": type(strategy).__name__, **_settings(strategy)}


# config keys that fit_options hands back to fit under the same name: every setting that decides the
# result on a given device (device, fused and cuda_graphs resolve alike there)
REPEATED_SETTINGS = ("n_splats", "steps", "objective", "optimizer", "kernel", "mode", "varpro", "truncate", "seed",
                     "basis", "density", "batch_size", "record_every", "fused_ce")


def fit_options(config: dict) -> dict:
    """``fit``'s keyword arguments that repeat the fit whose resolved ``config`` this is (``FitResult.config``,
    a saved fit's, or an ablation row's ``config``): ``fit(texts, model, **fit_options(config))`` on the
    same device gives the same bits. The model is the config's ``model`` and ``layer``
    (``fixedpos.load(config["model"], layer=config["layer"])``), the texts the result's ``input_texts``.

    ValueError naming the setting for a config that cannot be repeated: a start that was an object fit
    cannot rebuild (an edit's ``WarmStart``, a custom initializer or density strategy), or a config
    written before a setting was recorded (it says which; those fits used its default)."""
    if not isinstance(config, dict):
        raise TypeError(f"fit_options takes a fit's config (a dict, FitResult.config), not {type(config).__name__}")
    if "edit" in config:
        raise ValueError("this config is an edit's re-fit (config['edit']): its start was the old fit's splats, which fit "
                         "cannot rebuild; repeat it with splatopt.edit on the old fit")
    missing = [k for k in (*REPEATED_SETTINGS, "init", "dtype") if k not in config]
    if missing:
        raise ValueError(f"this config lacks {missing}: it was written before splatopt recorded them, so fit_options "
                         "cannot tell what they were; pass them to fit yourself (their defaults unless you set them)")
    init = config["init"]
    if not isinstance(init, dict) and init not in (*INITIALIZERS, "learned"):
        raise ValueError(f"this fit started from init={init!r}, an object fit cannot rebuild from its name: pass that "
                         "initializer as init= yourself")
    density = config["density"]
    if isinstance(density, dict) and "name" not in density and density.get("strategy") not in [c.__name__ for c in DENSITIES.values()]:
        raise ValueError(f"this fit ran the custom density strategy {density.get('strategy')!r}: pass that object as "
                         "density= yourself")
    options = {k: config[k] for k in REPEATED_SETTINGS}
    dtype = getattr(torch, str(config["dtype"]), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"config dtype={config['dtype']!r} is not a torch dtype")
    return {**options, "init": init, "dtype": dtype}


def check_options(**options) -> None:
    """Check the values of ``fit``'s plain options that are given (by keyword, fit's names): types and
    ranges, with a ValueError (TypeError for seed) naming the option and what it takes. ``fit`` calls
    it first; an ablation study calls it on every configuration before its first cell."""
    flags = ("varpro", "frozen_moves")
    choices = {"kernel": KERNELS, "mode": MODES, "basis": BASES}
    for name, value in options.items():
        if name in choices and value not in choices[name]:
            raise ValueError(f"{name}={value!r}: choose one of {tuple(choices[name])}")
        elif name in ("steps", "record_every", "frozen_steps") and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ValueError(f"{name}={value!r} must be an int >= 0")
        elif name == "truncate" and value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                                           or not 0 < value < math.inf):
            raise ValueError(f"truncate={value!r} must be a finite number of sigmas > 0, or None")
        elif name == "batch_size" and value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"batch_size={value!r}: give the prompts per chunk as an int >= 1 (or None for about 16k tokens)")
        elif name == "progress" and not (isinstance(value, bool) or (isinstance(value, str) and value.strip())):
            raise ValueError(f"progress={value!r}: give True (a bar labelled \"fit\"), False (none) or the bar's label")
        elif name in flags and not isinstance(value, bool):
            # a string "false" is truthy: it would silently turn the option on
            raise ValueError(f"{name}={value!r}: give True or False")
        elif name in ("fused_ce", "fused", "cuda_graphs") and value is not None and not isinstance(value, bool):
            raise ValueError(f"{name}={value!r}: give True (insist), False (never) or None (where it pays off)")
        elif name == "frozen_v_tolerance" and (isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf):
            raise ValueError(f"frozen_v_tolerance={value!r}: give a fraction >= 0 of each frozen embedding's norm")
        elif name == "dtype" and value not in (torch.float32, torch.float64):
            # the least-squares solves (grid init, solved embeddings) have no half-precision kernels
            raise ValueError(f"dtype={value}: fit runs in torch.float32 (the default) or torch.float64")
        elif name == "seed" and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
            raise TypeError(f"seed={value!r}: give an int")


def fit(
    texts_or_fields: str | Sequence[str] | Tensor | Targets,
    model: FieldModel | None = None,
    n_splats: float | int | Sequence[int] | None = None,
    steps: int = 300,
    objective: str | Objective = "mse+ce",
    init: str | dict | Initializer = "grid",
    optimizer: InnerOptimizer | dict | str | None = None,
    kernel: str = "gaussian",
    mode: str = "additive",
    varpro: bool = False,
    truncate: float | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    record_every: int = 10,
    batch_size: int | None = None,
    progress: bool | str = True,
    frozen: Tensor | None = None,
    frozen_steps: int = 0,
    frozen_moves: bool = False,
    frozen_v_tolerance: float = 0.0,
    basis: str = "splats",
    density: str | dict | DensityStrategy = "none",
    fused_ce: bool | None = None,
    fused: bool | None = None,
    cuda_graphs: bool | None = None,
) -> FitResult:
    """Fit Gaussian text splats to prompts; returns a :class:`FitResult` (per-prompt tensors in the
    caller's order).

    texts_or_fields: a text, a list of texts (tokenized and encoded with ``model``), a field
    [B, L, d] float tensor (every position valid) or :class:`Targets` (field, mask, ids).
    model: a ``fixedpos.FieldModel``; None = ``fixedpos.load()`` (the embedded default) where one
    is needed (texts, a "ce" term, init="learned"); a field with a field-only objective is then
    fitted without a decoder (no texts, no token accuracy). For a field, any object with
    ``decode(field [B, L, d]) -> logits [B, L, V]`` and ``dim`` (d) serves too: a custom decoder
    (texts only where it also has fixedpos's ``detokenize(ids, mask)``; ``vocab_size`` and ``name``
    are read where present).
    n_splats: a fraction in (0, 1] of each prompt's length (0.5 = L/2, rounded, at least 1), an int
    for every prompt, or one int per prompt; 1 <= N <= L. None (default): 0.5, or a
    :class:`WarmStart`'s own active counts (the start sets the splats; n_splats only caps what
    density control may grow to, so with density control at least 0.5 L; the result records the
    counts used). steps: inner steps (0 = the
    initializer's splats). objective: a string such as "mse+ce" (default), "mse",
    "0.5*mse+ce+0.1*cosine", an :class:`Objective` or a dict of its weights. init: "grid",
    "tokens", "learned" (the meta-trained initializer shipped for ``model``; with
    ``optimizer=None`` the fit then uses the inner Adam it was meta-trained with), a dict such as
    ``{"name": "grid", "sigma_scale": 1.0}``, or an initializer object (:class:`Initializer`,
    e.g. :class:`WarmStart`).
    optimizer: :class:`InnerOptimizer` (learning rates, schedules, clipping), or a dict of its fields
    over the one the fit would use otherwise (a config file's spelling); with a learned
    initializer also "picked", the inner optimizer picked on validation for short budgets that
    ships beside it (the default model's: Adam in the decoder's Fisher metric; at N = L/4, 10
    steps decode 96.5 % of the test split's tokens against 70.9 % with the meta-trained one, and
    its fits keep a larger field error). None: ``InnerOptimizer()``, or the learned initializer's.
    kernel: "gaussian" or "erf"; mode: "additive" or "normalized" (see :func:`splatopt.render`).
    Normalized decodes more tokens (+1.4 points at 100 steps, N = L/4, 768 validation prompts) but
    keeps a larger field error, and :func:`edit` re-fits it far worse (papers/report.md, 3.2).
    varpro: embeddings in closed form (least squares on the field) at every step, only the
    geometry is optimized. truncate: splats contribute nothing beyond ``truncate * sigma`` tokens
    of their centres (a number > 0, in sigmas), and the inner loop renders with the local renderer
    (:func:`splatopt.render_local`: O(L·k·d), not O(L·N)); None = untruncated and dense, except
    for a fit whose longest prompt exceeds ``LONG_LENGTH`` (1024) tokens, which gets
    ``DEFAULT_TRUNCATE`` (4) (the value used is in ``config["truncate"]``). seed: an int; a random
    initializer (a jittered grid) draws prompt i's start from its own CPU generator
    (:func:`prompt_generator`), so it depends on neither the chunking, the other prompts nor the device. device: default cuda if available. dtype:
    torch.float32 (default) or torch.float64, the precision of the target and the splats.
    record_every: history/trajectory period in steps (0 = only the last step). batch_size: prompts
    per chunk (default: about 16k padded tokens a chunk); another chunking moves a fit by float
    noise, except that with solved embeddings a splat's weight is nearly a free scale (the solve
    absorbs it), so weights and embeddings may differ visibly while the field and metrics agree. progress: a tqdm bar per chunk,
    labelled "fit" (True), or the label given (a str: what a caller runs, e.g. edit's "edit: re-fit ..."); False: none.
    frozen: [B, N] bool, splat slots that do not move or change during the first ``frozen_steps``
    steps (warm-started editing keeps splats far from an edit fixed while the edit settles); N is
    the fit's slot count: the largest per-prompt count (of terms, for a fixed basis), or the
    WarmStart's capacity if that is larger.
    frozen_moves: frozen splats still translate (their centres move; width, weight and embedding
    are held). frozen_v_tolerance: frozen splats' embeddings may change too, by at most this
    fraction of their starting norm (projected back after every step; 0 holds them; the inner loop
    then runs eagerly, neither host-free nor fused).
    basis: "splats" (mobile) or a fixed baseline at an equal float budget: "fixed-grid", "dct",
    "segments" (see :mod:`splatopt.basis`; ``n_splats`` then sets the budget; no varpro, truncate
    or density; "dct" and "segments" take init="grid" only). density: "none", "adaptive",
    "budget", a dict ``{"name": ..., fields}`` or a strategy object (:mod:`splatopt.density`);
    ``n_splats`` is each prompt's cap on active splats. fused_ce: the cross-entropy term without
    materialized logits (see :func:`splatopt.objective_terms`): None = on CUDA (bf16 vocabulary
    products), True = insist, False = the materialized float32 logits (needed to differentiate
    through the fit).
    fused: the inner step's field loss as one Triton kernel that renders, scores and differentiates
    without writing the field (:func:`splatopt.kernels.fused_field_loss`). None = where it can run
    and pays off: CUDA, a field-only objective (mse / cosine, no ce), basis "splats", kernel
    "gaussian", mode "additive", no truncation, no varpro or solved embeddings, float32, at most
    ``MAX_SLOTS`` splats per prompt; True = insist (ValueError saying why it cannot; on the CPU it
    needs TRITON_INTERPRET=1, for tests); False = render with PyTorch. With a relative MSE alone,
    no clipping, no density control, no metric (``InnerOptimizer.metric``) and no partly frozen
    splats (frozen_moves, frozen_v_tolerance), the whole step (loss, backward and Adam) runs fused
    in two kernels (:func:`splatopt.kernels.fused_adam_step`, tf32x3 products: float32-accurate).
    Recorded metrics render with PyTorch either way; the choice made is ``config["fused"]``.
    cuda_graphs: the inner loop captured as CUDA graphs and replayed between recorded steps (one
    host call per two steps instead of dozens of launches per step, which is what bounds small
    batches): :class:`splatopt.graphs.AdamLoop` for the PyTorch step (a freeze of some slots is
    captured on a graph of its own), :class:`splatopt.kernels.FusedAdamLoop` for the fused MSE step
    (which launches its frozen steps). None = on CUDA unless the embeddings are solved for (varpro / "solve"),
    density control runs, frozen embeddings are projected (frozen_v_tolerance) or splats are
    truncated (the local renderer sizes its tiles on the host); True = insist (ValueError saying
    why it cannot); False = launch every step. Either way the loop takes its learning rates from a
    device table, so the results are the same bits; the choice made is ``config["cuda_graphs"]``.

    Raises, before any fitting, ValueError for an option out of range, an incompatible combination
    of options, a malformed target (shape, NaN or inf, a mask that is not right-padded, a width
    other than the model's d, ids outside the vocabulary) or a learned initializer meta-trained for
    another model or layer; TypeError for a wrong type (seed, init, density, a NumPy array, a
    non-float field, a non-tensor mask, non-integer ids).
    """
    check_options(steps=steps, kernel=kernel, mode=mode, record_every=record_every, truncate=truncate, basis=basis,
                  varpro=varpro, progress=progress, frozen_steps=frozen_steps, frozen_moves=frozen_moves,
                  frozen_v_tolerance=frozen_v_tolerance, fused_ce=fused_ce, fused=fused, cuda_graphs=cuda_graphs,
                  batch_size=batch_size, dtype=dtype, seed=seed)
    seed = int(seed)  # a NumPy integer failed in torch's manual_seed, and in the JSON config
    is_field = isinstance(texts_or_fields, (Tensor, Targets))
    # a field needs only a decoder: any object with decode and dim (a custom decoder head) serves
    needs = ("decode", "dim") if is_field else ("tokenize", "encode", "decode", "dim")
    if model is not None and not all(hasattr(model, a) for a in needs):
        hint = f"fixedpos.load({model!r})" if isinstance(model, str) else "fixedpos.load()"
        raise TypeError(f"model must be a fixedpos.FieldModel, not {type(model).__name__}: pass {hint}"
                        + ("; for a field, any object with decode(field [B, L, d]) -> logits [B, L, V] and dim (d) "
                           "serves as its decoder" if is_field else ""))
    if optimizer is not None and not isinstance(optimizer, (InnerOptimizer, dict, str)):
        raise TypeError(f"optimizer must be an InnerOptimizer, a dict of its fields, 'picked' or None, not "
                        f"{type(optimizer).__name__}: e.g. InnerOptimizer(lr_v=0.05)")
    if isinstance(texts_or_fields, (bytes, bytearray)):  # iterated, its items were ints
        raise TypeError("texts_or_fields is bytes: decode it to a str first (e.g. data.decode('utf-8'))")
    strategy = resolve_density(density)
    if basis != "splats" and not isinstance(strategy, NoDensify):
        raise ValueError(f"density={density!r} needs basis='splats': a fixed basis has nothing to clone, split or move")
    if basis != "splats" and (varpro or truncate is not None):
        raise ValueError(f"basis={basis!r} takes no varpro or truncate: its coefficients start at the least-squares optimum")
    objective = Objective.parse(objective)
    if basis in ("dct", "segments") and init != "grid":
        raise ValueError(f"basis={basis!r} takes no init: its coefficients start at the least-squares optimum")
    device = resolve_device(device)
    if model is None and (not is_field or objective.needs_decoder or init == "learned"):
        import fixedpos

        model = fixedpos.load()
    initializer = resolve_initializer(init, model)
    if hasattr(initializer, "for_render"):  # embeddings solved (or scaled) for this fit's render
        initializer = initializer.for_render(kernel, mode, truncate)
    if basis == "fixed-grid" and not isinstance(initializer, GridInit):
        raise ValueError(f"basis='fixed-grid' takes its geometry from a grid initializer, not init={init!r}")
    if isinstance(initializer, LearnedInitializer):
        trained_for = (initializer.meta.get("model_hash"), initializer.meta.get("layer"))
        given = (getattr(model, "model_hash", None), getattr(model, "layer", None))
        if model is not None and (trained_for[0] not in (None, given[0]) or trained_for[1] not in (None, given[1])):
            raise ValueError(f"this learned initializer was meta-trained on model {initializer.meta.get('model')} layer "
                             f"{trained_for[1]}, not {getattr(model, 'name', type(model).__name__)} layer {given[1]}: its "
                             "starts fit that field only; "
                             "use that model and layer, or meta-train one for this layer")
        initializer.to(device)  # a network initializer runs where the fit runs
        if optimizer == "picked":
            if initializer.picked_optimizer is None:
                raise ValueError("optimizer='picked': no inner optimizer ships beside this learned initializer; pass an "
                                 "InnerOptimizer, or None for the one it was meta-trained with")
            optimizer = initializer.picked_optimizer
        if not isinstance(optimizer, dict):
            optimizer = optimizer or initializer.inner_optimizer()  # the inner Adam it was meta-trained with
    if isinstance(optimizer, str):
        raise ValueError(f"optimizer={optimizer!r}: 'picked' names the optimizer shipped beside a learned initializer "
                         "(init='learned'); otherwise pass an InnerOptimizer, a dict of its fields, or None")
    if isinstance(optimizer, dict):  # a config file's spelling: fields over the optimizer fit would use otherwise
        base = initializer.inner_optimizer() if isinstance(initializer, LearnedInitializer) else InnerOptimizer()
        optimizer = base.with_fields(optimizer)
    optimizer = optimizer or InnerOptimizer()
    metric = resolve_metric(optimizer, model, device, dtype)  # [d, d] or None: read before any work
    if varpro and metric is not None:
        raise ValueError(f"optimizer.metric={optimizer.metric!r} moves the embeddings in the decoder's metric, but varpro=True "
                         "solves for them and moves none: use metric='identity', or varpro=False")
    solve = optimizer.embeddings == "solve"
    if solve and (varpro or not isinstance(strategy, NoDensify)):
        what = "varpro=True" if varpro else f"density={density!r}"
        raise ValueError(f"the optimizer's embeddings='solve' solves for the embeddings at a fixed count; it does not "
                         f"combine with {what}: use embeddings='adam'")
    if solve and frozen_v_tolerance > 0:
        raise ValueError("frozen_v_tolerance bounds Adam's steps on frozen embeddings; embeddings='solve' holds them "
                         "exactly instead: use embeddings='adam' or frozen_v_tolerance=0")
    if solve and basis != "splats" and frozen is not None and frozen_steps > 0:
        # the solve holds frozen splats' embeddings only: a fixed basis's frozen terms were re-solved
        # anyway, and the fit crashed where the freeze ended
        raise ValueError(f"basis={basis!r} with embeddings='solve' solves for every coefficient at every step: it cannot "
                         "hold frozen terms; use embeddings='adam' (which holds them), or no frozen")
    field, mask, ids, input_texts, offsets, encode_s = _prepare_targets(texts_or_fields, model, device, dtype)
    if metric is not None and metric.shape[-1] != field.shape[-1]:
        raise ValueError(f"optimizer.metric={optimizer.metric!r} is a Fisher for d={metric.shape[-1]}, but the field has "
                         f"d={field.shape[-1]}: estimate one for this model (splatopt.fisher.estimate_field_fisher)")
    decode = model.decode if model is not None else None
    if decode is not None and ids is None:  # a bare field: its tokens are what the decoder reads from it
        with torch.no_grad():
            ids = decode(field).argmax(-1)
    lengths = mask.sum(-1)
    B = field.shape[0]
    if isinstance(initializer, WarmStart):
        if initializer.splats.batch_size != B:
            raise ValueError(f"init=WarmStart holds splats of {initializer.splats.batch_size} prompts but {B} are fitted: "
                             "give one start per prompt, in the prompts' order")
        warm_counts = initializer.splats.counts.cpu()
        wrong = ((warm_counts < 1) | (warm_counts > lengths.cpu())).nonzero().flatten()
        if len(wrong):  # the rule n_splats keeps: 1..L splats a prompt
            b = int(wrong[0])
            raise ValueError(f"init=WarmStart gives prompt {b} {int(warm_counts[b])} active splats for its {int(lengths[b])} "
                             "tokens: a prompt holds 1..L splats; drop or add splats in the start")
        if n_splats is None:  # the result records what the start holds, not a budget it never had;
            # density control keeps the default cap (L/2) to grow to, or it could never clone or split
            grows = not isinstance(strategy, NoDensify)
            cap = torch.maximum(warm_counts, _resolve_counts(0.5, lengths.cpu())) if grows else warm_counts
            n_splats = cap.tolist()
    if n_splats is None:
        n_splats = 0.5
    counts = terms_for_budget(basis, _resolve_counts(n_splats, lengths.cpu()), lengths.cpu(), field.shape[-1])
    # the slots every prompt's splats live in: its budget, or the warm start's capacity if larger
    capacity = max(int(counts.max()), initializer.splats.capacity if isinstance(initializer, WarmStart) else 0)
    if frozen is not None and not (isinstance(frozen, Tensor) and frozen.dtype == torch.bool and frozen.shape == (B, capacity)):
        # a wider mask used to be cut to the slots in use, silently dropping what it held there
        what = f"a {frozen.dtype} tensor of shape {tuple(frozen.shape)}" if isinstance(frozen, Tensor) else type(frozen).__name__
        raise ValueError(f"frozen is {what}: give a [B, N] bool tensor, B = {B} prompts, N = {capacity} slots (the "
                         "largest n_splats, or the warm start's capacity if larger), True for each splat slot to hold")
    if batch_size is None:
        batch_size = max(1, 16384 // field.shape[1])
    order = torch.argsort(lengths.cpu(), stable=True)
    if truncate is None and basis == "splats" and int(lengths.max()) > LONG_LENGTH:
        truncate = DEFAULT_TRUNCATE
    if varpro or solve:
        _check_varpro_memory(lengths.cpu()[order], counts[order], batch_size, field.element_size())
    fused = _resolve_fused(fused, device, objective, kernel, mode, truncate, varpro or solve, basis, dtype, capacity)
    # a relative MSE alone, without clipping or density control (both need whole gradients between
    # backward and Adam): the fused step updates as it differentiates, no gradient ever stored
    # the fused step holds frozen slots whole, not by parameter group
    partly_frozen = frozen is not None and (frozen_moves or frozen_v_tolerance > 0)
    # the fused step's Adam runs in the field's own coordinates: a metric needs the PyTorch step
    fused_step = (fused and not objective.cosine and optimizer.clip is None and isinstance(strategy, NoDensify)
                  and not partly_frozen and metric is None)
    blocker = _host_free_blocker(device, varpro or solve, strategy, frozen is not None and frozen_v_tolerance > 0, truncate)
    if cuda_graphs and blocker is not None:
        raise ValueError(f"cuda_graphs=True but {blocker}; pass cuda_graphs=None or False")
    # on CUDA the loop runs from the device's learning-rate table whether or not it is captured, so
    # cuda_graphs changes the speed, never the bits
    host_free, cuda_graphs = blocker is None, blocker is None and cuda_graphs is not False
    config = {
        "model": getattr(model, "name", None), "model_hash": getattr(model, "model_hash", None),
        "layer": getattr(model, "layer", None), "n_splats": _plain_n_splats(n_splats),
        "steps": steps, "objective": str(objective), "init": _init_setting(init),
        "initializer_meta": _json_safe(getattr(initializer, "meta", None)),
        "optimizer": optimizer.to_dict(), "kernel": kernel, "mode": mode, "varpro": varpro, "truncate": truncate,
        "seed": seed, "device": str(device), "dtype": str(dtype).removeprefix("torch."), "basis": basis,
        "density": density if isinstance(density, str) else _density_setting(strategy),
        # the chunking moves a fit by float noise and fused_ce picks the cross-entropy's precision: both
        # are needed to repeat its bits (fit_options)
        "batch_size": batch_size, "record_every": record_every, "fused_ce": fused_ce,
        "fused": fused, "cuda_graphs": cuda_graphs,
    }
    label = progress if isinstance(progress, str) else "fit"  # the bar's: what runs
    started = time.perf_counter()
    chunks = []
    n_chunks = math.ceil(B / batch_size)
    for c in range(n_chunks):
        idx = order[c * batch_size : (c + 1) * batch_size].to(device)
        L = int(lengths[idx].max())
        generator = PromptGenerators(seed, order[c * batch_size : (c + 1) * batch_size].tolist())
        chunk_init = WarmStart(initializer.splats.select(idx.to(initializer.splats.mu.device))) if isinstance(initializer, WarmStart) else initializer
        chunks.append(
            _fit_chunk(
                field[idx, :L], mask[idx, :L], None if ids is None else ids[idx, :L], counts[idx.cpu()].to(device),
                objective, chunk_init, optimizer, kernel, mode, varpro, truncate, steps, decode, generator,
                record_every, progress, f"{label}, chunk {c + 1}/{n_chunks}" if n_chunks > 1 else label,
                None if frozen is None else frozen.to(device)[idx], frozen_steps, basis, strategy, fused_ce, fused,
                fused_step, host_free, cuda_graphs, frozen_moves, frozen_v_tolerance, metric,
            )
        )
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    inverse = torch.argsort(order)
    for ch in chunks:
        if "pred" in ch:
            ch["pred"] = _pad_to(ch["pred"], field.shape[1])
    per = lambda key: torch.cat([ch[key] for ch in chunks])[inverse]  # noqa: E731
    splats = coefficients = None
    if "splats" in chunks[0]:
        splats = SplatSet.cat([ch["splats"] for ch in chunks]).select(inverse.to(device))
        splats.meta = {"model": config["model"], "model_hash": config["model_hash"], "layer": config["layer"],
                       "kernel": kernel, "mode": mode, "truncate": truncate}  # SPLAT_META
    else:
        K = max(ch["coefficients"].shape[1] for ch in chunks)
        coefficients = torch.cat([torch.nn.functional.pad(ch["coefficients"], (0, 0, 0, K - ch["coefficients"].shape[1]))
                                  for ch in chunks])[inverse.to(device)]
    n_terms = per("n_terms").cpu()
    pred = per("pred") if decode is not None else None
    history = _merge_series([ch["history"] for ch in chunks], inverse)
    trajectory = _merge_series([ch["trajectory"] for ch in chunks], inverse, pad_splats=True)
    # pred: model decoded it; a bare decoder (a field's custom head) has no tokenizer to read texts with
    texts = model.detokenize(pred, mask) if pred is not None and model is not None and hasattr(model, "detokenize") else None
    if splats is not None:  # the NaN guard skips non-finite gradients; an overflowing step still ends here
        diverged = splats.nonfinite()
        if bool(diverged.any()):
            warnings.warn(f"prompt(s) {diverged.nonzero().flatten().tolist()[:8]} diverged: their splats hold NaN or inf "
                          "(lower the learning rates); save() refuses them, select the other prompts to keep those",
                          RuntimeWarning, stacklevel=2)
        # finite splats can still render an overflowing field (lr_v = 1e38): an inf field error, [PAD] decoded
        field_error = per("field_error")
        overflowed = ~torch.isfinite(field_error) & ~diverged.to(field_error.device)
        if bool(overflowed.any()):
            warnings.warn(f"prompt(s) {overflowed.nonzero().flatten().tolist()[:8]} diverged: their splats render a field "
                          "that overflows (relative field error inf or NaN); lower the learning rates", RuntimeWarning, stacklevel=2)
    return FitResult(
        splats=splats, ids=ids, mask=mask, texts=texts,
        token_accuracy=per("token_accuracy") if decode is not None else None,
        field_error=per("field_error"), cosine=per("cosine"), history=history, trajectory=trajectory,
        seconds=seconds, encode_seconds=encode_s, config=config, input_texts=input_texts, offsets=offsets,
        skipped_steps=per("skipped_steps").cpu(), basis=basis, coefficients=coefficients, n_terms=n_terms,
        floats_per_token=(n_terms * floats_per_term(basis, field.shape[-1])).float() / lengths.cpu().float(),
        density={k: torch.cat([ch["density"][k] for ch in chunks])[inverse].cpu() for k in chunks[0]["density"]}
        if "density" in chunks[0] else None,
    )


def _resolve_fused(fused: bool | None, device: torch.device, objective: Objective, kernel: str, mode: str,
                   truncate: float | None, varpro: bool, basis: str, dtype: torch.dtype, capacity: int) -> bool:
    """Whether the inner step uses the fused field loss (``fit``'s ``fused``); ValueError for True where it cannot.

    varpro: the embeddings are solved for (``varpro=True`` or the optimizer's ``embeddings="solve"``).
    capacity: the most splat slots a prompt holds (the kernel keeps a prompt's slots in registers).
    """
    if fused is False:
        return False
    reason: str | None
    if basis != "splats":
        reason = f"basis={basis!r} renders a fixed design matrix, not splats"
    elif varpro:
        reason = "varpro=True (or embeddings='solve') solves for the embeddings from the dense coefficients A [B, L, N], which the fused kernel never builds"
    elif dtype != torch.float32:
        # the kernel accumulates in float32: a float64 fit would silently lose its precision
        reason = f"the fused kernel computes in float32, the fit asks for {str(dtype).removeprefix('torch.')}"
    elif capacity > MAX_SLOTS:
        reason = f"the fused kernel holds at most {MAX_SLOTS} splat slots per prompt, this fit needs {capacity}"
    else:
        reason = unavailable_reason(device, kernel, mode, truncate, objective)
    if fused is None:
        # available() is False on the CPU even under TRITON_INTERPRET: the interpreter is for tests
        return reason is None and available(device, kernel, mode, truncate)
    if reason is not None:
        raise ValueError(f"fused=True but {reason}; pass fused=None or False")
    return True


def _host_free_blocker(device: torch.device, varpro: bool, strategy, projects: bool = False,
                       truncate: float | None = None) -> str | None:
    """Why the inner loop cannot run host-free and be captured (``fit``'s ``cuda_graphs``), or None.

    varpro: the embeddings are solved for (``varpro=True`` or ``embeddings="solve"``). projects:
    frozen embeddings are projected back within a tolerance after every step. truncate: the local
    renderer plans its tiles from the current centres, and reads the plan's size back to the host.
    """
    reason = None
    if device.type != "cuda":
        reason = f"the fit runs on {device}"
    elif truncate is not None:
        reason = f"truncate={truncate:g} renders with the local renderer, whose tile plan is sized on the host every step"
    elif varpro:
        # the batched LU solve is not capture-safe: on an H200 (torch 2.11, cu130) MAGMA's batched
        # getrs failed a capture ("operation not permitted when stream is capturing") at some sizes
        reason = "varpro=True (or embeddings='solve') solves a batched linear system per step, which is not captured"
    elif not isinstance(strategy, NoDensify):
        reason = "density control changes which slots are active between steps"
    elif projects:
        reason = "frozen_v_tolerance projects the frozen embeddings after every step"
    return reason


def _check_varpro_memory(lengths: Tensor, counts: Tensor, batch_size: int, itemsize: int) -> None:
    """Refuse varpro where a chunk's dense A [b, L, N] would exceed VARPRO_MAX_BYTES. lengths, counts: [B] in fit order."""
    for c in range(0, len(lengths), batch_size):
        b = len(lengths[c : c + batch_size])
        L, N = int(lengths[c : c + batch_size].max()), int(counts[c : c + batch_size].max())
        if b * L * N * itemsize > VARPRO_MAX_BYTES:
            raise ValueError(
                f"varpro=True solves for the embeddings with the dense coefficients A [{b}, {L}, {N}] "
                f"({b * L * N * itemsize / 2**30:.1f} GiB per copy, several kept): too large; fit without varpro "
                "(with truncate, the local renderer never builds A) or with a smaller batch_size"
            )


def _pad_to(t: Tensor, L: int) -> Tensor:
    return torch.nn.functional.pad(t, (0, L - t.shape[1])) if t.shape[1] < L else t


def _merge_series(parts: list[dict[str, Tensor]], inverse: Tensor | None = None, pad_splats: bool = False) -> dict[str, Tensor]:
    """Concatenate series [S, b(, N)] of the same recorded steps along prompts (splats padded with NaN
    to the largest N where ``pad_splats``), then put the prompts in order ``inverse`` [B] (None: as given)."""
    if "step" not in parts[0]:  # a fixed basis records no splat geometry
        return {}
    out = {"step": parts[0]["step"]}
    for key in parts[0]:
        if key == "step":
            continue
        tensors = [p[key] for p in parts]
        if pad_splats:
            N = max(t.shape[2] for t in tensors)
            tensors = [torch.nn.functional.pad(t, (0, N - t.shape[2]), value=float("nan")) for t in tensors]
        out[key] = torch.cat(tensors, 1) if inverse is None else torch.cat(tensors, 1)[:, inverse.cpu()]
    return out


class PromptGenerators(Sequence[torch.Generator]):
    """The generators (:func:`prompt_generator`) of the prompts ``indices`` of a fit seeded ``seed``, one
    per prompt, each built when it is drawn from: a start that draws nothing (the default grid, the
    learned start) costs nothing (13 µs a prompt, 0.13 s for 10,000, built eagerly)."""

    def __init__(self, seed: int, indices: list[int]) -> None:
        self.seed, self.indices = seed, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k):  # an int, or a slice: a list
        if isinstance(k, slice):
            return [prompt_generator(self.seed, i) for i in self.indices[k]]
        return prompt_generator(self.seed, self.indices[k])


def prompt_generator(seed: int, index: int) -> torch.Generator:
    """The CPU generator of prompt ``index`` of a fit seeded ``seed``: one per prompt, so that a random
    start does not depend on the batch. The pair is hashed (numpy's SeedSequence) because a CPU
    generator keeps only 32 bits of its seed: seed·2^32 + index would give every seed the same draws."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed % 2**64, index]).generate_state(1)[0]))


def _fit_chunk(
    target, mask, ids, counts, objective, initializer, optimizer, kernel, mode, varpro, truncate, steps, decode,
    generator, record_every, progress, desc, frozen, frozen_steps, basis, strategy, fused_ce, fused, fused_step,
    host_free, cuda_graphs, frozen_moves, frozen_v_tolerance, metric,
) -> dict:
    from tqdm.auto import tqdm

    L = target.shape[1]
    tok = mask[..., None].to(target.dtype)
    lengths = mask.sum(-1)
    v_scale = target_rms(target, mask)
    solve, ridge = optimizer.embeddings == "solve", optimizer.solve_ridge
    if basis == "splats":
        asked = torch.minimum(strategy.initial_counts(counts), counts)  # [B]: the splats each prompt starts with
        with torch.no_grad():
            splats = initializer(target, mask, asked, generator)
        if not isinstance(splats, SplatSet):
            raise TypeError(f"the initializer returned {type(splats).__name__}, not a SplatSet: an initializer's "
                            "__call__(target, mask, n_splats, generator) returns the first splats")
        if splats.mask.shape[0] != target.shape[0]:
            raise ValueError(f"the initializer returned {splats.mask.shape[0]} prompts for {target.shape[0]}")
        if splats.dim != target.shape[-1]:  # it failed later as a shape mismatch of "field" and "target" in the objective
            raise ValueError(f"the initializer returned embeddings of width d={splats.dim} for a target of d={target.shape[-1]}")
        if not isinstance(initializer, WarmStart):  # a warm start sets its own counts (n_splats then caps density control)
            over = (splats.counts > asked.to(splats.mask.device)).nonzero().flatten()
            if len(over):  # a larger set was fitted silently: the result held more splats than its budget
                b = int(over[0])
                raise ValueError(f"the initializer {type(initializer).__name__} returned {int(splats.counts[b])} active splats "
                                 f"where {int(asked[b])} were asked for: an initializer activates at most n_splats[b] slots "
                                 "(mask[b, :n_b]), so that every fit keeps its budget")
        # the fit's precision and device, whatever the initializer returned: a custom one's float16
        # splats were otherwise fitted in float16 (NaN) and a float32 one's in a float64 fit in float32
        splats = splats.to(target.device, target.dtype)
        splats = _with_capacity(splats, int(counts.max()))
        slot_mask = splats.mask
        keys = ["mu", "log_sigma", "weight_logit"] + ([] if varpro or solve else ["v"])
        params = {k: splats.params()[k].detach() for k in keys}
        if solve:  # Adam moves a field-space offset; the embeddings are solved for (optim.solve_embeddings)
            with torch.no_grad():
                a0 = splat_weights(splats, L, kernel, mode, truncate)
                params["offset"] = offset_for(a0, splats.v, target, mask, slot_mask, ridge)
            held_v = splats.v.detach()
    else:  # a fixed basis: only the coefficients move, from their least-squares optimum
        strategy = None
        sigma_scale = getattr(initializer, "sigma_scale", GridInit.sigma_scale)
        design, slot_mask = design_matrix(basis, mask, counts, kernel, mode, sigma_scale)
        design = design.to(target.dtype)
        # solve: the same update as for splats, on a design that never moves (offset 0: the LS optimum)
        params = {"offset": torch.zeros_like(target)} if solve else {"v": closed_form_v(design, target, mask, slot_mask)}
    state = adam_init(params)
    density_state = strategy.init_state(params, slot_mask) if strategy is not None else None
    record_steps = set(range(0, steps + 1, record_every)) if record_every else set()
    record_steps.add(steps)
    hist: dict[str, list] = {"step": []}
    traj: dict[str, list] = {"step": [], "mu": [], "sigma": [], "weight": []}

    def current(p: dict[str, Tensor], active: Tensor | None = None) -> tuple[SplatSet | None, Tensor]:
        """(splats or None, rendered field [B, L, d]) of parameters p with active slots (default: the fit's)."""
        active = slot_mask if active is None else active
        if basis != "splats":
            v = solve_embeddings(design, target, p["offset"], mask, active, ridge) if solve else p["v"]
            return None, design @ (v * active[..., None])
        s = replace(splats, mask=active, **{k: t for k, t in p.items() if k != "offset"})
        if varpro:
            a = splat_weights(s, L, kernel, mode, truncate)
            v = closed_form_v(a, target, mask, s.mask)
            return s.with_params({"v": v}), a @ v
        if solve:
            a = splat_weights(s, L, kernel, mode, truncate)
            v = solve_embeddings(a, target, p["offset"], mask, s.mask, ridge, held, None if held is None else held_v)
            return s.with_params({"v": v}), a @ v
        if truncate is not None:  # the same field as the dense truncated render, without A [B, L, N]
            return s, render_local(s, L, kernel, mode, truncate)
        return s, render(s, L, kernel, mode)

    def position_error(p: dict[str, Tensor], active: Tensor) -> Tensor:
        """[B, L] per-token cross-entropy (or squared field error without a decoder); -inf at padding."""
        with torch.no_grad():
            _, fld = current(p, active)
            if decode is not None and ids is not None:
                err = torch.nn.functional.cross_entropy(decode(fld).transpose(1, 2), ids, reduction="none")
            else:
                err = ((fld - target) ** 2).sum(-1)
            return torch.where(mask, err.float(), -math.inf)

    def residual(p: dict[str, Tensor], active: Tensor) -> Tensor:
        """[B, L, d] target minus the field of the ``active`` splats."""
        with torch.no_grad():
            return (target - current(p, active)[1]) * tok

    def record(step: int, p: dict[str, Tensor]) -> None:
        with torch.no_grad():
            s, fld = current(p)
            loss, terms = objective_terms(objective, fld, target, mask, ids, decode, fused_ce)
            row = {"loss": loss, "field_error": relative_mse(fld, target, mask), "cosine": mean_cosine(fld, target, mask)}
            if "ce" in terms:
                row["ce"] = terms["ce"]
            if decode is not None and ids is not None:
                row["token_accuracy"] = token_accuracy(decode(fld), ids, mask)
            row["n_terms"] = slot_mask.sum(-1)
        hist["step"].append(step)
        for k, t in row.items():
            hist.setdefault(k, []).append(t.float().cpu())
        if s is not None:
            traj["step"].append(step)
            masked = lambda t: torch.where(s.mask, t, torch.full_like(t, float("nan"))).float().cpu()  # noqa: E731
            traj["mu"].append(masked(s.mu))
            traj["sigma"].append(masked(s.sigma))
            traj["weight"].append(masked(s.weight))

    ctx = DensityContext(counts, lengths, kernel, mode, position_error, residual)
    if frozen is not None:  # fit's [B, N] mask, to this chunk's slots (slots past them exist for none of its prompts)
        frozen = torch.nn.functional.pad(frozen, (0, slot_mask.shape[1] - frozen.shape[1]))[:, : slot_mask.shape[1]]
    held = frozen if solve and frozen is not None and frozen_steps > 0 else None  # slots whose embeddings the solve keeps
    # the groups frozen slots keep (the offset lives on tokens, not slots: the solve holds frozen slots' embeddings instead)
    held_groups = tuple(k for k in GROUPS if not (frozen_moves and k == "mu") and not (frozen_v_tolerance > 0 and k == "v"))
    v_start = params["v"].detach().clone() if frozen is not None and frozen_v_tolerance > 0 else None
    skipped_total = torch.zeros(target.shape[0], dtype=torch.long, device=target.device)

    def gradients(p: dict[str, Tensor]) -> dict[str, Tensor]:
        """The summed objective's gradient wrt each parameter of p."""
        with torch.enable_grad():
            live = {k: t.detach().requires_grad_(True) for k, t in p.items()}
            if fused:  # render, score and differentiate in one kernel: the field [B, L, d] is never written
                loss = fused_field_loss(live["mu"], live["log_sigma"], live["weight_logit"], live["v"], slot_mask,
                                        target, mask, objective)
            else:
                _, fld = current(live)
                loss, _ = objective_terms(objective, fld, target, mask, ids, decode, fused_ce)
            return dict(zip(live, torch.autograd.grad(loss.sum(), list(live.values()))))

    # None, or a loop that runs from one record (or the freeze's end) to the next without the host
    loop: FusedAdamLoop | AdamLoop | None = None
    if fused_step:
        loop = FusedAdamLoop(params, state, slot_mask, target, mask, mse_coefficients(target, mask, objective),
                             optimizer, steps, v_scale, cuda_graphs=cuda_graphs)
    elif host_free:
        loop = AdamLoop(gradients, params, state, optimizer, steps, v_scale, cuda_graphs=cuda_graphs, metric=metric)
    stops = sorted({s for s in record_steps | {frozen_steps, steps} if 0 < s <= steps})
    # one tensor for the whole freeze: the loop's graph reads this mask, and is captured once for it
    free_in_freeze = ~frozen if frozen is not None else None
    bar = tqdm(range(steps), desc=desc, disable=not progress, unit="step", leave=False)
    for step in bar:
        if step in record_steps:
            record(step, params)
        if loop is not None:
            if step == loop.step:
                free = free_in_freeze if step < frozen_steps else None
                # only a partly frozen slot needs the groups it keeps (the fused loop holds whole slots)
                loop.run(next(s for s in stops if s > step), free, *([held_groups] if free is not None and frozen_moves else []))
                params = loop.params
            continue
        grads = gradients(params)
        lrs = optimizer.learning_rates(step, steps, v_scale)
        if solve:
            lrs["offset"] = lrs.pop("v")
        if frozen is not None and step < frozen_steps:
            free = (~frozen).to(target.dtype)
            lrs = {k: lr * (free[..., None] if k == "v" else free) if k in held_groups else lr for k, lr in lrs.items()}
        if strategy is not None:
            density_state = strategy.observe(step, grads, slot_mask, density_state)
        params, state, skipped = adam_step(params, grads, state, lrs, optimizer, metric)
        skipped_total += skipped
        if v_start is not None and step < frozen_steps:
            params["v"] = _within_tolerance(params["v"], v_start, frozen, frozen_v_tolerance)
        if solve and held is not None and step + 1 == frozen_steps < steps:
            # the freeze ends: the solve takes every slot, from an offset that gives back the current embeddings
            with torch.no_grad():
                s_now, _ = current(params)
                assert s_now is not None  # held is for splats: fit refuses frozen terms of a fixed basis with the solve
                a_now = splat_weights(s_now, L, kernel, mode, truncate)
                params["offset"] = offset_for(a_now, s_now.v, target, mask, slot_mask, ridge)
            held = None
        if strategy is not None:
            params, state, slot_mask, density_state = strategy.refine(step, steps, params, state, slot_mask, density_state, ctx)
    record(steps, params)
    if loop is not None:
        skipped_total += loop.skipped
    if basis == "splats" and not isinstance(strategy, NoDensify):  # once, after the loop: no host sync per step
        allowed = torch.maximum(counts.to(slot_mask.device), splats.mask.sum(-1))  # a warm start may begin above its cap
        grown = (slot_mask.sum(-1) > allowed).nonzero().flatten()
        if len(grown):  # the result would hold more splats than its budget, silently
            b = int(grown[0])
            raise ValueError(f"the density strategy {type(strategy).__name__} left {int(slot_mask[b].sum())} active splats "
                             f"where the cap (n_splats) is {int(allowed[b])}: a strategy grows only up to ctx.caps")

    with torch.no_grad():
        final, fld = current(params)
        if basis != "splats" and solve:
            params = {"v": solve_embeddings(design, target, params["offset"], mask, slot_mask, ridge)}
        out: dict[str, Any] = {
            "field_error": relative_mse(fld, target, mask).float(),
            "cosine": mean_cosine(fld, target, mask).float(),
            "skipped_steps": skipped_total,
            "n_terms": slot_mask.sum(-1),
        }
        if final is not None:
            out["splats"] = final.detach()
        elif basis == "fixed-grid":  # fixed Gaussians are splats of weight 1 that never moved
            mu, log_sigma, _ = grid_geometry(mask, counts, sigma_scale, 0.0, None)
            certain = torch.full_like(mu, 40.0)  # sigmoid(40) == 1 in float32
            out["splats"] = SplatSet(mu.to(target.dtype), log_sigma.to(target.dtype), certain.to(target.dtype),
                                     params["v"] * slot_mask[..., None], slot_mask)
        else:
            out["coefficients"] = params["v"] * slot_mask[..., None]
        if density_state is not None:  # a density strategy ran
            out["density"] = {k: density_state[k] for k in ("cloned", "split", "pruned", "relocated") if k in density_state}
        if decode is not None:
            logits = decode(fld)
            out["pred"] = logits.argmax(-1)
            if ids is not None:
                out["token_accuracy"] = token_accuracy(logits, ids, mask)
    out["history"] = {k: (torch.tensor(v) if k == "step" else torch.stack(v)) for k, v in hist.items()}
    out["trajectory"] = {k: (torch.tensor(v) if k == "step" else torch.stack(v)) for k, v in traj.items() if v}
    return out


def _within_tolerance(v: Tensor, v_start: Tensor, slots: Tensor, tolerance: float) -> Tensor:
    """v [B, N, d] with the ``slots`` [B, N] moved back onto the ball |v - v_start| <= tolerance * |v_start|."""
    step = v - v_start
    radius = tolerance * v_start.norm(dim=-1, keepdim=True)
    shrink = (radius / step.norm(dim=-1, keepdim=True).clamp_min(1e-30)).clamp(max=1.0)
    return torch.where(slots[..., None], v_start + step * shrink, v)


def _with_capacity(splats: SplatSet, capacity: int) -> SplatSet:
    """The same splats with at least ``capacity`` slots; new slots are inactive (growth fills them)."""
    extra = capacity - splats.capacity
    if extra <= 0:
        return splats
    pad = lambda t: torch.nn.functional.pad(t, (0, 0, 0, extra) if t.dim() == 3 else (0, extra))  # noqa: E731
    padded: dict[str, Any] = {k: pad(t) for k, t in splats.params().items()}  # Any: as in SplatSet.with_params
    return replace(splats, mask=pad(splats.mask), **padded)
