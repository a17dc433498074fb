"""Where a checkpoint comes from (directory, file, hub id, the built-in default) and what it holds: every format
reader returns the same plain data (``Loaded``: config, parameters, tokenizer); ``minibloom.bloom.load`` alone builds
the ``Bloom``."""

from __future__ import annotations

import os

from ..backend import Backend
from ..config import DTYPES, BloomConfig
from ..errors import MinibloomError
from ..paths import default_model_path, weights_dir
from .weights import Checkpoint, Loaded, read_params, safetensors_files, tree_map


def resolve(path_or_repo_id, *, revision=None, cache_dir=None, progress=None) -> str:
    """A local path for ``path_or_repo_id``: an existing file or directory, a name under ``weights/``, or a hub id."""
    if path_or_repo_id is None:
        path = default_model_path()
        if not os.path.isdir(path):
            raise MinibloomError(f"default model: {path} is missing (is this a full clone of minibloom?)")
        return path
    p = os.fspath(path_or_repo_id)
    if os.path.exists(p):
        return p
    if p.startswith("~") and os.path.exists(os.path.expanduser(p)):  # a quoted ~ the shell did not expand
        return os.path.expanduser(p)
    local = os.path.join(weights_dir(), p)
    if os.path.isdir(local):
        return local
    from .hub import download, looks_like_repo_id

    if looks_like_local_path(p):
        raise MinibloomError(f"{p}: no such file or directory{_nearest_existing(p)}")
    if looks_like_repo_id(p):
        return download(p, revision=revision, cache_dir=cache_dir, progress=progress)
    raise MinibloomError(f"{p}: no such file or directory, and not a hub repo id like 'bigscience/bloom-560m'")


# File extensions of checkpoint and config files: a name ending in one is a file, never a hub repo id.
FILE_EXTENSIONS = (".safetensors", ".gguf", ".json", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".npz", ".msgpack")


def looks_like_local_path(p: str) -> bool:
    """A path the user meant as a local one: it starts with ``.``, ``/`` or ``~``, ends with a file extension, or
    its first component is an existing directory (``weights/nonexistent`` where ``./weights`` exists)."""
    if p.startswith((".", "/", "~", os.sep)) or os.path.isabs(p) or p.lower().endswith(FILE_EXTENSIONS):
        return True
    parts = p.replace(os.sep, "/").split("/")
    return len(parts) > 1 and os.path.isdir(parts[0])


def _nearest_existing(p: str) -> str:
    """``" (/abs/dir exists; is the name spelled right?)"`` for the deepest existing parent of ``p`` (nothing when
    that is the file system root), so a typo in the last part of a path is easy to spot."""
    parent = os.path.dirname(os.path.abspath(os.path.expanduser(p)))
    while parent and not os.path.isdir(parent):
        up = os.path.dirname(parent)
        if up == parent:
            return ""
        parent = up
    root = os.path.dirname(parent) == parent
    return "" if root else f" ({parent} exists; is the name spelled right?)"


def checkpoint_parts(path: str) -> tuple[str, list[str] | None, str]:
    """``(directory, files, config.json path)`` of a safetensors checkpoint given as a directory or as one
    ``.safetensors`` file (``files`` is None for a directory: its index or model.safetensors decides)."""
    if os.path.isfile(path):
        if not path.endswith(".safetensors"):
            raise MinibloomError(f"{path}: expected a checkpoint directory, a .safetensors file or a .gguf file")
        # a bare file name has no dirname: its directory is the current one, named in full in messages
        directory, files = os.path.dirname(os.path.abspath(path)), [path]
    else:
        directory, files = path, None
    config_path = os.path.join(directory, "config.json")
    if not os.path.isfile(config_path):
        raise MinibloomError(f"{directory}: no config.json (a BLOOM checkpoint directory needs one)")
    return directory, files, config_path


def read_checkpoint(path_or_repo_id, *, dtype: str, backend: Backend, revision=None, cache_dir=None,
                    progress=None, low_memory: bool = False, keep_quantized: bool = False,
                    max_memory: int | None = None) -> Loaded:
    """Config, parameters (on ``backend``, in ``dtype``) and tokenizer of any checkpoint minibloom reads.
    ``max_memory``: the low-memory mode's budget in bytes (None: its default)."""
    path = resolve(path_or_repo_id, revision=revision, cache_dir=cache_dir, progress=progress)
    if os.path.isfile(path) and path.endswith(".gguf"):
        from .gguf.reader import read_gguf_checkpoint

        if max_memory is not None:
            raise MinibloomError(f"max_memory: only safetensors checkpoints take a memory budget, not {path}")
        return read_gguf_checkpoint(path, dtype=dtype, backend=backend, progress=progress,
                                    keep_quantized=keep_quantized)
    if keep_quantized:
        raise MinibloomError(f"keep_quantized: only .gguf files keep their quantized blocks, not {path}")
    directory, files, config_path = checkpoint_parts(path)
    cfg = BloomConfig.from_json(config_path)
    ckpt = Checkpoint(files or safetensors_files(directory))
    try:
        np_dtype = DTYPES[dtype]
        if cfg.quantization_config:
            if max_memory is not None:
                raise MinibloomError(f"max_memory: a bitsandbytes checkpoint takes no memory budget ({config_path})")
            from .bnb import read_bnb_params

            params = read_bnb_params(ckpt, cfg, np_dtype, config_path, progress=progress)
        elif low_memory:
            from .lowmem import lazy_params

            params = lazy_params(ckpt, cfg, np_dtype, backend, max_memory, progress)
        else:
            params = read_params(ckpt, cfg, np_dtype, progress=progress)
    except BaseException:
        ckpt.close()
        raise
    if not low_memory or cfg.quantization_config:
        params = tree_map(backend.asarray, params)
    from ..tokenizer import load_tokenizer

    return Loaded(cfg, params, load_tokenizer(directory), path)
