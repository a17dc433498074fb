"""Chat templates from untrusted tokenizer files: every template either renders (within the output limit) or raises
MinibloomError naming it, within a time and memory bound (jinja2's sandbox alone blocks escapes, not work)."""

from __future__ import annotations

import pytest
from bounds import bounded

from minibloom import chat
from minibloom.errors import MinibloomError

pytest.importorskip("jinja2")
hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies

MESSAGES = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]


class Tok:
    def __init__(self, template):
        self.chat_template, self.special_tokens, self.path = template, {"eos_token": "</s>"}, "tokenizer_config.json"


def render(template):
    return chat.render(MESSAGES, "tokenizer", tokenizer=Tok(template))


HOSTILE = {
    "huge range": "{{ range(10**9)|list }}",
    "string repetition": "{{ 'a' * 10**10 }}",
    "list repetition": "{{ [1] * 10**10 }}",
    "format width": "{{ '%999999999999s'|format(1) }}",
    "str.format width": "{{ '{:999999999999}'.format(1) }}",
    "nested loops": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "lipsum": "{{ lipsum(10**8) }}",
    "recursive macro": "{% macro f(x) %}{{ f(x) }}{% endmacro %}{{ f(1) }}",
    "doubling macro": "{% macro d(x, n) %}{% if n %}{{ d(x ~ x, n - 1) }}{% endif %}{% endmacro %}{{ d('ab', 60) }}",
    "doubling namespace": "{% set ns = namespace(x='ab') %}{% for i in range(60) %}{% set ns.x = ns.x ~ ns.x %}"
                          "{% endfor %}{{ ns.x }}",
    "division by zero": "{{ 1/0 }}",
    "type error": "{{ 1 + 'a' }}",
    "include": "{% include 'other.jinja' %}",
    "import": "{% import 'macros' as m %}",
    "extends": "{% extends 'base' %}",
    "escape attempt": "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "syntax error": "{% for %}",
    "undefined call": "{{ nothing() }}",
    "huge output": "{% for i in range(1000000) %}{{ 'abcdefgh' }}{% endfor %}",
    "raise": "{{ raise_exception('no') }}",
}


@pytest.mark.parametrize("template", list(HOSTILE.values()), ids=list(HOSTILE))
def test_hostile_templates_are_a_minibloom_error_naming_the_template(template):
    with bounded(seconds=20, megabytes=1024), pytest.raises(MinibloomError, match="template 'tokenizer'"):
        render(template)


@pytest.mark.parametrize("template", [[1, 2, 3], 42, None, [{"name": "default"}], [{"template": "x"}], {"a": 1}])
def test_a_template_that_is_not_a_string_is_a_minibloom_error(template):
    with pytest.raises(MinibloomError, match="has no chat_template"):
        render(template)


@pytest.mark.parametrize("messages", [None, "hi", 123, [None], [{"role": "user"}], [{"role": "x", "content": "a"}],
                                      [{"role": "user", "content": 5}]])
def test_bad_messages_are_a_minibloom_error(messages):
    with pytest.raises(MinibloomError, match="messages"):
        chat.render(messages, "plain")


def test_an_ordinary_template_still_renders():
    t = ("{% for m in messages %}{% if m['role'] == 'user' %}<|prompter|>{% else %}<|assistant|>{% endif %}"
         "{{ m['content'] }}{{ eos_token }}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
    assert render(t) == "<|prompter|>hi</s><|assistant|>hello</s><|assistant|>"


PIECES = ["{{ 'a' * N }}", "{% for i in range(N) %}X{% endfor %}", "{{ range(N)|list|length }}", "{{ N ** N }}",
          "{% macro m(x) %}{{ m(x ~ x) }}{% endmacro %}{{ m('ab') }}", "{{ '%Ns'|format(1) }}", "{{ lipsum(N) }}",
          "{% for m in messages %}{{ m['content'] * N }}{% endfor %}", "{{ messages[N] }}", "{{ N / 0 }}",
          "{% set ns = namespace(x='a') %}{% for i in range(N) %}{% set ns.x = ns.x ~ ns.x %}{% endfor %}",
          "{{ (messages|list) * N }}", "{{ eos_token }}", "{% if add_generation_prompt %}go{% endif %}", "{{ N }}",
          "{{ '{:N}'.format(1) }}", "{% include 'x' %}", "{{ cycler(*range(N)) }}", "{{ N|string|length }}"]


@hypothesis.settings(max_examples=150, deadline=None, derandomize=True)
@hypothesis.given(st.lists(st.tuples(st.sampled_from(PIECES), st.sampled_from([0, 1, 7, 10**3, 10**6, 10**12])),
                           min_size=1, max_size=4))
def test_random_templates_render_within_limits_or_fail_cleanly(parts):
    template = "".join(piece.replace("N", str(n)) for piece, n in parts)
    with bounded(seconds=20, megabytes=1024):
        try:
            out = render(template)
        except MinibloomError as e:
            assert "template 'tokenizer'" in str(e)
            return
    assert len(out) <= chat.MAX_TEMPLATE_OUTPUT
