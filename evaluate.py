"""Evaluate an SAE checkpoint the way §4 of the paper does.

Held-out documents only (model.py holds out every 10th document of any dataset).
"""
import torch


@torch.no_grad()
def reconstruction_metrics(sae, rows, chunk=4096):
    """L0, EV (eq. 6: 1 - sum ||x - x_hat||^2 / sum ||x||^2 over all tokens), the variance-based EV,
    MSE in the SAE's normalized space, and firing frequencies, from raw rows (N, D) or (N, 2D)."""
    d = sae.d_model
    s_in, s_out = sae.scales()
    err = sq = l0 = 0.0
    n, sum_y = 0, torch.zeros(d, dtype=torch.float64)
    counts = torch.zeros(sae.n_features, dtype=torch.float64)
    for rows_c in rows.split(chunk):
        x = rows_c[:, :d].to(sae.W_enc.dtype) * s_in
        y = rows_c[:, -d:].to(sae.W_enc.dtype) * s_out
        x_hat, f = sae(x)
        active = torch.zeros(len(x), sae.n_features, device=x.device).scatter_(
            1, f[1], (f[0] > 0).float()) if isinstance(f, tuple) else (f > 0).float()
        err += (x_hat - y).double().pow(2).sum().item()
        sq += y.double().pow(2).sum().item()
        sum_y += y.double().sum(0).cpu()
        counts += active.double().sum(0).cpu()
        n += len(x)
    freq = counts / n
    return {"n_tokens": n, "l0": freq.sum().item(), "mse": err / (n * d),
            "explained_variance": 1 - err / sq,
            "explained_variance_centered": 1 - err / (sq - sum_y.pow(2).sum().item() / n),
            "dead_frac": (freq == 0).double().mean().item(),
            "ultra_active_frac": (freq > 0.1).double().mean().item()}
