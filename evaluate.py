"""Evaluate any checkpoint the way §4 of the paper does, and look inside it.

    python evaluate.py out/L15R-8x-k50-TopK.safetensors [--json m.json] [--tokens N] [--plot DIR]
    python evaluate.py out/L15R-8x-k50-TopK-JumpReLU.safetensors --mode topk   # §C: folding hurts?
    python evaluate.py out/L15R-8x-k50-TopK.safetensors --features 12,345 --top 20   # §4.3, §4.6
    python evaluate.py out/L15R-8x-k50-TopK.safetensors --long-context 8192          # §4.5.1
    python evaluate.py out/L15R-8x-k50-TopK.safetensors --chat wiki-chat [--eval-model ID] # §4.5.2
    python evaluate.py fnlp/Llama3_1-8B-Base-LXR-8x:Llama3_1-8B-Base-L15R-8x     # a released SAE

Everything comes from the file: model, layer, site, normalization, the massive-activation limit,
and where and in what precision to run (its training device type and dtype, when that kind of
device is here; --device, --dtype override).
A released SAE (folder or Hub reference) is read by postprocess.load_sae with the authors' recipe.
Only held-out documents are read (model.py: every 10th document of any dataset), or chats.
Reported:
- L0; explained variance, eq. 6 (`explained_variance` = 1 - sum ||x - x_hat||^2 / sum ||x||^2 over
  all tokens) and the variance-based one peers use (`explained_variance_centered`, denominator
  sum ||x - mean x||^2); `mse` per element in the SAE's normalized training space;
- CE loss clean, with the reconstruction spliced in at the site (TC: in place of the MLP output),
  their difference `delta_lm_loss`, and with the site zero-ablated, for scale (§4.1). Special
  tokens and massive-activation tokens keep their original activation and their predictions are not
  scored;
- firing frequencies (§4.4): `dead_frac` never fires, `ultra_active_frac` fires on > 10% of tokens.
--features (features.py): per feature its firing frequency, top-activating held-out contexts (also
in the App. D layout of the rubric prompt) and nearest features by decoder cosine against the
Johnson-Lindenstrauss baseline (§4.6). --long-context T: MSE and L0 by position on held-out
documents of at least T tokens, each truncated to T, never joined (§4.5.1). --eval-model ID: the
same metrics on another model's activations at the same site, side by side; --chat DATA: on
conversations rendered by the instruct model's chat template, whose special tokens (like every
token the tokenizer marks special) keep their activation and are not scored (§4.5.2).
"""
import argparse
import copy
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

import features
import formats
import model
import postprocess
import saebench
from buffer import FanOut, progress, take_rows
from sae import firing_counts

KEYS = ["n_tokens", "l0", "explained_variance", "explained_variance_centered", "mse", "ce_loss",
        "ce_loss_with_sae", "delta_lm_loss", "ce_loss_ablated", "kl_div_with_sae",
        "kl_div_ablated", "dead_frac", "ultra_active_frac"]
NOTES = {"dead_frac": "   never fired on any of these tokens (§4.4: over 100K)",
         "ultra_active_frac": "   fired on more than 10% of them (§4.4)"}


class Metrics:
    """Running sums over evaluated rows, in the SAE's normalized space (EV is scale-free
    anyway)."""

    def __init__(self, sae, core=None):
        self.sae, self.n, self.err, self.sq, self.core = sae, 0, 0.0, 0.0, core
        self.sum_y = torch.zeros(sae.d_model, dtype=torch.float64)
        self.counts = torch.zeros(sae.n_features, dtype=torch.float64)

    @torch.no_grad()
    def add(self, x_in, x_out, s_out, seq=None):
        """x_in, x_out (N, D) raw; s_out maps raw targets to the normalized space; seq (N,): the
        sequence of each row, for SAEBench's per-feature statistics (core)."""
        x_hat, f = forward_raw(self.sae, x_in)
        self.counts += firing_counts(f, self.sae.n_features).double().cpu()
        if self.core is not None:
            self.core.add(x_out, x_hat, f, seq)
        err, y = (x_hat - x_out.to(x_hat.dtype)).double() * s_out, x_out.double() * s_out
        self.err += err.pow(2).sum().item()
        self.sq += y.pow(2).sum().item()
        self.sum_y += y.sum(0).cpu()
        self.n += len(y)

    def result(self):
        freq = self.counts / max(self.n, 1)
        centred = self.sq - self.sum_y.pow(2).sum().item() / self.n
        return {"n_tokens": self.n, "l0": freq.sum().item(),
                "mse": self.err / (self.n * self.sae.d_model),
                "explained_variance": 1 - self.err / self.sq,
                "explained_variance_centered": 1 - self.err / centred,
                "dead_frac": (freq == 0).double().mean().item(),
                "ultra_active_frac": (freq > 0.1).double().mean().item(), "freq": freq}


def forward_raw(sae, x_in):
    """Raw x_in (N, D) -> (raw x_hat (N, D), f): the SAE in its normalized space, units restored."""
    s_in, s_out = sae.scales()
    x_hat, f = sae(x_in.to(sae.W_enc) * s_in)
    return x_hat / s_out, f


def reconstruct(sae, x_in):
    """Raw x_in (N, D) -> raw x_hat (N, D): what the splice puts back in the LM."""
    return forward_raw(sae, x_in)[0]


def reconstruction_metrics(sae, rows, norm_out=None, chunk=4096, freq=False):
    """Metrics from raw rows (N, D), or (N, 2D) = input | target for a transcoder. norm_out: the
    dataset norm defining the MSE's space (default: the SAE's own); freq: keep the (F,) firing
    frequencies under "freq"."""
    m = Metrics(sae)
    s_out = math.sqrt(sae.d_model) / (norm_out or sae.norm_out.item())
    for r in rows.split(chunk):
        m.add(*model.in_out(r.to(sae.W_enc.device), sae.d_model), s_out)
    out = m.result()
    if not freq:
        del out["freq"]
    return out


def heldout_check(lm, tok, saes, limits, dataset, context_size, lm_batch_size, n_tokens):
    """train.py's check after training: EV (eq. 6), L0 and the never-fired share of each SAE
    {name: ((layer, site), sae)} on n_tokens held-out rows of its site (one LM pass for all);
    prints a line per SAE and returns {name: metrics}."""
    sites = list(dict.fromkeys(key for key, _ in saes.values()))
    batches = model.document_batches(tok, dataset, "eval", context_size, lm_batch_size, epochs=1)
    data, rows, out = FanOut(model.activation_producer(lm, tok, sites, batches), sites), {}, {}
    for name, (key, sae) in saes.items():
        if key not in rows:
            rows[key] = model.keep_rows(take_rows(data[key], n_tokens, "held-out check"),
                                        limits[key], sae.d_model)
        m = out[name] = reconstruction_metrics(sae, rows[key])
        print(f"{name} held-out ({m['n_tokens']:,} tokens): ev {m['explained_variance']:.3f} | "
              f"ev centred {m['explained_variance_centered']:.3f} | l0 {m['l0']:.1f} | never "
              f"fired {100 * m['dead_frac']:.1f}% (§4.4: no activation on any of these "
              f"{m['n_tokens']:,} tokens)")
    return out


@torch.no_grad()
def lm_metrics(lm, tok, sae, config, n_tokens, dataset, lm_batch_size=8, core=None, chat=None):
    """One held-out pass: each batch runs the LM clean (capturing the site), with the SAE spliced
    in, and with the site zero-ablated; KL(clean || patched) of the next-token distributions at
    the scored positions. Returns the metrics dict (firing frequencies (F,) under "freq").
    core: a saebench.Core that also takes every batch. chat: --chat DATA, conversations rendered
    by tok's chat template, read instead of dataset's held-out documents (§4.5.2)."""
    layer, site, limit = config["layer"], config["site"], config.get("outlier_norm_limit")
    metrics, kl = Metrics(sae, core), {"kl_div_with_sae": 0.0, "kl_div_ablated": 0.0}
    n_seq = 0
    s_out = math.sqrt(sae.d_model) / config["dataset_average_activation_norm"]["out"]
    ce = {"ce_loss": [0.0, 0], "ce_loss_with_sae": [0.0, 0], "ce_loss_ablated": [0.0, 0]}
    bar = progress(n_tokens, "evaluate")
    T = config["context_size"]
    batches = model.chat_batches(tok, chat, T, lm_batch_size) if chat else \
        model.document_batches(tok, dataset, "eval", T, lm_batch_size, epochs=1)
    for input_ids, mask in batches:
        input_ids, mask = input_ids.to(lm.device), mask.to(lm.device)
        seen = {}

        def clean(x_in, x_out):
            seen["keep"] = model.scored(input_ids, mask, tok, x_in, x_out, limit)
            seen["x"] = x_in[seen["keep"]], x_out[seen["keep"]]
            return x_out

        def spliced(x_in, x_out):
            x_hat = reconstruct(sae, x_in.flatten(0, 1)).view_as(x_out)
            return torch.where(seen["keep"][..., None], x_hat.to(x_out.dtype), x_out)

        def ablated(x_in, x_out):
            return torch.where(seen["keep"][..., None], torch.zeros_like(x_out), x_out)
        for name, fn, kl_key in zip(ce, (clean, spliced, ablated), [None, *kl]):
            with model.splice(lm, layer, site, fn):
                logits = lm(input_ids=input_ids, attention_mask=mask, use_cache=False).logits
            if kl_key is None:  # the clean pass has set the scored positions t (predicting t+1)
                ok = seen["keep"][:, :-1] & mask[:, 1:].bool()
            pred = logits[:, :-1][ok].float()  # (n, V)
            ce[name][0] += F.cross_entropy(pred, input_ids[:, 1:][ok], reduction="sum").item()
            ce[name][1] += len(pred)
            if kl_key is None:
                lp_clean = F.log_softmax(pred, -1)
            else:
                kl[kl_key] += saebench.kl_sum(lp_clean, pred)
        seq = torch.arange(n_seq, n_seq + len(input_ids), device=lm.device)[:, None]  # (B, 1)
        metrics.add(*seen["x"], s_out, seq.expand_as(seen["keep"])[seen["keep"]])
        n_seq += len(input_ids)
        bar.update(len(seen["x"][0]))
        if metrics.n >= n_tokens:
            break
    bar.close()
    out = metrics.result()
    out.update({name: total / max(count, 1) for name, (total, count) in ce.items()})
    out.update({key: total / max(ce["ce_loss"][1], 1) for key, total in kl.items()})
    out["delta_lm_loss"] = out["ce_loss_with_sae"] - out["ce_loss"]
    return out


def for_lm(sae, config, lm):
    """The SAE as it must read this LM's activations. A released transcoder reads x / rms(x)
    before the RMSNorm gain g (TransformerLens ln2.hook_normalized); our TC input is g x / rms(x)
    (model.py), so its encoder columns are divided by g: exact while no g_j is 0."""
    if not config.get("tc_input_before_gain"):
        return sae
    sae = copy.deepcopy(sae)
    with torch.no_grad():
        sae.W_enc.div_(lm.model.layers[config["layer"]].post_attention_layernorm.weight.to(
            sae.W_enc))
    return sae


def check_lm(name, sae, config):
    """The LM's config, after checking from it alone (no weights loaded) that the SAE fits."""
    if not name:
        raise ValueError("no LM is known for this SAE: give --model ID, or evaluate with "
                         "--activations FILE")
    try:
        cfg = model.load_config(name)
    except Exception as e:  # no such folder, an unknown Hub id, offline
        raise ValueError(f"{name}: no readable model config ({type(e).__name__}: "
                         f"{' '.join(str(e).split())[:200]})") from None
    if cfg["hidden_size"] != sae.d_model:
        raise ValueError(f"checkpoint d_model {sae.d_model} does not match {name} "
                         f"(hidden size {cfg['hidden_size']})")
    if config["layer"] >= cfg["num_hidden_layers"]:
        raise ValueError(f"the SAE reads layer {config['layer']}: {name} has "
                         f"{cfg['num_hidden_layers']} layers")
    return cfg


def chat_tokenizer(names, data):
    """(name, tokenizer) of the first of names (--eval-model, then the checkpoint's LM) whose
    tokenizer has a chat template: the instruct model renders every conversation, so both
    columns of --eval-model read the same token ids (§4.5.2). Checks the data's first row."""
    for name in names:  # loaded up to the first with a template only
        tok = model.load_tokenizer(name)
        if getattr(tok, "chat_template", None):
            break
    else:
        raise ValueError(f"--chat {data}: the tokenizer of {' or '.join(names)} has no chat "
                         f"template; evaluate an instruct model (--model or --eval-model)")
    if next(model.iter_chats(data), None) is None:
        raise ValueError(f"--chat {data}: no conversations")
    return name, tok


# --------------------------------------------------------------------------- long context (§4.5.1)

def buckets(T):
    """Position buckets [lo, hi): 1-63, then powers of two up to T (position 0 is BOS)."""
    edges = sorted({1, T} | {2 ** i for i in range(6, 32) if 2 ** i < T})
    return list(zip(edges[:-1], edges[1:]))


@torch.no_grad()
def long_context(lm, tok, sae, config, T, n_tokens, dataset):
    """MSE (normalized space, per element), L0 and EV per position bucket over held-out documents
    of at least T tokens, each truncated to T, until n_tokens have been read: (rows, documents
    used). Says so in one line when the split has too few such documents."""
    key, spans, n, n_docs, longest = (config["layer"], config["site"]), buckets(T), 0, 0, 0
    metrics = [Metrics(sae) for _ in spans]
    s_out = math.sqrt(sae.d_model) / config["dataset_average_activation_norm"]["out"]
    bar = progress(n_tokens, "long context")
    for doc in model.iter_documents(dataset, "eval", epochs=1):
        ids = model.encode_documents(tok, [doc])[0]  # BOS + document
        longest = max(longest, len(ids))
        if len(ids) < T:  # §4.5.1: documents longer than T, each truncated to T; never joined
            continue
        ids, n_docs = torch.tensor([ids[:T]], device=lm.device), n_docs + 1
        mask = torch.ones_like(ids)
        x_in, x_out = model.capture(lm, ids, mask, [key])[key]
        keep = model.scored(ids, mask, tok, x_in, x_out, config.get("outlier_norm_limit"))
        add_by_position(metrics, spans, x_in[0], x_out[0], keep[0], s_out)
        n += T
        bar.update(T)
        if n >= n_tokens:
            break
    bar.close()
    if n == 0:
        raise ValueError(f"--long-context {T}: no held-out document of {dataset} has {T} tokens "
                         f"(BOS included; the longest has {longest}): give a smaller T or a "
                         f"--dataset of longer documents")
    if n < n_tokens:
        print(f"--long-context {T}: only {n_docs} held-out documents have at least {T} tokens; "
              f"used all {n_docs} ({n:,} tokens of the {n_tokens:,} asked)")
    return [{"positions": f"{lo}-{hi - 1}", "first": lo, "last": hi - 1,
             **{k: r[k] for k in ("n_tokens", "mse", "l0", "explained_variance")}}
            for (lo, hi), r in zip(spans, (m.result() for m in metrics))], n_docs


def add_by_position(metrics, spans, x_in, x_out, keep, s_out):
    """One sequence's scored rows x_in, x_out (T, D), keep (T,), each into its position bucket's
    Metrics."""
    pos = torch.arange(len(keep), device=keep.device)
    for (lo, hi), m in zip(spans, metrics):
        k = keep & (pos >= lo) & (pos < hi)
        if k.any():
            m.add(x_in[k], x_out[k], s_out)


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_long_context(rows, path, title, context_size):
    """Fig. 5: MSE and L0 against position, the training context marked."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    mid = [(r["first"] + r["last"]) / 2 for r in rows]
    for ax, key in zip(axes, ("mse", "l0")):
        ax.plot(mid, [r[key] for r in rows], marker="o")
        ax.axvline(context_size, color="r", ls="--", lw=1, label="training context")
        ax.set(xscale="log", xlabel="token position", ylabel=key, title=title)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_firing(freq, path, title):
    """The paper's Fig. 4: histogram of log10 firing frequency; never-firing features counted
    apart."""
    plt = _pyplot()
    fired = freq[freq > 0]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(torch.log10(fired).numpy(), bins=60)
    ax.axvline(-1, color="r", ls="--", lw=1, label="10% (ultra-active)")
    ax.set(xlabel="log10 firing frequency", ylabel="features",
           title=f"{title}: {int((freq == 0).sum())} of {len(freq)} never fire")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def side_by_side(columns, keys):
    """Print metrics as columns: {column name: {key: value}}."""
    print(f"  {'':<28}" + "".join(f"{c[-30:]:>32}" for c in columns))
    for key in keys:
        print(f"  {key:<28}" + "".join(f"{m[key]:>32.4f}" if isinstance(m[key], float) else
                                       f"{m[key]:>32}" for m in columns.values()))


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
                        f"template instead of held-out documents: {model.EMBEDDED_CHAT} "
                        "(embedded), a .jsonl/.json/.parquet file or a Hub dataset id (e.g. "
                        "allenai/WildChat-1M) with a `messages` or `conversation` column")
    p.add_argument("--model", default=None, help="the LM (default: the one the file names)")
    p.add_argument("--mode", choices=["topk", "jumprelu"], default=None,
                   help="inference of a folded TopK SAE (default: what the file says)")
    p.add_argument("--plot", default=None, help="folder for the PNG plot (Fig. 4, or Fig. 5)")
    postprocess.placement_args(p)
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
                   help="also write SAEBench's core-eval results file (its CoreEvalOutput) here")
    p.add_argument("--saebench-details", action="store_true",
                   help="--saebench-json: with the per-feature eval_result_details")
    p.add_argument("--html", default=None, metavar="FILE",
                   help="--features: also write one self-contained HTML page of them here")
    return p.parse_args(argv)


def run(argv=None):
    args = get_args(argv)
    sae, config = postprocess.load_sae(args.checkpoint, model_name=args.model)
    args.device, args.dtype, note = postprocess.placement(config, args.device, args.dtype)
    dtype = getattr(torch, args.dtype)
    sae.to(args.device).compute_dtype = dtype  # float32 weights, matmuls in dtype
    print(f"running on {args.device} in {args.dtype} ({note})")
    if args.mode == "jumprelu" and sae.threshold is None:
        raise ValueError(f"--mode jumprelu needs a post-processed checkpoint (postprocess.py), "
                         f"got a {sae.act} SAE")
    sae.act = args.mode or sae.act
    feats = args.features and [v.strip() for v in args.features.split(",")]
    if feats and not all(v.isdigit() and int(v) < sae.n_features for v in feats) \
            or args.top < 1:
        raise ValueError(f"--features {args.features} --top {args.top}: give feature ids in "
                         f"0..{sae.n_features - 1}, comma separated, and --top at least 1")
    if args.saebench_json and (args.activations or feats or args.long_context
                               or args.eval_model):
        raise ValueError(f"--saebench-json {args.saebench_json} needs the LM pass of a plain "
                         f"evaluation (no --activations, --features, --long-context, "
                         f"--eval-model)")
    if args.chat and (args.activations or feats or args.long_context or args.dataset):
        raise ValueError(f"--chat {args.chat} replaces the held-out documents of a plain or "
                         f"--eval-model evaluation: not with --activations, --features, "
                         f"--long-context or --dataset")
    if args.html and not feats:
        raise ValueError(f"--html {args.html} needs --features (the features to show)")
    name = postprocess.sae_name(args.checkpoint)
    dataset = args.dataset or config.get("dataset_path")
    t0 = time.time()
    if args.activations:
        rows = formats.activation_rows(args.activations, (config["layer"], config["site"]),
                                       args.tokens)
        out = reconstruction_metrics(sae, rows, config["dataset_average_activation_norm"]["out"],
                                     freq=True)
        return report(args, name, sae, out, t0)
    lm_name = config.get("model_name")  # every check before the slow load
    max_pos = check_lm(lm_name, sae, config).get("max_position_embeddings") or args.long_context
    if args.long_context and not 2 <= args.long_context <= max_pos:
        raise ValueError(f"--long-context {args.long_context} is out of range: allowed "
                         f"2-{max_pos} ({lm_name}'s max_position_embeddings)")
    if args.eval_model:
        check_lm(args.eval_model, sae, config)
    chat_name, chat_tok = chat_tokenizer([n for n in (args.eval_model, lm_name) if n],
                                         args.chat) if args.chat else (None, None)
    data = f"chats {args.chat} in {chat_name}'s chat template" if args.chat else \
        f"held-out {dataset}"
    lm, tok = model.load_model(lm_name, args.device, dtype)
    if feats:
        return dump(args, features.show(lm, tok, for_lm(sae, config, lm), config,
                                        [int(v) for v in feats], args.tokens, args.top, dataset,
                                        args.html))
    if args.long_context:
        rows, n_docs = long_context(lm, tok, for_lm(sae, config, lm), config,
                                    args.long_context, args.tokens, dataset)
        print_long_context(rows, name, args.long_context, config["context_size"], t0, n_docs)
        if args.plot:
            os.makedirs(args.plot, exist_ok=True)
            path = os.path.join(args.plot, f"{name}-long-context.png")
            plot_long_context(rows, path, name, config["context_size"])
            print(f"plotted {path}")
        return dump(args, {"T": args.long_context, "documents": n_docs, "buckets": rows})
    core = saebench.Core(sae.n_features) if args.saebench_json else None
    out = lm_metrics(lm, chat_tok or tok, for_lm(sae, config, lm), config, args.tokens, dataset,
                     core=core, chat=args.chat)
    out["data"] = data
    if core is not None:
        write_saebench(args, core, out, sae, config, lm_name, args.chat or dataset)
    if not args.eval_model:
        return report(args, name, sae, out, t0)
    del lm
    lm, tok = model.load_model(args.eval_model, args.device, dtype)
    other = lm_metrics(lm, chat_tok or tok, for_lm(sae, config, lm), config, args.tokens, dataset,
                       chat=args.chat)
    other["data"] = data
    for m in (out, other):
        m.pop("freq")
    print(f"{name} on two models' activations at L{config['layer']}{config['site']}, "
          f"{data} ({time.time() - t0:.0f}s):")
    side_by_side({lm_name: out, args.eval_model: other}, KEYS)
    return dump(args, {lm_name: out, args.eval_model: other})


def write_saebench(args, core, out, sae, config, lm_name, dataset):
    """SAEBench's core results file for this pass (saebench.py); weights in the raw space."""
    raw = copy.deepcopy(sae)
    if not config.get("folded"):
        postprocess.fold_norm_(raw)
    eval_config = dict(
        model_name=lm_name, llm_dtype=args.dtype,
        batch_size_prompts=8, n_eval_reconstruction_batches=core.batches,
        n_eval_sparsity_variance_batches=core.batches, dataset=dataset,
        context_size=config["context_size"], compute_kl=True, compute_ce_loss=True,
        compute_l2_norms=True, compute_sparsity_metrics=True, compute_variance_metrics=True,
        compute_featurewise_density_statistics=True,
        compute_featurewise_weight_based_metrics=True,
        exclude_special_tokens_from_reconstruction=True, verbose=False)
    result = saebench.output(
        core, {"clean": out["ce_loss"], "sae": out["ce_loss_with_sae"],
               "ablated": out["ce_loss_ablated"]},
        {"sae": out["kl_div_with_sae"], "ablated": out["kl_div_ablated"]}, raw,
        config, eval_config, args.saebench_details)
    with open(args.saebench_json, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.saebench_json} (SAEBench core)")


def print_long_context(rows, name, T, context_size, t0, n_docs):
    print(f"{name}: MSE and L0 by position on {n_docs} held-out documents of at least {T} "
          f"tokens, each truncated to {T} (trained on {context_size}; {time.time() - t0:.0f}s)")
    print(f"  {'positions':>11} {'tokens':>8} {'mse':>8} {'l0':>7} {'ev':>7}")
    for r in rows:
        print(f"  {r['positions']:>11} {r['n_tokens']:>8,} {r['mse']:>8.4f} {r['l0']:>7.1f} "
              f"{r['explained_variance']:>7.3f}"
              f"{'  beyond the training context' if r['first'] >= context_size else ''}")


def report(args, name, sae, out, t0):
    freq = out.pop("freq")
    out.update(time_s=time.time() - t0, mode=sae.act, checkpoint=args.checkpoint,
               device=args.device, dtype=args.dtype)
    source = f"tokens of {out['data']}" if "data" in out else "held-out tokens"
    print(f"{name} ({sae.act}, {out['n_tokens']:,} {source}, {out['time_s']:.0f}s)")
    for key in KEYS:
        if key in out:
            print((f"  {key:<28} {out[key]:.4f}" if isinstance(out[key], float) else
                   f"  {key:<28} {out[key]}") + NOTES.get(key, ""))
    if args.plot:
        os.makedirs(args.plot, exist_ok=True)
        path = os.path.join(args.plot, f"{name}-firing.png")
        plot_firing(freq, path, name)
        print(f"plotted {path}")
    return dump(args, out)


def dump(args, out):
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return out


def main(argv=None):
    try:
        return run(argv)
    except ValueError as e:  # bad input, found by any module: one line, exit code 2
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)


if __name__ == "__main__":
    main()
