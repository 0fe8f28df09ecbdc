"""Where a JumpReLU file's reconstruction error comes from, by each token's activation norm.

The per-token check behind Fig. 11's cause in docs/findings.md. On the first held-out batches it
runs the SAE both ways (JumpReLU with its one global theta, and TopK with the same weights) and
prints, per band of a token's norm over the median: how many tokens, how many features the
JumpReLU form fires on them, and what share of each form's squared error they carry; then EV
(centred) on the tokens under 2x, 5x and 8x the median norm.

    python docs/jumprelu_by_norm.py r4x/L3R-4x-k50-TopK-JumpReLU.safetensors [BATCHES]
"""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import data  # noqa: E402  (this project, importable here)
import inference  # noqa: E402
import model  # noqa: E402

BANDS = ((0, 2), (2, 5), (5, 8), (8, 10), (10, float("inf")))  # norm / median norm


@torch.no_grad()
def per_token(sae, config, lm, tok, n_batches):
    """{x, jumprelu error, topk error, jumprelu l0}, one row per scored held-out token."""
    place = (config["layer"], config["site"])
    parts = {"x": [], "jumprelu": [], "topk": [], "l0": []}
    batches = data.heldout_batches(tok, config["dataset_path"], config["context_size"], 8)
    for _, (ids, mask) in zip(range(n_batches), batches):
        x_in, _ = model.capture(lm, ids, mask, [place])[place]
        x = x_in[data.scored_positions(ids, mask, tok)]
        sae.act = "topk"
        parts["topk"].append(((sae(x)[0] - x) ** 2).sum(-1))
        sae.act = "jumprelu"
        x_hat, f = sae(x)  # f dense (N, F): h where h > theta
        parts["jumprelu"].append(((x_hat - x) ** 2).sum(-1))
        parts["l0"].append((f != 0).sum(-1).float())
        parts["x"].append(x)
    return {name: torch.cat(rows) for name, rows in parts.items()}


def main(path, n_batches=4):
    sae, config, _ = inference.load_sae(path, None, "cpu", "float32")
    lm, tok = model.load_model(config["model_name"], "cpu", torch.float32)
    rows = per_token(sae, config, lm, tok, int(n_batches))
    norms = rows["x"].norm(dim=-1)
    ratio = norms / norms.median()
    print(f"{path}: theta {sae.threshold:.4f}, {len(ratio):,} held-out tokens")
    print("  norm / median   tokens   JumpReLU L0 (mean, max)   error share: JumpReLU, TopK")
    for low, high in BANDS:
        band = (ratio >= low) & (ratio < high)
        if band.any():
            l0 = rows["l0"][band]
            shares = [rows[act][band].sum() / rows[act].sum() for act in ("jumprelu", "topk")]
            print(f"  {low:>4}-{high:<6} {int(band.sum()):>9,}   {l0.mean():>10.1f} "
                  f"{l0.max():>6.0f}   {shares[0]:>18.3f} {shares[1]:>6.3f}")
    for cut in (2, 5, 8):
        kept = ratio < cut
        x = rows["x"][kept]
        total = ((x - x.mean(0)) ** 2).sum()
        ev = [1 - rows[act][kept].sum() / total for act in ("jumprelu", "topk")]
        print(f"  tokens under {cut}x the median norm ({kept.float().mean():.1%}): centred EV "
              f"JumpReLU {ev[0]:.3f}, TopK {ev[1]:.3f}; JumpReLU L0 {rows['l0'][kept].mean():.1f}")


if __name__ == "__main__":
    main(*sys.argv[1:])
