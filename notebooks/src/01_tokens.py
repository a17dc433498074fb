# %% [markdown]
# # 1. Tokens: BLOOM's byte-level BPE, from text to ids and back
#
# A language model never sees text. It sees integers, and the tokenizer decides which. BLOOM's tokenizer is a
# **byte-level BPE** with 250,680 entries, trained on the 46 natural languages and 13 programming languages of its
# training corpus. Its real `tokenizer.json` cannot be downloaded here, so this notebook studies the tokenizer of
# minibloom's default model: the **same pipeline with the same settings** (BLOOM's pre-tokenizer regex verbatim,
# byte-level alphabet, special tokens 0–3, no normalizer), trained on Tiny Shakespeare with a 2,000-entry vocabulary.
#
# What you'll learn:
#
# - the four stages (normalizer, pre-tokenizer, BPE model, post-processor) and what BLOOM puts in each;
# - the pre-tokenizer's regex and the byte-to-character table, re-derived by hand;
# - BPE encoding by hand from the merge list;
# - the special tokens, and why BLOOM adds no BOS/EOS;
# - why BLOOM has 250,880 logits for 250,680 tokens;
# - how many tokens a word costs in different languages, and why that depends on what the tokenizer was trained on.

# %%
import json
import math
import os
import re
import unicodedata

import numpy as np
import matplotlib.pyplot as plt
from tokenizers import Tokenizer, pre_tokenizers

import minibloom

rng = np.random.default_rng(0)
plt.rcParams.update({"figure.dpi": 80, "figure.figsize": (7, 3.2)})

# %%
model = minibloom.load()  # the default model and its tokenizer
tok = model.tokenizer  # minibloom.tokenizer.Tokenizer: BLOOM's conventions around a tokenizers.Tokenizer
path = os.path.join(model.path, "tokenizer.json")
raw = Tokenizer.from_file(path)  # the tokenizers library's own object, to look inside
spec = json.load(open(path, encoding="utf-8"))
print(model)
print("vocabulary:", tok.vocab_size, " embedding rows:", model.vocab_size)

# %% [markdown]
# ## 1. The pipeline
#
# `tokenizer.json` describes four stages. BLOOM's choices (read off bigscience/bloom's `tokenizer.json`):
#
# | stage | BLOOM | what it does |
# |---|---|---|
# | normalizer | none | text is not lower-cased, accent-stripped or NFKC-normalised: every byte counts |
# | pre-tokenizer | `Split` regex, then `ByteLevel` | cut text into word-like pieces; bytes to printable characters |
# | model | BPE | merge characters into vocabulary entries, piece by piece |
# | post-processor | none | no `<s>` or `</s>` added |

# %%
print("normalizer:    ", spec["normalizer"])
print("pre_tokenizer: ", json.dumps(spec["pre_tokenizer"]))
print("model:         ", spec["model"]["type"], f"with {len(spec['model']['merges'])} merges")
print("post_processor:", spec["post_processor"])
assert spec["normalizer"] is None and spec["post_processor"] is None and spec["model"]["type"] == "BPE"

# %% [markdown]
# ## 2. The pre-tokenizer regex, by hand
#
# BLOOM's split pattern is ` ?[^(\s|[.,!?…。，、।۔،])]+`, written for the Oniguruma regex engine, where it means: an
# optional space followed by a run of characters that are **not** whitespace, not `(`, `)` or `|`, and not one of the
# punctuation marks `. , ! ? … 。 ， 、 । ۔ ،` (Latin, CJK, Devanagari and Arabic sentence punctuation). With behaviour
# `Isolated`, the pieces are the matches **and the gaps between them**. Python's `re` cannot parse the original, so we
# write the same character class out (Oniguruma's `\s` is a slightly shorter list than Python's):

# %%
ONIG_SPACE = "\t\n\v\f\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
WORD = re.compile(f" ?[^(){re.escape('|')}{ONIG_SPACE}.,!?…。，、।۔،]+")


def my_split(text):
    """BLOOM's Split(..., behavior="Isolated"): the matches and the gaps between them, in order."""
    pieces, pos = [], 0
    for m in WORD.finditer(text):
        if m.start() > pos:
            pieces.append(text[pos:m.start()])
        pieces.append(m.group())
        pos = m.end()
    if pos < len(text):
        pieces.append(text[pos:])
    return pieces


print(my_split("Hello, world! (a|b) [x]"))
assert my_split("Hello, world! (a|b) [x]") == ["Hello", ",", " world", "! (", "a", "|", "b", ")", " [x]"]
assert my_split("end.\n\nnew") == ["end", ".\n\n", "new"]

# %% [markdown]
# Notice what the pattern does: a word keeps its leading space (`" world"`), so "world" at the start of a line and
# " world" after a space are different tokens; runs of punctuation and whitespace become pieces of their own; and
# brackets are word characters (`" [x]"`) while parentheses are not, a side effect of how Oniguruma reads the nested
# class.
#
# ## 3. Bytes as characters
#
# The second pre-tokenizer step, `ByteLevel`, encodes each piece in UTF-8 and replaces every byte by one printable
# character, so that BPE works on a 256-symbol alphabet and **any** text, in any script, can be encoded (no unknown
# token is ever needed). The table is GPT-2's: the 188 printable Latin-1 bytes stand for themselves, and the 68 others
# (control characters, space, …) are shifted to code points 256 and up. Space becomes `Ġ`, newline `Ċ`.

# %%
def bytes_to_unicode():
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    table, shift = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + shift)
            shift += 1
    return table


B2U = bytes_to_unicode()
assert sorted(B2U.values()) == sorted(pre_tokenizers.ByteLevel.alphabet())
assert B2U[ord(" ")] == "Ġ" and B2U[ord("\n")] == "Ċ"


def my_pre_tokenize(text):
    return ["".join(B2U[b] for b in piece.encode("utf-8")) for piece in my_split(text)]


for text in ["Hello, world! (a|b) [x]", "ROMEO:\nBut, soft!", "café über straße", "王子，你好。", "नमस्ते दुनिया।"]:
    theirs = [p for p, _ in raw.pre_tokenizer.pre_tokenize_str(text)]
    assert my_pre_tokenize(text) == theirs, (text, my_pre_tokenize(text), theirs)
print(my_pre_tokenize("café über straße"))

# %% [markdown]
# `é` is two bytes in UTF-8 (`C3 A9`), hence two characters `Ã©`. Every character beyond ASCII costs two to four
# bytes; that will matter in section 7.
#
# ## 4. BPE, by hand
#
# BPE training learned an ordered list of **merges**: pairs of symbols to glue together, most frequent first. Encoding
# a piece starts from its byte characters and repeatedly applies the **earliest-learned** merge that occurs anywhere in
# the piece, until none applies. The surviving symbols are looked up in the vocabulary.

# %%
vocab = spec["model"]["vocab"]
ranks = {tuple(m if isinstance(m, list) else m.split(" ")): i for i, m in enumerate(spec["model"]["merges"])}


def my_bpe(piece):
    symbols = list(piece)
    while len(symbols) > 1:
        pairs = [(ranks.get((a, b), math.inf), i) for i, (a, b) in enumerate(zip(symbols, symbols[1:]))]
        best = min(pairs)[0]
        if best == math.inf:
            break
        a, b = next((symbols[i], symbols[i + 1]) for r, i in pairs if r == best)
        merged, i = [], 0
        while i < len(symbols):  # merge every occurrence of the pair, left to right
            if i + 1 < len(symbols) and symbols[i] == a and symbols[i + 1] == b:
                merged.append(a + b)
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return symbols


def my_encode(text):
    return [vocab[s] for piece in my_pre_tokenize(text) for s in my_bpe(piece)]


print("first merges:", spec["model"]["merges"][:8])
line = "ROMEO:\nBut, soft! what light through yonder window breaks?"
print([s for piece in my_pre_tokenize(line) for s in my_bpe(piece)])
for text in [line, "Wherefore art thou Romeo?", "Zounds! The kingdom's crown, 1597.", "日本語 and émigrés"]:
    assert my_encode(text) == tok.encode(text), text
print(tok.encode(line))

# %% [markdown]
# ## 5. Special tokens
#
# BLOOM reserves the first four ids: `<unk>` 0, `<s>` 1, `</s>` 2, `<pad>` 3. They are *added tokens*: written in
# the text, they are matched literally before the pre-tokenizer runs. The post-processor adds nothing, so **no BOS is
# prepended and no EOS appended**: `"... fox</s>"` ends in 2 only because `</s>` is written (the same holds for the real
# BLOOM tokenizer: `"The quick brown fox</s>"` → `[2175, 23714, 73173, 144252, 2]`). Batches are padded on the
# **left** with `<pad>`, so that every row's last token is in the last column, where generation continues.

# %%
specials = {t: tok.token_to_id(t) for t in ("<unk>", "<s>", "</s>", "<pad>")}
print(specials)
assert specials == {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
fox = tok.encode("The quick brown fox</s>")
assert fox[-1] == 2 and fox[0] != 1 and 2 not in tok.encode("The quick brown fox")
ids, mask = tok.encode_batch(["To be, or not to be", "Ay"])
print(ids, mask, sep="\n")
assert ids[1, 0] == 3 and mask[1, 0] == 0 and mask[1, -1] == 1  # left padding

# %% [markdown]
# ## 6. Why 250,880 logits for 250,680 tokens
#
# BLOOM's vocabulary has 250,680 entries, but its embedding, and hence its output layer, has **250,880 rows**. BLOOM was
# trained with Megatron-DeepSpeed, whose `_vocab_size_with_padding` pads the vocabulary to a multiple of
# `make_vocab_size_divisible_by` (default 128) times the tensor-parallel degree, so that the embedding splits evenly
# across GPUs into shapes that multiply fast. BLOOM-176B ran with 4-way tensor parallelism (`TP=4, PP=12, DP=8` in
# bigscience-workshop/bigscience `train/tr11-176B-ml/README.md`): 128 × 4 = 512, and the smallest multiple of 512 that
# holds 250,680 entries is 250,880. The smaller BLOOMs ship the same 250,880-row embedding.

# %%
def padded_vocab(n, divisible_by=128, tp=1):
    multiple = divisible_by * tp
    return math.ceil(n / multiple) * multiple


assert padded_vocab(250_680, 128, tp=4) == 250_880
assert padded_vocab(250_680, 128, tp=1) == 250_752  # one GPU would have padded less
print("BLOOM:", padded_vocab(250_680, 128, 4), " the default model:", tok.vocab_size, "->", model.vocab_size)

# %% [markdown]
# The 200 extra rows (48 in our model) are ids the tokenizer never produces. They still get a logit at every position,
# and an exact port must keep them: the logits have 250,880 columns in transformers too. Training only ever pushes
# their probability down, so they are never the most likely token:

# %%
logits = model(np.array([tok.encode(line)]))[0]  # [T, rows]
real, unused = logits[:, : tok.vocab_size], logits[:, tok.vocab_size:]
print(f"logits {logits.shape}; best real-token logit per position ≥ {real.max(-1).min():.2f}, "
      f"best unused-row logit ≤ {unused.max():.2f}")
assert (unused.max(-1) < real.max(-1)).all()
assert tok.decode(tok.encode(line)) == line

# %% [markdown]
# ## 7. Tokens per word across languages
#
# A sentence costs as many forward passes as it has tokens, so a tokenizer that splits a language into many small pieces
# makes that language slower, shorter-context and usually worse. Below, one sentence in ten of BLOOM's training
# languages, encoded with the default model's tokenizer. Words are whitespace-separated (for Chinese, which has no
# spaces, each character counts as a word).

# %%
SENTENCES = {
    "English": "The old king gave his daughter a golden crown.",
    "French": "Le vieux roi a donné une couronne d'or à sa fille.",
    "Spanish": "El viejo rey le dio a su hija una corona de oro.",
    "Portuguese": "O velho rei deu à sua filha uma coroa de ouro.",
    "Indonesian": "Raja tua itu memberi putrinya sebuah mahkota emas.",
    "Swahili": "Mfalme mzee alimpa binti yake taji la dhahabu.",
    "Vietnamese": "Vị vua già đã trao cho con gái mình một chiếc vương miện bằng vàng.",
    "Arabic": "أعطى الملك العجوز ابنته تاجًا ذهبيًا.",
    "Hindi": "बूढ़े राजा ने अपनी बेटी को सोने का मुकुट दिया।",
    "Chinese": "老国王给了他的女儿一顶金冠。",
}


def n_words(text):
    if any(unicodedata.name(c, "").startswith("CJK") for c in text):
        return sum(unicodedata.name(c, "").startswith("CJK") for c in text)
    return len(text.split())


stats = {}
for lang, s in SENTENCES.items():
    ids = tok.encode(s)
    assert ids == my_encode(s) and tok.decode(ids) == s  # byte-level BPE is lossless in every script
    stats[lang] = (len(ids) / n_words(s), len(s.encode("utf-8")) / len(ids))
    print(f"{lang:11s} {len(ids):3d} tokens  {n_words(s):2d} words  {stats[lang][0]:5.2f} tokens/word  "
          f"{stats[lang][1]:4.2f} bytes/token")

# %%
fig, ax = plt.subplots(figsize=(7.5, 3.2))
langs = list(stats)
ax.bar(langs, [stats[k][0] for k in langs], color=["tab:blue"] + ["tab:orange"] * (len(langs) - 1))
ax.set_ylabel("tokens per word")
ax.set_title("default model's tokenizer (trained on English Shakespeare only)", fontsize=9)
ax.tick_params(axis="x", rotation=40, labelsize=8)
fig.tight_layout()
assert stats["English"][0] == min(s[0] for s in stats.values())

# %% [markdown]
# English, the only language the default tokenizer saw, is cheapest; for the others the merges rarely apply and the
# text falls apart towards single bytes (about one token per byte for Hindi or Arabic, whose characters take two or
# three bytes each). BLOOM's real tokenizer learned its 250,680 entries from all of its training languages, with a
# vocabulary 125 times larger; that is exactly what it was built for: to keep this chart flat across languages. The
# mechanism is the one above; only the merge list differs.
#
# ## What's next
#
# Notebook 2 follows the ids into the model: each one selects a row of the embedding matrix, and BLOOM normalises
# that row before the first block.
