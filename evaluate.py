"""Evaluate any checkpoint the way §4 of the paper does, and look inside it.

    python evaluate.py out/L15R-8x-k50-TopK.safetensors [--json m.json] [--tokens N] [--plot DIR]
    python evaluate.py out/L15R-8x-k50-TopK-JumpReLU.safetensors --mode topk  # §C: folding hurts?
    python evaluate.py out/L15R-8x-k50-TopK.safetensors --features 12,345 --top 20   # §4.3, §4.6
    python evaluate.py out/L15R-8x-k50-TopK.safetensors --long-context 8192          # §4.5.1
    python evaluate.py out/L15R-8x-k50-TopK.safetensors --chat wiki-chat [--eval-model ID]
    python evaluate.py fnlp/Llama3_1-8B-Base-LXR-8x:Llama3_1-8B-Base-L15R-8x     # a released SAE
    python evaluate.py out/ --tokens 20000 --json scope.json --plot plots/    # a scope, Fig. 10

Everything comes from the file: model, layer, site, normalization, the massive-activation limit,
and where and in what precision to run (its training device type and dtype, when that kind of
device is here; --device, --dtype override). Any SAE is read in inference form (folded, unit
decoder norms: inference.load_sae), a released one with the authors' recipe. Only held-out
documents are read (data.py: every 10th document of any dataset), or chats.
Reported (metrics.py): L0; explained variance, eq. 6, and the centred one peers use; `mse` in the
SAE's normalized space; CE clean, spliced, zero-ablated and `delta_lm_loss` (§4.1), KL; firing
frequencies (§4.4). --features (features.py): frequency, top contexts (App. D layout) and decoder
neighbours against the Johnson-Lindenstrauss baseline (§4.6). --long-context T: MSE and L0 by
position on held-out documents of at least T tokens (§4.5.1). --eval-model ID: the same metrics on
another model's activations at the same site, side by side; --chat DATA: on conversations
rendered by the instruct model's chat template (§4.5.2). --saebench-json: SAEBench's core file.
A folder of checkpoints (a scope, scope.py) is evaluated in one pass (metrics.scope_metrics): its
JSON holds one entry per SAE with the keys of a single evaluation; --plot draws Fig. 10.
"""
import argparse
import json
import os
import sys
import time

import torch

import activations
import data
import features
import flags
import formats
import inference
import metrics
import model
import plots
import saebench
import scope

KEYS = ["n_tokens", "l0", "explained_variance", "explained_variance_centered", "mse", "ce_loss",
        "ce_loss_with_sae", "delta_lm_loss", "ce_loss_ablated", "kl_div_with_sae",
        "kl_div_ablated", "dead_frac", "ultra_active_frac"]
NOTES = {"dead_frac": "   never fired on any of these tokens",
         "ultra_active_frac": "   fired on more than 10% of them (§4.4)"}
WINDOW = 100_000  # §4.4 counts never-firing features over 100K tokens
RANGES = {"tokens": "[1, inf)", "long_context": "0 or [2, inf)", "top": "[1, inf)",
          "max_norm_ratio": "0 or (1, inf)"}  # every numeric flag's range (flags.py)


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Evaluate an SAE checkpoint (§4)")
    p.add_argument("checkpoint", help="a train.py or postprocess.py checkpoint (.safetensors), or "
                                      "a released SAE: its folder or `[hf://]owner/repo:sub`")
    p.add_argument("--json", default=None, help="write the metrics (features, buckets) here")
    p.add_argument("--tokens", type=int, default=100_000,
                   help="held-out tokens to evaluate (§4.4 counts never-firing features over "
                        "100K; the whole held-out split when smaller)")
    p.add_argument("--dataset", default=None, help="default: the one it was trained on")
    p.add_argument("--chat", default=None, metavar="DATA",
                   help="§4.5.2: evaluate on conversations rendered by the instruct model's chat "
                        f"template instead of held-out documents: {data.EMBEDDED_CHAT} "
                        "(embedded), a .jsonl/.json/.parquet file or a Hub dataset id (e.g. "
                        "allenai/WildChat-1M) with a `messages` or `conversation` column")
    p.add_argument("--model", default=None, help="the LM (default: the one the file names)")
    p.add_argument("--mode", choices=["topk", "jumprelu"], default=None,
                   help="inference of a folded TopK SAE (default: what the file says)")
    p.add_argument("--plot", default=None, help="folder for the PNG plot (Fig. 4, or Fig. 5)")
    p.add_argument("--max-norm-ratio", type=float, default=None,
                   help="the token rule, one for every SAE: tokens above this x the site's "
                        "median norm on training rows are not scored (massive activations); "
                        "default: as trained (the checkpoint's limit; for a released SAE 10, "
                        "train.py's default); 0 = score them too. Printed as `token rule:`")
    model.placement_args(p)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--activations", default=None,
                   help="evaluate on pre-saved rows (no CE): a safetensors file of "
                        "`activations` [+ `targets`], or a --cache-activations folder")
    g.add_argument("--features", default=None,
                   help="comma list of feature ids to inspect (features.py) instead of metrics")
    g.add_argument("--long-context", type=int, default=0,
                   help="T: MSE and L0 by position on held-out documents of at least T "
                        "tokens, each truncated to T (§4.5.1); 0 = off")
    g.add_argument("--eval-model", default=None,
                   help="also evaluate on this model's activations at the same site (§4.5.2)")
    p.add_argument("--top", type=int, default=20, help="--features: contexts per feature")
    p.add_argument("--saebench-json", default=None, metavar="FILE",
                   help="also write SAEBench's core-eval file (CoreEvalOutput), from a pass "
                        "of its own protocol over ~--tokens packed held-out tokens")
    p.add_argument("--saebench-details", action="store_true", help="with per-feature values")
    p.add_argument("--html", default=None, metavar="FILE",
                   help="--features: also write one self-contained HTML page of them here")
    return flags.parse(p, argv, RANGES)


def check_against_sae(args, sae):
    """The checks that need the SAE (its width, its threshold) but no LM. Returns the feature
    ids of --features (None without)."""
    if args.mode == "jumprelu" and sae.threshold is None:
        raise ValueError(f"--mode jumprelu needs a post-processed checkpoint (postprocess.py), "
                         f"got a {sae.act} SAE")
    feats = args.features and [v.strip() for v in args.features.split(",")]
    if feats and not all(v.isdigit() and int(v) < sae.n_features for v in feats):
        raise ValueError(f"--features {args.features}: give feature ids in "
                         f"0..{sae.n_features - 1}, comma separated")
    if args.saebench_json and (args.activations or feats or args.long_context or args.eval_model
                               or args.chat):
        raise ValueError(f"--saebench-json {args.saebench_json} reads held-out documents through "
                         f"the LM: not with --activations, --features, --long-context, "
                         f"--eval-model or --chat")
    if args.chat and (args.activations or feats or args.long_context or args.dataset):
        raise ValueError(f"--chat {args.chat} replaces the held-out documents of a plain or "
                         f"--eval-model evaluation: not with --activations, --features, "
                         f"--long-context or --dataset")
    if args.html and not feats:
        raise ValueError(f"--html {args.html} needs --features (the features to show)")
    return feats and [int(v) for v in feats]


def evaluate(args):
    """The evaluation the flags ask for: on pre-saved rows, or through the LM (metrics, features,
    long context, or two models side by side), or of a folder of checkpoints; prints it, returns
    what --json writes."""
    released = os.path.isfile(os.path.join(args.checkpoint, "hyperparams.json"))
    if os.path.isdir(args.checkpoint) and not released:
        return evaluate_scope(args)
    sae, config, (args.device, args.dtype, note) = inference.load_sae(
        args.checkpoint, args.model, args.device, args.dtype)
    dtype = getattr(torch, args.dtype)  # the LM's and the SAE's matmuls; its weights float32
    print(f"running on {args.device} in {args.dtype} ({note})")
    feats = check_against_sae(args, sae)
    sae.act = args.mode or sae.act
    name, t0 = formats.sae_name(args.checkpoint), time.time()
    dataset = args.dataset or config.get("dataset_path")
    if args.activations:
        rows = activations.activation_rows(args.activations, (config["layer"], config["site"]),
                                           args.tokens)
        out = metrics.reconstruction_metrics(sae, rows,
                                             config["dataset_average_activation_norm"]["out"],
                                             freq=True)
        return report(args, name, sae, out, t0)
    lm_name = config.get("model_name")  # every check before the slow load
    max_pos = inference.check_lm(lm_name, sae, config).get("max_position_embeddings") \
        or args.long_context
    if args.long_context and not 2 <= args.long_context <= max_pos:
        raise ValueError(f"--long-context {args.long_context} is out of range: allowed "
                         f"2-{max_pos} ({lm_name}'s max_position_embeddings)")
    if args.eval_model:
        inference.check_lm(args.eval_model, sae, config)
    chat_name, chat_tok = None, None
    if args.chat:
        chat_name, chat_tok = data.chat_tokenizer([n for n in (args.eval_model, lm_name) if n],
                                                  args.chat)
    source = f"chats {args.chat} in {chat_name}'s chat template" if args.chat else \
        f"held-out {dataset}"
    lm, tok = model.load_model(lm_name, args.device, dtype)
    config, rule = inference.token_rule(lm, tok, config, sae.d_model, args.max_norm_ratio,
                                        args.dataset)
    print(f"token rule: {rule}")
    if feats:
        return dump(args, features.show(lm, tok, inference.for_lm(sae, config, lm), config, feats,
                                        args.tokens, args.top, dataset, args.html))
    if args.long_context:
        return report_long_context(args, lm, tok, sae, config, name, dataset, t0)
    sae_lm = inference.for_lm(sae, config, lm)
    out = metrics.lm_metrics(lm, chat_tok or tok, sae_lm, config, args.tokens, dataset,
                             chat=args.chat)
    out.update(data=source, token_rule=rule)
    if args.saebench_json:  # its own pass, SAEBench's protocol (saebench.py)
        run = saebench.evaluate(lm, tok, sae_lm, config, dataset, saebench.n_batches(args.tokens))
        saebench.write(args.saebench_json, *run, sae, config, args.dtype, dataset,
                       args.saebench_details)
        print(f"wrote {args.saebench_json} (SAEBench core, its protocol: saebench.py)")
    if not args.eval_model:
        return report(args, name, sae, out, t0)
    del lm
    return two_models(args, sae, config, out, chat_tok, dataset, name, t0)


def evaluate_scope(args):
    """Every checkpoint of a folder from one pass over held-out documents (scope.py): a table
    in layer order, Fig. 10 with --plot, one entry per SAE in --json."""
    other = [flag for flag in ("activations", "features", "long_context", "eval_model", "chat",
                               "saebench_json", "mode", "html") if getattr(args, flag)]
    if other:
        raise ValueError(f"--{other[0].replace('_', '-')} evaluates one checkpoint; "
                         f"{args.checkpoint} is a folder (a scope)")
    saes, (args.device, args.dtype, note) = scope.load(args.checkpoint, args.model, args.device,
                                                      args.dtype)
    print(f"running on {args.device} in {args.dtype} ({note})")
    config = next(iter(saes.values()))[1]
    for sae, c in saes.values():  # every check before the slow load
        inference.check_lm(c["model_name"], sae, c)
    t0, dataset = time.time(), args.dataset or config.get("dataset_path")
    lm, tok = model.load_model(config["model_name"], args.device, getattr(torch, args.dtype))
    adapted, rules = scope.for_lm(saes, lm, tok, args.max_norm_ratio, args.dataset)
    results = metrics.scope_metrics(lm, tok, adapted, args.tokens, dataset,
                                    config["context_size"])
    for name, m in results.items():  # the keys of a single evaluation
        m.pop("freq")
        m.update(data=f"held-out {dataset}", token_rule=rules[name], time_s=time.time() - t0,
                 mode=saes[name][0].act, device=args.device, dtype=args.dtype,
                 checkpoint=os.path.join(args.checkpoint, f"{name}.safetensors"))
    print("\n".join([f"{len(saes)} SAEs of {args.checkpoint}, {args.tokens:,} held-out tokens "
                     f"each ({time.time() - t0:.0f}s):"] + scope.table(results)))
    if args.plot:
        os.makedirs(args.plot, exist_ok=True)
        path = os.path.join(args.plot, "scope.png")
        plots.plot_scope(results, {n: c for n, (_, c) in saes.items()}, path,
                         f"{config['model_name']}: {len(saes)} SAEs (Fig. 10)")
        print(f"plotted {path}")
    return dump(args, results)


def two_models(args, sae, config, out, chat_tok, dataset, name, t0):
    """--eval-model: the same metrics on another model's activations at the same site, printed
    beside the first model's (out)."""
    lm, tok = model.load_model(args.eval_model, args.device, getattr(torch, args.dtype))
    other = metrics.lm_metrics(lm, chat_tok or tok, inference.for_lm(sae, config, lm), config,
                               args.tokens, dataset, chat=args.chat)
    other.update(data=out["data"], token_rule=out["token_rule"])
    out.pop("freq"), other.pop("freq")
    site = formats.site_name((config["layer"], config["site"]))
    print(f"{name} on two models' activations at {site}, "
          f"{out['data']} ({time.time() - t0:.0f}s):")
    side_by_side({config["model_name"]: out, args.eval_model: other}, KEYS)
    return dump(args, {config["model_name"]: out, args.eval_model: other})


def report_long_context(args, lm, tok, sae, config, name, dataset, t0):
    """--long-context T (§4.5.1): the table by position, and Fig. 5 with --plot."""
    T, trained = args.long_context, config["context_size"]
    rows, n_docs = metrics.long_context(lm, tok, inference.for_lm(sae, config, lm), config, T,
                                        args.tokens, dataset)
    print(f"{name}: MSE and L0 by position on {n_docs} held-out documents of at least {T} "
          f"tokens, each truncated to {T} (trained on {trained}; {time.time() - t0:.0f}s)")
    print(f"  {'positions':>11} {'tokens':>8} {'mse':>8} {'l0':>7} {'ev':>7}")
    for r in rows:
        print(f"  {r['positions']:>11} {r['n_tokens']:>8,} {r['mse']:>8.4f} {r['l0']:>7.1f} "
              f"{r['explained_variance']:>7.3f}"
              f"{'  beyond the training context' if r['first'] >= trained else ''}")
    if args.plot:
        os.makedirs(args.plot, exist_ok=True)
        path = os.path.join(args.plot, f"{name}-long-context.png")
        plots.plot_long_context(rows, path, name, trained)
        print(f"plotted {path}")
    return dump(args, {"T": T, "documents": n_docs, "buckets": rows})


def side_by_side(columns, keys):
    """Print metrics as columns: {column name: {key: value}}."""
    print(f"  {'':<28}" + "".join(f"{c[-30:]:>32}" for c in columns))
    for key in keys:
        print(f"  {key:<28}" + "".join(f"{m[key]:>32.4f}" if isinstance(m[key], float) else
                                       f"{m[key]:>32}" for m in columns.values()))


def report(args, name, sae, out, t0):
    freq = out.pop("freq")
    out.update(time_s=time.time() - t0, mode=sae.act, checkpoint=args.checkpoint,
               device=args.device, dtype=args.dtype)
    source = f"tokens of {out['data']}" if "data" in out else "held-out tokens"
    print(f"{name} ({sae.act}, {out['n_tokens']:,} {source}, {out['time_s']:.0f}s; ours, §4)")
    notes = dict(NOTES)
    if out["n_tokens"] >= WINDOW:  # the paper's window, or the label would claim too much
        notes["dead_frac"] += " (§4.4: over 100K)"
    for key in KEYS:
        if key in out:
            print((f"  {key:<28} {out[key]:.4f}" if isinstance(out[key], float) else
                   f"  {key:<28} {out[key]}") + notes.get(key, ""))
    if args.plot:
        os.makedirs(args.plot, exist_ok=True)
        path = os.path.join(args.plot, f"{name}-firing.png")
        plots.plot_firing(freq, path, name)
        print(f"plotted {path}")
    return dump(args, out)


def dump(args, out):
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return out


def main(argv=None):
    try:
        return evaluate(get_args(argv))
    except ValueError as e:  # bad input, found by any module: one line, exit code 2
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)


if __name__ == "__main__":
    main()
