"""SplatSet: validation, views, batch operations, and its safetensors file format."""

import json
import math
import os

import pytest
import torch
from safetensors.torch import save_file

from fixedpos.cache import write_safetensors
from splatopt import SplatSet, render
from splatopt.splats import FORMAT_VERSION, SIGMA_MAX, SIGMA_MIN


def random_splats(B=3, N=5, d=4, seed=0, dtype=torch.float32, meta=None) -> SplatSet:
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, N, generator=g) < 0.6
    mask[:, 0] = True
    return SplatSet(
        torch.rand(B, N, generator=g, dtype=dtype) * 10,
        torch.randn(B, N, generator=g, dtype=dtype) * 0.5,
        torch.randn(B, N, generator=g, dtype=dtype),
        torch.randn(B, N, d, generator=g, dtype=dtype),
        mask,
        dict(meta or {}),
    )


def assert_same(a: SplatSet, b: SplatSet):
    for k in ("mu", "log_sigma", "weight_logit", "v", "mask"):
        x, y = getattr(a, k), getattr(b, k)
        assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y), k
    assert a.meta == b.meta


# ------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    "field,value,error",
    [
        ("log_sigma", torch.zeros(2, 4), ValueError),
        ("weight_logit", torch.zeros(2), ValueError),
        ("mask", torch.ones(3, 4, dtype=torch.bool), ValueError),
        ("v", torch.zeros(2, 3), ValueError),
        ("v", torch.zeros(2, 4, 5), ValueError),
        ("v", torch.zeros(2, 3, 4, 5), ValueError),
        ("mask", torch.ones(2, 3), TypeError),
        ("mu", torch.zeros(6), ValueError),
        ("mu", torch.zeros(2, 3, 1), ValueError),
    ],
)
def test_splatset_refuses_inconsistent_shapes(field, value, error):
    parts = {"mu": torch.zeros(2, 3), "log_sigma": torch.zeros(2, 3), "weight_logit": torch.zeros(2, 3),
             "v": torch.zeros(2, 3, 4), "mask": torch.ones(2, 3, dtype=torch.bool)}
    parts[field] = value
    with pytest.raises(error, match=field if error is ValueError else "mask"):
        SplatSet(**parts)


def test_views_of_a_splatset():
    s = random_splats(B=2, N=3, d=5)
    assert (s.batch_size, s.capacity, s.dim) == (2, 3, 5)
    assert s.counts.tolist() == s.mask.sum(-1).tolist()
    torch.testing.assert_close(s.weight, torch.sigmoid(s.weight_logit))
    assert set(s.params()) == {"mu", "log_sigma", "weight_logit", "v"}
    moved = s.with_params({"mu": s.mu + 1})
    assert torch.equal(moved.mu, s.mu + 1) and torch.equal(moved.v, s.v)
    as64 = s.to(dtype=torch.float64)
    assert as64.mu.dtype == torch.float64 and as64.mask.dtype == torch.bool
    live = s.with_params({"mu": s.mu.clone().requires_grad_(True)})
    assert live.mu.requires_grad and not live.detach().mu.requires_grad


def test_to_takes_a_device_or_dtype_positionally_like_tensor_to():
    """SplatSet.to(torch.float16) passed the dtype as the device and raised a raw TypeError from
    torch; a non-float dtype would have cast the parameters to integers."""
    s = random_splats(B=2, N=3, d=4)
    for moved in (s.to(torch.float64), s.to("cpu", torch.float64), s.to(torch.device("cpu"), dtype=torch.float64),
                  s.to(device="cpu", dtype=torch.float64)):
        assert moved.mu.dtype == moved.v.dtype == torch.float64 and moved.mask.dtype == torch.bool
        torch.testing.assert_close(moved.v, s.v.double())
    assert s.to("cpu").mu.dtype == torch.float32 and s.to("cpu").mask.device.type == "cpu"
    for args, kwargs, message in [((torch.long,), {}, "dtype=torch.int64.*floating point"),
                                  ((), {"dtype": "float16"}, "dtype='float16'.*torch dtype"),
                                  ((torch.float16,), {"dtype": torch.float32}, "each once"),
                                  ((1.5,), {}, r"SplatSet.to\(1.5\): give a device")]:
        with pytest.raises(TypeError, match=message):
            s.to(*args, **kwargs)
    with pytest.raises(ValueError, match="device='gpu0' is not a device"):
        s.to("gpu0")


def test_sigma_is_clamped_to_its_bounds():
    log_sigma = torch.tensor([[-1e4, math.log(SIGMA_MIN) - 1, 0.0, math.log(3.0), math.log(SIGMA_MAX) + 1, 1e4]], dtype=torch.float64)
    s = SplatSet(torch.zeros(1, 6, dtype=torch.float64), log_sigma, torch.zeros(1, 6, dtype=torch.float64),
                 torch.zeros(1, 6, 1, dtype=torch.float64), torch.ones(1, 6, dtype=torch.bool))
    expected = torch.tensor([[SIGMA_MIN, SIGMA_MIN, 1.0, 3.0, SIGMA_MAX, SIGMA_MAX]], dtype=torch.float64)
    torch.testing.assert_close(s.sigma, expected, rtol=1e-12, atol=0)
    assert float(s.sigma.min()) >= SIGMA_MIN * (1 - 1e-12) and float(s.sigma.max()) <= SIGMA_MAX * (1 + 1e-12)
    live = log_sigma.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(s.with_params({"log_sigma": live}).sigma.sum(), live)
    assert torch.isfinite(grad).all() and grad[0, 0] == 0 and grad[0, -1] == 0


# ------------------------------------------------------------------ batch operations


def test_select_keeps_the_batch_dimension():
    s = random_splats(B=4)
    for index, rows in [(0, [0]), (2, [2]), (-1, [3]), (-4, [0]), (slice(1, 3), [1, 2]), (torch.tensor([3, 0]), [3, 0]),
                        (torch.tensor([True, False, True, False]), [0, 2])]:
        sub = s.select(index)
        assert sub.batch_size == len(rows), index
        assert torch.equal(sub.mu, s.mu[rows]) and torch.equal(sub.v, s.v[rows]) and torch.equal(sub.mask, s.mask[rows])


@pytest.mark.parametrize("index", [4, -5])
def test_select_out_of_range_raises(index):
    with pytest.raises(IndexError, match=rf"select\({index}\): this set holds prompts 0..3"):
        random_splats(B=4).select(index)


def test_cat_pads_smaller_capacities_with_inactive_slots():
    a, b, c = random_splats(B=2, N=3, seed=1, meta={"kernel": "erf"}), random_splats(B=1, N=6, seed=2), random_splats(B=3, N=1, seed=3)
    out = SplatSet.cat([a, b, c])
    assert (out.batch_size, out.capacity) == (6, 6)
    assert out.meta == {"kernel": "erf"}
    assert out.counts.tolist() == a.counts.tolist() + b.counts.tolist() + c.counts.tolist()
    for part, rows in ((a, slice(0, 2)), (b, slice(2, 3)), (c, slice(3, 6))):
        n = part.capacity
        for k in ("mu", "log_sigma", "weight_logit", "v", "mask"):
            assert torch.equal(getattr(out, k)[rows, :n], getattr(part, k)), k
        assert not out.mask[rows, n:].any()
        assert torch.equal(out.v[rows, n:], torch.zeros_like(out.v[rows, n:]))
        # padding does not change what the prompts render
        torch.testing.assert_close(render(out.select(rows), 12), render(part, 12))


def test_trimmed_drops_only_trailing_slots_that_no_prompt_uses():
    s = random_splats(B=2, N=6)
    s.mask[:] = torch.tensor([[True, False, True, False, False, False], [True, False, False, True, False, False]])
    t = s.trimmed()
    assert t.capacity == 4
    assert torch.equal(t.mask, s.mask[:, :4]) and torch.equal(t.v, s.v[:, :4])
    torch.testing.assert_close(render(t, 10), render(s, 10))
    s.mask[:] = False
    assert s.trimmed().capacity == 0


# ------------------------------------------------------------------ files


def test_save_load_round_trip(tmp_path):
    meta = {"model": "minilm", "model_hash": "ab" * 32, "layer": 2, "texts": ["héllo", "wörld", ""], "nested": {"a": [1, 2.5, None]}}
    s = random_splats(meta=meta)
    extra = {"ids": torch.randint(0, 30522, (3, 9)), "token_mask": torch.rand(3, 9) < 0.5, "scores": torch.randn(3, dtype=torch.float64)}
    path = s.save(tmp_path / "fit.splats", extra)
    assert path == tmp_path / "fit.splats" and path.is_file()
    back, back_extra = SplatSet.load(path)
    assert_same(back, s)
    assert set(back_extra) == set(extra)
    for k, t in extra.items():
        assert back_extra[k].dtype == t.dtype and torch.equal(back_extra[k], t), k
    again, _ = SplatSet.load(path, expect_model_hash="ab" * 32)
    assert_same(again, s)


def test_save_keeps_float64_and_widens_half_precision_to_float32(tmp_path):
    """At least float32, never narrowed: a float64 fit loads back bit for bit, a float16 one as float32."""
    wide = random_splats(dtype=torch.float64)
    wide = wide.with_params({"mu": wide.mu + 1e-12})  # a difference float32 cannot hold
    back, _ = SplatSet.load(wide.save(tmp_path / "f64.safetensors"))
    assert_same(back, wide)
    half = random_splats(dtype=torch.float16)
    back, _ = SplatSet.load(half.save(tmp_path / "f16.safetensors"))
    for k, t in half.params().items():
        assert getattr(back, k).dtype == torch.float32 and torch.equal(getattr(back, k), t.float()), k


def test_save_leaves_no_temporary_files_and_overwrites_atomically(tmp_path, monkeypatch):
    path = tmp_path / "s.safetensors"
    first = random_splats(seed=1)
    first.save(path)
    random_splats(seed=2).save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["s.safetensors"]
    assert_same(SplatSet.load(path)[0], random_splats(seed=2))

    # a crash between writing and renaming leaves the old file intact and no temporary behind
    def crash(*args, **kwargs):
        raise OSError("disk on fire")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk on fire"):
        random_splats(seed=3).save(path)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["s.safetensors"]
    assert_same(SplatSet.load(path)[0], random_splats(seed=2))


def test_save_creates_missing_folders(tmp_path):
    path = random_splats().save(tmp_path / "a" / "b" / "s.safetensors")
    assert path.is_file()


def _assert_refused(path, **kwargs):
    with pytest.raises(ValueError) as info:
        SplatSet.load(path, **kwargs)
    assert str(path) in str(info.value)
    return str(info.value)


@pytest.mark.parametrize("how", ["truncated", "header-only", "garbage", "empty", "flipped-header"])
def test_load_refuses_a_corrupt_file_naming_it(tmp_path, how):
    path = tmp_path / "s.safetensors"
    random_splats().save(path)
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    damaged = {
        "truncated": raw[: len(raw) - 17],
        "header-only": raw[: 8 + size],
        "garbage": bytes(range(256)) * 4,
        "empty": b"",
        "flipped-header": raw[:8] + raw[8:20][::-1] + raw[20:],
    }[how]
    path.write_bytes(damaged)
    _assert_refused(path)


def test_load_refuses_a_safetensors_file_that_holds_no_splats(tmp_path):
    path = tmp_path / "weights.safetensors"
    save_file({"weight": torch.zeros(3, 3)}, str(path))
    assert "not a splatopt splat file" in _assert_refused(path)


def test_load_refuses_another_format_version(tmp_path):
    s = random_splats()
    path = tmp_path / "future.safetensors"
    tensors = {**s.params(), "mask": s.mask}
    write_safetensors(path, tensors, {"format": "splatopt.splats", "format_version": str(FORMAT_VERSION + 1), "meta": "{}"})
    assert "version" in _assert_refused(path)


@pytest.mark.parametrize("problem", ["missing-v", "bad-shape", "bad-meta", "meta-not-an-object"])
def test_load_refuses_inconsistent_contents(tmp_path, problem):
    s = random_splats()
    tensors = {**s.params(), "mask": s.mask}
    meta = {"format": "splatopt.splats", "format_version": str(FORMAT_VERSION), "meta": "{}"}
    if problem == "missing-v":
        del tensors["v"]
    elif problem == "bad-shape":
        tensors["log_sigma"] = tensors["log_sigma"][:, :2].contiguous()
    elif problem == "bad-meta":
        meta["meta"] = "{not json"
    else:
        meta["meta"] = "null"
    path = tmp_path / "odd.safetensors"
    write_safetensors(path, tensors, meta)
    _assert_refused(path, expect_model_hash="c" * 64)


@pytest.mark.parametrize("name", ["mu", "log_sigma", "weight_logit", "v"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_load_refuses_non_finite_splats(tmp_path, name, value):
    s = random_splats()
    bad = getattr(s, name).clone()
    bad.view(-1)[0] = value  # in slot 0 of prompt 0, always active (inactive slots may hold anything)
    with pytest.raises(ValueError, match=f"not saving .*: {name} holds NaN or inf in active splats of prompt"):
        s.with_params({name: bad}).save(tmp_path / "nan.safetensors")  # save refuses what load would
    path = _written_unchecked(s.with_params({name: bad}), tmp_path / "nan.safetensors")  # a file damaged later
    assert name in _assert_refused(path)


def _written_unchecked(splats: SplatSet, path):
    """``splats`` written as save() writes them, without its check: a file damaged after it was saved."""
    from fixedpos.cache import read_safetensors

    finite = splats.with_params({k: torch.zeros_like(t) for k, t in splats.params().items()})
    tensors, header = read_safetensors(finite.save(path))
    tensors.update({k: t.float() for k, t in splats.params().items()})
    write_safetensors(path, tensors, header)
    return path


def test_load_refuses_splats_fitted_with_another_model(tmp_path):
    path = random_splats(meta={"model": "minilm", "model_hash": "a" * 64}).save(tmp_path / "s.safetensors")
    message = _assert_refused(path, expect_model_hash="b" * 64)
    assert "aaaaaaaaaaaa" in message and "bbbbbbbbbbbb" in message
    SplatSet.load(path, expect_model_hash="a" * 64)  # the right model loads
    unlabelled = random_splats().save(tmp_path / "plain.safetensors")
    SplatSet.load(unlabelled, expect_model_hash="b" * 64)  # a file that names no model is not refused


def test_load_of_a_missing_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        SplatSet.load(tmp_path / "nope.safetensors")


def test_file_metadata_is_json(tmp_path):
    path = random_splats(meta={"texts": ["a"]}).save(tmp_path / "s.safetensors")
    raw = path.read_bytes()
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    assert header["__metadata__"]["format"] == "splatopt.splats"
    assert json.loads(header["__metadata__"]["meta"]) == {"texts": ["a"]}


def test_select_and_cat_name_what_is_wrong():
    from splatopt import GridInit

    field, mask = torch.randn(2, 6, 4), torch.ones(2, 6, dtype=torch.bool)
    s = GridInit()(field, mask, torch.tensor([2, 3]))
    assert torch.equal(s.select(torch.tensor(1)).mu, s.select(1).mu)
    with pytest.raises(IndexError, match=r"select\(5\): this set holds prompts 0..1"):
        s.select(5)
    other = GridInit()(torch.randn(1, 6, 5), mask[:1], torch.tensor([2]))
    with pytest.raises(ValueError, match="different widths d"):
        SplatSet.cat([s, other])
    with pytest.raises(ValueError, match="at least one set"):
        SplatSet.cat([])


def test_select_of_a_numpy_integer_keeps_the_batch_dimension():
    import numpy as np

    s = random_splats()
    assert_same(s.select(np.int64(1)), s.select(1))
    assert_same(s.select(np.int32(-1)), s.select(2))


def test_tensors_on_different_devices_are_refused_by_name():
    s = random_splats()
    with pytest.raises(ValueError, match=r"different devices \(mu on cpu.*v on meta.*\): move them to one device"):
        SplatSet(s.mu, s.log_sigma, s.weight_logit, s.v.to("meta"), s.mask)
    with pytest.raises(ValueError, match="mask on meta"):
        SplatSet(s.mu, s.log_sigma, s.weight_logit, s.v, s.mask.to("meta"))
    assert s.to("meta").mu.device.type == "meta"  # moved together, they agree


def test_a_file_with_nan_in_inactive_slots_loads_and_nan_in_an_active_one_is_refused(tmp_path):
    """Inactive slots may hold anything (a warm start's NaN padding is fitted and saved as it was): a file
    save writes must load again; only an active splat's NaN is damage."""
    s = random_splats()
    off = ~s.mask
    padded = s.with_params({"mu": torch.where(off, math.nan, s.mu), "v": torch.where(off[..., None], math.inf, s.v)})
    back, _ = SplatSet.load(padded.save(tmp_path / "padded.safetensors"))
    torch.testing.assert_close(render(back, 12), render(s, 12))
    broken = s.with_params({"log_sigma": torch.where(s.mask, math.nan, s.log_sigma)})
    with pytest.raises(ValueError, match="log_sigma holds NaN or infinite values in an active splat"):
        SplatSet.load(_written_unchecked(broken, tmp_path / "broken.safetensors"))


def test_splat_parameters_must_be_floating_point_tensors():
    s = random_splats()
    with pytest.raises(TypeError, match="SplatSet.mu must be a tensor, not list: convert it with torch.as_tensor"):
        SplatSet(s.mu.tolist(), s.log_sigma, s.weight_logit, s.v, s.mask)
    with pytest.raises(TypeError, match="SplatSet.v must be floating point, not torch.int64"):
        SplatSet(s.mu, s.log_sigma, s.weight_logit, s.v.long(), s.mask)


def test_every_derived_set_owns_its_meta():
    """select, to, with_params, detach and trimmed shared the original's meta dict (cat copied it): noting
    something in a selected prompt's meta wrote it into the whole fit's splats."""
    s = random_splats(meta={"model": "m"})
    derived = [s.select(0), s.select([1, 2]), s.to(torch.float64), s.with_params({"mu": s.mu + 1}), s.detach(), s.trimmed()]
    for k, sub in enumerate(derived):
        assert sub.meta == {"model": "m"}
        sub.meta[f"note{k}"] = k
    assert s.meta == {"model": "m"}


def test_select_by_list_or_mask_and_with_params_name_what_is_wrong():
    """A list out of range or a bool mask of another length failed with torch's index errors, and a misspelt
    parameter with 'SplatSet.__init__() got an unexpected keyword argument'."""
    s = random_splats(B=3)
    with pytest.raises(IndexError, match=r"select\(\[0, 5\]\): this set holds prompts 0..2"):
        s.select([0, 5])
    with pytest.raises(IndexError, match=r"select: a bool mask needs one entry per prompt \(3\), not \(2,\)"):
        s.select(torch.tensor([True, False]))
    assert torch.equal(s.select([-1]).mu, s.mu[2:]) and torch.equal(s.select([True, False, True]).mu, s.mu[[0, 2]])
    with pytest.raises(ValueError, match=r"with_params: \['sigma'\] are not parameters"):
        s.with_params({"sigma": s.mu})


def test_a_splat_set_prints_as_one_line_of_its_sizes_not_every_tensor():
    """The dataclass repr printed every tensor: pages for one fit's splats in a notebook."""
    B, N, d = 12, 5, 384
    s = SplatSet(torch.zeros(B, N), torch.zeros(B, N), torch.zeros(B, N), torch.zeros(B, N, d, dtype=torch.float32),
                 torch.arange(N)[None].expand(B, N) < torch.arange(1, B + 1)[:, None].clamp(max=N))
    text = repr(s)
    assert "\n" not in text and "tensor(" not in text and len(text) < 200
    assert text.startswith("SplatSet(B=12, N=5 slots, d=384, active per prompt [1, 2, 3, 4, 5, 5, 5, 5, ...], float32 on cpu")


def test_cat_of_float32_and_float64_sets_is_refused_naming_each_and_the_fix():
    """SplatSet.cat of a float32 and a float64 set returned float64 without a word (torch.cat promotes), so
    a float32 pipeline went on in float64, at twice the memory; the files then loaded back as float64."""
    single = random_splats(B=2)
    double = random_splats(B=1).to(torch.float64)
    with pytest.raises(ValueError, match=r"different dtypes \(set 0 is torch.float32, set 1 is torch.float64\).*"
                                         r"\[s.to\(torch.float32\) for s in sets\]"):
        SplatSet.cat([single, double])
    joined = SplatSet.cat([single, double.to(torch.float32)])  # the fix the message gives
    assert joined.mu.dtype == torch.float32 and joined.batch_size == 3
    with pytest.raises(ValueError, match=r"different devices \(set 0 is cpu, set 1 is meta\).*s.to\('cpu'\)"):
        SplatSet.cat([single, single.to("meta")])


def test_parameters_of_mixed_dtypes_are_a_type_error_naming_them():
    """A float64 v beside float32 geometry was accepted and rendered in float32, silently rounding v."""
    s = random_splats()
    with pytest.raises(TypeError, match="must share one dtype, not mu float32, log_sigma float32, weight_logit float32, v float64"):
        SplatSet(s.mu, s.log_sigma, s.weight_logit, s.v.double(), s.mask)


def test_saving_splats_on_the_meta_device_or_with_non_json_meta_names_what_and_where(tmp_path):
    """Splats on the meta device failed with torch's "Tensor.item() cannot be called on meta tensors", and a
    tensor in meta with json's "Object of type Tensor is not JSON serializable": neither named the file or key."""
    path = tmp_path / "s.safetensors"
    with pytest.raises(ValueError, match=r"not saving .*s\.safetensors: \['mu', 'log_sigma', 'weight_logit', 'v'\] lie on the meta device"):
        random_splats().to("meta").save(path)
    with pytest.raises(TypeError, match=r"not saving .*s\.safetensors: meta\['note'\] is not JSON"):
        random_splats(meta={"model": "m", "note": torch.zeros(2)}).save(path)
    assert not path.exists()
