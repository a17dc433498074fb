"""The one exception type minibloom raises for bad files, configs and arguments."""


class MinibloomError(ValueError):
    """A checkpoint, config, tokenizer or argument that minibloom cannot use.

    The message always names the offending file, tensor or argument.
    """
