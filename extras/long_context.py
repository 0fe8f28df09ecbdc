"""§4.5.1: an SAE on sequences far longer than it trained on: `evaluate.py CKPT --long-context T`.

MSE (normalized space, per element), L0 and EV per position bucket over held-out documents of at
least T tokens, each truncated to T and never joined to another (so every position is a real
position of one document). The metrics are metrics.py's; plots.plot_long_context draws Fig. 5.
Shapes: T tokens, D model width.
"""
import math
import os

import torch

import data
import model
from extras import plots
from metrics import Metrics

KEYS = ("n_tokens", "mse", "l0", "explained_variance")  # what each bucket reports


def buckets(T):
    """Position buckets [lo, hi): 1-63, then powers of two up to T (position 0 is BOS)."""
    edges = sorted({1, T} | {2 ** i for i in range(6, 32) if 2 ** i < T})
    return list(zip(edges[:-1], edges[1:]))


@torch.no_grad()
def long_context(lm, tok, sae, config, T, n_tokens):
    """[one dict per position bucket], documents used: over held-out documents (of the
    config's dataset_path) of at least T tokens, each truncated to T, until n_tokens have been
    read. Says so in one line when the split has too few such documents."""
    place = (config["layer"], config["site"])
    dataset = config["dataset_path"]
    spans = buckets(T)
    per_bucket = [Metrics(sae) for _ in spans]
    s_out = math.sqrt(sae.d_model) / config["dataset_average_activation_norm"]["out"]
    n = 0
    n_docs = 0
    longest = 0
    bar = data.progress(n_tokens, "long context")
    for doc in data.iter_documents(dataset, "eval", epochs=1):
        ids = data.encode_documents(tok, [doc])[0]  # BOS + document
        longest = max(longest, len(ids))
        if len(ids) < T:  # §4.5.1: documents longer than T, each truncated to T; never joined
            continue
        n_docs += 1
        ids = torch.tensor([ids[:T]], device=lm.device)
        mask = torch.ones_like(ids)
        x_in, x_out = model.capture(lm, ids, mask, [place])[place]
        keep = data.scored_positions(ids, mask, tok, x_in, x_out,
                                     config.get("outlier_norm_limit"))
        add_by_position(per_bucket, spans, (x_in[0], x_out[0]), keep[0], s_out)
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
    rows = []
    for (lo, hi), m in zip(spans, per_bucket):
        result = m.result()
        rows.append({"positions": f"{lo}-{hi - 1}", "first": lo, "last": hi - 1,
                     **{key: result[key] for key in KEYS}})
    return rows, n_docs


def add_by_position(per_bucket, spans, rows, keep, s_out):
    """One sequence's scored rows (x_in, x_out), each (T, D), keep (T,), each into its position
    bucket's Metrics (per_bucket)."""
    x_in, x_out = rows
    pos = torch.arange(len(keep), device=keep.device)
    for (lo, hi), m in zip(spans, per_bucket):
        in_bucket = keep & (pos >= lo) & (pos < hi)
        if in_bucket.any():
            m.add(x_in[in_bucket], x_out[in_bucket], s_out)


def report(rows, n_docs, name, config, plot=None):
    """Print the table by position (positions beyond the training context marked), and draw
    Fig. 5 in the folder plot."""
    T = rows[-1]["last"] + 1
    trained = config["context_size"]
    print(f"{name}: MSE and L0 by position on {n_docs} held-out documents of at least {T} "
          f"tokens, each truncated to {T} (trained on {trained})")
    print(f"  {'positions':>11} {'tokens':>8} {'mse':>8} {'l0':>7} {'ev':>7}")
    for r in rows:
        beyond = "  beyond the training context" if r["first"] >= trained else ""
        print(f"  {r['positions']:>11} {r['n_tokens']:>8,} {r['mse']:>8.4f} {r['l0']:>7.1f} "
              f"{r['explained_variance']:>7.3f}{beyond}")
    if plot:
        os.makedirs(plot, exist_ok=True)
        path = os.path.join(plot, f"{name}-long-context.png")
        plots.plot_long_context(rows, path, name, trained)
        print(f"plotted {path}")
