"""The metrics of §4, on held-out text through the LM or on pre-saved rows.

- `Metrics`: running sums over evaluated rows: L0; explained variance, eq. 6
  (`explained_variance` = 1 - sum ||x - x_hat||^2 / sum ||x||^2 over all tokens) and the
  variance-based one peers use (`explained_variance_centered`, denominator sum ||x - mean x||^2);
  `mse` per element in the SAE's normalized training space; firing frequencies (§4.4: `dead_frac`
  never fires, `ultra_active_frac` fires on > 10% of tokens).
- `heldout_check`: train.py's first look after training, every SAE from one LM pass.
- `lm_metrics`: one held-out pass that runs the LM clean, with the reconstruction spliced in at
  the site (TC: in place of the MLP output) and with the site zero-ablated: CE of each, their
  difference `delta_lm_loss` (§4.1), and KL(clean || patched). Special tokens and tokens over
  the outlier norm limit keep their original activation and their predictions are not scored.
Shapes: B sequences, T tokens, N rows, D model width, F features, V vocabulary.
A folder of SAEs evaluated in one pass, long context (§4.5.1) and chats (§4.5.2) are in extras/.
"""
import math

import torch
import torch.nn.functional as F

import data
import model

CHUNK = 4096  # rows per SAE forward when scoring
CE_PASSES = ("ce_loss", "ce_loss_with_sae", "ce_loss_ablated")  # clean, spliced, zero-ablated
KL_KEYS = ("kl_div_with_sae", "kl_div_ablated")  # KL(clean || spliced), KL(clean || ablated)


def firing_counts(f, n_features):
    """(F,) how many rows each feature fired on, from TopK's (values, indices) or dense f."""
    if isinstance(f, tuple):
        vals, idx = f
        return torch.bincount(idx[vals > 0], minlength=n_features)
    return (f > 0).sum(0)


class Metrics:
    """Running sums over evaluated rows, in the SAE's normalized space (EV is scale-free
    anyway)."""

    def __init__(self, sae):
        self.sae = sae
        self.n = 0  # rows
        self.sq_err = 0.0  # sum ||x - x_hat||^2
        self.sq = 0.0  # sum ||x||^2
        self.sum_y = torch.zeros(sae.d_model, dtype=torch.float64)  # sum x, for the centred EV
        self.counts = torch.zeros(sae.n_features, dtype=torch.float64)  # firings per feature

    @torch.no_grad()
    def add(self, x_in, x_out, s_out):
        """x_in, x_out (N, D) raw; s_out maps raw targets to the normalized space."""
        x_hat, f = raw_forward(self.sae, x_in)
        self.counts += firing_counts(f, self.sae.n_features).double().cpu()
        err = (x_hat - x_out.to(x_hat.dtype)).double() * s_out
        y = x_out.double() * s_out
        self.sq_err += err.pow(2).sum().item()
        self.sq += y.pow(2).sum().item()
        self.sum_y += y.sum(0).cpu()
        self.n += len(y)

    def result(self):
        freq = self.counts / max(self.n, 1)
        centred = self.sq - self.sum_y.pow(2).sum().item() / self.n
        return {"n_tokens": self.n, "l0": freq.sum().item(),
                "mse": self.sq_err / (self.n * self.sae.d_model),
                "explained_variance": 1 - self.sq_err / self.sq,
                "explained_variance_centered": 1 - self.sq_err / centred,
                "dead_frac": (freq == 0).double().mean().item(),
                "ultra_active_frac": (freq > 0.1).double().mean().item(), "freq": freq}


def raw_forward(sae, x_in):
    """Raw x_in (N, D) -> (raw x_hat (N, D), f): the SAE in its normalized space, units
    restored. x_hat is what a splice puts back in the LM."""
    s_in, s_out = sae.scales()
    x_hat, f = sae(x_in.to(sae.W_enc) * s_in)
    return x_hat / s_out, f


def reconstruction_metrics(sae, rows, norm_out=None, freq=False):
    """Metrics from raw rows (N, D), or (N, 2D) = input | target for a transcoder. norm_out: the
    dataset norm defining the MSE's space (default: the SAE's own); freq: keep the (F,) firing
    frequencies under "freq"."""
    running = Metrics(sae)
    s_out = math.sqrt(sae.d_model) / (norm_out or sae.norm_out.item())
    for chunk in rows.split(CHUNK):
        running.add(*model.in_out(chunk.to(sae.W_enc.device), sae.d_model), s_out)
    out = running.result()
    if not freq:
        del out["freq"]
    return out


class Chunks:
    """Rows arriving in pieces of any size, handed on in chunks of CHUNK rows cut as
    rows.split(CHUNK) cuts them all at once: a float32 matmul's result can depend on how many
    rows it multiplies, so metrics over a stream then equal metrics over the whole."""

    def __init__(self):
        self.pending = []  # the rows of an unfinished chunk

    def add(self, rows):
        """The whole chunks now complete."""
        rows = torch.cat(self.pending + [rows])
        whole = len(rows) // CHUNK * CHUNK
        self.pending = [rows[whole:]]
        return rows[:whole].split(CHUNK)

    def rest(self):
        """The unfinished chunk, if any (the stream has ended)."""
        rest = torch.cat(self.pending) if self.pending else None
        self.pending = []
        return [rest] if rest is not None and len(rest) else []


@torch.no_grad()
def heldout_check(lm, tok, batches, saes, outlier_norm_limits, n_tokens):
    """train.py's check after training: EV (eq. 6), L0 and the never-fired share of each SAE
    {name: ((layer, site), sae)} on n_tokens held-out rows of its place (one LM pass over
    batches for all, each place's rows within its outlier norm limit); prints a line per SAE
    and returns {name: metrics}. Streamed: memory holds an LM batch per place, not n_tokens rows
    (a scope's 40 places: ~9 GB), and the results are those of `reconstruction_metrics` on all
    the rows at once."""
    places = list(dict.fromkeys(place for place, _ in saes.values()))
    d_model = lm.config.hidden_size
    running = {name: Metrics(sae) for name, (_, sae) in saes.items()}
    chunks = {place: Chunks() for place in places}
    seen = 0
    bar = data.progress(n_tokens, "held-out check")
    for rows in data.activation_producer(lm, tok, places, batches):
        # 1. one LM batch: every place's rows come from the same tokens
        seen += len(rows[places[0]])
        bar.update(min(len(rows[places[0]]), n_tokens - bar.n))
        for place in places:
            # 2. the rows of this place within its outlier norm limit, in whole chunks
            kept = data.drop_outliers(rows[place], outlier_norm_limits[place], d_model)
            for chunk in chunks[place].add(kept):
                # 3. each chunk into every SAE of this place
                score_chunk(chunk, place, saes, running)
        if seen >= n_tokens:  # the batch that completes n_tokens is scored whole
            break
    for place in places:  # 4. the last, short chunk
        for chunk in chunks[place].rest():
            score_chunk(chunk, place, saes, running)
    bar.close()
    if seen == 0:
        raise data.no_tokens()
    out = {}
    for name, m in running.items():
        out[name] = m.result()
        del out[name]["freq"]
        print(f"{name} held-out ({m.n:,} tokens): ev {out[name]['explained_variance']:.3f} | "
              f"ev centred {out[name]['explained_variance_centered']:.3f} | l0 "
              f"{out[name]['l0']:.1f} | never fired {100 * out[name]['dead_frac']:.1f}% (§4.4: "
              f"no activation on any of these {m.n:,} tokens)")
    return out


def score_chunk(chunk, place, saes, running):
    """Raw rows (N, C) of a place into the Metrics (running) of every SAE {name: (place, sae)}
    there."""
    for name, (sae_place, sae) in saes.items():
        if sae_place == place:
            s_out = math.sqrt(sae.d_model) / sae.norm_out.item()
            x_in, x_out = model.in_out(chunk.to(sae.W_enc.device), sae.d_model)
            running[name].add(x_in, x_out, s_out)


# ----------------------------------------------------------------------------- the LM's loss

def clean_reference(logits, target):
    """Clean next-token logits (..., V) and the tokens that follow, target (...) -> (CE, p, h)
    per position, p the clean distribution (..., V) and h = sum p log p: what `ce_and_kl`
    measures each patched pass against, computed once per batch."""
    lp = F.log_softmax(logits.float(), -1)
    p = lp.exp()
    h = (p * lp).sum(-1)
    ce, _ = ce_and_kl(logits, target, p, h)  # CE as every patched pass computes it
    return ce, p, h


def ce_and_kl(logits, target, p, h):
    """Patched logits (..., V) -> (CE, KL(clean || patched)) per position. With log q = logits -
    lse (lse = logsumexp(logits)) and sum p = 1, KL = h - p.logits + lse: the logits are read
    twice and nothing of their size is written (a log-softmax of each pass cost a third of a
    scope's evaluation)."""
    logits = logits.float()
    lse = torch.logsumexp(logits, -1)
    ce = lse - logits.gather(-1, target[..., None])[..., 0]
    kl = h - torch.linalg.vecdot(p, logits) + lse
    return ce, kl


def patches(sae, keep):
    """The two site patches of §4.1, each replacing the site's output at the scored positions
    keep (B, T) only: (the SAE's reconstruction, zero)."""
    def spliced(x_in, x_out):
        x_hat, _ = raw_forward(sae, x_in.flatten(0, 1))
        return torch.where(keep[..., None], x_hat.view_as(x_out).to(x_out.dtype), x_out)

    def zeroed(x_in, x_out):
        return torch.where(keep[..., None], torch.zeros_like(x_out), x_out)
    return spliced, zeroed


@torch.no_grad()
def lm_metrics(lm, tok, sae, config, n_tokens, batches):
    """One pass over token batches (held-out documents, or chats, §4.5.2): each batch runs the
    LM clean (capturing the site), with the SAE spliced in, and with the site zero-ablated
    (`three_passes`), until n_tokens rows are scored. Returns the metrics dict (firing
    frequencies (F,) under "freq"). tok: the tokenizer that made the batches."""
    running = Metrics(sae)
    s_out = math.sqrt(sae.d_model) / config["dataset_average_activation_norm"]["out"]
    sums = dict.fromkeys(CE_PASSES + KL_KEYS, 0.0)
    n_predictions = 0
    bar = data.progress(n_tokens, "evaluate")
    for input_ids, mask in batches:
        input_ids = input_ids.to(lm.device)
        mask = mask.to(lm.device)
        _, rows, batch_sums, n = three_passes(lm, tok, sae, config, input_ids, mask)
        for key, value in batch_sums.items():
            sums[key] += value
        n_predictions += n
        running.add(*rows, s_out)
        bar.update(len(rows[0]))
        if running.n >= n_tokens:
            break
    bar.close()
    out = running.result()
    out.update({key: total / max(n_predictions, 1) for key, total in sums.items()})
    out["delta_lm_loss"] = out["ce_loss_with_sae"] - out["ce_loss"]
    return out


def three_passes(lm, tok, sae, config, input_ids, mask):
    """One batch run clean, spliced and ablated: (keep (B, T) the replaced positions, (x_in,
    x_out) their clean rows, summed CE per pass and KL(clean || patched), predictions scored).
    Position t is scored (predicting t+1) when it is kept and t+1 is a real token."""
    layer = config["layer"]
    site = config["site"]
    seen = {}

    def clean(x_in, x_out):  # the identity, noting the scored positions and their rows
        keep = data.scored_positions(input_ids, mask, tok, x_in, x_out,
                                     config.get("outlier_norm_limit"))
        seen["keep"] = keep
        seen["rows"] = (x_in[keep], x_out[keep])
        return x_out
    with model.splice(lm, layer, site, clean):
        logits = lm(input_ids=input_ids, attention_mask=mask, use_cache=False).logits
    ok = seen["keep"][:, :-1] & mask[:, 1:].bool()
    target = input_ids[:, 1:]
    ce, p, h = clean_reference(logits[:, :-1], target)
    sums = {"ce_loss": ce[ok].sum().item()}
    for name, fn, kl_key in zip(CE_PASSES[1:], patches(sae, seen["keep"]), KL_KEYS):
        with model.splice(lm, layer, site, fn):
            logits = lm(input_ids=input_ids, attention_mask=mask, use_cache=False).logits
        ce, kl = ce_and_kl(logits[:, :-1], target, p, h)
        sums[name] = ce[ok].sum().item()
        sums[kl_key] = kl[ok].sum().item()
    return seen["keep"], seen["rows"], sums, int(ok.sum())
