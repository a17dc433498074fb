"""Tokenizer glue (placeholder until the tokenizer work lands): loads ``tokenizer.json`` with ``tokenizers``."""

from __future__ import annotations

import os


def load_tokenizer(directory: str):
    path = os.path.join(directory, "tokenizer.json")
    if not os.path.isfile(path):
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_file(path)
