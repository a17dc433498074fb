# %% [markdown]
# # 4. Attention: the fused QKV layout, the masks, and what trained heads look at
#
# Each BLOOM block lets every token gather information from the tokens before it. This notebook takes the attention
# sub-layer apart on minibloom's trained default model (a small BLOOM trained on Tiny Shakespeare).
#
# What you'll learn:
#
# - how BLOOM stores its query, key and value projections in **one** matrix, `query_key_value` `[3C, C]`, and why the
#   split is **per head** (`[q₀ k₀ v₀ q₁ k₁ v₁ …]`), not `[Q; K; V]`;
# - multi-head attention with ALiBi, re-derived by hand and checked against `minibloom.model.attention`;
# - the causal mask and the padding mask, drawn;
# - attention maps of the trained model on a real line of text, and how the ALiBi slope of a head shapes how far back
#   it looks.

# %%
import math

import numpy as np
import matplotlib.pyplot as plt

import minibloom
from minibloom import model as M
from minibloom.testing import FP64_SELF, assert_rel_close

rng = np.random.default_rng(0)
plt.rcParams.update({"figure.dpi": 80, "figure.figsize": (7, 3.2)})
np.set_printoptions(precision=3, suppress=True, linewidth=110)

# %%
model = minibloom.load(dtype="float64")  # the default model, float64 so the checks below are exact
cfg = model.config
C, H, D = cfg.hidden_size, cfg.n_head, cfg.head_dim
print(model)
print(f"C = {C}, H = {H} heads, D = {D} per head")

# %% [markdown]
# ## 1. One matrix for q, k and v
#
# The first layer of the attention branch is `query_key_value`: a `Linear(C, 3C)` whose weight has shape `[3C, C]`
# (PyTorch's `[out, in]`). Its `3C` output rows are grouped **head by head**: for head `h`, rows `h·3D … h·3D+D−1` make
# the query, the next `D` rows the key, the next `D` the value. Row `r` therefore belongs to
#
# $$\text{head} = \lfloor r / 3D \rfloor,\qquad \text{part} = \lfloor r / D \rfloor \bmod 3 \;(0{=}q, 1{=}k, 2{=}v),
# \qquad d = r \bmod D.$$
#
# (This is what transformers' `_reshape` does with `view(B, T, H, 3, D)`; vLLM and keras-hub regroup the rows the same
# way when they convert BLOOM checkpoints.)

# %%
p0 = model.params["h"][0]["self_attention"]
W, b = p0["query_key_value"]["weight"], p0["query_key_value"]["bias"]  # [3C, C], [3C]
W4 = W.reshape(H, 3, D, C)  # [head, q/k/v, d, in]
Wq, Wk, Wv = (W4[:, i].reshape(C, C) for i in range(3))  # separate [C, C] projections, heads stacked
bq, bk, bv = (b.reshape(H, 3, D)[:, i].reshape(C) for i in range(3))
r = np.arange(3 * C)
assert np.array_equal(W[(r // D) % 3 == 0], Wq) and np.array_equal(W[(r // D) % 3 == 2], Wv)
print("W", W.shape, "-> Wq, Wk, Wv", Wq.shape)

# %%
part = (r // D) % 3
head = r // (3 * D)
fig, ax = plt.subplots(2, 1, figsize=(8, 1.8), sharex=True)
ax[0].imshow(part[None, :], aspect="auto", cmap=plt.matplotlib.colors.ListedColormap(["tab:blue", "tab:orange",
                                                                                       "tab:green"]))
ax[0].set_yticks([])
ax[0].set_title("rows of query_key_value (blue q, orange k, green v): the layout BLOOM uses", fontsize=9)
ax[1].imshow(head[None, :], aspect="auto", cmap="tab10", vmin=0, vmax=9)
ax[1].set_yticks([])
ax[1].set_title("head of each row", fontsize=9)
ax[1].set_xlabel("output row r of the [3C, C] weight")
fig.tight_layout()

# %% [markdown]
# ## 2. Multi-head attention by hand
#
# For one head, with queries $Q$, keys $K$, values $V$ (`[T, D]` each), the ALiBi slope $m$ and the causal mask:
#
# $$\mathrm{head} = \mathrm{softmax}\!\left(\frac{QK^\top}{\sqrt D} + m\,[0, 1, \dots, T-1] + \text{mask}\right) V.$$
#
# The heads' outputs are put side by side (`[T, H·D] = [T, C]`) and mixed by the output projection `dense`. We compute
# it for a real line with the separate `Wq, Wk, Wv` from above, one head at a time, and compare with minibloom.

# %%
text = "JULIET:\nO Romeo, Romeo! wherefore art thou Romeo?\nDeny thy father and refuse thy name;"
ids = np.array([model.encode(text)])
tokens = [model.decode([i]) for i in ids[0]]
T = ids.shape[1]
out = model.forward(ids, output_hidden_states=True, output_attentions=True)
x0 = out.hidden_states[0]  # the input of block 0 (embedding LayerNorm output)
ln = model.params["h"][0]["input_layernorm"]
a = M.layer_norm(x0, ln["weight"], ln["bias"], cfg.layer_norm_epsilon)[0]  # [T, C]
print(T, "tokens:", tokens)

# %%
slopes = M.alibi_slopes(H, np.float64)
causal = np.tril(np.ones((T, T), dtype=bool))
Q, K, Vv = a @ Wq.T + bq, a @ Wk.T + bk, a @ Wv.T + bv  # [T, C] each: heads side by side
heads, probs = [], []
for h in range(H):
    s = slice(h * D, (h + 1) * D)
    scores = Q[:, s] @ K[:, s].T / math.sqrt(D) + slopes[h] * np.arange(T)[None, :]
    scores = np.where(causal, scores, -np.inf)  # -inf is fine here: every row sees at least itself
    w = np.exp(scores - scores.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    probs.append(w)
    heads.append(w @ Vv[:, s])
ctx = np.concatenate(heads, axis=-1)  # [T, C]
attn_mine = ctx @ p0["dense"]["weight"].T + p0["dense"]["bias"]

mask = np.ones_like(ids)
tape = M.Tape(attentions=True)  # records what the primitives compute, here the attention probabilities
with M.using(tape=tape):
    attn_pkg = M.attention(a[None], p0, M.alibi_bias(mask, slopes), M.causal_mask(mask, T), cfg)
probs_pkg = tape.probs[0]
assert_rel_close(attn_mine, attn_pkg[0], FP64_SELF, "attention output")
assert_rel_close(np.stack(probs), probs_pkg[0], FP64_SELF, "attention probabilities")
assert_rel_close(np.stack(probs), out.attentions[0][0], FP64_SELF, "probabilities reported by forward")
print("hand-built attention = minibloom's, to", f"{np.abs(attn_mine - attn_pkg[0]).max():.1e}")

# %% [markdown]
# What if we had split the fused output as `[Q; K; V]`, the first `C` rows as queries, the next `C` as keys? The
# shapes all fit, nothing crashes, and the model computes garbage: "queries" made of a mix of real queries, keys and
# values of different heads. A checkpoint converter that makes this mistake produces a model that loads and runs
# but does not work.

# %%
Qw, Kw, Vw = (a @ W[i * C:(i + 1) * C].T + b[i * C:(i + 1) * C] for i in range(3))  # the wrong split
wrong = []
for h in range(H):
    s = slice(h * D, (h + 1) * D)
    sc = np.where(causal, Qw[:, s] @ Kw[:, s].T / math.sqrt(D) + slopes[h] * np.arange(T), -np.inf)
    wrong.append(np.exp(sc - sc.max(-1, keepdims=True)) / np.exp(sc - sc.max(-1, keepdims=True)).sum(-1, keepdims=True))
gap = np.abs(np.stack(wrong) - np.stack(probs)).max()
print(f"largest difference in attention probabilities with the wrong split: {gap:.2f}")
assert gap > 0.1

# %% [markdown]
# ## 3. The causal mask and the padding mask
#
# A query may look at a key when the key is **not in the future** and **not padding**. BLOOM pads batches on the left;
# `causal_mask` takes the `[B, S]` attention mask (1 = token, 0 = pad) and returns `[B, 1, T, S]` booleans. Here is a
# batch of two lines, the shorter one left-padded.

# %%
lines = ["ROMEO:\nShe speaks: O, speak again, bright angel!", "JULIET:\nAy me!"]
batch_ids, batch_mask = model.tokenizer.encode_batch(lines)
allowed = M.causal_mask(batch_mask, batch_ids.shape[1])[:, 0]  # [B, T, T]
mine = np.tril(np.ones(allowed.shape[1:], bool))[None] & (batch_mask[:, None, :] == 1)
assert np.array_equal(allowed, mine)
print(batch_mask)

fig, axes = plt.subplots(1, 2, figsize=(7.5, 3.4))
for k, axis in enumerate(axes):
    axis.imshow(allowed[k], cmap="Greys", vmin=0, vmax=1.3)
    axis.set_title(f"row {k}: {lines[k]!r}", fontsize=8)
    axis.set_xlabel("key")
    axis.set_ylabel("query")
fig.tight_layout()

# %% [markdown]
# Masked cells get the most negative float before the softmax, so they receive probability exactly 0. The queries at
# pad positions (the top rows of the padded example) see no key at all; minibloom's softmax makes those rows uniform
# instead of NaN, and nothing reads them. The real tokens of the padded row compute the same attention as the line
# alone:

# %%
res = model.forward(batch_ids, batch_mask, output_attentions=True)
n_pad = int((batch_mask[1] == 0).sum())
assert n_pad > 0
alone = model.forward(batch_ids[1:, n_pad:], output_attentions=True)
for layer in range(cfg.n_layer):
    p_pad = res.attentions[layer][1][:, n_pad:, n_pad:]
    assert_rel_close(p_pad, alone.attentions[layer][0], FP64_SELF, f"layer {layer} attention, padded vs alone")
    assert np.all(res.attentions[layer][1][:, n_pad:, :n_pad] == 0)  # real queries give pads exactly 0
assert np.isfinite(res.attentions[0]).all()
print(f"{n_pad} pads: real-token attention identical to the unpadded line in all {cfg.n_layer} layers")

# %% [markdown]
# ## 4. What the trained heads look at
#
# `forward(..., output_attentions=True)` returns the probabilities of every layer and head, `[B, H, T, T]`. Each row
# sums to 1 over the keys the query may see. Below: every head of every layer on the line from section 2 (rows are
# queries, columns keys; darker = more attention).

# %%
att = np.stack([t[0] for t in out.attentions])  # [L, H, T, T]
assert np.allclose(att.sum(-1), 1.0) and np.all(att[:, :, ~causal] == 0)

L = cfg.n_layer
fig, axes = plt.subplots(L, H, figsize=(1.5 * H, 1.5 * L + 0.4))
for layer in range(L):
    for h in range(H):
        axis = axes[layer, h]
        axis.imshow(att[layer, h], cmap="Blues", vmin=0, vmax=1)
        axis.set_xticks([])
        axis.set_yticks([])
        if layer == 0:
            axis.set_title(f"head {h}\nm={slopes[h]:.3g}", fontsize=8)
        if h == 0:
            axis.set_ylabel(f"layer {layer}", fontsize=8)
fig.tight_layout()

# %% [markdown]
# A closer look at two heads of the last layer, with the tokens written out:

# %%
last = L - 1
mean_dist = (att * (np.arange(T)[:, None] - np.arange(T)[None, :])).sum(-1).mean(-1)  # [L, H]: average look-back
local, broad = int(mean_dist[last].argmin()), int(mean_dist[last].argmax())
fig, axes = plt.subplots(1, 2, figsize=(9.5, 4.6))
for axis, h in zip(axes, (local, broad)):
    axis.imshow(att[last, h], cmap="Blues", vmin=0, vmax=1)
    axis.set_xticks(range(T), [repr(t)[1:-1] for t in tokens], rotation=90, fontsize=7)
    axis.set_yticks(range(T), [repr(t)[1:-1] for t in tokens], fontsize=7)
    axis.set_title(f"layer {last}, head {h} (slope {slopes[h]:.3g}): looks back {mean_dist[last, h]:.1f} tokens",
                   fontsize=9)
fig.tight_layout()

# %% [markdown]
# Two kinds of heads show up. **Local** heads read the last few tokens, the diagonal band in the left panel; with
# ALiBi's steep slopes that is the cheapest thing to learn. Other heads send most queries' attention to a fixed early
# token (the first token or a line break), the vertical stripes. Attending to a token that carries little
# information is how a head does "nothing" when it has nothing to add (softmax must put its mass somewhere); such
# tokens are often called *attention sinks*. Here the sinks are the line breaks. The share of each head's attention
# that lands on tokens containing a line break (averaged over the queries after the first one), against the share
# those tokens would get if attention were spread evenly over the visible keys:

# %%
is_break = np.array(["\n" in t for t in tokens])
first_break = int(is_break.argmax())
break_share = att[:, :, first_break + 1:, is_break].sum(-1).mean(-1)  # [L, H]
print(f"{is_break.sum()} of {T} tokens contain a line break; their share of the attention, per head (rows: layers):")
print(break_share.round(2))
visible = np.tril(np.ones((T, T)))[first_break + 1:]  # causal: query q sees keys 0..q
even_share = (visible[:, is_break].sum(-1) / visible.sum(-1)).mean()
print(f"even spread would give them {even_share:.2f}; the strongest sink head gives them {break_share.max():.2f}")
assert break_share.max() > 0.5 > even_share  # some head parks over half its attention on these few tokens

# %% [markdown]
# ## 5. Slope and reach
#
# Does the ALiBi slope decide how far a head looks? For each head we average, over the queries of the line, the
# distance `query − key` weighted by the attention. Heads with steep slopes (left) are pushed towards the last few
# tokens; heads with flat slopes are free to look far back, and training decides whether they do. In the default
# model, averaged over the layers, the head with the steepest slope looks back less far than the one with the
# flattest slope.

# %%
order = np.argsort(-slopes)
fig, ax = plt.subplots(figsize=(6.5, 3))
for layer in range(L):
    ax.plot(slopes[order], mean_dist[layer, order], "o-", ms=4, label=f"layer {layer}")
ax.set_xscale("log")
ax.invert_xaxis()
ax.set_xlabel("ALiBi slope of the head (steep → flat)")
ax.set_ylabel("mean look-back (tokens)")
ax.legend(fontsize=8)
fig.tight_layout()
print("mean look-back per head (rows: layers):")
print(mean_dist)
steepest, flattest = int(slopes.argmax()), int(slopes.argmin())
print(f"average look-back: steepest head {mean_dist[:, steepest].mean():.2f}, flattest {mean_dist[:, flattest].mean():.2f}")
assert mean_dist[:, steepest].mean() < mean_dist[:, flattest].mean()

# %% [markdown]
# ## What's next
#
# Notebook 5 assembles everything, embedding, ALiBi, attention and MLP, into a full forward pass by hand, layer by
# layer.
