"""Chat templates: each template's exact prompt string, the registry, and auto-detection."""

from __future__ import annotations

import pytest

from minibloom import chat
from minibloom.errors import MinibloomError

CONVERSATION = [
    {"role": "user", "content": "Hi!"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "Tell me a joke."},
]


def test_bloomz_sft_chat_exact_string():
    # cmarkea/bloomz-560m-sft-chat (and its bnb-4bit re-release): </s>{user}<s>{assistant}</s>{user}<s>
    assert chat.render(CONVERSATION, "bloomz-sft-chat") == "</s>Hi!<s>Hello.</s>Tell me a joke.<s>"
    assert chat.render(CONVERSATION[:1], "bloomz-sft-chat") == "</s>Hi!<s>"


def test_oasst_exact_string():
    # OpenAssistant bloom-zh-3b-chat: <|prompter|>{user}</s><|assistant|>{assistant}</s>
    assert chat.render(CONVERSATION, "oasst") == \
        "<|prompter|>Hi!</s><|assistant|>Hello.</s><|prompter|>Tell me a joke.</s><|assistant|>"
    assert chat.render(CONVERSATION, "oasst", add_generation_prompt=False) == \
        "<|prompter|>Hi!</s><|assistant|>Hello.</s><|prompter|>Tell me a joke.</s>"
    assert chat.render([{"role": "system", "content": "Be brief."}] + CONVERSATION[:1], "oasst") == \
        "<|system|>Be brief.</s><|prompter|>Hi!</s><|assistant|>"


def test_plain_exact_string():
    # cmarkea/bloomz-3b-dpo-chat: the turns concatenated
    assert chat.render(CONVERSATION, "plain") == "Hi!Hello.Tell me a joke."


def test_bloomz_instruction_exact_string():
    # bigscience/bloomz: the instruction is the prompt; a past answer ends with </s>, as bloomz emits it
    one = [{"role": "user", "content": "Translate to English: Je t'aime."}]
    assert chat.render(one, "bloomz") == "Translate to English: Je t'aime."
    assert chat.render(CONVERSATION, "bloomz") == "Hi!Hello.</s>Tell me a joke."


def test_play_exact_string():
    assert chat.render(CONVERSATION, "play") == \
        "ROMEO:\nHi!\n\nJULIET:\nHello.\n\nROMEO:\nTell me a joke.\n\nJULIET:\n"
    assert "\n\n" in chat.stop_strings("play")


def test_jinja_tokenizer_template():
    pytest.importorskip("jinja2")

    class Tok:  # what minibloom.tokenizer.Tokenizer exposes
        chat_template = "{% for m in messages %}{{ m.content }}{{ eos_token }}{% endfor %}"
        special_tokens = {"eos_token": "</s>"}

    # BLOOM's default template in transformers' test_tokenization_for_chat: every message followed by </s>
    assert chat.render(CONVERSATION, "tokenizer", tokenizer=Tok()) == "Hi!</s>Hello.</s>Tell me a joke.</s>"
    with pytest.raises(MinibloomError, match="chat_template"):
        chat.render(CONVERSATION, "tokenizer", tokenizer=None)


def test_unknown_template_and_bad_messages():
    with pytest.raises(MinibloomError, match="unknown chat template"):
        chat.render(CONVERSATION, "nope")
    with pytest.raises(MinibloomError, match=r"messages\[0\]"):
        chat.render([{"role": "bot", "content": "x"}], "plain")
    assert set(chat.names()) >= {"bloomz-sft-chat", "oasst", "plain", "bloomz", "play", "tokenizer"}


@pytest.mark.parametrize("name,expected", [
    ("cmarkea/bloomz-560m-sft-chat", "bloomz-sft-chat"),
    ("jpacifico/bloomz-560m-sft-chat-bnb-4bit", "bloomz-sft-chat"),
    ("weights/cmarkea--bloomz-560m-sft-chat", "bloomz-sft-chat"),
    ("OpenAssistant/bloom-zh-3b-chat", "oasst"),
    ("cmarkea/bloomz-3b-dpo-chat", "plain"),
    ("bigscience/bloomz-560m", "bloomz"),
    ("/repo/weights/default", "play"),
    ("/repo/weights/default/", "play"),
])
def test_detect_from_name(name, expected):
    assert chat.detect(name) == expected


def test_detect_from_tokenizer_chat_template():
    class Tok:
        def __init__(self, t):
            self.chat_template = t

    assert chat.detect("some/model", Tok("oasst")) == "oasst"  # a registry name
    assert chat.detect("some/model", Tok("{% for m in messages %}<|prompter|>{{ m.content }}{% endfor %}")) == "oasst"
    assert chat.detect("some/model", Tok("{{ messages[0].content }}")) == "tokenizer"
    assert chat.detect("some/model", Tok(None)) == "bloomz"
    assert chat.detect(None, None, default="plain") == "plain"
