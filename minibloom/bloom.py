"""The public face of minibloom: ``load()`` and the ``Bloom`` model object.

``Bloom`` holds a config, the nested parameter dict (HF names) on a backend, and optionally a tokenizer; calling it
checks the arguments and runs ``minibloom.model.forward``. Loading follows ``transformers``' ``from_pretrained``
for BLOOM, minus pickle.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np

from . import fast
from . import model as M
from .backend import Backend
from .config import DTYPES, BloomConfig
from .errors import MinibloomError, shown
from .backward import IGNORE_INDEX, check_labels
from .formats.weights import flatten, hf_names


SMALL_FORWARD_BYTES = 1 << 26  # forward passes below this size skip the memory check


def _dtype_name(dtype) -> str:
    try:
        name = np.dtype(dtype).name
    except Exception:  # NumPy raises TypeError, ValueError (a negative field offset), RecursionError ...
        name = None
    if name not in DTYPES:
        raise MinibloomError(f"dtype: {shown(dtype)} is not supported (use 'float32', or 'float64' for the oracle "
                             "mode)")
    return name


class Bloom:
    """A loaded BLOOM model. ``model(input_ids)`` -> NumPy logits [batch, seq, vocab].

    Attributes: ``config`` (BloomConfig), ``params`` (nested dict of arrays under transformers' names),
    ``dtype`` ("float32" or "float64"), ``backend`` (Backend), ``tokenizer`` (or None), ``path``, ``primitives``
    (the kernels ``minibloom.model.forward`` runs with: ``minibloom.fast.PRIMITIVES`` on NumPy, the reference
    ``minibloom.model.REFERENCE`` on other backends or when passed).
    """

    def __init__(self, config: BloomConfig, params: dict, dtype: str = "float32", backend: Backend | None = None,
                 tokenizer: Any = None, path: str | None = None, primitives: M.Primitives | None = None):
        self.config = config
        self.params = params
        self.dtype = _dtype_name(dtype)
        self.backend = backend or Backend("numpy")
        self.tokenizer = tokenizer
        self.path = path
        self.primitives = primitives or (fast.PRIMITIVES if self.backend.name == "numpy" else M.REFERENCE)

    # ---- sizes ---------------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Rows of the (tied) output head, i.e. the last dimension of the logits."""
        return int(self.params["word_embeddings"]["weight"].shape[0])

    @property
    def n_params(self) -> int:
        return self.config.n_params(self.vocab_size)

    def __repr__(self) -> str:
        c = self.config
        return (f"Bloom({self.path or 'in memory'!s}: {c.n_layer} layers, hidden {c.hidden_size}, {c.n_head} heads, "
                f"vocab {self.vocab_size}, {self.n_params / 1e6:.1f}M params, {self.dtype}, {self.backend.name})")

    # ---- argument checks -----------------------------------------------------------------------------------
    def _array(self, a, name: str) -> np.ndarray:
        if hasattr(a, "__array_namespace__") and not isinstance(a, np.ndarray):
            a = self.backend.to_numpy(a)
        try:
            return np.asarray(a)
        except OverflowError:
            raise MinibloomError(f"{name}: a value does not fit in 64 bits (token ids run from 0 to "
                                 f"{self.vocab_size - 1})") from None
        except (ValueError, TypeError):
            raise MinibloomError(f"{name}: expected a rectangular array of shape (batch, seq)") from None

    def _ids(self, input_ids, name: str = "input_ids") -> np.ndarray:
        a = self._array(input_ids, name)
        if a.dtype.kind not in "iu":
            raise MinibloomError(f"{name}: token ids must be integers, got dtype {a.dtype}")
        if a.ndim == 1:
            a = a[None, :]
        if a.ndim != 2:
            raise MinibloomError(f"{name}: expected shape (batch, seq) or (seq,), got {a.shape}")
        if a.shape[0] == 0 or a.shape[1] == 0:
            raise MinibloomError(f"{name}: empty input of shape {a.shape}")
        bad = (a < 0) | (a >= self.vocab_size)
        if bad.any():
            raise MinibloomError(f"{name}: token id {int(a[bad][0])} is out of range [0, {self.vocab_size})")
        return a.astype(np.int64, copy=False)

    def _mask(self, attention_mask, shape: tuple[int, int]) -> np.ndarray:
        if attention_mask is None:
            return np.ones(shape, np.int64)
        m = self._array(attention_mask, "attention_mask")
        if m.ndim == 1 and shape[0] == 1:
            m = m[None, :]
        if m.shape != shape:
            raise MinibloomError(f"attention_mask: shape {m.shape} does not match input_ids {shape}")
        if m.dtype == bool:
            m = m.astype(np.int64)
        if m.dtype.kind not in "iuf" or not np.all((m == 0) | (m == 1)):
            raise MinibloomError("attention_mask: values must be 0 (padding) or 1 (token)")
        return m.astype(np.int64)

    def forward_bytes(self, batch: int, seq: int, past: int = 0, logits: str = "all", hidden_states: bool = False,
                      attentions: bool = False) -> int:
        """About the memory one forward pass over ``batch`` x ``seq`` new positions takes: one layer's attention
        scores and a dozen hidden-state-sized arrays (the MLP's 4x included), the logits (all or the last position's)
        and the per-layer outputs asked for."""
        c, item = self.config, np.dtype(self.dtype).itemsize
        B, T, K = int(batch), int(seq), int(past) + int(seq)
        scores = B * c.n_head * T * K
        hidden = B * T * c.hidden_size
        rows = {"all": B * T, "last": B, "none": 0}[logits]
        n = 2 * scores + 12 * hidden + rows * self.vocab_size
        n += (c.n_layer + 1) * hidden if hidden_states else 0
        n += c.n_layer * scores if attentions else 0
        return n * item

    def _check_memory(self, shape: tuple[int, int], past: int, logits: str, hidden_states: bool,
                      attentions: bool) -> None:
        """Refuse at once a batch whose forward pass cannot fit this process's memory (a million rows would otherwise
        run for minutes and then fail to allocate its logits)."""
        from .generate import memory_bytes

        need = self.forward_bytes(shape[0], shape[1], past, logits, hidden_states, attentions)
        if need <= SMALL_FORWARD_BYTES:  # a decoding step: not worth reading /proc for
            return
        have = memory_bytes()
        if need > have:
            raise MinibloomError(f"input_ids: a batch of shape {tuple(shape)} needs about {need / 2**30:.2f} GiB for "
                                 f"its forward pass (logits over {self.vocab_size} ids included), and this process "
                                 f"can take {have / 2**30:.2f} GiB; run fewer rows or positions at a time")

    # ---- running -------------------------------------------------------------------------------------------
    def forward(self, input_ids, attention_mask=None, *, output_hidden_states: bool = False,
                output_attentions: bool = False, logits: str = "all", cache: M.KVCache | None = None,
                to_numpy: bool = True, primitives: M.Primitives | None = None) -> M.BloomOutput:
        """Full forward pass with optional per-layer hidden states / attention probabilities (NumPy arrays).

        ``logits``: "all" (default), "last" (only the last position; what generation needs) or "none".
        With a ``cache``, ``attention_mask`` covers the cached positions too. ``primitives``: the kernels for this
        call (default ``self.primitives``).
        """
        if logits not in ("all", "last", "none"):
            raise MinibloomError(f"logits: must be 'all', 'last' or 'none', got {logits!r}")
        ids = self._ids(input_ids)
        past = cache.length if cache is not None else 0
        mask = self._mask(attention_mask, (ids.shape[0], past + ids.shape[1]))
        if cache is not None and (past + ids.shape[1] > cache.max_len or cache.k[0].shape[0] != ids.shape[0]):
            raise MinibloomError(f"cache: holds {cache.max_len} positions of batch {cache.k[0].shape[0]}, "
                                 f"got {past} + {ids.shape[1]} for batch {ids.shape[0]}")
        self._check_memory(ids.shape, past, logits, output_hidden_states, output_attentions)
        be = self.backend
        out = M.forward_outputs(self.params, be.asarray(ids), be.asarray(mask), self.config, cache, logits=logits,
                                primitives=primitives or self.primitives, hidden_states=output_hidden_states,
                                attentions=output_attentions)
        if to_numpy:
            conv = be.to_numpy
            out = M.BloomOutput(None if out.logits is None else conv(out.logits),
                                None if out.hidden_states is None else [conv(h) for h in out.hidden_states],
                                None if out.attentions is None else [conv(a) for a in out.attentions])
        return out

    def __call__(self, input_ids, attention_mask=None) -> np.ndarray:
        """Logits for every position: NumPy array [batch, seq, vocab] in the model's dtype."""
        return self.forward(input_ids, attention_mask).logits

    def new_cache(self, batch: int, max_len: int) -> M.KVCache:
        """An empty preallocated KV cache for ``batch`` rows and up to ``max_len`` positions."""
        for name, v in (("batch", batch), ("max_len", max_len)):
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
                raise MinibloomError(f"{name}: must be a positive integer, got {v!r}")
        from .generate import decode_bytes, memory_bytes

        need = decode_bytes(self, int(batch), int(max_len))
        if need > memory_bytes():
            raise MinibloomError(f"max_len={max_len}: a KV cache for {batch} row(s) of {max_len} positions would take "
                                 f"{need / 2**30:.2f} GiB, more than this process can take")
        c = self.config
        return M.KVCache(self.backend.xp, c.n_layer, batch, c.n_head, c.head_dim, max_len,
                         self.params["word_embeddings"]["weight"].dtype)

    def generate(self, input_ids, attention_mask=None, **kwargs) -> np.ndarray:
        """Extend ``input_ids`` like ``transformers``' ``generate``; see ``minibloom.generate.generate``."""
        from .generate import generate

        return generate(self, input_ids, attention_mask, **kwargs)

    # ---- training -------------------------------------------------------------------------------------------
    def _labels(self, labels, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """The labels to score, checked (ids or -100, something scored): ``input_ids`` with padding ignored when
        None."""
        if labels is None:
            lab = np.where(mask != 0, ids, IGNORE_INDEX)
        else:
            lab = self._array(labels, "labels")
            if lab.ndim == 1 and ids.shape[0] == 1:
                lab = lab[None, :]
        check_labels(lab, self.vocab_size, ids.shape)
        return lab.astype(np.int64)

    def trainable(self) -> None:
        """Raise unless every parameter is a plain array of the backend (not memory-mapped or quantized)."""
        kind = type(self.params["ln_f"]["weight"])
        lazy = not isinstance(self.params["h"], list) or any(type(v) is not kind for v in flatten(self.params).values())
        if lazy:
            raise MinibloomError(f"{self.path or 'model'}: gradients need every weight in memory as a plain array; "
                                 "load it without low_memory / keep_quantized")

    def value_and_grad(self, input_ids, attention_mask=None, labels=None, *,
                       to_numpy: bool = True) -> tuple[float, dict[str, Any]]:
        """transformers' causal-LM loss and the gradient of every parameter (the gradient oracle).

        ``labels`` [batch, seq]: position t is scored on predicting ``labels[:, t + 1]``; positions labelled -100 are
        ignored; the loss is the mean over the rest (``BloomForCausalLM(..., labels=labels).loss``). ``None`` means
        the input ids with padded positions ignored. Returns ``(loss, grads)``: ``grads`` maps transformers'
        ``named_parameters()`` names (``transformer.h.0.self_attention.query_key_value.weight``, ...,
        ``lm_head.weight`` only when the head is untied) to arrays in the model's dtype (NumPy unless
        ``to_numpy=False``). The maths is ``minibloom.backward``.
        """
        from . import backward

        self.trainable()
        ids = self._ids(input_ids)
        mask = self._mask(attention_mask, ids.shape)
        lab = self._labels(labels, ids, mask)
        be = self.backend
        loss, grads = backward.value_and_grad(self.params, be.asarray(ids), be.asarray(mask), be.asarray(lab),
                                              self.config, ops=self.primitives)
        conv = be.to_numpy if to_numpy else (lambda a: a)
        return float(be.to_numpy(loss)), {name: conv(g) for name, g in hf_names(grads).items()}

    # ---- text helpers (need a tokenizer) ---------------------------------------------------------------------
    def encode(self, text: str | Sequence[str]):
        if self.tokenizer is None:
            raise MinibloomError(f"{self.path}: this model has no tokenizer.json; pass token ids instead")
        return self.tokenizer.encode(text)

    def decode(self, ids) -> str:
        if self.tokenizer is None:
            raise MinibloomError(f"{self.path}: this model has no tokenizer.json")
        return self.tokenizer.decode(ids)


def load(path_or_repo_id: str | os.PathLike | None = None, dtype: str = "float32", backend: str = "numpy", *,
         revision: str | None = None, cache_dir: str | None = None, progress: bool | None = None,
         low_memory: bool | None = None, max_memory: int | str | None = None, keep_quantized: bool = False) -> Bloom:
    """Load a BLOOM checkpoint.

    ``path_or_repo_id``: a checkpoint directory (config.json + model.safetensors or a sharded index), a
    ``.safetensors`` file beside its config.json, a ``.gguf`` file, or a hub repo id such as
    ``"bigscience/bloom-560m"`` (downloaded with huggingface_hub into ``weights/``; only config, tokenizer and
    safetensors files, never pickles). ``None`` loads the small default model shipped in ``weights/``.

    ``dtype``: "float32" (transformers' numerics) or "float64" (the oracle mode: float64 end to end).
    ``backend``: "numpy", "cupy" (GPU) or "array_api_strict". ``low_memory``: keep the weights that do not fit a
    memory budget memory-mapped in their stored (16-bit) dtype and widen them block by block as each product runs
    (for checkpoints bigger than RAM in float32; ``minibloom.formats.lowmem``). ``max_memory``: that budget, in
    bytes or as a string ("18GB", "18GiB", "500MB"): the layers that fit stay widened in RAM; it implies
    ``low_memory`` (``low_memory=False`` with a budget is an error). Without it the low-memory mode keeps within 80%
    of physical memory less 2 GiB, leaving the page cache room for the rest of the file. ``keep_quantized``
    (``.gguf`` only): keep quantized layer weights (e.g. Q8_0) as their blocks in RAM and dequantize them while each
    layer runs.
    """
    from .formats.loading import read_checkpoint

    if path_or_repo_id is not None and not isinstance(path_or_repo_id, (str, os.PathLike)):
        raise MinibloomError(f"path_or_repo_id: expected a path, a hub repo id or None, got "
                             f"{type(path_or_repo_id).__name__}")
    name, be = _dtype_name(dtype), Backend(backend)
    budget = None
    if max_memory is not None:
        from .formats.lowmem import parse_memory

        budget = parse_memory(max_memory)
        if low_memory is False:
            raise MinibloomError("max_memory: a memory budget needs the low-memory mode; leave low_memory out or "
                                 "pass low_memory=True")
        low_memory = True
    got = read_checkpoint(path_or_repo_id, dtype=name, backend=be, revision=revision, cache_dir=cache_dir,
                          progress=progress, low_memory=bool(low_memory), keep_quantized=keep_quantized,
                          max_memory=budget)
    return Bloom(got.config, got.params, name, be, tokenizer=got.tokenizer, path=got.path)
