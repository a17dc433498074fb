"""Training BLOOM with nothing but NumPy: the loop (``train``, ``train_step``) and a new model's initialization.

References:
- karpathy/nanoGPT ``train.py`` (random windows of a token stream, AdamW, warm-up + cosine, gradient accumulation,
  clipping, periodic evaluation) and karpathy/llm.c ``train_gpt2.c``.
- rasbt/LLMs-from-scratch, chapters 5 (pre-training) and 7 (instruction fine-tuning: loss on the response only).
- The maths is ``minibloom.model.forward`` + ``minibloom.backward`` + ``minibloom.training.optim``; this module only
  feeds it.

``train(...)`` (and ``minibloom train``) either trains a new BLOOM from a seed on a text file (by default the bundled
Tiny Shakespeare), with the tokenizer of a model or a new byte-level BPE with BLOOM's pre-tokenizer, or fine-tunes a
loaded checkpoint (any format minibloom reads, dequantized), optionally on conversations rendered with a chat
template and scored on the assistant turns only. The data and the held-out loss are ``minibloom.training.data``,
the checkpoints that resume exactly ``minibloom.training.checkpoint``, the options ``minibloom.training.config``.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import time
from dataclasses import dataclass, field, fields, replace

import numpy as np

from .. import backward
from ..backend import reuse_freed_memory
from ..bloom import Bloom, hf_names, load
from ..config import BloomConfig
from ..errors import MinibloomError, shown
from ..formats.weights import expected_shapes, nest, tree_map
from .checkpoint import check_out, command_line, json_safe, load_run, model_card, read_state, save
from .config import TrainConfig, check_memory, path_arg
from .data import (conversation_batch, conversation_tokens, encode, evaluate, perplexity_of, random_windows,
                   read_conversations, read_text, split_text, train_bpe)
from .optim import AdamW, clip_grad_norm, global_norm, lr_at


def new_params(cfg: BloomConfig, vocab_rows: int, std: float, rng: np.random.Generator, dtype) -> dict:
    """transformers' ``_init_weights`` for BLOOM: matrices and the embedding N(0, std^2), biases 0, LayerNorm
    weights 1 and biases 0."""
    flat = {}
    for name, shape in expected_shapes(cfg, vocab_rows).items():
        if "layernorm" in name or name.startswith("ln_f"):
            flat[name] = (np.ones if name.endswith("weight") else np.zeros)(shape, dtype)
        elif name.endswith("bias"):
            flat[name] = np.zeros(shape, dtype)
        else:
            flat[name] = (std * rng.standard_normal(shape)).astype(dtype)
    return nest(flat)


@dataclass
class TrainResult:
    """What a run did: the model, its figures, and where it was saved."""

    model: Bloom
    out: str | None
    history: list = field(default_factory=list)  # {"step", "loss", "lr", "grad_norm", "tokens_per_s"} per step
    evals: list = field(default_factory=list)  # {"step", "loss", "perplexity", ...}
    metrics: dict = field(default_factory=dict)


def _check_args(data, model, out, tokenizer, chat_template, resume, backend, save_dtype, progress, log) -> None:
    """train()'s arguments other than the config, typed and checked before any work."""
    from ..formats.weights import STORED

    if resume is not None and any(v is not None for v in (data, model, tokenizer, chat_template)):
        raise MinibloomError("resume: a resumed run continues with its own model, tokenizer and data; give none of "
                             "data, model, tokenizer, chat_template")
    if model is not None and not isinstance(model, Bloom):
        path_arg(model, "model")
    if model is not None and tokenizer is not None:
        raise MinibloomError("tokenizer: a fine-tuned model keeps its own tokenizer; give model or tokenizer")
    if chat_template is not None:
        if not isinstance(chat_template, str):
            raise MinibloomError(f"chat_template: expected a template name, got {shown(chat_template)}")
        from ..chat import get

        get(chat_template)
    if not isinstance(backend, str):
        raise MinibloomError(f"backend: expected a backend name, got {shown(backend)}")
    if save_dtype is not None and (not isinstance(save_dtype, str) or save_dtype not in STORED):
        raise MinibloomError(f"save_dtype: {shown(save_dtype)} cannot be stored (use one of {', '.join(STORED)})")
    if not isinstance(progress, (bool, np.bool_)):
        raise MinibloomError(f"progress: must be true or false, got {shown(progress)}")
    if log is not None and not callable(log):
        raise MinibloomError(f"log: must be a function of one message, got {shown(log)}")
    if tokenizer is not None:
        tokenizer = path_arg(tokenizer, "tokenizer")
        if not os.path.isdir(tokenizer):
            from ..textfile import check_regular

            check_regular(tokenizer, "tokenizer")
            if os.path.basename(tokenizer) != "tokenizer.json":
                raise MinibloomError(f"tokenizer: {tokenizer}: give a checkpoint folder or its tokenizer.json")
        elif not os.path.isfile(os.path.join(tokenizer, "tokenizer.json")):
            raise MinibloomError(f"tokenizer: {tokenizer} holds no tokenizer.json")
    if out is not None:
        check_out(out)


def _config(config, overrides: dict) -> TrainConfig:
    if config is not None and not isinstance(config, TrainConfig):
        raise MinibloomError(f"config: expected a TrainConfig, got {shown(config)}")
    names = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise MinibloomError(f"train: unknown option {unknown[0]!r} (a TrainConfig field or a train() argument)")
    cfg = replace(config or TrainConfig(), **overrides)
    cfg.check()
    return cfg


def _data_tokens(rows, ctx: int) -> int:
    """Scored tokens of conversations: labels after the first position of each (truncated) row."""
    return sum(int((lab[-ctx:][1:] != backward.IGNORE_INDEX).sum()) for _, lab in rows)


class Diverged(MinibloomError):
    """A run whose loss, gradient or weights stopped being finite."""


def _memory_is_a_minibloom_error(fn):
    """A MemoryError inside a run (a machine with less memory free than ``check_memory`` assumed) is reported as a
    MinibloomError naming the options that size it, not as a crash."""
    @functools.wraps(fn)
    def wrapped(*args, **kw):
        try:
            return fn(*args, **kw)
        except MemoryError:
            raise MinibloomError("train: out of memory: lower batch or ctx (or raise accumulate), or train a "
                                 "smaller model (hidden, layers, vocab_rows)") from None
    return wrapped


@_memory_is_a_minibloom_error
def train(data: str | None = None, *, model: str | Bloom | None = None, out: str | None = None,
          tokenizer: str | None = None, chat_template: str | None = None, config: TrainConfig | None = None,
          resume: str | None = None, backend: str = "numpy", save_dtype: str | None = None, progress: bool = True,
          log=None, **overrides) -> TrainResult:
    """Train a BLOOM with minibloom's own backward pass and AdamW.

    ``data``: a UTF-8 text file (default: the bundled Tiny Shakespeare), split by characters into training text and
    the last ``val_fraction`` held out; with ``chat_template`` a JSON Lines file of conversations instead (loss on
    the assistant replies only, ``read_conversations``). ``model``: fine-tune this checkpoint (a path, hub id or
    ``Bloom``; quantized files are dequantized) with its tokenizer; None trains a new model from ``config.seed``
    with ``tokenizer`` (a checkpoint folder or ``tokenizer.json``) or, if None, a new BPE of ``config.vocab``
    entries trained on the training text. ``config`` (a ``TrainConfig``; keyword ``overrides`` replace its fields).
    ``out``: where the trained model goes (at the end; every ``save_every`` steps into ``out/checkpoint-STEP``); an
    earlier run there is replaced whole (``save``); a file, a missing parent or a folder of other files is refused.
    ``resume``: such a checkpoint (or a finished run) to continue: its saved config, data order and optimizer
    state apply, so the run ends where the uninterrupted one would (bit for bit); ``steps`` may be raised.
    ``save_dtype``: the stored weights' dtype (default the training dtype; float16/bfloat16 for a small release).

    Every argument, the data and a resumed state are checked before the first step; a run whose loss, gradient or
    weights stop being finite stops with a MinibloomError (``Diverged``), its last checkpoint left as it was.
    """
    from ..textfile import check_regular

    cfg = _config(config, overrides)
    _check_args(data, model, out, tokenizer, chat_template, resume, backend, save_dtype, progress, log)
    if resume is None and model is None:
        check_memory(cfg, cfg.hidden, cfg.layers, cfg.heads, cfg.vocab_rows)
    log = log or (lambda msg: None)
    rng = np.random.default_rng(cfg.seed)
    keep: list[str] = []
    if resume is not None:
        meta = read_state(resume)
        saved = meta["config"]
        cfg = replace(saved, steps=max(cfg.steps, saved.steps) if "steps" in overrides else saved.steps)
        try:
            rng.bit_generator.state = meta["rng"]
        except (KeyError, TypeError, ValueError, OverflowError) as e:
            raise MinibloomError(f"resume: {resume}: the saved data-order state is not readable ({e})") from None
        start = meta["step"]
        chat_template, data = meta.get("chat_template"), meta.get("data")
        if data is not None:
            check_regular(data, f"resume: {resume}: its data")
        if out is not None and os.path.isdir(out):  # continuing a run in its own folder keeps its checkpoints
            here = os.path.abspath(out)
            if os.path.dirname(os.path.abspath(resume)) == here or os.path.abspath(resume) == here:
                keep = [n for n in os.listdir(out) if re.fullmatch(r"checkpoint-\d+", n)]
    else:
        meta, start = None, 0
        if data is not None:
            data = check_regular(path_arg(data, "data"), "data")
    # ---- data (read and checked before any model is built or loaded)
    if chat_template is not None:
        if data is None:
            raise MinibloomError("data: fine-tuning on conversations (chat_template) needs a JSON Lines data file")
        convs = read_conversations(data)
        if len(convs) < 2:
            raise MinibloomError(f"data: {data}: {len(convs)} conversation; the validation set would be empty (the "
                                 "last val_fraction of the conversations is held out: give at least 2)")
        n_val = max(1, int(round(len(convs) * cfg.val_fraction)))
        n_val = min(n_val, len(convs) - 1)
        train_convs, val_convs = convs[:len(convs) - n_val], convs[len(convs) - n_val:]
        text_train = "".join(msg["content"] for c in train_convs for msg in c)
    else:
        text = read_text(data)
        text_train, text_val = split_text(text, cfg.val_fraction)
    # ---- the model and its tokenizer
    if resume is not None:
        m, opt_state = load_run(resume, backend, meta)
        if m.tokenizer is None:
            raise MinibloomError(f"resume: {resume} holds no tokenizer.json (a regular file) to encode its data with")
    elif model is not None:
        m = model if isinstance(model, Bloom) else load(model, dtype=cfg.dtype, backend=backend)
        m.trainable()
        if m.tokenizer is None:
            raise MinibloomError(f"model: {m.path} has no tokenizer.json; fine-tuning on text needs one")
        opt_state = None
    else:
        m, opt_state = None, None
    if m is None:
        tok = _tokenizer(tokenizer, text_train, cfg.vocab)
        mcfg = BloomConfig(vocab_size=cfg.vocab_rows, hidden_size=cfg.hidden, n_layer=cfg.layers, n_head=cfg.heads,
                           apply_residual_connection_post_layernorm=cfg.post_ln)
        mcfg.validate("train")
        if tok.vocab_size > cfg.vocab_rows:
            raise MinibloomError(f"vocab_rows: {cfg.vocab_rows} rows cannot hold the tokenizer's {tok.vocab_size}")
        from ..backend import Backend

        be = Backend(backend)
        params = new_params(mcfg, cfg.vocab_rows, cfg.init_std, np.random.default_rng(cfg.seed), cfg.dtype)
        m = Bloom(mcfg, tree_map(be.asarray, params), cfg.dtype, be, tokenizer=tok)
    else:
        check_memory(cfg, m.config.hidden_size, m.config.n_layer, m.config.n_head, m.vocab_size)
    tok = m.tokenizer
    pad_id = m.config.pad_token_id if m.config.pad_token_id is not None else 3
    if chat_template is not None:
        train_rows = [conversation_tokens(tok, c, chat_template) for c in train_convs]
        val_rows = [conversation_tokens(tok, c, chat_template) for c in val_convs]
        train_ids = val_ids = None
        if _data_tokens(train_rows, cfg.ctx) == 0:
            raise MinibloomError(f"data: {data}: the training conversations have no assistant reply tokens to learn "
                                 "from (every reply empty, or cut off by ctx)")
        if _data_tokens(val_rows, cfg.ctx) == 0:
            raise MinibloomError(f"data: {data}: the held-out conversations have no assistant reply tokens: the "
                                 "validation set would be empty")
    else:
        train_ids, val_ids, val_rows = encode(tok, text_train), encode(tok, text_val), None
        if len(train_ids) < cfg.ctx + 1:
            raise MinibloomError(f"data: the training text has {len(train_ids)} tokens, fewer than a window "
                                 f"(ctx {cfg.ctx} + 1)")
        if len(val_ids) < 2:
            raise MinibloomError(f"data: the held-out text (the last val_fraction {cfg.val_fraction:g}) has "
                                 f"{len(val_ids)} tokens: the validation set would be empty")
    # ---- optimizer
    writable(m)
    flat = hf_names(m.params)  # the model's own arrays: AdamW updates them in place
    opt = AdamW(flat, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
    if opt_state is not None:
        try:
            opt.load_state_dict({"step": meta["optimizer_step"], **opt_state})
        except MinibloomError as e:
            raise MinibloomError(f"resume: {resume}: {e}") from None
    result = TrainResult(m, out)
    extra = {"data": None if data is None else os.path.abspath(data), "chat_template": chat_template}
    micro = cfg.batch // cfg.accumulate
    if m.backend.name == "numpy":
        reuse_freed_memory()
    last_good = f"the last checkpoint ({resume}) is left as it was" if resume else "nothing was saved"
    bar = _bar(cfg.steps, start, progress)
    t0, tokens = time.perf_counter(), 0
    for step in range(start, cfg.steps):
        lr = lr_at(step, cfg.lr, cfg.warmup, cfg.steps, cfg.min_lr_ratio)
        batches = []
        for _ in range(cfg.accumulate):
            if chat_template is None:
                x, labels = random_windows(train_ids, micro, cfg.ctx, rng)
                batches.append((x, np.ones_like(x), labels))
            else:
                pick = rng.integers(0, len(train_rows), size=micro)
                batches.append(conversation_batch([train_rows[i] for i in pick], cfg.ctx, pad_id))
        try:
            loss, norm, n = train_step(m, opt, batches, lr, cfg.grad_clip)
        except Diverged as e:
            bar.close()
            raise Diverged(f"train: step {step + 1} of {cfg.steps} (lr {lr:g}): {e}; the run stopped and "
                           f"{last_good} (a lower lr, or grad_clip, keeps it finite)") from None
        if n == 0:
            continue  # nothing scored in this step's conversations
        tokens += n
        rate = tokens / (time.perf_counter() - t0)
        result.history.append({"step": step + 1, "loss": loss, "lr": lr, "grad_norm": norm, "tokens_per_s": rate})
        bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{rate:,.0f}", refresh=False)
        bar.update(1)
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
            ev = _evaluate(m, val_ids, val_rows, cfg, pad_id, cfg.eval_windows)
            _finite_run(m, ev["loss"], f"step {step + 1}", last_good, bar)
            result.evals.append({"step": step + 1, **ev})
            log(f"step {step + 1}: held-out loss {result.evals[-1]['loss']:.4f}")
        if out and cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
            _finite_run(m, loss, f"step {step + 1}", last_good, bar)
            name = f"checkpoint-{step + 1}"
            save(os.path.join(out, name), m, opt, cfg, step + 1, rng, extra)
            keep.append(name)
            last_good = f"the last good checkpoint is {os.path.join(out, name)}"
    bar.close()
    wall = time.perf_counter() - t0
    final = _evaluate(m, val_ids, val_rows, cfg, pad_id, None)
    _finite_run(m, final["loss"], "the end", last_good, None)
    result.evals.append({"step": cfg.steps, **final})
    result.metrics = {"steps": cfg.steps, "train_wall_s": round(wall, 1), "tokens_seen": tokens,
                      "tokens_per_s": round(tokens / wall, 1) if wall > 0 else None,
                      "val_loss": final["loss"], "val_ppl": final["perplexity"], "val_tokens": final["tokens"]}
    if out:
        save(out, m, opt, cfg, cfg.steps, rng, {**extra, "metrics": result.metrics}, save_dtype,
             keep=tuple(dict.fromkeys(keep)))
        if save_dtype not in (None, cfg.dtype):  # the release as stored (e.g. float16), measured again
            stored = load(out, dtype="float32", progress=False)
            as_saved = _evaluate(stored, val_ids, val_rows, cfg, pad_id, None)
            result.metrics.update(save_dtype=save_dtype, val_loss_as_saved=as_saved["loss"],
                                  val_ppl_as_saved=as_saved["perplexity"])
        source = None if model is None else str(getattr(model, "path", model))
        command = command_line(cfg, out, data, tokenizer, source, chat_template, save_dtype)
        result.metrics.update(command=command, n_params=m.n_params, data=extra["data"], chat_template=chat_template)
        with open(os.path.join(out, "metrics.json"), "w") as f:
            json.dump(json_safe(result.metrics), f, indent=1, allow_nan=False)
        with open(os.path.join(out, "README.md"), "w", encoding="utf-8") as f:
            f.write(model_card(m, cfg, result.metrics, command))
    return result


DIVERGED_FACTOR = 10  # a held-out loss this many times a uniform guess's is a diverged run, not a bad model


def _finite_run(m: Bloom, loss: float, when: str, last_good: str, bar) -> None:
    """Raise ``Diverged`` if the held-out ``loss`` or any weight of ``m`` is not finite, or the loss is over
    ``DIVERGED_FACTOR`` times a uniform guess's (log of the vocabulary): nothing is saved then."""
    uniform = math.log(max(2, m.vocab_size))
    bad = None if math.isfinite(loss) else f"the held-out loss is {loss}"
    if bad is None and loss > DIVERGED_FACTOR * uniform:
        bad = (f"the held-out loss is {loss:.4g} nats/token, over {DIVERGED_FACTOR}x a uniform guess's "
               f"({uniform:.3g})")
    if bad is None:
        be = m.backend
        for name, p in hf_names(m.params).items():
            a = be.to_numpy(p)
            with np.errstate(over="ignore", invalid="ignore"):
                if not np.isfinite(np.add.reduce(a.reshape(-1), dtype=np.float64)) and not np.isfinite(a).all():
                    bad = f"the weight {name} holds NaN or inf"
                    break
    if bad is not None:
        if bar is not None:
            bar.close()
        raise Diverged(f"train: at {when}, {bad}: the run diverged and stopped; {last_good} (a lower lr keeps it "
                       "finite)")


def writable(model: Bloom) -> None:
    """Give ``model`` its own writable copy of any read-only weight (a zero-copy view of a mapped file)."""
    def own(a):
        return np.array(a) if isinstance(a, np.ndarray) and not a.flags.writeable else a

    model.params = tree_map(own, model.params)


def train_step(model: Bloom, opt: AdamW, batches, lr: float, grad_clip: float = 1.0) -> tuple[float, float, int]:
    """One optimizer step on the mean gradient of ``batches`` [(ids, attention_mask, labels), ...] (gradient
    accumulation: each micro-batch's mean loss weighs 1 / len(batches)), clipped to ``grad_clip`` (0: not clipped).
    Returns (mean loss, gradient norm before clipping, tokens); a micro-batch with nothing labelled is skipped."""
    be, grads, loss, tokens = model.backend, None, 0.0, 0
    batches = [b for b in batches if (np.asarray(b[2])[:, 1:] != backward.IGNORE_INDEX).any()]
    for x, mask, labels in batches:
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):  # a diverging run is caught below
            lv, g = backward.value_and_grad(model.params, be.asarray(x), be.asarray(mask), be.asarray(labels),
                                            model.config, ops=model.primitives)
        g = hf_names(g)
        loss += float(be.to_numpy(lv)) / len(batches)
        tokens += int(np.asarray(x).size)
        if len(batches) > 1:
            for k in g:
                g[k] /= len(batches)
        if grads is None:
            grads = g
        else:
            for k in grads:
                grads[k] += g[k]
    if grads is None:
        return float("nan"), float("nan"), 0
    norm = clip_grad_norm(grads, grad_clip) if grad_clip else global_norm(grads)
    if not (math.isfinite(loss) and math.isfinite(norm)):  # an update would make every weight NaN
        raise Diverged(f"the loss is {loss} and the gradient norm {norm}")
    opt.step(grads, lr)
    return loss, norm, tokens


def _evaluate(m: Bloom, val_ids, val_rows, cfg: TrainConfig, pad_id: int, limit) -> dict:
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):  # a non-finite loss is checked after
        return _held_out(m, val_ids, val_rows, cfg, pad_id, limit)


def _held_out(m: Bloom, val_ids, val_rows, cfg: TrainConfig, pad_id: int, limit) -> dict:
    if val_rows is None:
        return evaluate(m, val_ids, cfg.ctx, limit)
    if not val_rows:
        raise MinibloomError("evaluate: the validation set is empty")
    x, mask, labels = conversation_batch(val_rows[:limit], cfg.ctx, pad_id)
    be = m.backend
    logits = be.asarray(m(x, mask).astype(np.float64))
    n = int((labels[:, 1:] != backward.IGNORE_INDEX).sum())
    loss = float(be.to_numpy(backward.cross_entropy(logits, be.asarray(labels))[0]))
    return {"loss": loss, "perplexity": perplexity_of(loss), "nats": loss * n, "tokens": n}


def _tokenizer(path: str | None, text: str, vocab: int):
    if path is None:
        return train_bpe(text, vocab)
    from ..tokenizer import load_tokenizer

    directory = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    tok = load_tokenizer(directory)
    if tok is None:
        raise MinibloomError(f"tokenizer: {path} holds no tokenizer.json")
    return tok


def _bar(total: int, initial: int, progress: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc="training", unit="step", disable=not progress, leave=True)
