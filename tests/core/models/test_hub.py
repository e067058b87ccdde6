"""Models named by Hub id: downloaded from a local imitation of the Hub, then served from the cache."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from kvik.models.hub import looks_like_hub_id, resolve_model_path

from .fake_hub import COMMIT, serve_hub


@pytest.fixture
def repo(tiny_model_dir, tmp_path) -> Path:  # type: ignore[no-untyped-def]
    """A tiny checkpoint folder plus a file kvik never reads (left on the Hub)."""
    folder = tmp_path / "repo"
    shutil.copytree(tiny_model_dir("llama"), folder)
    (folder / "pytorch_model.bin").write_bytes(b"\0" * 64)
    return folder


@pytest.fixture
def hub_env(monkeypatch, tmp_path):  # type: ignore[no-untyped-def]
    """Point huggingface_hub at a fresh cache, with no token and online."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    return tmp_path / "cache"


def test_hub_ids_and_paths() -> None:
    assert looks_like_hub_id("Qwen/Qwen3-0.6B") and looks_like_hub_id("meta-llama/Llama-3.1-8B-Instruct")
    for name in ("./model", "/models/x", "model.gguf", "a/b/c", "../x/y", "~/x", "org/"):
        assert not looks_like_hub_id(name), name
    assert resolve_model_path("./nope") == "./nope"  # not a Hub id: the format lookup reports the missing path


def test_download_only_what_kvik_reads_then_offline_from_the_cache(repo, hub_env, monkeypatch, tmp_path) -> None:
    with serve_hub({"kvik-test/tiny-llama": repo}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        path = Path(resolve_model_path("kvik-test/tiny-llama", download_dir=str(hub_env)))
        assert (path / "config.json").is_file() and list(path.glob("*.safetensors"))
        assert not (path / "pytorch_model.bin").exists()  # not a format kvik loads
        assert COMMIT in str(path)
        assert not any("pytorch_model.bin" in r for r in hub.requests)
    # The server is gone: offline mode finds the snapshot in the cache.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert Path(resolve_model_path("kvik-test/tiny-llama", download_dir=str(hub_env))) == path
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE is set and it is not in the cache"):
        resolve_model_path("kvik-test/other", download_dir=str(hub_env))


def test_llm_runs_a_hub_model_identically_to_its_local_copy(repo, hub_env, monkeypatch) -> None:
    import kvik

    params = kvik.SamplingParams(temperature=0.0, max_tokens=6)
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    local = kvik.LLM(str(repo), device="cpu", num_kv_blocks=64, max_model_len=64)
    expected = [o.outputs[0].token_ids for o in local.generate(prompts, params)]
    with serve_hub({"kvik-test/tiny-llama": repo}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        llm = kvik.LLM("kvik-test/tiny-llama", device="cpu", num_kv_blocks=64, max_model_len=64,
                       download_dir=str(hub_env), revision="main")  # fmt: skip
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, params)] == expected
    assert llm.llm_engine.config.model_name == "kvik-test/tiny-llama"
    assert llm.llm_engine.config.model != "kvik-test/tiny-llama"  # the local snapshot


def test_hub_errors_are_clear(repo, hub_env, monkeypatch) -> None:
    with serve_hub({"kvik-test/tiny-llama": repo, "kvik-test/gated": repo}, gated={"kvik-test/gated": "s3cret"}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        cache = str(hub_env)
        with pytest.raises(ValueError, match=r"is gated on the Hugging Face Hub: accept its terms.*HF_TOKEN"):
            resolve_model_path("kvik-test/gated", download_dir=cache)
        monkeypatch.setenv("HF_TOKEN", "s3cret")
        assert (Path(resolve_model_path("kvik-test/gated", download_dir=cache)) / "config.json").is_file()
        with pytest.raises(ValueError, match="no model 'kvik-test/missing' on the Hugging Face Hub, or it is private"):
            resolve_model_path("kvik-test/missing", download_dir=cache)
        with pytest.raises(ValueError, match="has no revision 'v9'"):
            resolve_model_path("kvik-test/tiny-llama", revision="v9", download_dir=cache)
        (repo / "config.json").unlink()  # a repo without a checkpoint config (e.g. GGUF files only)
        with pytest.raises(ValueError, match=r"has no config\.json: kvik loads Hugging Face checkpoints"):
            resolve_model_path("kvik-test/tiny-llama", revision=COMMIT, download_dir=str(hub_env / "fresh"))
