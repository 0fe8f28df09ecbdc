"""Train Llama Scope TopK SAEs and transcoders (§3) on activations made on the fly.

    python train.py                                    # L15R-8x-TopK, embedded SmolLM2, ~10 min on CPU
    python train.py --layer 23 --site A --expansion 32
    python train.py --layer 7,15 --site R,TC --expansion 8,32   # 8 SAEs fed by one LM pass

Reads top to bottom: flags, checks, schedule, data (LM -> per-site buffers), SAEs, the loop, a check
on held-out documents, checkpoints. The last line printed is `saved <path>` for each SAE.
"""
import argparse
import itertools
import json
import math
import os
import sys
import time

import torch

import model
from buffer import ActivationBuffer, fan_out, file_producer, keep_rows, load_activations
from sae import SAE, k_at, lr_at, save_checkpoint

PAPER_STEPS = 800_000_000 // 2048  # the released 8x runs: 390,625 steps of 2048 tokens
DEAD_WINDOW = 100_000  # tokens: a feature that has not fired within this many is counted dead (§4.4)


def die(msg):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def csv(kind):
    return lambda s: [kind(v) for v in s.split(",")]


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    g = p.add_argument_group("what to train (comma lists train every combination from one LM pass)")
    g.add_argument("--model", default=model.EMBEDDED_MODEL,
                   help="Hugging Face id or folder of a Llama-like causal LM (default: embedded SmolLM2)")
    g.add_argument("--layer", type=csv(int), default=[15], help="block index(es), from 0")
    g.add_argument("--site", type=csv(str), default=["R"],
                   help="R resid-post, A attn-out, M mlp-out, TC transcoder (MLP in -> MLP out)")
    g.add_argument("--expansion", type=csv(float), default=[8], help="features per model dim")
    g.add_argument("--n-features", type=csv(int), default=None, help="F; overrides --expansion")
    g.add_argument("--act", choices=["topk", "vanilla"], default="topk",
                   help="TopK (eq. 5) or the ReLU + L1 baseline (§4.2)")
    g.add_argument("--k", type=int, default=50, help="active features per token after annealing")
    g.add_argument("--l1-coef", type=float, default=2e-4, help="Vanilla only: L1 weight")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default=model.EMBEDDED_DATASET,
                   help="Hub dataset (streamed, e.g. cerebras/SlimPajama-627B), a local "
                        ".txt/.jsonl/.json/.parquet file or folder, or the embedded Wikipedia summaries")
    g.add_argument("--context-size", type=int, default=1024, help="tokens per document, BOS included")
    g.add_argument("--activations", default=None,
                   help="train on a safetensors file of `activations` (N, D) [+ `targets`]: no LM")
    g.add_argument("--max-norm-ratio", type=float, default=10.0,
                   help="drop tokens whose norm exceeds this x the median (massive activations); 0 = off")
    g = p.add_argument_group("schedule (§3.3.2; paper values unless noted)")
    g.add_argument("--total-tokens", type=int, default=340_000,
                   help="tokens per SAE (paper: 800M for 8x, 1.6B for 32x); default ~10 min on CPU")
    g.add_argument("--batch-size", type=int, default=2048, help="tokens per step")
    g.add_argument("--lr", type=float, default=8e-4, help="Adam lr (released: 2e-4 for 128x)")
    g.add_argument("--warmup-steps", type=int, default=10_000,
                   help="linear warm-up (released: 5000); short runs scale it, see the printout")
    g.add_argument("--decay-frac", type=float, default=0.2, help="linear decay over this last share")
    g.add_argument("--lr-end", type=float, default=0.0, help="lr after decay (released: 0.01 x lr)")
    g.add_argument("--k-anneal-frac", type=float, default=0.1, help="share of steps annealing K")
    g.add_argument("--k-init", type=int, default=None, help="K at step 0 (default D; released D/2)")
    g.add_argument("--adam-betas", type=float, nargs=2, default=[0.9, 0.999],
                   help="released: 0.9 0.9999")
    g.add_argument("--grad-clip", type=float, default=0.0, help="global grad norm; 0 = off (rel.: 1e-3)")
    g.add_argument("--init-decoder-norm", type=float, default=None,
                   help="decoder column norm at init (default sqrt(2/expansion); released 0.5)")
    g.add_argument("--loss", choices=["mse", "batch-norm-mse"], default="mse",
                   help="batch-norm-mse: the released code's per-token error / centred target norm")
    g = p.add_argument_group("buffer (App. A.1)")
    g.add_argument("--buffer-size", type=int, default=65_536, help="rows per site (released: 500K)")
    g.add_argument("--lm-batch-size", type=int, default=32, help="documents per LM forward")
    g = p.add_argument_group("system")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="LM, buffer and SAE (default: bfloat16 on GPU as in the paper, float32 on CPU)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--out", default="out", help="folder for checkpoints")
    g = p.add_argument_group("logging")
    g.add_argument("--log-every", type=int, default=0, help="steps between log lines; 0 = ~40 lines")
    g.add_argument("--eval-tokens", type=int, default=20_000,
                   help="held-out tokens scored after training; 0 = off")
    args = p.parse_args(argv)
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    return args


def check_args(args):
    """Every cheap check, before any slow work (no model load yet). Returns (d_model, n_layers)."""
    bad_site = [s for s in args.site if s not in model.SITES]
    if bad_site:
        die(f"--site {','.join(bad_site)} is unknown; allowed: {', '.join(model.SITES)}")
    if args.activations:
        if not os.path.isfile(args.activations):
            die(f"--activations {args.activations}: no such file")
        d_model, n_layers, max_pos = None, None, None
    else:
        cfg = model.load_config(args.model)
        d_model, n_layers = cfg["hidden_size"], cfg["num_hidden_layers"]
        max_pos = cfg.get("max_position_embeddings")
        bad = [L for L in args.layer if not 0 <= L < n_layers]
        if bad:
            die(f"--layer {bad[0]} is out of range: {args.model} has {n_layers} layers, "
                f"allowed 0-{n_layers - 1}")
        if max_pos and not 2 <= args.context_size <= max_pos:
            die(f"--context-size {args.context_size} is out of range: allowed 2-{max_pos}")
    sizes = args.n_features or args.expansion
    if min(sizes) <= 0:
        die(f"--{'n-features' if args.n_features else 'expansion'} {min(sizes)} must be positive")
    if args.batch_size < 1 or args.batch_size > args.buffer_size // 2:
        die(f"--batch-size {args.batch_size} must be in 1..{args.buffer_size // 2} "
            f"(half of --buffer-size {args.buffer_size})")
    if args.total_tokens < args.batch_size:
        die(f"--total-tokens {args.total_tokens} is less than one batch ({args.batch_size})")
    if args.k < 1:
        die(f"--k {args.k} must be at least 1")
    for name in ("decay_frac", "k_anneal_frac"):
        if not 0 <= getattr(args, name) <= 1:
            die(f"--{name.replace('_', '-')} {getattr(args, name)} must be in [0, 1]")
    return d_model, n_layers


def schedule(args):
    """Steps of warm-up, decay and K-annealing; a run shorter than the paper's keeps their shares."""
    steps = args.total_tokens // args.batch_size
    warmup = min(args.warmup_steps, round(steps * 0.05)) if steps < PAPER_STEPS else args.warmup_steps
    return dict(steps=steps, warmup=warmup, decay=round(steps * args.decay_frac),
                anneal=round(steps * args.k_anneal_frac))


def run_name(layer, site, n_features, d_model, act):
    return f"L{layer}{site}-{n_features / d_model:g}x-{'TopK' if act == 'topk' else 'Vanilla'}"


# ----------------------------------------------------------------------------- data

def lm_producers(args, lm, tok, sites, split="train", epochs=None):
    """{(layer, site): iterator of (N, C) rows} from one early-stopped LM pass per batch of docs."""
    docs = model.iter_documents(args.dataset, split, seed=args.seed, epochs=epochs)
    batches = model.token_batches(tok, docs, args.context_size, args.lm_batch_size)
    return fan_out(model.activation_producer(lm, tok, sites, batches), sites)


def first_fill(rows, n):
    """At least n rows from a producer, as one tensor (the buffer takes n, keeps the rest)."""
    got, have = [], 0
    for x in rows:
        got.append(x)
        have += len(x)
        if have >= n:
            break
    if have == 0:
        die("the dataset yielded no tokens (every document empty or special tokens only)")
    return torch.cat(got)


def outlier_limits(rows, d_model, ratio):
    """(max_in, max_out) norms: ratio x the median token norm of the first fill; None when off."""
    if ratio <= 0:
        return None
    med = [rows[:, i:i + d_model].float().norm(dim=-1).median().item()
           for i in range(0, rows.shape[1], d_model)]
    return ratio * med[0], ratio * med[-1]


# ----------------------------------------------------------------------------- training

class Run:
    """One SAE with its optimizer and running statistics."""

    def __init__(self, args, key, n_features, d_model, dtype):
        layer, site = key
        expansion = n_features / d_model
        self.key, self.name = key, run_name(layer, site, n_features, d_model, args.act)
        self.sae = SAE(d_model, n_features, args.act, args.k, transcoder=site == "TC",
                       init_decoder_norm=args.init_decoder_norm or math.sqrt(2 / expansion)
                       ).to(args.device, dtype)
        self.opt = torch.optim.Adam(self.sae.parameters(), lr=args.lr, betas=args.adam_betas,
                                    eps=1e-8)
        self.last_fired = torch.zeros(n_features, dtype=torch.long, device=args.device)  # token
        self.log = {}

    def step(self, rows, k, lr, args, tokens):
        d = self.sae.d_model
        x_in, x_out = (rows[:, :d], rows[:, d:]) if self.sae.transcoder else (rows, rows)
        out = self.sae.loss(x_in, x_out, k=min(k, self.sae.n_features), l1_coef=args.l1_coef,
                            batch_norm_mse=args.loss == "batch-norm-mse")
        self.opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.sae.parameters(), args.grad_clip)
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.step()
        self.last_fired[out["fired"]] = tokens
        for key in ("loss", "ev", "l0"):  # averaged over the steps between two log lines
            self.log.setdefault(key, []).append(out[key].item())

    def log_line(self, tokens):
        means = {k: sum(v) / len(v) for k, v in self.log.items()}
        self.log = {}
        dead = (tokens - self.last_fired >= DEAD_WINDOW).float().mean().item()
        return (f"loss {means['loss']:.4f} | ev {means['ev']:.3f} | l0 {means['l0']:.1f} | "
                f"dead {100 * dead:.1f}%")


def train(args):
    d_model, n_layers = check_args(args)
    torch.manual_seed(args.seed)
    dtype = getattr(torch, args.dtype)
    sites = list(dict.fromkeys(itertools.product(args.layer, args.site)))
    sched = schedule(args)
    t0 = time.time()

    # data: one producer of rows per site; the LM runs once per batch of documents for all sites
    if args.activations:
        x, y = load_activations(args.activations)
        if (y is not None) != (sites == [(sites[0][0], "TC")]):
            die(f"--activations {args.activations}: a file with `targets` trains one TC site, "
                f"a file without trains R, A or M (got --site {','.join(args.site)})")
        d_model, lm, tok = x.shape[1], None, None
        producers = {sites[0]: file_producer(x.to(dtype), None if y is None else y.to(dtype),
                                             seed=args.seed)}
    else:
        lm, tok = model.load_model(args.model, args.device, dtype)
        producers = lm_producers(args, lm, tok, sites)
    print(f"loaded in {time.time() - t0:.1f}s; filling {len(sites)} buffer(s) of "
          f"{args.buffer_size:,} rows")

    buffers, limits, runs = {}, {}, {}
    for key in sites:
        first = first_fill(producers[key], args.buffer_size)  # (size, C)
        limits[key] = outlier_limits(first, d_model, args.max_norm_ratio)
        kept = keep_rows(first, limits[key], d_model)
        rest = (keep_rows(r, limits[key], d_model) for r in producers[key])
        buffers[key] = ActivationBuffer(itertools.chain([kept], rest), args.buffer_size,
                                        args.batch_size, seed=args.seed, device=args.device,
                                        limit=sched["steps"] * args.batch_size)
        widths = args.n_features or [round(e * d_model) for e in args.expansion]
        runs[key] = [Run(args, key, n, d_model, dtype) for n in widths]
        for run in runs[key]:  # S_in, S_out from the first fill (§3.3.3)
            run.sae.set_norms_(kept[:, :d_model], kept[:, -d_model:])
        dropped = 1 - len(kept) / len(first)
        print(f"{key}: norms in {runs[key][0].sae.norm_in.item():.2f} out "
              f"{runs[key][0].sae.norm_out.item():.2f}; outlier limit "
              f"{limits[key] and round(limits[key][0], 1)}, dropped {100 * dropped:.3f}% of rows")

    k_init = args.k_init or d_model
    every = args.log_every or max(1, sched["steps"] // 40)
    all_runs = [r for rs in runs.values() for r in rs]
    print(f"{len(all_runs)} SAE(s): {', '.join(r.name for r in all_runs)} | D {d_model} | "
          f"{sched['steps']:,} steps x {args.batch_size} tokens = {sched['steps'] * args.batch_size:,}"
          f" tokens each\nschedule: warm-up {sched['warmup']} steps (asked {args.warmup_steps}; "
          f"capped at 5% of a short run) | K {k_init} -> {args.k} over {sched['anneal']} steps | "
          f"lr {args.lr:g}, decay to {args.lr_end:g} over the last {sched['decay']} steps")

    # the loop: every SAE takes one minibatch from its site's buffer per step
    t_train, tokens = time.time(), 0
    for step in range(sched["steps"]):
        lr = lr_at(step, sched["steps"], args.lr, sched["warmup"], sched["decay"], args.lr_end)
        k = k_at(step, args.k, k_init, sched["anneal"])
        batches = {key: buf.next_batch() for key, buf in buffers.items()}
        if any(b is None for b in batches.values()):
            print(f"data ran out at step {step}")
            break
        tokens += args.batch_size
        for key, rows in batches.items():
            for run in runs[key]:
                run.step(rows, k, lr, args, tokens)
        if (step + 1) % every == 0 or step + 1 == sched["steps"]:
            dt = time.time() - t_train
            eta = dt / (step + 1) * (sched["steps"] - step - 1)
            for run in all_runs:
                print(f"{run.name} step {step + 1}/{sched['steps']} | {run.log_line(tokens)} | "
                      f"k {k} | lr {lr:.1e} | {tokens / dt / 1e3:.1f}k tok/s | eta {eta:.0f}s",
                      flush=True)
    print(f"trained {tokens:,} tokens in {time.time() - t_train:.0f}s")

    heldout = heldout_metrics(args, lm, tok, runs, limits) if lm is not None else {}
    os.makedirs(args.out, exist_ok=True)
    paths = []
    for run in all_runs:
        layer, site = run.key
        hook_in, hook_out = model.hook_names(layer, site)
        config = dict(
            model_name=None if args.activations else args.model, layer=layer, site=site, hook_point_in=hook_in,
            hook_point_out=hook_out, expansion_factor=run.sae.n_features / d_model,
            act_fn="topk" if args.act == "topk" else "relu", k_warmup_steps=sched["anneal"],
            init_decoder_norm=args.init_decoder_norm or math.sqrt(2 * d_model / run.sae.n_features),
            use_batch_norm_mse=args.loss == "batch-norm-mse", norm_activation="dataset-wise",
            apply_decoder_bias_to_pre_encoder=False, use_decoder_bias=True, lr=args.lr,
            l1_coefficient=args.l1_coef, context_size=args.context_size, dataset_path=args.dataset,
            prepend_bos=True, outlier_norm_limit=limits[run.key], n_training_tokens=tokens,
            step=step + 1, folded=False, jump_relu_threshold=None, heldout=heldout.get(run.name),
            train_args=vars(args))
        path = os.path.join(args.out, f"{run.name}.safetensors")
        save_checkpoint(run.sae, config, path)
        paths.append(path)
    for path in paths:
        print(f"saved {path}")
    return paths


def heldout_metrics(args, lm, tok, runs, limits):
    """EV (eq. 6), L0 and the never-firing share on held-out documents (evaluate.py does more)."""
    if args.eval_tokens <= 0:
        return {}
    from evaluate import reconstruction_metrics
    producers = lm_producers(args, lm, tok, list(runs), split="eval", epochs=1)
    out = {}
    for key, rs in runs.items():
        rows = keep_rows(first_fill(producers[key], args.eval_tokens), limits[key], rs[0].sae.d_model)
        for run in rs:
            m = reconstruction_metrics(run.sae, rows)
            out[run.name] = m
            print(f"{run.name} held-out ({m['n_tokens']:,} tokens): ev {m['explained_variance']:.3f}"
                  f" | ev centred {m['explained_variance_centered']:.3f} | l0 {m['l0']:.1f} | "
                  f"never fired {100 * m['dead_frac']:.1f}%")
    return out


if __name__ == "__main__":
    train(get_args())
