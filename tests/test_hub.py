"""Checkpoints through the three hubs: a local folder, S3 (moto server) and a Hugging Face Hub server.

The Hugging Face side runs the real ``huggingface_hub`` client against ``fake_hf_hub.FakeHub``, a local
HTTP server speaking the Hub API; S3 runs boto3 against the session's moto server.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import boto3
import numpy as np
import pytest
from huggingface_hub import constants

from fake_hf_hub import FakeHub
from marketplace_reco.models import CheckpointError, CheckpointNotFoundError, HubError, create_model, load_model
from marketplace_reco.models._hub import (
    HuggingFaceHub,
    LocalHub,
    S3Hub,
    hub_for,
    pull_checkpoint,
    push_checkpoint,
    resolve_checkpoint,
)
from marketplace_reco.models.hog_svm import HogSvmClassifier
from marketplace_reco.training.hog_svm import fit

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"

HF_TOKEN = "hf_test_token"


@pytest.fixture(autouse=True)
def _local_folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Checkpoints and download cache in the test's own folders."""
    monkeypatch.setenv("MARKETPLACE_CHECKPOINTS", str(tmp_path / "checkpoints"))
    monkeypatch.setenv("MARKETPLACE_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def hf_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    """The fake Hub, with the standard variables pointing the client (and subprocesses) at it."""
    with FakeHub(token=HF_TOKEN) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        monkeypatch.setenv("HF_TOKEN", HF_TOKEN)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
        monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
        # The fake server speaks LFS, not Xet; the client reads this switch at import, hence both.
        monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        yield hub


def _model(seed: int) -> HogSvmClassifier:
    """A small hog-svm trained on random features: different seeds give different arrays and predictions."""
    model = create_model("hog-svm", classes=["a", "b", "c"], preprocessing={"image_size": 32})
    assert isinstance(model, HogSvmClassifier)
    rng = np.random.default_rng(seed)
    fit(model, rng.normal(size=(30, model.n_features)), np.arange(30) % 3)
    model.metrics = {"accuracy": 0.5 + seed / 100, "macro_f1": 0.5, "split": "test", "n_samples": 3}
    return model


def _probe(model: object) -> np.ndarray:
    """The model's probabilities for fixed features: equal only for models with equal arrays."""
    assert isinstance(model, HogSvmClassifier)
    return model.predict_proba_features(np.random.default_rng(99).normal(size=(5, model.n_features)))


def _hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir() if p.is_file()}


@pytest.fixture
def folders(tmp_path: Path) -> tuple[Path, Path]:
    """Two saved checkpoints with different arrays: what revisions main and v2 will hold."""
    _model(1).save_pretrained(tmp_path / "first")
    _model(2).save_pretrained(tmp_path / "second")
    return tmp_path / "first", tmp_path / "second"


# ---- choosing the hub --------------------------------------------------------------------------
def test_target_rules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "exports" / "org").mkdir(parents=True)
    hub, name = hub_for("s3://bucket/team/models/hog-svm")
    assert isinstance(hub, S3Hub) and (hub.bucket, hub.prefix, name) == ("bucket", "team/models", "hog-svm")
    hub, name = hub_for("hog-svm")
    assert isinstance(hub, LocalHub) and hub.root == tmp_path / "checkpoints" and name == "hog-svm"
    for target in ("file://" + str(tmp_path / "x" / "m"), str(tmp_path / "x" / "m"), "./x/m"):
        hub, name = hub_for(target)
        assert isinstance(hub, LocalHub) and hub.folder(name) == tmp_path / "x" / "m", target
    hub, name = hub_for("exports/org")  # an existing relative folder wins over a repo id
    assert isinstance(hub, LocalHub) and hub.folder(name, "v2") == tmp_path / "exports" / "org@v2"
    hub, name = hub_for("exports/models/m")
    assert isinstance(hub, LocalHub) and hub.folder(name) == tmp_path / "exports" / "models" / "m"
    hub, name = hub_for("my-org/hog-svm")
    assert isinstance(hub, HuggingFaceHub) and name == "my-org/hog-svm"
    with pytest.raises(HubError, match="must name a bucket and a checkpoint"):
        hub_for("s3://bucket-only")
    with pytest.raises(HubError, match="invalid revision '../x'"):
        LocalHub(tmp_path).folder("m", "../x")


# ---- local folder ------------------------------------------------------------------------------
def test_local_round_trip_with_revisions(folders: tuple[Path, Path], tmp_path: Path) -> None:
    first, second = folders
    revision = push_checkpoint(first, "hog-svm")
    push_checkpoint(second, "hog-svm", revision="v2")
    assert (tmp_path / "checkpoints" / "hog-svm" / "config.json").is_file()
    assert (tmp_path / "checkpoints" / "hog-svm@v2" / "config.json").is_file()

    main = load_model("hog-svm")
    assert main.source["revision"] == revision and len(revision) == 12
    np.testing.assert_array_equal(_probe(main), _probe(_model(1)))
    np.testing.assert_array_equal(_probe(load_model("hog-svm", revision="v2")), _probe(_model(2)))

    pulled = pull_checkpoint("hog-svm", tmp_path / "pulled", revision="v2")
    assert _hashes(pulled) == _hashes(second)
    with pytest.raises(CheckpointNotFoundError, match=r"hog-svm@v3: no config\.json there"):
        resolve_checkpoint("hog-svm", revision="v3")


def test_pushed_checkpoints_get_the_umask_permissions(folders: tuple[Path, Path], tmp_path: Path) -> None:
    previous = os.umask(0o022)
    try:
        push_checkpoint(folders[0], "shared")
    finally:
        os.umask(previous)
    folder = tmp_path / "checkpoints" / "shared"
    # Readable by others (a server running as another user, a Docker build): not mkdtemp's 0700.
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755
    assert {stat.S_IMODE(path.stat().st_mode) for path in folder.iterdir()} == {0o644}


def test_push_refuses_a_folder_that_is_not_a_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text(json.dumps({"model_type": "hog-svm", "format_version": 1}))
    with pytest.raises(CheckpointError, match=r"half/model\.safetensors: missing"):
        push_checkpoint(tmp_path / "half", "elsewhere")


def test_model_push_to_hub_goes_through_the_hubs(tmp_path: Path) -> None:
    model = _model(3)
    model.push_to_hub(str(tmp_path / "exported"), revision="v1")
    loaded = load_model(str(tmp_path / "exported"), revision="v1")
    np.testing.assert_array_equal(_probe(loaded), _probe(model))
    assert loaded.metrics["accuracy"] == pytest.approx(0.53)


# ---- S3 ----------------------------------------------------------------------------------------
def test_s3_round_trip_with_revisions(s3_bucket: str, folders: tuple[Path, Path], tmp_path: Path) -> None:
    first, second = folders
    target = f"s3://{s3_bucket}/team/hog-svm"
    assert push_checkpoint(first, target) == "main"
    assert push_checkpoint(second, target, revision="v2") == "v2"
    keys = {o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=s3_bucket)["Contents"]}
    assert {"team/hog-svm/main/model.safetensors", "team/hog-svm/v2/.manifest.json"} <= keys

    main = load_model(target)
    assert main.source["revision"] == "main"
    np.testing.assert_array_equal(_probe(main), _probe(_model(1)))
    v2 = load_model(target, revision="v2")
    np.testing.assert_array_equal(_probe(v2), _probe(_model(2)))
    assert Path(v2.source["folder"]).is_relative_to(tmp_path / "cache" / "checkpoints" / "s3")

    assert _hashes(pull_checkpoint(target, tmp_path / "pulled", revision="v2")) == _hashes(second)
    with pytest.raises(CheckpointNotFoundError, match=rf"no checkpoint at s3://{s3_bucket}/team/hog-svm/v9"):
        load_model(target, revision="v9")


def test_s3_pull_detects_a_damaged_object(s3_bucket: str, folders: tuple[Path, Path], tmp_path: Path) -> None:
    target = f"s3://{s3_bucket}/hog-svm"
    push_checkpoint(folders[0], target)
    key = "hog-svm/main/model.safetensors"
    client = boto3.client("s3")
    damaged = bytearray(client.get_object(Bucket=s3_bucket, Key=key)["Body"].read())
    damaged[-1] ^= 0xFF
    client.put_object(Bucket=s3_bucket, Key=key, Body=bytes(damaged))
    with pytest.raises(HubError, match=rf"s3://{s3_bucket}/{key}: download does not match the manifest"):
        pull_checkpoint(target, tmp_path / "pulled")
    assert not (tmp_path / "pulled").exists()


def test_s3_missing_bucket_is_a_clear_error(s3_endpoint: str, folders: tuple[Path, Path]) -> None:
    with pytest.raises(HubError,
                       match="upload to s3://no-such-bucket-x/m/main: bucket 'no-such-bucket-x' does not exist"):
        push_checkpoint(folders[0], "s3://no-such-bucket-x/m")


# ---- Hugging Face Hub --------------------------------------------------------------------------
def test_hugging_face_round_trip_with_revisions(hf_hub: FakeHub, folders: tuple[Path, Path], tmp_path: Path) -> None:
    first, second = folders
    main_sha = push_checkpoint(first, "my-org/hog-svm")
    v2_sha = push_checkpoint(second, "my-org/hog-svm", revision="v2")
    repo = hf_hub.repos["my-org/hog-svm"]
    assert repo.branches["main"] == main_sha and repo.branches["v2"] == v2_sha and main_sha != v2_sha
    assert repo.commits[main_sha]["model.safetensors"].lfs and not repo.commits[main_sha]["config.json"].lfs

    main = load_model("my-org/hog-svm")
    assert main.source["revision"] == main_sha
    np.testing.assert_array_equal(_probe(main), _probe(_model(1)))
    v2 = load_model("my-org/hog-svm", revision="v2")
    assert v2.source["revision"] == v2_sha
    np.testing.assert_array_equal(_probe(v2), _probe(_model(2)))
    np.testing.assert_array_equal(_probe(load_model("my-org/hog-svm", revision=main_sha)), _probe(_model(1)))

    pulled = pull_checkpoint("my-org/hog-svm", tmp_path / "pulled", revision="v2")
    assert _hashes(pulled) == _hashes(second)
    with pytest.raises(CheckpointNotFoundError, match="my-org/hog-svm .revision v9.: no such revision"):
        load_model("my-org/hog-svm", revision="v9")
    with pytest.raises(CheckpointNotFoundError, match="my-org/nothing .revision main.: no such repository"):
        load_model("my-org/nothing")


def test_hugging_face_pull_detects_a_damaged_download(hf_hub: FakeHub, folders: tuple[Path, Path],
                                                      tmp_path: Path) -> None:
    push_checkpoint(folders[0], "my-org/hog-svm")
    hf_hub.corrupt("my-org/hog-svm", "main", "model.safetensors")
    with pytest.raises(HubError, match=r"model\.safetensors: sha256 \w+, the Hub says \w+"):
        pull_checkpoint("my-org/hog-svm", tmp_path / "pulled")
    assert not (tmp_path / "pulled").exists()


def test_hugging_face_push_needs_the_token(hf_hub: FakeHub, folders: tuple[Path, Path],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "wrong")
    with pytest.raises(HubError, match=rf"{hf_hub.endpoint}/my-org/hog-svm .revision main.: .*401"):
        push_checkpoint(folders[0], "my-org/hog-svm")


def test_model_push_to_hub_reaches_s3_and_hugging_face(hf_hub: FakeHub, s3_bucket: str) -> None:
    model = _model(4)
    sha = model.push_to_hub("my-org/pushed", revision="candidate")
    assert hf_hub.repos["my-org/pushed"].branches["candidate"] == sha
    assert model.push_to_hub(f"s3://{s3_bucket}/pushed") == "main"
    for target, revision in (("my-org/pushed", "candidate"), (f"s3://{s3_bucket}/pushed", None)):
        np.testing.assert_array_equal(_probe(load_model(target, revision=revision)), _probe(model))


# ---- the scripts ----------------------------------------------------------------------------
def _script(name: str, *args: str) -> tuple[int, str, str]:
    """Run a script as a user does; the environment (hub endpoints, credentials, folders) is the test's."""
    result = subprocess.run([sys.executable, str(SCRIPTS / name), *args], capture_output=True, text=True,
                            timeout=300, check=False)
    return result.returncode, result.stdout, result.stderr


def test_push_and_pull_scripts_move_a_checkpoint_across_hubs(hf_hub: FakeHub, s3_bucket: str,
                                                             folders: tuple[Path, Path], tmp_path: Path) -> None:
    s3_target = f"s3://{s3_bucket}/models/hog-svm"
    push_checkpoint(folders[1], s3_target, revision="v2")
    # S3 -> Hugging Face in one push, then Hugging Face -> a local folder.
    code, out, err = _script("push_model.py", s3_target, "my-org/hog-svm", "--source-revision", "v2",
                             "--revision", "v2")
    assert code == 0, err
    assert hf_hub.repos["my-org/hog-svm"].branches["v2"] in out
    code, out, err = _script("pull_model.py", "my-org/hog-svm", str(tmp_path / "pulled"), "--revision", "v2")
    assert code == 0, err
    assert _hashes(tmp_path / "pulled") == _hashes(folders[1])

    code, out, err = _script("pull_model.py", s3_target, str(tmp_path / "nothing"), "--revision", "v7")
    assert code == 1
    assert err.strip() == f"error: no checkpoint at {s3_target}/v7: .manifest.json missing"
