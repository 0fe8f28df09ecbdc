"""Standard errors over documents, and paired ones for two SAEs scored on the same documents.

The metrics of §4 are ratios of sums over tokens (EV = 1 - sum err / sum x^2, Delta LM loss =
sum (CE spliced - CE clean) / predictions), but tokens are not independent: a document that is
hard for one token is hard for the next. So the unit is the document (metrics.Documents keeps
every sum per document) and a ratio's standard error is the linearized (delta-method,
cluster-robust) one over documents: each document's share (num_d - ratio x den_d) / sum(den),
their spread times sqrt(D / (D - 1)). Two SAEs read the same documents in the same order in
one evaluation (a folder) or in two evaluations of the same dataset and budget, so a difference
between them gets the spread of the documents' differences of shares (`paired`): what both find
hard cancels, which is what makes a difference of 0.005 resolvable or not.
"""
import math

import torch

RATIOS = {"l0": ("active", "rows"), "explained_variance": ("sq_err", "sq"),
          "delta_lm_loss": (("ce_loss_with_sae", "ce_loss"), "predictions"),
          "kl_div_with_sae": ("kl_div_with_sae", "predictions")}  # key: (numerator, denominator)
SE_KEYS = tuple(RATIOS)  # the keys given a standard error, stored as `{key}_se`


def shares(per_document, key):
    """(documents,) each document's first-order share of the error of `key` (RATIOS), a ratio
    sum(num) / sum(den) over documents. EV is one minus such a ratio: only the sign changes."""
    num, den = RATIOS[key]
    if isinstance(num, tuple):  # a difference of two sums (spliced - clean)
        num = torch.tensor(per_document[num[0]]) - torch.tensor(per_document[num[1]])
    else:
        num = torch.tensor(per_document[num])
    den = torch.tensor(per_document[den])
    ratio = num.sum() / den.sum()
    return (num - ratio * den) / den.sum()


def spread(per_document_shares):
    """The standard error from the documents' shares; nan under two documents."""
    n = len(per_document_shares)
    if n < 2:
        return float("nan")
    return math.sqrt(n / (n - 1) * per_document_shares.pow(2).sum().item())


def has(out, key):
    """Whether an evaluation's metrics hold what `key`'s standard error needs."""
    num, den = RATIOS[key]
    names = num if isinstance(num, tuple) else (num,)
    return key in out and all(name in out.get("per_document", {}) for name in names + (den,))


def with_standard_errors(out):
    """out (an evaluation's metrics) with `{key}_se` for every key of SE_KEYS it can give."""
    for key in SE_KEYS:
        if has(out, key):
            out[f"{key}_se"] = spread(shares(out["per_document"], key))
    return out


def paired(a, b, key):
    """(a[key] - b[key], its standard error) of two evaluations that read the same documents in
    the same order. A document only one of them read counts on its side alone."""
    share_a = shares(a["per_document"], key)
    share_b = shares(b["per_document"], key)
    n = max(len(share_a), len(share_b))
    share_a = torch.cat([share_a, torch.zeros(n - len(share_a), dtype=share_a.dtype)])
    share_b = torch.cat([share_b, torch.zeros(n - len(share_b), dtype=share_b.dtype)])
    return a[key] - b[key], spread(share_a - share_b)


def pairs(results, place_of):
    """Lines comparing each SAE with the first SAE at its place in results {name: metrics}
    (another width, JumpReLU against TopK): the paired difference and its standard error for
    EV and Delta LM loss, and whether it is outside twice that noise. place_of: name -> place."""
    first = {}
    lines = []
    for name, m in results.items():
        other = first.setdefault(place_of(name), name)
        if other == name:
            continue
        cells = []
        for key, label in (("explained_variance", "EV"), ("delta_lm_loss", "dLM loss")):
            if has(m, key) and has(results[other], key):
                diff, se = paired(m, results[other], key)
                verdict = "outside 2 SE" if abs(diff) > 2 * se else "within 2 SE"
                cells.append(f"{label} {diff:+.4f} +- {se:.4f} ({verdict})")
        lines.append(f"  {name} - {other}: " + ", ".join(cells))
    return lines
