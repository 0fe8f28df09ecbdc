"""Train Llama Scope TopK SAEs and transcoders (§3) on activations made on the fly.

    python train.py                                # L15R-8x-k50-TopK, embedded SmolLM2, ~8 min
    python train.py --layer 23 --site A --expansion 32
    python train.py --layer 7,15 --site R,TC --expansion 8,32   # 8 SAEs fed by one LM pass
    python train.py --layer all --site all --expansion 4 --plan-only   # a whole scope, planned
    torchrun --nproc_per_node=8 train.py --expansion 32 --tp 2  # 4 LM copies x SAEs in 2 shards

Reads top to bottom: the flags, the state (a `Run`, a `Group` of SAEs fed by one LM pass), then
`train` (checks, groups that fit --max-memory) and per group `open_group` (data -> buffers, the
SAEs: recipe.Trainer), `loop` (§3.3.2), `finish` (held-out check, checkpoints: `saved <path>`).
"""
import argparse
import dataclasses
import itertools
import os
import sys
import time

import torch
from tqdm import tqdm

import data
import formats
import metrics
import model
import parallel
import recipe
from buffer import ActivationBuffer, FanOut
from extras import activations, checks, flags, plan, tracking
from sae import SAE


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    g = p.add_argument_group("what to train (every --layer x --site x width, sharing LM passes)")
    g.add_argument("--model", default=model.EMBEDDED_MODEL,
                   help="Hugging Face id or folder of a Llama-like causal LM (default: embedded)")
    g.add_argument("--layer", default="15",
                   help="block indices from 0: all, a list (7,15) or ranges (0-29, 0-3,15)")
    g.add_argument("--site", default="R",
                   help="all, or a list of R resid-post, A attn-out, M mlp-out, TC transcoder "
                        "(MLP in -> MLP out)")
    g.add_argument("--expansion", type=flags.csv(float), default=[8], help="features / D")
    g.add_argument("--n-features", type=flags.csv(int), default=None, help="F; not --expansion")
    g.add_argument("--act", choices=["topk", "vanilla"], default="topk",
                   help="TopK (eq. 5) or the ReLU + L1 baseline (§4.2)")
    g.add_argument("--k", type=int, default=50, help="active features per token after annealing")
    g.add_argument("--skip", action="store_true", help="TC: skip transcoders (+ W_skip x)")
    g.add_argument("--l1-coef", type=float, default=2e-4, help="Vanilla only: L1 weight")
    g.add_argument("--l1-warmup-frac", type=float, default=0.05,
                   help="Vanilla only: share of steps warming the L1 weight up from 0 (as SAELens "
                        "and the released trainer); 0 = off")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default=data.EMBEDDED_DATASET,
                   help="Hub dataset (streamed, e.g. cerebras/SlimPajama-627B), a .txt/.jsonl/"
                        ".json/.parquet file or folder, or the embedded Wikipedia summaries")
    g.add_argument("--context-size", type=int, default=1024, help="tokens per document, with BOS")
    g.add_argument("--activations", default=None,
                   help="train on pre-saved rows, no LM: a safetensors file of `activations` "
                        "(N, D) [+ `targets`], or a folder written by --cache-activations")
    g.add_argument("--cache-activations", default=None, metavar="DIR",
                   help="instead of training, run the LM once and write --total-tokens rows of "
                        "every --layer x --site to DIR (shards + manifest.json)")
    g.add_argument("--max-norm-ratio", type=float, default=data.MAX_NORM_RATIO,
                   help="drop tokens over this x the median norm (massive activations); 0 = off")
    g = p.add_argument_group("schedule (§3.3.2; paper values unless noted)")
    g.add_argument("--total-tokens", type=int, default=340_000,
                   help="tokens of data per SAE (paper: 800M for 8x, 1.6B for 32x), each seen "
                        "--passes times; the default takes ~10 min on CPU")
    g.add_argument("--batch-size", type=int, default=None,
                   help="tokens per step (paper: 2048); default: by the budget rule (printed)")
    g.add_argument("--passes", type=int, default=None,
                   help="times the SAE sees each row of data (paper: 1); default: budget rule")
    g.add_argument("--lr", type=float, default=8e-4, help="Adam lr (released: 2e-4 for 128x)")
    g.add_argument("--warmup-steps", type=int, default=None,
                   help="linear warm-up steps (released: 5000); default: the paper's 10000, at "
                        "most 5%% of a run under 50M tokens")
    g.add_argument("--decay-frac", type=float, default=0.2, help="linear decay over this share")
    g.add_argument("--lr-end", type=float, default=0.0, help="lr after decay (released: lr/100)")
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
                   help="zero: the paper; mean: b_dec at the mean target, b_enc centring the "
                        "input (the authors' library); default: by the budget rule")
    g.add_argument("--loss", choices=["mse", "batch-norm-mse"], default="mse",
                   help="batch-norm-mse: the released code's token error / centred target norm")
    g = p.add_argument_group("buffer (App. A.1)")
    g.add_argument("--buffer-size", type=int, default=131_072,
                   help="rows per site (released: 500K); with passes > 1 a row's uses spread "
                        "over ~passes x this many served rows")
    g.add_argument("--lm-batch-size", type=int, default=32, help="documents per LM forward")
    g = p.add_argument_group("system")
    g.add_argument("--device", default=model.default_device())
    g.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="LM, buffer and SAE matmuls (SAE weights, Adam: float32); default: "
                        "bfloat16 on GPU as in the paper, float32 on CPU")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--tp", type=int, default=1,
                   help="ranks that split each SAE's features; the rest are data parallel")
    g.add_argument("--max-memory", type=float, default=12.0,
                   help="GiB the run may use: buffers shrink, then the SAEs split into groups, "
                        "each with its own LM pass (extras/plan.py)")
    g.add_argument("--plan-only", action="store_true",
                   help="print the plan (groups, buffers, passes, batch, memory, time), exit")
    g.add_argument("--out", default="out", help="folder for checkpoints")
    g.add_argument("--save-every", type=int, default=0,
                   help="tokens between resumable checkpoints (<out>/resume.safetensors); 0 = off")
    g.add_argument("--resume", default=None,
                   help="continue from this resumable checkpoint; auto: <out>/resume.safetensors")
    g = p.add_argument_group("logging")
    g.add_argument("--log-every", type=int, default=0, help="steps between log lines; 0 = ~40")
    g.add_argument("--eval-tokens", type=int, default=100_000,
                   help="held-out tokens scored after training (§4.4: 100K); 0 = off")
    g.add_argument("--wandb-project", default=None, help="log to this Weights & Biases project")
    g.add_argument("--log-file", default=None, metavar="FILE",
                   help="every log line's numbers (and the share of features that ever fired) "
                        "to FILE as JSON lines")
    args = flags.parse(p, argv, checks.RANGES)
    args.dtype = args.dtype or model.default_dtype(args.device)
    return args  # checks.check_flags resolves --layer, --site and the budget rule


# ----------------------------------------------------------------------------- the state of a run

@dataclasses.dataclass
class Run:
    """What every group of a run shares."""
    args: argparse.Namespace  # the flags, checked and resolved (extras/checks.py)
    comms: parallel.Comms  # this process's place among torchrun's, and the collectives
    logger: tracking.Loggers  # W&B and/or a JSON-lines file, or nothing
    schedule: recipe.Schedule  # §3.3.2: lr, K, L1 weight at each step
    dtype: torch.dtype  # the LM's, the buffers' and the SAE matmuls' precision
    batch: int  # rows per step on this rank


@dataclasses.dataclass
class Group:
    """One group of SAEs trained from one LM pass, and where its loop stands."""
    index: int  # in the plan
    stream: FanOut  # rows per place: the LM's, or pre-saved
    lm: object  # the LM (None when training from --activations)
    tok: object  # its tokenizer
    schedule: recipe.Schedule  # the run's, K starting at D unless --k-init
    trainers: dict  # place -> [recipe.Trainer], one per width
    buffers: dict = dataclasses.field(default_factory=dict)  # place -> ActivationBuffer
    outlier_norm_limits: dict = dataclasses.field(default_factory=dict)  # place -> limit
    step: int = 0  # steps done
    served: int = 0  # rows served so far, per SAE: tokens of data x passes
    start_step: int = 0  # the step this process started at (later when resumed)
    started: float = 0.0  # when (time.time()), for the log's speed and ETA

    def all_trainers(self):
        return [trainer for trainers in self.trainers.values() for trainer in trainers]

    def state_dict(self):
        """Everything to continue bit-identically, each object's own state_dict(); `tokens` is
        rows served, `limits` the outlier norm limits, `runs` the trainers (the file's names)."""
        return {"group": self.index, "step": self.step, "tokens": self.served,
                "rng": torch.get_rng_state(), "data": self.stream.state_dict(),
                "limits": list(self.outlier_norm_limits.values()),
                "buffers": [buffer.state_dict() for buffer in self.buffers.values()],
                "runs": [trainer.state_dict() for trainer in self.all_trainers()]}

    def load_state_dict(self, state):
        """Where a saved group stood but its buffers (they load theirs as they open)."""
        self.stream.load_state_dict(state["data"])
        for trainer, saved in zip(self.all_trainers(), state["runs"]):
            trainer.load_state_dict(saved)
        torch.set_rng_state(state["rng"])
        self.step = state["step"]
        self.served = state["tokens"]


# ----------------------------------------------------------------------------- the run, in order

def setup(args):
    """(the Run, the model's config): every check before slow work (extras/checks.py), torchrun's
    ranks (or no-op collectives), the logger (or a no-op one), the seed."""
    d_model, cfg = checks.check_flags(args)
    comms = parallel.Comms(args.tp, args.device)
    checks.check_layout(args, d_model, comms)
    args.device = comms.device
    logger = tracking.make_logger(args.wandb_project, vars(args), args.log_file, comms.rank)
    torch.manual_seed(args.seed)
    plan.return_freed_memory(places=len(args.layer) * len(args.site))
    batch = args.batch_size // comms.world  # a tensor-parallel group gathers its ranks' rows
    run = Run(args, comms, logger, checks.schedule_for(args), getattr(torch, args.dtype), batch)
    return run, cfg


def train(args):
    # set-up: checks, ranks, logger, seed, the schedule (§3.3.2)
    run, cfg = setup(args)
    places = list(dict.fromkeys(itertools.product(args.layer, args.site)))
    if args.cache_activations:  # instead of training: the LM's rows to disk, for later runs
        stream, _, _, d_model = open_data(run, places, 0)
        return activations.cache_from_lm(args, stream.producer, places, d_model)
    # the groups that fit --max-memory, each trained from its own LM pass
    plans = plan.groups(cfg, places, args, run.schedule.steps, run.batch, run.dtype.itemsize)
    run.comms.print0(plan.describe_groups(plans, args, cfg, run.dtype))
    if args.plan_only:
        return []
    # a resumed run skips the groups it saved and continues the one it stopped in
    state = formats.read_resume(args.out, args.resume, vars(args), run.comms)
    resumed_group = state.get("group", 0) if state else 0
    paths = []
    for index, group_plan in enumerate(plans):
        if index < resumed_group:
            continue  # trained and saved before the run was stopped
        group = open_group(run, index, group_plan, state if index == resumed_group else None)
        loop(run, group)
        paths += finish(run, group)
    run.logger.finish()
    run.comms.close()
    return paths


def open_data(run, places, skip):
    """(FanOut of rows per place, lm, tok, D): one LM pass per batch of documents feeds every
    place, each rank reading its own documents; or pre-saved rows (extras/activations.py).
    skip: LM batches a resumed run has made already (tokenized again, not run)."""
    args = run.args
    comms = run.comms
    if args.activations:
        stream, d_model = activations.open_stream(args.activations, places, comms, run.dtype,
                                                  args.seed, skip)
        return stream, None, None, d_model
    lm, tok = model.load_model(args.model, args.device, run.dtype)
    docs = data.iter_documents(args.dataset, "train", seed=args.seed)
    docs = itertools.islice(docs, comms.rank, None, comms.world)  # each rank its own documents
    batches = data.token_batches(tok, docs, args.context_size, args.lm_batch_size)
    producer = data.activation_producer(lm, tok, places, itertools.islice(batches, skip, None))
    return FanOut(producer, places, made=skip), lm, tok, lm.config.hidden_size


def open_group(run, index, group_plan, state):
    """A group ready to train: its data, its SAEs (initialized, §3.3.1) with their optimizers, a
    buffer per place; a resumed group exactly where it stopped."""
    args = run.args
    t0 = time.time()
    skip = state["data"]["made"] if state else 0
    stream, lm, tok, d_model = open_data(run, group_plan.places, skip)
    doing = f"resuming at step {state['step']}" if state else "filling"
    run.comms.print0(f"loaded in {time.time() - t0:.1f}s; {doing} {len(group_plan.places)} "
                     f"buffer(s) of {group_plan.rows:,} rows")
    # the SAEs: every place x width, each with its Adam
    widths = plan.feature_counts(d_model, args.expansion, args.n_features)
    trainers = {place: [new_trainer(run, place, n, d_model) for n in widths]
                for place in group_plan.places}
    schedule = dataclasses.replace(run.schedule, k_init=args.k_init or d_model)  # K from D
    group = Group(index, stream, lm, tok, schedule, trainers)
    if state:  # the SAEs, Adam, the data's position and the RNG as they were
        group.load_state_dict(state)
    # a buffer per place; its first fill sets the place's outlier norm limit and SAE norms
    for i, place in enumerate(group_plan.places):
        saved = (state["limits"][i], state["buffers"][i]) if state else None
        open_buffer(run, group, place, group_plan.rows, saved)
    run.comms.print0(plan.describe(args, schedule, group.all_trainers(), run.comms))
    return group


def new_trainer(run, place, n_features, d_model):
    """One SAE of F = n_features at a place, initialized (§3.3.1), with its optimizer."""
    args = run.args
    sae = SAE(d_model, n_features, args.act, args.k, model.is_transcoder(place[1]),
              init_decoder_norm=args.init_decoder_norm, skip=args.skip)
    sae.compute_dtype = run.dtype  # the matmuls; its weights and Adam's state stay float32
    name = formats.run_name(place, sae, args.l1_coef)
    return recipe.Trainer(name, place, sae, run.comms, args.adam_betas,
                          batch_norm_mse=args.loss == "batch-norm-mse", grad_clip=args.grad_clip)


def open_buffer(run, group, place, size, saved=None):
    """The place's ActivationBuffer of `size` rows: its first fill sets the place's outlier norm
    limit and its SAEs' norms (§3.3.3); saved: (the limit, the buffer's state) of a resumed run."""
    args = run.args
    saes = [trainer.sae for trainer in group.trainers[place]]
    first = []
    if saved:
        limit = saved[0]
    else:
        rows, limit = recipe.first_fill(group.stream[place], size, place, args.max_norm_ratio,
                                        run.comms)
        recipe.set_norms(saes, rows[:size], limit, run.comms, center=args.init_bias == "mean")
        first = [data.drop_outliers(rows, limit, saes[0].d_model)]
    rest = (data.drop_outliers(rows, limit, saes[0].d_model) for rows in group.stream[place])
    buffer = ActivationBuffer(itertools.chain(first, rest), size, run.batch,
                              seed=args.seed + run.comms.rank, device=args.device,
                              rows_to_serve=group.schedule.steps * run.batch, passes=args.passes)
    if saved:
        buffer.load_state_dict(saved[1])
    group.buffers[place] = buffer
    group.outlier_norm_limits[place] = limit
    norms = f"norms in {saes[0].norm_in.item():.2f} out {saes[0].norm_out.item():.2f}"
    run.comms.print0(f"{place}: {norms}; outlier limit {limit and round(limit[0], 1)}")


def loop(run, group):
    """Every step, every SAE takes one minibatch from its place's buffer (--batch-size rows)."""
    args = run.args
    comms = run.comms
    log_every = args.log_every or max(1, group.schedule.steps // 40)
    os.makedirs(args.out, exist_ok=True)
    group.start_step = group.step
    group.started = time.time()
    bar = tqdm(total=group.schedule.steps, initial=group.step, desc="training", unit="step",
               leave=False, disable=None if comms.rank == 0 else True)  # on a terminal only
    for step in range(group.start_step, group.schedule.steps):
        # 1. the next minibatch of every place; when one rank runs dry, all stop together
        batches = {place: buffer.next_batch() for place, buffer in group.buffers.items()}
        ran_dry = torch.tensor(int(None in batches.values()), device=args.device)
        if comms.sum_(ran_dry).item():
            comms.print0(f"data ran out at step {step}")
            break
        group.served += args.batch_size
        # 2. every SAE of a place steps on the same rows, at this step's lr and K (§3.3.2)
        for place, rows in batches.items():
            recipe.step_site(group.trainers[place], comms.gather_rows(rows), step,
                             group.schedule, group.served)
        group.step = step + 1
        bar.update()
        # 3. a log line now and then; a resumable checkpoint every --save-every rows
        if group.step % log_every == 0 or group.step == group.schedule.steps:
            log(run, group, bar)
        if args.save_every and group.served % args.save_every < args.batch_size:
            formats.save_resume(args.out, vars(args), comms, group.state_dict())  # each rank
    bar.close()
    comms.print0(f"trained {group.served:,} rows ({group.served // args.passes:,} tokens x "
                 f"{args.passes} passes) in {time.time() - group.started:.0f}s")


def log(run, group, bar):
    """One fixed log line per SAE (rank 0 prints, above the bar), and the same to the logger."""
    step = group.step
    k = group.schedule.k_at(step - 1)
    lr = group.schedule.lr_at(step - 1)
    elapsed = time.time() - group.started
    speed = (group.served - group.start_step * run.args.batch_size) / elapsed / 1e3  # k rows/s
    eta = elapsed / (step - group.start_step) * (group.schedule.steps - step)
    for trainer in group.all_trainers():
        s = trainer.summary(group.served)
        line = (f"{trainer.name} step {step}/{group.schedule.steps} | loss {s['loss']:.4f} | ev "
                f"{s['ev']:.3f} | l0 {s['l0']:.1f} | dead {100 * s['dead']:.1f}% | k {k} | "
                f"lr {lr:.1e} | {speed:.1f}k tok/s | eta {eta:.0f}s")
        if run.comms.rank == 0:
            bar.write(line)  # above the bar, which stays at the bottom
            sys.stdout.flush()
        values = {f"{trainer.name}/{key}": value for key, value in s.items()}
        run.logger.log(values | {"k": k, "lr": lr, "tokens": group.served}, step=step)


def finish(run, group):
    """The whole SAEs on rank 0, a first look at held-out documents, one self-describing
    checkpoint per SAE (formats.py); the last lines printed are `saved <path>`."""
    args = run.args
    trainers = group.all_trainers()
    for trainer in trainers:  # the whole SAEs on rank 0: tensor-parallel shards gathered
        trainer.sae = run.comms.gather_sae(trainer.sae)
    if run.comms.rank > 0:
        return []
    heldout = {}
    if group.lm is not None and args.eval_tokens > 0:  # a first look; evaluate.py does the rest
        batches = data.heldout_batches(group.tok, args.dataset, args.context_size,
                                       args.lm_batch_size)
        saes = {trainer.name: (trainer.place, trainer.sae) for trainer in trainers}
        heldout = metrics.heldout_check(group.lm, group.tok, batches, saes,
                                        group.outlier_norm_limits, args.eval_tokens)
    train_args = formats.run_flags(vars(args))
    source = activations.source(args.activations, args.model, args.dataset, args.context_size)
    paths = []
    for trainer in trainers:  # one self-describing checkpoint per SAE
        trained = dict(k_anneal_steps=group.schedule.k_anneal_steps, rows_served=group.served,
                       outlier_norm_limit=group.outlier_norm_limits[trainer.place],
                       step=group.step, heldout=heldout.get(trainer.name), device=args.device)
        config = formats.training_config(trainer.sae, trainer.place, source, train_args, trained)
        paths.append(os.path.join(args.out, f"{trainer.name}.safetensors"))
        formats.save_checkpoint(trainer.sae, config, paths[-1])
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
