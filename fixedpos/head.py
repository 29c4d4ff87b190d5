"""Decoder heads: read tokens back from any field.

A head is *tied*: it maps a field vector into the frozen word-embedding space and scores every
vocabulary entry there, ``logits = q(field) @ E.T + b`` with ``E [V, d]`` the encoder's own word
embeddings. Untied heads trained on docstrings read 82 % of other prose (measured before this
package, in the project's design notes) (a head
that has never seen a token cannot emit it); scoring through ``E`` lets the head emit every token,
and training on random wordpiece sequences as well covers the whole vocabulary's contexts.

``q`` is a residual MLP on the layer-normalised field. Only ``q`` and ``b`` are trained and saved
(about 0.47 M floats for d = 384, V = 30522), so heads ship inside the repo.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .cache import cache_dir, read_safetensors, write_safetensors

if TYPE_CHECKING:
    from .model import FieldModel

HEAD_FORMAT = 1
SHIPPED_DIR = Path(__file__).parent / "heads"


class DecoderHead(nn.Module):
    """Tied decoder head. field [..., d] -> logits [..., V].

    word_embeddings: [V, d], the encoder's frozen input embeddings (a buffer, not saved). hidden:
    the MLP's hidden width (default d). Starts as layer norm then identity (the MLP branch small).
    """

    embeddings: Tensor  # [V, d] a buffer (register_buffer below): declared for the type checker

    def __init__(self, word_embeddings: Tensor, hidden: int | None = None) -> None:
        super().__init__()
        V, d = word_embeddings.shape
        hidden = hidden or d
        self.dim, self.vocab_size, self.hidden = d, V, hidden
        # frozen and not saved: it belongs to the encoder, whose hash keys the head
        self.register_buffer("embeddings", word_embeddings.detach().clone(), persistent=False)
        self.norm = nn.LayerNorm(d)
        self.linear = nn.Linear(d, d)
        self.up = nn.Linear(d, hidden)
        self.down = nn.Linear(hidden, d)
        self.bias = nn.Parameter(torch.zeros(V))
        with torch.no_grad():
            self.linear.weight.copy_(torch.eye(d))
            self.linear.bias.zero_()
            self.down.weight.mul_(0.1)

    def features(self, field: Tensor) -> Tensor:
        """Query vectors [..., d] in the word-embedding space (logits = features @ embeddings.T + bias)."""
        x = self.norm(field)
        return self.linear(x) + self.down(F.gelu(self.up(x)))

    def forward(self, field: Tensor) -> Tensor:
        """Logits [..., V] of a field [..., d], in the features' dtype."""
        q = self.features(field)
        return q @ self.embeddings.to(q.dtype).T + self.bias.to(q.dtype)

    def trainable_state(self) -> dict[str, Tensor]:
        """The state dict without the frozen word embeddings (what a head file stores)."""
        return {k: v for k, v in self.state_dict().items() if k != "embeddings"}


@dataclass(frozen=True)
class HeadRecipe:
    """Everything that decides a trained head. Its hash keys the cache.

    steps: optimizer steps of ``batch_tokens`` token rows each. random_sequences: sequences of
    ``random_length`` wordpieces drawn uniformly from the text vocabulary, encoded like text
    (vocabulary coverage). negatives: None = full softmax over V; k = softmax over the batch's
    targets plus k uniformly drawn tokens (cheap on CPU, slightly less accurate).
    """

    name: str = "standard"
    version: int = 1
    seed: int = 0
    steps: int = 3000
    batch_tokens: int = 8192
    lr: float = 2e-3
    weight_decay: float = 0.0
    max_corpus_tokens: int = 400_000
    chunk_tokens: int = 128
    random_sequences: int = 8000
    random_length: int = 64
    negatives: int | None = None
    hidden: int | None = None

    def key(self) -> str:
        """12 hex digits of the SHA-256 of every field: the cache key of heads trained with this recipe."""
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


RECIPES = {
    "standard": HeadRecipe(),
    # for CPUs and tests: sampled softmax, fewer tokens; minutes on two cores for d = 384
    "quick": HeadRecipe(name="quick", steps=600, batch_tokens=2048, max_corpus_tokens=60_000, random_sequences=1000, negatives=4096),
}


def resolve_recipe(recipe: str | HeadRecipe) -> HeadRecipe:
    if isinstance(recipe, HeadRecipe):
        return recipe
    if recipe not in RECIPES:
        raise ValueError(f"unknown head recipe {recipe!r}; choose one of {sorted(RECIPES)} or pass a HeadRecipe")
    return RECIPES[recipe]


def head_filename(model_hash: str, layer: int, recipe: HeadRecipe) -> str:
    return f"head-{model_hash[:16]}-layer{layer}-{recipe.name}-{recipe.key()}.safetensors"


def save_head(head: DecoderHead, path: Path, meta: dict) -> None:
    """Write the head's trainable tensors and JSON metadata as one safetensors file, atomically."""
    tensors = {k: v.float() for k, v in head.trainable_state().items()}
    write_safetensors(path, tensors, {"format": str(HEAD_FORMAT), "meta": json.dumps(meta, sort_keys=True)})


def load_head(path: Path, word_embeddings: Tensor, model_hash: str, layer: int) -> tuple[DecoderHead, dict]:
    """Read a head file; refuse a corrupt file or one trained for another model or layer."""
    tensors, header = read_safetensors(path, "decoder head file")
    try:
        meta = json.loads(header.get("meta", "{}"))
    except json.JSONDecodeError as err:
        raise ValueError(f"decoder head file {path} has corrupt metadata ({err}); delete it to retrain") from err
    if header.get("format") != str(HEAD_FORMAT):
        raise ValueError(f"decoder head {path} has format {header.get('format')!r}, this code reads {HEAD_FORMAT}")
    if meta.get("model_hash") != model_hash or meta.get("layer") != layer:
        raise ValueError(
            f"decoder head {path} was trained for model {meta.get('model_hash', '?')[:12]} layer {meta.get('layer')}, "
            f"not model {model_hash[:12]} layer {layer}"
        )
    up = tensors.get("up.weight")
    if up is None or up.dim() != 2:  # a KeyError or an IndexError named neither the file nor the fix
        raise ValueError(f"decoder head file {path} lacks a 2-d up.weight: it is damaged")
    with torch.random.fork_rng(devices=[]):  # its random initialization is overwritten: the caller's random state is kept
        head = DecoderHead(word_embeddings, hidden=up.shape[0])
    # shapes and values checked here: load_state_dict's RuntimeError ("size mismatch for bias") escaped
    # find_or_train_head, which names the fix for a damaged head, and NaN weights decoded every token as [PAD]
    want = head.state_dict()
    wrong = [f"{k} {tuple(t.shape)} (expected {tuple(want[k].shape)})" for k, t in tensors.items()
             if k in want and t.shape != want[k].shape]
    wrong += [f"{k} holds NaN or inf" for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if wrong:
        raise ValueError(f"decoder head file {path} has {', '.join(wrong[:4])}: it is damaged, or for another model")
    missing, unexpected = head.load_state_dict(tensors, strict=False)
    if unexpected or [m for m in missing if m != "embeddings"]:
        raise ValueError(f"decoder head {path} has tensors {unexpected} / lacks {missing}")
    head.eval().requires_grad_(False)
    return head, meta


def _training_rows(model, texts: Sequence[str], recipe: HeadRecipe, generator: torch.Generator, device,
                   progress: bool) -> tuple[Tensor, Tensor]:
    """Encoded (field rows [T, d], target ids [T]) from corpus chunks plus random wordpiece sequences.
    progress: a bar over the encoding (minutes on a CPU for the standard recipe)."""
    from tqdm.auto import tqdm

    from .corpus import chunk_token_ids

    chunks = chunk_token_ids(model, texts, recipe.chunk_tokens, recipe.max_corpus_tokens)
    vocab = model.text_token_ids
    picks = torch.randint(len(vocab), (recipe.random_sequences, recipe.random_length), generator=generator)
    chunks += [row for row in vocab[picks]]
    feats, targets = [], []
    per = max(1, 16384 // (recipe.chunk_tokens + 2))
    from .model import TokenBatch

    bar = tqdm(total=sum(len(c) for c in chunks), desc=f"encode {model.name} L{model.layer}", unit="token",
               disable=not progress, leave=False)
    for c in range(0, len(chunks), per):
        group = chunks[c : c + per]
        L = max(len(g) for g in group)
        ids = torch.full((len(group), L), model.pad_id, dtype=torch.long)
        mask = torch.zeros(len(group), L, dtype=torch.bool)
        for r, g in enumerate(group):
            ids[r, : len(g)] = g
            mask[r, : len(g)] = True
        batch = TokenBatch(ids, mask, torch.zeros(len(group), L, 2, dtype=torch.long), [""] * len(group)).to(device)
        field = model.encode(batch)
        feats.append(field[batch.mask])
        targets.append(batch.ids[batch.mask])
        bar.update(sum(len(g) for g in group))
    bar.close()
    return torch.cat(feats), torch.cat(targets)


@torch.enable_grad()  # it may be first called from inside a fit's no_grad (a head trained on first use)
def train_head(
    model: FieldModel,
    texts: Sequence[str],
    recipe: HeadRecipe,
    device: torch.device | str | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> tuple[DecoderHead, dict]:
    """Train a tied head for ``model`` at its layer on ``texts`` with ``recipe`` (seeded, reproducible per device).

    device: default cuda if available. log: called once with a summary line. Returns (the head, on
    the CPU, in eval mode without gradients; its metadata: model, layer, recipe, train accuracy...).
    """
    from tqdm.auto import tqdm

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    generator = torch.Generator().manual_seed(recipe.seed)
    started = time.perf_counter()
    feats, targets = _training_rows(model, texts, recipe, generator, device, progress=progress)
    encode_s = time.perf_counter() - started
    # its layers are initialized on the CPU from the seeded generator, then given back: a head trained
    # on first use (inside a fit's decode) leaves the caller's random state as it was
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(recipe.seed)
        head = DecoderHead(model.word_embeddings.to(device), hidden=recipe.hidden)
    head = head.to(device)
    params = [p for n, p in head.named_parameters()]
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    vocab = model.text_token_ids.to(device)
    dev_gen = torch.Generator(device=device).manual_seed(recipe.seed + 1)
    T = feats.shape[0]
    bar = tqdm(range(recipe.steps), desc=f"head {model.name} L{model.layer}", disable=not progress, unit="step")
    for step in bar:
        lr = recipe.lr * 0.5 * (1 + math.cos(math.pi * step / recipe.steps))  # cosine decay to zero
        for group in opt.param_groups:
            group["lr"] = lr
        rows = torch.randint(T, (recipe.batch_tokens,), device=device, generator=dev_gen)
        x, y = feats[rows], targets[rows]
        if recipe.negatives is None:
            loss = F.cross_entropy(head(x), y)
        else:
            neg = vocab[torch.randint(len(vocab), (recipe.negatives,), device=device, generator=dev_gen)]
            cand, y_idx = torch.unique(torch.cat([y, neg]), return_inverse=True)
            q = head.features(x)
            logits = q @ head.embeddings[cand].T + head.bias[cand]
            loss = F.cross_entropy(logits, y_idx[: len(y)])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    head.eval().requires_grad_(False)
    with torch.no_grad():
        correct = sum(int((head(feats[i : i + 8192]).argmax(-1) == targets[i : i + 8192]).sum()) for i in range(0, T, 8192))
    meta = {
        "model": model.name,
        "model_hash": model.model_hash,
        "layer": model.layer,
        "recipe": asdict(recipe),
        "recipe_key": recipe.key(),
        "train_tokens": T,
        "train_accuracy": correct / T,
        "device": str(device),
        "torch": torch.__version__,
        "seconds": round(time.perf_counter() - started, 1),
        "encode_seconds": round(encode_s, 1),
    }
    log(f"trained head {model.name} layer {model.layer}: {T} tokens, train accuracy {correct / T:.4%}, {meta['seconds']} s")
    return head.cpu(), meta


def find_or_train_head(model: FieldModel, recipe: str | HeadRecipe = "standard", train_if_missing: bool = True, progress: bool = True) -> DecoderHead:
    """The head for ``model`` at its layer: shipped with the package, else cached, else trained and cached.

    recipe: a name in ``RECIPES`` or a HeadRecipe (ValueError for an unknown name). Without a head
    and with ``train_if_missing=False``: FileNotFoundError. ValueError for a corrupt head file, naming
    it and the fix (delete a cached head to train it again; reinstall for a damaged shipped one).
    """
    recipe = resolve_recipe(recipe)
    fname = head_filename(model.model_hash, model.layer, recipe)
    for path in (SHIPPED_DIR / fname, cache_dir() / "heads" / fname):
        if path.is_file():
            try:
                head, _ = load_head(path, model.word_embeddings, model.model_hash, model.layer)
            except ValueError as err:
                if path.parent == SHIPPED_DIR:  # part of the installed package
                    fix = ("the installed package is damaged: reinstall it (pip install --force-reinstall --no-deps "
                           f"splatopt), or in a source checkout restore the file (git checkout -- fixedpos/heads/{fname})")
                else:
                    fix = (f"delete {path}: the head is trained again on first use, or now with `fixedpos train-head "
                           f"--model {model.name} --layer {model.layer} --recipe {recipe.name}`")
                raise ValueError(f"{err}; {fix}") from err
            return head
    if not train_if_missing:
        raise FileNotFoundError(
            f"no decoder head for {model.name} layer {model.layer} recipe {recipe.name}; train one with "
            f"`fixedpos train-head --model {model.name} --layer {model.layer} --recipe {recipe.name}`"
        )
    from .corpus import load_corpus

    train_texts = load_corpus("stdlib", "train")
    head, meta = train_head(model, train_texts, recipe, progress=progress)
    save_head(head, cache_dir() / "heads" / fname, meta)
    head.eval().requires_grad_(False)
    return head


def token_accuracy(model: FieldModel, texts: Sequence[str], device: torch.device | str = "cpu", batch_size: int = 64) -> dict:
    """Round-trip token accuracy of ``argmax decode(encode(x))`` over every token of ``texts``:
    ``{"accuracy": correct / tokens (a fraction in [0, 1]), "tokens": tokens scored, "texts": len(texts)}``."""
    correct = total = 0
    for i in range(0, len(texts), batch_size):
        batch = model.tokenize(texts[i : i + batch_size], device=device)
        with torch.no_grad():
            pred = model.decode(model.encode(batch)).argmax(-1)
        correct += int((pred == batch.ids)[batch.mask].sum())
        total += int(batch.mask.sum())
    return {"accuracy": correct / max(total, 1), "tokens": total, "texts": len(texts)}
