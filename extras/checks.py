"""train.py's flags checked before any slow work, from the model's config alone (no weights):
which SAEs (`--layer all`, `0-29`, `3,7`; `--site all`, `R,TC`), whether they can run on this
model at all, the budget rule applied (recipe.budget_rule, reading what a row costs:
extras/plan.py), and what torchrun's dp x tp layout asks of the flags. Every failure is one line
(a ValueError: the script prints it and exits 2).
"""
import copy
import dataclasses
import itertools
import math
import os
import re

import torch

import data
import model
from extras import activations, plan
from extras.plan import feature_counts
from recipe import budget_rule, schedule

RANGES = {  # the range of every numeric flag of train.py (extras/flags.py), checked at parse
    "expansion": "(0, inf)", "n_features": "[1, inf)", "k": "[1, inf)", "l1_coef": "(0, inf)",
    "l1_warmup_frac": "[0, 1]", "context_size": "[2, inf)", "max_norm_ratio": "0 or (1, inf)",
    "total_tokens": "[1, inf)", "batch_size": "[1, inf)", "passes": "[1, inf)",
    "lr": "(0, inf)", "warmup_steps": "[0, inf)", "decay_frac": "[0, 1]", "lr_end": "[0, inf)",
    "k_anneal_frac": "[0, 1]", "k_init": "[1, inf)", "adam_betas": "[0, 1)",
    "grad_clip": "[0, inf)", "init_decoder_norm": "(0, inf)", "buffer_size": "[2, inf)",
    "lm_batch_size": "[1, inf)", "seed": "[0, inf)", "tp": "[1, inf)", "max_memory": "(0, inf)",
    "save_every": "[0, inf)", "log_every": "[0, inf)", "eval_tokens": "[0, inf)"}


# ----------------------------------------------------------------------------- which SAEs

def parse_layers(text, n_layers):
    """[L, ...] of --layer: `all` (every block of a model of n_layers), a comma list of indices
    and ranges (`3,7`, `0-29`, `0-3,15`), in the order given, repeats dropped."""
    parts = [part.strip() for part in str(text).split(",")]
    allowed = "allowed: all, a list (3,7) or ranges (0-29)"
    if "all" in parts:
        if len(parts) > 1:
            raise ValueError(f"--layer {text}: `all` stands alone; {allowed}")
        if not n_layers:
            raise ValueError("--layer all needs the model's layer count: with --activations "
                             "FILE give the layers")
        return list(range(n_layers))
    layers = []
    for part in parts:
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m or m[2] and int(m[2]) < int(m[1]):
            raise ValueError(f"--layer {text}: {part!r} is not a block index or a range a-b; "
                             f"{allowed}")
        layers += range(int(m[1]), int(m[2] or m[1]) + 1)
    return list(dict.fromkeys(layers))


def parse_sites(text):
    """[site, ...] of --site: `all` (R, A, M, TC) or a comma list of them."""
    parts = [part.strip() for part in str(text).split(",")]
    if "all" in parts and len(parts) > 1:
        raise ValueError(f"--site {text}: `all` stands alone; allowed: all or a list of "
                         f"{', '.join(model.SITES)}")
    if parts == ["all"]:
        return list(model.SITES)
    bad = ",".join(part for part in parts if part not in model.SITES)
    if bad:
        raise ValueError(f"--site {bad} is unknown; allowed: all, {', '.join(model.SITES)}")
    return list(dict.fromkeys(parts))


# ----------------------------------------------------------------------------- checks

def resolve(args):
    """(D, the model's config) from the config alone (an activation cache's shape, nothing from
    a single --activations file), with --layer and --site resolved to lists and the budget rule
    applied to args: it reads what a row costs for these SAEs."""
    cache = {}
    cfg = {}
    model.check_device(args.device)
    if args.activations and os.path.isdir(args.activations):
        cache = activations.read_cache(args.activations)
        deepest = max(site["layer"] for site in cache["sites"].values())
        cfg = {"hidden_size": cache["d_model"], "num_hidden_layers": deepest + 1}
    elif not args.activations:
        data.check_dataset(args.dataset)
        cfg = model.load_config(args.model)
    d_model = cfg.get("hidden_size")
    args.layer = parse_layers(args.layer, cfg.get("num_hidden_layers", 0))
    args.site = parse_sites(args.site)
    places = list(itertools.product(args.layer, args.site))
    if cache:
        activations.read_cache(args.activations, places)
    widths = feature_counts(d_model, args.expansion, args.n_features) if d_model else []
    # what a row costs its LM; a cache's rows cost what they cost its LM, so training from a
    # cache is training from the LM; a single file's LM is unknown: the token budget decides
    lm_cfg = model.load_config(cache["model"]) if cache.get("model") else cfg
    cost_ratio = None
    if lm_cfg.get("vocab_size") and widths and min(widths) > 0:  # else the --k check refuses
        cost_ratio = row_cost_ratio(args, lm_cfg, places, widths)
    args.passes, args.batch_size, args.init_bias, args.rule = budget_rule(
        args.total_tokens, args.passes, args.batch_size, args.init_bias, cost_ratio)
    return d_model, cfg


def row_cost_ratio(args, lm_cfg, places, widths):
    """What a row costs against the SAE steps it feeds (plan.costs) when each group of the plan
    makes its own rows: the groups planned under the rule's choice for one LM pass (a choice
    that rarely moves a scope's split). Flags no plan can be made from (checked next, each in
    its own line) leave one pass's ratio."""
    one_pass = plan.costs(lm_cfg, [places], widths)[2]
    trial = copy.copy(args)
    trial.passes, trial.batch_size, _, _ = budget_rule(
        args.total_tokens, args.passes, args.batch_size, args.init_bias, one_pass)
    steps = schedule(args.total_tokens, trial.passes, trial.batch_size).steps
    dtype_bytes = getattr(torch, args.dtype).itemsize
    try:
        planned = plan.groups(lm_cfg, places, trial, steps, trial.batch_size, dtype_bytes)
    except ValueError:
        return one_pass
    return plan.costs(lm_cfg, [group.places for group in planned], widths)[2]


def check_flags(args):
    """Every cheap check of train.py's flags (args), before any slow work: the model's config
    only, no weights (`resolve`). Returns (D, the model's config); D is None with --activations
    FILE (the file says)."""
    d_model, cfg = resolve(args)
    n_layers = cfg.get("num_hidden_layers", 0)
    widths = feature_counts(d_model, args.expansion, args.n_features) if d_model else []
    max_pos = cfg.get("max_position_embeddings") or args.context_size
    n_min = min(widths) if widths else math.inf
    half = args.buffer_size // 2
    bad_layer = [L for L in args.layer if not 0 <= L < n_layers] if n_layers else []
    by_rule = ""
    if "batch size" in args.rule:
        by_rule = " (chosen by the budget rule; give --batch-size)"
    log_folder = os.path.dirname(os.path.abspath(args.log_file or "."))
    checks = [  # (failed, the one line that says so), in the order a user would fix them
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
        (not 1 <= args.batch_size <= half,
         f"--batch-size {args.batch_size} must be in 1..{half} (half of --buffer-size "
         f"{args.buffer_size}){by_rule}"),
        (args.total_tokens * args.passes < args.batch_size,
         f"--total-tokens {args.total_tokens} x --passes {args.passes} is less than one batch "
         f"({args.batch_size})"),
        (args.k >= n_min, f"--k {args.k} must be less than the number of features ({n_min})"),
        (args.skip and args.site != ["TC"],
         f"--skip trains skip transcoders: give --site TC, not --site {','.join(args.site)}"),
        (args.k_init is not None and not args.k <= args.k_init <= n_min,
         f"--k-init {args.k_init} must be in {args.k}..{n_min}"),
        (args.resume not in (None, "auto") and not os.path.isfile(args.resume),
         f"--resume {args.resume}: no such file (give a path or `auto`)"),
        (args.log_file and not os.path.isdir(log_folder),
         f"--log-file {args.log_file}: no such folder")]
    for failed, message in checks:
        if failed:
            raise ValueError(message)
    return d_model, cfg


def schedule_for(args):
    """recipe.Schedule for train.py's flags: steps in all and of warm-up, decay, K-annealing
    and (Vanilla) the L1 warm-up (§3.3.2); K at step 0 is set once D is known."""
    steps = schedule(args.total_tokens, args.passes, args.batch_size, args.warmup_steps,
                     args.decay_frac, args.k_anneal_frac)
    l1_warmup = round(steps.steps * args.l1_warmup_frac) if args.act == "vanilla" else 0
    return dataclasses.replace(steps, l1_warmup=l1_warmup, lr=args.lr, lr_end=args.lr_end,
                               k=args.k, l1_coef=args.l1_coef)


def check_layout(args, d_model, comms):
    """What torchrun's layout asks of the flags: every rank an equal share of the batch, two
    per-rank batches in each buffer, features that split evenly over tp (d_model None: an
    --activations file, whose D is known once it is read)."""
    widths = args.n_features or []
    if d_model:
        widths = feature_counts(d_model, args.expansion, args.n_features)
    per_rank = args.batch_size // comms.world
    checks = [
        (args.batch_size % comms.world,
         f"--batch-size {args.batch_size} must be a multiple of the {comms.world} processes"),
        (per_rank > args.buffer_size // 2,
         f"--buffer-size {args.buffer_size} (per rank) must hold two per-rank minibatches of "
         f"{per_rank}"),
        (any(n % comms.tp for n in widths),
         f"--tp {comms.tp} must divide the number of features ({widths})"),
        (args.cache_activations and comms.world > 1,
         "--cache-activations runs in one process (no torchrun)")]
    for failed, message in checks:
        if failed:
            raise ValueError(message)
