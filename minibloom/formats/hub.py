"""Fetching checkpoints from the Hugging Face Hub with ``huggingface_hub.snapshot_download`` — safetensors only.

Only configs, tokenizer files and ``*.safetensors`` are ever requested (never ``pytorch_model.bin``: minibloom does not
unpickle). A repo id ``org/name`` lands in ``<weights>/org--name`` (``weights/`` of the repository unless
``cache_dir=`` or ``$MINIBLOOM_WEIGHTS`` says otherwise). Offline (``HF_HUB_OFFLINE=1``, or when the network fails)
the local copy is used, then huggingface_hub's own cache (``HF_HOME`` / ``HF_HUB_CACHE``); with neither, a
``MinibloomError`` says how to get the files.
"""

from __future__ import annotations

import contextlib
import os
import re

from ..errors import MinibloomError

ALLOW_PATTERNS = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                  "special_tokens_map.json", "*.safetensors", "model.safetensors.index.json"]
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")


def looks_like_repo_id(s: str) -> bool:
    """``"org/name"``: exactly one slash, hub-legal characters, no ``..``, not a file name like ``x/model.gguf``."""
    return (isinstance(s, str) and bool(_REPO_ID.match(s)) and ".." not in s
            and not s.endswith((".safetensors", ".gguf", ".json", ".bin")))


def local_dir_for(repo_id: str, cache_dir: str | os.PathLike | None = None) -> str:
    """Where ``repo_id`` is stored: ``<cache_dir or weights/>/org--name``."""
    if cache_dir is None:
        from ..paths import weights_dir

        cache_dir = weights_dir()
    return os.path.join(os.fspath(cache_dir), repo_id.replace("/", "--"))


def is_offline() -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) set to a true value."""
    return any(os.environ.get(v, "").strip().upper() in ("1", "ON", "YES", "TRUE")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def is_complete(directory: str) -> bool:
    """A usable checkpoint: config.json plus model.safetensors or a safetensors index."""
    return (os.path.isfile(os.path.join(directory, "config.json"))
            and any(os.path.isfile(os.path.join(directory, n))
                    for n in ("model.safetensors", "model.safetensors.index.json")))


def _network_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean "no network / offline" in the installed huggingface_hub (and its HTTP client)."""
    errs: list[type[BaseException]] = [ConnectionError, TimeoutError]
    from huggingface_hub import errors as hf_errors

    for name in ("LocalEntryNotFoundError", "OfflineModeIsEnabled"):
        if hasattr(hf_errors, name):
            errs.append(getattr(hf_errors, name))
    for mod, names in (("requests", ("ConnectionError", "Timeout")), ("httpx", ("TransportError",))):
        with contextlib.suppress(ImportError):
            m = __import__(mod)
            errs.extend(getattr(m, n) for n in names if hasattr(m, n))
    return tuple(errs)


def _offline_help(repo_id: str, local_dir: str, why: str) -> MinibloomError:
    return MinibloomError(
        f"{repo_id}: {why}, and no local copy was found in {local_dir} or in the Hugging Face cache. Either copy "
        f"the checkpoint directory (config.json, tokenizer.json, *.safetensors) to {local_dir} (or to "
        f"weights/<name> and pass --model <name>), point HF_HOME at a cache that holds it, or run "
        f"'minibloom download {repo_id}' on a machine with network access and copy the folder over.")


def _offline_variable() -> str:
    """The environment variable that switched offline mode on, with its value (``HF_HUB_OFFLINE=1``)."""
    for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(v, "").strip().upper() in ("1", "ON", "YES", "TRUE"):
            return f"{v}={os.environ[v]}"
    return "HF_HUB_OFFLINE"


def _hf_cache_dir() -> str:
    """Where huggingface_hub keeps its cache: HF_HUB_CACHE, else HF_HOME/hub, else the installed version's default."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    try:
        from huggingface_hub import constants

        return str(constants.HF_HUB_CACHE)
    except (ImportError, AttributeError):
        return "$HF_HOME/hub"


def _offline_mode_help(repo_id: str, local_dir: str) -> MinibloomError:
    """Offline mode is on: nothing may be downloaded, so say how to switch it off rather than to download."""
    var = _offline_variable()
    name = var.split("=")[0]
    return MinibloomError(
        f"{repo_id}: offline mode is on ({var}), so nothing is downloaded, and no local copy was found in "
        f"{local_dir} or in the Hugging Face cache ({_hf_cache_dir()}; HF_HOME / HF_HUB_CACHE move it). To "
        f"download it, turn offline mode off: 'unset {name}' (or run '{name}=0 minibloom download {repo_id}'). "
        f"Or copy the checkpoint directory (config.json, tokenizer.json, *.safetensors) to {local_dir}.")


def _cached_snapshot(repo_id: str, revision: str | None) -> str | None:
    """huggingface_hub's own cache (HF_HOME / HF_HUB_CACHE), without touching the network."""
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(repo_id, revision=revision, allow_patterns=ALLOW_PATTERNS, local_files_only=True)
    except Exception:  # LocalEntryNotFoundError and friends: nothing cached
        return None
    return path if path and is_complete(path) else None


def _local(repo_id: str, revision: str | None, local_dir: str) -> str | None:
    if is_complete(local_dir):
        return local_dir
    return _cached_snapshot(repo_id, revision)


def _check_safetensors(repo_id: str, path: str) -> str:
    if not is_complete(path):
        raise MinibloomError(f"{repo_id}: the download has no config.json or no *.safetensors weights (in {path}). "
                             "minibloom loads safetensors only, never pickled pytorch_model.bin files; convert "
                             "the checkpoint once with transformers' save_pretrained(..., safe_serialization=True).")
    return path


def download(repo_id: str, revision: str | None = None, cache_dir: str | os.PathLike | None = None,
             progress: bool | None = None, local_first: bool = True) -> str:
    """Fetch ``repo_id`` (configs, tokenizer, safetensors only) and return its local directory.

    ``local_first``: reuse an already complete local copy without asking the network (what loading does);
    ``minibloom download`` passes False to refresh it. ``progress``: huggingface_hub's byte bars (None: when
    stderr is a terminal, False: never). Offline or without network, falls back to the local copy / HF cache.
    """
    if not looks_like_repo_id(repo_id):
        raise MinibloomError(f"{repo_id!r}: not a hub repo id (expected 'org/name', e.g. 'bigscience/bloom-560m')")
    local_dir = local_dir_for(repo_id, cache_dir)
    if local_first and revision is None and is_complete(local_dir):
        return local_dir
    if is_offline():
        found = _local(repo_id, revision, local_dir)
        if found:
            return found
        raise _offline_mode_help(repo_id, local_dir)
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub import errors as hf_errors
    except ImportError:
        raise MinibloomError("downloading needs huggingface_hub (pip install huggingface_hub)") from None

    kwargs = dict(revision=revision, allow_patterns=ALLOW_PATTERNS, local_dir=local_dir)
    with _progress_bars(progress):
        try:
            path = snapshot_download(repo_id, **kwargs)
        except getattr(hf_errors, "GatedRepoError", ()) as e:
            raise MinibloomError(f"{repo_id}: the repo is gated; accept its licence on the hub and set HF_TOKEN "
                                 f"({e.__class__.__name__})") from None
        except hf_errors.RepositoryNotFoundError:
            raise MinibloomError(f"{repo_id}: no such model on the Hugging Face Hub (or it is private: log in "
                                 "with 'hf auth login' / set HF_TOKEN)") from None
        except getattr(hf_errors, "RevisionNotFoundError", ()):
            raise MinibloomError(f"{repo_id}: revision {revision!r} does not exist") from None
        except _network_errors() as e:
            found = _local(repo_id, revision, local_dir)
            if found:
                return found
            raise _offline_help(repo_id, local_dir, f"the hub cannot be reached ({e.__class__.__name__})") from None
    return _check_safetensors(repo_id, os.fspath(path))


@contextlib.contextmanager
def _progress_bars(progress: bool | None):
    """huggingface_hub shows tqdm bars by default; ``progress=False`` hides them for this call."""
    if progress is not False:
        yield
        return
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was = are_progress_bars_disabled()
    disable_progress_bars()
    try:
        yield
    finally:
        if not was:
            enable_progress_bars()
