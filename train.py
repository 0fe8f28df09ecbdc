"""Train Llama Scope TopK SAEs and transcoders (§3) on activations made on the fly.

    python train.py                                # L15R-8x-TopK, embedded SmolLM2, ~10 min on CPU
    python train.py --layer 23 --site A --expansion 32
    python train.py --layer 7,15 --site R,TC --expansion 8,32   # 8 SAEs fed by one LM pass
    torchrun --nproc_per_node=8 train.py --expansion 32 --tp 2  # 4 LM copies x SAEs in 2 shards

Reads top to bottom: flags, checks, schedule, data (LM -> per-site buffers), SAEs, the loop, a
check on held-out documents, checkpoints. The last line printed is `saved <path>` for each SAE.
"""
import argparse
import itertools
import json
import math
import os
import time

import torch

import model
import parallel
from safetensors import safe_open

from buffer import (ActivationBuffer, FanOut, file_producer, keep_rows, kept_rows,
                    load_activations, take_rows)
from sae import SAE, atomic_save_file, k_at, lr_at, save_checkpoint
from sae import bad_input as die  # one line on stderr, exit code 2
from tracking import make_logger

PAPER_STEPS = 800_000_000 // 2048  # the released 8x runs: 390,625 steps of 2048 tokens
SHORT_RUN = 50_000_000  # tokens per SAE: a shorter run reuses its rows (the paper: 800M, 1.6B)
MAX_PASSES = 8  # a short run serves each LM row up to this many times
STEPS_PER_BATCH_SIZE = 16_384  # batch <= rows served / this, within 256..2048
DEAD_WINDOW = 100_000  # tokens: a feature that has not fired within this many is counted dead
                      # (§4.4)


def csv(kind):
    return lambda s: [kind(v) for v in s.split(",")]


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    g = p.add_argument_group(
        "what to train (comma lists train every combination from one LM pass)")
    g.add_argument("--model", default=model.EMBEDDED_MODEL,
                   help="Hugging Face id or folder of a Llama-like causal LM "
                        "(default: embedded SmolLM2)")
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
                        ".txt/.jsonl/.json/.parquet file or folder, or the embedded Wikipedia "
                        "summaries")
    g.add_argument("--context-size", type=int, default=1024,
                   help="tokens per document, BOS included")
    g.add_argument("--activations", default=None,
                   help="train on a safetensors file of `activations` (N, D) [+ `targets`]: no LM")
    g.add_argument("--max-norm-ratio", type=float, default=10.0,
                   help="drop tokens whose norm exceeds this x the median (massive activations); "
                        "0 = off")
    g = p.add_argument_group("schedule (§3.3.2; paper values unless noted)")
    g.add_argument("--total-tokens", type=int, default=340_000,
                   help="tokens of data per SAE, from the LM or the --activations file (paper: "
                        "800M for 8x, 1.6B for 32x); the SAE sees each --passes times; default "
                        "~10 min on CPU")
    g.add_argument("--batch-size", type=int, default=None,
                   help="tokens per step (paper: 2048); default: by the budget rule "
                        "(`budget_rule`, printed)")
    g.add_argument("--passes", type=int, default=None,
                   help="times the SAE sees each row of data (paper: 1); default: by the "
                        "budget rule")
    g.add_argument("--lr", type=float, default=8e-4, help="Adam lr (released: 2e-4 for 128x)")
    g.add_argument("--warmup-steps", type=int, default=10_000,
                   help="linear warm-up (released: 5000); short runs scale it, see the printout")
    g.add_argument("--decay-frac", type=float, default=0.2,
                   help="linear decay over this last share")
    g.add_argument("--lr-end", type=float, default=0.0,
                   help="lr after decay (released: 0.01 x lr)")
    g.add_argument("--k-anneal-frac", type=float, default=0.1, help="share of steps annealing K")
    g.add_argument("--k-init", type=int, default=None,
                   help="K at step 0 (default D; released D/2)")
    g.add_argument("--adam-betas", type=float, nargs=2, default=[0.9, 0.999],
                   help="released: 0.9 0.9999")
    g.add_argument("--grad-clip", type=float, default=0.0,
                   help="global grad norm; 0 = off (rel.: 1e-3)")
    g.add_argument("--init-decoder-norm", type=float, default=None,
                   help="decoder column norm at init (default sqrt(2/expansion); released 0.5)")
    g.add_argument("--init-bias", choices=["zero", "mean"], default=None,
                   help="mean: b_dec starts at the first fill's mean target and b_enc centres "
                        "the input (the authors' library); zero: the paper; default: by the "
                        "budget rule")
    g.add_argument("--loss", choices=["mse", "batch-norm-mse"], default="mse",
                   help="batch-norm-mse: the released code's per-token error / centred "
                        "target norm")
    g = p.add_argument_group("buffer (App. A.1)")
    g.add_argument("--buffer-size", type=int, default=131_072,
                   help="rows per site (released: 500K); with passes > 1 a row's uses spread "
                        "over ~passes x this many served rows")
    g.add_argument("--lm-batch-size", type=int, default=32, help="documents per LM forward")
    g = p.add_argument_group("system")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="LM, buffer and SAE (default: bfloat16 on GPU as in the paper, float32 "
                        "on CPU)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--tp", type=int, default=1,
                   help="tensor parallel: ranks that split each SAE's features; the rest of the "
                        "torchrun processes are data parallel (parallel.py)")
    g.add_argument("--out", default="out", help="folder for checkpoints")
    g.add_argument("--save-every", type=int, default=0,
                   help="tokens between resumable checkpoints (<out>/resume.safetensors); 0 = off")
    g.add_argument("--resume", default=None,
                   help="continue from a resumable checkpoint; `auto` = <out>/resume.safetensors "
                        "if it exists")
    g = p.add_argument_group("logging")
    g.add_argument("--log-every", type=int, default=0,
                   help="steps between log lines; 0 = ~40 lines")
    g.add_argument("--eval-tokens", type=int, default=100_000,
                   help="held-out tokens scored after training (§4.4 counts never-firing "
                        "features over 100K; the whole held-out split when smaller); 0 = off")
    g.add_argument("--wandb-project", default=None,
                   help="log every log line to this Weights & Biases project; default off")
    args = p.parse_args(argv)
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    args.rule = budget_rule(args)  # fills in --batch-size and --passes when not given
    return args


def budget_rule(args):
    """Batch size, passes and bias init for this budget; returns the rule as printed.

    The paper's recipe (2048 tokens per step, each row once) is for 390K steps. A short run with
    it makes a few hundred steps, most of them in warm-up, K-annealing and decay, and leaves
    features dead; yet the LM, not the SAE, is the cost (on 2 CPU cores ~0.4 ms per token at
    layer 15 vs ~0.1 ms per SAE row). So a run under SHORT_RUN tokens serves each row up to
    MAX_PASSES times (the buffer keeps a row until it has been served that often), and the batch
    shrinks toward 16K steps: the largest power of two <= rows served / 16384, within 256..2048
    (the floor keeps the per-step overhead small on CPU). It also starts its biases at the data
    mean (`SAE.set_norms_`): with few steps, features that all read the same large mean at step
    0 lose TopK for good (README). The same rule holds for pre-saved --activations
    (--total-tokens rows of the file, read for epochs if it is shorter). Explicit flags win; at
    paper scale this is the paper's recipe, biases at 0 included."""
    auto = [name for name in ("passes", "batch_size", "init_bias")
            if getattr(args, name) is None]
    if args.passes is None:
        args.passes = min(MAX_PASSES, max(1, SHORT_RUN // max(args.total_tokens, 1)))
    if args.batch_size is None:
        per_step = max(1, args.total_tokens * args.passes // STEPS_PER_BATCH_SIZE)
        args.batch_size = min(2048, max(256, 2 ** int(math.log2(per_step))))
    if args.init_bias is None:
        args.init_bias = "mean" if args.total_tokens < SHORT_RUN else "zero"
    if not auto:
        return "as given"
    return (f"budget rule for {args.total_tokens:,} tokens: "
            + ", ".join(f"{n.replace('_', ' ')} {getattr(args, n)}" for n in auto)
            + f" (runs under {SHORT_RUN // 1_000_000}M tokens serve each row up to "
              f"{MAX_PASSES}x and start their biases at the mean; batch = rows served / "
              f"{STEPS_PER_BATCH_SIZE}, 256..2048)")


def check_args(args):
    """Every cheap check, before any slow work (no model load yet). Returns d_model."""
    bad_site = [s for s in args.site if s not in model.SITES]
    if bad_site:
        die(f"--site {','.join(bad_site)} is unknown; allowed: {', '.join(model.SITES)}")
    if args.activations:
        if not os.path.isfile(args.activations):
            die(f"--activations {args.activations}: no such file")
        d_model, max_pos = None, None
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
        die(f"--{'n-features' if args.n_features else 'expansion'} "
            f"{min(sizes):g} must be positive")
    if args.batch_size < 1 or args.batch_size > args.buffer_size // 2:
        die(f"--batch-size {args.batch_size} must be in 1..{args.buffer_size // 2} "
            f"(half of --buffer-size {args.buffer_size})"
            + (" (chosen by the budget rule; give --batch-size)" if "batch size" in args.rule
               else ""))
    if args.passes < 1:
        die(f"--passes {args.passes} must be at least 1")
    if args.total_tokens * args.passes < args.batch_size:
        die(f"--total-tokens {args.total_tokens} x --passes {args.passes} is less than one batch "
            f"({args.batch_size})")
    if args.k < 1:
        die(f"--k {args.k} must be at least 1")
    if d_model:
        n_min = min(args.n_features or [round(e * d_model) for e in args.expansion])
        if args.k >= n_min:
            die(f"--k {args.k} must be less than the number of features ({n_min})")
        if args.k_init is not None and not args.k <= args.k_init <= n_min:
            die(f"--k-init {args.k_init} must be in {args.k}..{n_min}")
    if args.resume and args.resume != "auto" and not os.path.isfile(args.resume):
        die(f"--resume {args.resume}: no such file (give a path or `auto`)")
    for name in ("decay_frac", "k_anneal_frac"):
        if not 0 <= getattr(args, name) <= 1:
            die(f"--{name.replace('_', '-')} {getattr(args, name)} must be in [0, 1]")
    return d_model


def check_parallel(args, comms, d_model):
    """What torchrun's layout asks of the flags (parallel.py)."""
    if args.batch_size % comms.world:
        die(f"--batch-size {args.batch_size} must be a multiple of the {comms.world} processes")
    if args.batch_size // comms.world > args.buffer_size // 2:
        die(f"--buffer-size {args.buffer_size} (per rank) must hold two per-rank minibatches of "
            f"{args.batch_size // comms.world}")
    widths = args.n_features or ([round(e * d_model) for e in args.expansion] if d_model else [])
    if any(n % comms.tp for n in widths):
        die(f"--tp {comms.tp} must divide the number of features ({widths})")


def schedule(args):
    """Steps of warm-up, decay and K-annealing; a run shorter than the paper's keeps their
    shares. Every token of data is served `passes` times."""
    steps = args.total_tokens * args.passes // args.batch_size
    warmup = min(args.warmup_steps, round(steps * 0.05)) if steps < PAPER_STEPS \
        else args.warmup_steps
    return dict(steps=steps, warmup=warmup, decay=round(steps * args.decay_frac),
                anneal=round(steps * args.k_anneal_frac))


def run_name(layer, site, n_features, d_model, act):
    return f"L{layer}{site}-{n_features / d_model:g}x-{'TopK' if act == 'topk' else 'Vanilla'}"


# ----------------------------------------------------------------------------- data

def lm_producers(args, lm, tok, sites, split="train", epochs=None, skip=0, rank=0, world=1):
    """FanOut of (N, C) rows per site from one early-stopped LM pass per batch of documents.
    skip: LM batches already made by the run being resumed (tokenized again, not run); each of
    `world` ranks reads every world-th document."""
    docs = model.iter_documents(args.dataset, split, seed=args.seed, epochs=epochs)
    docs = itertools.islice(docs, rank, None, world)
    batches = model.token_batches(tok, docs, args.context_size, args.lm_batch_size)
    batches = itertools.islice(batches, skip, None)
    return FanOut(model.activation_producer(lm, tok, sites, batches), sites, made=skip)


def outlier_limits(rows, d_model, ratio, every_rank=lambda norms: norms):
    """(max_in, max_out) norms: ratio x the median token norm of the first fill (of every
    rank's); None when off."""
    if ratio <= 0:
        return None
    med = [every_rank(rows[:, i:i + d_model].float().norm(dim=-1)).median().item()
           for i in range(0, rows.shape[1], d_model)]
    return ratio * med[0], ratio * med[-1]


# ----------------------------------------------------------------------------- training

class Run:
    """One SAE (this rank's shard of it) with its optimizer and running statistics."""

    def __init__(self, args, key, n_features, d_model, dtype, comms):
        layer, site = key
        expansion = n_features / d_model
        self.key, self.name, self.comms = key, run_name(layer, site, n_features, d_model,
                                                        args.act), comms
        full = SAE(d_model, n_features, args.act, args.k, transcoder=site == "TC",
                   init_decoder_norm=args.init_decoder_norm or math.sqrt(2 / expansion))
        self.sae = comms.shard(full).to(comms.device, dtype)  # init identical on every rank
        self.opt = torch.optim.Adam(self.sae.parameters(), lr=args.lr, betas=args.adam_betas,
                                    eps=1e-8, fused=True)  # one kernel: ~6x faster on CPU
        self.last_fired = torch.zeros(self.sae.n_features, dtype=torch.long,
                                      device=comms.device)  # token count when each last fired
        self.log = {}

    def step(self, rows, k, lr, args, tokens):
        d = self.sae.d_model
        x_in, x_out = (rows[:, :d], rows[:, d:]) if self.sae.transcoder else (rows, rows)
        out = self.sae.loss(x_in, x_out, k=min(k, self.sae.n_features * self.comms.tp),
                            l1_coef=args.l1_coef, batch_norm_mse=args.loss == "batch-norm-mse")
        self.opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        self.comms.reduce_grads_(self.sae)
        if args.grad_clip > 0:
            self.comms.clip_grad_norm_(self.sae, args.grad_clip)
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.step()
        self.last_fired[out["fired"]] = tokens
        for key in ("mse", "l1", "ev", "l0"):  # kept per step until the next log line
            self.log.setdefault(key, []).append(out[key].item())
        return self.log["mse"][-1] + self.log["l1"][-1]  # the loss

    def log_line(self, tokens):
        """Means since the last line, over every rank: mse and ev are the same within a
        tensor-parallel group and averaged over replicas; l1 and l0 add up over shards."""
        c = self.comms
        means = torch.tensor([sum(self.log[k]) / len(self.log[k])
                              for k in ("mse", "ev", "l1", "l0")], device=c.device)
        mse, ev, l1, l0 = (c.sum_(means) / torch.tensor([c.world, c.world, c.dp, c.dp],
                                                        device=c.device)).tolist()
        self.log = {}
        fired = c.sum_(self.last_fired.clone(), c.dp_group, parallel.MAX)  # latest replica
        dead = c.sum_((tokens - fired >= DEAD_WINDOW).sum(), c.tp_group).item() \
            / (self.sae.n_features * c.tp)
        self.logged = dict(loss=mse + l1, mse=mse, ev=ev, l0=l0, dead=dead)  # for the logger
        return f"loss {mse + l1:.4f} | ev {ev:.3f} | l0 {l0:.1f} | dead {100 * dead:.1f}%"


RESUME_FREE = {"resume", "save_every", "out", "log_every", "eval_tokens", "device", "rule",
               "wandb_project"}  # may change


def save_resume(path, args, step, tokens, data, buffers, runs, limits, world=1):
    """Everything to continue bit-identically, as safetensors + JSON (never pickle), atomically."""
    t = {"rng.torch": torch.get_rng_state()}
    for key, buf in buffers.items():
        name = f"{key[0]}{key[1]}"
        state = buf.state_dict()
        t.update({f"buffer.{name}.data": state["data"], f"buffer.{name}.uses": state["uses"],
                  f"buffer.{name}.pending": state["pending"],
                  f"buffer.{name}.generator": state["generator"]})
        queued = list(data.queues[key])
        t[f"queue.{name}"] = torch.cat(queued) if queued else state["data"][:0]
        t[f"queue.{name}.sizes"] = torch.tensor([len(q) for q in queued], dtype=torch.long)
    for run in [r for rs in runs.values() for r in rs]:
        t.update({f"{run.name}.{k}": v for k, v in run.sae.state_dict().items()})
        t[f"{run.name}.last_fired"] = run.last_fired
        for i, st in run.opt.state_dict()["state"].items():
            t.update({f"{run.name}.adam.{i}.{k}": v.reshape(-1) if k == "step" else v
                      for k, v in st.items()})
    meta = {"args": {k: v for k, v in vars(args).items() if k not in RESUME_FREE}, "step": step,
            "tokens": tokens, "made": data.made if data else 0, "world": world,
            "limits": {f"{k[0]}{k[1]}": v for k, v in limits.items()},
            "buffers": {f"{k[0]}{k[1]}": {"read": b.read, "remaining": b.remaining,
                                          "exhausted": b.exhausted} for k, b in buffers.items()}}
    atomic_save_file({k: v.detach().contiguous().cpu() for k, v in t.items()}, path,
                     {"resume": json.dumps(meta)})


def read_resume(path, args, comms):
    """(meta, tensors) of a resumable checkpoint made by the same configuration."""
    try:
        with safe_open(path, "pt") as f:
            meta = json.loads(f.metadata()["resume"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        die(f"--resume {path}: not a resumable checkpoint ({type(e).__name__}: {e})")
    now = {k: v for k, v in json.loads(json.dumps(vars(args))).items() if k not in RESUME_FREE}
    diff = [k for k in now if now[k] != meta["args"].get(k)]
    if diff:
        k = diff[0]
        die(f"--resume {path} is from a different configuration: --{k.replace('_', '-')} was "
            f"{meta['args'].get(k)}, now {now[k]}")
    if meta.get("world", 1) != comms.world:
        die(f"--resume {path} was written by {meta.get('world', 1)} processes, now {comms.world}")
    return meta, tensors


def restore_(meta, t, buffers, runs):
    torch.set_rng_state(t["rng.torch"])
    for key, buf in buffers.items():
        name = f"{key[0]}{key[1]}"
        buf.load_state_dict(dict(meta["buffers"][name], data=t[f"buffer.{name}.data"],
                                 uses=t[f"buffer.{name}.uses"],
                                 pending=t[f"buffer.{name}.pending"],
                                 generator=t[f"buffer.{name}.generator"]))
    for run in [r for rs in runs.values() for r in rs]:
        run.sae.load_state_dict({k: t[f"{run.name}.{k}"] for k in run.sae.state_dict()})
        run.last_fired.copy_(t[f"{run.name}.last_fired"])
        state = run.opt.state_dict()
        for i in range(len(state["param_groups"][0]["params"])):
            st = {k.rsplit(".", 1)[1]: v for k, v in t.items()
                  if k.startswith(f"{run.name}.adam.{i}.")}
            state["state"][i] = dict(st, step=st["step"].reshape(()))
        run.opt.load_state_dict(state)


def train(args):
    d_model = check_args(args)
    comms = parallel.Comms(args.tp, args.device)  # dp x tp ranks under torchrun, else no-ops
    check_parallel(args, comms, d_model)
    print0, args.device = comms.print0, comms.device
    logger = make_logger(args.wandb_project if comms.rank == 0 else None, vars(args))  # or no-op
    torch.manual_seed(args.seed)
    dtype = getattr(torch, args.dtype)
    sites = list(dict.fromkeys(itertools.product(args.layer, args.site)))
    sched = schedule(args)
    save_path = comms.shard_path(os.path.join(args.out, "resume.safetensors"))  # one per rank
    resume_path = save_path if args.resume == "auto" \
        else args.resume and comms.shard_path(args.resume)
    meta, saved = read_resume(resume_path, args, comms) \
        if resume_path and os.path.isfile(resume_path) else (None, None)
    if len(set(comms.all_values(torch.tensor([meta["step"] if meta else -1])).tolist())) > 1:
        die(f"--resume: the ranks' files ({resume_path}) are from different steps, or missing")
    skip = meta["made"] if meta else 0
    t0 = time.time()

    # data: one producer of rows per site; the LM runs once per batch of documents for all sites
    if args.activations:
        x, y = load_activations(args.activations)
        if (y is not None) != (sites == [(sites[0][0], "TC")]):
            die(f"--activations {args.activations}: a file with `targets` trains one TC site, "
                f"a file without trains R, A or M (got --site {','.join(args.site)})")
        d_model, lm, tok = x.shape[1], None, None
        x, y = x[comms.rank::comms.world], None if y is None else y[comms.rank::comms.world]
        rows = file_producer(x.to(dtype), None if y is None else y.to(dtype), seed=args.seed)
        data = FanOut(({sites[0]: r} for r in itertools.islice(rows, skip, None)), sites, skip)
    else:
        lm, tok = model.load_model(args.model, args.device, dtype)
        data = lm_producers(args, lm, tok, sites, skip=skip, rank=comms.rank, world=comms.world)
    # each rank's minibatch; a tensor-parallel group gathers its ranks' into one of batch / dp
    batch = args.batch_size // comms.world
    # a run shorter than the buffer fills only what it will use (never less than two batches);
    # the first fill's use counts are staggered over 1..passes (buffer.py), 2 / (passes + 1) each
    size = min(args.buffer_size, max(2 * batch, math.ceil(sched["steps"] * batch * 2
                                                           / (args.passes + 1))))
    print0(f"loaded in {time.time() - t0:.1f}s; "
          f"{'resuming at step ' + str(meta['step']) if meta else 'filling'}"
          f" {len(sites)} buffer(s) of {size:,} rows")

    buffers, limits, runs = {}, {}, {}
    widths = args.n_features or [round(e * d_model) for e in args.expansion]
    for key in sites:
        runs[key] = [Run(args, key, n, d_model, dtype, comms) for n in widths]
        if meta:  # norms, limits, buffer contents and weights come from the checkpoint
            limits[key] = meta["limits"][f"{key[0]}{key[1]}"]
            queued = saved[f"queue.{key[0]}{key[1]}"].split(
                saved[f"queue.{key[0]}{key[1]}.sizes"].tolist())
            data.queues[key].extend(queued)
            first = []
        else:
            first = take_rows(data[key], size)  # (size, C)
            if not torch.isfinite(first).all():
                die(f"step 0 (the first buffer fill): NaN or Inf in the activations of site {key}")
            limits[key] = outlier_limits(first[:size], d_model, args.max_norm_ratio,
                                         comms.all_values)
            first = [keep_rows(first, limits[key], d_model)]
            for run in runs[key]:  # S_in, S_out from the first fill of every rank (§3.3.3)
                run.sae.set_norms_(first[0][:, :d_model], first[0][:, -d_model:], comms.mean,
                                   center=args.init_bias == "mean")
        rest = kept_rows(data[key], limits[key], d_model)  # bound now, per site
        buffers[key] = ActivationBuffer(itertools.chain(first, rest), size, batch,
                                        seed=args.seed + comms.rank, device=args.device,
                                        limit=sched["steps"] * batch, passes=args.passes)
        sae0 = runs[key][0].sae
        print0(f"{key}: norms in {sae0.norm_in.item():.2f} out {sae0.norm_out.item():.2f}; "
               f"outlier limit {limits[key] and round(limits[key][0], 1)}")
    if meta:
        restore_(meta, saved, buffers, runs)

    k_init = args.k_init or d_model
    every = args.log_every or max(1, sched["steps"] // 40)
    all_runs = [r for rs in runs.values() for r in rs]
    print0(f"{len(all_runs)} SAE(s): {', '.join(r.name for r in all_runs)} | D {d_model} | "
          f"{sched['steps']:,} steps x {args.batch_size} tokens = "
          f"{sched['steps'] * args.batch_size:,}"
          f" tokens each ({args.passes} pass(es) over "
          f"{sched['steps'] * args.batch_size // args.passes:,} tokens)\n{args.rule}"
          f"\nschedule: warm-up {sched['warmup']} steps (asked {args.warmup_steps}; "
          f"capped at 5% of a short run) | K {k_init} -> {args.k} over {sched['anneal']} steps | "
          f"lr {args.lr:g}, decay to {args.lr_end:g} over the last {sched['decay']} steps"
          + (f"\nparallel: {comms.world} ranks = dp {comms.dp} x tp {comms.tp}; {batch} rows per "
             f"rank per step, {d_model * max(widths) // comms.tp:,} of each SAE's weights per "
             f"matrix per rank" if comms.world > 1 else ""))

    # the loop: every SAE takes one minibatch from its site's buffer per step
    os.makedirs(args.out, exist_ok=True)
    start, tokens = (meta["step"], meta["tokens"]) if meta else (0, 0)
    t_train, step = time.time(), start
    for step in range(start, sched["steps"]):
        lr = lr_at(step, sched["steps"], args.lr, sched["warmup"], sched["decay"], args.lr_end)
        k = k_at(step, args.k, k_init, sched["anneal"])
        batches = {key: buf.next_batch() for key, buf in buffers.items()}
        ran_out = torch.tensor(int(None in batches.values()), device=args.device)
        if comms.sum_(ran_out).item():
            print0(f"data ran out at step {step}")  # on some rank: all stop together
            break
        batches = {key: comms.gather_rows(b) for key, b in batches.items()}
        tokens += args.batch_size
        for key, rows in batches.items():
            if not torch.isfinite(rows).all():
                die(f"step {step + 1}: NaN or Inf in the activations of site {key}; stopping "
                    f"(the last resumable checkpoint, if any, is kept)")
            for run in runs[key]:
                loss = run.step(rows, k, lr, args, tokens)
                if not math.isfinite(loss):
                    die(f"step {step + 1}: {run.name} loss is {loss} (NaN or Inf); "
                        f"stopping (the last resumable checkpoint, if any, is kept)")
        if (step + 1) % every == 0 or step + 1 == sched["steps"]:
            dt = time.time() - t_train
            eta = dt / (step + 1 - start) * (sched["steps"] - step - 1)
            for run in all_runs:
                print0(f"{run.name} step {step + 1}/{sched['steps']} | {run.log_line(tokens)} | "
                      f"k {k} | lr {lr:.1e} | "
                      f"{(tokens - start * args.batch_size) / dt / 1e3:.1f}k "
                      f"tok/s | eta {eta:.0f}s", flush=True)
                logger.log({f"{run.name}/{key}": v for key, v in run.logged.items()}
                           | {"k": k, "lr": lr, "tokens": tokens}, step=step + 1)
        if args.save_every \
                and tokens // args.save_every > (tokens - args.batch_size) // args.save_every:
            save_resume(save_path, args, step + 1, tokens, data, buffers, runs, limits,
                        comms.world)
    step += 1
    logger.finish()
    print0(f"trained {tokens:,} rows ({tokens // args.passes:,} tokens x {args.passes} "
           f"passes) in {time.time() - t_train:.0f}s")

    for run in all_runs:  # rank 0 gathers every SAE whole; it alone checks and writes
        run.sae = comms.gather_sae(run.sae)
    comms.close()
    if comms.rank > 0:
        return []
    heldout = heldout_metrics(args, lm, tok, runs, limits) if lm is not None else {}
    paths = []
    for run in all_runs:
        layer, site = run.key
        hook_in, hook_out = model.hook_names(layer, site)
        config = dict(
            model_name=None if args.activations else args.model, layer=layer, site=site,
            hook_point_in=hook_in, hook_point_out=hook_out,
            expansion_factor=run.sae.n_features / d_model,
            act_fn="topk" if args.act == "topk" else "relu", k_warmup_steps=sched["anneal"],
            init_decoder_norm=args.init_decoder_norm
                or math.sqrt(2 * d_model / run.sae.n_features),
            use_batch_norm_mse=args.loss == "batch-norm-mse", norm_activation="dataset-wise",
            apply_decoder_bias_to_pre_encoder=False, use_decoder_bias=True, lr=args.lr,
            l1_coefficient=args.l1_coef, context_size=args.context_size, dataset_path=args.dataset,
            prepend_bos=True, outlier_norm_limit=limits[run.key],
            n_training_tokens=tokens // args.passes, passes=args.passes, n_rows_served=tokens,
            step=step, folded=False, jump_relu_threshold=None, heldout=heldout.get(run.name),
            train_args={k: v for k, v in vars(args).items() if k not in RESUME_FREE})
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
        rows = keep_rows(take_rows(producers[key], args.eval_tokens), limits[key],
                         rs[0].sae.d_model)
        for run in rs:
            m = reconstruction_metrics(run.sae, rows)
            out[run.name] = m
            print(f"{run.name} held-out ({m['n_tokens']:,} tokens): "
                  f"ev {m['explained_variance']:.3f}"
                  f" | ev centred {m['explained_variance_centered']:.3f} | l0 {m['l0']:.1f} | "
                  f"never fired {100 * m['dead_frac']:.1f}% (§4.4: no activation on any of "
                  f"these {m['n_tokens']:,} tokens)")
    return out


if __name__ == "__main__":
    train(get_args())
