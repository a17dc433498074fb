"""Autoregressive decoding with a preallocated KV cache, matching ``transformers``' ``generate``.

Follows huggingface/transformers ``generation/utils.py`` (``GenerationMixin._sample``) and
``generation/logits_process.py`` (v5.23) for what the options mean:

- one prefill pass over the (left-padded) prompt, then one single-token step per new token; the attention mask grows
  by one column per step, so ALiBi positions (cumulative mask) stay right for padded rows;
- logits processors in transformers' default order: repetition penalty, then temperature, top-k, top-p;
- greedy = argmax (first index on ties, as torch); sampling draws from the processed softmax with a seeded NumPy
  ``Generator``, so ``seed=`` makes it reproducible (it does not reproduce torch's random stream);
- a row that emits ``eos_token_id`` is finished: later positions get ``pad_token_id``; decoding stops when every row
  is finished or after ``max_new_tokens``.

Where the arithmetic runs: the forward pass stays on the model's backend (NumPy, CuPy, array_api_strict). Plain greedy
takes the argmax there too (array-API ``argmax``) and only the ``[B]`` chosen ids cross to NumPy. Any logits
processing (penalty, temperature, top-k/top-p, sampling) converts the small ``[B, V]`` last-position logits to NumPy
float64 on purpose: it is one row per sequence (negligible next to the forward pass) and keeps the random stream
identical on every backend.
"""

from __future__ import annotations

import os
from typing import Callable, Iterator

import numpy as np

from .errors import MinibloomError, shown
from .jsonfile import field, read_json_object
from .model import softmax


# ---------------------------------------------------------------------------------------------------------------
# Logits processors (transformers' RepetitionPenalty / Temperature / TopK / TopP), on NumPy [B, V] float64 rows


def apply_repetition_penalty(scores: np.ndarray, seen: np.ndarray, penalty: float) -> np.ndarray:
    """Every token already in the sequence (prompt included, as transformers does): score<0 ? score*p : score/p.

    ``seen`` is a bool [B, V] table of tokens present in each row.
    """
    penalized = np.where(scores < 0, scores * penalty, scores / penalty)
    return np.where(seen, penalized, scores)


def apply_top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Keep the k highest scores of each row (ties with the k-th are kept, as transformers does); others -> -inf."""
    k = min(max(int(k), 1), scores.shape[-1])
    kth = np.partition(scores, -k, axis=-1)[:, -k][:, None]
    return np.where(scores < kth, -np.inf, scores)


def apply_top_p(scores: np.ndarray, p: float) -> np.ndarray:
    """Nucleus filtering: drop the least likely tokens whose total probability is at most 1 - p (keep >= 1 token)."""
    order = np.argsort(scores, axis=-1, kind="stable")  # ascending, as transformers sorts
    sorted_scores = np.take_along_axis(scores, order, axis=-1)
    cum = np.cumsum(softmax(sorted_scores), axis=-1)
    drop_sorted = cum <= (1.0 - p)
    drop_sorted[:, -1] = False  # the most likely token always stays
    drop = np.zeros_like(drop_sorted)
    np.put_along_axis(drop, order, drop_sorted, axis=-1)
    return np.where(drop, -np.inf, scores)


def sample(probs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One draw per row from ``probs`` [B, V] (inverse CDF with one uniform per row)."""
    cdf = np.cumsum(probs, axis=-1)
    u = rng.random(probs.shape[0]) * cdf[:, -1]
    idx = np.sum(cdf <= u[:, None], axis=-1)  # the first token whose cumulative probability exceeds u
    return np.minimum(idx, probs.shape[-1] - 1).astype(np.int64)


# ---------------------------------------------------------------------------------------------------------------
# Options


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _is_number(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_)) \
        and bool(np.isfinite(v))


def _check_options(max_new_tokens, do_sample, temperature, top_k, top_p, repetition_penalty, seed=None):
    """Every option's type and range, before any work (NumPy would otherwise fail deep inside, or never)."""
    if not _is_int(max_new_tokens) or max_new_tokens < 0:
        raise MinibloomError(f"max_new_tokens: must be an integer >= 0, got {shown(max_new_tokens)}")
    if not isinstance(do_sample, (bool, np.bool_)):
        raise MinibloomError(f"do_sample: must be True or False, got {shown(do_sample)}")
    if do_sample and not (_is_number(temperature) and temperature > 0):
        raise MinibloomError(f"temperature: must be a finite number > 0 when sampling, got {shown(temperature)} "
                             "(use do_sample=False for greedy decoding)")
    if temperature is not None and not _is_number(temperature):
        raise MinibloomError(f"temperature: must be a finite number, got {shown(temperature)}")
    if top_k is not None and (not _is_int(top_k) or top_k < 0):
        raise MinibloomError(f"top_k: must be an integer >= 0 (0 or None disables it), got {shown(top_k)}")
    if top_p is not None and not (_is_number(top_p) and 0.0 < top_p <= 1.0):
        raise MinibloomError(f"top_p: must be a number in (0, 1], got {shown(top_p)}")
    if not (_is_number(repetition_penalty) and repetition_penalty > 0):
        raise MinibloomError(f"repetition_penalty: must be a finite number > 0, got {shown(repetition_penalty)}")
    if seed is not None and not (_is_int(seed) and 0 <= seed < 2**63):
        raise MinibloomError(f"seed: must be an integer in [0, 2**63) or None, got {shown(seed)}")


def _token_ids(value, name: str, vocab: int) -> np.ndarray:
    """``eos_token_id`` / ``pad_token_id``: an id or a list of ids, each in [0, vocab)."""
    items = list(value) if isinstance(value, (list, tuple, np.ndarray)) else [value]
    for v in items:
        if not _is_int(v) or not 0 <= v < vocab:
            raise MinibloomError(f"{name}: must be a token id in [0, {vocab}) (or a list of them), got {shown(v)}")
    return np.array([int(v) for v in items], np.int64)


def decode_bytes(model, batch: int, length: int) -> int:
    """Bytes the KV cache and the mask take for ``batch`` rows of ``length`` positions (preallocated by stream)."""
    c = model.config
    itemsize = np.dtype(model.dtype).itemsize  # the compute dtype's name ("float32" / "float64")
    return 2 * c.n_layer * batch * length * c.hidden_size * itemsize + batch * length * 8


def memory_bytes() -> int:
    """Memory this process can still take: the smallest of the machine's available memory (MemAvailable), what the
    address-space limit (RLIMIT_AS) leaves, and what the cgroup's memory.max leaves; physical memory, or a generous
    fallback, where the platform says none of these."""
    limits = []
    try:
        with open("/proc/meminfo") as f:
            limits += [int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")]
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_AS)[0]
        if soft != resource.RLIM_INFINITY:
            with open("/proc/self/statm") as f:
                limits.append(soft - int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE"))
    except (ImportError, OSError, ValueError):
        pass
    try:
        with open("/sys/fs/cgroup/memory.max") as f, open("/sys/fs/cgroup/memory.current") as g:
            cap = f.read().strip()
            if cap != "max":
                limits.append(int(cap) - int(g.read()))
    except (OSError, ValueError):
        pass
    if not limits:
        try:
            limits.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
        except (ValueError, OSError, AttributeError):
            limits.append(1 << 36)
    return max(0, min(limits))


def _check_length(model, batch: int, prompt: int, max_new_tokens: int) -> None:
    batch, prompt, max_new_tokens = int(batch), int(prompt), int(max_new_tokens)  # Python ints: no wrap-around
    need = decode_bytes(model, batch, prompt + max_new_tokens)
    have = memory_bytes()
    if need > have:
        raise MinibloomError(f"max_new_tokens={max_new_tokens}: the KV cache for {batch} row(s) of {prompt} + "
                             f"{max_new_tokens} positions would take {need / 2**30:.2f} GiB, and this process can "
                             f"take {have / 2**30:.2f} GiB more; ask for fewer tokens")


def _default(value, fallback):
    return fallback if value is None else value


# ---------------------------------------------------------------------------------------------------------------
# Decoding


def stream(model, input_ids, attention_mask=None, *, max_new_tokens: int = 20, do_sample: bool = False,
           temperature: float = 1.0, top_k: int | None = 50, top_p: float | None = 1.0,
           repetition_penalty: float = 1.0, eos_token_id: int | list[int] | None = None,
           pad_token_id: int | None = None, seed: int | None = None) -> Iterator[np.ndarray]:
    """Yield the next token of every row, one step at a time: NumPy int64 arrays of shape [batch].

    Same options as :func:`generate`. Finished rows yield ``pad_token_id``. Stop early by leaving the loop (or
    ``.close()``); the generator stops by itself when every row has emitted eos or after ``max_new_tokens``.
    Every argument is checked when ``stream`` is called, before the first step (a caller can print nothing until
    the arguments are known good).
    """
    _check_options(max_new_tokens, do_sample, temperature, top_k, top_p, repetition_penalty, seed)
    max_new_tokens = int(max_new_tokens)  # a NumPy integer would wrap around in prompt + max_new_tokens
    ids = model._ids(input_ids)
    B, P = ids.shape
    _check_length(model, B, P, max_new_tokens)
    cfg = model.config
    eos = _default(eos_token_id, cfg.eos_token_id)
    eos_ids = _token_ids([] if eos is None else eos, "eos_token_id", model.vocab_size)
    pad = _default(pad_token_id, _default(cfg.pad_token_id, int(eos_ids[0]) if eos_ids.size else 0))
    if isinstance(pad, (list, tuple, np.ndarray)):
        raise MinibloomError(f"pad_token_id: must be one token id, got {shown(pad)}")
    pad = int(_token_ids(pad, "pad_token_id", model.vocab_size)[0])
    mask = np.zeros((B, P + max_new_tokens), np.int64)  # grows one column per step; HF appends ones to every row
    mask[:, :P] = model._mask(attention_mask, (B, P))
    return _steps(model, ids, mask, max_new_tokens, do_sample, temperature, top_k, top_p, repetition_penalty,
                  eos_ids, pad, seed)


def _steps(model, ids, mask, max_new_tokens, do_sample, temperature, top_k, top_p, repetition_penalty, eos_ids, pad,
           seed) -> Iterator[np.ndarray]:
    """The decoding loop of ``stream``, on checked arguments."""
    B, P = ids.shape
    if max_new_tokens == 0:
        return
    processing = do_sample or float(repetition_penalty) != 1.0
    penalty = float(repetition_penalty)
    seen = None
    if penalty != 1.0:
        seen = np.zeros((B, model.vocab_size), bool)
        np.put_along_axis(seen, ids, True, axis=1)
    rng = np.random.default_rng(seed) if do_sample else None
    unfinished = np.ones(B, bool)
    xp = model.backend.xp
    to_numpy = model.backend.to_numpy

    cache = model.new_cache(B, P + max_new_tokens)
    step_ids, length = ids, P
    for step in range(max_new_tokens):
        out = model.forward(step_ids, mask[:, :length], cache=cache, logits="last", to_numpy=False)
        last = out.logits[:, -1, :]  # [B, V] on the backend
        if not processing:
            nxt = to_numpy(xp.argmax(last, axis=-1)).astype(np.int64)
        else:
            scores = np.asarray(to_numpy(last), np.float64)  # deliberate: the [B, V] row goes to NumPy (module doc)
            if seen is not None:
                scores = apply_repetition_penalty(scores, seen, penalty)
            if do_sample:
                if float(temperature) != 1.0:
                    scores = scores / float(temperature)
                if top_k:
                    scores = apply_top_k(scores, top_k)
                if top_p is not None and float(top_p) < 1.0:
                    scores = apply_top_p(scores, float(top_p))
                nxt = sample(softmax(scores), rng)
            else:
                nxt = np.argmax(scores, axis=-1).astype(np.int64)
        nxt = np.where(unfinished, nxt, pad)
        if seen is not None:
            seen[np.arange(B), nxt] = True
        if eos_ids.size:
            unfinished &= ~np.isin(nxt, eos_ids)
        yield nxt
        if not unfinished.any() or step == max_new_tokens - 1:
            return
        mask[:, length] = 1
        length += 1
        step_ids = nxt[:, None]


def generate(model, input_ids, attention_mask=None, *, max_new_tokens: int = 20, do_sample: bool = False,
             temperature: float = 1.0, top_k: int | None = 50, top_p: float | None = 1.0,
             repetition_penalty: float = 1.0, eos_token_id: int | list[int] | None = None,
             pad_token_id: int | None = None, seed: int | None = None,
             callback: Callable[[np.ndarray], None] | None = None) -> np.ndarray:
    """Extend ``input_ids`` [batch, prompt] (or [prompt]) like ``transformers``' ``model.generate``.

    Returns NumPy int64 ids [batch, prompt + new]; rows that hit eos are padded with ``pad_token_id`` after it, and the
    result is shorter than ``prompt + max_new_tokens`` when every row finished early. Batches are left-padded
    (``attention_mask`` 0 on the pads), as BLOOM's tokenizer pads.

    - ``do_sample=False`` (default): greedy, token-identical to transformers' greedy search.
    - ``do_sample=True``: sample after repetition penalty, ``temperature``, ``top_k`` (0/None: off; 50 by default as
      transformers) and ``top_p`` (1.0: off); ``seed`` makes it reproducible.
    - ``repetition_penalty`` > 1 discourages every token already present (prompt included, and, as in
      transformers, the ``<pad>`` ids of a left-padded row), greedy or sampled.
    - ``eos_token_id`` / ``pad_token_id`` default to the model config's (2 and 3 for BLOOM).
    - ``callback(next_ids)`` is called after every step with the [batch] new ids (for streaming); see also
      :func:`stream`.
    """
    ids = model._ids(input_ids)
    new = []
    for nxt in stream(model, ids, attention_mask, max_new_tokens=max_new_tokens, do_sample=do_sample,
                      temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty,
                      eos_token_id=eos_token_id, pad_token_id=pad_token_id, seed=seed):
        new.append(nxt)
        if callback is not None:
            callback(nxt)
    if not new:
        return ids.copy()
    return np.concatenate([ids, np.stack(new, axis=1)], axis=1)


BUILTIN = {"do_sample": True, "temperature": 0.8, "top_k": 50, "top_p": 1.0, "repetition_penalty": 1.0,
           "max_new_tokens": 100}  # sampling defaults when a checkpoint has no generation_config.json


def model_dir(model) -> str | None:
    path = model.path
    if not path:
        return None
    return path if os.path.isdir(path) else os.path.dirname(path) or "."


def generation_options(model, *, temperature=None, top_k=None, top_p=None, repetition_penalty=None,
                       max_new_tokens=None, greedy: bool = False, seed=None) -> dict:
    """The keyword arguments of ``generate`` for ``model``: the options given here, then the checkpoint's
    generation_config.json, then ``BUILTIN``; end-of-sequence and padding ids from the tokenizer or the config."""
    given = dict(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty,
                 max_new_tokens=max_new_tokens)
    opts = dict(BUILTIN)
    directory = model_dir(model)
    path = os.path.join(directory, "generation_config.json") if directory else None
    if path and os.path.isfile(path):
        gc = read_json_object(path)
        opts["do_sample"] = field(gc, "do_sample", bool, path, default=opts["do_sample"])
        for k, kind, lo, hi in (("temperature", float, 0, 1e6), ("top_k", int, 0, 1 << 31), ("top_p", float, 0, 1),
                                ("repetition_penalty", float, 1e-6, 1e6), ("max_new_tokens", int, 0, 1 << 31)):
            opts[k] = field(gc, k, kind, path, default=opts[k], lo=lo, hi=hi)
    for k, v in given.items():
        if v is not None:
            opts[k] = v
    if greedy or opts["temperature"] == 0:
        opts["do_sample"] = False
    elif temperature is not None:
        opts["do_sample"] = True  # asking for a temperature means sampling
    if opts["temperature"] < 0:
        raise MinibloomError(f"--temperature: must be >= 0 (0 = greedy), got {opts['temperature']}")
    if opts["max_new_tokens"] < 0:
        raise MinibloomError(f"--max-new-tokens: must be >= 0, got {opts['max_new_tokens']}")
    if not opts["do_sample"]:
        opts["temperature"] = 1.0
    opts["seed"] = seed
    tok = model.tokenizer
    eos = tok.eos_token_id if tok is not None and tok.eos_token_id is not None else model.config.eos_token_id
    pad = tok.pad_token_id if tok is not None and tok.pad_token_id is not None else model.config.pad_token_id
    opts["eos_token_id"] = [] if eos is None else eos
    opts["pad_token_id"] = pad
    return opts
