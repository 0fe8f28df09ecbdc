"""Train Llama Scope TopK SAEs and transcoders (§3) on activations made on the fly.

    python train.py                                # L15R-8x-k50-TopK, embedded SmolLM2, ~8 min
    python train.py --layer 23 --site A --expansion 32
    python train.py --layer 7,15 --site R,TC --expansion 8,32   # 8 SAEs fed by one LM pass
    torchrun --nproc_per_node=8 train.py --expansion 32 --tp 2  # 4 LM copies x SAEs in 2 shards

Reads top to bottom: flags, the budget rule and the checks, the schedules, one SAE with its
optimizer (`Run`), then the run in order: set-up, data (LM -> per-site buffers), the loop, a check
on held-out documents, checkpoints. The last lines printed are `saved <path>`, one per SAE. Files
are formats.py's, the held-out check is evaluate.py's.
"""
import argparse
import itertools
import json
import math
import os
import sys
import time

import torch
from tqdm import tqdm

import evaluate
import formats
import model
import parallel
from buffer import ActivationBuffer, FanOut, file_producer, take_rows
from sae import SAE
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
                   help="Hugging Face id or folder of a Llama-like causal LM (default: embedded)")
    g.add_argument("--layer", type=csv(int), default=[15], help="block index(es), from 0")
    g.add_argument("--site", type=csv(str), default=["R"],
                   help="R resid-post, A attn-out, M mlp-out, TC transcoder (MLP in -> MLP out)")
    g.add_argument("--expansion", type=csv(float), default=[8], help="features per model dim")
    g.add_argument("--n-features", type=csv(int), default=None, help="F; overrides --expansion")
    g.add_argument("--act", choices=["topk", "vanilla"], default="topk",
                   help="TopK (eq. 5) or the ReLU + L1 baseline (§4.2)")
    g.add_argument("--k", type=int, default=50, help="active features per token after annealing")
    g.add_argument("--l1-coef", type=float, default=2e-4, help="Vanilla only: L1 weight")
    g.add_argument("--l1-warmup-frac", type=float, default=0.05,
                   help="Vanilla only: share of steps warming the L1 weight up linearly from 0, "
                        "as the released trainer does (default: SAELens's total // 20); 0 = off")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default=model.EMBEDDED_DATASET,
                   help="Hub dataset (streamed, e.g. cerebras/SlimPajama-627B), a local "
                        ".txt/.jsonl/.json/.parquet file or folder, or the embedded Wikipedia "
                        "summaries")
    g.add_argument("--context-size", type=int, default=1024, help="tokens per document, with BOS")
    g.add_argument("--activations", default=None,
                   help="train on pre-saved rows, no LM: a safetensors file of `activations` "
                        "(N, D) [+ `targets`], or a folder written by --cache-activations")
    g.add_argument("--cache-activations", default=None, metavar="DIR",
                   help="instead of training, run the LM once and write --total-tokens rows of "
                        "every --layer x --site to DIR (shards + manifest.json)")
    g.add_argument("--max-norm-ratio", type=float, default=10.0,
                   help="drop tokens whose norm exceeds this x the median (massive activations); "
                        "0 = off")
    g = p.add_argument_group("schedule (§3.3.2; paper values unless noted)")
    g.add_argument("--total-tokens", type=int, default=340_000,
                   help="tokens of data per SAE, from the LM or the --activations file (paper: "
                        "800M for 8x, 1.6B for 32x); the SAE sees each --passes times; default "
                        "~10 min on CPU")
    g.add_argument("--batch-size", type=int, default=None,
                   help="tokens per step (paper: 2048); default: by the budget rule (printed)")
    g.add_argument("--passes", type=int, default=None,
                   help="times the SAE sees each row of data (paper: 1); default: by the "
                        "budget rule")
    g.add_argument("--lr", type=float, default=8e-4, help="Adam lr (released: 2e-4 for 128x)")
    g.add_argument("--warmup-steps", type=int, default=10_000,
                   help="linear warm-up (released: 5000); short runs scale it, see the printout")
    g.add_argument("--decay-frac", type=float, default=0.2, help="linear decay over this share")
    g.add_argument("--lr-end", type=float, default=0.0, help="lr after decay (released: 0.01 x lr)")
    g.add_argument("--k-anneal-frac", type=float, default=0.1, help="share of steps annealing K")
    g.add_argument("--k-init", type=int, default=None, help="K at step 0 (default D; released D/2)")
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
    g.add_argument("--device", default=model.default_device())
    g.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="LM, buffer and the SAE's matmuls; the SAE's weights and Adam state are "
                        "always float32 (default: bfloat16 on GPU as in the paper, float32 on "
                        "CPU)")
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
    g.add_argument("--log-every", type=int, default=0, help="steps between log lines; 0 = ~40")
    g.add_argument("--eval-tokens", type=int, default=100_000,
                   help="held-out tokens scored after training (§4.4 counts never-firing "
                        "features over 100K; the whole held-out split when smaller); 0 = off")
    g.add_argument("--wandb-project", default=None,
                   help="log every log line to this Weights & Biases project; default off")
    args = p.parse_args(argv)
    args.dtype = args.dtype or model.default_dtype(args.device)
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
    """Every cheap check, before any slow work (the model's config only, no weights). Returns D
    (None with --activations: the file says)."""
    cache = formats.read_cache(args.activations, itertools.product(args.layer, args.site)) \
        if args.activations and os.path.isdir(args.activations) else {}
    model.check_device(args.device)
    if not args.activations:
        model.check_dataset(args.dataset)
    cfg = {"hidden_size": cache["d_model"]} if cache else {} if args.activations else \
        model.load_config(args.model)
    d_model, n_layers = cfg.get("hidden_size"), cfg.get("num_hidden_layers", 0)
    max_pos = cfg.get("max_position_embeddings") or args.context_size
    n_min = min(feature_counts(args, d_model)) if d_model else math.inf
    sizes, half = args.n_features or args.expansion, args.buffer_size // 2
    bad_site = ",".join(s for s in args.site if s not in model.SITES)
    bad_layer = [L for L in args.layer if not 0 <= L < n_layers] if n_layers else []
    k_init = args.k_init if args.k_init is not None else args.k
    checks = [  # (failed, the one line that says so), in the order a user would fix them
        (bad_site, f"--site {bad_site} is unknown; allowed: {', '.join(model.SITES)}"),
        (args.activations and not os.path.exists(args.activations),
         f"--activations {args.activations}: no such file or folder"),
        (args.activations and args.cache_activations,
         "--cache-activations runs the LM: it cannot read --activations"),
        (args.cache_activations and formats.is_cache(args.cache_activations),
         f"--cache-activations {args.cache_activations} already holds a cache; give a new "
         f"folder"),
        (bad_layer, f"--layer {bad_layer[:1] and bad_layer[0]} is out of range: {args.model} has "
                    f"{n_layers} layers, allowed 0-{n_layers - 1}"),
        (not 2 <= args.context_size <= max_pos,
         f"--context-size {args.context_size} is out of range: allowed 2-{max_pos}"),
        (min(sizes) <= 0, f"--{'n-features' if args.n_features else 'expansion'} {min(sizes):g} "
                          f"must be positive"),
        (not 1 <= args.batch_size <= half,
         f"--batch-size {args.batch_size} must be in 1..{half} (half of --buffer-size "
         f"{args.buffer_size})" + (" (chosen by the budget rule; give --batch-size)"
                                   if "batch size" in args.rule else "")),
        (args.passes < 1, f"--passes {args.passes} must be at least 1"),
        (args.total_tokens * args.passes < args.batch_size,
         f"--total-tokens {args.total_tokens} x --passes {args.passes} is less than one batch "
         f"({args.batch_size})"),
        (args.k < 1, f"--k {args.k} must be at least 1"),
        (args.k >= n_min, f"--k {args.k} must be less than the number of features ({n_min})"),
        (not args.k <= k_init <= n_min, f"--k-init {args.k_init} must be in {args.k}..{n_min}"),
        (args.resume not in (None, "auto") and not os.path.isfile(args.resume),
         f"--resume {args.resume}: no such file (give a path or `auto`)"),
        *[(not 0 <= getattr(args, name) <= 1,
           f"--{name.replace('_', '-')} {getattr(args, name)} must be in [0, 1]")
          for name in ("decay_frac", "k_anneal_frac", "l1_warmup_frac")]]
    for failed, message in checks:
        if failed:
            raise ValueError(message)
    return d_model


def feature_counts(args, d_model):
    """F of every SAE to train at each site: --n-features, else --expansion x D."""
    return args.n_features or [round(e * d_model) for e in args.expansion]


def check_parallel(args, comms, d_model):
    """What torchrun's layout asks of the flags (parallel.py)."""
    per_rank = args.batch_size // comms.world
    n_features = feature_counts(args, d_model) if d_model else args.n_features or []
    for failed, message in [
            (args.batch_size % comms.world,
             f"--batch-size {args.batch_size} must be a multiple of the {comms.world} processes"),
            (per_rank > args.buffer_size // 2,
             f"--buffer-size {args.buffer_size} (per rank) must hold two per-rank minibatches of "
             f"{per_rank}"),
            (any(n % comms.tp for n in n_features),
             f"--tp {comms.tp} must divide the number of features ({n_features})")]:
        if failed:
            raise ValueError(message)


def schedule(args):
    """Steps of warm-up, decay and K-annealing; a run shorter than the paper's keeps their
    shares. Every token of data is served `passes` times."""
    steps = args.total_tokens * args.passes // args.batch_size
    warmup = min(args.warmup_steps, round(steps * 0.05)) if steps < PAPER_STEPS \
        else args.warmup_steps
    return dict(steps=steps, warmup=warmup, decay=round(steps * args.decay_frac),
                anneal=round(steps * args.k_anneal_frac),
                l1_warmup=round(steps * args.l1_warmup_frac) if args.act == "vanilla" else 0)


def k_at(step, k, k_init, anneal_steps):
    """K-annealing (§3.3.2): linear from k_init down to k over the first anneal_steps, then k.
    With k_init = D/2 this is the released code's ceil(max(1, m0 + (1 - m0) t / W) * K)."""
    if step >= anneal_steps:
        return k
    return math.ceil(k_init + (k - k_init) * step / anneal_steps)


def lr_at(step, total, lr, warmup, decay_steps, lr_end=0.0):
    """Linear warm-up 0 -> lr, constant, then linear decay to lr_end over the last decay_steps."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if step >= total - decay_steps:
        return lr_end + (lr - lr_end) * (total - step) / decay_steps
    return lr


def run_name(layer, site, n_features, d_model, args):
    """L15R-8x-k50-TopK (Vanilla: L15R-8x-l1_0.0002-Vanilla): K, or the L1 weight, is in the
    name, so a sweep over it in one --out keeps every checkpoint."""
    kind = f"k{args.k}-TopK" if args.act == "topk" else f"l1_{args.l1_coef:g}-Vanilla"
    return f"L{layer}{site}-{n_features / d_model:g}x-{kind}"


# ----------------------------------------------------------------------------- data

# ----------------------------------------------------------------------------- one SAE

class Run:
    """One SAE (this rank's shard of it) with its optimizer and running statistics."""

    def __init__(self, args, key, n_features, d_model, dtype, comms):
        layer, site = key
        self.key, self.comms = key, comms
        self.name = run_name(layer, site, n_features, d_model, args)
        full = SAE(d_model, n_features, args.act, args.k, model.is_transcoder(site),
                   init_decoder_norm=args.init_decoder_norm)
        self.sae = comms.shard(full).to(comms.device)  # init identical on every rank
        self.sae.compute_dtype = dtype  # matmuls in --dtype; weights and Adam stay float32
        self.opt = torch.optim.Adam(self.sae.parameters(), lr=args.lr, betas=args.adam_betas,
                                    eps=1e-8, fused=True)  # one kernel: ~6x faster on CPU
        self.last_fired = torch.zeros(self.sae.n_features, dtype=torch.long,
                                      device=comms.device)  # token count when each last fired
        self.log = {}

    def step(self, rows, k, lr, args, tokens, l1_coef=0.0):
        out = self.sae.loss(*model.in_out(rows, self.sae.d_model),
                            k=min(k, self.sae.n_features * self.comms.tp), l1_coef=l1_coef,
                            batch_norm_mse=args.loss == "batch-norm-mse")
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

    def state_dict(self):
        return {"sae": self.sae.state_dict(), "adam": self.opt.state_dict(),
                "last_fired": self.last_fired}

    def load_state_dict(self, state):
        self.sae.load_state_dict(state["sae"])
        self.last_fired.copy_(state["last_fired"])
        adam = state["adam"]  # a file's dict keys are strings; Adam's state is keyed by index
        self.opt.load_state_dict(dict(adam, state={int(i): v for i, v in adam["state"].items()}))


# ----------------------------------------------------------------------------- the run, in order

RESUME_FREE = {"resume", "save_every", "out", "log_every", "eval_tokens", "device", "rule",
               "wandb_project"}  # flags a resumed run may change


def resumable(args):
    return {k: v for k, v in json.loads(json.dumps(vars(args))).items() if k not in RESUME_FREE}


def read_resume(args, comms):
    """The saved state of the run to continue, or None; refused if it is another run's."""
    path = comms.shard_path(os.path.join(args.out, "resume.safetensors") if args.resume == "auto"
                            else args.resume) if args.resume else None
    state = formats.load_state(path) if path and os.path.isfile(path) else None
    if len(set(comms.all_values(torch.tensor([state["step"] if state else -1])).tolist())) > 1:
        raise ValueError(f"--resume: the ranks' files ({path}) are from different steps, or "
                         f"missing")
    if state is None:
        return None
    now = resumable(args)
    diff = [k for k in now if now[k] != state["args"].get(k)]
    if diff:
        raise ValueError(f"--resume {path} is from a different configuration: "
                         f"--{diff[0].replace('_', '-')} was {state['args'].get(diff[0])}, "
                         f"now {now[diff[0]]}")
    if state["world"] != comms.world:
        raise ValueError(f"--resume {path} was written by {state['world']} processes, now "
                         f"{comms.world}")
    return state


def open_data(args, comms, sites, dtype, skip):
    """(FanOut of rows per site, lm, tok, D): one LM pass per batch of documents feeds every
    site, each rank reading its own documents; or the rows of an --activations file. skip: LM
    batches a resumed run has made already (tokenized again, not run)."""
    if args.activations and os.path.isdir(args.activations):  # a cache: read shard by shard
        manifest = formats.read_cache(args.activations, sites)
        rows = formats.cache_rows(args.activations, manifest, sites, comms.rank, comms.world)
        rows = ({key: r.to(dtype) for key, r in out.items()} for out in rows)
        return FanOut(itertools.islice(rows, skip, None), sites, skip), None, None, \
            manifest["d_model"]
    if args.activations:
        x, y = formats.load_activations(args.activations)
        if (y is not None) != (len(sites) == 1 and model.is_transcoder(sites[0][1])):
            raise ValueError(f"--activations {args.activations}: a file with `targets` trains "
                             f"one TC site, a file without trains R, A or M (got --site "
                             f"{','.join(args.site)})")
        rows = model.to_rows(x, y)[comms.rank::comms.world].to(dtype)
        rows = file_producer(rows, seed=args.seed)
        return FanOut(({sites[0]: r} for r in itertools.islice(rows, skip, None)), sites,
                      skip), None, None, x.shape[1]
    lm, tok = model.load_model(args.model, args.device, dtype)
    batches = model.document_batches(tok, args.dataset, "train", args.context_size,
                                     args.lm_batch_size, args.seed, rank=comms.rank,
                                     world=comms.world)
    batches = itertools.islice(batches, skip, None)
    return FanOut(model.activation_producer(lm, tok, sites, batches), sites, made=skip), lm, tok, \
        lm.config.hidden_size


def cache_activations(args, comms, sites, dtype):
    """Run the LM once and write --total-tokens rows of every site (formats.write_cache): then
    train, sweep K or width, and evaluate from the folder with no LM (--activations DIR)."""
    if comms.world > 1:
        raise ValueError("--cache-activations runs in one process (no torchrun)")
    lm, tok = model.load_model(args.model, args.device, dtype)
    batches = model.document_batches(tok, args.dataset, "train", args.context_size,
                                     args.lm_batch_size, args.seed)
    t0 = time.time()
    manifest = formats.write_cache(
        args.cache_activations, model.activation_producer(lm, tok, sites, batches), sites,
        args.total_tokens, lm.config.hidden_size,
        dict(model=args.model, dataset=args.dataset, split="train", seed=args.seed,
             context_size=args.context_size, dtype=args.dtype))
    print(f"cached {manifest['rows']:,} rows of {', '.join(manifest['sites'])} in "
          f"{len(manifest['shards'])} shard(s) in {time.time() - t0:.0f}s")
    print(f"saved {args.cache_activations}")
    return [args.cache_activations]


def first_fill(args, comms, key, rows, size, d_model, runs):
    """Exactly the first `size` rows of a site (however the stream is chunked: LM batches or
    cache shards) set its massive-activation limit and the SAEs' dataset norms (§3.3.3), both
    over every rank's rows. Returns the rows for the buffer and the limit."""
    first = take_rows(rows, size, f"first fill {key}")  # (>= size, C): whole chunks
    if not torch.isfinite(first).all():
        raise ValueError(f"step 0 (the first buffer fill): NaN or Inf in the activations of site "
                         f"{key}")
    limit = model.outlier_limits(first[:size], d_model, args.max_norm_ratio, comms.all_values)
    for run in runs:
        run.sae.set_norms_(*model.in_out(model.keep_rows(first[:size], limit, d_model), d_model),
                           comms.mean, center=args.init_bias == "mean")
    return [model.keep_rows(first, limit, d_model)], limit  # one tensor: resumable as before


def train(args):
    # set-up: every check before slow work; torchrun's ranks, or no-op collectives for one process
    d_model = check_args(args)
    comms = parallel.Comms(args.tp, args.device)
    check_parallel(args, comms, d_model)
    print0, args.device = comms.print0, comms.device
    logger = make_logger(args.wandb_project if comms.rank == 0 else None, vars(args))  # or no-op
    torch.manual_seed(args.seed)
    dtype = getattr(torch, args.dtype)
    sites = list(dict.fromkeys(itertools.product(args.layer, args.site)))
    if args.cache_activations:
        return cache_activations(args, comms, sites, dtype)
    sched = schedule(args)
    state = read_resume(args, comms)
    t0 = time.time()

    # data: rows per site from the LM (or a file); a resumed run skips what it has made
    data, lm, tok, d_model = open_data(args, comms, sites, dtype,
                                       state["data"]["made"] if state else 0)
    batch = args.batch_size // comms.world  # each rank's share; a tp group gathers its ranks'
    # a run shorter than the buffer fills only what it will use (never less than two batches);
    # the first fill's use counts are staggered over 1..passes (buffer.py), 2 / (passes + 1) each
    size = min(args.buffer_size, max(2 * batch, math.ceil(sched["steps"] * batch * 2
                                                           / (args.passes + 1))))
    print0(f"loaded in {time.time() - t0:.1f}s; "
           f"{'resuming at step ' + str(state['step']) if state else 'filling'}"
           f" {len(sites)} buffer(s) of {size:,} rows")

    # buffers: per site, the first fill sets limits and norms; then rows within the limit
    runs = {key: [Run(args, key, n, d_model, dtype, comms) for n in feature_counts(args, d_model)]
            for key in sites}
    buffers, limits = {}, {}
    for i, key in enumerate(sites):
        first, limits[key] = ([], state["limits"][i]) if state else \
            first_fill(args, comms, key, data[key], size, d_model, runs[key])
        rest = model.kept_rows(data[key], limits[key], d_model)
        buffers[key] = ActivationBuffer(itertools.chain(first, rest), size, batch,
                                        seed=args.seed + comms.rank, device=args.device,
                                        limit=sched["steps"] * batch, passes=args.passes)
        sae0 = runs[key][0].sae
        print0(f"{key}: norms in {sae0.norm_in.item():.2f} out {sae0.norm_out.item():.2f}; "
               f"outlier limit {limits[key] and round(limits[key][0], 1)}")
    all_runs = [r for rs in runs.values() for r in rs]
    if state:  # everything else continues exactly where it stopped
        data.load_state_dict(state["data"])
        for obj, saved in zip([*buffers.values(), *all_runs], state["buffers"] + state["runs"]):
            obj.load_state_dict(saved)
        torch.set_rng_state(state["rng"])
    print_plan(args, comms, d_model, sched, all_runs, batch)

    # the loop, then the whole SAEs on rank 0, a held-out check and the checkpoints
    step, tokens = loop(args, comms, sched, data, buffers, runs, limits, logger, state,
                        d_model)
    for run in all_runs:
        run.sae = comms.gather_sae(run.sae)
    comms.close()
    if comms.rank > 0:
        return []
    heldout = {}
    if lm is not None and args.eval_tokens > 0:  # a first look; evaluate.py does the rest
        heldout = evaluate.heldout_check(lm, tok, {r.name: (r.key, r.sae) for r in all_runs},
                                         limits, args.dataset, args.context_size,
                                         args.lm_batch_size, args.eval_tokens)
    return save_all(args, all_runs, sched, limits, tokens, step, heldout)


def print_plan(args, comms, d_model, sched, all_runs, batch):
    """The derived arithmetic, printed once: SAEs, steps, the budget rule, the schedule."""
    comms.print0(
        f"{len(all_runs)} SAE(s): {', '.join(r.name for r in all_runs)} | D {d_model} | "
        f"{sched['steps']:,} steps x {args.batch_size} tokens = "
        f"{sched['steps'] * args.batch_size:,} tokens each ({args.passes} pass(es) over "
        f"{sched['steps'] * args.batch_size // args.passes:,} tokens)\n{args.rule}"
        f"\nschedule: warm-up {sched['warmup']} steps (asked {args.warmup_steps}; capped at 5% "
        f"of a short run) | K {args.k_init or d_model} -> {args.k} over {sched['anneal']} steps "
        f"| lr {args.lr:g}, decay to {args.lr_end:g} over the last {sched['decay']} steps"
        + (f" | L1 {args.l1_coef:g} warmed up over {sched['l1_warmup']} steps"
           if args.act == "vanilla" else "")
        + (f"\nparallel: {comms.world} ranks = dp {comms.dp} x tp {comms.tp}; {batch} rows per "
           f"rank per step, {d_model * max(r.sae.n_features for r in all_runs):,} of each "
           f"SAE's weights per matrix per rank" if comms.world > 1 else ""))


def loop(args, comms, sched, data, buffers, runs, limits, logger, state, d_model):
    """Every step, every SAE takes one minibatch from its site's buffer. Returns (steps, rows
    served)."""
    os.makedirs(args.out, exist_ok=True)
    start, tokens = (state["step"], state["tokens"]) if state else (0, 0)
    every = args.log_every or max(1, sched["steps"] // 40)
    t_train, step = time.time(), start
    bar = tqdm(total=sched["steps"], initial=start, desc="training", unit="step", leave=False,
               disable=None if comms.rank == 0 else True)  # on a terminal; the log lines stay
    for step in range(start, sched["steps"]):
        lr = lr_at(step, sched["steps"], args.lr, sched["warmup"], sched["decay"], args.lr_end)
        k = k_at(step, args.k, args.k_init or d_model, sched["anneal"])
        l1 = args.l1_coef * min(1.0, (step + 1) / max(sched["l1_warmup"], 1))  # Vanilla only
        batches = {key: buf.next_batch() for key, buf in buffers.items()}
        if comms.sum_(torch.tensor(int(None in batches.values()), device=args.device)).item():
            comms.print0(f"data ran out at step {step}")  # on some rank: all stop together
            break
        tokens += args.batch_size
        for key, b in batches.items():
            rows = comms.gather_rows(b)
            if not torch.isfinite(rows).all():
                raise ValueError(f"step {step + 1}: NaN or Inf in the activations of site {key}; "
                                 f"stopping (the last resumable checkpoint, if any, is kept)")
            for run in runs[key]:
                loss = run.step(rows, k, lr, args, tokens, l1)
                if not math.isfinite(loss):
                    raise ValueError(f"step {step + 1}: {run.name} loss is {loss} (NaN or Inf); "
                                     f"stopping (the last resumable checkpoint, if any, is kept)")
        bar.update()
        if (step + 1) % every == 0 or step + 1 == sched["steps"]:
            dt = time.time() - t_train
            eta = dt / (step + 1 - start) * (sched["steps"] - step - 1)
            for run in [r for rs in runs.values() for r in rs]:
                line = (f"{run.name} step {step + 1}/{sched['steps']} | {run.log_line(tokens)} | "
                        f"k {k} | lr {lr:.1e} | "
                        f"{(tokens - start * args.batch_size) / dt / 1e3:.1f}k tok/s | "
                        f"eta {eta:.0f}s")
                if comms.rank == 0:
                    bar.write(line)  # above the bar, which stays at the bottom
                    sys.stdout.flush()
                logger.log({f"{run.name}/{key}": v for key, v in run.logged.items()}
                           | {"k": k, "lr": lr, "tokens": tokens}, step=step + 1)
        if args.save_every \
                and tokens // args.save_every > (tokens - args.batch_size) // args.save_every:
            save_resume(args, comms, step + 1, tokens, data, buffers, runs, limits)
    bar.close()
    logger.finish()
    comms.print0(f"trained {tokens:,} rows ({tokens // args.passes:,} tokens x {args.passes} "
                 f"passes) in {time.time() - t_train:.0f}s")
    return step + 1, tokens


def save_resume(args, comms, step, tokens, data, buffers, runs, limits):
    """Everything to continue bit-identically: each object's state_dict(), one file per rank."""
    formats.save_state(comms.shard_path(os.path.join(args.out, "resume.safetensors")), {
        "args": resumable(args), "step": step, "tokens": tokens, "world": comms.world,
        "rng": torch.get_rng_state(), "data": data.state_dict(), "limits": list(limits.values()),
        "buffers": [b.state_dict() for b in buffers.values()],
        "runs": [r.state_dict() for rs in runs.values() for r in rs]})


def save_all(args, all_runs, sched, limits, tokens, step, heldout):
    """One self-describing checkpoint per SAE (formats.py); the last lines are `saved <path>`."""
    paths = []
    for run in all_runs:
        config = formats.training_config(args, run.key, run.sae, sched["anneal"], limits[run.key],
                                         tokens, step, heldout.get(run.name),
                                         {k: v for k, v in vars(args).items()
                                          if k not in RESUME_FREE})
        paths.append(os.path.join(args.out, f"{run.name}.safetensors"))
        formats.save_checkpoint(run.sae, config, paths[-1])
    for path in paths:
        print(f"saved {path}")
    return paths


def main(argv=None):
    try:
        return train(get_args(argv))
    except ValueError as e:  # bad input, found by any module: one line, exit code 2
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)


if __name__ == "__main__":
    main()
