"""Training throughput: minibloom's NumPy training step against torch's on the same model and batch, in one run.

    python benchmarks/train_bench.py [--rounds 3] [--steps 3] [--threads 2]

The model is the default model's shape (4 layers, hidden 256, 8 heads, 2048 embedding rows), initialised once and
copied into both; the batch is 16 windows of 256 tokens. One step is the whole of training's inner loop: forward,
loss, backward, global-norm clipping at 1.0 and an AdamW update (betas 0.9/0.95, weight decay 0.1 on matrices).
torch runs transformers' ``BloomForCausalLM`` (eager attention, dropout 0) with ``torch.optim.AdamW`` on the same
number of threads; its bf16-autocast step (the recipe the first default model was trained with) is shown too.
Rounds alternate the engines so that a slower machine moment hits both; the best round of each is reported, and
the ratio is minibloom's tokens/s over torch float32's.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=3, help="timed steps per round")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--ctx", type=int, default=256)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    from threadpoolctl import threadpool_limits
    import torch
    import transformers

    from minibloom import training as T
    from minibloom.backend import reuse_freed_memory
    from minibloom.bloom import Bloom, hf_names
    from minibloom.config import BloomConfig
    from minibloom.optim import AdamW

    torch.set_num_threads(args.threads)
    threadpool_limits(args.threads)
    reuse_freed_memory()  # what minibloom.train does
    cfg = BloomConfig(vocab_size=2048, hidden_size=256, n_layer=4, n_head=8)
    params = T.new_params(cfg, 2048, 0.02, np.random.default_rng(0), "float32")
    model = Bloom(cfg, params, "float32")
    opt = AdamW(hf_names(model.params), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    x = np.random.default_rng(1).integers(0, 2000, (args.batch, args.ctx))
    batch = [(x, np.ones_like(x), x)]

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

    def minibloom_step():
        T.train_step(model, opt, batch, 1e-3, grad_clip=1.0)

    def torch_step(bf16: bool = False):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = hf(input_ids=tx, labels=tx).loss
        topt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        topt.step()

    engines = {"minibloom float32": minibloom_step, "torch float32": torch_step,
               "torch bf16 autocast": lambda: torch_step(True)}
    best = {name: float("inf") for name in engines}
    for _ in range(args.rounds):
        for name, f in engines.items():
            f()  # warm: first-touch memory, lazy inits
            t = time.perf_counter()
            for _ in range(args.steps):
                f()
            best[name] = min(best[name], (time.perf_counter() - t) / args.steps)
    tokens = args.batch * args.ctx
    res = {name: {"s_per_step": s, "tokens_per_s": tokens / s} for name, s in best.items()}
    res["ratio_vs_torch_float32"] = best["torch float32"] / best["minibloom float32"]
    res["setup"] = {"batch": args.batch, "ctx": args.ctx, "threads": args.threads, "torch": torch.__version__,
                    "transformers": transformers.__version__, "numpy": np.__version__}
    if args.json:
        print(json.dumps(res))
        return 0
    print(f"training step, default-model shape, batch {args.batch} x {args.ctx} tokens, {args.threads} threads "
          f"(best of {args.rounds} rounds of {args.steps} steps)")
    for name in engines:
        print(f"  {name:<22} {best[name]:7.3f} s/step  {tokens / best[name]:9,.0f} tokens/s")
    print(f"minibloom / torch float32 throughput: {res['ratio_vs_torch_float32']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
