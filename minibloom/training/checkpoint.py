"""A run's checkpoint: transformers' files (``config.json`` + ``model.safetensors``, loadable by ``from_pretrained``
unchanged, the tokenizer, a model card) plus ``trainer_state.safetensors`` / ``trainer_state.json`` (optimizer
moments, step, data-order RNG) so that a resumed run continues exactly; the checks of a checkpoint to resume and of
a folder to write one in.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import asdict, fields

import numpy as np

from ..bloom import Bloom, hf_names, load
from ..errors import MinibloomError, shown
from ..formats.weights import tree_map, write_checkpoint
from ..paths import new_dir, swap_in
from .config import TrainConfig, path_arg
from .data import tokenizer_config
from .optim import AdamW

STATE_JSON, STATE_TENSORS = "trainer_state.json", "trainer_state.safetensors"


def save(out: str, model: Bloom, opt: AdamW, cfg: TrainConfig, step: int, rng: np.random.Generator,
         extra: dict | None = None, save_dtype: str | None = None, keep: tuple = ()) -> str:
    """A checkpoint transformers loads (config.json, model.safetensors, tokenizer files) plus the trainer state.

    The weights are stored in the training dtype unless ``save_dtype`` asks otherwise; the trainer state then also
    holds the training-dtype weights, so resuming never starts from rounded ones. The checkpoint is written into a
    new directory beside ``out`` and then takes its place whole: nothing of an earlier checkpoint there (a shard, an
    index, a stale trainer state) survives, apart from the sub-directories named in ``keep`` (this run's own
    ``checkpoint-N``), and an interrupted save leaves the earlier one as it was."""
    target = os.path.abspath(os.fspath(out))
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    tmp = new_dir(parent, f".{os.path.basename(target)}.new-")
    try:
        _write_run(tmp, model, opt, cfg, step, rng, extra, save_dtype)
        swap_in(tmp, target, keep)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _write_run(out: str, model: Bloom, opt: AdamW, cfg: TrainConfig, step: int, rng: np.random.Generator,
               extra: dict | None, save_dtype: str | None) -> None:
    from ..formats.safetensors import save_file

    be = model.backend
    params = tree_map(be.to_numpy, model.params)
    write_checkpoint(out, model.config, params, save_dtype or model.dtype, metadata={"trained_by": "minibloom"})
    state = {k: be.to_numpy(v) for k, v in opt.state_dict().items() if k != "step"}
    if save_dtype not in (None, model.dtype):
        state.update({f"p.{k}": v for k, v in hf_names(params).items()})
    save_file(state, os.path.join(out, STATE_TENSORS))
    meta = {"step": step, "optimizer_step": opt.step_count, "rng": rng.bit_generator.state,
            "config": asdict(cfg), **(extra or {})}
    with open(os.path.join(out, STATE_JSON), "w") as f:
        json.dump(json_safe(meta), f, indent=1, default=int, allow_nan=False)
    if model.tokenizer is not None:
        model.tokenizer._tk.save(os.path.join(out, "tokenizer.json"))
        with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
            json.dump(model.tokenizer.config or tokenizer_config(), f, indent=1)
    with open(os.path.join(out, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3, "do_sample": True,
                   "temperature": 0.8, "top_k": 40, "max_new_tokens": 200}, f, indent=1)


CHECKPOINT_FILES = re.compile(  # what a checkpoint folder (ours or transformers') holds: `out` may replace these
    r"(config\.json|generation_config\.json|model(-\d+-of-\d+)?\.safetensors(\.part)?|model\.safetensors\.index\.json"
    r"|pytorch_model(-\d+-of-\d+)?\.bin|pytorch_model\.bin\.index\.json|tokenizer\.json|tokenizer_config\.json"
    r"|special_tokens_map\.json|trainer_state\.json|trainer_state\.safetensors(\.part)?|metrics\.json|README\.md"
    r"|\.gitattributes|checkpoint-\d+)")


def check_out(out, what: str = "out") -> str:
    """``out`` (a str) if a run can be written there: a new directory (its missing parents are made now, as
    ``mkdir -p`` would), or an earlier checkpoint (which the run replaces whole). A file on the way, an unwritable
    place, or a directory holding anything else (whose files would be lost) is a MinibloomError naming it, before
    any work."""
    out = path_arg(out, what)
    target = os.path.abspath(out)
    parent = os.path.dirname(target)
    if os.path.lexists(target) and not os.path.isdir(target):
        raise MinibloomError(f"{what}: {out} exists and is not a directory")
    if not os.path.isdir(parent):
        try:
            os.makedirs(parent, exist_ok=True)
        except OSError as e:
            raise MinibloomError(f"{what}: {out}: cannot create the directory {parent} ({e.strerror or e})") from None
    _probe(parent, f"{what}: {out}: cannot write in {parent}")
    if os.path.isdir(target):
        _probe(target, f"{what}: {out}: cannot write in it")
        for name in sorted(os.listdir(target)):
            if not CHECKPOINT_FILES.fullmatch(name) and not name.startswith("."):
                raise MinibloomError(f"{what}: {out} already holds {name!r}, which is no part of a checkpoint; give "
                                     "a new or empty directory (an earlier run there is replaced whole)")
    return out


def _probe(directory: str, message: str) -> None:
    """Make and remove a directory in ``directory`` (``os.access`` says yes to root, even on /proc)."""
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".minibloom-probe-", dir=directory))
    except OSError as e:
        raise MinibloomError(f"{message} ({e.strerror or e})") from None


def json_safe(value):
    """``value`` with every NaN or infinite float replaced by None (null): JSON has no NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, np.floating):
        return json_safe(float(value))
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def read_state(path) -> dict:
    """``trainer_state.json`` of a checkpoint ``save`` wrote, checked as strictly as a checkpoint before anything is
    loaded: the saved config typed and bounded, ``step`` an integer in [0, config steps], ``optimizer_step`` in
    [0, step], the data-order state of this generator's type and range, ``data`` and ``chat_template`` strings (or
    null). The config comes back as a checked ``TrainConfig`` under "config"."""
    from ..jsonfile import read_json_object

    path = path_arg(path, "resume")
    meta_path = os.path.join(path, STATE_JSON)
    if not os.path.isdir(path) or not os.path.isfile(meta_path):
        raise MinibloomError(f"resume: {path} holds no {STATE_JSON} (not a checkpoint minibloom train wrote)")
    meta = read_json_object(meta_path, max_bytes=1 << 20)
    where = f"resume: {meta_path}"
    conf = meta.get("config")
    step = meta.get("step")
    if not isinstance(conf, dict) or conf.get("dtype") not in ("float32", "float64") or \
            not isinstance(step, int) or isinstance(step, bool):
        raise MinibloomError(f"{where} is not a trainer state minibloom train wrote (no step / dtype)")
    unknown = sorted(set(conf) - {f.name for f in fields(TrainConfig)})
    if unknown:
        raise MinibloomError(f"{where}: the saved training config is not readable (unknown field {unknown[0]!r})")
    try:
        saved = TrainConfig(**conf)
        saved.check()
    except MinibloomError as e:
        raise MinibloomError(f"{where}: config: {e}") from None
    if not 0 <= step <= saved.steps:
        raise MinibloomError(f"{where}: step {shown(step)} is outside [0, {saved.steps}] (the run's steps)")
    opt_step = meta.get("optimizer_step")
    if not isinstance(opt_step, int) or isinstance(opt_step, bool) or not 0 <= opt_step <= step:
        raise MinibloomError(f"{where}: optimizer_step must be an integer in [0, step {step}], got {shown(opt_step)}")
    for key in ("data", "chat_template"):
        if meta.get(key) is not None and not isinstance(meta[key], str):
            raise MinibloomError(f"{where}: {key} must be a string or null, got {shown(meta[key])}")
    if meta.get("chat_template") is not None:
        from ..chat import get

        get(meta["chat_template"])
    check_rng_state(meta.get("rng"), where)
    return {**meta, "config": saved}


def check_rng_state(state, where: str) -> None:
    """A ``PCG64`` state as ``Generator.bit_generator.state`` gives it (what ``save`` writes), every field in range:
    NumPy itself raises OverflowError or TypeError from deep inside for a 2^200 or a string."""
    def bad(why: str):
        return MinibloomError(f"{where}: the saved data-order state is not readable ({why})")

    if not isinstance(state, dict) or state.get("bit_generator") != "PCG64":
        raise bad(f"expected a PCG64 state, got {shown(state)}")
    if set(state) != {"bit_generator", "state", "has_uint32", "uinteger"}:
        raise bad(f"fields {sorted(state)}")
    inner = state["state"]
    if not isinstance(inner, dict) or set(inner) != {"state", "inc"}:
        raise bad(f"state must hold 'state' and 'inc', got {shown(inner)}")
    for key, value, top in (("state", inner["state"], 2**128), ("inc", inner["inc"], 2**128),
                            ("has_uint32", state["has_uint32"], 2), ("uinteger", state["uinteger"], 2**32)):
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < top:
            raise bad(f"{key} must be an integer in [0, {top}), got {shown(value)}")


def load_run(path: str, backend: str, meta: dict):
    """(model in its training dtype, optimizer tensors) of a checkpoint ``save`` wrote (``meta``: ``read_state``)."""
    from ..formats.safetensors import SafetensorsFile
    from ..formats.widen import check_finite

    model = load(path, dtype=meta["config"].dtype, backend=backend, progress=False)
    with SafetensorsFile(os.path.join(path, STATE_TENSORS)) as f:
        if len(f.names) > 3 * len(hf_names(model.params)):
            raise MinibloomError(f"resume: {f.path}: {len(f.names)} tensors, more than this model's state holds")
        tensors = {name: np.array(f.get(name)) for name in f.names}  # copies: the map closes
    be = model.backend
    exact = {k[2:]: v for k, v in tensors.items() if k.startswith("p.")}
    if exact:  # the weights as trained (model.safetensors holds them rounded)
        flat = hf_names(model.params)
        for name, value in exact.items():
            if name not in flat or tuple(flat[name].shape) != tuple(value.shape):
                raise MinibloomError(f"resume: {path}: the trained weight {name} does not fit the model")
            check_finite(value, f"resume: {path}: {STATE_TENSORS}: p.{name}")
            flat[name][...] = be.asarray(np.asarray(value, dtype=model.dtype))
    return model, {k: v for k, v in tensors.items() if not k.startswith("p.")}


def command_line(cfg: TrainConfig, out: str, data: str | None, tokenizer: str | None, model: str | None,
                 chat_template: str | None, save_dtype: str | None) -> str:
    """The ``minibloom train`` command that repeats a run (every choice spelled out)."""
    d = cfg
    parts = ["minibloom train", f"--out {out}"]
    parts += [f"--data {data}"] if data else []
    parts += [f"--model {model}"] if model else []
    parts += [f"--chat {chat_template}"] if chat_template else []
    if not model:
        parts += [f"--tokenizer {tokenizer}" if tokenizer else f"--vocab {d.vocab}", f"--vocab-rows {d.vocab_rows}",
                  f"--hidden {d.hidden}", f"--layers {d.layers}", f"--heads {d.heads}"] + (["--post-ln"] if d.post_ln
                                                                                           else [])
    parts += [f"--seed {d.seed}", f"--ctx {d.ctx}", f"--batch {d.batch}"] + \
        ([f"--accumulate {d.accumulate}"] if d.accumulate > 1 else []) + \
        [f"--steps {d.steps}", f"--lr {d.lr:g}", f"--warmup {d.warmup}", f"--min-lr-ratio {d.min_lr_ratio:g}",
         f"--weight-decay {d.weight_decay:g}", f"--beta2 {d.betas[1]:g}", f"--grad-clip {d.grad_clip:g}",
         f"--dtype {d.dtype}"] + ([f"--save-dtype {save_dtype}"] if save_dtype else [])
    return " ".join(parts)


def model_card(m: Bloom, cfg: TrainConfig, metrics: dict, command: str) -> str:
    """README.md for a checkpoint ``minibloom train`` wrote: what it is, how it was trained, its held-out figures."""
    c = m.config
    saved = (f"; as stored ({metrics['save_dtype']}): perplexity **{metrics['val_ppl_as_saved']:.2f}**"
             if "val_ppl_as_saved" in metrics else "")
    return f"""# A BLOOM trained by minibloom

A `BloomForCausalLM` (ALiBi, embedding LayerNorm, fused QKV{", tied LM head" if c.tie_word_embeddings else ""}) with
{c.n_layer} layers, hidden size {c.hidden_size}, {c.n_head} heads and {m.vocab_size} embedding rows:
**{m.n_params:,} parameters**. transformers' `BloomForCausalLM.from_pretrained` and `minibloom.load` both read it.

- **Data**: {metrics.get("data") or "the bundled Tiny Shakespeare"}; the last {cfg.val_fraction:.0%} (by
  {"conversations" if metrics.get("chat_template") else "characters"}) is held out.
- **Training**: minibloom's NumPy backward pass (`minibloom.backward`) and AdamW (betas {cfg.betas[0]}/{cfg.betas[1]},
  weight decay {cfg.weight_decay} on matrices), lr {cfg.lr:g} with {cfg.warmup} warm-up steps then cosine decay to
  {cfg.lr * cfg.min_lr_ratio:g}, gradient norm clipped at {cfg.grad_clip:g}, batch {cfg.batch} x {cfg.ctx} tokens,
  seed {cfg.seed}, {cfg.dtype}, no dropout: {metrics["steps"]} steps = {metrics["tokens_seen"]:,} tokens in
  {metrics["train_wall_s"] / 60:.1f} min ({metrics["tokens_per_s"]:,.0f} tokens/s).
- **Held-out** ({metrics["val_tokens"]:,} scored tokens, consecutive {cfg.ctx}-token windows): loss
  **{metrics["val_loss"]:.4f}** nats/token, perplexity **{metrics["val_ppl"]:.2f}**{saved}.

Reproduce:

    {command}

`metrics.json` holds these figures; `trainer_state.json` / `trainer_state.safetensors` let `minibloom train --resume`
continue the run exactly.
"""
