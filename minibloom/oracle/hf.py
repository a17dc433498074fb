"""``minibloom check``: minibloom against transformers on the same checkpoint and inputs, layer by layer.

This is the one module that uses torch and transformers, and only inside its functions, so that importing minibloom
never pulls them in. The float64 column compares minibloom's float64 oracle mode with transformers in float64 with
its two float32 spots patched (``hf_float64_exact``): ``modeling_bloom.py`` computes the attention softmax with
``F.softmax(..., dtype=torch.float32)`` and the ALiBi slopes in float32 (``_get_alibi_slopes``) even in a float64
model. With both patched, the two implementations agree to ~1e-15 relative; anything larger is a bug in one of them.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import sys
import time
from dataclasses import dataclass

import numpy as np

from ..errors import MinibloomError
from .trace import DiffReport, diff_traces

DTYPES = ("float32", "float64")


def _import_hf():
    try:
        import torch
        import transformers
    except ImportError as e:
        raise MinibloomError(f"check: needs torch and transformers to compare against ({e}); "
                             "install them with `pip install 'minibloom[test]'`, or compare saved traces with "
                             "`minibloom diff`") from None
    return torch, transformers


def hf_available() -> bool:
    """True when torch and transformers can be imported (without importing them twice)."""
    try:
        _import_hf()
    except MinibloomError:
        return False
    return True


@contextlib.contextmanager
def hf_float64_exact():
    """Make transformers' BLOOM an exact float64 reference while the context is open.

    Patches ``transformers.models.bloom.modeling_bloom``: its ``F.softmax(x, dim, dtype=torch.float32)`` runs in the
    input's dtype instead, and ``_get_alibi_slopes`` returns minibloom's slopes (2^(-8k/n), extra-head rule) in
    float64. Restored on exit. A float32 model is unaffected in effect (softmax already float32, slopes cast).
    """
    torch, transformers = _import_hf()
    from ..model import alibi_slopes

    mb = transformers.models.bloom.modeling_bloom
    functional = torch.nn.functional

    class _Functional:  # torch.nn.functional with a dtype-preserving softmax
        def __getattr__(self, name):
            return getattr(functional, name)

        @staticmethod
        def softmax(x, dim=-1, dtype=None):
            return functional.softmax(x, dim=dim)

    def slopes(num_heads, device):
        return torch.tensor(alibi_slopes(num_heads, np.float64), device=device)

    saved = mb.F, mb._get_alibi_slopes
    mb.F, mb._get_alibi_slopes = _Functional(), slopes
    try:
        yield
    finally:
        mb.F, mb._get_alibi_slopes = saved


def comparable_checkpoint(path: str) -> str:
    """The local checkpoint directory for ``path`` (a directory, a ``.safetensors`` file, a name under weights/ or a
    hub id), or a ``MinibloomError`` saying why transformers cannot be compared with it directly."""
    from ..formats.loading import resolve

    p = resolve(path)
    if os.path.isfile(p) and p.endswith(".gguf"):
        raise MinibloomError(f"{p}: a GGUF file is not comparable with transformers directly (transformers would "
                             "dequantize it with its own code); check the original safetensors checkpoint instead, "
                             "or `minibloom trace` it and `minibloom diff` against your implementation's dump")
    directory = os.path.dirname(p) if os.path.isfile(p) else p
    cfg_path = os.path.join(directory, "config.json")
    if os.path.isfile(cfg_path):
        with open(cfg_path) as f:
            try:
                cfg = json.load(f)
            except json.JSONDecodeError as e:
                raise MinibloomError(f"{cfg_path}: not valid JSON ({e})") from None
        if cfg.get("quantization_config"):
            raise MinibloomError(f"{directory}: a bitsandbytes-quantized checkpoint is not comparable with "
                                 "transformers on CPU directly; check the unquantized checkpoint instead")
    return directory


def random_model(seed: int = 0, std: float = 0.08, base: bool = False, *, vocab: int = 256, hidden: int = 48,
                 n_layer: int = 3, n_head: int = 6, post_ln: bool = False, tp: int = 1, slow: bool = False, **config):
    """A transformers ``BloomForCausalLM`` (``BloomModel`` when ``base``) in float32 with EVERY parameter random:
    matrices and biases N(0, std), LayerNorm weights 1 + N(0, 0.2) and biases N(0, 0.1). transformers' own init
    leaves biases at 0 and LayerNorm weights at 1, which would hide a port that swaps or drops them; test a port on
    this model's ``save_pretrained`` files."""
    torch, transformers = _import_hf()
    cfg = transformers.BloomConfig(vocab_size=vocab, hidden_size=hidden, n_layer=n_layer, n_head=n_head,
                                   apply_residual_connection_post_layernorm=post_ln, pretraining_tp=tp,
                                   slow_but_exact=slow, attn_implementation="eager", **config)
    torch.manual_seed(seed)
    model = (transformers.BloomModel if base else transformers.BloomForCausalLM)(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if "layernorm" in name or "ln_f" in name:
                value = 1.0 + 0.2 * noise if name.endswith("weight") else 0.1 * noise
            else:
                value = std * noise
            p.copy_(value.to(p.dtype))
    return model


def hf_value_and_grad(model, input_ids, attention_mask=None, labels=None, dtype: str = "float64"):
    """transformers' causal-LM loss and torch autograd's gradient of every parameter: the reference for
    ``Bloom.value_and_grad``.

    ``model``: a checkpoint directory or a transformers ``BloomForCausalLM`` (converted to ``dtype`` in place).
    ``labels`` None: the ids with padded positions ignored (-100). In float64 it runs inside ``hf_float64_exact``,
    and the loss is ``ForCausalLMLoss``'s (labels shifted by one, -100 ignored, mean over the rest) without its
    ``logits.float()``, which would round a float64 model's logits to float32. transformers' ``slow_but_exact`` path
    drops the ``dense`` biases (minibloom keeps them); it is switched off, which computes the same function as
    minibloom's sliced products up to rounding. Returns ``(loss, {named_parameters() name: NumPy gradient})``.
    """
    torch, transformers = _import_hf()
    if dtype not in DTYPES:
        raise MinibloomError(f"dtype: {dtype!r} is not supported (use float32 or float64)")
    tdt = getattr(torch, dtype)
    if isinstance(model, (str, os.PathLike)):
        model = transformers.BloomForCausalLM.from_pretrained(os.fspath(model), dtype=tdt,
                                                              attn_implementation="eager")
    model = model.to(tdt).eval()
    model.config.slow_but_exact = False
    for blk in model.transformer.h:
        blk.self_attention.slow_but_exact = blk.mlp.slow_but_exact = False
    ids = torch.as_tensor(np.asarray(input_ids, np.int64))
    ids = ids[None] if ids.ndim == 1 else ids
    mask = torch.ones_like(ids) if attention_mask is None else torch.as_tensor(np.asarray(attention_mask, np.int64))
    mask = mask.reshape(ids.shape)
    lab = torch.where(mask != 0, ids, -100) if labels is None else torch.as_tensor(np.asarray(labels, np.int64))
    lab = lab.reshape(ids.shape)
    model.zero_grad(set_to_none=True)
    patch = hf_float64_exact() if dtype == "float64" else contextlib.nullcontext()
    with patch:
        logits = model(ids, attention_mask=mask).logits  # [B, T, V]
        V = logits.shape[-1]
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, V), lab[:, 1:].reshape(-1),
                                                 ignore_index=-100)
        loss.backward()
    grads = {name: (p.grad if p.grad is not None else torch.zeros_like(p)).detach().numpy().copy()
             for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return loss.item(), grads


def hf_trace(path: str, input_ids, attention_mask=None, dtype: str = "float32", attentions: bool = False) -> dict:
    """Trace (minibloom.trace format) of transformers' ``BloomForCausalLM`` for the checkpoint directory ``path``.

    ``dtype="float64"`` runs inside ``hf_float64_exact``. The model is freed before returning.
    """
    torch, transformers = _import_hf()
    if dtype not in DTYPES:
        raise MinibloomError(f"dtype: {dtype!r} is not supported by check (use float32 or float64)")
    tdt = getattr(torch, dtype)
    model = transformers.BloomForCausalLM.from_pretrained(path, dtype=tdt, attn_implementation="eager").eval()
    ids = torch.as_tensor(np.asarray(input_ids, np.int64))
    mask = None if attention_mask is None else torch.as_tensor(np.asarray(attention_mask, np.int64))
    patch = hf_float64_exact() if dtype == "float64" else contextlib.nullcontext()
    with torch.no_grad(), patch:
        out = model(ids, attention_mask=mask, output_hidden_states=True, output_attentions=attentions)
    tr = {"input_ids": ids.numpy(), "attention_mask": None if mask is None else mask.numpy(),
          "hidden_states": [h.numpy() for h in out.hidden_states], "logits": out.logits.numpy(),
          "attentions": [a.numpy() for a in out.attentions] if attentions else None,
          "meta": {"implementation": f"transformers {transformers.__version__} (torch {torch.__version__})",
                   "dtype": dtype, "model": path,
                   "patched": "float64 softmax and ALiBi slopes" if dtype == "float64" else None}}
    del model, out
    gc.collect()
    return tr


@dataclass
class CheckResult:
    """``reports[dtype]``: minibloom (A) against transformers (B) in that dtype."""

    path: str
    input_ids: np.ndarray
    attention_mask: np.ndarray
    reports: dict[str, DiffReport]
    seconds: dict[str, float]

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.reports.values())

    def table(self) -> str:
        """Per-layer max relative error of minibloom vs transformers, one column per dtype."""
        dts = list(self.reports)
        first = self.reports[dts[0]]
        names = [r.name for r in first.rows]
        B, T = self.input_ids.shape
        padded = int((self.attention_mask == 0).sum())
        lines = [f"model: {self.path}",
                 f"inputs: {B} row(s) x {T} tokens" + (f", {padded} left-padding positions" if padded else ""),
                 "error = max|minibloom - transformers| / max|transformers| over real positions, per layer", ""]
        head = f"{'layer':<24}" + "".join(f"{dt + ' max rel':>16}{dt + ' max abs':>16}" for dt in dts)
        lines.append(head + "  result")
        for i, name in enumerate(names):
            cells, ok = "", True
            for dt in dts:
                r = self.reports[dt].rows[i]
                cells += f"{r.max_rel:>16.3e}{r.max_abs:>16.3e}"
                ok = ok and r.passed
            lines.append(f"{name:<24}{cells}  {'ok' if ok else 'FAIL'}")
        lines.append("")
        for dt in dts:
            rep = self.reports[dt]
            first_bad = rep.first_divergence
            top1 = "" if rep.top1_agreement is None else f", top-1 agreement {100 * rep.top1_agreement:.1f}%"
            lines.append(f"{dt}: tolerance {rep.rtol:.0e} relative; {'PASS' if first_bad is None else 'FAIL'}"
                         + ("" if first_bad is None else f", first divergence: {first_bad.name}") + top1
                         + f" ({self.seconds[dt]:.1f} s)")
        return "\n".join(lines)


def default_inputs(vocab: int, batch: int = 2, seq: int = 16, pad: int = 5, seed: int = 0):
    """Random ids [batch, seq] and a mask whose last row is left-padded by ``pad`` positions (so padding is checked
    too)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (batch, seq), dtype=np.int64)
    mask = np.ones((batch, seq), np.int64)
    if batch > 1 and 0 < pad < seq:
        mask[-1, :pad] = 0
    return ids, mask


def check(path, input_ids=None, attention_mask=None, dtypes=DTYPES, attentions: bool = False,
          log=None) -> CheckResult:
    """Run minibloom and transformers on the same checkpoint and inputs in each of ``dtypes``; per-layer reports.

    ``input_ids`` default: ``default_inputs`` for the checkpoint's vocabulary. The tolerance of each column is the
    policy in ``minibloom.testing`` (FP32, FP64_VS_HF). Models are loaded one at a time to bound memory.
    """
    from ..bloom import load
    from .testing import tolerance_for
    from .trace import trace

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    _import_hf()
    directory = comparable_checkpoint(os.fspath(path))
    reports, seconds = {}, {}
    ids = mask = None
    for dt in dtypes:
        t0 = time.perf_counter()
        log(f"check: minibloom {dt} ...")
        model = load(directory, dtype=dt)
        if ids is None:
            if input_ids is None:
                ids, mask = default_inputs(model.vocab_size)
            else:
                ids = model._ids(input_ids)
                mask = model._mask(attention_mask, ids.shape)
        mine = trace(model, ids, mask, attentions=attentions)
        del model
        gc.collect()
        log(f"check: transformers {dt} ...")
        ref = hf_trace(directory, ids, mask, dtype=dt, attentions=attentions)
        reports[dt] = diff_traces(mine, ref, rtol=tolerance_for(dt).rel)
        reports[dt].names = (f"minibloom {dt}", ref["meta"]["implementation"])
        seconds[dt] = time.perf_counter() - t0
        del mine, ref
        gc.collect()
    return CheckResult(directory, ids, mask, reports, seconds)
