# %% [markdown]
# # 3. ALiBi: how BLOOM knows word order without position embeddings
#
# BLOOM adds no position vector to its token embeddings (notebook 2). Instead, every attention head adds a fixed
# penalty to its scores that grows **linearly with distance**: *Attention with Linear Biases* (ALiBi, Press, Smith &
# Lewis, 2021, arXiv:2108.12409). Each head has its own slope `m`; a query looking `d` tokens back pays `m·d`.
#
# What you'll learn:
#
# - the slope rule for a power-of-two number of heads (bloom-560m: 16) and the **extra-slope rule** for other counts
#   (BLOOM-176B: 112 heads), re-derived by hand;
# - what the bias looks like, head by head;
# - why BLOOM (and transformers) add `m · key_position`, the same for every query row, instead of `m · (key − query)`,
#   and why that is exactly the same thing under softmax;
# - left padding: positions come from the **cumulative attention mask**, so a padded row sees the numbers of the row
#   alone.

# %%
import math

import numpy as np
import matplotlib.pyplot as plt

import minibloom
from minibloom import model as M
from minibloom.config import BloomConfig
from minibloom.formats.weights import random_params

rng = np.random.default_rng(0)
plt.rcParams.update({"figure.dpi": 80, "figure.figsize": (7, 3.2)})
np.set_printoptions(precision=5, suppress=True, linewidth=110)

# %% [markdown]
# ## 1. Slopes for a power-of-two number of heads
#
# For `n` heads, `n` a power of two, head `k = 1 … n` gets
#
# $$m_k = 2^{-8k/n},$$
#
# a geometric sequence from $2^{-8/n}$ down to $2^{-8} = 1/256$. For bloom-560m's 16 heads that is $2^{-k/2}$. With
# otherwise equal scores, the steepest head's attention drops by a factor $e^{-0.707} \approx 0.49$ per token of
# distance, the flattest head's by $e^{-1/256} \approx 0.996$: a spread of time scales from one token to hundreds.

# %%
def slopes_pow2(n):
    k = np.arange(1, n + 1)
    return 2.0 ** (-8.0 * k / n)


mine16 = slopes_pow2(16)
assert np.array_equal(mine16, M.alibi_slopes(16, np.float64))  # minibloom's exact (float64, oracle) slopes
print(mine16)

# %% [markdown]
# minibloom's default float32 mode reproduces transformers bit for bit, and transformers computes the slopes as a
# float32 **base** $2^{-8/n}$ raised to integer powers. The base is rounded once, so the float32 slopes are not the
# correctly rounded powers of two: for 16 heads `0.49999997` instead of `0.5`. That rounding is part of the reference
# numbers (using exact slopes instead moves the logits by about 1e-6).

# %%
base32 = np.float64(np.float32(2.0 ** (-8 / 16)))
mine16_f32 = (base32 ** np.arange(1, 17)).astype(np.float32)
pkg16_f32 = M.alibi_slopes(16)
assert np.array_equal(mine16_f32, pkg16_f32)
print("float32 slopes:", pkg16_f32[:4], "...")
print("largest relative difference from the exact powers of two:",
      np.abs(pkg16_f32 / mine16 - 1).max())

# %% [markdown]
# ## 2. The extra-slope rule: 112 heads
#
# BLOOM-176B has 112 heads, not a power of two. The rule (from the ALiBi authors' code, kept by transformers):
#
# 1. take the largest power of two below, `p = 64`, and give the first 64 heads the usual slopes $2^{-8k/64}$;
# 2. the remaining `112 − 64 = 48` heads take slopes from the sequence for `2p = 128` heads, $2^{-8j/128}$, using only
#    the **odd** `j = 1, 3, 5, …, 95`.
#
# The odd terms of the 128-head sequence are exactly the ones that are *not* already in the 64-head sequence (the
# even terms $2^{-8\cdot 2i/128} = 2^{-8i/64}$ are). So the extra heads interleave between the existing slopes, densest
# where the slopes are steep.

# %%
def slopes_any(n):
    p = 2 ** math.floor(math.log2(n))
    extra = np.arange(1, 2 * (n - p), 2)  # odd j = 1, 3, 5, ...  (n - p of them)
    return np.concatenate([slopes_pow2(p), 2.0 ** (-8.0 * extra / (2 * p))])


mine112 = slopes_any(112)
assert mine112.shape == (112,)
assert np.array_equal(mine112, M.alibi_slopes(112, np.float64))
assert np.allclose(M.alibi_slopes(112), mine112, rtol=1e-6)  # the float32 mode, same numbers to float32 rounding
seq128 = slopes_pow2(128)
assert np.array_equal(mine112[64:], seq128[0:96:2])  # extras are the odd terms j = 1, 3, ... of the 128-head sequence
assert np.array_equal(mine112[:64], seq128[1::2])  # the first 64 are its even terms
print("first extra slopes:", mine112[64:68], " = 2^(-j/16) for j = 1, 3, 5, 7")

# %% [markdown]
# Small head counts follow the same rule, e.g. 6 heads → 4 power-of-two heads plus 2 extras (our default model has
# 8 heads, a power of two, so it needs no extras):

# %%
for n in (1, 3, 6, 12):
    assert np.array_equal(slopes_any(n), M.alibi_slopes(n, np.float64))
    print(f"{n:3d} heads:", M.alibi_slopes(n, np.float64))

# %%
fig, ax = plt.subplots(figsize=(7.5, 3))
ax.semilogy(np.arange(1, 129), seq128, ".", color="lightgray", label="the 128-head sequence")
k = np.arange(1, 65)
ax.semilogy(2 * k, mine112[:64], "o", ms=4, label="heads 1–64: $2^{-8k/64}$")
ax.semilogy(np.arange(1, 96, 2), mine112[64:], "s", ms=3, label="heads 65–112 (extra): odd terms")
ax.set_xlabel("position j in the 128-head sequence $2^{-8j/128}$")
ax.set_ylabel("slope")
ax.set_title("BLOOM-176B's 112 ALiBi slopes")
ax.legend(fontsize=8)
fig.tight_layout()

# %% [markdown]
# ## 3. What the bias looks like
#
# Head `h` adds $m_h \cdot j$ to the score of key position `j`, for every query. Together with the causal mask (a query
# sees only itself and the past) the **relative** picture is the familiar one: a penalty $-m_h (i - j)$ for looking
# back `i − j` tokens. Below are both forms for three of bloom-560m's 16 heads.

# %%
T = 12
mask = np.ones((1, T), dtype=np.int64)
bias = M.alibi_bias(mask, M.alibi_slopes(16, np.float64))  # [B, H, 1, T]: the same row for every query
allowed = M.causal_mask(mask, T)[0, 0]  # [T, T] bool
i, j = np.arange(T)[:, None], np.arange(T)[None, :]
assert np.array_equal(allowed, j <= i)
assert np.array_equal(bias[0, :, 0, :], M.alibi_slopes(16, np.float64)[:, None] * np.arange(T)[None, :])

fig, axes = plt.subplots(2, 3, figsize=(8.5, 5.4))
top = mine16[0] * (T - 1)  # the largest |bias| of the steepest head: one colour scale for all panels of a row
for col, h in enumerate((0, 7, 15)):
    m = mine16[h]
    absolute = np.where(allowed, np.broadcast_to(bias[0, h, 0], (T, T)), np.nan)
    relative = np.where(allowed, -m * (i - j), np.nan)
    im0 = axes[0, col].imshow(absolute, cmap="viridis", vmin=0, vmax=top)
    axes[0, col].set_title(f"head {h + 1}: m = {m:.4f}\nbias = m · key", fontsize=9)
    im1 = axes[1, col].imshow(relative, cmap="viridis", vmin=-top, vmax=0)
    axes[1, col].set_title("bias = −m · (query − key)", fontsize=9)
for a in axes.ravel():
    a.set_xlabel("key", fontsize=8)
    a.set_ylabel("query", fontsize=8)
    a.set_xticks(range(0, T, 3))
    a.set_yticks(range(0, T, 3))
    a.tick_params(labelsize=7)
fig.colorbar(im0, ax=axes[0], shrink=0.8)
fig.colorbar(im1, ax=axes[1], shrink=0.8)

# %% [markdown]
# All panels of a row share one colour scale: head 1 punishes distance hard, head 16 hardly at all. Within a head the
# two forms differ only by a per-row offset: row `i` of the absolute form is the relative form plus $m_h \cdot i$.
#
# ## 4. Why the absolute key position works
#
# Softmax ignores a constant added to a whole row:
#
# $$\mathrm{softmax}(s + c)_j = \frac{e^{s_j + c}}{\sum_k e^{s_k+c}} = \frac{e^c e^{s_j}}{e^c\sum_k e^{s_k}} =
# \mathrm{softmax}(s)_j.$$
#
# The relative bias of row `i`, $m(j - i)$, is the absolute bias $m j$ plus the constant $-m i$. So both give the same
# attention probabilities, and the absolute form is cheaper: one bias row per head, shared by all queries and easy to
# extend by one key per generated token. We check it on random scores, masking the future with `−∞`-like values
# exactly as minibloom does.

# %%
scores = rng.standard_normal((16, T, T))  # [H, query, key]
neg = np.finfo(np.float64).min
p_abs = M.softmax(np.where(allowed, scores + bias[0], neg))
p_rel = M.softmax(np.where(allowed, scores + mine16[:, None, None] * (j - i), neg))
assert np.allclose(p_abs, p_rel, rtol=0, atol=1e-15)
print("max |p_absolute - p_relative| =", np.abs(p_abs - p_rel).max())

# %% [markdown]
# ALiBi then does exactly what a recency bias should: with uniform scores, the attention of head `h` decays like
# $e^{-m_h d}$ with the distance `d`. Steep heads look at the last few tokens; flat heads look almost uniformly at the
# whole past.

# %%
uniform = M.softmax(np.where(allowed, bias[0], neg))  # scores all equal: only the bias is left
last = uniform[:, -1, :]  # the last query's attention over the 12 keys, per head
d = T - 1 - np.arange(T)
expected = np.exp(-mine16[:, None] * d) / np.exp(-mine16[:, None] * d).sum(-1, keepdims=True)
assert np.allclose(last, expected, rtol=1e-12)

fig, ax = plt.subplots(figsize=(6.5, 3))
for h in (0, 3, 7, 15):
    ax.plot(d, last[h], "o-", ms=3, label=f"head {h + 1}, m = {mine16[h]:.3f}")
ax.set_xlabel("distance back from the query (tokens)")
ax.set_ylabel("attention (equal scores)")
ax.legend(fontsize=8)
fig.tight_layout()

# %% [markdown]
# ## 5. Left padding and the cumulative-mask positions
#
# BLOOM's tokenizer pads batches **on the left**, so that every row's last token sits in the last column, where the next
# token is predicted. The pads must be invisible. Two things make them so:
#
# 1. the attention mask hides pad keys from every query (`causal_mask` ANDs the causal triangle with the padding mask);
# 2. the key positions are counted from the first real token: $\mathrm{pos} = (\mathrm{cumsum}(\mathrm{mask}) - 1)
#    \cdot \mathrm{mask}$. Pads get position 0 and the first real token gets 0 too.

# %%
padded_mask = np.array([[0, 0, 0, 1, 1, 1, 1, 1]])
pos_mine = (np.cumsum(padded_mask, axis=-1) - 1) * padded_mask
print("mask     ", padded_mask[0])
print("positions", pos_mine[0])
one_slope = np.array([1.0])
assert np.array_equal(M.alibi_bias(padded_mask, one_slope)[0, 0, 0], pos_mine[0])
print(M.causal_mask(padded_mask, 8)[0, 0].astype(int))

# %% [markdown]
# A real-token query of the padded row therefore sees exactly the keys, and exactly the bias values, that the same
# query sees in the unpadded row. We check it end to end on a small random BLOOM: the logits of the real tokens must
# not depend on how much padding sits in front of them.

# %%
cfg = BloomConfig(vocab_size=256, hidden_size=48, n_layer=2, n_head=6)


model = minibloom.Bloom(cfg, random_params(cfg, 256, rng, std=0.05), dtype="float64")
ids = rng.integers(4, 256, size=5)
alone = model(ids[None, :])[0]  # [5, V]
pad = cfg.pad_token_id
batch = np.array([[pad, pad, pad, *ids], [*rng.integers(4, 256, size=8)]])
batch_mask = np.array([[0, 0, 0, 1, 1, 1, 1, 1], [1] * 8])
padded = model(batch, batch_mask)[0, 3:]  # the real tokens of the padded row
print("max |padded - alone| =", np.abs(padded - alone).max())
assert np.allclose(padded, alone, rtol=0, atol=1e-12)

# %% [markdown]
# Strictly, step 2 is not needed for the *probabilities*: with plain positions `0 … 7` the three pads would shift every
# real key's position by 3, which adds the same `3m` to every visible score of a row, and softmax ignores it
# (section 4). What the cumulative positions buy is that the padded row computes **the very same numbers** as the row
# alone instead of numbers that are merely equal in exact arithmetic, and the positions (hence the rounding error of
# `m · pos`) stay small however much padding precedes them. The fully masked rows, queries at pad positions, see only
# masked keys; minibloom gives them a uniform distribution (never NaN) and their outputs are never read.

# %%
shifted = np.where(M.causal_mask(batch_mask, 8)[0, 0], scores[0, :8, :8] + 0.3 * np.arange(8), neg)
cumulative = np.where(M.causal_mask(batch_mask, 8)[0, 0], scores[0, :8, :8] + 0.3 * pos_mine[0], neg)
assert np.allclose(M.softmax(shifted)[3:], M.softmax(cumulative)[3:], rtol=0, atol=1e-15)
assert np.isfinite(M.softmax(cumulative)).all()
print("pad-row (fully masked) attention is uniform:", M.softmax(cumulative)[0].round(3))

# %% [markdown]
# ## What's next
#
# Notebook 4 opens the attention block itself: the fused `query_key_value` projection and its per-head layout, the
# masks, and what the heads of a trained model actually look at.
