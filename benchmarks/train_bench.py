"""Training throughput: minibloom's NumPy training step against torch's on the same model and batch, in one run.

    python benchmarks/train_bench.py [--rounds 3] [--steps 3] [--threads 2]

The model is the default model's shape (4 layers, hidden 256, 8 heads, 2048 embedding rows), initialised once and
copied into both; the batch is 16 windows of 256 tokens. One step is the whole of training's inner loop: forward,
loss, backward, global-norm clipping at 1.0 and an AdamW update (betas 0.9/0.95, weight decay 0.1 on matrices).
torch runs transformers' ``BloomForCausalLM`` (eager attention, dropout 0) with ``torch.optim.AdamW`` on the same
number of threads; its bf16-autocast step (the recipe the first default model was trained with) is shown too.
Each engine runs in a process of its own (torch's OpenMP threads spin after each parallel region and would slow
whatever runs next in the same process); rounds alternate the engines so that a slower machine moment hits both; the
best round of each is reported, and the ratio is minibloom's tokens/s over torch float32's.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import numpy as np


ENGINES = ("minibloom float32", "torch float32", "torch bf16 autocast")


def measure(engine: str, steps: int, threads: int, batch: int, ctx: int) -> float:
    """Seconds per training step of ``engine`` (after one warm-up step), in this process."""
    from threadpoolctl import threadpool_limits

    from minibloom import training as T
    from minibloom.bloom import Bloom, hf_names
    from minibloom.config import BloomConfig

    threadpool_limits(threads)
    cfg = BloomConfig(vocab_size=2048, hidden_size=256, n_layer=4, n_head=8)
    params = T.new_params(cfg, 2048, 0.02, np.random.default_rng(0), "float32")
    x = np.random.default_rng(1).integers(0, 2000, (batch, ctx))
    if engine == "minibloom float32":
        from minibloom.backend import reuse_freed_memory
        from minibloom.training.optim import AdamW

        reuse_freed_memory()  # what minibloom.train does
        model = Bloom(cfg, params, "float32")
        opt = AdamW(hf_names(model.params), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)

        def step():
            T.train_step(model, opt, [(x, np.ones_like(x), x)], 1e-3, grad_clip=1.0)
    else:
        import torch
        import transformers

        torch.set_num_threads(threads)
        hcfg = transformers.BloomConfig(vocab_size=2048, hidden_size=256, n_layer=4, n_head=8, hidden_dropout=0.0,
                                        attention_dropout=0.0, attn_implementation="eager")
        hf = transformers.BloomForCausalLM(hcfg)
        with torch.no_grad():
            for name, p_ in hf.named_parameters():
                p_.copy_(torch.from_numpy(np.asarray(hf_names(params)[name])))
        hf.train()
        named = dict(hf.named_parameters())
        topt = torch.optim.AdamW([{"params": [p_ for p_ in named.values() if p_.ndim >= 2], "weight_decay": 0.1},
                                  {"params": [p_ for p_ in named.values() if p_.ndim < 2], "weight_decay": 0.0}],
                                 lr=1e-3, betas=(0.9, 0.95))
        tx = torch.as_tensor(x)
        bf16 = engine == "torch bf16 autocast"

        def step():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = hf(input_ids=tx, labels=tx).loss
            topt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
            topt.step()
    step()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t) / steps


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=3, help="timed steps per round")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--ctx", type=int, default=256)
    p.add_argument("--json", action="store_true")
    p.add_argument("--engine", choices=ENGINES, help=argparse.SUPPRESS)  # one measurement, in this process
    args = p.parse_args(argv)
    if args.engine:
        print(json.dumps(measure(args.engine, args.steps, args.threads, args.batch, args.ctx)))
        return 0
    best = {name: float("inf") for name in ENGINES}
    for _ in range(args.rounds):
        for name in ENGINES:
            out = subprocess.run([sys.executable, __file__, "--engine", name, "--steps", str(args.steps), "--threads",
                                  str(args.threads), "--batch", str(args.batch), "--ctx", str(args.ctx)],
                                 capture_output=True, text=True, check=True).stdout
            best[name] = min(best[name], json.loads(out.strip().splitlines()[-1]))
    import torch
    import transformers

    tokens = args.batch * args.ctx
    res = {name: {"s_per_step": s, "tokens_per_s": tokens / s} for name, s in best.items()}
    res["ratio_vs_torch_float32"] = best["torch float32"] / best["minibloom float32"]
    res["setup"] = {"batch": args.batch, "ctx": args.ctx, "threads": args.threads, "torch": torch.__version__,
                    "transformers": transformers.__version__, "numpy": np.__version__}
    if args.json:
        print(json.dumps(res))
        return 0
    print(f"training step, default-model shape, batch {args.batch} x {args.ctx} tokens, {args.threads} threads "
          f"(best of {args.rounds} rounds of {args.steps} steps, each engine in its own process)")
    for name in ENGINES:
        print(f"  {name:<22} {best[name]:7.3f} s/step  {tokens / best[name]:9,.0f} tokens/s")
    print(f"minibloom / torch float32 throughput: {res['ratio_vs_torch_float32']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
