"""The figures, as PNG files: Fig. 2 (TopK and Vanilla over L0), Fig. 4 (firing frequencies),
Fig. 5 (long context), Fig. 10 (a scope) and Fig. 12 (training curves).

matplotlib is imported when a figure is drawn, with its file-only backend (no display needed).
"""
import json

import torch

from recipe import RECENT_WINDOW

LABELS = {"topk": "TopK", "relu": "Vanilla", "jumprelu": "JumpReLU"}  # config["act_fn"] -> name


def _pyplot():
    import matplotlib  # here: only when a figure is asked for
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


def plot_training(runs, path, title):
    """Fig. 12: loss and the share of features that fired in the last RECENT_WINDOW rows (a log
    without it: that ever fired) against rows served, one line per run x SAE. runs: {label: a
    train.py --log-file}."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    firing = "fired"
    for label, log in runs.items():
        with open(log) as f:
            lines = [json.loads(line) for line in f]
        for name in sorted({k.rsplit("/", 1)[0] for k in lines[0] if "/" in k}):
            firing = "recent" if f"{name}/recent" in lines[0] else "fired"
            for ax, key in zip(axes, ("loss", firing)):
                ax.plot([x["tokens"] for x in lines], [x[f"{name}/{key}"] for x in lines],
                        label=f"{label} {name}" if len(runs) > 1 else name)
    axes[0].set(yscale="log", xlabel="rows served", ylabel="loss (normalized MSE)", title=title)
    shown = {"recent": f"share of features firing (last {RECENT_WINDOW:,} rows)",
             "fired": "share of features that ever fired"}[firing]
    axes[1].set(xlabel="rows served", ylabel=shown, ylim=(0, 1.02))
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_scope(results, configs, path, title):
    """The paper's Fig. 10 for a scope: L0, EV (eq. 6) and Delta LM loss over layers, one line
    per site, one column of panels per width. results, configs: {name: metrics / config}."""
    plt = _pyplot()
    widths = sorted({c["expansion_factor"] for c in configs.values()})
    rows = [("l0", "L0"), ("explained_variance", "EV"), ("delta_lm_loss", "Delta LM loss")]
    fig, axes = plt.subplots(len(rows), len(widths), figsize=(4.5 * len(widths), 8),
                             squeeze=False, sharex=True)
    lines = sorted({(c["site"], c["act_fn"]) for c in configs.values()},
                   key=lambda line: ("RAMTC".find(line[0]), line[1]))
    for col, width in enumerate(widths):
        for site, act in lines:  # a JumpReLU file beside its TopK one gets a line of its own
            names = sorted((c["layer"], n) for n, c in configs.items() if c["site"] == site
                           and c["act_fn"] == act and c["expansion_factor"] == width)
            for row, (key, label) in enumerate(rows):
                ax = axes[row][col]
                ax.plot([layer for layer, _ in names], [results[n][key] for _, n in names],
                        marker="o", ms=3, label=site if len(lines) == len(
                            {s for s, _ in lines}) else f"{site} {act}")
                ax.set(ylabel=label, title=f"{width:g}x" if row == 0 else None)
        axes[-1][col].set(xlabel="layer")
    axes[0][0].legend(title="site")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_sweep(results, configs, path, title):
    """The paper's Fig. 2: EV (eq. 6) and Delta LM loss over L0, one column of panels per layer;
    TopK SAEs as points, each width's Vanilla SAEs (an L1 sweep) as a line in L0 order.
    results, configs: {name: metrics / config}."""
    plt = _pyplot()
    layers = sorted({c["layer"] for c in configs.values()})
    fig, axes = plt.subplots(2, len(layers), figsize=(4 * len(layers), 6), squeeze=False)
    for col, layer in enumerate(layers):
        for act in sorted({c["act_fn"] for c in configs.values()}):
            for i, width in enumerate(sorted({c["expansion_factor"] for c in configs.values()})):
                names = sorted((results[n]["l0"], n) for n, c in configs.items()
                               if c["layer"] == layer and c["act_fn"] == act
                               and c["expansion_factor"] == width)
                if not names:
                    continue
                for row, key in enumerate(("explained_variance", "delta_lm_loss")):
                    axes[row][col].plot([l0 for l0, _ in names],
                                        [results[n][key] for _, n in names],
                                        marker="o" if len(names) > 1 else "*XD"[i % 3],
                                        ms=4 if len(names) > 1 else 10, alpha=0.8,
                                        label=f"{LABELS.get(act, act)} {width:g}x")
        axes[0][col].set(xscale="log", ylabel="EV", title=f"layer {layer}")
        axes[1][col].set(xscale="log", yscale="log", xlabel="L0", ylabel="Delta LM loss")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_graph(graph, path, title, max_edges=300):
    """An attribution graph (circuit-tracer's JSON, extras/graph_page.py) as a PNG: nodes by
    position (x) and layer (y; tokens at the bottom, logits at the top), the strongest
    max_edges edges blue (positive) or red (negative), width by weight."""
    plt = _pyplot()
    n_layers = max(int(n["layer"]) for n in graph["nodes"] if n["layer"] != "E") - 1  # logits L+1
    tokens = graph["metadata"]["prompt_tokens"]
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(tokens)), 7))
    where = {}
    for n in graph["nodes"]:
        level = -1 if n["layer"] == "E" else int(n["layer"])
        same = [m for m in graph["nodes"] if m["layer"] == n["layer"]
                and m["ctx_idx"] == n["ctx_idx"]]
        k = same.index(n)
        where[n["node_id"]] = (n["ctx_idx"] + 0.7 * (k - (len(same) - 1) / 2) / max(len(same), 2),
                               level)
    links = sorted(graph["links"], key=lambda link: -abs(link["weight"]))[:max_edges]
    top = max([abs(link["weight"]) for link in links] + [1e-9])
    for link in links:
        x1, y1 = where[link["source"]]
        x2, y2 = where[link["target"]]
        ax.plot([x1, x2], [y1, y2], color="#2b6cb0" if link["weight"] > 0 else "#c53030",
                lw=0.3 + 3 * abs(link["weight"]) / top, alpha=0.4, zorder=1)
    colours = {"cross layer transcoder": "#4a90d9", "mlp reconstruction error": "#999999",
               "embedding": "#66cc66", "logit": "#e67e22"}
    for n in graph["nodes"]:
        x, y = where[n["node_id"]]
        ax.scatter([x], [y], s=18, color=colours[n["feature_type"]], zorder=2)
    ax.set_xticks(range(len(tokens)))
    ax.set_xticklabels([t.replace("\n", "\\n") for t in tokens], rotation=60, fontsize=8)
    ax.set_yticks([-1, 0, n_layers - 1, n_layers + 1])
    ax.set_yticklabels(["tokens", "L0", f"L{n_layers - 1}", "logits"], fontsize=8)
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
