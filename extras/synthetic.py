"""Activations with an answer key: each row a sum of K of F known unit directions (planted.py's
ground truth, and the tests').

Real activations have no answer key, so EV alone cannot tell a good dictionary from one that
smears features together. Here each row is a sum of K of F unit directions (F = 16 D, drawn at
random, so they are in superposition) with exponential magnitudes, then scaled and offset as real
activations are (their mean is far from 0, their norm far from 1). `recovered` scores a trained
SAE against the directions.
Shapes: N rows, D model width, F directions, K per row.
"""
import os

import torch
from safetensors.torch import save_file

EXPANSION = 16  # planted directions (and SAE features) per model dimension
SCALE = 7.0  # real activations are neither unit-norm ...
OFFSET = 1.0  # ... nor centred: an offset of this x the mean signal norm


def directions(d, seed=0):
    """(F, D) unit directions, F = 16 D, and the offset (D,) every row carries."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.nn.functional.normalize(torch.randn(EXPANSION * d, d, generator=g), dim=1)
    offset = torch.nn.functional.normalize(torch.randn(d, generator=g), dim=0)
    return dirs, offset


def rows(dirs, offset, k, n, seed, chunk=65_536):
    """(n, D): SCALE * (sum of k random directions times Exp(1) magnitudes + offset)."""
    g = torch.Generator().manual_seed(seed)
    signal = (2 * k) ** 0.5  # E||sum of k Exp(1)-weighted unit vectors|| for near-orthogonal ones
    out = []
    for i in range(0, n, chunk):
        m = min(chunk, n - i)
        idx = torch.randint(len(dirs), (m, k), generator=g)  # (m, K); a repeat just adds up
        magnitude = -torch.rand(m, k, generator=g).log()  # (m, K) ~ Exp(1)
        planted = torch.einsum("mk,mkd->md", magnitude, dirs[idx])  # (m, D)
        out.append(SCALE * (planted + OFFSET * signal * offset))
    return torch.cat(out)


def recovered(sae, dirs, threshold=0.9):
    """Share of planted directions whose nearest decoder row has cosine > threshold."""
    cos = torch.nn.functional.normalize(sae.W_dec.detach().float(), dim=1) @ dirs.T  # (F, F')
    return (cos.max(dim=0).values > threshold).float().mean().item()


def make_data(d, k, tokens, folder):
    """(training file for --activations, 100K fresh held-out rows, directions) for one shape."""
    dirs, offset = directions(d)
    path = os.path.join(folder, f"train-{d}.safetensors")
    save_file({"activations": rows(dirs, offset, k, tokens, seed=1)}, path)
    return path, rows(dirs, offset, k, 100_000, seed=2), dirs
