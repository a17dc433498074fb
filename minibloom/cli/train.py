"""``minibloom train``: train a new BLOOM, or fine-tune a checkpoint, with minibloom's NumPy backward pass."""

from __future__ import annotations

import argparse
import json
import textwrap

from ..errors import MinibloomError

DESCRIPTION = ("Train a BLOOM with nothing but NumPy (minibloom.backward + AdamW): a new model on a text file "
               "(default: the bundled Tiny Shakespeare; the last --val-fraction of it held out), or, with --model, "
               "fine-tune a "
               "checkpoint (any format minibloom reads, dequantized). With --chat TEMPLATE the data is JSON Lines "
               "conversations ({\"messages\": [{\"role\", \"content\"}, ...]} per line) and only the assistant replies "
               "are scored. Writes transformers-loadable checkpoints (config.json + model.safetensors) to --out, "
               "plus the trainer state that --resume continues from exactly.")
EXAMPLES = """examples:
  minibloom train --out runs/tiny --layers 2 --hidden 64 --heads 4 --ctx 64 --steps 200
  minibloom train --out weights/retrained --save-dtype float16      # the default model's recipe (minutes)
  minibloom train --model weights/default --chat play --data dialogue.jsonl --out runs/chat --steps 50 --lr 3e-4
  minibloom train --resume runs/tiny/checkpoint-100 --out runs/tiny
"""


def add_parser(sub) -> None:
    from ..training import TrainConfig

    d = TrainConfig()
    p = sub.add_parser("train", help="train a new BLOOM or fine-tune one, in NumPy",
                       description=textwrap.fill(DESCRIPTION, 100), epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", metavar="FILE", help="UTF-8 text (or JSON Lines conversations with --chat); default: "
                                                  "the bundled Tiny Shakespeare")
    p.add_argument("--model", "-m", metavar="M", help="fine-tune this checkpoint (default: train a new model)")
    p.add_argument("--out", "-o", metavar="DIR", help="where the trained model and its checkpoints go")
    p.add_argument("--resume", metavar="DIR", help="continue the run saved in this checkpoint")
    p.add_argument("--chat", metavar="TEMPLATE", help="fine-tune on conversations rendered with this chat template, "
                                                      "loss on the assistant replies only")
    g = p.add_argument_group("a new model")
    g.add_argument("--tokenizer", metavar="PATH", help="use this tokenizer (a checkpoint folder or tokenizer.json) "
                                                       "instead of training a byte-level BPE")
    g.add_argument("--vocab", type=int, default=d.vocab, help=f"BPE vocabulary to train (default {d.vocab})")
    g.add_argument("--vocab-rows", type=int, default=d.vocab_rows,
                   help=f"embedding rows, >= the vocabulary (default {d.vocab_rows})")
    g.add_argument("--hidden", type=int, default=d.hidden, help=f"hidden size (default {d.hidden})")
    g.add_argument("--layers", type=int, default=d.layers, help=f"blocks (default {d.layers})")
    g.add_argument("--heads", type=int, default=d.heads, help=f"attention heads (default {d.heads})")
    g.add_argument("--post-ln", action="store_true", help="apply_residual_connection_post_layernorm")
    o = p.add_argument_group("optimisation")
    o.add_argument("--steps", type=int, default=None, help=f"optimizer steps (default {d.steps})")
    o.add_argument("--batch", type=int, default=d.batch, help=f"sequences per step (default {d.batch})")
    o.add_argument("--accumulate", type=int, default=d.accumulate,
                   help="micro-batches per step (gradient accumulation; must divide --batch)")
    o.add_argument("--ctx", type=int, default=d.ctx, help=f"tokens per training window (default {d.ctx})")
    o.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate (default {d.lr})")
    o.add_argument("--warmup", type=int, default=d.warmup, help=f"linear warm-up steps (default {d.warmup})")
    o.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio,
                   help=f"cosine decay ends at lr x this (default {d.min_lr_ratio})")
    o.add_argument("--weight-decay", type=float, default=d.weight_decay,
                   help=f"AdamW's decoupled decay of the matrices (default {d.weight_decay})")
    o.add_argument("--beta2", type=float, default=d.betas[1], help=f"AdamW beta2 (default {d.betas[1]})")
    o.add_argument("--grad-clip", type=float, default=d.grad_clip, help="global gradient-norm clip (0: none)")
    o.add_argument("--seed", type=int, default=d.seed, help="initialisation and data order")
    o.add_argument("--dtype", choices=("float32", "float64"), default=d.dtype, help="training dtype")
    r = p.add_argument_group("evaluation and saving")
    r.add_argument("--val-fraction", type=float, default=d.val_fraction, help="held-out share of the data")
    r.add_argument("--eval-every", type=int, default=d.eval_every, help="held-out loss every N steps (0: at the end)")
    r.add_argument("--eval-windows", type=int, default=d.eval_windows, help="held-out windows of a periodic eval")
    r.add_argument("--save-every", type=int, default=d.save_every,
                   help="a checkpoint every N steps, in OUT/checkpoint-N (0: only at the end)")
    r.add_argument("--save-dtype", choices=("float16", "bfloat16", "float32", "float64"), default=None,
                   help="dtype of the stored weights (default: the training dtype)")
    r.add_argument("--json", action="store_true", help="print the final figures as one JSON object")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run, model_required=False)


def run(args) -> int:
    import sys

    from ..training import TrainConfig, json_safe, train

    if not args.out and not args.resume:
        raise MinibloomError("train: give --out DIR (where the model goes)")
    if args.resume and (args.model or args.chat or args.data):
        raise MinibloomError("--resume continues a run with its own model and data; drop --model/--chat/--data")
    cfg = TrainConfig(batch=args.batch, accumulate=args.accumulate, ctx=args.ctx, lr=args.lr, warmup=args.warmup,
                      min_lr_ratio=args.min_lr_ratio, weight_decay=args.weight_decay,
                      betas=(TrainConfig().betas[0], args.beta2), grad_clip=args.grad_clip, seed=args.seed,
                      dtype=args.dtype, val_fraction=args.val_fraction, eval_every=args.eval_every,
                      eval_windows=args.eval_windows, save_every=args.save_every, vocab=args.vocab,
                      vocab_rows=args.vocab_rows, hidden=args.hidden, layers=args.layers, heads=args.heads,
                      post_ln=args.post_ln)
    steps = {} if args.steps is None else {"steps": args.steps}
    log = (lambda msg: print(msg, file=sys.stderr, flush=True))
    res = train(args.data, model=args.model, out=args.out or args.resume, tokenizer=args.tokenizer,
                chat_template=args.chat, config=cfg, resume=args.resume, save_dtype=args.save_dtype,
                progress=not args.no_progress, log=log, **steps)
    m = res.metrics
    if args.json:
        print(json.dumps(json_safe(m), sort_keys=True, allow_nan=False))  # JSON has no NaN: null instead
    else:
        saved = f"; as saved ({args.save_dtype}): perplexity {m['val_ppl_as_saved']:.2f}" \
            if "val_ppl_as_saved" in m else ""
        rate = m["tokens_per_s"] or 0
        print(f"trained {m['steps']} steps in {m['train_wall_s']:.1f} s ({rate:,.0f} tokens/s); held-out "
              f"loss {m['val_loss']:.4f} nats/token, perplexity {m['val_ppl']:.2f} over {m['val_tokens']} tokens"
              f"{saved}; model in {res.out}")
    return 0
