"""The metrics of §4, on held-out text through the LM or on pre-saved rows.

- `Metrics`: running sums over evaluated rows: L0; explained variance, eq. 6
  (`explained_variance` = 1 - sum ||x - x_hat||^2 / sum ||x||^2 over all tokens) and the
  variance-based one peers use (`explained_variance_centered`, denominator sum ||x - mean x||^2);
  `mse` per element in the SAE's normalized training space; firing frequencies (§4.4: `dead_frac`
  never fires, `ultra_active_frac` fires on > 10% of tokens).
- `lm_metrics`: one held-out pass that runs the LM clean, with the reconstruction spliced in at
  the site (TC: in place of the MLP output) and with the site zero-ablated: CE of each, their
  difference `delta_lm_loss` (§4.1), and KL(clean || patched). Special tokens and
  massive-activation tokens keep their original activation and their predictions are not scored.
- `heldout_check`: train.py's first look after training, every SAE from one LM pass.
- `scope_metrics`: `lm_metrics` for a folder of SAEs (a scope) from one pass: one clean forward
  per batch for every site, each SAE spliced from its own block on.
- `long_context` (§4.5.1): MSE, L0 and EV by position on long held-out documents.
Shapes: B sequences, T tokens, N rows, D model width, F features, V vocabulary.
"""
import math

import torch
import torch.nn.functional as F

import data
import model
from sae import firing_counts
from tracking import progress

CE_PASSES = ("ce_loss", "ce_loss_with_sae", "ce_loss_ablated")  # clean, spliced, zero-ablated
KL_KEYS = ("kl_div_with_sae", "kl_div_ablated")  # KL(clean || spliced), KL(clean || ablated)


class Metrics:
    """Running sums over evaluated rows, in the SAE's normalized space (EV is scale-free
    anyway)."""

    def __init__(self, sae):
        self.sae, self.n, self.err, self.sq = sae, 0, 0.0, 0.0
        self.sum_y = torch.zeros(sae.d_model, dtype=torch.float64)
        self.counts = torch.zeros(sae.n_features, dtype=torch.float64)

    @torch.no_grad()
    def add(self, x_in, x_out, s_out):
        """x_in, x_out (N, D) raw; s_out maps raw targets to the normalized space."""
        x_hat, f = forward_raw(self.sae, x_in)
        self.counts += firing_counts(f, self.sae.n_features).double().cpu()
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
    """Raw x_in (N, D) -> (raw x_hat (N, D), f): the SAE in its normalized space, units
    restored."""
    s_in, s_out = sae.scales()
    x_hat, f = sae(x_in.to(sae.W_enc) * s_in)
    return x_hat / s_out, f


def kl_sum(lp_clean, logits):
    """Summed KL(clean || patched) of next-token distributions over the rows of lp_clean (N, V)
    (clean log-probabilities) and the patched logits (N, V)."""
    return (lp_clean.exp() * (lp_clean - F.log_softmax(logits.float(), -1))).sum().item()


def reference(logits, target):
    """Clean next-token logits (..., V) and the tokens that follow, target (...) -> (CE, p, h)
    per position, p the clean distribution (..., V) and h = sum p log p: what `scores` measures
    each patched pass against, computed once per batch."""
    lp = F.log_softmax(logits.float(), -1)
    p = lp.exp()
    h = (p * lp).sum(-1)
    return scores(logits, target, p, h)[0], p, h  # CE as every patched pass computes it


def scores(logits, target, p, h):
    """Patched logits (..., V) -> (CE, KL(clean || patched)) per position. With log q = logits -
    lse (lse = logsumexp(logits)) and sum p = 1, KL = h - p.logits + lse: the logits are read
    twice and nothing of their size is written (a log-softmax of each pass cost a third of a
    scope's evaluation)."""
    logits = logits.float()
    lse = torch.logsumexp(logits, -1)
    return lse - logits.gather(-1, target[..., None])[..., 0], \
        h - torch.linalg.vecdot(p, logits) + lse


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


def heldout_check(lm, tok, saes, outlier_norm_limits, dataset, context_size, lm_batch_size,
                  n_tokens, chunk=4096):
    """train.py's check after training: EV (eq. 6), L0 and the never-fired share of each SAE
    {name: ((layer, site), sae)} on n_tokens held-out rows of its site (one LM pass for all);
    prints a line per SAE and returns {name: metrics}. Streamed: each LM batch's kept rows go
    into every SAE's Metrics in the chunks `reconstruction_metrics` would cut from all of them,
    so memory holds a batch per site, not n_tokens rows (a scope's 40 sites: ~9 GB)."""
    sites = list(dict.fromkeys(key for key, _ in saes.values()))
    batches = data.document_batches(tok, dataset, "eval", context_size, lm_batch_size, epochs=1)
    runs = {name: (key, sae, Metrics(sae), math.sqrt(sae.d_model) / sae.norm_out.item())
            for name, (key, sae) in saes.items()}
    pending, seen, bar = {key: [] for key in sites}, 0, progress(n_tokens, "held-out check")

    def feed(key, rows):  # one chunk of a site's kept rows into each of its SAEs
        for site, sae, m, s_out in runs.values():
            if site == key:
                m.add(*model.in_out(rows.to(sae.W_enc.device), sae.d_model), s_out)
    for out in data.activation_producer(lm, tok, sites, batches):
        seen += len(out[sites[0]])  # every site's rows come from the same tokens
        bar.update(min(len(out[sites[0]]), n_tokens - bar.n))
        for key in sites:
            d_model = next(sae.d_model for site, sae, _, _ in runs.values() if site == key)
            rows = torch.cat(pending[key] + [data.keep_rows(out[key], outlier_norm_limits[key],
                                                            d_model)])
            whole = len(rows) // chunk * chunk if seen < n_tokens else len(rows)
            for part in rows[:whole].split(chunk):
                feed(key, part)
            pending[key] = [rows[whole:]]
        if seen >= n_tokens:
            break
    bar.close()
    if seen == 0:
        raise data.no_tokens()
    out = {}
    for name, (_, _, m, _) in runs.items():
        out[name] = m.result()
        del out[name]["freq"]
        print(f"{name} held-out ({m.n:,} tokens): ev {out[name]['explained_variance']:.3f} | "
              f"ev centred {out[name]['explained_variance_centered']:.3f} | l0 "
              f"{out[name]['l0']:.1f} | never fired {100 * out[name]['dead_frac']:.1f}% (§4.4: "
              f"no activation on any of these {m.n:,} tokens)")
    return out


@torch.no_grad()
def lm_metrics(lm, tok, sae, config, n_tokens, dataset, lm_batch_size=8, chat=None):
    """One held-out pass: each batch runs the LM clean (capturing the site), with the SAE spliced
    in, and with the site zero-ablated (`three_passes`). Returns the metrics dict (firing
    frequencies (F,) under "freq"). chat:
    --chat DATA, conversations rendered by tok's chat template, read instead of dataset's
    held-out documents (§4.5.2)."""
    metrics = Metrics(sae)
    s_out = math.sqrt(sae.d_model) / config["dataset_average_activation_norm"]["out"]
    sums = dict.fromkeys(CE_PASSES + KL_KEYS, 0.0)
    n_scored, bar, T = 0, progress(n_tokens, "evaluate"), config["context_size"]
    batches = data.chat_batches(tok, chat, T, lm_batch_size) if chat else \
        data.document_batches(tok, dataset, "eval", T, lm_batch_size, epochs=1)
    for input_ids, mask in batches:
        input_ids, mask = input_ids.to(lm.device), mask.to(lm.device)
        _, x, batch, n = three_passes(lm, tok, sae, config, input_ids, mask)
        for key, value in batch.items():
            sums[key] += value
        n_scored += n
        metrics.add(*x, s_out)
        bar.update(len(x[0]))
        if metrics.n >= n_tokens:
            break
    bar.close()
    out = metrics.result()
    out.update({key: total / max(n_scored, 1) for key, total in sums.items()})
    out["delta_lm_loss"] = out["ce_loss_with_sae"] - out["ce_loss"]
    return out


def three_passes(lm, tok, sae, config, input_ids, mask):
    """One batch run clean, spliced and ablated: (keep (B, T) the replaced positions, (x_in,
    x_out) their clean rows, summed CE per pass and KL(clean || patched), predictions scored).
    Position t is scored (predicting t+1) when it is kept and t+1 is a real token."""
    layer, site, seen = config["layer"], config["site"], {}

    def clean(x_in, x_out):
        seen["keep"] = data.scored(input_ids, mask, tok, x_in, x_out,
                                   config.get("outlier_norm_limit"))
        seen["x"] = x_in[seen["keep"]], x_out[seen["keep"]]
        return x_out
    with model.splice(lm, layer, site, clean):
        logits = lm(input_ids=input_ids, attention_mask=mask, use_cache=False).logits
    ok = seen["keep"][:, :-1] & mask[:, 1:].bool()
    target = input_ids[:, 1:]
    ce, p, h = reference(logits[:, :-1], target)
    sums = {"ce_loss": ce[ok].sum().item()}
    for name, fn, kl_key in zip(CE_PASSES[1:], patches(sae, seen["keep"]), KL_KEYS):
        with model.splice(lm, layer, site, fn):
            logits = lm(input_ids=input_ids, attention_mask=mask, use_cache=False).logits
        ce, kl = scores(logits[:, :-1], target, p, h)
        sums[name], sums[kl_key] = ce[ok].sum().item(), kl[ok].sum().item()
    return seen["keep"], seen["x"], sums, int(ok.sum())


@torch.no_grad()
def scope_metrics(lm, tok, saes, n_tokens, dataset, context_size, lm_batch_size=8):
    """`lm_metrics` for many SAEs {name: (sae, config)} from one pass over held-out documents.
    Per batch ONE clean forward records every site and the residual entering each SAE's block;
    then each SAE is spliced alone, and each (site, outlier limit) ablated once, from its own
    block on (model.from_layer: the blocks before it would compute what the clean pass did).
    Each SAE reads batches until it has n_tokens scored rows, as alone, so its numbers are those
    `lm_metrics` gives it. Returns {name: metrics}."""
    keys = sorted({(config["layer"], config["site"]) for _, config in saes.values()})
    runs = {name: dict(metrics=Metrics(sae), n=0, sums=dict.fromkeys(CE_PASSES + KL_KEYS, 0.0))
            for name, (sae, _) in saes.items()}
    bar = progress(n_tokens * len(saes), "evaluate scope")
    for input_ids, mask in data.document_batches(tok, dataset, "eval", context_size,
                                                 lm_batch_size, epochs=1):
        active = [name for name, run in runs.items() if run["metrics"].n < n_tokens]
        if not active:
            break
        input_ids, mask = input_ids.to(lm.device), mask.to(lm.device)
        with model.recording(lm, keys, sorted({layer for layer, _ in keys})) as acts:
            logits = lm(input_ids=input_ids, attention_mask=mask, use_cache=False).logits
        clean = (input_ids[:, 1:], *reference(logits[:, :-1], input_ids[:, 1:]))
        del logits
        ablated = {}  # (site, limit) -> per-position (CE, KL): shared by the SAEs of a site
        for name in active:
            before = runs[name]["metrics"].n
            add_batch(runs[name], *saes[name], lm, tok, input_ids, mask, acts, clean, ablated)
            bar.update(min(runs[name]["metrics"].n, n_tokens) - min(before, n_tokens))
    bar.close()
    out = {}
    for name, run in runs.items():
        out[name] = run["metrics"].result()
        out[name].update({k: total / max(run["n"], 1) for k, total in run["sums"].items()})
        out[name]["delta_lm_loss"] = out[name]["ce_loss_with_sae"] - out[name]["ce_loss"]
    return out


def add_batch(run, sae, config, lm, tok, input_ids, mask, acts, clean, ablated):
    """One SAE's share of a batch in `scope_metrics`: its rows into run["metrics"], its summed
    CE and KL into run["sums"] (clean = (target, CE, p, h), `reference` of the shared clean
    logits; spliced and ablated run from its block on, the ablation shared through `ablated`),
    its scored predictions into run["n"]."""
    key, limit = (config["layer"], config["site"]), config.get("outlier_norm_limit")
    keep = data.scored(input_ids, mask, tok, *acts[key], limit)  # (B, T)
    ok = keep[:, :-1] & mask[:, 1:].bool()  # position t scored, predicting t+1
    target, ce_clean, p, h = clean
    where = (lm, key, acts[("resid", key[0])][0], mask, target, p, h)
    spliced, zeroed = patches(sae, keep)
    if (key, str(limit)) not in ablated:
        ablated[(key, str(limit))] = patched_scores(*where, zeroed)
    sums = run["sums"]
    sums["ce_loss"] += ce_clean[ok].sum().item()
    for ce_key, kl_key, (ce, kl) in zip(CE_PASSES[1:], KL_KEYS, (
            patched_scores(*where, spliced), ablated[(key, str(limit))])):
        sums[ce_key] += ce[ok].sum().item()
        sums[kl_key] += kl[ok].sum().item()
    run["n"] += int(ok.sum())
    s_out = math.sqrt(sae.d_model) / config["dataset_average_activation_norm"]["out"]
    run["metrics"].add(acts[key][0][keep], acts[key][1][keep], s_out)


def patches(sae, keep):
    """The two site patches of §4.1, each replacing the site's output at the scored positions
    keep (B, T) only: (the SAE's reconstruction, zero)."""
    def spliced(x_in, x_out):
        x_hat = reconstruct(sae, x_in.flatten(0, 1)).view_as(x_out)
        return torch.where(keep[..., None], x_hat.to(x_out.dtype), x_out)

    def zeroed(x_in, x_out):
        return torch.where(keep[..., None], torch.zeros_like(x_out), x_out)
    return spliced, zeroed


def patched_scores(lm, key, resid, mask, target, p, h, fn):
    """Per-position (CE, KL(clean || patched)), each (B, T-1), with site key's output replaced
    by fn, run from the site's block on: resid (B, T, D) is the residual stream entering it
    (model.from_layer); target, p, h as `scores` takes them."""
    with model.splice(lm, *key, fn), model.from_layer(lm, key[0]):
        logits = lm(inputs_embeds=resid, attention_mask=mask, use_cache=False).logits
    return scores(logits[:, :-1], target, p, h)


# -------------------------------------------------------------------------- long context (§4.5.1)

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
    for doc in data.iter_documents(dataset, "eval", epochs=1):
        ids = data.encode_documents(tok, [doc])[0]  # BOS + document
        longest = max(longest, len(ids))
        if len(ids) < T:  # §4.5.1: documents longer than T, each truncated to T; never joined
            continue
        ids, n_docs = torch.tensor([ids[:T]], device=lm.device), n_docs + 1
        mask = torch.ones_like(ids)
        x_in, x_out = model.capture(lm, ids, mask, [key])[key]
        keep = data.scored(ids, mask, tok, x_in, x_out, config.get("outlier_norm_limit"))
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
