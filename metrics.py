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
  Delta LM loss may read fewer documents than EV and L0 (`Budget`).
- Every sum over documents is also kept per document (`Documents`), the unit that is
  independent (a document's tokens are not): extras/noise.py turns them into standard errors.
Shapes: B sequences, T tokens, N rows, D model width, F features, V vocabulary.
A folder of SAEs evaluated in one pass, long context (§4.5.1) and chats (§4.5.2) are in extras/.
"""
import dataclasses
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
    anyway), and per document where the rows' documents are known (`Documents`); with
    `add_losses`, the LM's CE and KL of §4.1 too."""

    def __init__(self, sae):
        self.sae = sae
        self.n = 0  # rows
        self.sq_err = 0.0  # sum ||x - x_hat||^2
        self.sq = 0.0  # sum ||x||^2
        self.sum_y = torch.zeros(sae.d_model, dtype=torch.float64)  # sum x, for the centred EV
        self.counts = torch.zeros(sae.n_features, dtype=torch.float64)  # firings per feature
        self.documents = Documents()

    @torch.no_grad()
    def add(self, x_in, x_out, s_out, docs=None):
        """x_in, x_out (N, D) raw; s_out maps raw targets to the normalized space. docs: (the
        document of each row (N,), documents in the batch) when known."""
        x_hat, f = raw_forward(self.sae, x_in)
        self.counts += firing_counts(f, self.sae.n_features).double().cpu()
        err = (x_hat - x_out.to(x_hat.dtype)).double() * s_out
        y = x_out.double() * s_out
        self.sq_err += err.pow(2).sum().item()
        self.sq += y.pow(2).sum().item()
        self.sum_y += y.sum(0).cpu()
        self.n += len(y)
        if docs is not None:
            active = f[0] > 0 if isinstance(f, tuple) else f > 0  # (N, K) or (N, F)
            per_row = {"rows": torch.ones(len(y)), "sq_err": err.pow(2).sum(-1),
                       "sq": y.pow(2).sum(-1), "active": active.sum(-1)}
            self.documents.add(per_row, *docs)

    def add_losses(self, per_position, ok):
        """per_position {CE_PASSES and KL_KEYS: (B, T-1)} of one batch of documents; ok (B, T-1)
        the predictions scored."""
        sums = {key: torch.where(ok, value, 0.0).double().sum(-1)
                for key, value in per_position.items()}
        sums["predictions"] = ok.sum(-1)
        self.documents.add_sums(sums)

    def result(self):
        freq = self.counts / max(self.n, 1)
        centred = self.sq - self.sum_y.pow(2).sum().item() / self.n
        out = {"n_tokens": self.n, "l0": freq.sum().item(),
               "mse": self.sq_err / (self.n * self.sae.d_model),
               "explained_variance": 1 - self.sq_err / self.sq,
               "explained_variance_centered": 1 - self.sq_err / centred,
               "dead_frac": (freq == 0).double().mean().item(),
               "ultra_active_frac": (freq > 0.1).double().mean().item(), "freq": freq}
        per_document = self.documents.result()
        if "predictions" in per_document:  # CE over all predictions, not a mean of documents'
            n = sum(per_document["predictions"])
            out.update({key: sum(per_document[key]) / max(n, 1) for key in CE_PASSES + KL_KEYS})
            out["delta_lm_loss"] = out["ce_loss_with_sae"] - out["ce_loss"]
            out["n_predictions"] = int(n)
        if per_document:
            out["n_documents"] = len(per_document.get("rows", per_document["predictions"]))
            out["per_document"] = per_document
        return out


class Documents:
    """Sums per document over a pass in reading order ({key: [(documents of a batch,)]}): the
    unit that is independent (a document's tokens are not), for the standard errors of
    extras/noise.py."""

    def __init__(self):
        self.sums = {}

    def add(self, per_row, doc, n_docs):
        """per_row {key: (N,)} summed into the n_docs documents of a batch; doc (N,) the
        document of each row."""
        self.add_sums({key: torch.zeros(n_docs, dtype=torch.float64).index_add_(
            0, doc.cpu(), values.double().cpu()) for key, values in per_row.items()})

    def add_sums(self, per_document):
        """{key: (documents of a batch,)} already summed per document."""
        for key, values in per_document.items():
            self.sums.setdefault(key, []).append(values.double().cpu())

    def result(self):
        return {key: torch.cat(sums).tolist() for key, sums in self.sums.items()}


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


@dataclasses.dataclass
class Budget:
    """How much text an evaluation scores (evaluate.py --tokens and --lm-tokens)."""
    rows: int  # rows scored for EV, L0 and firing
    lm_rows: int = None  # of them, the rows whose batches also run the spliced and ablated
    #                      passes for CE, KL and Delta LM loss (default: all)

    def __post_init__(self):
        self.lm_rows = self.rows if self.lm_rows is None else min(self.lm_rows, self.rows)


def documents_of(keep):
    """(the document of each kept position (N,), documents in the batch) from keep (B, T)."""
    return keep.nonzero()[:, 0], keep.shape[0]


@torch.no_grad()
def lm_metrics(lm, tok, sae, config, budget, batches):
    """One pass over token batches (held-out documents, or chats, §4.5.2) until budget.rows rows
    are scored: the first budget.lm_rows run the LM clean (capturing the site), with the SAE
    spliced in and with the site zero-ablated (`three_passes`), the rest only as far as the site
    (`clean_rows`). Returns the metrics dict (firing frequencies (F,) under "freq").
    tok: the tokenizer that made the batches."""
    running = Metrics(sae)
    s_out = math.sqrt(sae.d_model) / config["dataset_average_activation_norm"]["out"]
    bar = data.progress(budget.rows, "evaluate")
    for input_ids, mask in batches:
        input_ids = input_ids.to(lm.device)
        mask = mask.to(lm.device)
        if running.n < budget.lm_rows:
            keep, rows, per_position, ok = three_passes(lm, tok, sae, config, input_ids, mask)
            running.add_losses(per_position, ok)
        else:
            keep, rows = clean_rows(lm, tok, config, input_ids, mask)
        running.add(*rows, s_out, docs=documents_of(keep))
        bar.update(len(rows[0]))
        if running.n >= budget.rows:
            break
    bar.close()
    return running.result()


def clean_rows(lm, tok, config, input_ids, mask):
    """(keep (B, T) the scored positions, (x_in, x_out) their rows) of one batch, the LM run
    only as far as the site (model.capture)."""
    place = (config["layer"], config["site"])
    x_in, x_out = model.capture(lm, input_ids, mask, [place])[place]
    keep = data.scored_positions(input_ids, mask, tok, x_in, x_out,
                                 config.get("outlier_norm_limit"))
    return keep, (x_in[keep], x_out[keep])


def three_passes(lm, tok, sae, config, input_ids, mask):
    """One batch run clean, spliced and ablated: (keep (B, T) the replaced positions, (x_in,
    x_out) their clean rows, {CE per pass, KL(clean || patched)} each (B, T-1), ok (B, T-1) the
    predictions scored). Position t is scored (predicting t+1) when it is kept and t+1 is a
    real token."""
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
    per_position = {"ce_loss": ce}
    for name, fn, kl_key in zip(CE_PASSES[1:], patches(sae, seen["keep"]), KL_KEYS):
        with model.splice(lm, layer, site, fn):
            logits = lm(input_ids=input_ids, attention_mask=mask, use_cache=False).logits
        per_position[name], per_position[kl_key] = ce_and_kl(logits[:, :-1], target, p, h)
    return seen["keep"], seen["rows"], per_position, ok
