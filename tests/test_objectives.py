"""Objectives: exact values, masking, the cross-entropy term, parsing of objective strings."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from splatopt import Objective, decode_cross_entropy, mean_cosine, objective_terms, relative_mse, token_accuracy

FAST = settings(max_examples=25, deadline=None)
F64 = torch.float64


def batch(seed=0, B=3, L=7, d=4, V=11, dtype=F64):
    """target [B, L, d], prefix mask [B, L] (prompt lengths 7, 4, 1), ids [B, L], a linear decoder."""
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(B, L, d, generator=g, dtype=dtype)
    lengths = torch.tensor([L, 4, 1])[:B]
    mask = torch.arange(L)[None, :] < lengths[:, None]
    ids = torch.randint(0, V, (B, L), generator=g)
    head = torch.randn(d, V, generator=g, dtype=dtype)
    return target, mask, ids, (lambda field: field @ head)


@FAST
@given(seed=st.integers(0, 10_000), scale=st.floats(1e-3, 1e3))
def test_relative_mse_is_zero_at_the_target_and_one_at_zero(seed, scale):
    target, mask, _, _ = batch(seed)
    target = target * scale
    torch.testing.assert_close(relative_mse(target, target, mask), torch.zeros(3, dtype=F64))
    torch.testing.assert_close(relative_mse(torch.zeros_like(target), target, mask), torch.ones(3, dtype=F64))
    torch.testing.assert_close(relative_mse(2 * target, target, mask), torch.ones(3, dtype=F64))


@FAST
@given(seed=st.integers(0, 10_000), scale=st.floats(1e-2, 1e2))
def test_mean_cosine_ignores_scale_and_flips_with_sign(seed, scale):
    target, mask, _, _ = batch(seed)
    torch.testing.assert_close(mean_cosine(scale * target, target, mask), torch.ones(3, dtype=F64))
    torch.testing.assert_close(mean_cosine(2 * target, target, mask), torch.ones(3, dtype=F64))
    torch.testing.assert_close(mean_cosine(-target, target, mask), -torch.ones(3, dtype=F64))


def test_objectives_are_per_prompt_means_over_the_prompts_tokens():
    target, mask, ids, decode = batch(1)
    field = target + 0.3 * torch.randn(target.shape, generator=torch.Generator().manual_seed(2), dtype=F64)
    mse, cos, ce = relative_mse(field, target, mask), mean_cosine(field, target, mask), decode_cross_entropy(decode(field), ids, mask)
    for b in range(3):
        f, t, i = field[b][mask[b]], target[b][mask[b]], ids[b][mask[b]]
        assert float(mse[b]) == pytest.approx(float(((f - t) ** 2).sum() / (t**2).sum()), rel=1e-12)
        assert float(cos[b]) == pytest.approx(float(F.cosine_similarity(f, t, dim=-1).mean()), rel=1e-12)
        assert float(ce[b]) == pytest.approx(float(F.cross_entropy(decode(f), i)), rel=1e-12)


garbage = st.one_of(st.floats(-1e6, 1e6), st.sampled_from([float("nan"), float("inf"), -float("inf")]))


@FAST
@given(seed=st.integers(0, 10_000), junk=garbage, junk_id=st.sampled_from([-100, -1, 0, 5, 10_000]))
def test_masked_positions_change_no_objective(seed, junk, junk_id):
    target, mask, ids, decode = batch(seed)
    g = torch.Generator().manual_seed(seed + 1)
    field = target + torch.randn(target.shape, generator=g, dtype=F64)
    logits = decode(field)
    off = ~mask
    field2 = field.masked_fill(off[..., None], junk)
    target2 = target.masked_fill(off[..., None], junk)
    logits2 = logits.masked_fill(off[..., None], junk)
    ids2 = ids.masked_fill(off, junk_id)
    assert torch.equal(relative_mse(field2, target2, mask), relative_mse(field, target, mask))
    assert torch.equal(mean_cosine(field2, target2, mask), mean_cosine(field, target, mask))
    assert torch.equal(decode_cross_entropy(logits2, ids2, mask), decode_cross_entropy(logits, ids, mask))
    assert torch.equal(token_accuracy(logits2, ids2, mask), token_accuracy(logits, ids, mask))

    # and no gradient leaks out of (or NaN into) the masked positions
    live = field2.clone().requires_grad_(True)
    loss, _ = objective_terms(Objective(mse=1.0, cosine=0.5, ce=0.0), live, target2, mask)
    (grad,) = torch.autograd.grad(loss.sum(), live)
    assert torch.isfinite(grad).all()
    assert torch.equal(grad[off], torch.zeros_like(grad[off]))
    # (logits at masked positions come from a finite rendered field; garbage ids there are padding)
    live_logits = logits.masked_fill(off[..., None], 0.0 if junk != junk or abs(junk) == float("inf") else junk)
    live_logits.requires_grad_(True)
    (grad,) = torch.autograd.grad(decode_cross_entropy(live_logits, ids2, mask).sum(), live_logits)
    assert torch.isfinite(grad).all()
    assert torch.equal(grad[off], torch.zeros_like(grad[off]))


def test_decode_cross_entropy_equals_torch_cross_entropy_on_unmasked_rows():
    target, mask, ids, decode = batch(3)
    logits = decode(target)
    ce = decode_cross_entropy(logits, ids, mask)
    assert ce.dtype == F64  # the caller's dtype is kept
    for b in range(3):
        expected = F.cross_entropy(logits[b][mask[b]], ids[b][mask[b]])
        torch.testing.assert_close(ce[b], expected, atol=1e-12, rtol=1e-12)


def test_decode_cross_entropy_upcasts_half_precision_logits():
    target, mask, ids, decode = batch(4, dtype=torch.float32)
    logits = decode(target)
    ce = decode_cross_entropy(logits.bfloat16(), ids, mask)
    assert ce.dtype == torch.float32
    torch.testing.assert_close(ce, decode_cross_entropy(logits.bfloat16().float(), ids, mask))


def test_objectives_with_an_empty_prompt_are_finite():
    target, mask, ids, decode = batch(5)
    mask[2] = False
    for value in (relative_mse(target, target, mask), mean_cosine(target, target, mask),
                  decode_cross_entropy(decode(target), ids, mask), token_accuracy(decode(target), ids, mask)):
        assert torch.isfinite(value).all()


def test_token_accuracy_counts_argmax_hits_over_the_prompts_tokens():
    ids = torch.tensor([[1, 2, 3, 0], [0, 1, 1, 1]])
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    pred = torch.tensor([[1, 0, 3, 0], [0, 1, 0, 0]])
    logits = F.one_hot(pred, 4).double()
    torch.testing.assert_close(token_accuracy(logits, ids, mask), torch.tensor([2 / 3, 1.0]))


# ------------------------------------------------------------------ Objective


@pytest.mark.parametrize(
    "spec,expected",
    [
        ("mse+ce", Objective(mse=1.0, cosine=0.0, ce=1.0)),
        ("mse", Objective(mse=1.0, cosine=0.0, ce=0.0)),
        ("ce", Objective(mse=0.0, cosine=0.0, ce=1.0)),
        ("0.5*mse+ce+0.1*cosine", Objective(mse=0.5, cosine=0.1, ce=1.0)),
        (" 0.5 * mse + 2*ce ", Objective(mse=0.5, cosine=0.0, ce=2.0)),
        ("1e-3*mse+mse", Objective(mse=1.001, cosine=0.0, ce=0.0)),
        ({"mse": 2, "ce": 0.5}, Objective(mse=2.0, cosine=0.0, ce=0.5)),
        ({"cosine": 1}, Objective(mse=0.0, cosine=1.0, ce=0.0)),
        (Objective(mse=0.3), Objective(mse=0.3)),
    ],
)
def test_objective_parse_reads_strings_dicts_and_objectives(spec, expected):
    assert Objective.parse(spec) == expected


@pytest.mark.parametrize("spec", ["", "mse+", "mse+foo", "2*", "mse*2", "mse ce", "2**mse", "x*mse", "1.2.3*mse",
                                  {"mse": 1, "crossentropy": 1}, {"mse": "lots"}])
def test_objective_parse_refuses_what_it_cannot_read(spec):
    with pytest.raises(ValueError, match="^objective .*(cannot read term|is not a number|unknown terms|could not convert)"):
        Objective.parse(spec)


@pytest.mark.parametrize("spec, message", [
    ("0.5*mse+ce+cosin", r"cannot read term 'cosin' \(did you mean 'cosine'\?\); the terms are mse, cosine and ce"),
    ("mse+CE", r"cannot read term 'CE' \(did you mean 'ce'\?\)"), ("mse+cee", r"\(did you mean 'ce'\?\)"),
    ("mse+0.1*cos", r"\(did you mean 'cosine'\?\)"), ("mse+foo", r"cannot read term 'foo'; the terms are mse, cosine and ce"),
])
def test_a_misspelt_objective_term_is_named_with_the_terms_there_are(spec, message):
    """A typo ('cosin', 'CE') said only "cannot read term": not which terms exist, nor the one meant."""
    with pytest.raises(ValueError, match=message):
        Objective.parse(spec)


@pytest.mark.parametrize("spec, message", [
    ("0*mse", "every weight is 0"), ("-1*mse", r"weights \{'mse': -1.0\}: each must be a finite number >= 0"),
    ("1e999*mse", "inf"), ("1e*mse", "'1e' in term '1e\\*mse' is not a number"), ({"ce": float("nan")}, "nan"),
])
def test_objective_weights_that_would_break_or_reverse_the_fit_are_refused(spec, message):
    with pytest.raises(ValueError, match=message):
        Objective.parse(spec)


@FAST
@given(mse=st.floats(0, 10), cosine=st.floats(0, 10), ce=st.floats(0, 10))
def test_objective_string_form_round_trips(mse, cosine, ce):
    assume(mse or cosine or ce)  # all zero is refused: nothing to fit
    obj = Objective(mse=mse, cosine=cosine, ce=ce)
    back = Objective.parse(str(obj))
    for k in ("mse", "cosine", "ce"):
        assert getattr(back, k) == pytest.approx(getattr(obj, k), rel=1e-5)
    assert back.needs_decoder == obj.needs_decoder == (ce != 0)


def test_objective_terms_is_the_weighted_sum_of_its_terms():
    target, mask, ids, decode = batch(6)
    field = target + 0.5 * torch.randn(target.shape, generator=torch.Generator().manual_seed(7), dtype=F64)
    obj = Objective.parse("0.5*mse+2*ce+0.25*cosine")
    loss, terms = objective_terms(obj, field, target, mask, ids, decode)
    assert set(terms) == {"mse", "cosine", "ce"}
    torch.testing.assert_close(terms["mse"], relative_mse(field, target, mask))
    torch.testing.assert_close(terms["cosine"], mean_cosine(field, target, mask))
    torch.testing.assert_close(terms["ce"], decode_cross_entropy(decode(field), ids, mask))
    torch.testing.assert_close(loss, 0.5 * terms["mse"] + 0.25 * (1 - terms["cosine"]) + 2 * terms["ce"])
    assert loss.shape == (3,) and loss.dtype == F64


def test_field_only_objective_never_calls_the_decoder():
    target, mask, _, _ = batch(7)

    def decode(_):
        raise AssertionError("decoder called for a field-only objective")

    loss, terms = objective_terms(Objective.parse("mse+cosine"), target * 0.5, target, mask, None, decode)
    assert set(terms) == {"mse", "cosine"}
    torch.testing.assert_close(loss, torch.full((3,), 0.25, dtype=F64))


def test_cross_entropy_objective_without_ids_or_decoder_raises():
    target, mask, ids, decode = batch(8)
    with pytest.raises(ValueError, match="cross-entropy"):
        objective_terms(Objective.parse("mse+ce"), target, target, mask, None, decode)
    with pytest.raises(ValueError, match="cross-entropy"):
        objective_terms(Objective.parse("ce"), target, target, mask, ids, None)


def test_cross_entropy_objective_gradients_match_finite_differences():
    target, mask, ids, decode = batch(9, B=2, L=3, d=2, V=5)
    field = (target + 0.1).requires_grad_(True)
    obj = Objective.parse("mse+ce+0.5*cosine")
    assert torch.autograd.gradcheck(lambda f: objective_terms(obj, f, target, mask, ids, decode)[0], (field,), eps=1e-6, atol=1e-6)


def test_objective_terms_refuse_batches_that_would_broadcast():
    target, mask = torch.randn(3, 4, 8), torch.ones(3, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"field \(1, 4, 8\), target \(3, 4, 8\)"):
        objective_terms(Objective.parse("mse"), torch.randn(1, 4, 8), target, mask)


def test_numpy_weights_are_numbers():
    import numpy as np

    objective = Objective(mse=np.float32(0.5), ce=np.int64(1))
    assert objective == Objective(mse=0.5, ce=1.0) and type(objective.mse) is float and str(objective) == "0.5*mse+1*ce"
    with pytest.raises(ValueError, match="each must be a finite number >= 0"):
        Objective(mse=np.float32(-1.0))


@FAST
@given(exponent=st.integers(-15, 15), seed=st.integers(0, 10_000))
def test_relative_mse_does_not_depend_on_the_fields_scale(exponent, seed):
    """It is the error over the target's squared norm: scaling field and target together leaves it.
    A fixed floor of 1e-12 on the squared norm read a field of norm 1e-7 as error 0."""
    g = torch.Generator().manual_seed(seed)
    field, target = torch.randn(2, 2, 5, 3, generator=g)
    mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    scale = 10.0 ** exponent
    torch.testing.assert_close(relative_mse(field * scale, target * scale, mask), relative_mse(field, target, mask), rtol=1e-5, atol=0)


def test_objective_terms_names_a_mask_that_is_not_bool():
    """An attention mask of 0/1 ints (as tokenizers give it) failed in torch.where with 'where expected condition
    to be a boolean tensor', naming no argument."""
    field, target = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    with pytest.raises(TypeError, match=r"mask must be a \[B, L\] bool tensor, not torch.int64: pass mask.bool\(\)"):
        objective_terms(Objective.parse("mse"), field, target, torch.ones(2, 3, dtype=torch.long))
