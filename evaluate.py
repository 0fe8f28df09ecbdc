"""Evaluate any checkpoint the way §4 of the paper does, and look inside it.

    python evaluate.py out/L15R-8x-k50-TopK.safetensors [--json m.json] [--tokens N] [--plot DIR]
    python evaluate.py out/L15R-8x-k50-TopK-JumpReLU.safetensors --mode topk  # §C: folding hurts?
    python evaluate.py out/L15R-8x-k50-TopK.safetensors --features 12,345 --top 20   # §4.3, §4.6
    python evaluate.py out/L15R-8x-k50-TopK.safetensors --long-context 8192          # §4.5.1
    python evaluate.py out/L15R-8x-k50-TopK.safetensors --chat wiki-chat [--eval-model ID]
    python evaluate.py fnlp/Llama3_1-8B-Base-LXR-8x:Llama3_1-8B-Base-L15R-8x     # a released SAE
    python evaluate.py out/ --tokens 20000 --json scope.json --plot plots/    # a scope, Fig. 10

Everything comes from the file: model, layer, site, normalization, the outlier norm limit, and
where and in what precision to run (its training device type and dtype, when that kind of device
is here; --device, --dtype override). Any SAE is read in inference form (folded, unit decoder
norms: inference.load_sae), a released one with the authors' recipe (extras/interop.py). Only
held-out documents are read (data.py: every 10th document of any dataset), or chats.
Reported (metrics.py): L0; explained variance, eq. 6, and the centred one peers use; `mse` in the
SAE's normalized space; CE clean, spliced, zero-ablated and `delta_lm_loss` (§4.1), KL; firing
frequencies (§4.4). The rest is in extras/: --features (top contexts, App. D layout, decoder
neighbours against the Johnson-Lindenstrauss baseline, §4.6), --long-context T (MSE and L0 by
position, §4.5.1), --eval-model ID (the same metrics on another model's activations) and --chat
DATA (conversations in the instruct model's chat template, §4.5.2), --saebench-json (SAEBench's
core file), a folder of checkpoints (a scope: one pass, one JSON entry per SAE, --plot: Fig. 10).
"""
import argparse
import dataclasses
import json
import os
import sys
import time

import torch

import data
import formats
import inference
import metrics
import model
from extras import activations, chats, features, flags, interop, long_context, noise, plots
from extras import replacement, saebench, scope

KEYS = ["n_tokens", "n_predictions", "n_documents", "l0", "explained_variance",
        "explained_variance_centered", "mse", "ce_loss", "ce_loss_with_sae", "delta_lm_loss",
        "ce_loss_ablated", "kl_div_with_sae", "kl_div_ablated", "dead_frac", "ultra_active_frac"]
NOTES = {"n_tokens": "   rows scored: EV, L0, firing", "n_predictions": "   CE and KL",
         "dead_frac": "   never fired on any of the n_tokens rows",
         "ultra_active_frac": "   fired on more than 10% of them (§4.4)"}
WINDOW = 100_000  # §4.4 counts never-firing features over 100K tokens
LM_BATCH = 8  # documents per LM forward
# every numeric flag's range (extras/flags.py)
RANGES = {"tokens": "[1, inf)", "lm_tokens": "[1, inf)", "long_context": "0 or [2, inf)",
          "top": "[1, inf)", "max_norm_ratio": "0 or (1, inf)"}


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Evaluate an SAE checkpoint (§4)")
    p.add_argument("checkpoint", help="a train.py or postprocess.py checkpoint (.safetensors), or "
                                      "a released SAE: its folder or `[hf://]owner/repo:sub`")
    p.add_argument("--json", default=None, help="write the metrics (features, buckets) here")
    p.add_argument("--tokens", type=int, default=100_000,
                   help="held-out tokens to evaluate (§4.4 counts never-firing features over "
                        "100K; the whole held-out split when smaller)")
    p.add_argument("--lm-tokens", type=int, default=None,
                   help="of them, the tokens whose documents also run the LM spliced and "
                        "ablated for CE, KL and Delta LM loss (default: all --tokens; a scope's "
                        "cost is these passes)")
    p.add_argument("--dataset", default=None, help="default: the one it was trained on")
    p.add_argument("--chat", default=None, metavar="DATA",
                   help="§4.5.2: evaluate on conversations rendered by the instruct model's chat "
                        f"template instead of held-out documents: {chats.EMBEDDED_CHAT} "
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
    inference.placement_args(p)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--activations", default=None,
                   help="evaluate on pre-saved rows (no CE): a safetensors file of "
                        "`activations` [+ `targets`], or a --cache-activations folder")
    g.add_argument("--features", default=None,
                   help="comma list of feature ids to inspect (extras/features.py) instead of "
                        "metrics")
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
    p.add_argument("--replacement", action="store_true",
                   help="a folder with a transcoder for every layer: the replacement model "
                        "(all of them at once, no error term) against the LM: CE, KL, top-1")
    return flags.parse(p, argv, RANGES)


@dataclasses.dataclass
class Subject:
    """The SAE under evaluation."""
    name: str  # L15R-8x-k50-TopK
    sae: object  # in inference form
    config: dict  # its checkpoint's, with the token rule's outlier norm limit once applied
    dataset: str  # whose held-out documents are read
    started: float  # time.time() when the evaluation began


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
    one_pass = args.activations or feats or args.long_context or args.eval_model or args.chat
    if args.saebench_json and one_pass:
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


def check_lms(args, subject):
    """Every check of the LMs from their configs, before the slow load. Returns (name,
    tokenizer) of the chat template that renders --chat (None, None without)."""
    lm_name = subject.config.get("model_name")
    lm_cfg = inference.check_lm(lm_name, subject.sae, subject.config)
    max_pos = lm_cfg.get("max_position_embeddings") or args.long_context
    if args.long_context and not 2 <= args.long_context <= max_pos:
        raise ValueError(f"--long-context {args.long_context} is out of range: allowed "
                         f"2-{max_pos} ({lm_name}'s max_position_embeddings)")
    if args.eval_model:
        inference.check_lm(args.eval_model, subject.sae, subject.config)
    if not args.chat:
        return None, None
    return chats.chat_tokenizer([n for n in (args.eval_model, lm_name) if n], args.chat)


def evaluate(args):
    """The evaluation the flags ask for: on pre-saved rows, or through the LM (metrics, features,
    long context, or two models side by side), or of a folder of checkpoints; prints it, returns
    what --json writes."""
    released = os.path.isfile(os.path.join(args.checkpoint, "hyperparams.json"))
    if os.path.isdir(args.checkpoint) and not released and args.replacement:
        return dump(args, replacement.evaluate_folder(args))
    if os.path.isdir(args.checkpoint) and not released:  # a scope, in one pass
        return dump(args, scope.evaluate_folder(args))
    if args.replacement:
        raise ValueError("--replacement evaluates a folder with a transcoder for every layer")
    sae, config, (args.device, args.dtype, note) = interop.load_sae(
        args.checkpoint, args.model, args.device, args.dtype)
    print(f"running on {args.device} in {args.dtype} ({note})")
    feats = check_against_sae(args, sae)
    sae.act = args.mode or sae.act
    subject = Subject(formats.sae_name(args.checkpoint), sae, config,
                      args.dataset or config.get("dataset_path"), time.time())
    if args.activations:
        place = (config["layer"], config["site"])
        rows = activations.activation_rows(args.activations, place, args.tokens)
        norm_out = config["dataset_average_activation_norm"]["out"]
        out = metrics.reconstruction_metrics(sae, rows, norm_out, freq=True)
        return report(args, subject, out)
    chat_name, chat_tok = check_lms(args, subject)
    lm, tok = model.load_model(config["model_name"], args.device, getattr(torch, args.dtype))
    subject.config, token_rule = inference.apply_token_rule(lm, tok, config,
                                                            args.max_norm_ratio, args.dataset)
    print(f"token rule: {token_rule}")
    sae_lm = inference.for_lm(sae, subject.config, lm)
    reading = dict(subject.config, dataset_path=subject.dataset)  # what the extras read
    if feats:
        return dump(args, features.show(lm, tok, sae_lm, reading, feats, args))
    if args.long_context:
        rows, n_docs = long_context.long_context(lm, tok, sae_lm, reading, args.long_context,
                                                 args.tokens)
        long_context.report(rows, n_docs, subject.name, subject.config, args.plot)
        return dump(args, {"T": args.long_context, "documents": n_docs, "buckets": rows})
    out = lm_metrics(args, lm, chat_tok or tok, subject)
    out["data"] = f"held-out {subject.dataset}"
    if args.chat:
        out["data"] = f"chats {args.chat} in {chat_name}'s chat template"
    out["token_rule"] = token_rule
    if args.saebench_json:  # its own pass, SAEBench's protocol (extras/saebench.py)
        n_batches = saebench.n_batches(args.tokens)
        batches = saebench.batches(tok, subject.dataset, 2 * n_batches)
        result = saebench.evaluate(lm, tok, sae_lm, subject.config, batches, n_batches)
        about = {"llm_dtype": args.dtype, "dataset": subject.dataset}
        saebench.write(args.saebench_json, result, sae, subject.config, about,
                       args.saebench_details)
        print(f"wrote {args.saebench_json} (SAEBench core, its protocol: extras/saebench.py)")
    if not args.eval_model:
        return report(args, subject, out)
    del lm
    return two_models(args, subject, out, chat_tok)


def lm_metrics(args, lm, tok, subject):
    """metrics.lm_metrics of the subject through lm: on its held-out documents, or on --chat
    conversations rendered by tok's chat template."""
    context_size = subject.config["context_size"]
    batches = data.heldout_batches(tok, subject.dataset, context_size, LM_BATCH)
    if args.chat:
        batches = chats.chat_batches(tok, args.chat, context_size, LM_BATCH)
    sae = inference.for_lm(subject.sae, subject.config, lm)
    budget = metrics.Budget(args.tokens, args.lm_tokens)
    out = metrics.lm_metrics(lm, tok, sae, subject.config, budget, batches)
    return noise.with_standard_errors(out)


def two_models(args, subject, out, chat_tok):
    """--eval-model: the same metrics on another model's activations at the same site, printed
    beside the first model's (out)."""
    lm, tok = model.load_model(args.eval_model, args.device, getattr(torch, args.dtype))
    other = lm_metrics(args, lm, chat_tok or tok, subject)
    other.update(data=out["data"], token_rule=out["token_rule"])
    out.pop("freq")
    other.pop("freq")
    site = formats.place_name((subject.config["layer"], subject.config["site"]))
    print(f"{subject.name} on two models' activations at {site}, "
          f"{out['data']} ({time.time() - subject.started:.0f}s):")
    columns = {subject.config["model_name"]: out, args.eval_model: other}
    side_by_side(columns, KEYS)
    return dump(args, columns)


def side_by_side(columns, keys):
    """Print metrics as columns: {column name: {key: value}}."""
    print(f"  {'':<28}" + "".join(f"{c[-30:]:>32}" for c in columns))
    for key in keys:
        cells = [f"{m[key]:>32.4f}" if isinstance(m[key], float) else f"{m[key]:>32}"
                 for m in columns.values()]
        print(f"  {key:<28}" + "".join(cells))


def report(args, subject, out):
    """Print one SAE's metrics (and its Fig. 4 with --plot); returns what --json writes."""
    freq = out.pop("freq")
    out.update(time_s=time.time() - subject.started, mode=subject.sae.act,
               checkpoint=args.checkpoint, device=args.device, dtype=args.dtype)
    source = f"tokens of {out['data']}" if "data" in out else "held-out tokens"
    print(f"{subject.name} ({subject.sae.act}, {out['n_tokens']:,} {source}, "
          f"{out['time_s']:.0f}s; ours, §4)")
    notes = dict(NOTES)
    if out["n_tokens"] >= WINDOW:  # the paper's window, or the label would claim too much
        notes["dead_frac"] += " (§4.4: over 100K)"
    for key in KEYS:
        if key not in out:
            continue
        value = f"{out[key]:.4f}" if isinstance(out[key], float) else f"{out[key]:,}"
        if f"{key}_se" in out:  # over documents (extras/noise.py)
            value += f" +- {out[f'{key}_se']:.4f}"
        print(f"  {key:<28} {value}{notes.get(key, '')}")
    if "n_documents" in out:
        print("  (+- a standard error over the documents: extras/noise.py)")
    if args.plot:
        os.makedirs(args.plot, exist_ok=True)
        path = os.path.join(args.plot, f"{subject.name}-firing.png")
        plots.plot_firing(freq, path, subject.name)
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
