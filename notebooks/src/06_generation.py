# %% [markdown]
# # 6. Generation: the KV cache, decoding rules, and chat templates
#
# A forward pass gives a score for every possible next token at every position. Generation uses only the last
# position: choose a token, append it, repeat. This notebook builds that loop by hand on minibloom's default model
# (a small BLOOM trained on Tiny Shakespeare) and then makes it fast and interesting.
#
# What you'll learn:
#
# - the generation loop, by hand, and that it equals `model.generate`;
# - the **KV cache**: what it stores, why it is exact, how much memory it needs, and what it saves (measured);
# - greedy decoding vs sampling with temperature, top-k and top-p, with top-k/top-p re-derived by hand;
# - the chat templates of the BLOOM chat fine-tunes, and a chat with the default model.

# %%
import time

import numpy as np
import matplotlib.pyplot as plt

import minibloom
from minibloom import chat
from minibloom import generate as G
from minibloom import model as M
from minibloom.testing import FP32, assert_rel_close

rng = np.random.default_rng(0)
plt.rcParams.update({"figure.dpi": 80, "figure.figsize": (7, 3.2)})
np.set_printoptions(precision=3, suppress=True, linewidth=110)

# %%
model = minibloom.load()  # the default model, float32
tok = model.tokenizer
cfg = model.config
prompt = "ROMEO:\nWhat light is"
ids = np.array([tok.encode(prompt)])
print(model)
print(ids)

# %% [markdown]
# ## 1. The loop, by hand
#
# Greedy decoding: run the model on everything so far, take the highest-scoring token at the last position, append it.
# BLOOM adds no BOS token, so the prompt's own tokens are the whole context.

# %%
def greedy_by_hand(ids, n_new):
    for _ in range(n_new):
        logits = model(ids)  # [1, T, V]: the full sequence, every step
        nxt = logits[0, -1].argmax()
        ids = np.concatenate([ids, [[nxt]]], axis=1)
    return ids


mine = greedy_by_hand(ids, 20)
theirs = model.generate(ids, max_new_tokens=20)  # greedy by default, with a KV cache
assert np.array_equal(mine, theirs)
print(repr(tok.decode(mine[0])))

# %% [markdown]
# ## 2. The KV cache
#
# Each step above recomputes the whole sequence, although only the last position is new. Look at what a new token
# needs from the past: in every layer, its query is compared with the **keys** of all earlier positions and it averages
# their **values**. Earlier tokens never see later ones (causal mask), so their keys and values never change once
# computed. Store them, and each step only has to process the one new token:
#
# - *prefill*: one pass over the prompt, storing `k` and `v` of every layer (`[B, H, S, D]` each);
# - *decode*: one token at a time; its `k`, `v` are appended, and its query attends to all stored keys.
#
# The attention mask must grow by one column per step: ALiBi's positions come from the cumulative mask (notebook 3).

# %%
n_new = 8
cache = model.new_cache(batch=1, max_len=ids.shape[1] + n_new)
seq = ids.copy()
out = model.forward(seq, cache=cache, logits="last")  # prefill
for step in range(n_new):
    nxt = out.logits[0, -1].argmax()
    full = model(np.concatenate([seq, [[nxt]]], axis=1))[0, -1]  # the uncached answer for the next step
    seq = np.concatenate([seq, [[nxt]]], axis=1)
    out = model.forward(seq[:, -1:], np.ones_like(seq), cache=cache, logits="last")  # one new token
    assert_rel_close(out.logits[0, -1], full, FP32, f"step {step}: cached vs full logits")
print("cache holds", cache.length, "positions; keys of layer 0:", cache.k[0][:, :, : cache.length].shape)

# %% [markdown]
# The cached logits equal the full recomputation up to float32 rounding (the matrix products are summed in a different
# order). The price is memory: `2 (k and v) × layers × positions × C` numbers per sequence.

# %%
for name, C, L in [("default model", cfg.hidden_size, cfg.n_layer), ("bloom-560m", 1024, 24), ("bloom-7b1", 4096, 30),
                   ("bloom (176B)", 14336, 70)]:
    per_token = 2 * L * C
    print(f"{name:14s} {per_token:>9,d} numbers per token = {per_token * 2 / 2**10:8.1f} KiB in 16-bit; "
          f"{per_token * 2 * 2048 / 2**30:7.3f} GiB for 2,048 tokens")

# %% [markdown]
# ### What it saves, measured
#
# Without a cache, step `t` processes `t` tokens, so generating `N` tokens costs about `N²/2` token-passes; with the
# cache every step processes one token (its attention still reads all `t` stored keys, which is cheap next to the
# matrix products at this size). We time one step both ways at growing lengths (one thread, best of several runs; the
# machine is shared, so only the shape of the curves matters).

# %%
try:  # one BLAS thread: steadier timings on a shared machine
    from threadpoolctl import threadpool_limits
except ImportError:
    from contextlib import nullcontext as threadpool_limits


def best_time(f, repeats=7):
    times = []
    with threadpool_limits(1):
        for _ in range(repeats):
            t0 = time.perf_counter()
            f()
            times.append(time.perf_counter() - t0)
    return min(times)


lengths = [16, 32, 64, 128, 256]
long_ids = np.array([tok.encode(open("../data/tinyshakespeare.txt", encoding="utf-8").read(4000))[:257]])
no_cache, with_cache = [], []
for n in lengths:
    no_cache.append(best_time(lambda: model.forward(long_ids[:, : n + 1], logits="last")))
    c = model.new_cache(1, n + 1)
    model.forward(long_ids[:, :n], cache=c, logits="last")  # prefill n tokens

    def one_step():
        c.length = n  # rewind, so every repeat measures the same step
        model.forward(long_ids[:, n: n + 1], np.ones((1, n + 1), np.int64), cache=c, logits="last")

    with_cache.append(best_time(one_step))
for n, a, b in zip(lengths, no_cache, with_cache):
    print(f"step at length {n:3d}: without cache {a * 1e3:7.2f} ms, with cache {b * 1e3:6.2f} ms  ({a / b:4.1f}x)")
assert no_cache[-1] > 2 * with_cache[-1]  # at 256 tokens the cached step is many times cheaper

# %%
fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
ax[0].plot(lengths, np.array(no_cache) * 1e3, "o-", label="no cache: whole sequence")
ax[0].plot(lengths, np.array(with_cache) * 1e3, "s-", label="KV cache: one token")
ax[0].set_xlabel("tokens so far")
ax[0].set_ylabel("ms per generated token")
ax[0].legend(fontsize=8)
grid = np.arange(1, 257)
ax[1].plot(grid, np.cumsum(np.interp(grid, lengths, no_cache)), label="no cache")
ax[1].plot(grid, np.cumsum(np.interp(grid, lengths, with_cache)), label="KV cache")
ax[1].set_xlabel("tokens generated")
ax[1].set_ylabel("total seconds (interpolated)")
ax[1].legend(fontsize=8)
fig.tight_layout()

# %% [markdown]
# ## 3. Choosing the next token
#
# The last position's logits $z$ define a distribution $p = \mathrm{softmax}(z / \tau)$. The decoding rules differ only
# in how they pick from it:
#
# - **greedy**: the argmax (deterministic; tends to loop);
# - **temperature** $\tau$: divide the logits before the softmax; $\tau < 1$ sharpens, $\tau > 1$ flattens;
# - **top-k**: keep the `k` most likely tokens, renormalise;
# - **top-p** (nucleus): keep the smallest set of most likely tokens whose probability reaches `p`, renormalise.
#
# transformers applies them in this order (temperature, then top-k, then top-p), and so does minibloom. Here is the
# distribution after a prompt, and top-k / top-p re-derived by hand against minibloom's implementations.

# %%
ctx = np.array([tok.encode("JULIET:\nO Romeo, Romeo! wherefore art thou")])
z = model(ctx)[0, -1].astype(np.float64)  # [V]
p = M.softmax(z[None])[0]
order = np.argsort(-p)
print("most likely next tokens:", [(tok.decode([i]), round(float(p[i]), 3)) for i in order[:6]])


def top_k_by_hand(z, k):
    kth = np.sort(z)[-k]
    return np.where(z >= kth, z, -np.inf)


def top_p_by_hand(z, top_p):
    probs = M.softmax(z[None])[0]
    idx = np.argsort(-probs, kind="stable")
    before = np.cumsum(probs[idx]) - probs[idx]  # mass of the strictly more likely tokens
    keep = np.zeros(z.shape, bool)
    keep[idx[before < top_p]] = True  # keep a token while the mass before it is below p
    return np.where(keep, z, -np.inf)


for k in (1, 5, 40):
    assert np.array_equal(top_k_by_hand(z, k), G.apply_top_k(z[None], k)[0])
for top_p in (0.5, 0.9, 0.99):
    assert np.array_equal(top_p_by_hand(z, top_p), G.apply_top_p(z[None], top_p)[0])
print("kept by top-k 40:", np.isfinite(top_k_by_hand(z, 40)).sum(),
      " by top-p 0.9:", np.isfinite(top_p_by_hand(z, 0.9)).sum(), "tokens")

# %%
fig, ax = plt.subplots(1, 2, figsize=(10, 3.4), gridspec_kw={"width_ratios": [3, 2]})
show = order[:25]
for tau, style in ((0.5, "o-"), (1.0, "s-"), (1.5, "^-")):
    ax[0].plot(range(25), M.softmax(z[None] / tau)[0][show], style, ms=3, label=f"temperature {tau}")
ax[0].set_xticks(range(25), [repr(tok.decode([i]))[1:-1] for i in show], rotation=90, fontsize=7)
ax[0].set_ylabel("probability")
ax[0].legend(fontsize=8)
rank = np.arange(1, len(p) + 1)
ax[1].semilogx(rank, np.cumsum(p[order]), color="tab:orange")
n_p = int(np.isfinite(top_p_by_hand(z, 0.9)).sum())
ax[1].axvline(40, color="gray", ls=":", lw=1)
ax[1].axvline(n_p, color="gray", ls="--", lw=1)
ax[1].text(40, 0.1, " top-k 40", fontsize=8)
ax[1].text(n_p, 0.3, f" top-p 0.9\n ({n_p} tokens)", fontsize=8)
ax[1].set_xlabel("tokens, most likely first")
ax[1].set_ylabel("cumulative probability (τ = 1)")
fig.tight_layout()

# %% [markdown]
# The same prompt decoded four ways (sampling is seeded, so the notebook is reproducible). Sampling with `top_k=1`
# can only ever pick the argmax, so it must reproduce greedy decoding exactly:

# %%
settings = {
    "greedy": dict(),
    "temperature 0.8, top-k 40": dict(do_sample=True, temperature=0.8, top_k=40, seed=1),
    "temperature 1.0, top-p 0.9": dict(do_sample=True, temperature=1.0, top_k=0, top_p=0.9, seed=1),
    "temperature 1.5, no filter": dict(do_sample=True, temperature=1.5, top_k=0, seed=1),
}
texts = {}
for name, kw in settings.items():
    texts[name] = tok.decode(model.generate(ctx, max_new_tokens=40, **kw)[0, ctx.shape[1]:])
    print(f"--- {name}\n{texts[name]}")
same = model.generate(ctx, max_new_tokens=40, do_sample=True, top_k=1, seed=123)
assert np.array_equal(same, model.generate(ctx, max_new_tokens=40))
assert texts["temperature 0.8, top-k 40"] == tok.decode(
    model.generate(ctx, max_new_tokens=40, **settings["temperature 0.8, top-k 40"])[0, ctx.shape[1]:])  # seeded

# %% [markdown]
# ## 4. Chat templates
#
# A base model continues text; a chat fine-tune was trained on conversations written in one fixed format, and must be
# prompted in that format. `minibloom.chat` knows the formats of the BLOOM chat models (taken from their model cards),
# and one for the default model, which only knows plays: you are ROMEO and it answers as JULIET.

# %%
conversation = [{"role": "user", "content": "Good morrow!"},
                {"role": "assistant", "content": "Good morrow, sweet."},
                {"role": "user", "content": "What news?"}]
for name, t in chat.TEMPLATES.items():
    print(f"=== {name} ({', '.join(t.models)})\n{chat.render(conversation, name)!r}")

# %% [markdown]
# Each format, written out by hand from its description, equals what `chat.render` produces:

# %%
by_hand = {
    "bloomz-sft-chat": "</s>Good morrow!<s>Good morrow, sweet.</s>What news?<s>",
    "oasst": "<|prompter|>Good morrow!</s><|assistant|>Good morrow, sweet.</s><|prompter|>What news?</s><|assistant|>",
    "plain": "Good morrow!Good morrow, sweet.What news?",
    "play": "ROMEO:\nGood morrow!\n\nJULIET:\nGood morrow, sweet.\n\nROMEO:\nWhat news?\n\nJULIET:\n",
}
for name, text in by_hand.items():
    assert chat.render(conversation, name) == text, name
assert chat.detect(model.path) == "play"
# the special tokens of these formats are single tokens, matched before pre-tokenisation:
assert tok.encode("</s>Hi<s>")[0] == 2 and tok.encode("</s>Hi<s>")[-1] == 1

# %% [markdown]
# A short scene with the default model, using the `play` template and its stop string (a blank line ends JULIET's
# speech):

# %%
scene = [{"role": "user", "content": "Wilt thou be gone? It is not yet near day."}]
text = chat.render(scene, "play")
out = model.generate(np.array([tok.encode(text)]), max_new_tokens=60, do_sample=True, temperature=0.8, top_k=40,
                     seed=7)
reply = tok.decode(out[0, len(tok.encode(text)):])
for stop in chat.stop_strings("play"):
    reply = reply.split(stop)[0]
print(text + reply)
assert "\n\n" not in reply

# %% [markdown]
# ## What's next
#
# Notebook 7 shrinks the weights: the GGUF (llama.cpp) and bitsandbytes 4-bit formats store BLOOM in 4 to 8 bits per
# weight. We draw their block layouts and measure what the rounding costs.
