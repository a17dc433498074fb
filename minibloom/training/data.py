"""Training data: the text and its split, a BPE tokenizer with BLOOM's structure, token windows, conversations
scored on the assistant turns only, and the held-out loss.

References:
- karpathy/nanoGPT ``train.py`` (``get_batch``: random windows of a token stream).
- rasbt/LLMs-from-scratch, chapter 7 (instruction fine-tuning: loss on the response only).
- bigscience/bloom's ``tokenizer.json`` (the pre-tokenizer's Split regex, ByteLevel, the special tokens).
"""

from __future__ import annotations

import math

import numpy as np

from .. import backward, textfile
from ..bloom import Bloom
from ..errors import MinibloomError, shown
from ..paths import corpus_path
from ..scoring import token_nll
from .config import INT_BOUNDS, MIN_VOCAB, SPECIAL_TOKENS, check_int
from .optim import number

BLOOM_SPLIT = " ?[^(\\s|[.,!?…。，、।۔،])]+"  # bigscience/bloom tokenizer.json's Split regex, verbatim


def _token_ids(ids) -> np.ndarray:
    a = np.asarray(ids) if isinstance(ids, (np.ndarray, list, tuple)) else None
    if a is None or a.ndim != 1 or (a.size and a.dtype.kind not in "iu"):
        raise MinibloomError(f"ids: expected a 1-d array of token ids, got {shown(ids)}")
    return a.astype(np.int64, copy=False)


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
    check_int("vocab", vocab_size, MIN_VOCAB, INT_BOUNDS["vocab"][1])
    from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTokenizer

    from ..tokenizer import Tokenizer

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
    n, ctx = check_int("n", n, 1, INT_BOUNDS["batch"][1]), check_int("ctx", ctx, 1, len(ids))
    starts = rng.integers(0, len(ids) - ctx + 1, size=n)
    x = np.stack([ids[s:s + ctx] for s in starts])
    return x, x


def eval_windows(ids: np.ndarray, ctx: int, limit: int | None = None) -> list[np.ndarray]:
    """Consecutive windows ``ids[s : s + ctx + 1]``, s = 0, ctx, 2 ctx ...: each reads up to ``ctx`` tokens and
    predicts the next, so every token after the first is scored exactly once (context restarts every ctx tokens)."""
    ids, ctx = _token_ids(ids), check_int("ctx", ctx, 1, INT_BOUNDS["ctx"][1])
    if limit is not None:
        limit = check_int("limit", limit, 0, INT_BOUNDS["eval_windows"][1])
    return [ids[s:s + ctx + 1] for s in range(0, len(ids) - 1, ctx)][:limit]


def evaluate(model: Bloom, ids: np.ndarray, ctx: int, limit: int | None = None, batch: int = 16) -> dict:
    """Held-out cross entropy of ``ids``: {"loss" (nats per token), "perplexity", "nats", "tokens"}."""
    if not isinstance(model, Bloom):
        raise MinibloomError(f"evaluate: model must be a minibloom.Bloom, got {type(model).__name__}")
    batch = check_int("batch", batch, 1, INT_BOUNDS["batch"][1])
    windows = eval_windows(ids, ctx, limit)
    if not windows:
        raise MinibloomError("evaluate: the held-out text has fewer than 2 tokens")
    full = [w for w in windows if len(w) == ctx + 1]
    groups = [full[i:i + batch] for i in range(0, len(full), batch)] + [[w] for w in windows if len(w) != ctx + 1]
    nats, count = 0.0, 0
    for g in groups:
        x = np.stack(g)
        logits = model(x[:, :-1])  # [n, T, V]
        nats += float(token_nll(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1)).sum())
        count += x[:, 1:].size
    return {"loss": nats / count, "perplexity": perplexity_of(nats / count), "nats": nats, "tokens": count}


def perplexity_of(loss: float) -> float:
    """exp(loss), inf once it overflows a float (a diverged run's loss is not an OverflowError)."""
    return math.exp(loss) if loss < 709 else (loss if math.isnan(loss) else math.inf)


# ---- conversations (fine-tuning on the assistant turns) ---------------------------------------------------------


def read_conversations(path: str) -> list[list[dict]]:
    """A JSON Lines file, one conversation per line: ``{"messages": [{"role", "content"}, ...]}`` or the bare list."""
    from ..chat import check_messages
    from ..jsonfile import parse_json

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
    from ..chat import get

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
