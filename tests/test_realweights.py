"""Golden values of transformers' own BLOOM integration tests, asserted through minibloom on the real checkpoints.

Follows huggingface/transformers ``tests/models/bloom/test_modeling_bloom.py`` (``BloomModelTest``'s slow generation
tests on ``bigscience/bloom-560m`` and ``BloomEmbeddingTest`` on ``bigscience/bigscience-small-testing``) and
``tests/models/bloom/test_tokenization_bloom.py`` (``BloomTokenizationTest``). The expected values below are copied
verbatim from those files, each under a comment naming its test; the code computing the actual values is minibloom
alone: ``minibloom.load``, ``model.generate``, ``model.forward`` and minibloom's tokenizer.

Every test is marked ``realweights`` and skipped, with the reason, when its checkpoint cannot be had: a complete
safetensors copy is looked for in minibloom's ``weights/<org>--<name>[@revision]``, then in the Hugging Face cache,
and only then, unless ``HF_HUB_OFFLINE`` is set, on the hub (a short-timeout probe first, so an unreachable hub
skips in well under a second). Run them with ``python -m pytest -m realweights tests/test_realweights.py``.

Two upstream pins matter:
- the greedy-text goldens were made on ``bigscience/bloom-560m`` at ``revision="gs555750"`` (the 350m/560m weights
  the tests were designed on; newer weights were pushed to ``main`` later), so those tests load that revision.
  minibloom reads safetensors only; if the hub's tag has none, put a converted copy in
  ``weights/bigscience--bloom-560m@gs555750``. The revision-independent checks (tokenizer ids, padded-batch
  equalities) use ``main``.
- ``BloomEmbeddingTest`` loads ``torch_dtype="auto"`` (bfloat16 arithmetic). minibloom has no bfloat16 mode, so those
  statistics run in float64 with upstream's tolerances; values that upstream compares exactly and that only bfloat16
  arithmetic reproduces are left out (see ``test_small_testing_hidden_states_mean``).
"""

from __future__ import annotations

import functools
import gc
import os

import numpy as np
import pytest

import minibloom
from minibloom.formats import hub
from minibloom.chat import Template, render
from minibloom.tokenizer import load_tokenizer

pytestmark = pytest.mark.realweights

RUN = "python -m pytest -m realweights tests/test_realweights.py"
REPO_560M = "bigscience/bloom-560m"
PINNED = "gs555750"  # test_modeling_bloom.py: from_pretrained(path_560m, ..., revision="gs555750")
REPO_SMALL = "bigscience/bigscience-small-testing"
PROBE_TIMEOUT_S = 3.0  # the hub probe; a missing network fails fast, a silent one costs at most this
U32 = 2.0 ** -24  # float32 unit roundoff


# ---------------------------------------------------------------------------------------------------------------
# Where a checkpoint comes from (or why it cannot be had)


class _Hub:
    """The first hub error, remembered so that one unreachable hub costs one probe, not one per checkpoint."""

    error: str | None = None


def _weights_copy(repo_id: str, revision: str | None) -> str:
    """minibloom's own copy: ``weights/org--name`` (what ``minibloom download`` writes), ``@revision`` when pinned."""
    local = hub.local_dir_for(repo_id)
    return f"{local}@{revision}" if revision else local


def _complete(path: str | None, needs: tuple[str, ...]) -> bool:
    return bool(path) and hub.is_complete(path) and all(os.path.isfile(os.path.join(path, n)) for n in needs)


def _from_cache(repo_id: str, revision: str | None, needs: tuple[str, ...]) -> str | None:
    """The Hugging Face cache's snapshot of ``repo_id@revision``, without touching the network."""
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(repo_id, revision=revision, allow_patterns=hub.ALLOW_PATTERNS, local_files_only=True)
    except Exception:  # LocalEntryNotFoundError and friends: nothing cached
        return None
    return path if _complete(path, needs) else None


def _from_hub(repo_id: str, revision: str | None, needs: tuple[str, ...]) -> tuple[str | None, str]:
    """Probe the hub (short timeout), check that the revision has safetensors weights, then download it."""
    if _Hub.error:
        return None, _Hub.error
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError

    try:
        info = HfApi().model_info(repo_id, revision=revision, timeout=PROBE_TIMEOUT_S)
    except HfHubHTTPError as e:  # the hub answered (unknown repo or revision, gated, server error): this one only
        return None, f"the hub answered {type(e).__name__}"
    except Exception as e:  # no network, DNS failure, timeout: remembered for the other checkpoints
        _Hub.error = f"the hub cannot be reached ({type(e).__name__})"
        return None, _Hub.error
    files = {s.rfilename for s in (info.siblings or [])}
    if not ({"model.safetensors", "model.safetensors.index.json"} & files) or not set(needs) <= files:
        return None, ("the hub has no safetensors weights (or no " + "/".join(needs) + ") at this revision; "
                      "minibloom never unpickles pytorch_model.bin")
    try:
        path = snapshot_download(repo_id, revision=revision, allow_patterns=hub.ALLOW_PATTERNS,
                                 etag_timeout=PROBE_TIMEOUT_S)
    except Exception as e:
        return None, f"the download failed ({type(e).__name__}: {e})"
    return (path, "") if _complete(path, needs) else (None, f"the download in {path} is incomplete")


@functools.lru_cache(maxsize=None)
def locate(repo_id: str, revision: str | None, needs: tuple[str, ...] = ("config.json",)) -> tuple[str | None, str]:
    """``(directory, "")`` for a complete safetensors copy of ``repo_id@revision``, else ``(None, why not)``."""
    name = f"{repo_id}@{revision}" if revision else repo_id
    local = _weights_copy(repo_id, revision)
    if _complete(local, needs):
        return local, ""
    try:
        import huggingface_hub  # noqa: F401
    except ImportError:
        return None, f"{name}: not in {local}, and huggingface_hub is not installed"
    path = _from_cache(repo_id, revision, needs)
    if path:
        return path, ""
    where = f"{name}: no complete safetensors copy in {local} or in the Hugging Face cache"
    if hub.is_offline():
        return None, f"{where}, and HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set"
    path, why = _from_hub(repo_id, revision, needs)
    return (path, "") if path else (None, f"{where}, and {why}")


def need(repo_id: str, revision: str | None = None, needs: tuple[str, ...] = ("config.json",)) -> str:
    """The checkpoint's directory, or skip the calling test saying what is missing and how to run it."""
    path, why = locate(repo_id, revision, needs)
    if path is None:
        pytest.skip(f"{why}. With the hub reachable (or a cached copy), run: {RUN}")
    return path


# ---------------------------------------------------------------------------------------------------------------
# Fixtures: one bloom-560m in memory at a time (float64 alone: 560M parameters x 8 bytes); tests grouped by dtype


class _OneModel:
    """Loads ``(path, dtype)`` on demand and keeps only the last model."""

    def __init__(self):
        self.key: tuple[str, str] | None = None
        self.model = None

    def get(self, path: str, dtype: str):
        if self.key != (path, dtype):
            self.key, self.model = None, None
            gc.collect()  # free the previous model before reading the next one
            self.model = minibloom.load(path, dtype=dtype)
            self.key = (path, dtype)
        return self.model


@pytest.fixture(scope="module")
def one_model():
    holder = _OneModel()
    yield holder
    holder.key, holder.model = None, None


@pytest.fixture(scope="module", params=["float32", "float64"])
def dtype(request) -> str:
    """Upstream made the greedy goldens with an fp32 model; float64 is minibloom's oracle mode. Both must match."""
    return request.param


@pytest.fixture
def bloom560m(one_model, dtype):
    """bloom-560m at ``main``: for the checks that hold on any revision."""
    return one_model.get(need(REPO_560M, None, ("config.json", "tokenizer.json")), dtype)


@pytest.fixture
def bloom560m_pinned(one_model, dtype):
    """bloom-560m at upstream's pinned revision: for the greedy-text goldens."""
    return one_model.get(need(REPO_560M, PINNED, ("config.json", "tokenizer.json")), dtype)


@pytest.fixture(scope="module")
def tokenizer560m():
    """minibloom's tokenizer of bloom-560m (``model.encode``/``model.decode`` delegate to it; no weights needed)."""
    return load_tokenizer(need(REPO_560M, None, ("config.json", "tokenizer.json")))


@pytest.fixture(scope="module")
def small_testing():
    """bigscience/bigscience-small-testing in float64: its statistics are float comparisons with tolerances."""
    return minibloom.load(need(REPO_SMALL), dtype="float64")


def greedy(model, ids, mask, max_length: int) -> np.ndarray:
    """transformers' ``generate(..., max_length=...)``: max_length counts the (padded) prompt width too."""
    return model.generate(ids, mask, max_new_tokens=max_length - ids.shape[1], do_sample=False)


def text(model, ids) -> str:
    """``tokenizer.decode(ids, skip_special_tokens=True)`` (drops the <pad> of left-padded rows)."""
    return model.tokenizer.decode(ids, skip_special_tokens=True)


def almost_equal(first: float, second: float, places: int) -> bool:
    """unittest's ``assertAlmostEqual(first, second, places=places)``: the difference rounds to zero."""
    return round(abs(second - first), places) == 0


# ---------------------------------------------------------------------------------------------------------------
# bloom-560m: greedy continuations (test_modeling_bloom.py, BloomModelTest)


def test_simple_generation(bloom560m_pinned):
    # test_modeling_bloom.py BloomModelTest.test_simple_generation (revision="gs555750", fp32 model, max_length=50)
    input_sentence = "I enjoy walking with my cute dog"
    EXPECTED_OUTPUT = (
        "I enjoy walking with my cute dog, and I love to watch the kids play with the kids. I am a very "
        "active person, and I enjoy working out, and I am a very active person. I am a very active person, and I"
    )
    model = bloom560m_pinned
    ids = np.array([model.encode(input_sentence)])
    out = greedy(model, ids, None, max_length=50)
    assert text(model, out[0]) == EXPECTED_OUTPUT


def test_batch_generated_text(bloom560m_pinned):
    # test_modeling_bloom.py BloomModelTest.test_batch_generated_text (left padding, max_length=20)
    input_sentences = [
        "Hello what is",
        "Running a quick test with the",
    ]
    EXPECTED_GENERATIONS = [
        "Hello what is the best way to get the data from the server? I have tried",
        "Running a quick test with the following command:\nsudo apt-get install python3\nsudo apt-get install python2",
    ]
    model = bloom560m_pinned
    ids, mask = model.tokenizer.encode_batch(input_sentences)
    assert mask[0, 0] == 0 and mask[:, -1].all()  # really left-padded: the short row starts with <pad>
    out = greedy(model, ids, mask, max_length=20)
    assert [text(model, row) for row in out] == EXPECTED_GENERATIONS


# ---------------------------------------------------------------------------------------------------------------
# bloom-560m: padded-batch equalities (hold on any revision; upstream ran them on gs555750)


def test_batch_generation(bloom560m):
    # test_modeling_bloom.py BloomModelTest.test_batch_generation: the same sentence twice in a batch, max_length=50
    input_sentence = ["I enjoy walking with my cute dog", "I enjoy walking with my cute dog"]
    model = bloom560m
    ids, mask = model.tokenizer.encode_batch(input_sentence)
    out = greedy(model, ids, mask, max_length=50)
    assert text(model, out[0]) == text(model, out[1])


def test_batch_generation_padd(bloom560m):
    # test_modeling_bloom.py BloomModelTest.test_batch_generation_padd: a left-padded row generates what the same
    # prompt generates alone (max_length=50 for both); upstream slices 3 pads: greedy_output[-1, 3:] vs [0, :-3]
    input_sentence = ["I enjoy walking with my cute dog", "Hello my name is"]
    input_sentence_without_pad = "Hello my name is"
    model = bloom560m
    ids, mask = model.tokenizer.encode_batch(input_sentence)
    ids_without_pad = np.array([model.encode(input_sentence_without_pad)])
    assert int((mask[-1] == 0).sum()) == 3  # the pad count upstream's slices assume
    greedy_output = greedy(model, ids, mask, max_length=50)
    greedy_output_without_pad = greedy(model, ids_without_pad, None, max_length=50)

    # test token values
    assert greedy_output[-1, 3:].tolist() == greedy_output_without_pad[0, :-3].tolist()
    # test reconstructions
    assert text(model, greedy_output[-1, 3:]) == text(model, greedy_output_without_pad[0, :-3])


# ---------------------------------------------------------------------------------------------------------------
# The tokenizer's ids (test_tokenization_bloom.py, BloomTokenizationTest; upstream loads bigscience/tokenizer, the
# same BLOOM tokenizer that bloom-560m ships)


def test_encodings_from_sample_data(tokenizer560m):
    # test_tokenization_bloom.py BloomTokenizationTest.test_encodings_from_sample_data
    INPUT_SENTENCES = ["The quick brown fox</s>", "jumps over the lazy dog</s>"]
    TARGET_TOKENS = [[2175, 23714, 73173, 144252, 2], [77, 132619, 3478, 368, 109586, 35433, 2]]

    computed_tokens = tokenizer560m.encode(INPUT_SENTENCES)
    assert computed_tokens == TARGET_TOKENS
    assert [tokenizer560m.decode(t) for t in computed_tokens] == INPUT_SENTENCES


def test_tokenization_for_chat(tokenizer560m):
    # test_tokenization_bloom.py BloomTokenizationTest.test_tokenization_for_chat. Upstream renders transformers'
    # former class-default BLOOM chat template, "{% for message in messages %}{{ message.content }}{{ eos_token }}
    # {% endfor %}" (removed from transformers since); written here as a minibloom chat Template.
    test_chats = [
        [{"role": "system", "content": "You are a helpful chatbot."}, {"role": "user", "content": "Hello!"}],
        [
            {"role": "system", "content": "You are a helpful chatbot."},
            {"role": "user", "content": "Hello!"},
            {"role": "assistant", "content": "Nice to meet you."},
        ],
        [{"role": "assistant", "content": "Nice to meet you."}, {"role": "user", "content": "Hello!"}],
    ]
    expected_tokens = [
        [5448, 1306, 267, 66799, 44799, 37143, 17, 2, 59414, 4, 2],
        [5448, 1306, 267, 66799, 44799, 37143, 17, 2, 59414, 4, 2, 229126, 427, 11890, 1152, 17, 2],
        [229126, 427, 11890, 1152, 17, 2, 59414, 4, 2],
    ]
    eos = tokenizer560m.special_tokens["eos_token"]
    content_eos = Template("content-eos", "each message's content then eos (transformers' old BLOOM default)",
                           lambda role, content: content + eos)
    for chat, expected in zip(test_chats, expected_tokens):
        prompt = render(chat, content_eos, add_generation_prompt=False)
        assert tokenizer560m.encode(prompt) == expected


# ---------------------------------------------------------------------------------------------------------------
# bigscience/bigscience-small-testing statistics (test_modeling_bloom.py, BloomEmbeddingTest), in float64

# test_modeling_bloom.py BloomEmbeddingTest (the same EXAMPLE_IDS in test_embeddings, test_hidden_states_transformers
# and test_logits)
EXAMPLE_IDS = [3478, 368, 109586, 35433, 2, 77, 132619, 3478, 368, 109586, 35433, 2, 2175, 23714, 73173, 144252, 2,
               77, 132619, 3478]


def _hf_drops_dense_bias(model) -> bool:
    """transformers' ``pretraining_tp > 1`` + ``slow_but_exact`` path omits the ``dense``/``dense_4h_to_h`` biases;
    minibloom keeps them (minibloom/model.py ``linear``). With such a config and nonzero biases the hidden-state and
    logit statistics of transformers are not those of the checkpoint's maths, so they cannot be compared."""
    cfg = model.config
    if not (cfg.slow_but_exact and cfg.pretraining_tp > 1):
        return False
    biases = [b for layer in model.params["h"]
              for b in (layer["self_attention"]["dense"]["bias"], layer["mlp"]["dense_4h_to_h"]["bias"])]
    return any(bool(np.any(b != 0)) for b in biases)


def _f32_sum_error_bound(x: np.ndarray) -> float:
    """Largest error of a float32 sum of ``x``'s elements in any order: (n - 1) u sum|x_i| (Higham, "Accuracy and
    Stability of Numerical Algorithms", eq. 4.4), plus the rounding of the result itself."""
    s = float(np.sum(np.abs(x)))
    return (x.size - 1) * U32 * s + U32 * abs(float(np.sum(x)))


def test_small_testing_embeddings(small_testing):
    # test_modeling_bloom.py BloomEmbeddingTest.test_embeddings: the "torch.float32" table (minibloom reads the
    # checkpoint's weights exactly, so min/max are exact as upstream asserts; upstream's mean/sum are torch float32
    # reductions, equal here to the float64 ones within the float32 summation error bound), then the statistics
    # after word_embeddings_layernorm with upstream's assertAlmostEqual(..., places=1).
    EMBEDDINGS_DS_BEFORE_LN_F_32_MEAN = {
        132619: -0.00031267106533050537,
        3478: 0.00023087859153747559,
        368: -0.0005701072514057159,
        109586: -0.0003911703824996948,
        35433: -0.0001944899559020996,
        2: 0.0004146844148635864,
        2175: 0.00045740045607089996,
        23714: 0.0002641640603542328,
        73173: -0.0002864748239517212,
        144252: 0.0005256589502096176,
        77: 0.0006617321632802486,
    }
    EMBEDDINGS_DS_BEFORE_LN_F_32_MIN = {
        3478: -0.00921630859375,
        368: -0.010009765625,
        109586: -0.01031494140625,
        35433: -0.01177978515625,
        2: -0.0074462890625,
        77: -0.00848388671875,
        132619: -0.009521484375,
        2175: -0.0074462890625,
        23714: -0.0145263671875,
        73173: -0.007415771484375,
        144252: -0.01007080078125,
    }
    EMBEDDINGS_DS_BEFORE_LN_F_32_MAX = {
        3478: 0.0128173828125,
        368: 0.01214599609375,
        109586: 0.0111083984375,
        35433: 0.01019287109375,
        2: 0.0157470703125,
        77: 0.0174560546875,
        132619: 0.0078125,
        2175: 0.0113525390625,
        23714: 0.0146484375,
        73173: 0.01116943359375,
        144252: 0.01141357421875,
    }
    EMBEDDINGS_DS_BEFORE_LN_F_32_SUM = {"value": 0.08217757940292358}
    EMBEDDINGS_DS_AFTER_LN_MEAN = {
        3478: -6.580352783203125e-05,
        368: 0.0001316070556640625,
        109586: -0.00030517578125,
        35433: 4.00543212890625e-05,
        2: -7.2479248046875e-05,
        77: -8.96453857421875e-05,
        132619: 0.0001583099365234375,
        2175: 2.1219253540039062e-05,
        23714: -0.000247955322265625,
        73173: -0.00021839141845703125,
        144252: -0.0001430511474609375,
    }
    EMBEDDINGS_DS_AFTER_LN_MIN = {
        3478: -1.6953125,
        368: -1.6875,
        109586: -1.6875,
        35433: -2.125,
        2: -1.390625,
        77: -1.5390625,
        132619: -1.875,
        2175: -1.4609375,
        23714: -2.296875,
        73173: -1.3515625,
        144252: -1.78125,
    }
    EMBEDDINGS_DS_AFTER_LN_MAX = {
        3478: 2.265625,
        368: 2.28125,
        109586: 1.953125,
        35433: 1.90625,
        2: 2.703125,
        77: 2.828125,
        132619: 1.65625,
        2175: 2.015625,
        23714: 2.234375,
        73173: 2.171875,
        144252: 1.828125,
    }

    model = small_testing
    embeddings = model.params["word_embeddings"]["weight"][EXAMPLE_IDS]  # [20, C]: the rows minibloom read
    for idx in set(EXAMPLE_IDS):
        row = model.params["word_embeddings"]["weight"][idx]
        assert float(row.min()) == EMBEDDINGS_DS_BEFORE_LN_F_32_MIN[idx], f"min of embedding {idx}"
        assert float(row.max()) == EMBEDDINGS_DS_BEFORE_LN_F_32_MAX[idx], f"max of embedding {idx}"
        bound = _f32_sum_error_bound(row) / row.size + U32 * abs(float(row.mean()))  # sum / n, rounded once more
        assert abs(float(row.mean()) - EMBEDDINGS_DS_BEFORE_LN_F_32_MEAN[idx]) <= bound, f"mean of embedding {idx}"
    total = float(np.sum(embeddings))
    assert abs(total - EMBEDDINGS_DS_BEFORE_LN_F_32_SUM["value"]) <= _f32_sum_error_bound(embeddings)

    embeddings_ln = model.forward(np.array([EXAMPLE_IDS]), output_hidden_states=True,
                                  logits="none").hidden_states[0][0]  # word_embeddings_layernorm output [20, C]
    expected = {"min": EMBEDDINGS_DS_AFTER_LN_MIN, "max": EMBEDDINGS_DS_AFTER_LN_MAX,
                "mean": EMBEDDINGS_DS_AFTER_LN_MEAN}
    got = {"min": embeddings_ln.min(axis=-1), "max": embeddings_ln.max(axis=-1), "mean": embeddings_ln.mean(axis=-1)}
    for key in ("min", "max", "mean"):
        for i, idx in enumerate(EXAMPLE_IDS):
            assert almost_equal(expected[key][idx], float(got[key][i]), places=1), f"{key} after LN, token {idx}"


def test_small_testing_hidden_states_mean(small_testing):
    # test_modeling_bloom.py BloomEmbeddingTest.test_hidden_states_transformers: the mean of BloomModel's
    # last_hidden_state (after ln_f), assertAlmostEqual places=3 (upstream's CPU tolerance; minibloom runs on the CPU).
    # Left out: MIN_MAX_DICT = {"min": -2.0625, "max": 2.75}, compared EXACTLY upstream; those are bfloat16 results of
    # bfloat16 arithmetic (torch_dtype="auto"), which minibloom's float32/float64 modes do not reproduce bit for bit.
    MEAN_VALUE_LAST_LM = -4.3392181396484375e-05
    model = small_testing
    if _hf_drops_dense_bias(model):
        pytest.skip(f"{REPO_SMALL}: pretraining_tp > 1 with slow_but_exact and nonzero dense biases, which "
                    "transformers drops and minibloom keeps; the golden hidden states are not comparable")
    last = model.forward(np.array([EXAMPLE_IDS]), output_hidden_states=True, logits="none").hidden_states[-1]
    mean = float(last.mean())
    assert almost_equal(MEAN_VALUE_LAST_LM, mean, places=3), f"mean {mean!r} vs {MEAN_VALUE_LAST_LM!r}"


def test_small_testing_logits(small_testing):
    # test_modeling_bloom.py BloomEmbeddingTest.test_logits: the logits split into two halves of the vocabulary
    # (125440 columns each, as the model was sharded over two GPUs), each half's mean with places=6 (|diff| < 5e-7).
    # The goldens are bfloat16 results; on random checkpoints of this shape float64 and torch bfloat16 differed by up
    # to ~5e-7 (median ~1e-7), so a miss by less than ~1.5e-6 points at bfloat16 rounding, not at minibloom.
    MEAN_LOGITS_GPU_1 = -1.823902130126953e-05
    MEAN_LOGITS_GPU_2 = 1.9431114196777344e-05
    model = small_testing
    if _hf_drops_dense_bias(model):
        pytest.skip(f"{REPO_SMALL}: pretraining_tp > 1 with slow_but_exact and nonzero dense biases, which "
                    "transformers drops and minibloom keeps; the golden logits are not comparable")
    output = model(np.array([EXAMPLE_IDS]))
    assert output.shape[-1] == 2 * 125440
    output_gpu_1, output_gpu_2 = output[..., :125440], output[..., 125440:]
    for got, want in ((float(output_gpu_1.mean()), MEAN_LOGITS_GPU_1), (float(output_gpu_2.mean()), MEAN_LOGITS_GPU_2)):
        assert almost_equal(got, want, places=6), f"mean logit {got!r} vs {want!r} (diff {abs(got - want):.2e})"
