"""Training BLOOM with nothing but NumPy, split by role: ``config`` (``TrainConfig`` and the checks of a run's
arguments), ``data`` (text, tokenizer, windows, conversations, the held-out loss), ``optim`` (AdamW, the schedule,
clipping), ``checkpoint`` (what a run writes and resumes from) and ``loop`` (``train``, ``train_step``).

``from minibloom.training import train, TrainConfig, ...`` reads the names below; a test that replaces one of the
functions ``train`` calls patches the module that calls it (``minibloom.training.loop``).
"""

from .checkpoint import (CHECKPOINT_FILES, STATE_JSON, STATE_TENSORS, check_out, check_rng_state, command_line,
                         json_safe, model_card, read_state, save)
from .config import INT_BOUNDS, MAX_NEW_PARAMS, MIN_VOCAB, SPECIAL_TOKENS, TrainConfig, check_memory
from .data import (BLOOM_SPLIT, conversation_batch, conversation_tokens, encode, eval_windows, evaluate,
                   perplexity_of, random_windows, read_conversations, read_text, split_text, tokenizer_config,
                   train_bpe)
from .loop import DIVERGED_FACTOR, Diverged, TrainResult, new_params, train, train_step, writable
from .optim import AdamW, clip_grad_norm, global_norm, lr_at

__all__ = ["BLOOM_SPLIT", "CHECKPOINT_FILES", "DIVERGED_FACTOR", "INT_BOUNDS", "MAX_NEW_PARAMS", "MIN_VOCAB",
           "SPECIAL_TOKENS", "STATE_JSON", "STATE_TENSORS", "AdamW", "Diverged", "TrainConfig", "TrainResult",
           "check_memory", "check_out", "check_rng_state", "clip_grad_norm", "command_line", "conversation_batch",
           "conversation_tokens", "encode", "eval_windows", "evaluate", "global_norm", "json_safe", "lr_at",
           "model_card", "new_params", "perplexity_of", "random_windows", "read_conversations", "read_state",
           "read_text", "save", "split_text", "tokenizer_config", "train", "train_bpe", "train_step", "writable"]
