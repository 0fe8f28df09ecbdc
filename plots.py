"""The figures, as PNG files: Fig. 4 (firing frequencies) and Fig. 5 (long context).

matplotlib is imported when a figure is drawn, with its file-only backend (no display needed).
"""
import torch


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
