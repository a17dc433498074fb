# %% [markdown]
# # 2. Embeddings, the embedding LayerNorm, and counting BLOOM's parameters
#
# BLOOM begins by turning token ids into vectors and ends by turning vectors back into one score per token id. Both
# steps use **one matrix**: the word embedding `E` of shape `[V, C]` (`V` = 250,880 rows, `C` = hidden size). In
# between, BLOOM does something most GPT-style models don't: it puts a **LayerNorm right after the embedding lookup**.
#
# What you'll learn:
#
# - an embedding lookup is a matrix product with one-hot vectors, and BLOOM has **no position embedding** (ALiBi
#   replaces it, notebook 3);
# - what the embedding LayerNorm computes, re-derived by hand, and why BLOOM has it;
# - the output head is the same matrix `E` (tied weights): `logits = h @ E.T`;
# - how to count the parameters of every BLOOM size from its config, exactly matching the published counts, and why
#   in bloom-560m almost half the parameters are the embedding.

# %%
import numpy as np
import matplotlib.pyplot as plt

import minibloom
from minibloom import model as M
from minibloom.config import BloomConfig
from minibloom.formats.weights import expected_shapes, random_params

rng = np.random.default_rng(0)
plt.rcParams.update({"figure.dpi": 80, "figure.figsize": (7, 3.2)})
np.set_printoptions(precision=4, suppress=True, linewidth=110)

# %% [markdown]
# ## 1. A small random BLOOM to look at
#
# We build a tiny model with BLOOM's exact architecture from random numbers. `expected_shapes` lists every tensor a
# BLOOM checkpoint holds, with transformers' names; `nest` turns `"h.0.mlp.dense_h_to_4h.weight"` into the nested dict
# minibloom's forward pass reads. Float64 keeps rounding out of the comparisons below.

# %%
cfg = BloomConfig(vocab_size=512, hidden_size=64, n_layer=2, n_head=8)
V = 512


# `random_params` (in `minibloom.formats.weights`) fills every tensor of `expected_shapes(cfg, V)` with N(0, std^2) noise
# (LayerNorm weights around 1) and nests them under transformers' names: a checkpoint without a file.
params = random_params(cfg, V, rng)
model = minibloom.Bloom(cfg, params, dtype="float64")
model

# %%
for name, shape in list(expected_shapes(cfg, V).items())[:17]:  # the top-level tensors and block 0
    print(f"{name:42s} {shape}")

# %% [markdown]
# ## 2. The lookup is a matrix product
#
# Token id `i` selects row `i` of `E`. Written as linear algebra, that is a one-hot row vector times `E`. Nothing else
# happens here: **no position embedding is added**. BLOOM tells tokens apart by position only inside attention, through
# the ALiBi bias (notebook 3).

# %%
E = params["word_embeddings"]["weight"]  # [V, C]
ids = np.array([[5, 17, 17, 300, 2]])  # [B=1, T=5]
one_hot = np.eye(V)[ids]  # [1, 5, V]
x_lookup = E[ids]  # [1, 5, C]
assert np.array_equal(one_hot @ E, x_lookup)
print(x_lookup.shape, "- the same token (17) at two positions gets the same vector:",
      np.array_equal(x_lookup[0, 1], x_lookup[0, 2]))

# %% [markdown]
# ## 3. The embedding LayerNorm, by hand
#
# `word_embeddings_layernorm` is an ordinary `torch.nn.LayerNorm` over the hidden dimension:
#
# $$\mathrm{LN}(x) = \frac{x - \mu}{\sqrt{\sigma^2 + \varepsilon}} \odot \gamma + \beta,\qquad
# \mu = \tfrac1C\sum_j x_j,\quad \sigma^2 = \tfrac1C\sum_j (x_j-\mu)^2 \;(\text{biased}),\quad \varepsilon = 10^{-5}.$$
#
# We write it out and check it against `minibloom.model.layer_norm`, and against the first hidden state that the full
# forward pass reports (transformers' convention: `hidden_states[0]` is the embedding LayerNorm's output).

# %%
def my_layer_norm(x, gamma, beta, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)  # biased variance, as torch
    return (x - mu) / np.sqrt(var + eps) * gamma + beta


eln = params["word_embeddings_layernorm"]
h0_mine = my_layer_norm(x_lookup, eln["weight"], eln["bias"])
h0_pkg = M.layer_norm(x_lookup, eln["weight"], eln["bias"], cfg.layer_norm_epsilon)
h0_forward = model.forward(ids, output_hidden_states=True).hidden_states[0]
assert np.allclose(h0_mine, h0_pkg, rtol=0, atol=1e-13)
assert np.allclose(h0_mine, h0_forward, rtol=0, atol=1e-13)
print("max |mine - minibloom| =", np.abs(h0_mine - h0_forward).max())

# %% [markdown]
# What does it do to the numbers? Embedding rows start tiny (transformers initialises them with
# `initializer_range` = 0.02, like our random model). After the LayerNorm (before `γ`, `β`) every token vector has
# mean 0 and a variance of almost 1, whatever the scale of its row: the residual stream starts at a fixed scale.
#
# "Almost" is exact arithmetic, not rounding: the normalised variance is $\sigma^2/(\sigma^2+\varepsilon)$. With rows
# of standard deviation 0.02, $\sigma^2 \approx 4\cdot10^{-4}$, and $\varepsilon = 10^{-5}$ is 2.5% of it, so the
# standard deviation comes out near 0.985, not 1.

# %%
var = x_lookup.var(-1, keepdims=True)
z = (x_lookup - x_lookup.mean(-1, keepdims=True)) / np.sqrt(var + 1e-5)
print("embedding rows: std per token ", x_lookup.std(-1).round(4))
print("after LN (γ=1, β=0): std      ", z.std(-1).round(4), " |mean| <", np.abs(z.mean(-1)).max())
assert np.allclose(z.mean(-1), 0, atol=1e-12)
assert np.allclose(z.var(-1, keepdims=True), var / (var + 1e-5), rtol=1e-12)

# %%
fig, ax = plt.subplots(1, 2, figsize=(8, 2.8))
ax[0].hist(E[:200].ravel(), bins=60, color="tab:gray")
ax[0].set_title("embedding entries (200 rows)")
ax[1].hist(my_layer_norm(E[:200], 1.0, 0.0).ravel(), bins=60, color="tab:blue")
ax[1].set_title("the same rows after LayerNorm")
for a in ax:
    a.set_yticks([])
fig.tight_layout()

# %% [markdown]
# **Why BLOOM has it.** For training stability. BigScience's earlier 104B-parameter runs kept diverging; for BLOOM-176B
# they switched to bfloat16, cleaned the data and added this LayerNorm. The training notes
# (bigscience-workshop/bigscience, `train/tr11-176B-ml/README.md`, "Embed LayerNorm") say it "makes the training more
# stable at a small training slowdown cost", an idea taken from the `StableEmbedding` of the bitsandbytes library (an
# embedding followed by a LayerNorm). It is one of BLOOM's two departures from the GPT recipe; the other is ALiBi.

# %% [markdown]
# ## 4. The output head is the same matrix
#
# After the last block and the final LayerNorm `ln_f`, the score of token `v` at a position is the dot product of the
# hidden vector with row `v` of `E`. There is no separate `lm_head` tensor in the checkpoints (`tie_word_embeddings`),
# and there are **as many logits as rows of `E`**: 250,880 for the released models.

# %%
out = model.forward(ids, output_hidden_states=True)
h_final = out.hidden_states[-1]  # after ln_f
logits_mine = h_final @ E.T  # [1, T, V]
assert np.allclose(logits_mine, out.logits, rtol=0, atol=1e-12)
print("logits shape:", out.logits.shape, "= [batch, tokens, rows of E]")

# %% [markdown]
# ## 5. Counting parameters
#
# Every tensor's shape follows from three numbers: `V`, `C` and the number of blocks `L`. Per block (PyTorch's
# `[out, in]` weight layout, with biases):
#
# | tensor | shape | count |
# |---|---|---|
# | input_layernorm (γ, β) | `[C]`, `[C]` | `2C` |
# | query_key_value | `[3C, C]` + `[3C]` | `3C² + 3C` |
# | dense (attention output) | `[C, C]` + `[C]` | `C² + C` |
# | post_attention_layernorm | `[C]`, `[C]` | `2C` |
# | dense_h_to_4h | `[4C, C]` + `[4C]` | `4C² + 4C` |
# | dense_4h_to_h | `[C, 4C]` + `[C]` | `4C² + C` |
# | **block total** | | **`12C² + 13C`** |
#
# plus the embedding `VC`, the embedding LayerNorm `2C` and the final LayerNorm `2C`:
#
# $$N = VC + L\,(12C^2 + 13C) + 4C.$$
#
# The head adds nothing: it is `E` again.

# %%
def count_by_hand(V, C, L):
    return V * C + L * (12 * C * C + 13 * C) + 4 * C


n_tensors = sum(int(np.prod(s)) for s in expected_shapes(cfg, V).values())
assert count_by_hand(V, cfg.hidden_size, cfg.n_layer) == n_tensors == cfg.n_params(V) == model.n_params
print(f"tiny model: {n_tensors:,} parameters")

# %% [markdown]
# The released sizes (hidden size, blocks, heads: from keras-hub's presets and the bigscience
# configs). The first four published counts are exact (keras-hub `bloom_presets.py`); for bloom-7b1 and bloom (176B) the
# published tables give millions, "7,069M" and "176,247M".

# %%
SIZES = {  # name: (hidden_size, n_layer, n_head, published parameter count)
    "bloom-560m": (1024, 24, 16, 559_214_592),
    "bloom-1b1": (1536, 24, 16, 1_065_314_304),
    "bloom-1b7": (2048, 24, 16, 1_722_408_960),
    "bloom-3b": (2560, 30, 32, 3_002_557_440),
    "bloom-7b1": (4096, 30, 32, 7_069 * 10**6),
    "bloom": (14336, 70, 112, 176_247 * 10**6),
}
V_BLOOM = 250_880
rows = []
for name, (C, L, H, published) in SIZES.items():
    c = BloomConfig(hidden_size=C, n_layer=L, n_head=H)
    n = c.n_params(V_BLOOM)
    assert n == count_by_hand(V_BLOOM, C, L)
    if published % 10**6:  # an exact published count
        assert n == published, (name, n, published)
    else:  # published in millions
        assert n // 10**6 == published // 10**6, (name, n, published)
    rows.append((name, C, L, H, C // H, n, V_BLOOM * C / n))

print(f"{'model':11s} {'C':>6s} {'L':>3s} {'H':>4s} {'D':>4s} {'parameters':>16s} {'embedding share':>16s}")
for name, C, L, H, D, n, share in rows:
    print(f"{name:11s} {C:6d} {L:3d} {H:4d} {D:4d} {n:16,d} {share:15.1%}")

# %% [markdown]
# All four exact published counts are reproduced to the parameter. The last column is the surprise: in **bloom-560m
# almost half the parameters (46%) are the embedding**, because a 250,880-token multilingual vocabulary times 1,024
# dimensions is 257M numbers, while the 24 blocks hold 302M. At 176B the embedding is a rounding error (2%).

# %%
names = [r[0] for r in rows]
parts = {"embedding VC": [], "attention 4C²+4C per block": [], "MLP 8C²+5C per block": [], "LayerNorms": []}
for name, (C, L, H, _) in SIZES.items():
    n = count_by_hand(V_BLOOM, C, L)
    parts["embedding VC"].append(V_BLOOM * C / n)
    parts["attention 4C²+4C per block"].append(L * (4 * C * C + 4 * C) / n)
    parts["MLP 8C²+5C per block"].append(L * (8 * C * C + 5 * C) / n)
    parts["LayerNorms"].append((4 * C * L + 4 * C) / n)
assert np.allclose(np.sum(list(parts.values()), axis=0), 1.0)

fig, ax = plt.subplots(figsize=(7.5, 3))
left = np.zeros(len(names))
for label, frac in parts.items():
    ax.barh(names, frac, left=left, label=label)
    left += np.array(frac)
ax.invert_yaxis()
ax.set_xlabel("share of all parameters")
ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, fontsize=8, frameon=False)
fig.tight_layout()

# %% [markdown]
# ## 6. What that means in bytes
#
# Memory for the weights alone, from the same counts: 4 bytes per parameter in float32, 2 in a 16-bit float (how the
# checkpoints are published), and the two GGUF block formats of notebook 7: Q8_0 stores 32 weights as 32 int8 plus one
# float16 scale (34 bytes, 8.5 bits per weight) and Q4_0 stores them as 16 bytes of nibbles plus the scale (18 bytes,
# 4.5 bits per weight). (Real GGUF files keep a few small tensors, such as LayerNorms, in float32; that changes little.)

# %%
print(f"{'model':11s} {'float32':>10s} {'16-bit':>10s} {'Q8_0':>10s} {'Q4_0':>10s}   (GiB)")
for name, C, L, H, D, n, share in rows:
    gib = [n * b / 2**30 for b in (4, 2, 34 / 32, 18 / 32)]
    print(f"{name:11s} " + " ".join(f"{g:10.2f}" for g in gib))

# %% [markdown]
# ## What's next
#
# The embedding carries no position. Notebook 3 shows how BLOOM still knows word order: **ALiBi**, a fixed linear bias
# on the attention scores, one slope per head.
