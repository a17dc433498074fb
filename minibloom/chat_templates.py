"""The chat templates of the models minibloom knows, as data: which template a model id or path means, and each
template as Jinja source (transformers' ``chat_template`` of tokenizer_config.json, GGUF's ``tokenizer.chat_template``).

Kept apart from ``minibloom.chat`` (which renders them) so the GGUF writer, below the model layer, can write a model's
own template into a converted file when its tokenizer_config.json has none (the seed models pick theirs by name);
``chat.detect`` maps these sources back to the template names, so a converted file keeps its stop strings too.
Each source renders exactly what the ``chat.TEMPLATES`` entry of the same name renders (tests/test_hostile_eval.py).
"""

from __future__ import annotations

import os
import re

NAME_RULES = (  # (regex on the lower-cased model id / path, template)
    (r"sft-chat", "bloomz-sft-chat"),
    (r"dpo-chat", "plain"),
    (r"oasst|open-?assistant|bloom-zh-.*chat", "oasst"),
    (r"bloomz", "bloomz"),
    (r"(^|[/\\])(default|shakespeare[^/\\]*)[/\\]?$", "play"),
)

# Jinja sources over ``messages`` (role, content) and ``add_generation_prompt``; one line each, so trim_blocks and
# lstrip_blocks change nothing; '\n' inside Jinja string literals is a newline
JINJA = {
    "bloomz-sft-chat": "{% for m in messages %}{% if m['role'] == 'user' %}{{ '</s>' + m['content'] + '<s>' }}"
                       "{% else %}{{ m['content'] }}{% endif %}{% endfor %}",
    "oasst": "{% for m in messages %}{% if m['role'] == 'system' %}{{ '<|system|>' }}{% elif m['role'] == 'user' %}"
             "{{ '<|prompter|>' }}{% else %}{{ '<|assistant|>' }}{% endif %}{{ m['content'] + '</s>' }}{% endfor %}"
             "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}",
    "plain": "{% for m in messages %}{{ m['content'] }}{% endfor %}",
    "bloomz": "{% for m in messages %}{{ m['content'] }}{% if m['role'] == 'assistant' %}{{ '</s>' }}{% endif %}"
              "{% endfor %}",
    "play": "{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] + '\\n\\n' }}"
            "{% elif m['role'] == 'user' %}{{ 'ROMEO:\\n' + m['content'] + '\\n\\n' }}"
            "{% else %}{{ 'JULIET:\\n' + m['content'] + '\\n\\n' }}{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}{{ 'JULIET:\\n' }}{% endif %}",
}


def template_for_name(name_or_path) -> str | None:
    """The template a model id or checkpoint path names (the seed models' rules), or None."""
    if not name_or_path:
        return None
    key = os.fspath(name_or_path).lower().replace("--", "/")
    for pattern, template in NAME_RULES:
        if re.search(pattern, key):
            return template
    return None


def template_for_source(source) -> str | None:
    """The name of the template whose Jinja source is ``source``, or None."""
    return next((name for name, src in JINJA.items() if src == source), None)
