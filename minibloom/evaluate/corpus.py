"""Corpus evaluation: the perplexity of a long text and the per-token KL divergence between two models over it, in
sliding windows, on this process or spread over a Dask cluster (``minibloom.evaluate.distributed``).

Windows follow transformers' guide "Perplexity of fixed-length models"
(https://huggingface.co/docs/transformers/perplexity): the text is tokenized whole; windows of up to ``context``
tokens begin at 0, stride, 2 stride, ... (the last one ends at the text's end, where the loop stops); each window
scores only the tokens no earlier window scored (the guide's ``trg_len = end_loc - prev_end_loc``, its other labels
-100), and a window's first token is never scored (transformers shifts the labels: nothing in the window predicts
it). The KL statistics are those of llama.cpp's ``llama-perplexity --kl-divergence``
(tools/perplexity/perplexity.cpp): KL(P_ref || P_cand) per scored token in float64, its mean (± standard error),
maximum, percentiles and minimum, and the share of tokens where both models rank the same token first ("same top p").

Exact reduction: every window returns its per-token float64 negative log-likelihoods (and KL values); they are put
back in window order and summed with ``math.fsum`` (the correctly rounded sum), so the result does not depend on how
windows were spread over workers, or in what order they finished. Each window is one forward pass of batch 1 with
OpenBLAS held to one thread (``minibloom.backend.one_blas_thread``; another thread count may split a product
differently and change float32's last bits), the same on any process: this process runs several windows side by side
instead, one per BLAS thread it would have used.

The candidate of ``kl`` can also be logits an external engine computed (llama.cpp, ONNX Runtime, ...) for the same
windows, as a **logits file** (``minibloom.evaluate.logits`` documents the format); ``kl(..., save_logits_to=PATH)``
writes the reference's logits in it, and ``windows(n, context, stride)`` (``minibloom.evaluate.windowing``) lists the
windows for an engine that makes its own.
"""

from __future__ import annotations

import math
import os
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np

from ..backend import one_blas_thread, openblas_threads
from ..bloom import Bloom, load
from ..errors import MinibloomError, shown
from ..generate import memory_bytes
from ..oracle.compare import kl_divergence
from ..scoring import token_nll
from .distributed import (CONNECT_TIMEOUT, ModelSpec, check_cluster_args, check_timeout, connect, map_ordered,
                          worker_count, worker_model)
from .logits import check_logits_file, check_save_path, is_logits_file, read_logits, save_logits
from .windowing import MAX_CONTEXT, Window, check_window_args, windows

KL_PERCENTILES = (99.9, 99.0, 95.0, 90.0, 50.0, 10.0, 5.0, 1.0)  # llama.cpp's list, with 95 and 90


# ---- inputs --------------------------------------------------------------------------------------------------------

def _id_array(ids, vocab: int) -> np.ndarray:
    a = np.asarray(ids)
    if a.ndim == 2 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 1 or a.dtype.kind not in "iu":
        raise MinibloomError(f"text_or_ids: expected a str or a 1-D sequence of token ids, got an array of shape "
                             f"{a.shape} and dtype {a.dtype}")
    bad = (a < 0) | (a >= vocab)
    if bad.any():
        raise MinibloomError(f"text_or_ids: token id {int(a[bad][0])} is out of range [0, {vocab})")
    return a.astype(np.int64)


def _encode(model: Bloom, text) -> tuple[np.ndarray | None, int]:
    """(ids of ``text`` with the model's tokenizer, or None when ``text`` is None; the model's vocab size)."""
    if text is None:
        return None, model.vocab_size
    return np.asarray(model.encode(text), np.int64), model.vocab_size


def _encode_task(spec: ModelSpec, text) -> tuple[np.ndarray | None, int]:
    return _encode(worker_model(spec), text)


def _vocabulary(m: Bloom | ModelSpec) -> tuple[int, list[str] | None]:
    """(the model's vocab size, its tokenizer's tokens by id, or None without a tokenizer); on a worker for a spec."""
    model = _model(m)
    tok = model.tokenizer
    if tok is None:
        return model.vocab_size, None
    return model.vocab_size, [tok.id_to_token(i) for i in range(tok.vocab_size)]


def check_same_vocabulary(ref: tuple[int, list | None], cand: tuple[int, list | None], ref_name: str,
                          cand_name: str) -> None:
    """Refuse a candidate whose logits do not index the reference's tokens: another vocab size, or a tokenizer that
    maps some id to another token (two ids swapped would otherwise compare the wrong tokens' logits and still give
    KL 0 and top-1 1.0)."""
    (nr, tr), (nc, tc) = ref, cand
    if nr != nc:
        raise MinibloomError(f"candidate {cand_name}: its vocabulary has {nc} ids and the reference's ({ref_name}) "
                             f"{nr}; KL needs logits over the same ids")
    if tr is None or tc is None:
        return  # a model without tokenizer.json: only the sizes can be compared
    n = max(len(tr), len(tc))
    differ = [i for i in range(n) if (tr[i] if i < len(tr) else None) != (tc[i] if i < len(tc) else None)]
    if differ:
        shown_ids = ", ".join(f"{i} ({(tr[i] if i < len(tr) else None)!r} vs {(tc[i] if i < len(tc) else None)!r})"
                              for i in differ[:5])
        more = f" and {len(differ) - 5} more" if len(differ) > 5 else ""
        raise MinibloomError(f"candidate {cand_name}: its tokenizer differs from the reference's ({ref_name}) at "
                             f"{len(differ)} token id(s): {shown_ids}{more}; KL needs the same tokenizer")


# ---- one window ----------------------------------------------------------------------------------------------------

def _model(m: Bloom | ModelSpec) -> Bloom:
    return m if isinstance(m, Bloom) else worker_model(m)


def window_bytes(model: Bloom, length: int) -> int:
    """About the memory one window's forward pass and scoring take: the attention scores, a few hidden-state-sized
    arrays and the MLP's, the logits and their float64 log-softmax."""
    c, item = model.config, np.dtype(model.dtype).itemsize
    return (2 * c.n_head * length * length + 12 * c.hidden_size * length) * item + model.vocab_size * length * (
        item + 24)


def _window_logits(model: Bloom, window_ids: np.ndarray, skip: int) -> np.ndarray:
    """The logits that predict ``window_ids[skip:]`` [n, V], from one batch-1 forward pass over the window."""
    need, have = window_bytes(model, len(window_ids)), memory_bytes()
    if need > have:
        raise MinibloomError(f"context: a window of {len(window_ids)} tokens needs about {need / 2**30:.1f} GiB and "
                             f"this process can take {have / 2**30:.1f} GiB; use a smaller context")
    with one_blas_thread():  # the same BLAS thread count on this process and on every worker: the same bits
        return model(window_ids[None])[0, skip - 1:-1]


def _nll_task(model: Bloom | ModelSpec, window_ids: np.ndarray, skip: int) -> np.ndarray:
    """Per-token float64 nll of one window's scored tokens."""
    m = _model(model)
    return token_nll(_window_logits(m, window_ids, skip), window_ids[skip:])


def _kl_task(reference: Bloom | ModelSpec, candidate: Bloom | ModelSpec | None, window_ids: np.ndarray, skip: int,
             candidate_rows: np.ndarray | None, keep_logits: bool) -> tuple:
    """One window's (KL per token, same top-1 per token, reference nll, candidate nll, reference logits or None)."""
    zr = _window_logits(_model(reference), window_ids, skip)
    if candidate is not None:
        zc = _window_logits(_model(candidate), window_ids, skip)
    else:
        zc = np.asarray(candidate_rows)
        if not np.isfinite(zc).all():
            raise MinibloomError("candidate: the logits file holds a NaN or infinite value")
    if zc.shape != zr.shape:
        raise MinibloomError(f"candidate: its logits have shape {zc.shape} where the reference's have {zr.shape} "
                             "(the vocab sizes must match)")
    targets = window_ids[skip:]
    return (kl_divergence(zr, zc), zr.argmax(-1) == zc.argmax(-1), token_nll(zr, targets), token_nll(zc, targets),
            zr if keep_logits else None)


# ---- running: this process or a Dask cluster ---------------------------------------------------------------------

@dataclass
class _Session:
    """Where windows run: ``client`` None means this process, with ``models`` loaded; otherwise ``models`` are
    ModelSpecs each Dask worker loads once."""

    client: Any
    models: list


def _load_keywords() -> tuple[str, ...]:
    """The ``minibloom.load`` keyword arguments a caller may pass as ``load_options`` (dtype and progress are set
    here; the path is the model argument)."""
    import inspect

    from .. import bloom

    return tuple(name for name, p in inspect.signature(bloom.load).parameters.items()
                 if name not in ("path_or_repo_id", "dtype", "progress")
                 and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))


def _load_options(low_memory: bool, load_options: dict | None) -> dict:
    """``load_options`` checked against ``minibloom.load``'s keyword parameters (before any model is loaded or any
    cluster started), with ``low_memory``."""
    if not isinstance(low_memory, (bool, np.bool_)):
        raise MinibloomError(f"low_memory: must be True or False, got {shown(low_memory)}")
    if load_options is not None and not isinstance(load_options, dict):
        raise MinibloomError(f"load_options: expected a dict of minibloom.load keyword arguments, got "
                             f"{type(load_options).__name__}")
    opts = dict(load_options or {})
    known = _load_keywords()
    for key in opts:
        if key in ("dtype", "progress", "path_or_repo_id"):
            raise MinibloomError(f"load_options: {shown(key)} is set by evaluate itself (use the dtype / model "
                                 "arguments)")
        if key not in known:
            raise MinibloomError(f"load_options: {shown(key)} is not a minibloom.load keyword argument (it takes "
                                 f"{', '.join(known)})")
    if low_memory:
        opts["low_memory"] = True
    return opts


def _check_model_arg(model, name: str) -> None:
    if model is not None and not isinstance(model, (Bloom, str, os.PathLike)):
        raise MinibloomError(f"{name}: expected a Bloom, a path, a hub repo id or None, got {type(model).__name__}")


def _check_dtype_arg(dtype, name: str = "dtype") -> None:
    if dtype is not None and (not isinstance(dtype, str) or dtype not in ("float32", "float64")):
        raise MinibloomError(f"{name}: must be 'float32', 'float64' or None, got {shown(dtype)}")


def _check_client_arg(client) -> None:
    """A Dask client, checked by what it must do (Dask itself is not imported for this)."""
    if client is not None and not all(callable(getattr(client, m, None)) for m in ("submit", "scheduler_info",
                                                                                     "cancel")):
        raise MinibloomError(f"client: expected a dask.distributed.Client, got {type(client).__name__}")


def _check_text_arg(text_or_ids) -> None:
    if not isinstance(text_or_ids, (str, list, tuple, np.ndarray)):
        raise MinibloomError(f"text_or_ids: expected a str or a sequence of token ids, got "
                             f"{type(text_or_ids).__name__}")


def _check_common(model, text_or_ids, dtype, progress, client, timeout) -> None:
    """The arguments perplexity and kl share, typed and bounded before any work."""
    _check_model_arg(model, "model")
    _check_text_arg(text_or_ids)
    _check_dtype_arg(dtype)
    _check_client_arg(client)
    check_timeout(timeout, "scheduler_timeout")
    if not isinstance(progress, (bool, np.bool_)):
        raise MinibloomError(f"progress: must be True or False, got {shown(progress)}")


def _local_model(model, dtype: str | None, options: dict) -> Bloom:
    if isinstance(model, Bloom):
        if dtype is not None and dtype != model.dtype:
            raise MinibloomError(f"dtype: the model is loaded in {model.dtype}; load it in {dtype} or leave dtype out")
        if options:
            raise MinibloomError(f"{', '.join(options)}: load options apply to a model given as a path; this one is "
                                 "loaded already")
        return model
    if model is not None and not isinstance(model, (str, os.PathLike)):
        raise MinibloomError(f"model: expected a Bloom, a path, a hub repo id or None, got {type(model).__name__}")
    return load(model, dtype=dtype or "float32", progress=False, **options)


def _spec(model, dtype: str | None, options: dict) -> ModelSpec:
    if isinstance(model, Bloom):
        raise MinibloomError("model: with a Dask cluster each worker loads the model itself: pass its path (or hub "
                             "id), not a loaded Bloom")
    return ModelSpec.make(model, dtype or "float32", **options)


@contextmanager
def _session(models: Sequence[tuple[Any, str | None, dict]], scheduler, workers, client,
             timeout: float = CONNECT_TIMEOUT) -> Iterator[_Session]:
    """Load ``models`` [(model, dtype, load options)] here, or describe them to a Dask cluster: an existing
    ``client``, the scheduler at ``scheduler``, or a LocalCluster of ``workers`` processes started for this call."""
    check_cluster_args(scheduler, workers)
    if client is None and scheduler is None and workers is None:
        yield _Session(None, [_local_model(m, d, o) for m, d, o in models])
        return
    if client is not None and (scheduler is not None or workers is not None):
        raise MinibloomError("client: give a Dask client, a scheduler address or a number of workers, not several")
    specs = [_spec(m, d, o) for m, d, o in models]
    with (nullcontext(client) if client is not None else connect(scheduler, workers, timeout=timeout)) as c:
        yield _Session(c, specs)


def _prepare(session: _Session, text_or_ids) -> tuple[np.ndarray, int]:
    """(the token ids of ``text_or_ids``, tokenized by the reference model (on a worker under Dask), checked; the
    reference's vocab size)."""
    text = text_or_ids if isinstance(text_or_ids, str) else None
    ref = session.models[0]
    if session.client is None:
        ids, vocab = _encode(ref, text)
    else:
        ids, vocab = session.client.submit(_encode_task, ref, text, pure=False).result()
    return (ids if ids is not None else _id_array(text_or_ids, vocab)), vocab


def _side_by_side(models: list[Bloom], context: int) -> int:
    """How many windows this process runs at once: each runs on one BLAS thread (``one_blas_thread``), so one per
    thread OpenBLAS would have used, as many as memory holds; one for a model with memory-mapped or quantized
    weights (its low-memory products have threads of their own)."""
    threads = openblas_threads() or 1
    if threads <= 1:
        return 1
    for m in models:
        try:
            m.trainable()  # every weight a plain array in memory
        except MinibloomError:
            return 1
    need = sum(window_bytes(m, context) for m in models)
    return max(1, min(threads, os.cpu_count() or 1, memory_bytes() // max(2 * need, 1)))


def _run(session: _Session, fn, tasks: list[tuple], bar, context: int = MAX_CONTEXT) -> list:
    """``[fn(*args) for args in tasks]`` in order: on this process (windows side by side on a thread pool, each on
    one BLAS thread) or on the Dask workers."""
    if session.client is not None:
        return map_ordered(session.client, fn, tasks, bar.update)
    n = _side_by_side([m for m in session.models if isinstance(m, Bloom)], context)
    if n == 1:
        out = []
        for args in tasks:
            out.append(fn(*args))
            bar.update()
        return out
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(n, thread_name_prefix="minibloom-window") as pool:
        futures = [pool.submit(fn, *args) for args in tasks]
        try:
            out = []
            for f in futures:  # in submission order: the results stay in window order
                out.append(f.result())
                bar.update()
            return out
        finally:
            for f in futures:
                f.cancel()


def _bar(total: int, desc: str, progress: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="window", disable=not progress, leave=False)


def _name(model) -> str:
    if isinstance(model, Bloom):
        return str(model.path)
    return os.fspath(model) if model is not None else "weights/default"


def _common(session: _Session, n_input: int, ws: list[Window], context: int, stride: int, t0: float) -> dict:
    return {"input_tokens": n_input, "windows": len(ws), "context": context, "stride": stride,
            "workers": worker_count(session.client) if session.client is not None else 0,
            "seconds": round(time.perf_counter() - t0, 4)}


def _fsum(parts: list[np.ndarray]) -> tuple[float, int]:
    """(correctly rounded float64 sum, count) of per-token values, in window order."""
    return (math.fsum(np.concatenate(parts).tolist()) if parts else 0.0), sum(len(p) for p in parts)


def _needs_tokens(ids: np.ndarray, what: str) -> None:
    if len(ids) < 2:
        raise MinibloomError(f"text_or_ids: {len(ids)} token(s); {what} needs at least 2 (the first one is context "
                             "only)")


# ---- the API -------------------------------------------------------------------------------------------------------

def perplexity(model: Bloom | str | os.PathLike | None, text_or_ids: str | Sequence[int] | np.ndarray, *,
               context: int = 1024, stride: int | None = None, dtype: str | None = None, low_memory: bool = False,
               load_options: dict | None = None, scheduler: str | None = None, workers: int | None = None,
               client: Any = None, progress: bool = False, scheduler_timeout: float = CONNECT_TIMEOUT) -> dict:
    """Perplexity of a text (or token ids) under ``model``, in the sliding windows of transformers' perplexity guide.

    ``model``: a loaded ``Bloom``, or a path / hub id / None (the default model) loaded with ``dtype`` (default
    float32; "float64" for the oracle) and ``low_memory`` / ``load_options`` (other ``minibloom.load`` arguments).
    ``context``: tokens per window (2 ... MAX_CONTEXT); ``stride``: how far each window begins after the previous
    one (1 ... context, default context // 2).

    Spread over Dask with ``workers=N`` (a LocalCluster of N one-thread processes, started and closed by this call),
    ``scheduler="tcp://HOST:8786"`` (an existing cluster) or ``client`` (a ``dask.distributed.Client``); the model
    must then be a path, which every worker loads once. The result is the same to the last bit, in float32 and
    float64, however the windows are spread (every window runs on one OpenBLAS thread, here and on the workers;
    with the same NumPy and BLAS build on the same kind of CPU). ``scheduler_timeout``: seconds to wait for
    ``scheduler`` (the wait is announced on stderr) before a MinibloomError.

    Returns a dict: ``perplexity`` = exp(nll / tokens); ``nll``, the exact float64 sum (``math.fsum``) of the
    per-token negative log-likelihoods (nats); ``tokens``, how many tokens were scored; ``input_tokens``,
    ``windows``, ``context``, ``stride``, ``model``, ``dtype``, ``workers`` (0: this process) and ``seconds``.

    Exact where the guide approximates: the guide adds each window's mean loss times ``trg_len - 1`` and counts
    ``trg_len - 1`` tokens, but transformers' loss averages over ``trg_len`` labels in a window whose first target
    has context before it (every window after the first when stride < context) and over ``trg_len - 1`` only where
    it has none (the first window; every window when stride == context). ``tokens`` counts the labels the loss
    really averages over (N - 1 for N tokens when stride < context, N - windows when stride == context), and ``nll``
    is their exact sum rather than mean x count.
    """
    t0 = time.perf_counter()
    _check_common(model, text_or_ids, dtype, progress, client, scheduler_timeout)
    context, stride = check_window_args(context, stride)
    options = _load_options(low_memory, load_options)
    with _session([(model, dtype, options)], scheduler, workers, client, scheduler_timeout) as s:
        ids, _ = _prepare(s, text_or_ids)
        _needs_tokens(ids, "perplexity")
        ws = windows(len(ids), context, stride)
        tasks = [(s.models[0], ids[w.begin:w.end], w.skip) for w in ws if w.scored]
        with _bar(len(ws), "perplexity", progress) as bar:
            bar.update(len(ws) - len(tasks))
            nll, tokens = _fsum(_run(s, _nll_task, tasks, bar, context))
        dtype_used = s.models[0].dtype
        out = {"perplexity": math.exp(nll / tokens), "nll": nll, "tokens": tokens, "model": _name(model),
               "dtype": dtype_used, **_common(s, len(ids), ws, context, stride, t0)}
    return out


def _stats(values: np.ndarray) -> dict:
    return {"mean": float(np.mean(values)), "max": float(values.max()), "min": float(values.min()),
            "median": float(np.median(values))}


def kl(reference: Bloom | str | os.PathLike | None, candidate: Bloom | str | os.PathLike | np.ndarray | None,
       text_or_ids: str | Sequence[int] | np.ndarray, *, context: int = 1024, stride: int | None = None,
       dtype: str | None = None, candidate_dtype: str | None = None, low_memory: bool = False,
       load_options: dict | None = None, save_logits_to: str | os.PathLike | None = None,
       scheduler: str | None = None, workers: int | None = None, client: Any = None, progress: bool = False,
       scheduler_timeout: float = CONNECT_TIMEOUT) -> dict:
    """KL(P_ref || P_cand) per scored token over the windows of ``perplexity``, with llama.cpp's statistics.

    ``reference``: like ``perplexity``'s model. ``candidate``: another model (a ``Bloom``, or a path loaded with
    ``candidate_dtype``, default ``dtype``, and the same load options), a logits file (``.npy`` / ``.npz``, see the
    module docstring) or an array [tokens, V] of logits from an external engine; or None with ``save_logits_to``
    only (the reference's perplexity and its logits file). A candidate model must index the reference's tokens: the
    same vocab size and, where both have a tokenizer, the same token at every id (otherwise a MinibloomError names
    the ids that differ). ``save_logits_to``: write the reference's logits there (``.npz``). Dask: as
    ``perplexity``.

    Returns a dict: the reference's ``perplexity``, ``nll``, ``tokens`` (as ``perplexity`` returns them) and the
    candidate's ``perplexity_candidate``, ``nll_candidate``, ``ln_ppl_ratio`` (ln(PPL_cand / PPL_ref)); ``kl_mean``
    (nats, ± ``kl_mean_stderr``), ``kl_max``, ``kl_min``, ``kl_median``, ``kl_percentiles`` {"99.9": ..., "1.0": ...}
    (NumPy's linear interpolation); ``top1`` (share of tokens where both models' argmax agree, llama.cpp's "same top
    p", ± ``top1_stderr``); ``delta_p`` (p_cand - p_ref of the actual next token: mean, rms, max, min, median); and
    ``input_tokens``, ``windows``, ``context``, ``stride``, ``model``, ``candidate``, ``dtype``, ``workers``,
    ``seconds``, ``saved_logits``.
    """
    t0 = time.perf_counter()
    _check_common(reference, text_or_ids, dtype, progress, client, scheduler_timeout)
    _check_dtype_arg(candidate_dtype, "candidate_dtype")
    if candidate is not None and not isinstance(candidate, (Bloom, str, os.PathLike, np.ndarray)):
        raise MinibloomError(f"candidate: expected a Bloom, a path, a hub repo id, a logits file or an array, got "
                             f"{type(candidate).__name__}")
    context, stride = check_window_args(context, stride)
    options = _load_options(low_memory, load_options)
    if save_logits_to is not None:
        check_save_path(save_logits_to)
    external = None
    if candidate is None:
        if save_logits_to is None:
            raise MinibloomError("candidate: give a model or a logits file to compare with (or only save the "
                                 "reference's logits with save_logits_to)")
    elif isinstance(candidate, np.ndarray):
        if candidate.ndim != 2 or candidate.dtype.kind != "f":
            raise MinibloomError(f"candidate: logits must be a float array [tokens, V], got shape {candidate.shape} "
                                 f"and dtype {candidate.dtype}")
        external = ("candidate logits", candidate, None, None)
    elif is_logits_file(candidate):
        external = (os.fspath(candidate), *read_logits(candidate))
    models = [(reference, dtype, options)]
    if candidate is not None and external is None:
        models.append((candidate, candidate_dtype or dtype, options))
    with _session(models, scheduler, workers, client, scheduler_timeout) as s:
        ids, vocab = _prepare(s, text_or_ids)
        _needs_tokens(ids, "kl")
        ws = windows(len(ids), context, stride)
        scored = [w for w in ws if w.scored]
        ref, cand = s.models[0], (s.models[1] if len(s.models) > 1 else None)
        if cand is not None:
            vocabs = [_vocabulary(m) for m in (ref, cand)] if s.client is None else \
                [f.result() for f in [s.client.submit(_vocabulary, m, pure=False) for m in (ref, cand)]]
            check_same_vocabulary(vocabs[0], vocabs[1], _name(reference), _name(candidate))
        rows = [None] * len(scored)
        if external is not None:
            check_logits_file(external[0], external[1], external[2], external[3], ids, ws, vocab)
            offsets = np.cumsum([0] + [w.scored for w in scored])
            rows = [np.asarray(external[1][a:b]) for a, b in zip(offsets[:-1], offsets[1:])]
        keep = save_logits_to is not None
        tasks = [(ref, cand, ids[w.begin:w.end], w.skip, r, keep) for w, r in zip(scored, rows)]
        fn = _kl_task if (cand is not None or external is not None) else _ref_only_task
        with _bar(len(ws), "kl", progress) as bar:
            bar.update(len(ws) - len(tasks))
            parts = _run(s, fn, tasks, bar, context)
        common = _common(s, len(ids), ws, context, stride, t0)
        dtype_used = ref.dtype
        cand_dtype = cand.dtype if cand is not None else None
    if keep:
        save_logits(save_logits_to, np.concatenate([p[4] for p in parts]), ids, ws)
    nll, tokens = _fsum([p[2] for p in parts])
    out = {"perplexity": math.exp(nll / tokens), "nll": nll, "tokens": tokens, "model": _name(reference),
           "dtype": dtype_used, "saved_logits": None if save_logits_to is None else os.fspath(save_logits_to)}
    if fn is _kl_task:
        out.update(_kl_figures(parts, nll, tokens))
        out["candidate"] = external[0] if external is not None else _name(candidate)
        out["candidate_dtype"] = None if external is not None else cand_dtype
    common["seconds"] = round(time.perf_counter() - t0, 4)
    return {**out, **common}


def _ref_only_task(reference, candidate, window_ids: np.ndarray, skip: int, candidate_rows, keep_logits: bool):
    """The reference's nll and logits of one window (``kl`` with no candidate: only saving the logits file)."""
    zr = _window_logits(_model(reference), window_ids, skip)
    return None, None, token_nll(zr, window_ids[skip:]), None, zr if keep_logits else None


def _kl_figures(parts: list[tuple], nll_ref: float, tokens: int) -> dict:
    """llama.cpp's --kl-divergence statistics from the windows' per-token values, concatenated in window order."""
    kld = np.concatenate([p[0] for p in parts])
    same = np.concatenate([p[1] for p in parts])
    nll_c, _ = _fsum([p[3] for p in parts])
    dp = np.exp(-np.concatenate([p[3] for p in parts])) - np.exp(-np.concatenate([p[2] for p in parts]))
    n = len(kld)
    kl_mean = math.fsum(kld.tolist()) / n
    top1 = float(same.sum()) / n
    pct = np.percentile(kld, KL_PERCENTILES)
    return {
        "perplexity_candidate": math.exp(nll_c / tokens), "nll_candidate": nll_c,
        "ln_ppl_ratio": (nll_c - nll_ref) / tokens,
        "kl_mean": kl_mean, "kl_mean_stderr": float(np.std(kld, ddof=1) / math.sqrt(n)) if n > 1 else 0.0,
        "kl_max": float(kld.max()), "kl_min": float(kld.min()), "kl_median": float(np.median(kld)),
        "kl_percentiles": {f"{q:.1f}": float(v) for q, v in zip(KL_PERCENTILES, pct)},
        "top1": top1, "top1_stderr": math.sqrt(top1 * (1 - top1) / (n - 1)) if n > 1 else 0.0,
        "delta_p": {**_stats(dp), "rms": float(np.sqrt(np.mean(dp * dp)))},
    }
