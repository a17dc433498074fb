"""A small BLOOM-style byte-level BPE ``tokenizer.json`` for tests (no real BLOOM tokenizer is downloadable).

Same structure as BLOOM's tokenizer.json: no normalizer, the Split regex pre-tokenizer (Oniguruma
syntax, as in the hub file) then ByteLevel without prefix space, a BPE model, a ByteLevel decoder, and the special
tokens ``<unk>`` 0, ``<s>`` 1, ``</s>`` 2, ``<pad>`` 3 that the post-processor never adds.
"""

from __future__ import annotations

import json
import os

BLOOM_SPLIT = " ?[^(\\s|[.,!?…。，、।۔،])]+"
CORPUS = os.path.join(os.path.dirname(__file__), "..", "data", "tinyshakespeare.txt")
FALLBACK_TEXT = ["ROMEO: What light through yonder window breaks? It is the east, and Juliet is the sun.",
                 "héllo wörld, 日本語のテキスト 🙂 and more text for merges."]


def build(vocab_size: int = 400):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(BLOOM_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    text = FALLBACK_TEXT * 20
    if os.path.isfile(CORPUS):
        with open(CORPUS, encoding="utf-8") as f:
            text = text + f.read(200_000).split("\n\n")
    tk.train_from_iterator(text, trainer)
    return tk


def write(directory, vocab_size: int = 400, chat_template=None) -> str:
    """Write tokenizer.json (+ tokenizer_config.json like the hub's) into ``directory``; return the directory."""
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    build(vocab_size).save(os.path.join(directory, "tokenizer.json"))
    cfg = {"padding_side": "left", "add_prefix_space": False, "unk_token": "<unk>", "bos_token": "<s>",
           "eos_token": "</s>", "pad_token": "<pad>", "tokenizer_class": "BloomTokenizerFast"}
    if chat_template is not None:
        cfg["chat_template"] = chat_template
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f)
    return directory


def write_checkpoint(directory, vocab: int = 320, hidden: int = 32, n_layer: int = 2, n_head: int = 4, seed: int = 0,
                     tokenizer: bool = True, chat_template=None, bf16: bool = False) -> str:
    """A random BLOOM checkpoint written with NumPy only (config.json + model.safetensors [+ tokenizer files])."""
    import numpy as np

    from minibloom.formats.safetensors import save_file
    from minibloom.config import BloomConfig
    from minibloom.formats.weights import expected_shapes

    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(seed)
    # names and shapes come from the one schema; draws keep their order: embedding, the two outer LayerNorms, layers
    shapes = expected_shapes(BloomConfig(vocab_size=vocab, hidden_size=hidden, n_layer=n_layer, n_head=n_head),
                             vocab)
    outer = [k for k in shapes if not k.startswith(("h.", "word_embeddings."))]
    tensors = {"transformer.word_embeddings.weight": rng.normal(0, 0.3, shapes["word_embeddings.weight"])}
    for name in outer:
        tensors[f"transformer.{name}"] = (1 + rng.normal(0, 0.2, shapes[name]) if name.endswith(".weight")
                                          else rng.normal(0, 0.1, shapes[name]))
    for name in (k for k in shapes if k.startswith("h.")):
        tensors[f"transformer.{name}"] = rng.normal(0, 0.08, shapes[name])
    C = hidden
    tensors = {k: v.astype(np.float32) for k, v in tensors.items()}
    save_file(tensors, os.path.join(directory, "model.safetensors"), {"format": "pt"},
              bf16=tuple(tensors) if bf16 else ())
    config = {"model_type": "bloom", "architectures": ["BloomForCausalLM"], "vocab_size": vocab, "hidden_size": C,
              "n_layer": n_layer, "n_head": n_head, "layer_norm_epsilon": 1e-5, "bos_token_id": 1,
              "eos_token_id": 2, "pad_token_id": 3, "unk_token_id": 0,
              "dtype": "bfloat16" if bf16 else "float32"}
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    if tokenizer:
        write(directory, vocab_size=min(vocab, 300), chat_template=chat_template)
    return directory
