"""Train minibloom's built-in default model: a small BLOOM (same architecture as bigscience/bloom) on Tiny Shakespeare.

Development script, not part of the package: it imports torch, transformers and tokenizers.

    python scripts/train_default.py --out weights/default                 # the shipped model (about 20 min, 2 cores)
    python scripts/train_default.py --out /tmp/probe --steps 20 --no-save  # measure steps/s first

The same script trains the oracle-calibration model weights/calib-12h (a second trained BLOOM whose 12 heads and
post-LayerNorm residuals exercise what the default model cannot: ALiBi slopes for a head count that is not a power of
two, ``apply_residual_connection_post_layernorm``), reusing the default model's tokenizer; its exact command is in
weights/calib-12h/README.md:

    python scripts/train_default.py --out weights/calib-12h --tokenizer weights/default --heads 12 --post-ln \
        --calibration ...

What it does, in order:

1. Byte-level BPE tokenizer with the structure of bigscience/bloom's tokenizer.json:
   Split(" ?[^(\\s|[.,!?…。，、।۔،])]+", isolated) then ByteLevel(add_prefix_space=False, use_regex=False), no normalizer,
   ByteLevel decoder, special tokens <unk> <s> </s> <pad> = ids 0..3, no BOS/EOS added. It is trained on the
   training split only, and its initial alphabet holds all 256 byte characters, so any text encodes. With
   ``--tokenizer PATH`` an existing tokenizer is loaded instead (and its files are copied verbatim into ``--out``).
2. Split BY CHARACTERS: the first 90% of the corpus trains, the last 10% is held out for validation.
3. ``BloomForCausalLM`` trained from a seed with AdamW, linear warmup then cosine decay, random windows of
   ``--ctx`` tokens. The embedding has ``--vocab-rows`` rows (a multiple of 128, like BLOOM's 250680 -> 250880); ids from
   the tokenizer's size up to that are never produced.
4. Validation: mean cross entropy of every held-out token after the first, predicted from up to ``--ctx`` tokens
   before it (consecutive windows; the context restarts every ``--ctx`` tokens), measured on the weights AS SAVED
   (rounded to fp16), reported per token (loss, perplexity) and as bits per character (total nats / ln 2 /
   held-out characters), which compares across tokenizers.
5. Saves config.json, model.safetensors (fp16), tokenizer.json, tokenizer_config.json, generation_config.json,
   metrics.json and README.md (model card) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import time

import numpy as np
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]  # ids 0, 1, 2, 3 as in BLOOM
BLOOM_SPLIT = " ?[^(\\s|[.,!?…。，、।۔،])]+"  # BLOOM's Split regex, verbatim (Oniguruma nested class)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="data/tinyshakespeare.txt")
    p.add_argument("--out", default="weights/default")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--vocab", type=int, default=2000, help="BPE vocabulary size (tokenizer)")
    p.add_argument("--tokenizer", default=None,
                   help="reuse this tokenizer (a checkpoint folder holding tokenizer.json, or the file itself) instead "
                        "of training one; --vocab is then unused")
    p.add_argument("--vocab-rows", type=int, default=2048, help="embedding rows (>= --vocab, multiple of 128)")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--post-ln", action="store_true",
                   help="apply_residual_connection_post_layernorm=True (residuals taken after the LayerNorms)")
    p.add_argument("--ctx", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=458)
    p.add_argument("--budget-min", type=float, default=0.0,
                   help="choose --steps after warmup so training takes about this many minutes (0: use --steps)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--dropout", type=float, default=0.1, help="hidden and attention dropout while training")
    p.add_argument("--no-bf16", action="store_true", help="train in plain fp32 (default: bf16 autocast, fp32 weights)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--eval-every", type=int, default=0, help="quick validation every N steps (0: only at the end)")
    p.add_argument("--no-save", action="store_true", help="train and report only (for timing probes)")
    p.add_argument("--calibration", action="store_true",
                   help="write the model card of an oracle-calibration model instead of the default model's")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------------- tokenizer

def bloom_style_tokenizer(vocab_size: int) -> tuple[Tokenizer, trainers.BpeTrainer]:
    """An untrained BPE tokenizer with BLOOM's pre-tokenizer and decoder, and its trainer."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(BLOOM_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    return tok, trainer


def train_tokenizer(text: str, vocab_size: int) -> Tokenizer:
    tok, trainer = bloom_style_tokenizer(vocab_size)
    tok.train_from_iterator([text], trainer=trainer)
    for i, s in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(s) == i, f"special token {s} got id {tok.token_to_id(s)}, expected {i}"
    return tok


def tokenizer_file(path: str) -> str:
    """The tokenizer.json that ``--tokenizer`` names: the path itself, or ``tokenizer.json`` in that folder."""
    return os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path


def load_tokenizer(path: str) -> Tokenizer:
    """An existing BLOOM-style tokenizer (``--tokenizer``); its special tokens must have BLOOM's ids 0..3."""
    tok = Tokenizer.from_file(tokenizer_file(path))
    for i, s in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(s) == i, f"{path}: special token {s} has id {tok.token_to_id(s)}, expected {i}"
    return tok


def encode(tok: Tokenizer, text: str) -> np.ndarray:
    """Token ids of ``text``, encoded in line-aligned chunks (BPE never merges across a newline pre-token anyway)."""
    lines = text.splitlines(keepends=True)
    chunks = ["".join(lines[i:i + 2000]) for i in range(0, len(lines), 2000)]
    ids = [i for enc in tok.encode_batch(chunks) for i in enc.ids]
    return np.asarray(ids, dtype=np.int64)


# ---------------------------------------------------------------------------------------------------- model

def bloom_config(args, tokenizer_size: int):
    from transformers import BloomConfig

    assert args.vocab_rows >= tokenizer_size, "--vocab-rows must cover the tokenizer"
    return BloomConfig(
        vocab_size=args.vocab_rows, hidden_size=args.hidden, n_layer=args.layers, n_head=args.heads,
        layer_norm_epsilon=1e-5, initializer_range=0.02, use_cache=True,
        bos_token_id=1, eos_token_id=2, pad_token_id=3, unk_token_id=0,
        apply_residual_connection_post_layernorm=args.post_ln, hidden_dropout=args.dropout,
        attention_dropout=args.dropout, pretraining_tp=1, slow_but_exact=False, tie_word_embeddings=True,
        attn_implementation="eager")


def lr_at(step: int, args) -> float:
    """Linear warmup to ``lr`` then cosine decay to ``lr * min_lr_ratio`` at ``steps``."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    t = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


@torch.no_grad()
def evaluate(model, ids: np.ndarray, ctx: int, batch: int = 16, limit: int | None = None) -> tuple[float, int]:
    """Total cross entropy (nats) and count of predicted tokens: ``ids[1:]``, each scored exactly once.

    ``ids`` is cut into consecutive windows ``ids[s : s + ctx + 1]`` (s = 0, ctx, 2 ctx, ...): each window reads its
    first ``ctx`` tokens and predicts the ``ctx`` tokens after them, so context restarts every ``ctx`` tokens."""
    was_training = model.training
    model.eval()
    windows = [ids[s:s + ctx + 1] for s in range(0, len(ids) - 1, ctx)][:limit]
    total, count = 0.0, 0
    full = [w for w in windows if len(w) == ctx + 1]
    groups = [full[i:i + batch] for i in range(0, len(full), batch)] + [[w] for w in windows if len(w) != ctx + 1]
    for g in groups:
        x = torch.as_tensor(np.stack(g))
        logits = model(input_ids=x[:, :-1]).logits.float()
        total += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                                         reduction="sum"))
        count += x[:, 1:].numel()
    model.train(was_training)
    return total, count


def train(model, train_ids: np.ndarray, val_ids: np.ndarray, args) -> dict:
    """AdamW on random ``ctx``-token windows of ``train_ids``; returns the training figures.

    With ``--budget-min``, the number of steps is chosen at the end of warmup from the measured speed so that training
    takes about that long; warmup does not depend on the total, so ``--steps <that number>`` reproduces the run."""
    rng = np.random.default_rng(args.seed)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    model.train()
    t0 = t5 = time.time()
    t_eval = 0.0
    running = None
    step = 0
    while step < args.steps:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args)
        starts = rng.integers(0, len(train_ids) - args.ctx - 1, size=args.batch)
        x = torch.as_tensor(np.stack([train_ids[s:s + args.ctx] for s in starts]))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=not args.no_bf16):
            out = model(input_ids=x, labels=x)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss = float(out.loss.detach())
        running = loss if running is None else 0.95 * running + 0.05 * loss
        step += 1
        if step == 5:
            t5 = time.time()
        if args.budget_min and step == args.warmup:
            rate = (step - 5) / (time.time() - t5)
            args.steps = max(args.warmup + 1, int(rate * (args.budget_min * 60 - (time.time() - t0)))
                             + args.warmup)
            print(f"measured {rate:.3f} steps/s over steps 6..{step}: training for {args.steps} steps "
                  f"(reproduce with --steps {args.steps})", flush=True)
        if step % 50 == 0 or step == 1:
            el = time.time() - t0
            print(f"step {step}/{args.steps}  loss {running:.3f}  lr {lr_at(step - 1, args):.2e}  "
                  f"{step / el:.3f} steps/s  {el / 60:.1f} min", flush=True)
        if args.eval_every and step % args.eval_every == 0:
            te = time.time()
            nats, n = evaluate(model, val_ids, args.ctx, limit=32)
            t_eval += time.time() - te
            print(f"  val loss (first 32 windows) {nats / n:.3f}", flush=True)
    wall = time.time() - t0
    return {"steps": args.steps, "train_wall_s": round(wall, 1), "steps_per_s": round(args.steps / (wall - t_eval), 4),
            "tokens_seen": int(args.steps * args.batch * args.ctx), "final_train_loss_ema": round(running, 4)}


# ---------------------------------------------------------------------------------------------------- saving

def tokenizer_config(ctx: int) -> dict:
    added = {str(i): {"content": s, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                      "special": True} for i, s in enumerate(SPECIAL_TOKENS)}
    return {"tokenizer_class": "BloomTokenizerFast", "add_prefix_space": False, "clean_up_tokenization_spaces": False,
            "padding_side": "left", "unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>",
            "pad_token": "<pad>", "model_max_length": 1_000_000, "added_tokens_decoder": added}


def generation_config() -> dict:
    return {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3, "do_sample": True, "temperature": 0.8,
            "top_k": 40, "top_p": 1.0, "max_new_tokens": 200}


def reproduce_command(args) -> str:
    """The command line that repeats this run exactly (all hyperparameters spelled out, fixed step count)."""
    tok = f"--tokenizer {args.tokenizer}" if args.tokenizer else f"--vocab {args.vocab}"
    return (f"python scripts/train_default.py --out {args.out} --seed {args.seed} {tok} "
            f"--vocab-rows {args.vocab_rows} --hidden {args.hidden} --layers {args.layers} --heads {args.heads} "
            f"--ctx {args.ctx} --batch {args.batch} --steps {args.steps} --lr {args.lr} --warmup {args.warmup} "
            f"--min-lr-ratio {args.min_lr_ratio} --weight-decay {args.weight_decay} --dropout {args.dropout} "
            f"--threads {args.threads}" + (" --post-ln" if args.post_ln else "")
            + (" --no-bf16" if args.no_bf16 else "") + (" --calibration" if args.calibration else ""))


def card_intro(m: dict, args) -> str:
    """The model card's title and first paragraph: the default model's, or (``--calibration``) a calibration model's."""
    shape = (f"{m['n_layer']} layers, hidden size {m['hidden_size']}, {m['n_head']} heads (head dim "
             f"{m['hidden_size'] // m['n_head']})" if args.calibration else
             f"{m['n_layer']} layers, hidden size {m['hidden_size']}, {m['n_head']} heads")
    residual = ("`apply_residual_connection_post_layernorm=True` (each residual is taken after the block's LayerNorm, "
                "not before it)" if args.post_ln else "pre-LayerNorm residuals")
    if not args.calibration:
        return f"""# minibloom default model: a small BLOOM trained on Tiny Shakespeare

The model `minibloom.load()` and `minibloom generate` use when no `--model` is given. It is a `BloomForCausalLM`
(the architecture of bigscience/bloom: ALiBi, embedding LayerNorm, tied LM head, fused QKV) scaled down to
{shape}: **{m['n_params']:,} parameters**, stored in fp16
(`model.safetensors`, {m['safetensors_bytes']:,} bytes). It writes Shakespeare-flavoured English, nothing more: a teaching
and testing model, not a useful language model.
"""
    name = os.path.basename(os.path.normpath(args.out))
    return f"""# minibloom calibration model `{name}`: a second small BLOOM trained on Tiny Shakespeare

**A calibration model for minibloom's oracle, not a language model to use.** Random weights hide activation bugs and
the shipped default model (`weights/default`: 8 heads, pre-LayerNorm residuals) hides two port bugs: ALiBi slopes
computed with the power-of-two formula, and an ignored `apply_residual_connection_post_layernorm`. This checkpoint is
trained (its activations look like a real model's), has {m['n_head']} heads (not a power of two) and
{residual}.
It is a `BloomForCausalLM` (ALiBi, embedding LayerNorm, tied LM head, fused QKV) with
{shape}: **{m['n_params']:,} parameters**, stored in fp16
(`model.safetensors`, {m['safetensors_bytes']:,} bytes). It shares the default model's tokenizer, so the same token ids
feed both.
"""


def card_tokenizer(m: dict, args) -> str:
    """The model card's tokenizer bullet."""
    if args.tokenizer:
        unused = f"{m['tokenizer_vocab']}..{m['vocab_rows'] - 1}"
        return f"""- **Tokenizer**: the one in `{args.tokenizer}`, its files copied verbatim: {m['tokenizer_vocab']}
  entries, special tokens `<unk>` `<s>` `</s>` `<pad>` = 0..3, no BOS/EOS added. The embedding has {m['vocab_rows']}
  rows: ids {unused} are never produced.
"""
    return f"""- **Tokenizer**: byte-level BPE trained on the training split with BLOOM's pre-tokenizer (Split regex + ByteLevel, no
  normalizer), {m['tokenizer_vocab']} entries; special tokens `<unk>` `<s>` `</s>` `<pad>` = 0..3; no BOS/EOS added. The
  embedding has {m['vocab_rows']} rows, like BLOOM pads 250680 to 250880: ids {m['tokenizer_vocab']}..{m['vocab_rows'] - 1} are never produced.
"""


def model_card(m: dict, args) -> str:
    return card_intro(m, args) + f"""
- **Data**: Tiny Shakespeare (`data/tinyshakespeare.txt`, {m['corpus_chars']:,} characters, public domain).
  Split by characters: the first 90% trains, the last 10% ({m['val_chars']:,} characters, {m['val_tokens']:,} tokens) is held out.
""" + card_tokenizer(m, args) + f"""- **Training**: seed {args.seed}, AdamW (betas 0.9/0.95, weight decay {args.weight_decay}), lr {args.lr} with {args.warmup} warmup
  steps then cosine decay to {args.lr * args.min_lr_ratio:g}, batch {args.batch} x {args.ctx} tokens, dropout {args.dropout},
  bf16 autocast (fp32 weights) {'off' if args.no_bf16 else 'on'}, {m['steps']} steps = {m['tokens_seen']:,} tokens ({m['epochs']:.1f} passes over the training split), {m['train_wall_s'] / 60:.1f} min
  on {args.threads} CPU thread{'s' if args.threads > 1 else ''} (torch {m['torch']}, transformers {m['transformers']}).
- **Validation** (held-out 10%, consecutive {args.ctx}-token windows, fp16 weights as saved):
  loss **{m['val_loss']:.4f}** nats/token, perplexity **{m['val_ppl']:.2f}** per token, **{m['val_bpc']:.4f} bits per character**.
  Training split, same measure: loss {m['train_loss']:.4f} ({m['train_bpc']:.4f} bpc).

Reproduce (about {m['train_wall_s'] / 60:.0f} minutes on 2 cores, {args.threads} thread{'s' if args.threads > 1 else ''}):

    {reproduce_command(args)}

Figures are in `metrics.json`. The seed fixes the initialisation and every batch; the same torch build and thread
count should give the same weights, other machines may differ slightly in floating point.
"""


def save_all(model, tok: Tokenizer, out: str, metrics: dict, args) -> None:
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(out)  # fp16 already: see main()
    cfg_path = os.path.join(out, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg.pop("attn_implementation", None)
    cfg["hidden_dropout"] = cfg["attention_dropout"] = 0.0  # dropout was for training only
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")
    reused = os.path.dirname(tokenizer_file(args.tokenizer)) if args.tokenizer else None
    if reused is not None:  # --tokenizer: the very same files, byte for byte
        shutil.copyfile(tokenizer_file(args.tokenizer), os.path.join(out, "tokenizer.json"))
    else:
        tok.save(os.path.join(out, "tokenizer.json"))
    files = [("generation_config.json", generation_config())]
    if reused is not None and os.path.isfile(os.path.join(reused, "tokenizer_config.json")):
        shutil.copyfile(os.path.join(reused, "tokenizer_config.json"), os.path.join(out, "tokenizer_config.json"))
    else:
        files.append(("tokenizer_config.json", tokenizer_config(args.ctx)))
    for name, obj in files:
        with open(os.path.join(out, name), "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
    metrics["safetensors_bytes"] = os.path.getsize(os.path.join(out, "model.safetensors"))
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
        f.write("\n")
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write(model_card(metrics, args))


def main(argv=None) -> int:
    args = parse_args(argv)
    import transformers
    from transformers import BloomForCausalLM

    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)

    with open(args.data, encoding="utf-8") as f:
        text = f.read()
    cut = int(len(text) * 0.9)
    train_text, val_text = text[:cut], text[cut:]
    tok = load_tokenizer(args.tokenizer) if args.tokenizer else train_tokenizer(train_text, args.vocab)
    train_ids, val_ids = encode(tok, train_text), encode(tok, val_text)
    assert tok.decode(val_ids.tolist()) == val_text, "tokenizer does not round-trip the validation text"
    print(f"tokenizer: {tok.get_vocab_size()} entries; train {len(train_text):,} chars -> {len(train_ids):,} tokens "
          f"({len(train_text) / len(train_ids):.2f} chars/token); val {len(val_text):,} chars -> {len(val_ids):,} tokens",
          flush=True)

    model = BloomForCausalLM(bloom_config(args, tok.get_vocab_size()))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} parameters", flush=True)
    stats = train(model, train_ids, val_ids, args)

    model = model.half().float()  # evaluate the weights exactly as they will be saved (fp16)
    model.eval()
    t0 = time.time()
    nats, n = evaluate(model, val_ids, args.ctx)
    tr_nats, tr_n = evaluate(model, train_ids[-len(val_ids):], args.ctx)  # a same-sized slice of the training split
    tr_slice = train_ids[-len(val_ids):]
    tr_chars = len(tok.decode(tr_slice.tolist()))
    m = {
        "seed": args.seed, "threads": args.threads, "torch": torch.__version__, "transformers": transformers.__version__,
        "n_params": n_params, "n_layer": args.layers, "hidden_size": args.hidden, "n_head": args.heads,
        "apply_residual_connection_post_layernorm": args.post_ln, "tokenizer_from": args.tokenizer,
        "tokenizer_vocab": tok.get_vocab_size(), "vocab_rows": args.vocab_rows, "ctx": args.ctx, "batch": args.batch,
        "corpus_chars": len(text), "split": "by characters: first 90% train, last 10% validation",
        "train_chars": len(train_text), "train_tokens": int(len(train_ids)),
        "val_chars": len(val_text), "val_tokens": int(len(val_ids)), "val_scored_tokens": n,
        "command": reproduce_command(args), **stats, "epochs": stats["tokens_seen"] / len(train_ids),
        "val_loss": nats / n, "val_ppl": math.exp(nats / n),
        # bits per character: the held-out split's total cross entropy in bits over its characters (all tokens but
        # the very first are scored)
        "val_bpc": nats / math.log(2) / len(val_text),
        "train_loss": tr_nats / tr_n, "train_bpc": tr_nats / math.log(2) / tr_chars,
        "eval_wall_s": round(time.time() - t0, 1),
    }
    print(json.dumps({k: v for k, v in m.items()}, indent=1), flush=True)
    if not args.no_save:
        save_all(model.half(), tok, args.out, m, args)
        print(f"saved to {args.out}: " + ", ".join(f"{f} {os.path.getsize(os.path.join(args.out, f)):,} B"
                                                    for f in sorted(os.listdir(args.out))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
