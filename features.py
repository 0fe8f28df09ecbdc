"""Look inside an SAE (§4.3, §4.6): `python evaluate.py CKPT --features 12,345 [--top N]`.

One pass over held-out documents serves every requested feature. Per feature: its firing frequency,
the N documents where it peaks highest (a window of tokens with the activating token marked, and
per-token activations laid out as in App. D, ready to paste into the monosemanticity rubric
prompt), and its nearest features by decoder cosine similarity against the Johnson-Lindenstrauss
baseline eps = sqrt(12 ln F / D): neighbours above it are non-trivially similar (§4.6).
Kept apart from evaluate.py (metrics) for length; the scored tokens are model.scored's, as in
training and evaluation.
Shapes: B sequences, T tokens, N rows, D model width, F features.
"""
import math

import torch
import torch.nn.functional as F

import model
import postprocess
from buffer import progress

BEFORE, AFTER = 24, 8  # tokens of context shown before and after the activating token
NEIGHBOURS = 8  # nearest features by decoder cosine shown per feature


def feature_acts(sae, x_in, feats):
    """(N, len(feats)) activations of some features on raw inputs (N, D), however the SAE infers
    (TopK competes over all F features, so the whole encoder runs)."""
    f = sae.encode(x_in.to(sae.W_enc.dtype) * sae.scales()[0])
    if isinstance(f, tuple):
        vals, idx = f  # (N, K) each
        return torch.stack([(vals * (idx == i)).sum(1) for i in feats], 1)
    return f[:, feats]


@torch.no_grad()
def feature_pass(lm, tok, sae, config, feats, n_tokens, dataset, lm_batch_size=8):
    """One pass over held-out documents for every requested feature: [(ids (T,), acts (T, n))]
    per document (0 at unscored tokens) and the number of scored tokens."""
    key, docs, n, bar = (config["layer"], config["site"]), [], 0, progress(n_tokens, "features")
    for input_ids, mask in model.document_batches(tok, dataset, "eval", config["context_size"],
                                                  lm_batch_size, epochs=1):
        input_ids, mask = input_ids.to(lm.device), mask.to(lm.device)
        x_in, x_out = model.capture(lm, input_ids, mask, [key])[key]
        keep = model.scored(input_ids, mask, tok, x_in, x_out, config.get("outlier_norm_limit"))
        acts = torch.zeros(*keep.shape, len(feats), device=lm.device)  # (B, T, n)
        acts[keep] = feature_acts(sae, x_in[keep], feats).to(acts.dtype)
        docs += [(ids[m].cpu(), a[m].float().cpu()) for ids, m, a in
                 zip(input_ids, mask.bool(), acts)]
        n += keep.sum().item()
        bar.update(keep.sum().item())
        if n >= n_tokens:
            break
    bar.close()
    return docs, n


def inspect_features(docs, n, sae, feats, top, tok):
    """Per feature: firing frequency, the `top` documents where it peaks highest (window of
    tokens, the activating one marked, per-token activations; `document` is its index in this
    pass), and its nearest features by decoder cosine with the JL baseline eps = sqrt(12 ln F / D)
    (§4.6)."""
    eps = math.sqrt(12 * math.log(sae.n_features) / sae.d_model)
    W = F.normalize(sae.W_dec.detach().float(), dim=1)  # (F, D) unit directions
    out = {"n_tokens": n, "jl_eps": eps, "features": []}
    for j, i in enumerate(feats):
        peaks = sorted(((a[:, j].max().item(), d) for d, (_, a) in enumerate(docs)),
                       reverse=True)
        contexts = []
        for act, d in [p for p in peaks[:top] if p[0] > 0]:
            ids, a = docs[d]
            pos = a[:, j].argmax().item()
            lo, hi = max(0, pos - BEFORE), min(len(ids), pos + AFTER + 1)
            contexts.append({"activation": act, "document": d, "position": pos,
                             "marked": pos - lo,
                             "tokens": [tok.decode([t]) for t in ids[lo:hi].tolist()],
                             "activations": [round(v, 3) for v in a[lo:hi, j].tolist()]})
        cos = W @ W[i]  # (F,)
        cos[i] = -2
        near = cos.topk(min(NEIGHBOURS, sae.n_features - 1))
        fired = sum((a[:, j] > 0).sum().item() for _, a in docs)
        out["features"].append({
            "feature": i, "fired": fired, "frequency": fired / max(n, 1), "contexts": contexts,
            "neighbours": [{"feature": k, "cosine": c, "above_jl": c > eps}
                           for c, k in zip(near.values.tolist(), near.indices.tolist())]})
    return out


def _show(token):
    return token.strip() or repr(token)


def app_d(contexts):
    """Contexts in the App. D layout of the monosemanticity rubric prompt: one token and its
    activation per line, each context between <START> and <END>."""
    lines = ["[Context]"]
    for n, c in enumerate(contexts, 1):
        lines += [f"Sentence {n}:", "<START>"]
        lines += [f"{_show(t)}\t{a:.1f}" for t, a in zip(c["tokens"], c["activations"])]
        lines.append("<END>")
    return "\n".join(lines)


def print_features(out):
    for f in out["features"]:
        print(f"feature {f['feature']} | fires on {f['fired']:,} of {out['n_tokens']:,} held-out "
              f"tokens ({100 * f['frequency']:.2f}%) | top {len(f['contexts'])} contexts, "
              f"activating token in [[ ]]:")
        for c in f["contexts"]:
            text = "".join(f"[[{t}]]" if k == c["marked"] else t
                           for k, t in enumerate(c["tokens"]))
            print(f"  {c['activation']:8.3f}  {' '.join(text.split())}")
        print("App. D layout (paste into the rubric prompt):\n" + app_d(f["contexts"]))
        print(f"nearest features by decoder cosine (JL baseline eps = sqrt(12 ln F / D) = "
              f"{out['jl_eps']:.3f}; * = above eps, non-trivially similar):\n  " +
              "  ".join(f"{n['feature']} {n['cosine']:.3f}{'*' if n['above_jl'] else ''}"
                        for n in f["neighbours"]) + "\n")


def show(lm, tok, sae, config, feats, n_tokens, top, dataset):
    """Inspect and print features; returns what --json writes. An unfolded SAE is folded first
    (steps 1-2, exact): activations are then raw magnitudes along unit decoder directions."""
    if not config.get("folded"):
        postprocess.fold_norm_(sae)
        postprocess.unit_decoder_(sae)
    docs, n = feature_pass(lm, tok, sae, config, feats, n_tokens, dataset)
    out = inspect_features(docs, n, sae, feats, top, tok)
    print_features(out)
    return out

