"""What a training run will make, worked out before any slow work: whether train.py's flags can
run on this model at all, which SAEs, what a row costs, how much memory they need and how they
split into groups, how the ranks share the work, and the derived arithmetic printed once.

- `parse_layers`, `parse_sites`: `--layer all`, `0-29`, `3,7`; `--site all`, `R,TC`.
- `check_flags`: every cheap check, from the model's config alone (no weights): one line each.
- `feature_counts`: F of every SAE at each site (--n-features, else --expansion x D).
- `costs`: ms per token of the LM forward and per row of the SAEs it feeds (the budget rule).
- `groups`: the scope split into groups that fit --max-memory, each trained from its own LM pass,
  with the rows each site's buffer gets and the estimated peak memory and time.
- `buffer_rows`: rows per site's buffer: at most --buffer-size, less for a short run.
- `check_layout`: what torchrun's dp x tp layout asks of the flags (parallel.py).
- `describe`: the plan as train.py prints it: SAEs, steps, the budget rule, the schedule.
The recipe itself (budget rule, schedule) is recipe.py's.
Shapes: D model width, F features, L layer, C row width (D, or 2D for a transcoder).
"""
import itertools
import math
import os
import re

import activations
import data
import formats
import model
from buffer import first_fill_rows
from recipe import PAPER_WARMUP, budget_rule, schedule

GIB = 2 ** 30
# Costs measured here (2 CPU cores, float32, bench.py), per million weights a row goes through:
LM_MS_PER_MWEIGHT = 0.4 / (16 * 3.540096)  # the LM per token: 0.4 ms to SmolLM2's L15
SAE_MS_PER_MWEIGHT = 0.1 / (4608 * 576 / 1e6)  # one SAE step per row: 0.1 ms at D 576, F 4608
# Memory beyond what the estimate counts (Python, torch, tokenizer, allocator slack): measured
# as the default run's peak minus its estimate.
RUNTIME_BYTES = int(1.0 * GIB)
MIN_BUFFER_ROWS = 16_384  # fewer rows per buffer mix too few documents: split into groups
RANGES = {  # the range of every numeric flag of train.py (flags.py), checked right after parsing
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
    parts = [p.strip() for p in str(text).split(",")]
    if "all" in parts:
        if len(parts) > 1:
            raise ValueError(f"--layer {text}: `all` stands alone; allowed: all, a list (3,7) "
                             f"or ranges (0-29)")
        if not n_layers:
            raise ValueError("--layer all needs the model's layer count: with --activations "
                             "FILE give the layers")
        return list(range(n_layers))
    layers = []
    for part in parts:
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m or m[2] and int(m[2]) < int(m[1]):
            raise ValueError(f"--layer {text}: {part!r} is not a block index or a range a-b; "
                             f"allowed: all, a list (3,7) or ranges (0-29)")
        layers += range(int(m[1]), int(m[2] or m[1]) + 1)
    return list(dict.fromkeys(layers))


def parse_sites(text):
    """[site, ...] of --site: `all` (R, A, M, TC) or a comma list of them."""
    parts = [p.strip() for p in str(text).split(",")]
    if "all" in parts and len(parts) > 1:
        raise ValueError(f"--site {text}: `all` stands alone; allowed: all or a list of "
                         f"{', '.join(model.SITES)}")
    if parts == ["all"]:
        return list(model.SITES)
    bad = ",".join(p for p in parts if p not in model.SITES)
    if bad:
        raise ValueError(f"--site {bad} is unknown; allowed: all, {', '.join(model.SITES)}")
    return list(dict.fromkeys(parts))


# ----------------------------------------------------------------------------- checks


def resolve(args):
    """(D, the model's config) from the config alone (an activation cache's shape, nothing from
    a single --activations file), with --layer and --site resolved to lists and the budget rule
    applied to args: it reads what a row costs for these SAEs."""
    cache, cfg = {}, {}
    model.check_device(args.device)
    if args.activations and os.path.isdir(args.activations):
        cache = activations.read_cache(args.activations)
        cfg = {"hidden_size": cache["d_model"], "num_hidden_layers":
               1 + max(s["layer"] for s in cache["sites"].values())}
    elif not args.activations:
        data.check_dataset(args.dataset)
        cfg = model.load_config(args.model)
    d_model, n_layers = cfg.get("hidden_size"), cfg.get("num_hidden_layers", 0)
    args.layer, args.site = parse_layers(args.layer, n_layers), parse_sites(args.site)
    if cache:
        activations.read_cache(args.activations, itertools.product(args.layer, args.site))
    widths = feature_counts(d_model, args.expansion, args.n_features) if d_model else []
    # what a row costs its LM; a cache's rows cost what they cost its LM, so training from a
    # cache is training from the LM; a single file's LM is unknown: the token budget decides
    lm_cfg = model.load_config(cache["model"]) if cache.get("model") else cfg
    ratio = None
    if lm_cfg.get("vocab_size") and widths and min(widths) > 0:  # else the --k check refuses
        ratio = costs(lm_cfg, list(itertools.product(args.layer, args.site)), widths)[2]
    args.passes, args.batch_size, args.init_bias, args.rule = budget_rule(
        args.total_tokens, args.passes, args.batch_size, args.init_bias, ratio)
    return d_model, cfg


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
         f"{args.buffer_size})" + (" (chosen by the budget rule; give --batch-size)"
                                   if "batch size" in args.rule else "")),
        (args.total_tokens * args.passes < args.batch_size,
         f"--total-tokens {args.total_tokens} x --passes {args.passes} is less than one batch "
         f"({args.batch_size})"),
        (args.k >= n_min, f"--k {args.k} must be less than the number of features ({n_min})"),
        (args.k_init is not None and not args.k <= args.k_init <= n_min,
         f"--k-init {args.k_init} must be in {args.k}..{n_min}"),
        (args.resume not in (None, "auto") and not os.path.isfile(args.resume),
         f"--resume {args.resume}: no such file (give a path or `auto`)"),
        (args.log_file and not os.path.isdir(os.path.dirname(os.path.abspath(args.log_file))),
         f"--log-file {args.log_file}: no such folder")]
    for failed, message in checks:
        if failed:
            raise ValueError(message)
    return d_model, cfg


def schedule_for(args):
    """recipe.schedule for train.py's flags: steps in all and of warm-up, decay, K-annealing
    and (Vanilla) the L1 warm-up (§3.3.2)."""
    return schedule(args.total_tokens, args.passes, args.batch_size, args.warmup_steps,
                    args.decay_frac, args.k_anneal_frac,
                    args.l1_warmup_frac if args.act == "vanilla" else 0.0)


def feature_counts(d_model, expansion, n_features=None):
    """F of every SAE to train at each site: n_features (--n-features), else expansion x D."""
    return n_features or [round(e * d_model) for e in expansion]


# ----------------------------------------------------------------------------- cost and memory

def lm_weights(cfg):
    """(weights of one block, weights in all) of a Llama-like model, from its config alone."""
    D, inter = cfg["hidden_size"], cfg["intermediate_size"]
    head = cfg.get("head_dim") or D // cfg["num_attention_heads"]
    attn = 2 * D * cfg["num_attention_heads"] * head \
        + 2 * D * cfg.get("num_key_value_heads", cfg["num_attention_heads"]) * head
    block = attn + 3 * D * inter + 2 * D  # q, o, k, v; gate, up, down; two norms
    embed = cfg["vocab_size"] * D * (1 if cfg.get("tie_word_embeddings") else 2)
    return block, embed + cfg["num_hidden_layers"] * block + D


def costs(cfg, keys, widths):
    """(LM ms per token to the deepest site of keys, ms per row of every SAE it feeds (each site
    x each width), their ratio): what making a row costs against training on it, on 2 CPU cores
    in float32 (a GPU is faster at both; the budget rule reads the ratio)."""
    block, _ = lm_weights(cfg)
    lm = (max(L for L, _ in keys) + 1) * block / 1e6 * LM_MS_PER_MWEIGHT
    sae = len(keys) * sum(widths) * cfg["hidden_size"] / 1e6 * SAE_MS_PER_MWEIGHT
    return lm, sae, lm / sae


def memory(cfg, sites, widths, rows, batch, lm_batch, context, dtype_bytes):
    """Estimated peak bytes of training `sites` x `widths` from one LM pass with `rows` per
    buffer: the LM's weights and one forward with what it captures at every site (B x T rows
    each), every SAE's weights, gradients and two Adam moments (float32), the widest step's
    (N, F) scores, and the buffers: each site's rows, as many again queued for it while the
    others fill (FanOut), and a refill's copies."""
    D, inter = cfg["hidden_size"], cfg["intermediate_size"]
    width = {key: (2 if model.is_transcoder(key[1]) else 1) * D for key in sites}  # C per site
    fixed = RUNTIME_BYTES + lm_weights(cfg)[1] * dtype_bytes \
        + lm_batch * context * (6 * D + 3 * inter + sum(width.values())) * dtype_bytes
    saes = len(sites) * sum(4 * 4 * (2 * F * D + F + D) for F in widths)
    step = 3 * batch * max(widths) * 4
    buffers = rows * dtype_bytes * (2 * sum(width.values()) + 2 * max(width.values()))
    return fixed + saes + step + buffers


def scope(cfg, sites, args, steps, batch, dtype_bytes):
    """The run split into groups trained one after another, each from its own LM pass, so that
    each fits --max-memory: [{"sites", "rows" per buffer, "bytes", "minutes"}]. Sites are taken
    in layer order, so a group's forward stops early; a group grows while its buffers keep
    MIN_BUFFER_ROWS rows (or all a short run uses). From --activations (no LM config): one
    group with the rows --buffer-size allows."""
    want = buffer_rows(args.buffer_size, batch, steps, args.passes)
    if not cfg.get("vocab_size"):
        return [dict(sites=sites, rows=want, bytes=None, minutes=None)]
    widths = feature_counts(cfg["hidden_size"], args.expansion, args.n_features)
    max_bytes, need = args.max_memory * GIB, min(want, MIN_BUFFER_ROWS)

    def size(group, rows):
        return memory(cfg, group, widths, rows, batch, args.lm_batch_size, args.context_size,
                      dtype_bytes)
    split, group = [], []
    for key in sorted(sites, key=lambda key: (key[0], model.SITES.index(key[1]))):
        if size([key], need) > max_bytes:
            raise ValueError(f"--max-memory {args.max_memory:g} is too small for even one "
                             f"SAE: {formats.site_name(key)} needs "
                             f"{size([key], need) / GIB:.1f} GiB with {need:,} buffer rows")
        if group and size(group + [key], need) > max_bytes:
            split.append(group)
            group = []
        group.append(key)
    split.append(group)
    n = len(split)  # as many groups as the greedy split needs, but even in size when they fit
    order = [key for group in split for key in group]
    even = [order[len(order) * i // n:len(order) * (i + 1) // n] for i in range(n)]
    if all(size(group, need) <= max_bytes for group in even):
        split = even
    out = []
    for group in split:
        group = [key for key in sites if key in group]  # as given: the SAEs' init order
        fixed, per_row = size(group, 0), size(group, 1) - size(group, 0)
        rows = int(min(want, (max_bytes - fixed) // per_row))
        lm_ms, sae_ms, _ = costs(cfg, group, widths)  # the LM also runs the held-out check
        minutes = ((args.total_tokens + args.eval_tokens) * lm_ms
                   + steps * args.batch_size * sae_ms) / 6e4
        out.append(dict(sites=group, rows=rows, bytes=size(group, rows), minutes=minutes))
    return out


def describe_groups(groups, max_memory):
    """The plan of a scope as printed before the first fill: per group its sites, buffer rows,
    estimated peak memory and time (2 CPU cores, float32), and the totals."""
    lines = [f"plan: {sum(len(g['sites']) for g in groups)} site(s) in {len(groups)} group(s) "
             f"under --max-memory {max_memory:g} GiB, each group one LM pass:"]
    for i, g in enumerate(groups):
        names = [formats.site_name(key) for key in g["sites"]]
        shown = ", ".join(names) if len(names) <= 6 else f"{names[0]} ... {names[-1]}"
        est = "" if g["bytes"] is None else \
            f"; ~{g['bytes'] / GIB:.1f} GiB, ~{g['minutes']:.0f} min on 2 CPU cores"
        lines.append(f"  group {i}: {len(names)} site(s) {shown}; {g['rows']:,} buffer rows "
                     f"per site{est}")
    if groups[0]["bytes"] is not None:
        lines.append(f"  in all ~{sum(g['minutes'] for g in groups) / 60:.1f} h, peak "
                     f"~{max(g['bytes'] for g in groups) / GIB:.1f} GiB")
    return "\n".join(lines)


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


def describe(args, sched, names, d_model, widest, comms, batch):
    """The derived arithmetic of one group, as printed once: SAEs, steps, the budget rule, the
    schedule and the parallel layout. args: train.py's flags; sched: `schedule_for`'s; names:
    the SAEs; widest: the largest F."""
    steps, tokens = sched["steps"], sched["steps"] * args.batch_size
    warmup = "as given" if args.warmup_steps is not None else \
        f"the paper's {PAPER_WARMUP}, at most 5% of a short run"
    text = (f"{len(names)} SAE(s): {', '.join(names)} | D {d_model} | "
            f"{steps:,} steps x {args.batch_size} tokens = {tokens:,} tokens "
            f"each ({args.passes} pass(es) over {tokens // args.passes:,} tokens)\n{args.rule}"
            f"\nschedule: warm-up {sched['warmup']} steps ({warmup}) | K {sched['k_init']} -> "
            f"{args.k} over "
            f"{sched['k_anneal_steps']} steps | lr {args.lr:g}, decay to {args.lr_end:g} over "
            f"the last {sched['decay']} steps")
    if args.act == "vanilla":
        text += f" | L1 {args.l1_coef:g} warmed up over {sched['l1_warmup']} steps"
    if comms.world > 1:
        text += (f"\nparallel: {comms.world} ranks = dp {comms.dp} x tp {comms.tp}; {batch} "
                 f"rows per rank per step, {d_model * widest:,} of each SAE's weights per "
                 f"matrix per rank")
    return text
