"""The backward pass: each ``*_backward`` against finite differences (function level, llm.c's habit), then
``Bloom.value_and_grad`` against torch autograd through transformers in float64, and against finite differences of
minibloom's own loss as a second, torch-free witness."""

from __future__ import annotations

import numpy as np
import pytest

import minibloom
from minibloom import backward as G
from minibloom import fast
from minibloom import model as M
from minibloom.bloom import hf_names
from minibloom.paths import default_model_path
from minibloom.oracle.testing import GRAD_FP32, GRAD_FP64, assert_grads_close, numerical_gradient, rel_error

# ---------------------------------------------------------------------------------------------------------------
# Function level: each backward against central differences of its forward function (``numerical_gradient``),
# in float64.

FD_TOL = 1e-7  # central differences with eps 1e-6 in float64: truncation ~1e-12, cancellation ~1e-10 relative


def test_linear_backward(rng):
    x, w, b = rng.normal(size=(2, 3, 5)), rng.normal(size=(4, 5)), rng.normal(size=4)
    dy = rng.normal(size=(2, 3, 4))
    dx, g = G.linear_backward(dy, x, w)
    assert rel_error(dx, numerical_gradient(lambda a: M.linear(a, w, b), x, dy)) < FD_TOL
    assert rel_error(g["weight"], numerical_gradient(lambda a: M.linear(x, a, b), w, dy)) < FD_TOL
    assert rel_error(g["bias"], numerical_gradient(lambda a: M.linear(x, w, a), b, dy)) < FD_TOL
    assert rel_error(M.linear(x, w, b, tp=5), M.linear(x, w, b)) < 1e-14  # tp slices: the same function


def test_layer_norm_backward(rng):
    x, w, b = rng.normal(size=(2, 3, 6)) * 3 + 1, 1 + 0.3 * rng.normal(size=6), rng.normal(size=6)
    dy = rng.normal(size=x.shape)
    dx, g = G.layer_norm_backward(dy, x, w, 1e-5)
    assert rel_error(dx, numerical_gradient(lambda a: M.layer_norm(a, w, b, 1e-5), x, dy)) < FD_TOL
    assert rel_error(g["weight"], numerical_gradient(lambda a: M.layer_norm(x, a, b, 1e-5), w, dy)) < FD_TOL
    assert rel_error(g["bias"], numerical_gradient(lambda a: M.layer_norm(x, w, a, 1e-5), b, dy)) < FD_TOL


def test_gelu_backward_is_the_derivative_of_blooms_tanh_gelu(rng):
    x = rng.normal(size=(3, 7)) * 3
    dy = rng.normal(size=x.shape)
    assert rel_error(G.gelu_backward(dy, x), numerical_gradient(M.gelu, x, dy)) < FD_TOL
    # at x = 1 by hand: 0.5 (1 + tanh u) + 0.5 (1 - tanh^2 u) a (1 + 3b), u = a (1 + b)
    a, b = 0.79788456, 0.044715
    t = np.tanh(a * (1 + b))
    by_hand = 0.5 * (1 + t) + 0.5 * (1 - t * t) * a * (1 + 3 * b)
    assert G.gelu_backward(np.ones(1), np.ones(1))[0] == pytest.approx(by_hand, rel=1e-15)


def test_softmax_backward(rng):
    s, dp = rng.normal(size=(2, 5)), rng.normal(size=(2, 5))
    assert rel_error(G.softmax_backward(dp, M.softmax(s)), numerical_gradient(M.softmax, s, dp)) < FD_TOL


@pytest.mark.parametrize("padded", [False, True], ids=["causal", "left-padded"])
def test_attend_backward(rng, padded):
    B, H, T, D = 2, 3, 5, 4
    q, k, v = (rng.normal(size=(B, H, T, D)) for _ in range(3))
    mask = np.ones((B, T), np.int64)
    if padded:
        mask[1, :2] = 0
    alibi = M.alibi_bias(mask, M.alibi_slopes(H, np.float64))
    allowed = M.causal_mask(mask, T)
    dctx = rng.normal(size=(B, T, H, D))
    if padded:  # a pad query's output reaches no loss in a model (only the ALiBi-constant gradient would)
        dctx[1, :2] = 0
    _, probs = M.attend(q, k, v, alibi, allowed, probs=True)
    dq, dk, dv = G.attend_backward(dctx, q, k, v, probs)
    ctx = lambda qq, kk, vv: M.attend(qq, kk, vv, alibi, allowed)[0]  # noqa: E731
    assert rel_error(dq, numerical_gradient(lambda a: ctx(a, k, v), q, dctx)) < FD_TOL
    assert rel_error(dk, numerical_gradient(lambda a: ctx(q, a, v), k, dctx)) < FD_TOL
    assert rel_error(dv, numerical_gradient(lambda a: ctx(q, k, a), v, dctx)) < FD_TOL


def test_cross_entropy_and_its_gradient(rng):
    logits = rng.normal(size=(2, 4, 7))
    labels = rng.integers(0, 7, (2, 4))
    labels[0, 2] = labels[1, 1] = G.IGNORE_INDEX
    loss, dlogits = G.cross_entropy(logits, labels)
    # by hand: position t predicts labels[t + 1]; four scored positions (two of six ignored)
    terms = [np.log(np.sum(np.exp(logits[b, t]))) - logits[b, t, labels[b, t + 1]]
             for b in range(2) for t in range(3) if labels[b, t + 1] != G.IGNORE_INDEX]
    assert len(terms) == 4 and float(loss) == pytest.approx(np.mean(terms), rel=1e-14)
    assert rel_error(dlogits, numerical_gradient(lambda z: G.cross_entropy(z, labels)[0], logits, np.ones(()))) < FD_TOL
    assert np.all(dlogits[:, -1] == 0)  # the last position predicts nothing


def test_embedding_backward_adds_repeated_tokens(rng):
    dx = rng.normal(size=(2, 3, 4))
    ids = np.array([[1, 5, 1], [0, 5, 1]])
    dE = G.embedding_backward(dx, ids, 6)
    assert np.allclose(dE[1], dx[0, 0] + dx[0, 2] + dx[1, 2]) and np.allclose(dE[5], dx[0, 1] + dx[1, 1])
    assert np.all(dE[[2, 3, 4]] == 0)


def test_embedding_backward_without_scatter_add_is_the_same(rng):
    """The one-hot product (for array namespaces without ``add.at``) sums the same terms."""
    xps = pytest.importorskip("array_api_strict")
    dx = rng.normal(size=(2, 3, 4))
    ids = np.array([[1, 5, 1], [0, 5, 1]])
    got = G.embedding_backward(xps.asarray(dx), xps.asarray(ids), 6)
    assert rel_error(np.asarray(got), G.embedding_backward(dx, ids, 6)) < 1e-15


# ---------------------------------------------------------------------------------------------------------------
# The whole model against torch autograd through transformers' BloomForCausalLM (float64, patched like the forward
# oracle), on checkpoints with every parameter random.

CONFIGS = {
    "8 heads": dict(hidden=64, n_head=8),  # a power of two
    "6 heads": dict(hidden=48, n_head=6),  # not a power of two: the extra-slope rule
    "post-LN": dict(hidden=48, n_head=4, post_ln=True),
    "untied head": dict(hidden=48, n_head=4, tie_word_embeddings=False),
    "tp=2 slow_but_exact": dict(hidden=48, n_head=6, tp=2, slow=True),
}


def batch(vocab: int, seed: int = 0):
    """Three rows of 12 tokens, two left-padded, and labels that also ignore the first half of row 0."""
    r = np.random.default_rng(seed)
    ids = r.integers(0, vocab, (3, 12))
    mask = np.ones_like(ids)
    mask[1, :4] = 0
    mask[2, :1] = 0
    labels = np.where(mask == 1, ids, G.IGNORE_INDEX)
    labels[0, :6] = G.IGNORE_INDEX
    return ids, mask, labels


@pytest.fixture(scope="module", params=list(CONFIGS))
def random_checkpoint(request, tmp_path_factory):
    pytest.importorskip("transformers")
    from minibloom.oracle.hf import random_model

    path = tmp_path_factory.mktemp("grad") / request.param.replace(" ", "_")
    random_model(seed=3, n_layer=3, **CONFIGS[request.param]).save_pretrained(path)
    return str(path)


def test_value_and_grad_equals_torch_autograd_in_float64(random_checkpoint, record):
    from minibloom.oracle.hf import hf_value_and_grad

    model = minibloom.load(random_checkpoint, dtype="float64")
    ids, mask, labels = batch(model.vocab_size)
    loss, grads = model.value_and_grad(ids, mask, labels)
    ref_loss, ref = hf_value_and_grad(random_checkpoint, ids, mask, labels)
    assert set(grads) == set(ref)
    assert ("lm_head.weight" in grads) == (not model.config.tie_word_embeddings)
    assert loss == pytest.approx(ref_loss, rel=1e-13)
    worst = max(rel_error(grads[n], ref[n]) for n in ref)
    record("float64 grad rel err vs torch", worst)
    assert worst <= GRAD_FP64.rel
    assert all(np.abs(ref[n]).max() > 0 for n in ref)  # every parameter is reached by the loss


def test_float32_gradients_are_within_the_policy(random_checkpoint, record):
    from minibloom.oracle.hf import hf_value_and_grad

    model = minibloom.load(random_checkpoint)
    ids, mask, labels = batch(model.vocab_size)
    _, grads = model.value_and_grad(ids, mask, labels)
    _, ref32 = hf_value_and_grad(random_checkpoint, ids, mask, labels, dtype="float32")
    record("float32 grad rel err (minibloom)", assert_grads_close(grads, random_checkpoint, ids, mask, labels))
    record("float32 grad rel err (torch)", assert_grads_close(ref32, random_checkpoint, ids, mask, labels))


def test_finite_differences_witness_every_parameter(random_checkpoint, record):
    """Torch-free: for each parameter tensor, a random direction u; (L(p + eps u) - L(p - eps u)) / 2 eps must equal
    <grad, u>. Uses minibloom's loss alone.

    The first real token of a left-padded row is not scored here: it is predicted from a pad position, whose query
    sees no key. torch's gradient (which value_and_grad follows, see minibloom.backward) passes through the mask
    added to that row's scores, while the computed row is uniform whatever the scores: the one place where autograd's
    convention and the finite difference of the computed function differ."""
    model = minibloom.load(random_checkpoint, dtype="float64")
    ids, mask, labels = batch(model.vocab_size, seed=1)
    labels[1, 4] = labels[2, 1] = G.IGNORE_INDEX  # see below
    _, grads = model.value_and_grad(ids, mask, labels)
    flat = hf_names(model.params)  # views of the model's own arrays: changing them changes the model
    r = np.random.default_rng(2)

    def loss_at() -> float:
        logits = model(ids, mask)
        return float(G.cross_entropy(logits, labels)[0])

    worst = 0.0
    for name, p in flat.items():
        u = r.normal(size=p.shape)
        u /= np.linalg.norm(u)  # a unit step: roundoff ~ 1e-15 / eps, truncation ~ eps^2 |L'''|
        eps = 1e-5
        p += eps * u
        up = loss_at()
        p -= 2 * eps * u
        down = loss_at()
        p += eps * u
        numeric, analytic = (up - down) / (2 * eps), float(np.sum(grads[name] * u))
        assert numeric == pytest.approx(analytic, rel=1e-6, abs=1e-8), name
        worst = max(worst, abs(numeric - analytic) / max(abs(analytic), 1e-8))
    record("finite-difference rel err", worst)


def test_fast_primitives_give_the_reference_gradients(random_checkpoint):
    """Training runs the forward on the NumPy primitives; its gradients are the reference table's to rounding."""
    model = minibloom.load(random_checkpoint, dtype="float64")
    ids, mask, labels = batch(model.vocab_size, seed=2)
    args = (model.params, ids, mask, labels, model.config)
    _, fast_g = G.value_and_grad(*args, ops=fast.PRIMITIVES)
    _, ref_g = G.value_and_grad(*args, ops=M.REFERENCE)
    for name, g in hf_names(ref_g).items():
        assert rel_error(hf_names(fast_g)[name], g) < 1e-12, name


def test_array_api_strict_trains_like_numpy(tiny_checkpoint):
    pytest.importorskip("array_api_strict")
    ids = np.array([[5, 9, 2, 7, 1, 3], [4, 4, 8, 1, 0, 6]])
    mask = np.array([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])
    loss, g = minibloom.load(tiny_checkpoint, dtype="float64").value_and_grad(ids, mask)
    loss_s, g_s = minibloom.load(tiny_checkpoint, dtype="float64", backend="array_api_strict").value_and_grad(ids, mask)
    assert loss_s == pytest.approx(loss, rel=1e-13)
    for name in g:
        assert rel_error(g_s[name], g[name]) < 1e-12, name


# ---------------------------------------------------------------------------------------------------------------
# The trained default model: real activations (random weights hide GeLU and LayerNorm bugs)


@pytest.fixture(scope="module")
def default_text_batch():
    model = minibloom.load()
    rows = [model.encode(t) for t in ("ROMEO: But soft, what light through yonder window breaks?",
                                      "JULIET: O Romeo, Romeo!")]
    T = max(len(r) for r in rows)
    ids = np.full((2, T), 3)
    mask = np.zeros((2, T), np.int64)
    for i, r in enumerate(rows):
        ids[i, T - len(r):], mask[i, T - len(r):] = r, 1
    return ids, mask


def test_default_model_gradients_equal_torch(default_text_batch, record):
    pytest.importorskip("transformers")
    from minibloom.oracle.hf import hf_value_and_grad

    ids, mask = default_text_batch
    path = default_model_path()
    loss, grads = minibloom.load(dtype="float64").value_and_grad(ids, mask)
    ref_loss, ref = hf_value_and_grad(path, ids, mask)
    assert 1.0 < loss < 8.0 and loss == pytest.approx(ref_loss, rel=1e-13)  # a trained model, in nats per token
    record("default float64 grad rel err", max(rel_error(grads[n], ref[n]) for n in ref))
    assert max(rel_error(grads[n], ref[n]) for n in ref) <= GRAD_FP64.rel
    _, ref32 = hf_value_and_grad(path, ids, mask, dtype="float32")
    record("default torch float32 grad rel err", assert_grads_close(ref32, path, ids, mask))


# ---------------------------------------------------------------------------------------------------------------
# The verdict, and its failures


def test_assert_grads_close_names_a_wrong_tensor(tiny_checkpoint):
    model = minibloom.load(tiny_checkpoint, dtype="float64")
    ids = np.array([[5, 9, 2, 7, 1, 3]])
    loss, grads = model.value_and_grad(ids)
    assert assert_grads_close(grads, tiny_checkpoint, ids, loss=loss) < 1e-14
    bad = dict(grads)
    bad["transformer.h.1.mlp.dense_h_to_4h.bias"] = grads["transformer.h.1.mlp.dense_h_to_4h.bias"] * 1.001
    with pytest.raises(AssertionError, match=r"transformer\.h\.1\.mlp\.dense_h_to_4h\.bias: relative max error 1\.0"):
        assert_grads_close(bad, tiny_checkpoint, ids)
    with pytest.raises(AssertionError, match="missing"):
        assert_grads_close({k: v for k, v in grads.items() if "ln_f" not in k}, tiny_checkpoint, ids)
    f32 = {k: v.astype(np.float32) for k, v in grads.items()}
    assert assert_grads_close(f32, tiny_checkpoint, ids) <= GRAD_FP32.rel  # float32 policy by dtype


@pytest.mark.parametrize("labels, message", [
    (np.zeros((1, 5), np.int64), "does not match input_ids"),
    (np.full((1, 6), 10**6), "neither a token id"),
    (np.full((1, 6), -100), "no position after the first is labelled"),
    (np.zeros((1, 6)), "integer"),
])
def test_bad_labels_are_minibloom_errors(tiny_checkpoint, labels, message):
    model = minibloom.load(tiny_checkpoint)
    with pytest.raises(minibloom.MinibloomError, match=message):
        model.value_and_grad([[5, 9, 2, 7, 1, 3]], labels=labels)


def test_low_memory_models_refuse_gradients(tiny_checkpoint):
    model = minibloom.load(tiny_checkpoint, low_memory=True)
    with pytest.raises(minibloom.MinibloomError, match="low_memory"):
        model.value_and_grad([[5, 9, 2]])


# ---------------------------------------------------------------------------------------------------------------
# Gradient traces: `minibloom trace --grads` and `minibloom diff`, layer by layer


def test_gradient_traces_diff_layer_by_layer(tiny_checkpoint, tmp_path, capsys):
    pytest.importorskip("transformers")
    from minibloom.cli import main
    from minibloom.oracle.hf import hf_value_and_grad
    from minibloom.oracle.trace import diff_traces, load_trace, save_trace

    ids = "5,9,2,7,1,3,8,8"
    mine = str(tmp_path / "mine.npz")
    assert main(["trace", "--model", tiny_checkpoint, "--ids", ids, "--ids", "4,4,2,6", "--dtype", "float64",
                 "--grads", "--out", mine]) == 0
    assert "and 41 gradients" in capsys.readouterr().out
    tr = load_trace(mine)
    loss, ref = hf_value_and_grad(tiny_checkpoint, tr["input_ids"], tr["attention_mask"], tr["labels"])
    torch_trace = {"input_ids": tr["input_ids"], "attention_mask": tr["attention_mask"], "labels": tr["labels"],
                   "loss": loss, "grads": ref, "meta": {"dtype": "float64", "implementation": "torch autograd"}}
    theirs = save_trace(torch_trace, tmp_path / "torch.npz")
    report = diff_traces(mine, theirs)
    names = [r.name for r in report.rows]
    backward_order = ["loss", "grad head + ln_f", "grad block 2", "grad block 1", "grad block 0", "grad embeddings"]
    assert report.passed and names[names.index("loss"):] == backward_order
    assert main(["diff", mine, theirs]) == 0
    # one wrong gradient in block 1 (a 1e-6 relative slip) is found, and named
    bad = dict(ref)
    bad["transformer.h.1.mlp.dense_4h_to_h.weight"] = ref["transformer.h.1.mlp.dense_4h_to_h.weight"] * (1 + 1e-6)
    slipped = save_trace({**torch_trace, "grads": bad}, tmp_path / "bad.npz")
    report = diff_traces(mine, slipped)
    assert not report.passed and report.first_divergence.name == "grad block 1"
    assert report.first_divergence.key == "grad.transformer.h.1.mlp.dense_4h_to_h.weight"
    assert main(["diff", mine, slipped]) == 1


def test_a_gradient_trace_with_a_foreign_name_is_refused(tmp_path):
    from minibloom.oracle.trace import load_trace

    path = tmp_path / "t.npz"
    np.savez(path, input_ids=np.array([[1, 2]]), **{"grad.transformer.h.0.mlp.nonsense": np.zeros(3, np.float32),
                                                    "grad.transformer.h.0.mlp.dense_4h_to_h.weight": np.zeros(3)})
    with pytest.raises(minibloom.MinibloomError, match="not a BLOOM parameter name"):
        load_trace(str(path))


# ---------------------------------------------------------------------------------------------------------------
# The NumPy training kernels (minibloom.fast) against the reference backward functions they replace


@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-12), (np.float32, 2e-5)])
@pytest.mark.parametrize("layout", ["causal", "left-padded", "short"])
def test_fast_training_kernels_equal_the_reference(rng, dtype, tol, layout):
    B, H, T, D = 2, 3, (12 if layout == "short" else 80), 8  # T >= 64: the causal rows take the two-half path
    q, k, v = (rng.normal(size=(B, H, T, D)).astype(dtype) for _ in range(3))
    mask = np.ones((B, T), np.int64)
    if layout == "left-padded":
        mask[1, :7] = 0
    alibi = M.alibi_bias(mask, M.alibi_slopes(H, np.float64)).astype(dtype)
    allowed = M.causal_mask(mask, T)
    _, probs = M.attend(q, k, v, alibi, allowed, probs=True)
    dctx = rng.normal(size=(B, T, H, D)).astype(dtype)
    for got, want in zip(fast.attend_backward(dctx, q, k, v, probs.copy()), G.attend_backward(dctx, q, k, v, probs)):
        assert got.dtype == dtype and rel_error(got, want) < tol
    x, dy = (rng.normal(size=(B, T, 16)).astype(dtype) * 2 for _ in range(2))
    w = (1 + 0.3 * rng.normal(size=16)).astype(dtype)
    (dx, g), (dx_ref, g_ref) = fast.layer_norm_backward(dy, x, w, 1e-5), G.layer_norm_backward(dy, x, w, 1e-5)
    assert rel_error(dx, dx_ref) < tol and all(rel_error(g[n], g_ref[n]) < tol for n in ("weight", "bias"))
    assert rel_error(fast.gelu_backward(dy.copy(), x), G.gelu_backward(dy, x)) < tol
    assert rel_error(fast.gelu(x), M.gelu(x)) < tol
    logits = rng.normal(size=(B, T, 50)).astype(dtype) * 3
    labels = np.where(mask == 1, rng.integers(0, 50, (B, T)), G.IGNORE_INDEX)
    (loss, dz), (loss_ref, dz_ref) = fast.cross_entropy(logits.copy(), labels), G.cross_entropy(logits, labels)
    assert rel_error(loss, loss_ref) < tol and rel_error(dz, dz_ref) < tol
