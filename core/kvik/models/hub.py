"""Models named by a Hugging Face Hub id: download (or find in the cache) a local snapshot.

``LLM("Qwen/Qwen3-0.6B")`` and ``kvik serve --model org/name`` come here when the
name is not a local path. ``huggingface_hub`` does the work, so its settings apply
as everywhere else: ``HF_TOKEN`` for private and gated repos, ``HF_HOME`` /
``HF_HUB_CACHE`` (or ``download_dir``) for the cache, ``HF_HUB_OFFLINE=1`` to use
the cache only, ``HF_ENDPOINT`` for a mirror. Only what kvik reads comes down: the
config, safetensors weights and tokenizer files, not other formats a repo carries.
"""

from __future__ import annotations

import logging
import os
import re

logger = logging.getLogger(__name__)

# "org/name": what the Hub calls a repo id (letters, digits, '-', '_', '.'; 96 characters at most).
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")

# Files kvik reads from a checkpoint repo (weights in other formats are left on the Hub).
MODEL_FILES = (
    "*.json",  # config, generation config, safetensors index, tokenizer config
    "*.safetensors",
    "tokenizer*",
    "*.model",  # sentencepiece
    "*.tiktoken",
    "vocab*",
    "merges.txt",
    "*.jinja",  # chat templates kept beside the tokenizer
)
TOKENIZER_FILES = ("tokenizer*", "special_tokens_map.json", "*.model", "*.tiktoken", "vocab*", "merges.txt", "*.jinja",
                   "config.json")  # fmt: skip


def looks_like_hub_id(name: str) -> bool:
    """Whether ``name`` has the shape of a Hub repo id (``org/name``) rather than a path."""
    return bool(_HUB_ID.match(name)) and not name.startswith((".", "/", "~")) and ".." not in name


def resolve_model_path(
    name: str,
    revision: str | None = None,
    download_dir: str | None = None,
    patterns: tuple[str, ...] = MODEL_FILES,
) -> str:
    """A local path for ``name``: itself when it exists on disk, else a downloaded Hub snapshot.

    Names that are neither an existing path nor a Hub id come back unchanged, so
    the format lookup can say the path does not exist. Raises ``ValueError``
    with advice when the Hub cannot provide the repo.
    """
    if os.path.exists(name) or not looks_like_hub_id(name):
        return name
    return download_snapshot(name, revision, download_dir, patterns)


def download_snapshot(
    repo_id: str, revision: str | None, download_dir: str | None, patterns: tuple[str, ...] = MODEL_FILES
) -> str:
    """Download (or reuse from the cache) ``repo_id``'s files matching ``patterns``; return the folder."""
    try:
        from huggingface_hub import errors as hub_errors
        from huggingface_hub import snapshot_download
    except ImportError as exc:  # pragma: no cover - transformers depends on huggingface_hub
        raise ValueError(f"{repo_id!r} looks like a Hugging Face Hub id; loading it needs huggingface_hub") from exc
    where = f"{repo_id!r}" + (f" at revision {revision!r}" if revision else "")
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    logger.info("fetching %s from the Hugging Face Hub%s", where, " cache (HF_HUB_OFFLINE)" if offline else "")
    try:
        # The endpoint and offline switch are read now, not when huggingface_hub was imported.
        path = snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=download_dir,
            allow_patterns=list(patterns),
            endpoint=os.environ.get("HF_ENDPOINT") or None,
            local_files_only=offline,
        )
    except hub_errors.GatedRepoError as exc:
        raise ValueError(
            f"model {where} is gated on the Hugging Face Hub: accept its terms on the model's page, then set "
            f"HF_TOKEN to a token of that account ({_reason(exc)})"
        ) from exc
    except hub_errors.RevisionNotFoundError as exc:
        raise ValueError(f"model {repo_id!r} has no revision {revision!r} on the Hub ({_reason(exc)})") from exc
    except hub_errors.RepositoryNotFoundError as exc:
        raise ValueError(
            f"no model {repo_id!r} on the Hugging Face Hub, or it is private (set HF_TOKEN for private repos); "
            f"a local checkpoint needs an existing path ({_reason(exc)})"
        ) from exc
    except hub_errors.LocalEntryNotFoundError as exc:
        hint = (
            "HF_HUB_OFFLINE is set and it is not in the cache: run once online, or unset HF_HUB_OFFLINE"
            if offline
            else "the Hub could not be reached and it is not in the cache"
        )
        raise ValueError(f"model {where}: {hint} ({_reason(exc)})") from exc
    except hub_errors.HfHubHTTPError as exc:
        raise ValueError(f"downloading model {where} from the Hub failed: {_reason(exc)}") from exc
    except OSError as exc:  # the network or the cache folder
        raise ValueError(f"downloading model {where} failed: {type(exc).__name__}: {exc}") from exc
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(
            f"model {where} on the Hub has no config.json: kvik loads Hugging Face checkpoints "
            "(config.json + *.safetensors); for a GGUF file, download it and pass its path"
        )
    return str(path)


def _reason(exc: BaseException) -> str:
    """The first line of a huggingface_hub error (its later lines repeat the URL and request id)."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
