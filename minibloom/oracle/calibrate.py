"""Oracle calibration: how far *correct* ports of BLOOM land from minibloom's float64 logits, per implementation kind,
and how far *buggy* ports land — the two populations every verdict policy in ``minibloom.testing`` sits between.

``minibloom calibrate`` (or ``python -m minibloom.oracle.calibrate``) rebuilds ``minibloom/oracle/policies.json``,
the one table the policies are read from, and prints it as Markdown: the correct-port table and the bug matrix
(kinds x bugs).

A *kind* is a family of implementations that round the same way. Each is emulated here in NumPy, by running
``minibloom.model.forward`` with a primitives table (``primitives_for``) whose entries round as that kind's engines
do; transformers' own float32 / float16 / bfloat16 runs are added to the population when torch can be imported:

==================== ============================================================================ =================
kind                 what rounds (emulated as)                                                    reference
==================== ============================================================================ =================
float32              float32 everywhere (minibloom's two primitive tables; transformers)             float64, same file
float32-gelu-table   llama.cpp f32 on CPU: GeLU through ggml's fp16 table, Q/K/V in the fp16 KV      float64, same file
                     cache, attention probabilities rounded to fp16 for the V product
float16 / bfloat16   weights and every activation rounded (transformers' cast of the model)        float64, unquantized
int8-weight-only     weight-only int8 per output channel, symmetric (quanto qint8, torchao) or      float64, unquantized
                     asymmetric (NNCF INT8_ASYM), or 8-bit groups of 64 asymmetric (HQQ)
int4-weight-only     group-wise int4 round-to-nearest, sym (amax / 7, q in [-8, 7]) and asym       float64, unquantized
                     ((max - min) / 15 with a zero point), groups of 32, 64 and 128
int8-dynamic         int8 weights, activations quantized per call: per row int8 (CTranslate2) or    float64, unquantized
                     per tensor int8 weights and uint8 activations with a zero point (ONNX
                     Runtime ``quantize_dynamic``'s default, ``per_channel=False``)
q8_0, q4_0, q4_k     ggml: activations quantized to Q8_0 (Q8_K for k-quants) blocks for each product, float64, same file
                     plus the float32-gelu-table rounding
nf4                  bitsandbytes 4-bit: dequantized weights and activations in the compute dtype   float64, same file
                     (float16, bfloat16 or float32)
==================== ============================================================================ =================

"Same file" means the reference runs the weights the port runs (a GGUF or bnb file dequantized exactly); "unquantized"
means the engine quantized or cast the weights itself, so the reference is the original checkpoint. The
*same-weights path* (``SAME_WEIGHTS``) is the third: a weight-only port whose engine weights were dequantized
(``minibloom dequantize``) is judged at its compute precision, so float32 / float16 / bfloat16 run on each case's
weights quantized (int8 per channel, int4 group-wise) against float64 on those same weights; those runs join the float
kinds' evidence, and the bugs are planted on them too (the second matrix). ``int8-activations`` (the same weights
with the engine's activation quantization emulated in the reference) is measured on real engines, not here
(``EXTERNAL``).

The *bugs* (``BUGS``) are the classic ways a BLOOM port goes wrong; each is planted on top of every kind. Evidence:
random checkpoints (every parameter randomized) of several depths, head counts (8, 12 and 16), both residual layouts
and weight scales (``STDS``), over ``seeds`` seeds, and the trained models shipped in ``weights/`` (random weights
hide activation bugs). A bug is
*separable* from a kind when the policy fails it on every model it applies to; the matrix says where it is not.

Policies: rounding noise in the logits grows with the model as ``scale = sqrt(n_layer * hidden_size)`` (noise /
scale varies little between the shapes of the evidence, from 2 layers x 64 to the bloom-560m shape), so each kind's
limits are coefficients per unit of scale: the worst correct-port figure / scale over all evidence times a margin
(``MARGIN_REL`` for the relative error and the top-1 disagreement; ``MARGIN_KL`` for the KL divergences, per scale
squared, as they grow with the square of the logit error), never below the absolute ``FLOOR_*``.
``minibloom.testing.limits`` turns them into the limits for one model.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass, field

import numpy as np

from .. import model as M
from ..config import BloomConfig
from ..errors import MinibloomError
from .emulate import (BUGS, KINDS, REFERENCE, STATISTICAL, Port, applies, file_weights, map_matrices, ports_for,
                      prepare, quant_groups, quant_rows_int8, run_port)
from .testing import limits, scale, top1_fails

# Kinds whose limits are not calibrated here but measured on real engines (their activation quantization is emulated
# in the reference, so no emulated port would measure anything but the emulation against itself): written into
# policies.json as they stand here (``measured_on`` says where each figure comes from).
EXTERNAL = {"int8-activations": {
    "rel": 0.0015, "hidden_rel": 0.0015, "kl_mean": 1.6e-06, "kl_max": 3.8e-06, "disagreement": 0.0014,
    "floors": {"rel": 2e-05, "kl": 1e-07, "disagreement": 0.02}, "reference": "same weights",
    "measured_on": "real engines on their own dequantized weights (benchmarks/int8_activations.py): CTranslate2 int8 "
                   "under every CT2_FORCE_CPU_ISA and with ONEDNN_MAX_CPU_ISA=AVX2 / AVX512_CORE (no VNNI), ONNX "
                   "Runtime quantize_dynamic per tensor and per channel, OpenVINO dynamic quantization; random 3 x "
                   "64-160 (8 and 12 heads, weight std 0.02 and 0.08), 12 x 512, 24 x 512 and weights/default",
    "note": "worst real figure per unit of scale times the margins (2.5 rel and top-1, 6 KL): rel 5.7e-4, KL mean "
            "2.6e-7, KL max 6.3e-7, top-1 disagreement 5.6e-4 per unit of scale"}}
# The same-weights path: float compute on the very quantized weights the reference runs (a weight-only port whose
# engine weights were dequantized with `minibloom dequantize`): the float kinds judge it.
SAME_WEIGHTS_KINDS = ("float32", "float16", "bfloat16")

MARGIN_REL = 2.5
MARGIN_KL = 6.0
# Floors: float32 rounding grows with width and depth (2e-6 observed at the bloom-560m shape against 9e-7 here), and
# a KL limit below ~1e-7 nats would judge float32 noise on models whose logits span more than these do.
FLOOR_REL = {"float32": 2e-5}
FLOOR_KL = {"float32": 1e-7}
FLOOR_DISAGREE = 0.02  # top-1 disagreement allowed at least (near-ties flip under any rounding)
POLICY_FILE = os.path.join(os.path.dirname(__file__), "policies.json")


# ---- transformers as a real port (when torch is importable) -----------------------------------------------------
def hf_logits(params: dict, cfg: BloomConfig, ids: np.ndarray, mask: np.ndarray, dtype: str):
    """(logits, hidden states) of transformers' ``BloomForCausalLM`` run in ``dtype`` on these float64 parameters;
    None without torch."""
    try:
        import torch
        import transformers
    except ImportError:
        return None
    hc = transformers.BloomConfig(vocab_size=params["word_embeddings"]["weight"].shape[0],
                                  hidden_size=cfg.hidden_size, n_layer=cfg.n_layer, n_head=cfg.n_head,
                                  layer_norm_epsilon=cfg.layer_norm_epsilon,
                                  apply_residual_connection_post_layernorm=cfg.apply_residual_connection_post_layernorm,
                                  tie_word_embeddings=cfg.tie_word_embeddings, attn_implementation="eager")
    model = transformers.BloomForCausalLM(hc).eval()
    state = {f"transformer.{k}": torch.from_numpy(np.ascontiguousarray(v, np.float32)) for k, v in _flat(params)}
    if "lm_head.weight" in {k for k, _ in _flat(params)}:
        state["lm_head.weight"] = state.pop("transformer.lm_head.weight")
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    model = model.to(getattr(torch, dtype))
    with torch.no_grad():
        out = model(torch.as_tensor(ids), attention_mask=torch.as_tensor(mask), output_hidden_states=True)
    return out.logits.double().numpy(), [h.double().numpy() for h in out.hidden_states]


def _flat(tree, prefix=""):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _flat(v, f"{prefix}{k}.")
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from _flat(v, f"{prefix}{i}.")
    else:
        yield prefix[:-1], tree


HF_KINDS = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16"}


# ---- evidence: models and inputs --------------------------------------------------------------------------------
@dataclass
class Case:
    """One model with its inputs: a random checkpoint or a trained one."""

    name: str
    cfg: BloomConfig
    params: dict  # float64, nested
    ids: np.ndarray
    mask: np.ndarray
    trained: bool = False
    bugs: bool = True  # whether the bug matrix is measured on this case too (not only the correct ports)


SAME_WEIGHTS = {  # weight schemes of the same-weights path: what `minibloom dequantize` hands the reference
    "int8": quant_rows_int8,
    "int4": lambda w: quant_groups(w, 4, 64, False),
}


def random_checkpoint(cfg: BloomConfig, vocab: int, seed: int, std: float = 0.08) -> dict:
    """Every parameter random (as tests/factory.py does): matrices and biases N(0, std), LayerNorm weights
    1 + N(0, 0.2), LayerNorm biases N(0, 0.1) — so no loader or port bug hides behind a 0 or a 1."""
    from ..formats.weights import expected_shapes, nest

    rng = np.random.default_rng(seed)
    flat = {}
    for name, shape in expected_shapes(cfg, vocab).items():
        noise = rng.standard_normal(shape)
        if "layernorm" in name or name.startswith("ln_f"):
            flat[name] = 1.0 + 0.2 * noise if name.endswith("weight") else 0.1 * noise
        else:
            flat[name] = std * noise
    return nest(flat)


def calibration_mask(B: int, T: int) -> np.ndarray:
    """Rows: full, left-padded, right-padded, and (from 4 rows on) one with a hole in the middle."""
    mask = np.ones((B, T), np.int64)
    if B > 1:
        mask[1, : T // 4] = 0
    if B > 2:
        mask[2, T - T // 5:] = 0
    if B > 3:
        mask[3, : T // 8] = 0
        mask[3, T // 2: T // 2 + 2] = 0
    return mask


RANDOM_SHAPES = (  # (layers, hidden, heads, post-LN), every seed
    (2, 64, 8, False),
    (4, 96, 12, False),
    (6, 96, 12, True),
    (12, 192, 12, False),
    (24, 128, 16, False),
)
WIDE_SHAPES = ((24, 512, 16, False),)  # one seed: the depth of bloom-560m at half its width
STDS = (0.02, 0.05, 0.1)  # weight scales of the random checkpoints: each shape meets each over three seeds


def random_cases(seeds: int, vocab: int = 512, B: int = 4, T: int = 24, seed0: int = 0,
                 shapes=RANDOM_SHAPES, stds=STDS) -> list[Case]:
    """Random checkpoints of every shape in ``shapes`` for seeds ``seed0 .. seed0 + seeds - 1``; the matrices' std
    cycles through ``stds`` with the seed and the shape (so three seeds give every shape every std)."""
    cases = []
    for seed in range(seed0, seed0 + seeds):
        for i, (n_layer, C, H, post) in enumerate(shapes):
            std = stds[(seed + i) % len(stds)]
            cfg = BloomConfig(vocab_size=vocab, hidden_size=C, n_layer=n_layer, n_head=H,
                              apply_residual_connection_post_layernorm=post)
            rng = np.random.default_rng(1000 + seed)
            cases.append(Case(f"random {n_layer}x{C} {H}h{' post-LN' if post else ''} std {std:g} seed {seed}", cfg,
                              random_checkpoint(cfg, vocab, seed * 100 + n_layer, std),
                              rng.integers(0, vocab, (B, T)), calibration_mask(B, T)))
    return cases


def trained_cases(directories, text_path: str | None, B: int = 4, T: int = 32) -> list[Case]:
    """Trained checkpoints with real text (held-out end of the corpus) as input."""
    from ..bloom import load

    cases = []
    for d in directories:
        model = load(d, dtype="float64")
        if text_path and os.path.isfile(text_path) and model.tokenizer is not None:
            with open(text_path, encoding="utf-8") as f:
                text = f.read()[-20000:]
            enc = model.encode(text)
            ids = np.asarray(getattr(enc, "ids", enc), np.int64)[: B * T].reshape(B, T)
        else:
            ids = np.random.default_rng(0).integers(0, model.vocab_size, (B, T))
        cases.append(Case(f"trained {os.path.basename(os.path.normpath(d))}", model.config, model.params, ids,
                          calibration_mask(B, T), trained=True))
    return cases


# ---- metrics ---------------------------------------------------------------------------------------------------
def metrics(actual: tuple, reference: tuple, mask: np.ndarray) -> dict:
    """``minibloom.testing.logit_metrics`` of (logits, hidden states) against the reference's, plus ``hidden_rel``:
    the worst layer's max|a - r| / max|r| over real positions."""
    from .testing import logit_metrics, rel_error

    m = logit_metrics(actual[0], reference[0], mask)
    real = mask.astype(bool)
    m["hidden_rel"] = max(rel_error(a[real], r[real]) for a, r in zip(actual[1], reference[1]))
    return m


# ---- the whole calibration -------------------------------------------------------------------------------------
@dataclass
class Calibration:
    correct: dict = field(default_factory=dict)  # kind -> case -> worst metrics over the kind's ports
    bugs: dict = field(default_factory=dict)  # kind -> bug -> case -> metrics
    cases: list = field(default_factory=list)
    sizes: dict = field(default_factory=dict)  # case -> (n_layer, hidden_size)
    same: dict = field(default_factory=dict)  # "float32 on int8" -> bug -> case -> metrics (same-weights path)
    probe: dict = field(default_factory=dict)  # kind -> case -> worst metrics over the emulated ports alone
    activations: dict = field(default_factory=dict)  # case -> int8-activations' emulated correct port (same weights)


FIGURES = ("rel", "kl_mean", "kl_max", "top1", "hidden_rel")


def _worst(a: dict | None, b: dict) -> dict:
    if a is None:
        return {**{k: b[k] for k in FIGURES}, "positions": b["positions"]}
    return {"rel": max(a["rel"], b["rel"]), "kl_mean": max(a["kl_mean"], b["kl_mean"]),
            "kl_max": max(a["kl_max"], b["kl_max"]), "top1": min(a["top1"], b["top1"]),
            "hidden_rel": max(a["hidden_rel"], b["hidden_rel"]), "positions": b["positions"]}


def default_trained() -> tuple[str, ...]:
    """The trained checkpoints of the evidence: ``weights/default`` and ``weights/calib-12h`` of the clone."""
    from ..paths import weights_dir

    return tuple(os.path.join(weights_dir(), name) for name in ("default", "calib-12h"))


def default_text() -> str:
    from ..paths import REPO_ROOT

    return os.path.join(REPO_ROOT, "data", "tinyshakespeare.txt")


def calibrate(seeds: int = 3, trained: tuple[str, ...] | None = None, text: str | None = None,
              kinds=KINDS, bugs=tuple(BUGS), use_hf: bool = True, progress: bool = True, *, wide: bool = False,
              same_weights=tuple(SAME_WEIGHTS), stds=STDS, activations: bool = True) -> Calibration:
    """Measure every kind's correct ports and every (kind, bug) pair on every case; and on the same-weights path,
    the float kinds (``SAME_WEIGHTS_KINDS``) on each case's weights quantized by each scheme of ``same_weights``
    (their correct figures join the float kinds' evidence as cases "<case> on <scheme> weights"), and with
    ``activations`` ``int8-activations`` on the int8 weights (``_measure_activations``)."""
    from tqdm.auto import tqdm

    trained = default_trained() if trained is None else trained
    missing = [d for d in trained if not os.path.isdir(d)]
    if missing:
        raise MinibloomError(f"calibrate: trained checkpoint {missing[0]} not found (run from a clone, or name the "
                             "trained checkpoints with --trained)")
    cases = (random_cases(seeds, stds=stds) + (random_cases(1, shapes=WIDE_SHAPES, stds=stds) if wide else [])
             + trained_cases(trained, default_text() if text is None else text))
    cal = Calibration(cases=[c.name for c in cases],
                      sizes={c.name: (c.cfg.n_layer, c.cfg.hidden_size) for c in cases})
    same_kinds = [k for k in SAME_WEIGHTS_KINDS if k in kinds]
    total = sum(1 + len(bugs) * c.bugs for c in cases) * (len(kinds) + len(same_weights) * len(same_kinds))
    bar = tqdm(total=total, desc="calibrate", unit="run", disable=not progress)
    for case in cases:
        for kind in kinds:
            worst, per_bug, probe = _measure(kind, file_weights(kind, case.params), case, bugs if case.bugs else (),
                                             use_hf, bar)
            cal.correct.setdefault(kind, {})[case.name] = worst
            cal.probe.setdefault(kind, {})[case.name] = probe
            for bug, m in per_bug.items():
                cal.bugs.setdefault(kind, {}).setdefault(bug, {})[case.name] = m
        for scheme in same_weights:
            params = map_matrices(case.params, SAME_WEIGHTS[scheme], head=False)
            name = f"{case.name} on {scheme} weights"
            cal.sizes[name] = cal.sizes[case.name]
            for kind in same_kinds:
                worst, per_bug, _ = _measure(kind, params, case, bugs if case.bugs else (), False, bar)
                cal.correct[kind][name] = worst
                for bug, m in per_bug.items():
                    cal.same.setdefault(f"{kind} on {scheme}", {}).setdefault(bug, {})[case.name] = m
        if activations and "int8" in same_weights:
            worst, per_bug = _measure_activations(case, bugs if case.bugs else ())
            cal.activations[case.name] = worst
            for bug, m in per_bug.items():
                cal.same.setdefault("int8-activations on int8", {}).setdefault(bug, {})[case.name] = m
    bar.close()
    return cal


def _measure_activations(case: Case, bugs) -> tuple[dict, dict]:
    """The same-weights path of ``int8-activations``: CTranslate2's arithmetic (per-row int8 weights, the head's
    too; each product's input quantized per row; float32 elsewhere), correct and with each bug, against float64 on
    the same weights with the same activation rounding emulated (``minibloom.oracle.activations``). Its limits come
    from the real engines (``EXTERNAL``); these runs show which bugs they separate."""
    from .activations import activation_primitives

    params = map_matrices(case.params, quant_rows_int8, head=True)
    out = M.forward_outputs(params, case.ids, case.mask, case.cfg, primitives=activation_primitives("int8-per-row"),
                            hidden_states=True)
    ref = (out.logits, out.hidden_states)
    port = Port("CTranslate2 int8 compute", np.float32, act_in=quant_rows_int8)
    prepared = prepare(port, params)
    worst = metrics(run_port(port, None, prepared, case.cfg, case.ids, case.mask), ref, case.mask)
    per_bug = {bug: metrics(run_port(port, bug, prepared, case.cfg, case.ids, case.mask), ref, case.mask)
               for bug in bugs if applies(bug, case.cfg, case.mask)}
    return worst, per_bug


def _measure(kind: str, params: dict, case: Case, bugs, use_hf: bool, bar) -> tuple[dict, dict, dict]:
    """(worst correct-port metrics, bug -> metrics, worst over the emulated ports alone: what
    ``minibloom.testing.probe_figures`` measures) of ``kind`` on ``params`` against float64 on ``params``."""
    out = M.forward_outputs(params, case.ids, case.mask, case.cfg, hidden_states=True)
    ref = (out.logits, out.hidden_states)
    worst, first = None, None
    for port in ports_for(kind):
        prepared = prepare(port, params)
        first = first or prepared
        worst = _worst(worst, metrics(run_port(port, None, prepared, case.cfg, case.ids, case.mask), ref, case.mask))
    probe = dict(worst)
    if use_hf and kind in HF_KINDS:
        hf = hf_logits(params, case.cfg, case.ids, case.mask, HF_KINDS[kind])
        if hf is not None:
            worst = _worst(worst, metrics(hf, ref, case.mask))
    bar.update(1)
    port = ports_for(kind)[0]
    per_bug = {}
    for bug in bugs:
        bar.update(1)
        if applies(bug, case.cfg, case.mask):
            per_bug[bug] = metrics(run_port(port, bug, first, case.cfg, case.ids, case.mask), ref, case.mask)
    return worst, per_bug, probe


def derive_policies(cal: Calibration) -> dict:
    """Each kind's coefficients from its worst correct port, per unit of ``scale`` (KL: per scale squared), times the
    margins; the floors are absolute. ``minibloom.testing.Tolerance.at`` turns them into limits for one model."""
    out = {}
    for kind, per_case in cal.correct.items():
        sc = {c: scale(*cal.sizes[c]) for c in per_case}
        worst = {f: max(per_case, key=lambda c: _per_scale(per_case[c], f, sc[c])) for f in FIGURES}
        coef = {f: _per_scale(per_case[worst[f]], f, sc[worst[f]]) for f in FIGURES}
        out[kind] = {"rel": _sig(MARGIN_REL * coef["rel"]),
                     "hidden_rel": _sig(MARGIN_REL * coef["hidden_rel"]),
                     "kl_mean": _sig(MARGIN_KL * coef["kl_mean"]),
                     "kl_max": _sig(MARGIN_KL * coef["kl_max"]),
                     "disagreement": _sig(MARGIN_REL * coef["top1"]),
                     "floors": {"rel": FLOOR_REL.get(kind, 0.0), "kl": FLOOR_KL.get(kind, 0.0),
                                "disagreement": FLOOR_DISAGREE},
                     "reference": REFERENCE[kind],
                     "worst_correct": {f: {"case": worst[f], "value": per_case[worst[f]][f],
                                           "per_scale": coef[f]} for f in FIGURES}}
        if kind in STATISTICAL and kind in cal.probe:
            out[kind]["probe"] = _probe_coefficients(per_case, cal.probe[kind])
    return out


def _probe_coefficients(correct: dict, probe: dict) -> dict:
    """A statistical kind's limits as multiples of its probe (the worst emulated port on the model under test,
    ``minibloom.testing.probe_policy``): the margins times the worst ratio of any correct port (transformers' casts
    included) to the probe over the evidence, at least 1."""
    def ratio(f):
        return max([1.0] + [correct[c][f] / probe[c][f] for c in correct if c in probe and probe[c][f] > 0])
    return {"rel": _sig(MARGIN_REL * max(ratio("rel"), ratio("hidden_rel"))),
            "kl": _sig(MARGIN_KL * max(ratio("kl_mean"), ratio("kl_max")))}


def _per_scale(m: dict, figure: str, s: float) -> float:
    if figure == "top1":
        return (1.0 - m["top1"]) / s
    return m[figure] / (s * s if figure.startswith("kl") else s)


def _sig(x: float) -> float:
    """Round up to two significant digits (a limit never drops below what it was derived from)."""
    if x <= 0:
        return x
    e = math.floor(math.log10(x)) - 1
    return float(f"{math.ceil(x / 10.0 ** e - 1e-9) * 10.0 ** e:.2g}")


def verdict_of(m: dict, pol: dict) -> list[str]:
    """The parts of policy ``pol`` that metrics ``m`` fail."""
    failed = []
    if not m["rel"] <= pol["rel"]:
        failed.append("rel")
    if not m["kl_mean"] <= pol["kl_mean"]:
        failed.append("kl_mean")
    if not m["kl_max"] <= pol["kl_max"]:
        failed.append("kl_max")
    if top1_fails(m["top1"], m.get("positions"), pol["top1"]):
        failed.append("top1")
    return failed


def bug_matrix(cal: Calibration, policies: dict, same_weights: bool = False) -> dict:
    """column -> bug -> {"rel": smallest relative error over the cases, "kl_mean": smallest KL mean, "caught": n,
    "of": n, "separable": bool}. Columns: the kinds (each against its own reference), or with ``same_weights`` the
    "<float kind> on <scheme>" runs of the same-weights path, judged by that float kind's policy."""
    out = {}
    for column, per_bug in (cal.same if same_weights else cal.bugs).items():
        pol = policies[column.split(" on ")[0]]
        probe = None if same_weights else cal.probe.get(column) if "probe" in pol else None
        for bug, per_case in per_bug.items():
            caught = sum(bool(verdict_of(m, _case_limits(pol, cal.sizes[c], None if probe is None else probe.get(c))))
                         for c, m in per_case.items())
            out.setdefault(column, {})[bug] = {
                "rel": _least(m["rel"] for m in per_case.values()),
                "kl_mean": _least(m["kl_mean"] for m in per_case.values()),
                "caught": caught, "of": len(per_case), "separable": caught == len(per_case)}
    return out


def _case_limits(pol: dict, size: tuple, probe: dict | None) -> dict:
    """A policy's limits on one case: sized by the model's size, and for a statistical kind by its probe there
    (``minibloom.testing.probe_policy``'s rule)."""
    lim = limits(pol, *size)
    if probe is None:
        return lim
    from .testing import PROBE_FLOORS

    c = pol["probe"]
    return {**lim, "rel": min(lim["rel"], max(c["rel"] * probe["rel"], PROBE_FLOORS["rel"])),
            "kl_mean": min(lim["kl_mean"], max(c["kl"] * probe["kl_mean"], PROBE_FLOORS["kl"])),
            "kl_max": min(lim["kl_max"], max(c["kl"] * probe["kl_max"], PROBE_FLOORS["kl"]))}


def _least(values) -> float:
    """The smallest value; NaN (a port that produced NaN logits) counts as infinitely far."""
    return min(float("inf") if math.isnan(v) else v for v in values)


def _matrix_lines(matrix: dict) -> list[str]:
    lines = ["| bug | " + " | ".join(matrix) + " |", "|---|" + "---|" * len(matrix)]
    for bug in BUGS:
        cells = []
        for column in matrix:
            c = matrix[column].get(bug)
            if c is None:
                cells.append("n/a")
            else:
                v = "FAIL" if c["separable"] else f"pass {c['of'] - c['caught']}/{c['of']}"
                cells.append(f"{'NaN/inf' if math.isinf(c['rel']) else format(c['rel'], '.1e')} {v}")
        lines.append(f"| {bug} | " + " | ".join(cells) + " |")
    return lines


def markdown(policies: dict, matrix: dict, cases: list[str], same: dict | None = None) -> str:
    """The correct-port table and the bug matrices as Markdown (docs/oracle.md and closing notes paste it): the
    statistical path (each kind against its reference) and, when given, the same-weights path (``same``)."""
    lines = ["Correct ports: the worst figure over every case, and the limits it gives at two model sizes "
             "(limits scale with sqrt(n_layer x hidden); KL with its square)", "",
             "| kind | reference | worst rel (case) | worst KL mean | limit rel: 4 x 256 / 24 x 1024 | limit KL mean "
             "| limit KL max | min top-1 |",
             "|---|---|---|---|---|---|---|---|"]
    for kind, p in policies.items():
        small, big = limits(p, 4, 256), limits(p, 24, 1024)
        w = p.get("worst_correct")
        worst = (f"{w['rel']['value']:.2e} ({w['rel']['case']}) | {w['kl_mean']['value']:.1e}" if w else
                 f"not calibrated here (measured on: {p.get('measured_on', '?')}) | -")
        lines.append(f"| {kind} | {p['reference']} | {worst} | {small['rel']:.2g} / {big['rel']:.2g} | "
                     f"{small['kl_mean']:.2g} / {big['kl_mean']:.2g} | {small['kl_max']:.2g} / {big['kl_max']:.2g} | "
                     f"{100 * small['top1']:.1f}% / {100 * big['top1']:.1f}% |")
    probed = {k: p["probe"] for k, p in policies.items() if "probe" in p}
    if probed:
        lines += ["", "Statistical kinds sized by the model under test (when the verdict has the model: "
                  "`assert_logits_close`, `verify`): limit = coefficient x the worst emulated port of the kind on "
                  "that model and input, within the envelope above and above float32's floors", "",
                  "| kind | rel coefficient | KL coefficient |", "|---|---|---|"]
        lines += [f"| {k} | {c['rel']:g} | {c['kl']:g} |" for k, c in probed.items()]
    lines += ["", "Bug matrix, statistical path (each kind against its reference: the unquantized model for "
              "float16, bfloat16 and the int kinds, with the limits sized by the model as `assert_logits_close` and "
              "`verify` size them): smallest relative error over the cases the bug applies to, and how many of them "
              "the policy fails (FAIL = every one: separable; pass k/n = k cases pass although the port is wrong)",
              ""] + _matrix_lines(matrix)
    if same:
        lines += ["", "Bug matrix, same-weights path (float32 / float16 / bfloat16 compute on int8 per-channel and "
                  "int4 group-64 weights, against float64 on those same weights; judged by the float kind's "
                  "policy)", ""] + _matrix_lines(same)
    lines += ["", f"Cases ({len(cases)}): " + "; ".join(cases)]
    return "\n".join(lines)


def external_policies(path: str = POLICY_FILE) -> dict:
    """The kinds measured outside this calibration (``EXTERNAL``), as the policies file at ``path`` holds them
    (``EXTERNAL`` is their one source: a recalibration writes them as measured)."""
    return {k: dict(v) for k, v in EXTERNAL.items()}


def write_policies(policies: dict, matrix: dict, cal: Calibration, path: str = POLICY_FILE,
                   same: dict | None = None) -> None:
    """policies.json: the limits, the bug matrices, and every case's correct-port figures (the evidence)."""
    doc = {"generated_by": "minibloom calibrate", "margins": {"rel": MARGIN_REL, "kl": MARGIN_KL},
           "scale": "limit = max(coefficient * sqrt(n_layer * hidden_size), floor); KL: coefficient * n_layer * "
                    "hidden_size; top-1: 1 - max(disagreement * sqrt(n_layer * hidden_size), floor)",
           "cases": cal.cases, "sizes": cal.sizes, "policies": policies, "bug_matrix": matrix,
           "same_weights_matrix": same or {},
           "correct_ports": {k: {c: {**{n: float(f"{m[n]:.4g}") for n in FIGURES}, "positions": m["positions"]}
                                 for c, m in per.items()}
                             for k, per in cal.correct.items()}}
    with open(path, "w") as f:
        json.dump(doc, f, indent=1, sort_keys=False)
        f.write("\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="minibloom calibrate", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return run(p.parse_args(argv))


MAX_SEEDS = 100


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seeds", type=int, default=None,
                   help=f"random seeds per checkpoint shape, 1..{MAX_SEEDS} (default 3; 1 with --quick)")
    p.add_argument("--quick", action="store_true", help="one seed (a smoke run of the whole matrix, not for --write)")
    p.add_argument("--wide", action="store_true", help="add a 24 x 512 random checkpoint (one seed; slow)")
    p.add_argument("--trained", action="append", metavar="DIR",
                   help="trained checkpoint directories (default: weights/default and weights/calib-12h)")
    p.add_argument("--text", help="text for the trained models' inputs (default: the clone's data/tinyshakespeare.txt)")
    p.add_argument("--kind", action="append", choices=KINDS, help="only these kinds (default: all)")
    p.add_argument("--no-transformers", action="store_true", help="leave transformers' runs out of the population")
    p.add_argument("--no-same-weights", action="store_true", help="skip the same-weights path")
    p.add_argument("--write", metavar="JSON", nargs="?", const=POLICY_FILE,
                   help="write the policies (default path: the package's policies.json)")
    p.add_argument("--markdown", metavar="FILE", help="also write the tables to FILE")


def check_arguments(args) -> None:
    """Every input of a calibration checked before any work: one-line ``MinibloomError`` naming the option."""
    seeds = 3 if args.seeds is None else args.seeds
    if args.quick and args.seeds is None:
        seeds = 1
    if not 1 <= seeds <= MAX_SEEDS:
        raise MinibloomError(f"--seeds: must be in 1..{MAX_SEEDS}, got {seeds}")
    args.seeds = seeds
    for option, path in (("--write", args.write), ("--markdown", args.markdown)):
        if path is None:
            continue
        folder = os.path.dirname(os.path.abspath(path))
        if os.path.isdir(path):
            raise MinibloomError(f"{option}: {path} is a directory (name the file to write)")
        if not os.path.isdir(folder):
            raise MinibloomError(f"{option}: directory {folder} does not exist")
        if not os.access(folder, os.W_OK):
            raise MinibloomError(f"{option}: directory {folder} is not writable")
    if args.text is not None:
        if not os.path.isfile(args.text):
            raise MinibloomError(f"--text: {args.text} is not a regular file")
        try:
            with open(args.text, encoding="utf-8") as f:
                f.read()
        except UnicodeDecodeError as e:
            raise MinibloomError(f"--text: {args.text} is not UTF-8 text ({e.reason} at byte {e.start})") from None
        except OSError as e:
            raise MinibloomError(f"--text: cannot read {args.text} ({e.strerror})") from None
    for d in args.trained or ():
        if not os.path.isdir(d):
            raise MinibloomError(f"--trained: {d} is not a directory")


def run(args) -> int:
    check_arguments(args)
    cal = calibrate(seeds=args.seeds, trained=tuple(args.trained) if args.trained else None,
                    text=args.text, kinds=tuple(args.kind or KINDS), use_hf=not args.no_transformers,
                    wide=args.wide, same_weights=() if args.no_same_weights else tuple(SAME_WEIGHTS))
    policies = derive_policies(cal)
    policies.update(external_policies(args.write or POLICY_FILE))
    matrix = bug_matrix(cal, policies)
    same = bug_matrix(cal, policies, same_weights=True)
    md = markdown(policies, matrix, cal.cases, same)
    print(md)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(md + "\n")
    if args.write:
        write_policies(policies, matrix, cal, args.write, same)
        print(f"\nwrote {args.write}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
