"""What a training run will make, worked out before any slow work: whether train.py's flags can
run on this model at all, which SAEs, how large their buffers, how the ranks share the work, and
the derived arithmetic printed once.

- `check_flags`: every cheap check, from the model's config alone (no weights): one line each.
- `feature_counts`: F of every SAE at each site (--n-features, else --expansion x D).
- `buffer_rows`: rows per site's buffer: --buffer-size, or less for a run shorter than it.
- `check_layout`: what torchrun's dp x tp layout asks of the flags (parallel.py).
- `describe`: the plan as train.py prints it: SAEs, steps, the budget rule, the schedule.
The recipe itself (budget rule, schedule) is recipe.py's.
"""
import itertools
import math
import os

import activations
import data
import model
from buffer import first_fill_rows


def check_flags(args):
    """Every cheap check of train.py's flags (args), before any slow work: the model's config
    only, no weights. Returns D (None with --activations FILE: the file says)."""
    cache = {}
    if args.activations and os.path.isdir(args.activations):
        cache = activations.read_cache(args.activations, itertools.product(args.layer, args.site))
    model.check_device(args.device)
    if cache:
        cfg = {"hidden_size": cache["d_model"]}
    elif args.activations:
        cfg = {}  # a single file: D is known when it is read
    else:
        data.check_dataset(args.dataset)
        cfg = model.load_config(args.model)
    d_model, n_layers = cfg.get("hidden_size"), cfg.get("num_hidden_layers", 0)
    max_pos = cfg.get("max_position_embeddings") or args.context_size
    n_min = min(feature_counts(d_model, args.expansion, args.n_features)) if d_model else math.inf
    sizes, half = args.n_features or args.expansion, args.buffer_size // 2
    bad_site = ",".join(s for s in args.site if s not in model.SITES)
    bad_layer = [L for L in args.layer if not 0 <= L < n_layers] if n_layers else []
    checks = [  # (failed, the one line that says so), in the order a user would fix them
        (bad_site, f"--site {bad_site} is unknown; allowed: {', '.join(model.SITES)}"),
        (args.activations and not os.path.exists(args.activations),
         f"--activations {args.activations}: no such file or folder"),
        (args.activations and args.cache_activations,
         "--cache-activations runs the LM: it cannot read --activations"),
        (args.cache_activations and activations.is_cache(args.cache_activations),
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
        (args.k_init is not None and not args.k <= args.k_init <= n_min,
         f"--k-init {args.k_init} must be in {args.k}..{n_min}"),
        (args.resume not in (None, "auto") and not os.path.isfile(args.resume),
         f"--resume {args.resume}: no such file (give a path or `auto`)"),
        *[(not 0 <= getattr(args, name) <= 1,
           f"--{name.replace('_', '-')} {getattr(args, name)} must be in [0, 1]")
          for name in ("decay_frac", "k_anneal_frac", "l1_warmup_frac")]]
    for failed, message in checks:
        if failed:
            raise ValueError(message)
    return d_model


def feature_counts(d_model, expansion, n_features=None):
    """F of every SAE to train at each site: n_features (--n-features), else expansion x D."""
    return n_features or [round(e * d_model) for e in expansion]


def buffer_rows(buffer_size, batch, steps, passes):
    """Rows per site's buffer: a run shorter than --buffer-size fills only what it will use
    (never less than two per-rank batches); its first fill's use counts are staggered over
    1..passes (buffer.py)."""
    return min(buffer_size, max(2 * batch, first_fill_rows(steps * batch, passes)))


def check_layout(batch_size, buffer_size, n_features, comms):
    """What torchrun's layout asks of the flags: every rank an equal share of the batch, two
    per-rank batches in each buffer, features that split evenly over tp."""
    per_rank = batch_size // comms.world
    for failed, message in [
            (batch_size % comms.world,
             f"--batch-size {batch_size} must be a multiple of the {comms.world} processes"),
            (per_rank > buffer_size // 2,
             f"--buffer-size {buffer_size} (per rank) must hold two per-rank minibatches of "
             f"{per_rank}"),
            (any(n % comms.tp for n in n_features),
             f"--tp {comms.tp} must divide the number of features ({n_features})")]:
        if failed:
            raise ValueError(message)


def describe(flags, sched, names, d_model, widest, comms, batch):
    """The derived arithmetic, as printed once: SAEs, steps, the budget rule, the schedule and
    the parallel layout. flags: train.py's flags as a dict; sched: recipe.schedule's; names: the
    SAEs; widest: the largest F."""
    f, steps = flags, sched["steps"]
    text = (f"{len(names)} SAE(s): {', '.join(names)} | D {d_model} | "
            f"{steps:,} steps x {f['batch_size']} tokens = {steps * f['batch_size']:,} tokens "
            f"each ({f['passes']} pass(es) over {steps * f['batch_size'] // f['passes']:,} "
            f"tokens)\n{f['rule']}"
            f"\nschedule: warm-up {sched['warmup']} steps (asked {f['warmup_steps']}; capped at "
            f"5% of a short run) | K {sched['k_init']} -> {f['k']} over "
            f"{sched['k_anneal_steps']} steps | lr {f['lr']:g}, decay to {f['lr_end']:g} over "
            f"the last {sched['decay']} steps")
    if f["act"] == "vanilla":
        text += f" | L1 {f['l1_coef']:g} warmed up over {sched['l1_warmup']} steps"
    if comms.world > 1:
        text += (f"\nparallel: {comms.world} ranks = dp {comms.dp} x tp {comms.tp}; {batch} "
                 f"rows per rank per step, {d_model * widest:,} of each SAE's weights per "
                 f"matrix per rank")
    return text
