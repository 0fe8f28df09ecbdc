"""Look inside an SAE (§4.3, §4.6): `python evaluate.py CKPT --features 12,345 [--top N]`.

One pass over held-out documents serves every requested feature. Per feature: its firing frequency,
the N documents where it peaks highest (a window of tokens with the activating token marked, and
per-token activations laid out as in App. D, ready to paste into the monosemanticity rubric
prompt), and its nearest features by decoder cosine similarity against the Johnson-Lindenstrauss
baseline eps = sqrt(12 ln F / D): neighbours above it are non-trivially similar (§4.6).
The metrics are metrics.py's; the scored tokens are data.scored_positions', as in training and
evaluation. The attribution graph's page (extras/graph_page.py) shows the same contexts.
Shapes: B sequences, T tokens, N rows, D model width, F features.
"""
import html
import math

import torch
import torch.nn.functional as F

import data
import model
from formats import place_name

BEFORE = 24  # tokens of context shown before the activating token ...
AFTER = 8  # ... and after it
NEIGHBOURS = 8  # nearest features by decoder cosine shown per feature
HIST_BINS = 30  # bins of a feature's activation histogram, 0 .. its largest activation


def feature_acts(sae, x_in, feats):
    """(N, len(feats)) activations of some features on raw inputs (N, D), however the SAE infers
    (TopK competes over all F features, so the whole encoder runs)."""
    f = sae.encode(x_in.to(sae.W_enc) * sae.scales()[0])
    if isinstance(f, tuple):
        vals, idx = f  # (N, K) each
        return torch.stack([(vals * (idx == i)).sum(1) for i in feats], 1)
    return f[:, feats]


@torch.no_grad()
def feature_pass(lm, tok, sae, config, feats, n_tokens):
    """One pass over held-out documents (of config's dataset_path) for every requested feature:
    [(ids (T,), acts (T, n))] per document (0 at unscored tokens) and the number of scored
    tokens."""
    place = (config["layer"], config["site"])
    batches = data.heldout_batches(tok, config["dataset_path"], config["context_size"], 8)
    docs = []
    n = 0
    bar = data.progress(n_tokens, "features")
    for input_ids, mask in batches:
        input_ids = input_ids.to(lm.device)
        mask = mask.to(lm.device)
        x_in, x_out = model.capture(lm, input_ids, mask, [place])[place]
        keep = data.scored_positions(input_ids, mask, tok, x_in, x_out,
                                     config.get("outlier_norm_limit"))
        acts = torch.zeros(*keep.shape, len(feats), device=lm.device)  # (B, T, n)
        acts[keep] = feature_acts(sae, x_in[keep], feats).to(acts.dtype)
        for ids, real, a in zip(input_ids, mask.bool(), acts):
            docs.append((ids[real].cpu(), a[real].float().cpu()))
        n += keep.sum().item()
        bar.update(keep.sum().item())
        if n >= n_tokens:
            break
    bar.close()
    return docs, n


@torch.no_grad()
def contexts_by_layer(lm, tok, saes, wanted, config, args):
    """{layer: {feature: `inspect_feature`'s view}} of the features wanted {layer: features} of
    transcoders saes {layer: sae in inference form}, from ONE pass over args.contexts held-out
    tokens (of config's dataset and context) capturing every layer: the attribution graph's
    page (extras/graph_page.py)."""
    layers = sorted(wanted)
    places = [(layer, "TC") for layer in layers]
    columns = {layer: sorted(wanted[layer]) for layer in layers}
    docs = {layer: [] for layer in layers}
    n = 0
    batches = data.heldout_batches(tok, config["dataset_path"], config["context_size"], 8)
    for input_ids, mask in batches:
        input_ids = input_ids.to(lm.device)
        mask = mask.to(lm.device)
        acts = model.capture(lm, input_ids, mask, places)
        keep = data.scored_positions(input_ids, mask, tok)
        for layer in layers:
            x_in = acts[(layer, "TC")][0]
            a = torch.zeros(*keep.shape, len(columns[layer]), device=lm.device)  # (B, T, n)
            a[keep] = feature_acts(saes[layer], x_in[keep], columns[layer]).to(a.dtype)
            for ids, real, row in zip(input_ids, mask.bool(), a):
                docs[layer].append((ids[real].cpu(), row[real].float().cpu()))
        n += keep.sum().item()
        if n >= args.contexts:
            break
    return {layer: {feature: inspect_feature(docs[layer], n, j, args.top, tok)
                    for j, feature in enumerate(columns[layer])} for layer in layers}


def inspect_features(docs, n, sae, feats, top, tok):
    """Per feature (`inspect_feature`, `neighbours`), with the number of tokens read and the JL
    baseline eps = sqrt(12 ln F / D) (§4.6)."""
    eps = math.sqrt(12 * math.log(sae.n_features) / sae.d_model)
    W = F.normalize(sae.W_dec.detach().float(), dim=1)  # (F, D) unit directions
    features = []
    for j, i in enumerate(feats):
        features.append({"feature": i, **inspect_feature(docs, n, j, top, tok),
                         "neighbours": neighbours(W, i, eps)})
    return {"n_tokens": n, "jl_eps": eps, "features": features}


def inspect_feature(docs, n, j, top, tok):
    """Column j of the documents' activations (n scored tokens): firing count and frequency,
    the `top` documents where it peaks highest (a window of tokens, the activating one marked,
    per-token activations; `document` is its index in this pass), its activation histogram."""
    peaks = sorted(((a[:, j].max().item(), d) for d, (_, a) in enumerate(docs)), reverse=True)
    contexts = [context(docs[d], j, act, d, tok) for act, d in peaks[:top] if act > 0]
    fired = sum((a[:, j] > 0).sum().item() for _, a in docs)
    acts = torch.cat([a[:, j][a[:, j] > 0] for _, a in docs])  # every nonzero activation
    largest = acts.max().item() if len(acts) else 0.0
    counts = torch.zeros(HIST_BINS)
    if len(acts):
        counts = torch.histc(acts, bins=HIST_BINS, min=0, max=largest)
    return {"fired": fired, "frequency": fired / max(n, 1), "contexts": contexts,
            "histogram": {"max": largest, "counts": counts.long().tolist()}}


def neighbours(W, i, eps):
    """Feature i's nearest features by decoder cosine (W: unit decoder rows (F, D)), each
    marked when above the JL baseline eps (§4.6)."""
    cos = W @ W[i]  # (F,)
    cos[i] = -2
    near = cos.topk(min(NEIGHBOURS, len(W) - 1))
    return [{"feature": k, "cosine": c, "above_jl": c > eps}
            for c, k in zip(near.values.tolist(), near.indices.tolist())]


def context(doc, j, activation, d, tok):
    """The window of document d = (ids, acts) around its peak activation of feature column j."""
    ids, a = doc
    pos = a[:, j].argmax().item()
    lo = max(0, pos - BEFORE)
    hi = min(len(ids), pos + AFTER + 1)
    return {"activation": activation, "document": d, "position": pos, "marked": pos - lo,
            "tokens": [tok.decode([t]) for t in ids[lo:hi].tolist()],
            "activations": [round(v, 3) for v in a[lo:hi, j].tolist()]}


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


def marked_text(c):
    """A context as one line of text, the activating token in [[ ]]."""
    text = "".join(f"[[{t}]]" if k == c["marked"] else t for k, t in enumerate(c["tokens"]))
    return " ".join(text.split())


def print_features(out):
    for f in out["features"]:
        print(f"feature {f['feature']} | fires on {f['fired']:,} of {out['n_tokens']:,} held-out "
              f"tokens ({100 * f['frequency']:.2f}%) | top {len(f['contexts'])} contexts, "
              f"activating token in [[ ]]:")
        for c in f["contexts"]:
            print(f"  {c['activation']:8.3f}  {marked_text(c)}")
        print("App. D layout (paste into the rubric prompt):\n" + app_d(f["contexts"]))
        near = "  ".join(f"{n['feature']} {n['cosine']:.3f}{'*' if n['above_jl'] else ''}"
                         for n in f["neighbours"])
        print(f"nearest features by decoder cosine (JL baseline eps = sqrt(12 ln F / D) = "
              f"{out['jl_eps']:.3f}; * = above eps, non-trivially similar):\n  {near}\n")


STYLE = ("<style>body{font:14px sans-serif;max-width:60em;margin:auto}section{border-top:1px "
         "solid #ccc}.ctx{font-family:monospace;white-space:pre-wrap}.peak{outline:1px solid "
         "#c00}.bar{fill:#e67e22}</style>")


def histogram_svg(hist, width=300, height=60):
    """The activation histogram as inline SVG bars (0 .. the largest activation)."""
    counts = hist["counts"]
    most = max(counts + [1])
    w = width / len(counts)
    bars = "".join(f"<rect class=bar x='{i * w:.1f}' y='{height - height * c / most:.1f}' "
                   f"width='{w - 1:.1f}' height='{height * c / most:.1f}'/>"
                   for i, c in enumerate(counts))
    return (f"<svg width='{width}' height='{height + 14}'>{bars}<text x='0' y='{height + 12}' "
            f"font-size='10'>0</text><text x='{width}' y='{height + 12}' font-size='10' "
            f"text-anchor='end'>{hist['max']:.2f}</text></svg>")


def html_page(out, title):
    """One self-contained page (no network, no script): an index, then per feature its firing
    frequency, activation histogram, top contexts with each token shaded by its activation
    (`data-act` holds the value), and nearest decoder neighbours against the JL baseline."""
    e = html.escape
    shown = {f["feature"] for f in out["features"]}
    page = [f"<!doctype html><html><head><meta charset='utf-8'><title>{e(title)}</title>{STYLE}"
            f"</head><body><h1>{e(title)}</h1><p>{out['n_tokens']:,} held-out tokens; "
            f"JL baseline eps = sqrt(12 ln F / D) = {out['jl_eps']:.3f}</p><ul>"]
    page += [f"<li><a href='#feature-{f['feature']}'>feature {f['feature']}</a>: "
             f"{100 * f['frequency']:.3f}%</li>" for f in out["features"]]
    page.append("</ul>")
    for f in out["features"]:
        page.append(f"<section id='feature-{f['feature']}'><h2>feature {f['feature']}</h2><p>"
                    f"fires on {f['fired']:,} of {out['n_tokens']:,} tokens "
                    f"({100 * f['frequency']:.3f}%)</p>{histogram_svg(f['histogram'])}")
        top = max([c["activation"] for c in f["contexts"]] + [1e-9])
        for c in f["contexts"]:
            spans = "".join(
                f"<span data-act='{a}' title='{a}' style='background:rgba(230,126,34,"
                f"{max(0.0, min(a / top, 1.0)):.3f})'{' class=peak' if k == c['marked'] else ''}>"
                f"{e(t)}</span>" for k, (t, a) in enumerate(zip(c["tokens"], c["activations"])))
            page.append(f"<p class=ctx><b>{c['activation']:.3f}</b>  {spans}</p>")
        near = [(f"<a href='#feature-{n['feature']}'>{n['feature']}</a>" if n["feature"] in shown
                 else str(n["feature"])) + f" {n['cosine']:.3f}" + ("*" if n["above_jl"] else "")
                for n in f["neighbours"]]
        page.append(f"<p>nearest by decoder cosine (* above eps): {', '.join(near)}</p></section>")
    return "".join(page + ["</body></html>"])


def show(lm, tok, sae, config, feats, args):
    """Inspect and print features, and write the page to args.html; returns what --json writes.
    args: evaluate.py's flags (--tokens, --top, --html). sae in inference form
    (inference.load_sae): activations are raw magnitudes along unit decoder directions."""
    docs, n = feature_pass(lm, tok, sae, config, feats, args.tokens)
    out = inspect_features(docs, n, sae, feats, args.top, tok)
    print_features(out)
    if args.html:
        title = f"{place_name((config['layer'], config['site']))} features"
        with open(args.html, "w") as f:
            f.write(html_page(out, title))
        print(f"wrote {args.html}")
    return out
