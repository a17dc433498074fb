# %% [markdown]
# # 8. Backpropagation by hand
#
# The first seven notebooks ran BLOOM forwards. This one runs it **backwards**: it derives the gradients of the two
# pieces people find hardest, LayerNorm and ALiBi-masked softmax attention, checks each one three ways (finite
# differences, minibloom's `backward` module, and torch's autograd when torch is installed), and then trains a tiny
# BLOOM from scratch with nothing but NumPy, drawing its loss curve.
#
# What you'll learn:
#
# - reverse-mode differentiation as a chain of small functions, each with a `*_backward` twin (llm.c's layout);
# - the LayerNorm gradient, `dx = r (g − mean(g) − x̂ · mean(g x̂))`, and why the two means appear;
# - the softmax and attention gradients, `ds = p (dp − Σ dp p)`, `dq = ds k / √D`, `dk = dsᵀ q / √D`, `dv = pᵀ dctx`;
# - how to check any gradient with finite differences, and what a training loop adds (AdamW, warm-up, clipping).
#
# Shapes use the model's notation: `B` batch, `T` tokens, `C` hidden, `H` heads, `D = C/H`, `V` vocabulary rows.

# %%
import time

import numpy as np
import matplotlib.pyplot as plt

import minibloom
from minibloom import backward as G
from minibloom import model as M
from minibloom.bloom import hf_names
from minibloom.paths import default_model_path
from minibloom.testing import assert_grads_close, numerical_gradient, rel_error
from minibloom.training import train

rng = np.random.default_rng(0)
plt.rcParams.update({"figure.dpi": 80, "figure.figsize": (7, 3.2)})
np.set_printoptions(precision=4, suppress=True, linewidth=110)
# numerical_gradient(f, x, dy): d<f(x), dy>/dx by central differences, one entry at a time (slow, simple, and
# independent of any derivation; minibloom.testing has it for checking your own backward functions)

# %% [markdown]
# ## 1. The rule of the game
#
# A loss `L` is a chain of functions, `L = ℓ(f_n(… f_1(x)))`. Reverse mode walks the chain backwards carrying
# `dy = ∂L/∂y`, the gradient with respect to a function's output; each function's backward turns it into `∂L/∂x` for
# its input (and `∂L/∂θ` for its parameters). So each forward function in `minibloom.model` has one backward function
# in `minibloom.backward` that takes `dy` and what the forward saw.
#
# The simplest is the linear map `y = x Wᵀ + b`: `dx = dy W`, `dW = dyᵀ x` summed over tokens, `db = Σ dy`.

# %%
x, W, b = rng.normal(size=(2, 3, 5)), rng.normal(size=(4, 5)), rng.normal(size=4)
dy = rng.normal(size=(2, 3, 4))  # pretend this came from the layers above
dx, grads = G.linear_backward(dy, x, W)
print("dx", dx.shape, " dW", grads["weight"].shape, " db", grads["bias"].shape)
assert rel_error(dx, numerical_gradient(lambda a: M.linear(a, W, b), x, dy)) < 1e-8
assert rel_error(grads["weight"], numerical_gradient(lambda a: M.linear(x, a, b), W, dy)) < 1e-8

# %% [markdown]
# ## 2. LayerNorm
#
# Forward, per token (a row of `C` numbers): `μ = mean(x)`, `σ² = mean((x − μ)²)`, `r = 1/√(σ² + ε)`,
# `x̂ = (x − μ) r`, `y = x̂ w + b`.
#
# Backward. The parameters are easy: `dw = Σ dy x̂`, `db = Σ dy` (summed over tokens). For the input, write
# `g = dy w` (the gradient arriving at `x̂`). Every `x̂_j` depends on every `x_i` through `μ` and `r`:
#
# - `∂x̂_j/∂x_i = r (δ_ij − 1/C) − x̂_j x̂_i r / C`  (the first term from `x − μ`, the second from `r`, since
#   `∂r/∂x_i = −r³ (x_i − μ)/C = −r² x̂_i / C`).
#
# Summing `g_j ∂x̂_j/∂x_i` over `j` gives the whole rule in one line:
#
# `dx = r (g − mean(g) − x̂ · mean(g x̂))`
#
# The first mean removes the part of `g` that would shift the row (LayerNorm cancels shifts), the second the part
# that would scale it (LayerNorm cancels scale). By hand:

# %%
x = rng.normal(size=(2, 4, 8)) * 3 + 1
w, b = 1 + 0.2 * rng.normal(size=8), rng.normal(size=8)
dy = rng.normal(size=x.shape)
eps = 1e-5

mu = x.mean(-1, keepdims=True)
r = 1 / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps)
xhat = (x - mu) * r
g = dy * w
dx_by_hand = r * (g - g.mean(-1, keepdims=True) - xhat * (g * xhat).mean(-1, keepdims=True))

dx_fd = numerical_gradient(lambda a: M.layer_norm(a, w, b, eps), x, dy)
dx_pkg, ln_grads = G.layer_norm_backward(dy, x, w, eps)
print(f"by hand vs finite differences: {rel_error(dx_by_hand, dx_fd):.1e}   vs minibloom: "
      f"{rel_error(dx_by_hand, dx_pkg):.1e}")
assert rel_error(dx_by_hand, dx_fd) < 1e-8 and rel_error(dx_by_hand, dx_pkg) < 1e-14
assert rel_error(ln_grads["weight"], (dy * xhat).sum((0, 1))) < 1e-14

# %% [markdown]
# Both correction terms are visible: the gradient that reaches `x` has zero mean along every row (a shift of `x`
# changes nothing), and, were `ε` 0, zero correlation with `x̂` (a scaling of `x` would change nothing either; with
# `ε` > 0 a small one does, by about `ε / σ²`).

# %%
dx_eps0, _ = G.layer_norm_backward(dy, x, w, 0.0)
print("mean of dx per row        (≈ 0):", np.abs(dx_by_hand.mean(-1)).max())
print("Σ dx·x̂ per row, ε = 1e-5:       ", np.abs((dx_by_hand * xhat).sum(-1)).max())
print("Σ dx·x̂ per row, ε = 0     (≈ 0):", np.abs((dx_eps0 * xhat).sum(-1)).max())
assert np.abs(dx_by_hand.mean(-1)).max() < 1e-12 and np.abs((dx_eps0 * xhat).sum(-1)).max() < 1e-10

# %% [markdown]
# ## 3. Attention, with ALiBi and the causal mask
#
# Forward, for one head: `s = q kᵀ/√D + alibi` on the allowed (causal, unpadded) keys and the lowest float elsewhere,
# `p = softmax(s)` over keys, `ctx = p v`.
#
# Backward, from `dctx`:
#
# - `ctx = p v` is a matrix product: `dv = pᵀ dctx` and `dp = dctx vᵀ`;
# - softmax: `∂p_j/∂s_i = p_j (δ_ij − p_i)`, so `ds = p (dp − Σ_j dp_j p_j)`, one row at a time;
# - ALiBi and the mask are constants (they depend on positions, not on parameters): nothing to differentiate. A masked
#   key has `p = 0`, so its `ds` is 0 as well: the future gets no gradient;
# - `s = q kᵀ/√D`: `dq = ds k / √D` and `dk = dsᵀ q / √D`.

# %%
B, H, T, D = 1, 2, 6, 4
q, k, v = (rng.normal(size=(B, H, T, D)) for _ in range(3))
mask = np.ones((B, T), np.int64)
alibi = M.alibi_bias(mask, M.alibi_slopes(H, np.float64))  # [B, H, 1, T]
allowed = M.causal_mask(mask, T)  # [B, 1, T, T]
ctx, p = M.attend(q, k, v, alibi, allowed, probs=True)  # ctx [B, T, H, D]
dctx = rng.normal(size=ctx.shape)

g = np.moveaxis(dctx, 2, 1)  # [B, H, T, D]
dv_hand = np.swapaxes(p, -1, -2) @ g
dp = g @ np.swapaxes(v, -1, -2)
ds = p * (dp - (dp * p).sum(-1, keepdims=True))
dq_hand = ds @ k / np.sqrt(D)
dk_hand = np.swapaxes(ds, -1, -2) @ q / np.sqrt(D)

f = lambda qq, kk, vv: M.attend(qq, kk, vv, alibi, allowed)[0]  # noqa: E731
checks = {"dq": (dq_hand, numerical_gradient(lambda a: f(a, k, v), q, dctx)),
          "dk": (dk_hand, numerical_gradient(lambda a: f(q, a, v), k, dctx)),
          "dv": (dv_hand, numerical_gradient(lambda a: f(q, k, a), v, dctx))}
for name, (hand, fd) in checks.items():
    print(f"{name}: by hand vs finite differences {rel_error(hand, fd):.1e}")
    assert rel_error(hand, fd) < 1e-8
for hand, pkg in zip((dq_hand, dk_hand, dv_hand), G.attend_backward(dctx, q, k, v, p)):
    assert rel_error(hand, pkg) < 1e-14

# %% [markdown]
# The causal mask shows up in the gradient: `ds` is exactly zero above the diagonal (a query never sends gradient to
# a future key), and every row of `ds` sums to zero (softmax is unchanged by adding a constant to a row of scores).

# %%
fig, axes = plt.subplots(1, 2)
for ax, (name, a) in zip(axes, (("p (head 0)", p[0, 0]), ("ds (head 0)", ds[0, 0]))):
    im = ax.imshow(a, cmap="RdBu_r" if name.startswith("ds") else "viridis")
    ax.set_title(name)
    ax.set_xlabel("key")
    ax.set_ylabel("query")
    fig.colorbar(im, ax=ax, shrink=0.8)
plt.tight_layout()
plt.show()
assert np.all(ds[0, 0][np.triu_indices(T, 1)] == 0) and np.abs(ds.sum(-1)).max() < 1e-12

# %% [markdown]
# ## 4. The whole model, checked
#
# `model.value_and_grad(ids)` runs the forward pass (keeping each layer's activations), transformers' causal-LM loss
# (token `t` predicts token `t+1`), and the backward functions block by block in reverse. It returns the loss and a
# gradient for every parameter, under transformers' names. A finite difference along one random direction per tensor
# checks all of it at once; torch's autograd checks it again when torch is installed.

# %%
model = minibloom.load(dtype="float64")  # the trained default model, in the oracle's float64
ids = np.array([model.encode("ROMEO:\nBut, soft! what light through yonder window breaks?")])
loss, grads = model.value_and_grad(ids)
print(f"loss {loss:.4f} nats/token over {ids.shape[1] - 1} predictions; {len(grads)} gradient tensors")

params = hf_names(model.params)  # the model's own arrays, by the same names
worst = 0.0
for name in ("transformer.word_embeddings.weight", "transformer.h.2.self_attention.query_key_value.weight",
             "transformer.h.3.input_layernorm.weight", "transformer.ln_f.bias"):
    u = rng.normal(size=params[name].shape)
    u /= np.linalg.norm(u)
    params[name] += 1e-5 * u
    up = model.value_and_grad(ids)[0]
    params[name] -= 2e-5 * u
    down = model.value_and_grad(ids)[0]
    params[name] += 1e-5 * u
    fd, exact = (up - down) / 2e-5, float(np.sum(grads[name] * u))
    worst = max(worst, abs(fd - exact) / abs(exact))
    print(f"{name:<55} finite difference {fd:+.8f}   backward {exact:+.8f}")
assert worst < 1e-6

# %%
try:
    from minibloom.oracle.hf import hf_value_and_grad
    torch_loss, torch_grads = hf_value_and_grad(default_model_path(), ids)
except minibloom.MinibloomError as e:  # torch / transformers not installed
    print("torch check skipped:", e)
else:
    err = assert_grads_close(torch_grads, model, ids)  # float64 on both sides: to 1e-10 or it raises
    print(f"torch autograd through transformers (float64): loss {torch_loss:.10f}, worst gradient error {err:.1e}")
    assert abs(torch_loss - loss) < 1e-12

# %% [markdown]
# ## 5. Training a tiny BLOOM from scratch
#
# With gradients in hand, training is a loop: draw a batch of windows from the text, compute loss and gradients,
# clip their global norm, and let AdamW move every parameter (with a learning rate that warms up, then decays on a
# cosine). `minibloom.train` is that loop. Here: a 2-layer, 64-wide BLOOM on Tiny Shakespeare with the default
# model's tokenizer, 200 steps of 8 windows of 64 tokens, in float32.

# %%
t0 = time.perf_counter()
run = train(tokenizer=default_model_path(), layers=2, hidden=64, heads=4, ctx=64, batch=8, steps=200, lr=4e-3,
            warmup=20, eval_every=50, eval_windows=16, seed=0, progress=False)
seconds = time.perf_counter() - t0
losses = np.array([h["loss"] for h in run.history])
final = run.evals[-1]
print(f"{len(losses)} steps in {seconds:.0f} s; training loss {losses[:10].mean():.2f} -> {losses[-20:].mean():.2f}; "
      f"held-out perplexity {final['perplexity']:.1f} (a uniform guess over the vocabulary: {2000})")

plt.plot(losses, lw=0.8, label="training batch")
plt.plot([e["step"] for e in run.evals], [e["loss"] for e in run.evals], "o-", label="held out")
plt.axhline(np.log(2000), ls=":", c="gray", label="uniform guess")
plt.xlabel("step")
plt.ylabel("loss (nats / token)")
plt.legend()
plt.show()
assert losses[-20:].mean() < losses[:10].mean() - 1.5  # it learned
assert final["perplexity"] < 2000 / 4

# %% [markdown]
# The tiny model has learned the text's short-range statistics (speaker names, common words, line breaks), as its
# samples show; the 4-layer default model was trained the same way (`minibloom train`, its model card has the command).

# %%
sample = run.model.generate(run.model.encode("ROMEO:\n"), max_new_tokens=40, do_sample=True, seed=0)
print(run.model.decode(sample[0]))

# %% [markdown]
# ## What's next
#
# `minibloom.backward` is the gradient oracle for BLOOM ports: `Bloom.value_and_grad` in float64 and
# `minibloom.testing.assert_grads_close` check another implementation's gradients, and `minibloom trace --grads` +
# `minibloom diff` find the first layer whose gradient differs. `minibloom train` trains or fine-tunes (the default
# model's recipe, or a chat template's assistant turns) and writes checkpoints transformers loads unchanged.
