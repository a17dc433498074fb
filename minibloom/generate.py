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

import json
import os
from typing import Callable, Iterator

import numpy as np

from .errors import MinibloomError
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


def _check_options(max_new_tokens, do_sample, temperature, top_k, top_p, repetition_penalty):
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 0:
        raise MinibloomError(f"max_new_tokens: must be an integer >= 0, got {max_new_tokens!r}")
    if do_sample and not (temperature is not None and float(temperature) > 0):
        raise MinibloomError(f"temperature: must be > 0 when sampling, got {temperature!r} "
                             "(use do_sample=False for greedy decoding)")
    if top_k is not None and (isinstance(top_k, bool) or int(top_k) != top_k or top_k < 0):
        raise MinibloomError(f"top_k: must be an integer >= 0 (0 or None disables it), got {top_k!r}")
    if top_p is not None and not 0.0 < float(top_p) <= 1.0:
        raise MinibloomError(f"top_p: must be in (0, 1], got {top_p!r}")
    if not float(repetition_penalty) > 0:
        raise MinibloomError(f"repetition_penalty: must be > 0, got {repetition_penalty!r}")


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
    """
    _check_options(max_new_tokens, do_sample, temperature, top_k, top_p, repetition_penalty)
    ids = model._ids(input_ids)
    B, P = ids.shape
    mask = np.zeros((B, P + max_new_tokens), np.int64)  # grows one column per step; HF appends ones to every row
    mask[:, :P] = model._mask(attention_mask, (B, P))
    cfg = model.config
    eos = _default(eos_token_id, cfg.eos_token_id)
    eos_ids = np.array([] if eos is None else np.atleast_1d(eos), np.int64)
    pad = _default(pad_token_id, _default(cfg.pad_token_id, int(eos_ids[0]) if eos_ids.size else 0))
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
    if directory and os.path.isfile(os.path.join(directory, "generation_config.json")):
        try:
            with open(os.path.join(directory, "generation_config.json")) as f:
                gc = json.load(f)
        except (OSError, ValueError):
            gc = {}
        if isinstance(gc.get("do_sample"), bool):
            opts["do_sample"] = gc["do_sample"]
        for k in ("temperature", "top_k", "top_p", "repetition_penalty", "max_new_tokens"):
            if isinstance(gc.get(k), (int, float)) and not isinstance(gc.get(k), bool):
                opts[k] = gc[k]
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
