"""FieldModel: a frozen Hugging Face encoder read at one layer, plus a decoder head.

The field of a text is one contextual embedding per token of the text: ``field [B, L, d]`` where
position ``t`` is the ``t``-th wordpiece of the text (the encoder's own ``[CLS]``/``[SEP]`` wrappers
are added for encoding and stripped from the field). Texts longer than the encoder's window are
encoded in overlapping windows and stitched (see :meth:`FieldModel.encode`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from .head import DecoderHead



DEVICE_TYPES = ("cpu", "cuda")


def resolve_device(device: str | torch.device | int | None, option: str = "device",
                   types: tuple[str, ...] = DEVICE_TYPES) -> torch.device:
    """``device`` as a torch.device this machine can hold fields and splats on: None or "auto" is CUDA
    where there is one, else the CPU; an int is a CUDA index.

    ValueError naming ``option`` ("device" for a keyword, "--device" for a flag) for a name that is no
    device, for CUDA or a CUDA index this machine lacks, and for a type not in ``types``: the meta
    device holds no data (moving the shared, cached encoder there would erase its weights for the
    whole process), and no other backend is supported.
    """
    flag = option.startswith("--")
    said = f"{option} {device}" if flag else f"{option}={device!r}"
    cpu_fix = f"use {option} cpu" if flag else f"use {option}='cpu'"
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        is_index = isinstance(device, int) and not isinstance(device, bool)
        resolved = torch.device("cuda", device) if is_index else torch.device(device)  # type: ignore[arg-type]
    except (RuntimeError, TypeError):  # torch's message lists its device types but names no option
        raise ValueError(f"{said} is not a device; give auto, cpu, cuda or cuda:N") from None
    if resolved.type not in types:
        raise ValueError(f"{said}: fields and splats live on cpu or cuda devices; {cpu_fix} or cuda")
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{said}: CUDA is not available on this machine; {cpu_fix}")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ValueError(f"{said}: this machine has {torch.cuda.device_count()} CUDA device(s), numbered from 0")
    return resolved

@dataclass
class TokenBatch:
    """Tokenized texts, right-padded.

    ids: [B, L] long, pad positions hold the tokenizer's pad id.
    mask: [B, L] bool, True on real tokens.
    offsets: [B, L, 2] long, character span ``[start, end)`` of each token in its text (0, 0 on pads).
    texts: the B input strings.
    """

    ids: Tensor
    mask: Tensor
    offsets: Tensor
    texts: list[str]

    @property
    def lengths(self) -> Tensor:
        """[B] long: tokens per text."""
        return self.mask.sum(-1)

    def to(self, device: torch.device | str) -> "TokenBatch":
        """The same batch with ids, mask and offsets on ``device``."""
        return TokenBatch(self.ids.to(device), self.mask.to(device), self.offsets.to(device), self.texts)

    def __len__(self) -> int:
        return len(self.texts)


_UNUSED_TOKEN = re.compile(r"^(\[unused\d+\]|<unused\d+>|\[PAD\]|<pad>)$")


def _find_layer_stack(encoder: nn.Module) -> tuple[nn.Module, str] | None:
    """The module list of transformer blocks of a BERT-/RoBERTa-/DistilBERT-style encoder, if found."""
    for owner_name, attr in (("encoder", "layer"), ("transformer", "layer")):
        owner = getattr(encoder, owner_name, None)
        if owner is not None and isinstance(getattr(owner, attr, None), nn.ModuleList):
            return owner, attr
    return None


class FieldModel:
    """A frozen fixed-position encoder at one layer, with a decoder head (build it with ``fixedpos.load``).

    dim: d, the field width. vocab_size: V. layer: 0 = embedding output, k = after block k (of
    n_layers). name, model_hash: the model's display name and the SHA-256 of its weights (what
    heads, splat files and learned initializers are keyed by). window: content tokens per encoder
    window, 8 .. the model's maximum length less its two wrappers (default: that maximum).
    overlap: context kept on each side of a seam between windows (default: min(128, (window + 2) // 4)).
    ValueError for a layer, window or overlap out of range.
    """

    def __init__(
        self,
        encoder: nn.Module,
        tokenizer: Any,
        layer: int,
        name: str,
        model_hash: str,
        window: int | None = None,
        overlap: int | None = None,
    ) -> None:
        # a transformers model: nn.Module's stubs type its config and get_input_embeddings as Tensor | Module
        hf: Any = encoder
        n_layers = int(hf.config.num_hidden_layers if hasattr(hf.config, "num_hidden_layers") else hf.config.n_layers)
        if not isinstance(layer, int) or not 0 <= layer <= n_layers:
            raise ValueError(f"layer={layer!r} is out of range: {name} has layers 0..{n_layers} (0 = embeddings)")
        encoder.eval().requires_grad_(False)
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.layer = layer
        self.n_layers = n_layers
        self.name = name
        self.model_hash = model_hash
        self.dim = int(hf.config.hidden_size if hasattr(hf.config, "hidden_size") else hf.config.dim)
        self.vocab_size = int(hf.get_input_embeddings().weight.shape[0])
        max_len = int(getattr(hf.config, "max_position_embeddings", 512))
        pos_emb = getattr(getattr(encoder, "embeddings", None), "position_embeddings", None)
        if isinstance(pos_emb, nn.Embedding) and pos_emb.padding_idx is not None:
            # RoBERTa-style positions start at padding_idx + 1 (514 table entries for 512 tokens)
            max_len -= pos_emb.padding_idx + 1
        tok_max = int(getattr(tokenizer, "model_max_length", max_len) or max_len)
        full = min(max_len, tok_max) - 2
        if window is None:
            window = full
        if isinstance(window, bool) or not isinstance(window, int):  # a float failed at the first long text
            raise TypeError(f"window must be an int number of tokens, not {type(window).__name__}")
        if full < 8:  # a window must hold a prompt of the evaluation's shortest length
            raise ValueError(f"{name} takes {full + 2} positions, {full} tokens besides its two special ones: "
                             "fixedpos needs an encoder with at least 10 positions")
        if not 8 <= window <= full:
            raise ValueError(f"window={window} must lie in 8..{full} for {name}")
        if overlap is None:
            # a quarter of the encoder's input (128 for the usual 512), so small windows work too
            overlap = min(128, (window + 2) // 4)
        if not 0 <= 2 * overlap < window:  # windows must advance: stride = window - 2 * overlap > 0
            raise ValueError(f"overlap={overlap} must lie in 0..{(window - 1) // 2} (less than half of window={window})")
        self.window = window
        self.overlap = overlap
        # only after every check: a refused construction leaves the caller's encoder untouched
        stack = _find_layer_stack(encoder)
        self._truncated = stack is not None
        if stack is not None:
            # Blocks above the chosen layer never influence it: drop them so encoding costs only what it needs.
            owner, attr = stack
            setattr(owner, attr, nn.ModuleList(list(getattr(owner, attr))[:layer]))
        self._head: DecoderHead | None = None
        self._head_loader: Callable[[FieldModel], DecoderHead] | None = None  # fixedpos.load attaches one
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.unk_id = tokenizer.unk_token_id
        self.cls_id = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
        self.sep_id = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id

    # ------------------------------------------------------------------ tokens
    def tokenize(self, texts: str | Sequence[str], device: torch.device | str | None = None) -> TokenBatch:
        """Tokenize texts (no special tokens) into a right-padded :class:`TokenBatch` ([B, L], on
        ``device``, default the CPU); a str is one text.

        Raises TypeError for non-strings and ValueError for empty or whitespace-only text, NUL bytes
        (the tokenizer would silently drop them and merge their neighbours) and text made only of
        characters the vocabulary does not know. Other unknown characters (emoji, unsupported
        scripts) become the unknown token, which decodes back as e.g. ``[UNK]``. A special token's
        spelling in the text ("[CLS]", "[PAD]") is text like any other, never the control token.
        """
        if isinstance(texts, str):
            texts = [texts]
        if isinstance(texts, (bytes, bytearray)) or not isinstance(texts, Iterable):
            raise TypeError(f"texts must be a str or a list of str, not {type(texts).__name__}")
        texts = list(texts)
        if not texts:
            raise ValueError("texts is empty: pass at least one string")
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts[{i}] is {type(text).__name__}, not str")
            if not text.strip():
                raise ValueError(f"texts[{i}] is empty or whitespace only: nothing to encode")
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as err:  # the tokenizer failed with "TextEncodeInput must be Union[...]"
                raise ValueError(
                    f"texts[{i}] holds the lone surrogate {text[err.start]!r} at character {err.start}, which is not "
                    "Unicode text (a file read with errors='surrogateescape', or a JSON \\ud800 escape): replace it, "
                    "e.g. text.encode('utf-8', 'replace').decode()"
                ) from None
            if "\x00" in text:
                raise ValueError(
                    f"texts[{i}] contains a NUL byte at character {text.index(chr(0))}; the tokenizer would drop it "
                    "silently and merge its neighbours: remove or replace NUL bytes first"
                )
        # split_special_tokens: a text that contains "[PAD]" or "[CLS]" means those characters; read as
        # control tokens they were fitted as padding or as a sequence start
        enc = self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True, verbose=False,
                             split_special_tokens=True)
        lengths = [len(ids) for ids in enc["input_ids"]]
        for i, ids in enumerate(enc["input_ids"]):
            if not ids:
                raise ValueError(f"texts[{i}] produced no tokens (only characters the tokenizer discards): {texts[i]!r:.60}")
            if self.unk_id is not None and all(t == self.unk_id for t in ids):
                raise ValueError(f"texts[{i}] has only characters unknown to {self.name}'s vocabulary: {texts[i]!r:.60}")
        B, L = len(texts), max(lengths)
        ids = torch.full((B, L), self.pad_id, dtype=torch.long)
        mask = torch.zeros(B, L, dtype=torch.bool)
        offsets = torch.zeros(B, L, 2, dtype=torch.long)
        for i, (row, offs) in enumerate(zip(enc["input_ids"], enc["offset_mapping"])):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, : len(row)] = True
            offsets[i, : len(row)] = torch.tensor(offs, dtype=torch.long).view(-1, 2)
        batch = TokenBatch(ids, mask, offsets, texts)
        # named here: torch's own error for a machine without CUDA was an AssertionError naming no argument
        return batch.to(resolve_device(device, types=(*DEVICE_TYPES, "meta"))) if device is not None else batch

    def detokenize(self, ids: Tensor, mask: Tensor | None = None) -> list[str]:
        """B texts from ids [B, L] (or [L]: one text); positions where mask [B, L] is False are
        skipped; ValueError for other shapes."""
        if ids.dim() == 1:
            ids = ids[None]
            mask = None if mask is None or mask.dim() != 1 else mask[None]
        if ids.dim() != 2 or (mask is not None and tuple(mask.shape) != tuple(ids.shape)):
            raise ValueError(f"detokenize: ids {tuple(ids.shape)} must be [B, L] (or [L]) and the mask the same shape, "
                             f"not {None if mask is None else tuple(mask.shape)}")
        rows = ids.detach().cpu().tolist()
        keep = mask.detach().cpu().tolist() if mask is not None else [[True] * ids.shape[1]] * ids.shape[0]
        out = []
        for row, m in zip(rows, keep):
            toks = [t for t, k in zip(row, m) if k]
            out.append(self.tokenizer.decode(toks, skip_special_tokens=False, clean_up_tokenization_spaces=True))
        return out

    @property
    def text_token_ids(self) -> Tensor:
        """[V'] long: ids of tokens that can occur in text (no special or unused tokens)."""
        special = set(self.tokenizer.all_special_ids)
        vocab = self.tokenizer.convert_ids_to_tokens(list(range(self.vocab_size)))
        keep = [i for i, tok in enumerate(vocab) if i not in special and tok is not None and not _UNUSED_TOKEN.match(tok)]
        return torch.tensor(keep, dtype=torch.long)

    @property
    def word_embeddings(self) -> Tensor:
        """[V, d] the encoder's frozen input word-embedding matrix (the tied heads score against it)."""
        hf: Any = self.encoder  # a transformers model (see __init__)
        return hf.get_input_embeddings().weight

    # ------------------------------------------------------------------ field
    def _window_plan(self, lengths: list[int]) -> list[tuple[int, int, int, int, int]]:
        """Windows as (text, start, stop, own_start, own_stop): encode tokens [start, stop) of the text and
        keep positions [own_start, own_stop), those farther from a cut than from any other window's cut."""
        plan = []
        W, stride = self.window, self.window - 2 * self.overlap if self.overlap else self.window
        for b, L in enumerate(lengths):
            if L <= W:
                plan.append((b, 0, L, 0, L))
                continue
            starts = list(range(0, L - W, stride)) + [L - W]
            for j, s in enumerate(starts):
                # ownership boundaries sit midway between consecutive windows' overlapping regions
                own_lo = 0 if j == 0 else (starts[j - 1] + W + s) // 2
                own_hi = L if j == len(starts) - 1 else (s + W + starts[j + 1]) // 2
                if own_hi > own_lo:
                    plan.append((b, s, s + W, own_lo, own_hi))
        return plan

    @torch.no_grad()
    def encode(self, batch: TokenBatch, dtype: torch.dtype = torch.float32, max_tokens: int = 32768) -> Tensor:
        """Target field [B, L, d] at ``self.layer``, on ``batch.ids.device``, in ``dtype``, zero on pads.

        Frozen: eval mode, no gradient. Texts longer than ``window`` tokens are split into windows that
        overlap by ``2 * overlap`` tokens; each position is taken from the window where it lies at
        least ``overlap`` tokens from a cut (seams fall midway between window cuts), so every position
        sees at least ``overlap`` tokens of context on both sides. ``max_tokens`` bounds the tokens
        encoded at once (memory). TypeError for anything but a TokenBatch, or a dtype that is not floating point.
        """
        if not isinstance(batch, TokenBatch):
            raise TypeError(f"encode takes a TokenBatch, not {type(batch).__name__}: model.encode(model.tokenize(texts))")
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):  # an integer field rounds nearly all to 0
            raise TypeError(f"encode(dtype={dtype!r}): a field is floating point; give e.g. torch.float32")
        device = batch.ids.device
        if device.type not in DEVICE_TYPES:  # the meta device would erase the shared encoder's weights
            raise ValueError(f"encode: the batch lies on {device}; tokenize onto a cpu or cuda device")
        self.encoder.to(device)
        lengths = batch.lengths.tolist()
        B, L = batch.ids.shape
        field = torch.zeros(B, L, self.dim, device=device, dtype=dtype)
        plan = self._window_plan(lengths)
        plan.sort(key=lambda w: w[2] - w[1])  # similar lengths together: less padding
        per_chunk = max(1, max_tokens // (self.window + 2))
        for c in range(0, len(plan), per_chunk):
            chunk = plan[c : c + per_chunk]
            width = max(stop - start for _, start, stop, _, _ in chunk) + 2
            ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long, device=device)
            att = torch.zeros(len(chunk), width, dtype=torch.long, device=device)
            for r, (b, start, stop, _, _) in enumerate(chunk):
                n = stop - start
                ids[r, 0] = self.cls_id
                ids[r, 1 : n + 1] = batch.ids[b, start:stop]
                ids[r, n + 1] = self.sep_id
                att[r, : n + 2] = 1
            hidden = self._hidden(ids, att)
            for r, (b, start, _, own_lo, own_hi) in enumerate(chunk):
                field[b, own_lo:own_hi] = hidden[r, 1 + own_lo - start : 1 + own_hi - start].to(dtype)
        return field

    def _hidden(self, ids: Tensor, attention_mask: Tensor) -> Tensor:
        """[b, w, d] hidden states at ``self.layer`` for wrapped windows."""
        if self._truncated:
            out = self.encoder(input_ids=ids, attention_mask=attention_mask)
            return out.last_hidden_state
        out = self.encoder(input_ids=ids, attention_mask=attention_mask, output_hidden_states=True)
        return out.hidden_states[self.layer]

    # ------------------------------------------------------------------ decode
    @property
    def head(self) -> "DecoderHead":
        """The decoder head for this model and layer (loaded, or trained and cached, on first use)."""
        if self._head is None:
            if self._head_loader is None:
                raise RuntimeError(f"{self.name} layer {self.layer} has no decoder head attached")
            self._head = self._head_loader(self)
        return self._head

    def set_head(self, head: "DecoderHead") -> None:
        """Decode with ``head`` from now on; ValueError if its d or V is not this model's."""
        if head.dim != self.dim or head.vocab_size != self.vocab_size:
            raise ValueError(f"head is for d={head.dim}, V={head.vocab_size}; {self.name} has d={self.dim}, V={self.vocab_size}")
        self._head = head

    def _head_for(self, field: Tensor) -> "DecoderHead":
        """The head, on ``field``'s device, after checking that it can decode ``field``."""
        if not isinstance(field, Tensor):
            raise TypeError(f"field must be a torch.Tensor, not {type(field).__name__}")
        if field.shape[-1] != self.dim:
            raise ValueError(f"field has width {field.shape[-1]} but {self.name} decodes fields of width d={self.dim}")
        _check_head_device(field.device, "decode: the field")
        head = self.head
        if head.bias.device != field.device:
            head.to(field.device)
        return head

    def decode(self, field: Tensor) -> Tensor:
        """Logits [..., L, V] from a field [..., L, d], in the head's dtype (float32), on the field's
        device; differentiable in ``field``, head frozen. TypeError for a non-tensor, ValueError for
        a width other than d; the head is loaded (or trained, see ``fixedpos.load``) on first use."""
        head = self._head_for(field)
        return head(field.to(head.bias.dtype))

    def decode_features(self, field: Tensor) -> Tensor:
        """Query vectors [..., L, d] of a field [..., L, d], differentiable in ``field``:
        ``decode(field) == decode_features(field) @ embeddings.T + bias`` (see :meth:`decode_parts`)."""
        head = self._head_for(field)
        return head.features(field.to(head.bias.dtype))

    def decode_parts(self, device: torch.device | str) -> tuple[Callable[[Tensor], Tensor], Tensor, Tensor]:
        """The decoder split at its vocabulary projection: ``(decode_features, embeddings [V, d], bias [V])``
        on ``device``, such that ``decode(f) == decode_features(f) @ embeddings.T + bias``.

        For callers that fuse the projection [.., V] with what follows it (a cross-entropy that never
        stores the logits). embeddings and bias are frozen (no gradient), like the head in ``decode``.
        """
        device = torch.device(device)
        _check_head_device(device, f"decode_parts({str(device)!r})")
        head = self.head
        if head.bias.device != device:
            head.to(device)
        return self.decode_features, head.embeddings, head.bias.detach()

    def __repr__(self) -> str:
        return f"FieldModel({self.name!r}, layer={self.layer}, d={self.dim}, V={self.vocab_size}, window={self.window})"


def _check_head_device(device: torch.device, what: str) -> None:
    """ValueError unless ``device`` is one the shared head may move to: the head follows the field's
    device, and moved to the meta device it lost its weights for the whole process (every later
    decode of every caller of the cached model failed with "Cannot copy out of meta tensor")."""
    if device.type not in DEVICE_TYPES:
        raise ValueError(f"{what} lies on {device}: the decoder runs on cpu or cuda (moving the shared head to {device} "
                         "would erase its weights); move the field to a cpu or cuda device first")


def load_hf_encoder(path: str | Path) -> tuple[nn.Module, object]:
    """Encoder and fast tokenizer from a local Hugging Face folder, offline."""
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a folder; pass a local Hugging Face encoder directory or 'minilm-l6'")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json: not a Hugging Face model folder")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True, use_fast=True)
        encoder = AutoModel.from_pretrained(str(path), local_files_only=True)
    except Exception as err:  # transformers raises many types for unreadable folders
        raise RuntimeError(f"could not load a Hugging Face encoder from {path}: {err}") from err
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    if not getattr(tokenizer, "is_fast", False):
        raise RuntimeError(f"{path} has no fast tokenizer (tokenizer.json); character offsets need one")
    return encoder, tokenizer
