"""Checkpoint formats, read into plain data and never into a model object: ``safetensors`` (the container),
``weights`` (the one tensor schema, its validator, the tree utilities and the streamed NumPy writer), ``loading``
(where a checkpoint comes from, and which reader reads it), ``hub`` (downloads), ``lowmem`` (layers read on use),
``bnb`` (bitsandbytes 4-bit) and ``gguf`` (llama.cpp). Every reader returns ``weights.Loaded``; only
``minibloom.bloom.load`` turns one into a ``Bloom``.
"""
