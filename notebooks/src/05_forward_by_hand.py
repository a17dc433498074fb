# %% [markdown]
# # 5. One full forward pass, built by hand
#
# This notebook computes BLOOM's logits for a line of Shakespeare **step by step**, from the token ids to the scores
# of the next token, using only minibloom's small pure functions (`layer_norm`, `linear`, `gelu`, `softmax`,
# `alibi_bias`, `causal_mask`) and plain NumPy. At every layer the hand-built result is asserted equal to
# `minibloom`'s own forward pass, and to transformers' `BloomForCausalLM` when transformers is installed.
#
# What you'll learn:
#
# - the complete recipe of a BLOOM forward pass, in about thirty lines;
# - the shapes at every step (`B` batch, `T` tokens, `C` hidden, `H` heads, `D = C/H`, `V` vocabulary rows);
# - how close float32 stays to float64 through the layers, and how to read a per-layer difference plot.
#
# We use minibloom's built-in default model: a small BLOOM (same architecture as bigscience/bloom, fewer and narrower
# layers) trained on Tiny Shakespeare and stored in `weights/default`.

# %%
import math

import numpy as np
import matplotlib.pyplot as plt

import minibloom
from minibloom import model as M
from minibloom.testing import FP32, FP64_SELF, assert_rel_close, rel_error

rng = np.random.default_rng(0)
plt.rcParams.update({"figure.dpi": 80, "figure.figsize": (7, 3.2)})
np.set_printoptions(precision=4, suppress=True, linewidth=110)

# %%
model64 = minibloom.load(dtype="float64")  # None = the default model; float64 = minibloom's oracle mode
model32 = minibloom.load(dtype="float32")  # float32 = transformers' numerics
cfg = model64.config
print(model64)
print(f"C = {cfg.hidden_size}, L = {cfg.n_layer}, H = {cfg.n_head}, D = {cfg.head_dim}, V = {model64.vocab_size}")

# %%
text = "ROMEO:\nBut, soft! what light through yonder window breaks?"
ids = np.array([model64.encode(text)])  # [B=1, T]
print(ids.shape, [model64.tokenizer.id_to_token(i) for i in ids[0]])

# %% [markdown]
# ## 1. The recipe
#
# ```
# x = LayerNorm_emb(E[ids])                                    embedding + embedding LayerNorm        [B, T, C]
# for each block:
#     a = LayerNorm_1(x)
#     q, k, v = split_per_head(a @ W_qkvᵀ + b_qkv)                fused projection, per-head layout   [B, H, T, D]
#     s = (q @ kᵀ) / √D + alibi, masked                           scores                              [B, H, T, T]
#     x = x + (softmax(s) @ v, heads merged) @ W_oᵀ + b_o         attention branch + residual         [B, T, C]
#     x = x + gelu(LayerNorm_2(x) @ W_1ᵀ + b_1) @ W_2ᵀ + b_2      MLP branch (C → 4C → C) + residual   [B, T, C]
# logits = LayerNorm_f(x) @ Eᵀ                                    tied output head                    [B, T, V]
# ```
#
# ## 2. Embedding, ALiBi and the mask
#
# The parameters are a nested dict with transformers' names: `params["h"][i]["self_attention"]["query_key_value"]
# ["weight"]` is block `i`'s fused QKV matrix, shape `[3C, C]`.

# %%
P = model64.params
eps = cfg.layer_norm_epsilon
E = P["word_embeddings"]["weight"]  # [V, C]
x = M.layer_norm(E[ids], P["word_embeddings_layernorm"]["weight"], P["word_embeddings_layernorm"]["bias"], eps)

mask = np.ones_like(ids)  # one row, no padding
alibi = M.alibi_bias(mask, M.alibi_slopes(cfg.n_head, np.float64))  # [B, H, 1, T]: slope x key position
allowed = M.causal_mask(mask, ids.shape[1])  # [B, 1, T, T]: key <= query, and not padding
print("x", x.shape, " alibi", alibi.shape, " allowed", allowed.shape)

# %% [markdown]
# ## 3. One block, one step per line
#
# The only subtle line is the split of the fused projection. `query_key_value` produces `3C` numbers per token laid
# out **head by head**: `[q of head 0, k of head 0, v of head 0, q of head 1, …]`, each `D` long. So the reshape is
# `[B, T, H, 3, D]`, not `[B, T, 3, H, D]` (notebook 4 shows what goes wrong with the latter).

# %%
def my_block(x, p, alibi, allowed, n_head):
    B, T, C = x.shape
    H, D = n_head, C // n_head
    # attention branch
    a = M.layer_norm(x, p["input_layernorm"]["weight"], p["input_layernorm"]["bias"], eps)
    qkv = a @ p["self_attention"]["query_key_value"]["weight"].T + p["self_attention"]["query_key_value"]["bias"]
    qkv = qkv.reshape(B, T, H, 3, D)  # per-head interleave
    q, k, v = (qkv[:, :, :, i, :].transpose(0, 2, 1, 3) for i in range(3))  # each [B, H, T, D]
    scores = alibi + (q @ k.transpose(0, 1, 3, 2)) * (1.0 / math.sqrt(D))  # [B, H, T, T]
    scores = np.where(allowed, scores, np.finfo(scores.dtype).min)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs = probs / probs.sum(-1, keepdims=True)
    ctx = (probs @ v).transpose(0, 2, 1, 3).reshape(B, T, C)  # heads side by side again
    x = x + ctx @ p["self_attention"]["dense"]["weight"].T + p["self_attention"]["dense"]["bias"]
    # MLP branch
    m = M.layer_norm(x, p["post_attention_layernorm"]["weight"], p["post_attention_layernorm"]["bias"], eps)
    m = m @ p["mlp"]["dense_h_to_4h"]["weight"].T + p["mlp"]["dense_h_to_4h"]["bias"]  # [B, T, 4C]
    m = 0.5 * m * (1.0 + np.tanh(0.79788456 * m * (1.0 + 0.044715 * m * m)))  # BLOOM's tanh GeLU
    m = m @ p["mlp"]["dense_4h_to_h"]["weight"].T + p["mlp"]["dense_4h_to_h"]["bias"]
    return x + m, probs


# %% [markdown]
# The GeLU line uses transformers' literal `0.79788456` (≈ √(2/π), cut short) so the numbers match to the last bit that
# matters. Block 0, hand-built, against minibloom's `block`:

# %%
y_mine, probs_mine = my_block(x, P["h"][0], alibi, allowed, cfg.n_head)
y_pkg = M.block(x, P["h"][0], alibi, allowed, cfg)
err = assert_rel_close(y_mine, y_pkg, FP64_SELF, "block 0")
assert np.allclose(probs_mine.sum(-1), 1.0)
print(f"block 0: relative difference {err:.1e}")

# %% [markdown]
# ## 4. All blocks, then the head
#
# `forward(..., output_hidden_states=True)` reports transformers' `hidden_states`: the embedding LayerNorm's output,
# then every block's output, with the last one taken after `ln_f`. We compare layer by layer.

# %%
ref = model64.forward(ids, output_hidden_states=True)
hidden_mine = [x]
h = x
for i, p in enumerate(P["h"]):
    h, _ = my_block(h, p, alibi, allowed, cfg.n_head)
    hidden_mine.append(h)
h = M.layer_norm(h, P["ln_f"]["weight"], P["ln_f"]["bias"], eps)
hidden_mine[-1] = h
logits_mine = h @ E.T  # [B, T, V]

for i, (mine, theirs) in enumerate(zip(hidden_mine, ref.hidden_states)):
    e = assert_rel_close(mine, theirs, FP64_SELF, f"hidden state {i}")
    print(f"hidden state {i}: relative difference {e:.1e}")
e = assert_rel_close(logits_mine, ref.logits, FP64_SELF, "logits")
print(f"logits {logits_mine.shape}: relative difference {e:.1e}")

# %% [markdown]
# The hand-built pass and minibloom agree to rounding level in float64. What does the model predict after each
# prefix of the line?

# %%
top = logits_mine[0].argmax(-1)
for t in range(ids.shape[1]):
    prefix = model64.decode(ids[0, : t + 1])
    print(f"{prefix[-24:]!r:>30} -> {model64.decode([top[t]])!r}")

# %% [markdown]
# ## 5. Against transformers (when it is installed)
#
# transformers' `BloomForCausalLM` loads the same checkpoint. In float32 the two implementations run the same
# arithmetic in a different order, so they agree to float32 rounding. In float64 transformers is not quite a float64
# model as shipped (its attention softmax and ALiBi slopes stay in float32); `minibloom.oracle.hf_float64_exact()`
# patches those two spots, and then the two agree to ~1e-15. Without torch/transformers this section is skipped.

# %%
import warnings

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm's notebook widgets are not needed here
try:
    import torch
    from transformers import BloomForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
except ImportError:
    torch = None
    print("torch or transformers is not installed: skipping the comparison")

hf_hidden = {}
if torch is not None:
    from minibloom.oracle import hf_float64_exact

    for dtype, tdtype in (("float32", torch.float32), ("float64", torch.float64)):
        hf = BloomForCausalLM.from_pretrained(model64.path, dtype=tdtype).eval()
        with torch.no_grad(), hf_float64_exact():
            out = hf(torch.from_numpy(ids), output_hidden_states=True)
        hf_hidden[dtype] = [t.numpy() for t in out.hidden_states] + [out.logits.numpy()]
    ours32 = model32.forward(ids, output_hidden_states=True)
    e32 = assert_rel_close(ours32.logits, hf_hidden["float32"][-1], FP32, "float32 logits vs transformers")
    e64 = assert_rel_close(logits_mine, hf_hidden["float64"][-1], FP64_SELF, "float64 logits vs transformers")
    print(f"logits vs transformers: float32 {e32:.1e}, float64 (patched) {e64:.1e}")

# %% [markdown]
# ## 6. float32 vs float64, layer by layer
#
# minibloom runs in float32 by default (what transformers does on a CPU) and in float64 as an oracle. How far apart are
# they? We run the hand-built pass on float32 copies of the weights and measure, at every hidden state, the relative
# difference `max|a − b| / max|b|` from the float64 pass; likewise for minibloom's own float32 forward, and for
# transformers when present.

# %%
def to32(tree):
    if isinstance(tree, dict):
        return {k: to32(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [to32(v) for v in tree]
    return tree.astype(np.float32)


P32 = to32(P)
h32 = M.layer_norm(P32["word_embeddings"]["weight"][ids], P32["word_embeddings_layernorm"]["weight"],
                   P32["word_embeddings_layernorm"]["bias"], eps)
alibi32 = M.alibi_bias(mask, M.alibi_slopes(cfg.n_head))  # float32 slopes, as transformers
hidden32 = [h32]
for p in P32["h"]:
    h32, _ = my_block(h32, p, alibi32, allowed, cfg.n_head)
    hidden32.append(h32)
h32 = M.layer_norm(h32, P32["ln_f"]["weight"], P32["ln_f"]["bias"], eps)
hidden32[-1] = h32
hidden32.append(h32 @ P32["word_embeddings"]["weight"].T)
assert hidden32[-1].dtype == np.float32

ref64 = ref.hidden_states + [ref.logits]
ours32 = model32.forward(ids, output_hidden_states=True)
curves = {"hand-built float32": [rel_error(a, b) for a, b in zip(hidden32, ref64)],
          "minibloom float32": [rel_error(a, b) for a, b in zip(ours32.hidden_states + [ours32.logits], ref64)],
          "hand-built float64": [rel_error(a, b) for a, b in zip(hidden_mine + [logits_mine], ref64)]}
if hf_hidden:
    curves["transformers float32"] = [rel_error(a, b) for a, b in zip(hf_hidden["float32"], ref64)]
    curves["transformers float64 (patched)"] = [rel_error(a, b) for a, b in zip(hf_hidden["float64"], ref64)]
for name, c in curves.items():
    print(f"{name:32s}", " ".join(f"{v:8.1e}" for v in c))
assert max(curves["hand-built float32"]) < FP32.rel and max(curves["minibloom float32"]) < FP32.rel
assert max(curves["hand-built float64"]) < FP64_SELF.rel

# %%
labels = ["emb LN"] + [f"block {i}" for i in range(cfg.n_layer - 1)] + [f"block {cfg.n_layer - 1}\n+ ln_f", "logits"]
fig, ax = plt.subplots(figsize=(7.5, 3.4))
for (name, c), marker in zip(curves.items(), "osx^v"):
    ax.semilogy(range(len(c)), np.maximum(c, 1e-18), marker=marker, ms=5, label=name)
ax.axhline(np.finfo(np.float32).eps, color="gray", ls=":", lw=1)
ax.text(len(labels) - 1, np.finfo(np.float32).eps / 5, "float32 epsilon", fontsize=8, color="gray", ha="right")
ax.set_xticks(range(len(labels)), labels, fontsize=8)
ax.set_ylabel("relative difference from float64")
ax.legend(fontsize=8, loc="center right")
fig.tight_layout()

# %% [markdown]
# (Exact zeros are drawn at 1e-18.) How to read it: the float32 curves sit a few float32 epsilons (1.2e-7) above zero
# and grow slowly with depth, as each block adds its own rounding to the residual stream; the float64 curves sit near
# 1e-16, the rounding of float64 itself.
# A bug shows up very differently: as a jump of many orders of magnitude at the first layer that computes something
# else. That is how `minibloom check` and `minibloom diff` localise disagreements, layer by layer.
#
# ## What's next
#
# Notebook 6 turns this forward pass into a text generator: the KV cache that avoids recomputing the past, and the
# sampling rules that choose the next token.
