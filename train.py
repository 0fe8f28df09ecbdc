"""Train Llama Scope TopK SAEs and transcoders (§3) on activations made on the fly.

    python train.py                                # L15R-8x-k50-TopK, embedded SmolLM2, ~8 min
    python train.py --layer 23 --site A --expansion 32
    python train.py --layer 7,15 --site R,TC --expansion 8,32   # 8 SAEs fed by one LM pass
    python train.py --layer all --site all --expansion 4 --plan-only   # a whole scope, planned
    torchrun --nproc_per_node=8 train.py --expansion 32 --tp 2  # 4 LM copies x SAEs in 2 shards

Reads top to bottom: flags (checked by plan.py, which also splits a scope into groups that fit
--max-memory), then the run in order (`train`, then `train_group` per group): set-up, data (LM
-> per-site buffers, data.py and buffer.py), the SAEs (recipe.Trainer: one SAE with its Adam),
the loop with the schedule of §3.3.2 (recipe.py), a check on held-out documents (metrics.py),
checkpoints (formats.py). The last lines printed are `saved <path>`, one per SAE of a group.
"""
import argparse
import itertools
import os
import sys
import time

import torch
from tqdm import tqdm

import activations
import data
import flags
import formats
import metrics
import model
import parallel
import plan
from buffer import ActivationBuffer, FanOut, return_freed_memory
from recipe import Trainer, first_fill, k_at, lr_at, step_site
from sae import SAE
from tracking import make_logger


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    g = p.add_argument_group(
        "what to train (every --layer x --site x width; SAEs that fit --max-memory together "
        "share each LM pass)")
    g.add_argument("--model", default=model.EMBEDDED_MODEL,
                   help="Hugging Face id or folder of a Llama-like causal LM (default: embedded)")
    g.add_argument("--layer", default="15",
                   help="block indices from 0: all, a list (7,15) or ranges (0-29, 0-3,15)")
    g.add_argument("--site", default="R",
                   help="all, or a list of R resid-post, A attn-out, M mlp-out, TC transcoder "
                        "(MLP in -> MLP out)")
    g.add_argument("--expansion", type=flags.csv(float), default=[8],
                   help="features per model dim")
    g.add_argument("--n-features", type=flags.csv(int), default=None,
                   help="F; overrides --expansion")
    g.add_argument("--act", choices=["topk", "vanilla"], default="topk",
                   help="TopK (eq. 5) or the ReLU + L1 baseline (§4.2)")
    g.add_argument("--k", type=int, default=50, help="active features per token after annealing")
    g.add_argument("--l1-coef", type=float, default=2e-4, help="Vanilla only: L1 weight")
    g.add_argument("--l1-warmup-frac", type=float, default=0.05,
                   help="Vanilla only: share of steps warming the L1 weight up linearly from 0, "
                        "as the released trainer does (default: SAELens's total // 20); 0 = off")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default=data.EMBEDDED_DATASET,
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
    g.add_argument("--max-norm-ratio", type=float, default=data.MAX_NORM_RATIO,
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
    g.add_argument("--warmup-steps", type=int, default=None,
                   help="linear warm-up steps (released: 5000); default: the paper's 10000, at "
                        "most 5%% of a run under 50M tokens")
    g.add_argument("--decay-frac", type=float, default=0.2, help="linear decay over this share")
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
    g.add_argument("--device", default=model.default_device())
    g.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="LM, buffer and the SAE's matmuls; the SAE's weights and Adam state are "
                        "always float32 (default: bfloat16 on GPU as in the paper, float32 on "
                        "CPU)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--tp", type=int, default=1,
                   help="tensor parallel: ranks that split each SAE's features; the rest of the "
                        "torchrun processes are data parallel (parallel.py)")
    g.add_argument("--max-memory", type=float, default=12.0,
                   help="GiB the run may use: buffers shrink, then the SAEs split into groups "
                        "trained one after another, each with its own LM pass (plan.py); the "
                        "default leaves room on a 16 GB machine")
    g.add_argument("--plan-only", action="store_true",
                   help="print the plan (groups, buffer rows, passes, batch, memory, time) from "
                        "the model's config alone, then exit")
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
    g.add_argument("--log-file", default=None, metavar="FILE",
                   help="also write every log line's numbers (per SAE: loss, mse, ev, l0, dead, "
                        "the share of features that ever fired) to FILE as JSON lines")
    args = flags.parse(p, argv, plan.RANGES)
    args.dtype = args.dtype or model.default_dtype(args.device)
    return args  # plan.check_flags resolves --layer, --site and the budget rule


# ----------------------------------------------------------------------------- data

def open_data(args, comms, sites, dtype, skip):
    """(FanOut of rows per site, lm, tok, D): one LM pass per batch of documents feeds every
    site, each rank reading its own documents; or the rows of an --activations file or cache
    (activations.py). skip: LM batches a resumed run has made already (tokenized again, not
    run)."""
    if args.activations:
        stream, d_model = activations.open_stream(args.activations, sites, comms.rank,
                                                  comms.world, dtype, args.seed, skip)
        return stream, None, None, d_model
    lm, tok = model.load_model(args.model, args.device, dtype)
    batches = data.document_batches(tok, args.dataset, "train", args.context_size,
                                    args.lm_batch_size, args.seed, rank=comms.rank,
                                    world=comms.world)
    producer = data.activation_producer(lm, tok, sites, itertools.islice(batches, skip, None))
    return FanOut(producer, sites, made=skip), lm, tok, lm.config.hidden_size


def cache_activations(args, comms, sites, dtype):
    """Run the LM once and write --total-tokens rows of every site (activations.write_cache):
    then train, sweep K or width, and evaluate from the folder with no LM (--activations DIR)."""
    if comms.world > 1:
        raise ValueError("--cache-activations runs in one process (no torchrun)")
    t0 = time.time()
    stream, lm, tok, d_model = open_data(args, comms, sites, dtype, 0)
    manifest = activations.write_cache(
        args.cache_activations, stream.producer, sites, args.total_tokens, d_model,
        dict(model=args.model, dataset=args.dataset, split="train", seed=args.seed,
             context_size=args.context_size, dtype=args.dtype))
    print(f"cached {manifest['rows']:,} rows of {', '.join(manifest['sites'])} in "
          f"{len(manifest['shards'])} shard(s) in {time.time() - t0:.0f}s")
    print(f"saved {args.cache_activations}")
    return [args.cache_activations]


def fill_buffers(args, comms, stream, trainers, size, batch, steps, d_model, state):
    """One ActivationBuffer per site, its first fill setting the site's outlier limit and its
    SAEs' norms; a resumed run takes the limits from its state. Returns (buffers,
    outlier_norm_limits)."""
    buffers, outlier_norm_limits = {}, {}
    for i, key in enumerate(trainers):
        if state:
            first, limit = [], state["limits"][i]
        else:
            first, limit = first_fill(stream[key], size, key, d_model, args.max_norm_ratio,
                                      [t.sae for t in trainers[key]], comms,
                                      center=args.init_bias == "mean")
        outlier_norm_limits[key] = limit
        rest = data.kept_rows(stream[key], limit, d_model)
        buffers[key] = ActivationBuffer(itertools.chain(first, rest), size, batch,
                                        seed=args.seed + comms.rank, device=args.device,
                                        rows_to_serve=steps * batch, passes=args.passes)
        sae = trainers[key][0].sae
        comms.print0(f"{key}: norms in {sae.norm_in.item():.2f} out {sae.norm_out.item():.2f}; "
                     f"outlier limit {limit and round(limit[0], 1)}")
    return buffers, outlier_norm_limits


# ----------------------------------------------------------------------------- the run, in order

def setup(args):
    """Every check before slow work (plan.py); torchrun's ranks, or no-op collectives for one
    process; the logger (a no-op without --wandb-project); the seed. Returns (comms, logger,
    the model's config)."""
    d_model, cfg = plan.check_flags(args)
    comms = parallel.Comms(args.tp, args.device)
    widths = args.n_features or []  # with --activations FILE, D is known once it is read
    if d_model:
        widths = plan.feature_counts(d_model, args.expansion, args.n_features)
    plan.check_layout(args.batch_size, args.buffer_size, widths, comms)
    args.device = comms.device
    logger = make_logger(args.wandb_project, vars(args), args.log_file) if comms.rank == 0 \
        else make_logger(None, None)
    torch.manual_seed(args.seed)
    return_freed_memory()
    return comms, logger, cfg


def train(args):
    # set-up: checks, ranks, logger, seed; the schedule (§3.3.2); the groups that fit in memory
    comms, logger, cfg = setup(args)
    dtype = getattr(torch, args.dtype)
    sites = list(dict.fromkeys(itertools.product(args.layer, args.site)))
    if args.cache_activations:
        return cache_activations(args, comms, sites, dtype)
    sched = plan.schedule_for(args)
    batch = args.batch_size // comms.world  # each rank's share; a tp group gathers its ranks'
    groups = plan.scope(cfg, sites, args, sched["steps"], batch, dtype.itemsize)
    comms.print0(plan.describe_groups(groups, args.max_memory))
    if args.plan_only:
        return []
    state = formats.read_resume(formats.resume_path(args.out, args.resume, comms), vars(args),
                                comms)
    paths = []
    for i, group in enumerate(groups):  # each group: its own LM pass, buffers and SAEs
        if state and i < state.get("group", 0):
            continue  # trained and saved before the run was stopped
        paths += train_group(args, comms, logger, sched, dtype, i, group,
                             state if state and state.get("group", 0) == i else None)
    logger.finish()
    comms.close()
    return paths


def train_group(args, comms, logger, sched, dtype, index, group, state):
    """One group of SAEs from one LM pass, in order: data, SAEs and buffers, the loop, the
    checkpoints. Returns their paths."""
    t0, sites, size = time.time(), group["sites"], group["rows"]
    stream, lm, tok, d_model = open_data(args, comms, sites, dtype,
                                         state["data"]["made"] if state else 0)
    sched = dict(sched, k_init=args.k_init or d_model)  # K starts at D unless told (§3.3.2)
    batch = args.batch_size // comms.world
    comms.print0(f"loaded in {time.time() - t0:.1f}s; "
                 f"{'resuming at step ' + str(state['step']) if state else 'filling'}"
                 f" {len(sites)} buffer(s) of {size:,} rows")

    # SAEs and buffers: per site, the first fill sets the outlier limit and the SAEs' norms
    widths = plan.feature_counts(d_model, args.expansion, args.n_features)
    trainers = {key: [new_trainer(args, key, n, d_model, dtype, comms) for n in widths]
                for key in sites}
    buffers, outlier_norm_limits = fill_buffers(args, comms, stream, trainers, size, batch,
                                                sched["steps"], d_model, state)
    all_trainers = every_trainer(trainers)
    if state:  # everything else continues exactly where it stopped, each from its state_dict()
        stream.load_state_dict(state["data"])
        for obj, saved in zip([*buffers.values(), *all_trainers],
                              state["buffers"] + state["runs"]):
            obj.load_state_dict(saved)
        torch.set_rng_state(state["rng"])
    comms.print0(plan.describe(args, sched, [t.name for t in all_trainers], d_model,
                               max(t.sae.n_features for t in all_trainers), comms, batch))

    # the loop, then the whole SAEs on rank 0, a held-out check and the checkpoints
    step, served = loop(args, comms, sched, stream, buffers, trainers, outlier_norm_limits,
                        logger, state, index)
    return finish(args, comms, lm, tok, trainers, sched, outlier_norm_limits, served, step)


def new_trainer(args, key, n_features, d_model, dtype, comms):
    """One SAE of F = n_features at site key, initialized (§3.3.1), with its optimizer."""
    sae = SAE(d_model, n_features, args.act, args.k, model.is_transcoder(key[1]),
              init_decoder_norm=args.init_decoder_norm)
    name = formats.run_name(key, n_features, d_model, args.act, args.k, args.l1_coef)
    return Trainer(name, key, sae, comms, dtype, args.lr, args.adam_betas,
                   batch_norm_mse=args.loss == "batch-norm-mse", grad_clip=args.grad_clip)


def every_trainer(trainers):
    return [t for ts in trainers.values() for t in ts]


def loop(args, comms, sched, stream, buffers, trainers, outlier_norm_limits, logger, state,
         group):
    """Every step, every SAE takes one minibatch from its site's buffer. Returns (steps, rows
    served): each step serves --batch-size rows, so rows served = tokens of data x passes."""
    os.makedirs(args.out, exist_ok=True)
    start, served = (state["step"], state["tokens"]) if state else (0, 0)
    log_every = args.log_every or max(1, sched["steps"] // 40)
    t_train, step = time.time(), start
    bar = tqdm(total=sched["steps"], initial=start, desc="training", unit="step", leave=False,
               disable=None if comms.rank == 0 else True)  # on a terminal; the log lines stay
    for step in range(start, sched["steps"]):
        lr = lr_at(step, sched["steps"], args.lr, sched["warmup"], sched["decay"], args.lr_end)
        k = k_at(step, args.k, sched["k_init"], sched["k_anneal_steps"])
        l1 = args.l1_coef * min(1.0, (step + 1) / max(sched["l1_warmup"], 1))  # Vanilla only
        batches = {key: buf.next_batch() for key, buf in buffers.items()}
        if comms.sum_(torch.tensor(int(None in batches.values()), device=args.device)).item():
            comms.print0(f"data ran out at step {step}")  # on some rank: all stop together
            break
        served += args.batch_size
        for key, rows in batches.items():  # every SAE of a site on the same rows
            step_site(trainers[key], comms.gather_rows(rows), step, k, lr, served, l1)
        bar.update()
        if (step + 1) % log_every == 0 or step + 1 == sched["steps"]:
            log(args, comms, bar, logger, trainers, sched, step, start, served, t_train, k, lr)
        if args.save_every \
                and served // args.save_every > (served - args.batch_size) // args.save_every:
            save_resumable(args, comms, group, step + 1, served, stream, buffers, trainers,
                           outlier_norm_limits)
    bar.close()
    comms.print0(f"trained {served:,} rows ({served // args.passes:,} tokens x {args.passes} "
                 f"passes) in {time.time() - t_train:.0f}s")
    return step + 1, served


def log(args, comms, bar, logger, trainers, sched, step, start, served, t_train, k, lr):
    """One fixed log line per SAE (rank 0 prints, above the bar), and the same to the logger."""
    dt = time.time() - t_train
    eta = dt / (step + 1 - start) * (sched["steps"] - step - 1)
    for trainer in every_trainer(trainers):
        line = (f"{trainer.name} step {step + 1}/{sched['steps']} | {trainer.log_line(served)} | "
                f"k {k} | lr {lr:.1e} | "
                f"{(served - start * args.batch_size) / dt / 1e3:.1f}k tok/s | eta {eta:.0f}s")
        if comms.rank == 0:
            bar.write(line)  # above the bar, which stays at the bottom
            sys.stdout.flush()
        logger.log({f"{trainer.name}/{key}": v for key, v in trainer.logged.items()}
                   | {"k": k, "lr": lr, "tokens": served}, step=step + 1)  # key: rows served


def save_resumable(args, comms, group, step, served, stream, buffers, trainers,
                   outlier_norm_limits):
    """Everything to continue bit-identically: the group and each of its objects' state_dict(),
    one file per rank. The file keeps its first names: `tokens` is rows served, `limits` the
    outlier norm limits, `runs` the trainers."""
    formats.save_resume(args.out, vars(args), comms, {
        "group": group, "step": step, "tokens": served, "rng": torch.get_rng_state(),
        "data": stream.state_dict(), "limits": list(outlier_norm_limits.values()),
        "buffers": [b.state_dict() for b in buffers.values()],
        "runs": [t.state_dict() for t in every_trainer(trainers)]})


def finish(args, comms, lm, tok, trainers, sched, outlier_norm_limits, served, step):
    """The whole SAEs on rank 0, a first look at held-out documents, one self-describing
    checkpoint per SAE (formats.py); the last lines printed are `saved <path>`."""
    all_trainers = every_trainer(trainers)
    for trainer in all_trainers:
        trainer.sae = comms.gather_sae(trainer.sae)
    if comms.rank > 0:
        return []
    heldout = {}
    if lm is not None and args.eval_tokens > 0:  # a first look; evaluate.py does the rest
        heldout = metrics.heldout_check(lm, tok, {t.name: (t.key, t.sae) for t in all_trainers},
                                        outlier_norm_limits, args.dataset, args.context_size,
                                        args.lm_batch_size, args.eval_tokens)
    paths, flags = [], formats.train_args(vars(args))
    source = activations.source(args.activations, args.model, args.dataset, args.context_size)
    for t in all_trainers:
        config = formats.training_config(flags, source, t.key, t.sae,
                                         sched["k_anneal_steps"], outlier_norm_limits[t.key],
                                         served, step, heldout.get(t.name), args.device)
        paths.append(os.path.join(args.out, f"{t.name}.safetensors"))
        formats.save_checkpoint(t.sae, config, paths[-1])
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
