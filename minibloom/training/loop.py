"""Training BLOOM with nothing but NumPy: data, the loop, evaluation, checkpoints that resume exactly.

References:
- karpathy/nanoGPT ``train.py`` (random windows of a token stream, AdamW, warm-up + cosine, gradient accumulation,
  clipping, periodic evaluation) and karpathy/llm.c ``train_gpt2.c``.
- rasbt/LLMs-from-scratch, chapters 5 (pre-training) and 7 (instruction fine-tuning: loss on the response only).
- The maths is ``minibloom.model.forward`` + ``minibloom.backward`` + ``minibloom.optim``; this module only feeds it.

``train(...)`` (and ``minibloom train``) either trains a new BLOOM from a seed on a text file (by default the bundled
Tiny Shakespeare), with the tokenizer of a model or a new byte-level BPE with BLOOM's pre-tokenizer, or fine-tunes a
loaded checkpoint (any format minibloom reads, dequantized), optionally on conversations rendered with a chat
template and scored on the assistant turns only. Checkpoints are transformers' files (``config.json`` +
``model.safetensors``, loadable by ``from_pretrained`` unchanged) plus ``trainer_state.safetensors`` /
``trainer_state.json`` (optimizer moments, step, data-order RNG) so that a resumed run continues exactly.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields, replace

import numpy as np

from . import backward, textfile
from .backend import reuse_freed_memory
from .bloom import Bloom, hf_names, load
from .config import BloomConfig
from .errors import MinibloomError, shown
from .formats.weights import expected_shapes, nest, tree_map, write_checkpoint
from .optim import AdamW, clip_grad_norm, global_norm, lr_at, number
from .paths import corpus_path, new_dir, swap_in

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")  # ids 0..3, as in BLOOM
BLOOM_SPLIT = " ?[^(\\s|[.,!?…。，、।۔،])]+"  # bigscience/bloom tokenizer.json's Split regex, verbatim
STATE_JSON, STATE_TENSORS = "trainer_state.json", "trainer_state.safetensors"


@dataclass
class TrainConfig:
    """Every choice of a run; saved in ``trainer_state.json`` and the model card. Defaults: the default model's."""

    steps: int = 458
    batch: int = 16  # sequences per optimizer step (split into ``accumulate`` micro-batches)
    accumulate: int = 1
    ctx: int = 256  # tokens per training window
    lr: float = 2e-3
    warmup: int = 100
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    betas: tuple = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0: no clipping
    seed: int = 1234
    dtype: str = "float32"
    val_fraction: float = 0.1  # the last 10% of the text's characters are held out
    eval_every: int = 0  # 0: evaluate at the end only
    eval_windows: int = 32  # held-out windows of a periodic evaluation (the final one uses all)
    save_every: int = 0
    # a new model (ignored when fine-tuning)
    vocab: int = 2000
    vocab_rows: int = 2048
    hidden: int = 256
    layers: int = 4
    heads: int = 8
    post_ln: bool = False
    init_std: float = 0.02  # transformers' initializer_range

    def check(self) -> None:
        """Every field typed and within its bounds (a MinibloomError naming the field otherwise), before any work."""
        for name, (low, high) in INT_BOUNDS.items():
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or isinstance(v, (bool, np.bool_)) or not low <= v <= high:
                raise MinibloomError(f"{name}: must be an integer in [{low}, {high}], got {shown(v)}")
            setattr(self, name, int(v))
        if self.batch % self.accumulate:
            raise MinibloomError(f"accumulate: {self.accumulate} does not divide batch {self.batch}")
        if self.ctx < 2:
            raise MinibloomError(f"ctx: a window needs at least 2 tokens, got {self.ctx}")
        for name in ("lr", "weight_decay", "eps", "grad_clip", "init_std"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) \
                    or not math.isfinite(v) or v < 0:
                raise MinibloomError(f"{name}: must be a finite number >= 0, got {shown(v)}")
            setattr(self, name, float(v))
        self.min_lr_ratio = number("min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        if not isinstance(self.betas, (tuple, list)) or len(self.betas) != 2:
            raise MinibloomError(f"betas: must be a pair of numbers in [0, 1), got {shown(self.betas)}")
        self.betas = tuple(number("betas", b, 0.0, 1.0, hi_open=True) for b in self.betas)
        self.val_fraction = number("val_fraction", self.val_fraction, 0.0, 1.0)
        if not 0 < self.val_fraction < 1:
            raise MinibloomError(f"val_fraction: must be between 0 and 1, got {self.val_fraction!r}")
        if not isinstance(self.dtype, str) or self.dtype not in ("float32", "float64"):
            raise MinibloomError(f"dtype: train in 'float32' or 'float64', not {shown(self.dtype)}")
        if not isinstance(self.post_ln, (bool, np.bool_)):
            raise MinibloomError(f"post_ln: must be true or false, got {shown(self.post_ln)}")
        if self.hidden % self.heads:
            raise MinibloomError(f"hidden: {self.hidden} is not divisible by heads {self.heads}")
        if self.vocab < MIN_VOCAB:
            raise MinibloomError(f"vocab: {self.vocab} entries cannot hold the byte-level alphabet (256 bytes and "
                                 f"{len(SPECIAL_TOKENS)} special tokens: at least {MIN_VOCAB})")
        if self.vocab_rows < self.vocab:
            raise MinibloomError(f"vocab_rows: {self.vocab_rows} rows cannot hold a {self.vocab}-token vocabulary")
        n = self.vocab_rows * self.hidden + self.layers * 12 * self.hidden * (self.hidden + 1)
        if n > MAX_NEW_PARAMS:
            raise MinibloomError(f"hidden/layers/vocab_rows: a new model of {n:,} parameters is more than the "
                                 f"{MAX_NEW_PARAMS:,} minibloom trains in NumPy")


INT_BOUNDS = {  # (low, high) of every integer field: far beyond any NumPy run, small enough never to overflow
    "steps": (1, 10**9), "batch": (1, 2**16), "accumulate": (1, 2**16), "ctx": (1, 2**20),
    "eval_windows": (1, 10**9), "vocab": (1, 2**24), "vocab_rows": (1, 2**24), "hidden": (1, 2**16),
    "layers": (1, 2**12), "heads": (1, 2**12), "warmup": (0, 10**9), "eval_every": (0, 10**9),
    "save_every": (0, 10**9), "seed": (0, 2**63 - 1)}
MIN_VOCAB = 256 + 4  # the 256 byte tokens and SPECIAL_TOKENS
MAX_NEW_PARAMS = 2 * 10**10  # a new model's parameters (embedding + blocks) at most


def _integer(name: str, v, lo: int, hi: int) -> int:
    if not isinstance(v, (int, np.integer)) or isinstance(v, (bool, np.bool_)) or not lo <= v <= hi:
        raise MinibloomError(f"{name}: must be an integer in [{lo}, {hi}], got {shown(v)}")
    return int(v)


def _token_ids(ids) -> np.ndarray:
    a = np.asarray(ids) if isinstance(ids, (np.ndarray, list, tuple)) else None
    if a is None or a.ndim != 1 or (a.size and a.dtype.kind not in "iu"):
        raise MinibloomError(f"ids: expected a 1-d array of token ids, got {shown(ids)}")
    return a.astype(np.int64, copy=False)


# ---------------------------------------------------------------------------------------------------------------
# Data


def read_text(path: str | None) -> str:
    """The training text: ``path``, or the bundled Tiny Shakespeare when None."""
    return textfile.read_text(corpus_path() if path is None else path, "data")


def split_text(text: str, val_fraction: float) -> tuple[str, str]:
    """By characters: the first (1 - val_fraction) trains, the rest is held out."""
    if not isinstance(text, str):
        raise MinibloomError(f"split_text: text must be a str, got {type(text).__name__}")
    val_fraction = number("val_fraction", val_fraction, 0.0, 1.0)
    cut = int(len(text) * (1 - val_fraction))
    return text[:cut], text[cut:]


def train_bpe(text: str, vocab_size: int):
    """A byte-level BPE with the structure of bigscience/bloom's tokenizer.json (Split regex, then ByteLevel without
    prefix space, no normalizer; special tokens <unk> <s> </s> <pad> = 0..3; all 256 bytes in the alphabet, so any
    text encodes), trained on ``text``. Returns a ``minibloom.tokenizer.Tokenizer``."""
    if not isinstance(text, str):
        raise MinibloomError(f"train_bpe: text must be a str, got {type(text).__name__}")
    _integer("vocab", vocab_size, MIN_VOCAB, INT_BOUNDS["vocab"][1])
    from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTokenizer

    from .tokenizer import Tokenizer

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(BLOOM_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([text], trainer=trainer)
    return Tokenizer(tok, tokenizer_config(), None)


def tokenizer_config() -> dict:
    """``tokenizer_config.json`` of a BLOOM tokenizer trained here (left padding, BLOOM's special tokens)."""
    added = {str(i): {"content": s, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                      "special": True} for i, s in enumerate(SPECIAL_TOKENS)}
    return {"tokenizer_class": "BloomTokenizerFast", "add_prefix_space": False, "clean_up_tokenization_spaces": False,
            "padding_side": "left", "unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>",
            "pad_token": "<pad>", "model_max_length": 1_000_000, "added_tokens_decoder": added}


def encode(tokenizer, text: str) -> np.ndarray:
    """Token ids of ``text`` (int64), encoded in chunks of 2000 lines (BPE never merges across a newline)."""
    if not isinstance(text, str):
        raise MinibloomError(f"encode: text must be a str, got {type(text).__name__}")
    lines = text.splitlines(keepends=True)
    chunks = ["".join(lines[i:i + 2000]) for i in range(0, len(lines), 2000)]
    ids = [i for row in tokenizer.encode(chunks) for i in row] if chunks else []
    return np.asarray(ids, dtype=np.int64)


def random_windows(ids: np.ndarray, n: int, ctx: int, rng: np.random.Generator):
    """``n`` windows of ``ctx`` tokens at random starts (nanoGPT's ``get_batch``) -> (ids [n, ctx], labels)."""
    ids = _token_ids(ids)
    n, ctx = _integer("n", n, 1, INT_BOUNDS["batch"][1]), _integer("ctx", ctx, 1, len(ids))
    starts = rng.integers(0, len(ids) - ctx + 1, size=n)
    x = np.stack([ids[s:s + ctx] for s in starts])
    return x, x


def eval_windows(ids: np.ndarray, ctx: int, limit: int | None = None) -> list[np.ndarray]:
    """Consecutive windows ``ids[s : s + ctx + 1]``, s = 0, ctx, 2 ctx ...: each reads up to ``ctx`` tokens and
    predicts the next, so every token after the first is scored exactly once (context restarts every ctx tokens)."""
    ids, ctx = _token_ids(ids), _integer("ctx", ctx, 1, INT_BOUNDS["ctx"][1])
    if limit is not None:
        limit = _integer("limit", limit, 0, INT_BOUNDS["eval_windows"][1])
    return [ids[s:s + ctx + 1] for s in range(0, len(ids) - 1, ctx)][:limit]


def evaluate(model: Bloom, ids: np.ndarray, ctx: int, limit: int | None = None, batch: int = 16) -> dict:
    """Held-out cross entropy of ``ids``: {"loss" (nats per token), "perplexity", "nats", "tokens"}."""
    if not isinstance(model, Bloom):
        raise MinibloomError(f"evaluate: model must be a minibloom.Bloom, got {type(model).__name__}")
    batch = _integer("batch", batch, 1, INT_BOUNDS["batch"][1])
    windows = eval_windows(ids, ctx, limit)
    if not windows:
        raise MinibloomError("evaluate: the held-out text has fewer than 2 tokens")
    full = [w for w in windows if len(w) == ctx + 1]
    groups = [full[i:i + batch] for i in range(0, len(full), batch)] + [[w] for w in windows if len(w) != ctx + 1]
    nats, count = 0.0, 0
    for g in groups:
        x = np.stack(g)
        logits = model(x[:, :-1])  # [n, T, V]
        nats += float(backward.token_nll(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1)).sum())
        count += x[:, 1:].size
    return {"loss": nats / count, "perplexity": perplexity_of(nats / count), "nats": nats, "tokens": count}


# ---- conversations (fine-tuning on the assistant turns) ---------------------------------------------------------


def read_conversations(path: str) -> list[list[dict]]:
    """A JSON Lines file, one conversation per line: ``{"messages": [{"role", "content"}, ...]}`` or the bare list."""
    from .chat import check_messages
    from .jsonfile import parse_json

    convs = []
    for n, line in enumerate(textfile.read_text(path, "data").splitlines(), 1):
        if not line.strip():
            continue
        obj = parse_json(line, f"{path}: line {n}")
        msgs = obj.get("messages") if isinstance(obj, dict) else obj
        try:
            msgs = check_messages(msgs)
        except MinibloomError as e:
            raise MinibloomError(f"{path}: line {n}: {e}") from None
        if not any(m["role"] == "assistant" for m in msgs):
            raise MinibloomError(f"{path}: line {n}: no assistant turn to learn from")
        convs.append(msgs)
    if not convs:
        raise MinibloomError(f"{path}: no conversations (one JSON object per line: {{\"messages\": [...]}})")
    return convs


def conversation_tokens(tokenizer, messages: list[dict], template: str) -> tuple[np.ndarray, np.ndarray]:
    """(ids, labels) of one conversation rendered with ``template``: labels are the ids on each assistant reply
    (its text and the template's end of turn) and -100 elsewhere (system and user turns, the assistant's tag)."""
    from .chat import get

    t = get(template)
    ids, labels = [], []
    for m in messages:
        turn = t.turn(m["role"], m["content"])
        at = turn.find(m["content"]) if m["role"] == "assistant" and m["content"] else -1
        parts = [(turn, False)] if at < 0 else [(turn[:at], False), (turn[at:], True)]
        for text, scored in parts:
            if text:
                row = tokenizer.encode(text)
                ids += row
                labels += row if scored else [backward.IGNORE_INDEX] * len(row)
    return np.asarray(ids, np.int64), np.asarray(labels, np.int64)


def conversation_batch(rows: list[tuple[np.ndarray, np.ndarray]], ctx: int, pad_id: int):
    """Left-padded (ids, mask, labels) [n, T] of up to ``ctx`` tokens each (longer conversations keep their end)."""
    rows = [(i[-ctx:], lab[-ctx:]) for i, lab in rows]
    T = max(len(i) for i, _ in rows)
    ids = np.full((len(rows), T), pad_id, np.int64)
    mask = np.zeros((len(rows), T), np.int64)
    labels = np.full((len(rows), T), backward.IGNORE_INDEX, np.int64)
    for r, (i, lab) in enumerate(rows):
        ids[r, T - len(i):], mask[r, T - len(i):], labels[r, T - len(i):] = i, 1, lab
    return ids, mask, labels


# ---------------------------------------------------------------------------------------------------------------
# Models


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
    from .formats.safetensors import save_file

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
    out = _path_arg(out, what)
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


def _path_arg(v, what: str) -> str:
    if isinstance(v, bytes):
        try:
            v = os.fsdecode(v)
        except (UnicodeDecodeError, ValueError):
            raise MinibloomError(f"{what}: {v!r} is not a usable path") from None
    if not isinstance(v, (str, os.PathLike)):
        raise MinibloomError(f"{what}: expected a path, got {shown(v)}")
    v = os.fspath(v)
    if isinstance(v, bytes):
        return _path_arg(v, what)
    if not v or "\x00" in v:
        raise MinibloomError(f"{what}: {v!r} is not a usable path")
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        raise MinibloomError(f"{what}: {v!r} is not a usable path (not UTF-8)") from None
    return v


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


def perplexity_of(loss: float) -> float:
    """exp(loss), inf once it overflows a float (a diverged run's loss is not an OverflowError)."""
    return math.exp(loss) if loss < 709 else (loss if math.isnan(loss) else math.inf)


def read_state(path) -> dict:
    """``trainer_state.json`` of a checkpoint ``save`` wrote, checked as strictly as a checkpoint before anything is
    loaded: the saved config typed and bounded, ``step`` an integer in [0, config steps], ``optimizer_step`` in
    [0, step], the data-order state of this generator's type and range, ``data`` and ``chat_template`` strings (or
    null). The config comes back as a checked ``TrainConfig`` under "config"."""
    from .jsonfile import read_json_object

    path = _path_arg(path, "resume")
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
        from .chat import get

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


def _resume(path: str, backend: str, meta: dict):
    """(model in its training dtype, optimizer tensors) of a checkpoint ``save`` wrote (``meta``: ``read_state``)."""
    from .formats.safetensors import SafetensorsFile
    from .formats.widen import check_finite

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


def _check_args(data, model, out, tokenizer, chat_template, resume, backend, save_dtype, progress, log) -> None:
    """train()'s arguments other than the config, typed and checked before any work."""
    from .formats.weights import STORED

    if resume is not None and any(v is not None for v in (data, model, tokenizer, chat_template)):
        raise MinibloomError("resume: a resumed run continues with its own model, tokenizer and data; give none of "
                             "data, model, tokenizer, chat_template")
    if model is not None and not isinstance(model, Bloom):
        _path_arg(model, "model")
    if model is not None and tokenizer is not None:
        raise MinibloomError("tokenizer: a fine-tuned model keeps its own tokenizer; give model or tokenizer")
    if chat_template is not None:
        if not isinstance(chat_template, str):
            raise MinibloomError(f"chat_template: expected a template name, got {shown(chat_template)}")
        from .chat import get

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
        tokenizer = _path_arg(tokenizer, "tokenizer")
        if not os.path.isdir(tokenizer):
            from .textfile import check_regular

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


def check_memory(cfg: TrainConfig, hidden: int, layers: int, heads: int, vocab_rows: int) -> None:
    """Refuse a run that cannot fit this machine's memory, before anything is allocated: the weights, their gradients
    and AdamW's two moments, plus a lower estimate of one micro-batch's activations (a few per layer, the attention
    scores, the logits and their gradient). Each is a MinibloomError naming the options that set it."""
    from .formats.lowmem import physical_memory

    item = np.dtype(cfg.dtype).itemsize
    n_params = vocab_rows * hidden + layers * 12 * hidden * (hidden + 1)
    micro, ctx = cfg.batch // cfg.accumulate, cfg.ctx
    weights = 4 * n_params * item
    acts = item * (micro * ctx * (layers * 10 * hidden + 2 * vocab_rows) + layers * micro * heads * ctx * ctx)
    ram = physical_memory()
    if weights + acts > ram:
        raise MinibloomError(f"batch/ctx/model size: a training step needs at least {(weights + acts) / 2**30:.1f} "
                             f"GiB ({weights / 2**30:.1f} GiB of weights, gradients and moments, "
                             f"{acts / 2**30:.1f} GiB of activations for {micro} x {ctx} tokens), more than this "
                             f"machine's {ram / 2**30:.1f} GiB: lower batch or ctx, or raise accumulate")


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
    from .textfile import check_regular

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
            data = check_regular(_path_arg(data, "data"), "data")
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
        m, opt_state = _resume(resume, backend, meta)
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
        from .backend import Backend

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
    from .tokenizer import load_tokenizer

    directory = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    tok = load_tokenizer(directory)
    if tok is None:
        raise MinibloomError(f"tokenizer: {path} holds no tokenizer.json")
    return tok


def _bar(total: int, initial: int, progress: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc="training", unit="step", disable=not progress, leave=True)
