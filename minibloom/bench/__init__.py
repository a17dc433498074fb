"""minibloom vs transformers on a random bloom-560m-shaped checkpoint, with the machine's own limits measured alongside.

    minibloom bench                               # or: python benchmarks/bench.py, python -m minibloom.bench
    minibloom bench --rounds 5 --dir /tmp/minibloom-bench

torch and transformers are imported only by the transformers worker, so ``import minibloom`` never pulls them in.
What it does:

1. builds the checkpoint once (float32, exact bloom-560m shape, random values; ``ensure_checkpoint``, written by
   ``minibloom.formats.weights.write_random_checkpoint``);
2. starts two long-lived worker processes, one per engine, each loading the model once (load time measured there);
3. runs every measurement in rounds, engines alternating (the order flips each round) and the machine's limits
   measured in the same rounds (a large NumPy sgemv for the memory-bandwidth roofline, a large sgemm for the
   compute floor), and minibloom's two 512-token forward passes and its batch-1 and batch-8 decoding reduced to
   their matrix products (what they would take if nothing else cost time); keeps the best of the rounds; a shared,
   noisy machine affects both engines alike, so the ratios are the meaningful figures;
4. measures cold start (fresh ``python`` process: imports, load, one generated token) and peak RSS of a session in
   fresh processes (``minibloom.bench.children``), alternating too;
5. prints every figure for both engines, their ratio, minibloom's decode as a fraction of the bandwidth roofline and
   its forward passes as a fraction of the sgemm floor; decoding's split per step (products, the non-product rest,
   the roofline fraction); how much of each pass is products and how close to the floor it could come with the
   rest split perfectly over both cores; and each performance target with PASS/FAIL.

Both engines run greedy decoding through their ``generate`` (minibloom: ``Bloom.generate``; transformers:
``model.generate(do_sample=False)``), with no eos stop so every run produces the same number of tokens.
Thread counts are whatever the environment says (OMP_NUM_THREADS, OPENBLAS_NUM_THREADS ...); the header prints what
each library actually uses.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

from ..errors import MinibloomError
from . import children

DEFAULT_DIR = os.path.join(os.environ.get("TMPDIR", "/tmp"), "minibloom-bench", "bloom-560m-f32")

PROMPT, NEW, LONG, BATCH = 16, 64, 512, 8

SHAPES = {  # name: (hidden_size, n_layer, n_head), vocab 250880 for all released models
    "bloom-560m": (1024, 24, 16),
    "bloom-1b1": (1536, 24, 16),
    "bloom-3b": (2560, 30, 32),
    "bloom-7b1": (4096, 30, 32),
    "bloom-176b": (14336, 70, 112),
    "tiny": (256, 2, 4),  # for smoke-testing the scripts
}
VOCAB = 250880


def ensure_checkpoint(directory: str, shape: str = "bloom-560m", dtype=np.float32, seed: int = 0,
                      n_layer: int | None = None) -> str:
    """A random checkpoint of a released shape in ``directory``, written once (tensor by tensor, never a second copy
    in RAM: a bloom-7b1-shaped float16 file is ~14 GB) and reused when the directory already holds a complete one.
    ``dtype``: a NumPy float dtype or "bfloat16"; ``n_layer``: fewer layers than the shape has (a slice of it)."""
    from ..config import BloomConfig
    from ..formats.weights import write_random_checkpoint

    if os.path.isfile(os.path.join(directory, "config.json")) and os.path.isfile(
            os.path.join(directory, "model.safetensors")):
        return directory
    hidden, layers, n_head = SHAPES[shape]
    cfg = BloomConfig(vocab_size=VOCAB, hidden_size=hidden, n_layer=n_layer or layers, n_head=n_head)
    return write_random_checkpoint(directory, cfg, VOCAB, dtype, seed=seed)


# ---------------------------------------------------------------------------------------------------------------
# Worker side: one process per engine, commands as JSON lines on stdin, answers on stdout


def peak_rss() -> int:
    """This process's peak resident set in bytes: VmHWM (ru_maxrss would carry the parent's peak across exec)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _blas_threads_info() -> list[dict]:
    """The BLAS thread pools of this process: threadpoolctl's view where it is installed (it is in the test extra,
    not in a plain install), else OpenBLAS's own thread count (``minibloom.backend``), else nothing known."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        from ..backend import _openblas_function

        get = _openblas_function("get_num_threads")
        if get is None:
            return [{"internal_api": "unknown (pip install threadpoolctl to see it)"}]
        return [{"internal_api": "openblas", "num_threads": int(get()), "architecture": None}]
    return [{k: d.get(k) for k in ("internal_api", "num_threads", "architecture")} for d in threadpool_info()]


def _ids(batch: int, length: int, vocab: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(5, vocab, (batch, length))


class MinibloomEngine:
    def __init__(self, path: str):
        from .. import bloom as minibloom

        t = time.perf_counter()
        self.model = minibloom.load(path, progress=False)
        self.load_s = time.perf_counter() - t
        self.vocab = self.model.vocab_size

    def generate(self, ids: np.ndarray, new: int) -> np.ndarray:
        return self.model.generate(ids, max_new_tokens=new, eos_token_id=[])

    def forward_all(self, ids: np.ndarray):
        return self.model(ids)

    def first_token(self, ids: np.ndarray):
        return self.generate(ids, 1)

    @functools.lru_cache(maxsize=1)
    def product_inputs(self, length: int) -> tuple[np.ndarray, np.ndarray]:
        """Random activations [T, C] and [T, 4C] for ``products`` (made once: the worker's ``warmup`` makes them
        before anything is timed)."""
        C = self.model.params["word_embeddings"]["weight"].shape[1]
        rng = np.random.default_rng(0)
        return rng.standard_normal((length, C), dtype=np.float32), rng.standard_normal((length, 4 * C), np.float32)

    def products(self, length: int, logits: str) -> None:
        """Only the matrix products of a ``length``-token forward pass, back to back, on the model's own weights: each
        layer's four linear maps for every position, then the head for every position or for the last one (as
        ``model.forward`` does, with the NumPy head primitive's ``logits_product``). What the pass would take if
        attention, LayerNorm, GeLU and the adds took no time."""
        self._products(length, 1 if logits == "last" else None)

    def decode_products(self, batch: int) -> None:
        """Only the matrix products of ``generate``'s decoding of ``batch`` rows (the ``decode`` measurement): the
        prompt's pass (``batch`` x ``PROMPT`` rows, the head for the last position of each row), then ``NEW - 1``
        steps of one row per sequence. What decoding would take if everything but the products took no time: the rest
        of its time is the work around them."""
        self._products(batch * PROMPT, batch)
        for _ in range(NEW - 1):
            self._products(batch, batch)

    def _products(self, rows: int, keep: int | None) -> None:
        """The products of one forward pass over ``rows`` positions, and the head for the last ``keep`` of them (all
        when None)."""
        from .. import fast

        P = self.model.params
        x, h = self.product_inputs(LONG)
        n = rows if keep is None else keep
        for p in P["h"]:
            attn, mlp = p["self_attention"], p["mlp"]
            fast.matmul_t(x[:rows], attn["query_key_value"]["weight"])
            fast.matmul_t(x[:rows], attn["dense"]["weight"])
            fast.matmul_t(x[:rows], mlp["dense_h_to_4h"]["weight"])
            fast.matmul_t(h[:rows], mlp["dense_4h_to_h"]["weight"])
        head = P["lm_head"]["weight"] if "lm_head" in P else P["word_embeddings"]["weight"]  # [V, C]
        fast.logits_product(x[:n], head)


class TransformersEngine:
    def __init__(self, path: str):
        import torch
        import transformers

        self.torch = torch
        t = time.perf_counter()
        self.model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        self.load_s = time.perf_counter() - t
        self.vocab = self.model.config.vocab_size
        torch.set_grad_enabled(False)

    def generate(self, ids: np.ndarray, new: int):
        t = self.torch.as_tensor(ids)
        return self.model.generate(t, attention_mask=self.torch.ones_like(t), max_new_tokens=new, min_new_tokens=new,
                                   do_sample=False, pad_token_id=3, eos_token_id=None)

    def forward_all(self, ids: np.ndarray):
        return self.model(self.torch.as_tensor(ids)).logits

    def first_token(self, ids: np.ndarray):
        return self.generate(ids, 1)


def worker(engine: str, path: str) -> None:
    eng = (MinibloomEngine if engine == "minibloom" else TransformersEngine)(path)
    out = sys.stdout
    out.write(json.dumps({"load_s": eng.load_s}) + "\n")
    out.flush()
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["op"]
        if op == "quit":
            break
        if op == "threads":
            info = _blas_threads_info()
            if engine == "transformers":
                info.append({"torch.get_num_threads": eng.torch.get_num_threads()})
            out.write(json.dumps({"threads": info}) + "\n")
            out.flush()
            continue
        t = time.perf_counter()
        if op == "decode":
            eng.generate(_ids(cmd["batch"], PROMPT, eng.vocab), NEW)
        elif op == "forward_all":
            eng.forward_all(_ids(1, LONG, eng.vocab))
        elif op == "ttft":
            eng.first_token(_ids(1, LONG, eng.vocab))
        elif op == "products":
            eng.products(LONG, cmd["logits"])
        elif op == "decode_products":
            eng.decode_products(cmd["batch"])
        elif op == "warmup":
            eng.generate(_ids(1, 4, eng.vocab), 2)
            if engine == "minibloom":
                eng.product_inputs(LONG)
        dt = time.perf_counter() - t
        out.write(json.dumps({"s": dt, "maxrss": peak_rss()}) + "\n")
        out.flush()


class Worker:
    def __init__(self, engine: str, path: str):
        self.engine = engine
        self.p = subprocess.Popen([sys.executable, "-m", "minibloom.bench", "--worker", engine, "--dir", path],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.load_s = self._read()["load_s"]

    def _read(self) -> dict:
        line = self.p.stdout.readline()
        if not line:
            raise MinibloomError(f"bench: the {self.engine} worker process ended (exit code {self.p.wait()}; its "
                                 "error is the line above)")
        return json.loads(line)

    def ask(self, op: str, **kw) -> dict:
        self.p.stdin.write(json.dumps({"op": op, **kw}) + "\n")
        self.p.stdin.flush()
        return self._read()

    def close(self) -> None:
        try:
            self.p.stdin.write('{"op": "quit"}\n')
            self.p.stdin.flush()
        except BrokenPipeError:
            pass
        self.p.wait()


# ---------------------------------------------------------------------------------------------------------------
# The machine's limits, measured in the same run


def best(f, n: int, warm: bool = False) -> float:
    """The shortest of ``n`` timed calls of ``f`` (after one untimed call when ``warm``)."""
    if warm:
        f()
    shortest = float("inf")
    for _ in range(n):
        t = time.perf_counter()
        f()
        shortest = min(shortest, time.perf_counter() - t)
    return shortest


def _sustained(f, seconds: float) -> tuple[float, int]:
    """(total time, calls) of back-to-back calls of ``f`` for at least ``seconds``."""
    n, t0 = 0, time.perf_counter()
    while True:
        f()
        n += 1
        dt = time.perf_counter() - t0
        if dt >= seconds:
            return dt, n


class Limits:
    """Large sgemv (bytes/s: the decode roofline) and large sgemm (FLOP/s: the forward floor), float32 NumPy.

    Each is measured two ways per round: the best single call (35 ms for the sgemv, 0.35 s for the sgemm), and the
    rate sustained over about a second of back-to-back calls. The second is the one to hold minibloom's figures
    against: they are rates sustained over seconds too (64 decoded tokens take ~5 s), and on a shared machine a
    single short call catches quiet moments a long run cannot. Both are printed; the best over the rounds is kept for
    each, as for minibloom's figures.
    """

    def __init__(self):
        rng = np.random.default_rng(0)
        self.W = rng.standard_normal((250880, 1024), dtype=np.float32)  # the size of bloom-560m's head: 1 GB
        self.x = rng.standard_normal((1, 1024), dtype=np.float32)
        self.A = rng.standard_normal((2048, 4096), dtype=np.float32)
        self.B = rng.standard_normal((4096, 4096), dtype=np.float32)
        self.gbps, self.gflops = 0.0, 0.0  # sustained
        self.gbps_peak, self.gflops_peak = 0.0, 0.0  # best single call

    def measure(self) -> None:
        gemv, gemm = (lambda: self.x @ self.W.T), (lambda: self.A @ self.B.T)
        flop = 2 * self.A.shape[0] * self.A.shape[1] * self.B.shape[0]
        self.gbps_peak = max(self.gbps_peak, self.W.nbytes / best(gemv, 3) / 1e9)
        dt, n = _sustained(gemv, 1.0)
        self.gbps = max(self.gbps, n * self.W.nbytes / dt / 1e9)
        self.gflops_peak = max(self.gflops_peak, flop / best(gemm, 2) / 1e9)
        dt, n = _sustained(gemm, 1.5)
        self.gflops = max(self.gflops, n * flop / dt / 1e9)


# ---------------------------------------------------------------------------------------------------------------
# Fresh-process measurements: cold start to first token, peak RSS of a session

def cold_start(engine: str, path: str) -> float:
    """Seconds from starting a fresh Python (``children.cold``) to its first generated token."""
    cmd, env = children.command("cold", engine, path)
    t = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    for line in p.stdout:
        if line.startswith("TOKEN"):
            dt = time.perf_counter() - t
            break
    else:
        raise RuntimeError(f"{engine}: cold-start child failed (exit code {p.wait()})")
    p.wait()
    return dt


def session_rss(engine: str, path: str) -> tuple[int, int]:
    """Peak RSS of a session in a fresh process (``children.session``): after the prompt and decoding, and after
    an all-logits forward pass too."""
    cmd, env = children.command("session", engine, path)
    out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True, env=env).stdout
    a, b = out.split("RSS")[1].split()
    return int(a), int(b)


# ---------------------------------------------------------------------------------------------------------------
# The run


def _page_cache_warm(path: str) -> None:
    with open(os.path.join(path, "model.safetensors"), "rb") as f:
        while f.read(64 << 20):
            pass


def machine() -> str:
    """CPU model, cores, RAM and the thread settings in the environment."""
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        ram = float("nan")
    names = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_CORETYPE")
    env = " ".join(f"{k}={os.environ[k]}" for k in names if k in os.environ)
    env = env or "no thread variables set"
    return f"{cpu}, {os.cpu_count()} CPUs, {ram:.0f} GiB RAM, numpy {np.__version__}; {env}"


def run(directory: str = DEFAULT_DIR, rounds: int = 3, cold_rounds: int = 3, skip_transformers: bool = False) -> dict:
    print(f"checkpoint: {ensure_checkpoint(directory)}", flush=True)
    print(f"machine: {machine()}", flush=True)
    with open(os.path.join(directory, "config.json")) as f:
        cfg = json.load(f)
    C, L, V = cfg["hidden_size"], cfg["n_layer"], cfg["vocab_size"]
    n_params = V * C + 4 * C + L * (12 * C * C + 13 * C)
    weight_bytes = 4 * n_params
    _page_cache_warm(directory)

    engines = ["minibloom"] + ([] if skip_transformers else ["transformers"])
    workers = {e: Worker(e, directory) for e in engines}
    fastest: dict[tuple[str, str], float] = {}

    def keep(engine: str, key: str, seconds: float) -> None:
        fastest[(engine, key)] = min(fastest.get((engine, key), float("inf")), seconds)

    load = {e: w.load_s for e, w in workers.items()}
    limits = Limits()
    try:
        for e, w in workers.items():
            print(f"{e} threads: {w.ask('threads')['threads']}", flush=True)
            w.ask("warmup")
        ops = [("decode1", "decode", {"batch": 1}), ("forward_all", "forward_all", {}), ("ttft", "ttft", {}),
               ("decode8", "decode", {"batch": BATCH})]
        for r in range(rounds):
            limits.measure()
            order = engines if r % 2 == 0 else engines[::-1]
            for key, op, kw in ops:
                for e in order:
                    keep(e, key, workers[e].ask(op, **kw)["s"])
            for logits in ("last", "all"):  # the same passes' matrix products alone (minibloom's weights)
                keep("minibloom", f"products_{logits}", workers["minibloom"].ask("products", logits=logits)["s"])
            for batch in (1, BATCH):  # and decoding's
                keep("minibloom", f"products_decode{batch}", workers["minibloom"].ask("decode_products",
                                                                                      batch=batch)["s"])
            print(f"round {r + 1}/{rounds}: " + ", ".join(f"{e[:2]} {k} {v:.2f}s" for (e, k), v in fastest.items()),
                  flush=True)
        limits.measure()
    finally:
        for w in workers.values():
            w.close()
    del limits.W  # 1 GB; not needed for the fresh-process measurements

    cold: dict[str, float] = {}
    for r in range(cold_rounds):
        for e in (engines if r % 2 == 0 else engines[::-1]):
            cold[e] = min(cold.get(e, float("inf")), cold_start(e, directory))
    rss = {e: session_rss(e, directory) for e in engines}

    res = {"C": C, "L": L, "V": V, "n_params": n_params, "weight_bytes": weight_bytes, "gbps": limits.gbps,
           "gflops": limits.gflops, "gbps_peak": limits.gbps_peak, "gflops_peak": limits.gflops_peak,
           "best": {f"{e}:{k}": v for (e, k), v in fastest.items()}, "load": load,
           "cold": cold, "rss": rss, "rounds": rounds}
    report(res, engines)
    return res


def products_breakdown(ttft: float, products_last: float, floor_last: float, forward: float, products_all: float,
                       floor_all: float) -> str:
    """Where the two forward passes' time goes against the floors: their matrix products alone (timed back to back
    in the same run), and the rest (attention, LayerNorm, GeLU, adds), which runs on one core while OpenBLAS's other
    thread waits. The bound assumes that rest split perfectly over both cores and the products as fast as alone."""
    rest_last, rest_all = ttft - products_last, forward - products_all
    return (f"matrix products alone: first token {products_last:.2f} s ({products_last / floor_last:.2f}x the floor) "
            f"+ {rest_last:.2f} s of the rest; all-logits forward {products_all:.2f} s "
            f"({floor_all / products_all:.1%} of the floor) + {rest_all:.2f} s. With the rest split perfectly over "
            f"both cores: first token >= {(products_last + rest_last / 2) / floor_last:.2f}x the floor, all-logits "
            f"forward <= {floor_all / (products_all + rest_all / 2):.1%} of it")


def decode_split(decode: float, products: float, batch: int, weight_bytes: int, gbps: float) -> str:
    """Where batch-``batch`` decoding's time goes: ``decode`` seconds for ``NEW`` steps, of which ``products``
    seconds are its matrix products alone (timed back to back in the same run); the rest is the work around them
    (attention, LayerNorm, GeLU, adds, the cache, Python). Per step, against the roofline: one pass over the
    weights at the measured sgemv bandwidth."""
    step, prod = decode / NEW, products / NEW
    rest = step - prod
    roof = weight_bytes / (gbps * 1e9)
    rows = "token" if batch == 1 else f"step of {batch} tokens"
    return (f"batch-{batch} decode per {rows}: {step * 1e3:.1f} ms = matrix products {prod * 1e3:.1f} ms "
            f"({roof / prod:.1%} of the roofline alone) + non-product {rest * 1e3:.1f} ms ({rest / step:.1%} of "
            f"the step); decode = {roof / step:.1%} of the sgemv roofline")


def report(res: dict, engines: list[str]) -> None:
    b = res["best"]
    roof_tps = res["gbps"] * 1e9 / res["weight_bytes"]
    n, VC = res["n_params"], res["V"] * res["C"]
    flops_all = 2 * LONG * n
    flops_last = 2 * LONG * (n - VC) + 2 * VC
    floor_all = flops_all / (res["gflops"] * 1e9)
    floor_last = flops_last / (res["gflops"] * 1e9)
    hf = "transformers" in engines

    def val(e, k):
        return b.get(f"{e}:{k}")

    rows = [  # label, minibloom value, transformers value, unit, higher is better
        ("batch-1 decode (64 after 16)", NEW / val("minibloom", "decode1"),
         NEW / val("transformers", "decode1") if hf else None, "tok/s", True),
        ("512-token forward, all logits", val("minibloom", "forward_all"), val("transformers", "forward_all"), "s",
         False),
        ("time to first token, 512 prompt", val("minibloom", "ttft"), val("transformers", "ttft"), "s", False),
        (f"batch-{BATCH} decode throughput", BATCH * NEW / val("minibloom", "decode8"),
         BATCH * NEW / val("transformers", "decode8") if hf else None, "tok/s", True),
        ("cold start to first token", res["cold"]["minibloom"], res["cold"].get("transformers"), "s", False),
        ("load (warm page cache)", res["load"]["minibloom"], res["load"].get("transformers"), "s", False),
        ("peak RSS: load+512 prompt+decode", res["rss"]["minibloom"][0] / 1e9,
         res["rss"]["transformers"][0] / 1e9 if hf else None, "GB", False),
        ("peak RSS: ... + all-logits forward", res["rss"]["minibloom"][1] / 1e9,
         res["rss"]["transformers"][1] / 1e9 if hf else None, "GB", False),
    ]
    print()
    print(f"bloom-560m shape ({res['n_params'] / 1e6:.1f} M params, {res['weight_bytes'] / 1e9:.2f} GB fp32), "
          f"best of {res['rounds']} rounds, {os.cpu_count()} CPUs")
    print(f"measured limits, sustained for ~1 s: sgemv {res['gbps']:.1f} GB/s -> decode roofline {roof_tps:.2f} "
          f"tok/s; sgemm {res['gflops']:.0f} GFLOP/s -> all-logits floor {floor_all:.2f} s, last-logits floor "
          f"{floor_last:.2f} s")
    peak = res.get("gbps_peak")  # the same limits as best single calls (absent from older --json files)
    if peak:
        peak_roof = peak * 1e9 / res["weight_bytes"]
        peak_floor_all = flops_all / (res["gflops_peak"] * 1e9)
        peak_floor_last = flops_last / (res["gflops_peak"] * 1e9)
        print(f"best single calls: sgemv {peak:.1f} GB/s -> {peak_roof:.2f} tok/s; sgemm {res['gflops_peak']:.0f} "
              f"GFLOP/s -> floors {peak_floor_all:.2f} s and {peak_floor_last:.2f} s")
    print()
    print(f"| {'measurement':<36} | {'minibloom':>10} | {'transformers':>12} | {'ratio (mb better if >1)':>23} |")
    print(f"|{'-' * 38}|{'-' * 12}:|{'-' * 14}:|{'-' * 25}:|")
    ratios = {}
    for label, m, t, unit, higher in rows:
        ratio = (m / t if higher else t / m) if t else None
        ratios[label] = ratio
        mv, tv = f"{m:.2f} {unit}", f"{t:.2f} {unit}" if t else "-"
        print(f"| {label:<36} | {mv:>10} | {tv:>12} | {(f'{ratio:.2f}x' if ratio else '-'):>23} |")
    mb_tps = NEW / val("minibloom", "decode1")
    frac_decode = mb_tps / roof_tps
    frac_fwd = floor_all / val("minibloom", "forward_all")
    ttft_over_floor = val("minibloom", "ttft") / floor_last
    rss_ratio = res["rss"]["minibloom"][0] / res["weight_bytes"]
    print()
    print(f"minibloom decode = {frac_decode:.1%} of the sgemv roofline; all-logits forward = {frac_fwd:.1%} of the "
          f"sgemm floor; time to first token = {ttft_over_floor:.2f}x the last-logits floor; "
          f"session peak RSS = {rss_ratio:.2f}x the fp32 weight bytes")
    if peak:
        print(f"against the best single calls instead: decode {mb_tps / peak_roof:.1%}, all-logits forward "
              f"{peak_floor_all / val('minibloom', 'forward_all'):.1%}, time to first token "
              f"{val('minibloom', 'ttft') / peak_floor_last:.2f}x")
    if "minibloom:products_decode1" in b:
        print(decode_split(val("minibloom", "decode1"), b["minibloom:products_decode1"], 1, res["weight_bytes"],
                           res["gbps"]))
        print(decode_split(val("minibloom", "decode8"), b[f"minibloom:products_decode{BATCH}"], BATCH,
                           res["weight_bytes"], res["gbps"]))
    if "minibloom:products_last" in b:
        print(products_breakdown(val("minibloom", "ttft"), b["minibloom:products_last"], floor_last,
                                 val("minibloom", "forward_all"), b["minibloom:products_all"], floor_all))
    print()

    def vs_hf(row: int, limit: float, inverse: bool):
        """(ok, shown) for a target relative to transformers; (None, "-") when transformers was skipped."""
        ratio = ratios[rows[row][0]]
        if not ratio:
            return None, "-"
        value = 1 / ratio if inverse else ratio
        return (value <= limit if inverse else value >= limit), f"{value:.2f}x"

    targets = [
        ("decode >= 90% of roofline", frac_decode >= 0.90, f"{frac_decode:.1%}"),
        ("decode >= 1.2x transformers", *vs_hf(0, 1.2, False)),
        ("all-logits forward >= 90% of sgemm floor", frac_fwd >= 0.90, f"{frac_fwd:.1%}"),
        ("all-logits forward >= 1.15x transformers", *vs_hf(1, 1.15, False)),
        ("TTFT <= 1.2x last-logits floor", ttft_over_floor <= 1.2, f"{ttft_over_floor:.2f}x"),
        ("TTFT <= 0.85x transformers", *vs_hf(2, 0.85, True)),
        ("cold start <= 0.5x transformers", *vs_hf(4, 0.5, True)),
        ("session peak RSS <= 1.25x fp32 weights", rss_ratio <= 1.25, f"{rss_ratio:.2f}x"),
        ("load <= 3 s (warm page cache)", res["load"]["minibloom"] <= 3.0, f"{res['load']['minibloom']:.2f} s"),
    ]
    print("| target | measured | |")
    print("|---|---:|---|")
    for name, ok, shown in targets:
        print(f"| {name} | {shown} | {'not measured' if ok is None else 'PASS' if ok else 'FAIL'} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default=DEFAULT_DIR, help="where the random checkpoint is (built there if missing)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of the in-process measurements (best is kept)")
    ap.add_argument("--cold-rounds", type=int, default=3, help="fresh-process cold starts per engine")
    ap.add_argument("--skip-transformers", action="store_true", help="measure minibloom and the limits only")
    ap.add_argument("--json", help="also write the raw figures to this file")
    ap.add_argument("--worker", choices=["minibloom", "transformers"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        try:
            worker(args.worker, args.dir)
        except (ImportError, MemoryError, OSError, ValueError) as e:  # one line for the parent to point at
            print(f"{args.worker} worker: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            return 1
        return 0
    if os.environ.get("OPENBLAS_CORETYPE"):
        print(f"note: OPENBLAS_CORETYPE={os.environ['OPENBLAS_CORETYPE']} is set; it can pick a slower kernel "
              "(see the README's Performance section)", flush=True)
    res = run(args.dir, args.rounds, args.cold_rounds, args.skip_transformers)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0

