"""Hub loading, offline: huggingface_hub.snapshot_download is replaced at its boundary (no network in tests)."""

from __future__ import annotations

import os

import huggingface_hub
import numpy as np
import pytest
from huggingface_hub import errors as hf_errors

import minibloom
from minibloom.formats import hub
from minibloom.errors import MinibloomError
import tiny_tokenizer

REPO = "someorg/tiny-bloom"


@pytest.fixture
def weights(tmp_path, monkeypatch):
    d = tmp_path / "weights"
    d.mkdir()
    monkeypatch.setenv("MINIBLOOM_WEIGHTS", str(d))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))  # never the machine's real cache
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_home" / "hub"))
    return d


class FakeHub:
    """Records every snapshot_download call; writes a tiny checkpoint where the real one would."""

    def __init__(self, error=None, pickle_only=False):
        self.calls = []
        self.error = error
        self.pickle_only = pickle_only

    def __call__(self, repo_id, **kw):
        self.calls.append((repo_id, kw))
        if kw.get("local_files_only"):
            raise hf_errors.LocalEntryNotFoundError("nothing cached")
        if self.error is not None:
            raise self.error
        local = kw["local_dir"]
        if self.pickle_only:
            os.makedirs(local, exist_ok=True)
            open(os.path.join(local, "config.json"), "w").write("{}")
        else:
            tiny_tokenizer.write_checkpoint(local, seed=1)
        return str(local)


@pytest.mark.parametrize("s,ok", [("bigscience/bloom-560m", True), ("cmarkea/bloomz-560m-sft-chat", True),
                                  ("a/b.c_d-e", True), ("bloom-560m", False), ("a/b/c", False),
                                  ("../x", False), ("./model", False), ("x/model.gguf", False), ("", False),
                                  ("org/", False)])
def test_looks_like_repo_id(s, ok):
    assert hub.looks_like_repo_id(s) is ok


def test_download_asks_for_safetensors_only_and_loads(weights, monkeypatch):
    fake = FakeHub()
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    m = minibloom.load(REPO)
    assert len(fake.calls) == 1
    repo_id, kw = fake.calls[0]
    assert repo_id == REPO
    assert kw["local_dir"] == os.path.join(str(weights), "someorg--tiny-bloom")
    assert set(kw["allow_patterns"]) == {"config.json", "generation_config.json", "tokenizer.json",
                                         "tokenizer_config.json", "special_tokens_map.json", "*.safetensors",
                                         "model.safetensors.index.json"}
    assert not any(p.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt")) or p == "*" for p in kw["allow_patterns"])
    assert m.tokenizer is not None and m.config.n_layer == 2
    assert m.path == kw["local_dir"]
    # logits equal a load from the directory itself
    ids = np.array([[5, 6, 7]])
    np.testing.assert_array_equal(m(ids), minibloom.load(kw["local_dir"])(ids))


def test_second_load_uses_the_local_copy_without_network(weights, monkeypatch):
    fake = FakeHub()
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    minibloom.load(REPO)
    minibloom.load(REPO)
    assert len(fake.calls) == 1
    hub.download(REPO, local_first=False, progress=False)  # `minibloom download` refreshes
    assert len(fake.calls) == 2


def test_revision_and_cache_dir_are_passed(tmp_path, weights, monkeypatch):
    fake = FakeHub()
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    path = hub.download(REPO, revision="abc123", cache_dir=tmp_path / "elsewhere", progress=False)
    assert fake.calls[0][1]["revision"] == "abc123"
    assert path == os.path.join(str(tmp_path / "elsewhere"), "someorg--tiny-bloom")


def test_offline_env_uses_local_copy_and_never_calls_the_network(weights, monkeypatch):
    tiny_tokenizer.write_checkpoint(weights / "someorg--tiny-bloom")
    fake = FakeHub()
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.download(REPO, local_first=False) == str(weights / "someorg--tiny-bloom")
    assert all(kw.get("local_files_only") for _, kw in fake.calls)


def test_offline_env_without_a_copy_explains_what_to_do(weights, monkeypatch):
    monkeypatch.setattr(huggingface_hub, "snapshot_download", FakeHub())
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MinibloomError) as e:
        minibloom.load(REPO)
    msg = str(e.value)
    assert "offline mode is on (HF_HUB_OFFLINE=1)" in msg and "someorg--tiny-bloom" in msg and "HF_HOME" in msg
    # the advice turns offline mode off (a plain `minibloom download` would fail the same way) and names the cache
    assert "unset HF_HUB_OFFLINE" in msg and "HF_HUB_OFFLINE=0 minibloom download someorg/tiny-bloom" in msg
    assert os.environ["HF_HUB_CACHE"] in msg


def test_offline_mode_named_by_transformers_offline_is_reported_as_such(weights, monkeypatch):
    monkeypatch.setattr(huggingface_hub, "snapshot_download", FakeHub())
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "yes")
    with pytest.raises(MinibloomError, match=r"offline mode is on \(TRANSFORMERS_OFFLINE=yes\)") as e:
        hub.download(REPO)
    assert "unset TRANSFORMERS_OFFLINE" in str(e.value)


def test_offline_env_uses_the_hf_cache(weights, tmp_path, monkeypatch):
    cached = tiny_tokenizer.write_checkpoint(tmp_path / "hf_home" / "snapshot")

    def cache_only(repo_id, **kw):
        assert kw.get("local_files_only"), "offline: only the cache may be asked"
        return cached

    monkeypatch.setattr(huggingface_hub, "snapshot_download", cache_only)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.download(REPO) == cached


@pytest.mark.parametrize("error", [
    hf_errors.LocalEntryNotFoundError("Cannot find the requested files in the disk cache and outgoing traffic "
                                      "has been disabled"),
    hf_errors.OfflineModeIsEnabled("offline"),
    ConnectionError("Failed to establish a new connection"),
], ids=["local-entry-not-found", "offline-mode", "connection-error"])
def test_network_failure_falls_back_or_explains(weights, monkeypatch, error):
    monkeypatch.setattr(huggingface_hub, "snapshot_download", FakeHub(error=error))
    with pytest.raises(MinibloomError, match="cannot be reached") as e:
        hub.download(REPO, progress=False)
    assert "minibloom download" in str(e.value)
    # with a local copy the same failure is harmless
    tiny_tokenizer.write_checkpoint(weights / "someorg--tiny-bloom")
    assert hub.download(REPO, local_first=False, progress=False) == str(weights / "someorg--tiny-bloom")


def test_pickle_only_repo_is_refused(weights, monkeypatch):
    monkeypatch.setattr(huggingface_hub, "snapshot_download", FakeHub(pickle_only=True))
    with pytest.raises(MinibloomError, match="safetensors"):
        hub.download(REPO, progress=False)


def test_missing_repo_is_a_clear_error(weights, monkeypatch):
    class Resp:
        status_code = 404
        headers = {}
        request = None
        url = "https://huggingface.co/api/models/someorg/tiny-bloom"

    try:
        err = hf_errors.RepositoryNotFoundError("404 Client Error", response=Resp())
    except TypeError:
        pytest.skip("this huggingface_hub builds RepositoryNotFoundError differently")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", FakeHub(error=err))
    with pytest.raises(MinibloomError, match="no such model"):
        hub.download(REPO, progress=False)


def test_not_a_repo_id_is_a_clear_error(weights):
    with pytest.raises(MinibloomError, match="no such file or directory"):
        minibloom.load("no-such-model")


@pytest.mark.parametrize("name", ["weights/nonexistent", "./x", "../x", "/abs/x", "x.safetensors", "x.gguf",
                                  "org/model.safetensors", "~/no-such-minibloom-model"])
def test_a_local_looking_path_that_does_not_exist_is_a_missing_path_not_a_hub_id(weights, tmp_path, monkeypatch,
                                                                                 name):
    def no_network(*a, **kw):
        raise AssertionError("a local-looking path must never reach the hub")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    monkeypatch.chdir(tmp_path)  # tmp_path holds weights/, so "weights/nonexistent" names a local folder
    with pytest.raises(MinibloomError, match=f"^{name}: no such file or directory") as e:
        minibloom.load(name)
    assert "minibloom download" not in str(e.value)


def test_a_bare_safetensors_file_name_without_a_config_names_the_real_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x.safetensors").write_bytes(b"")
    with pytest.raises(MinibloomError, match="no config.json") as e:
        minibloom.load("x.safetensors")
    assert str(e.value).startswith(f"{tmp_path}: no config.json")
