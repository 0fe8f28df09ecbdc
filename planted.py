"""Ground truth for the training recipe: can it find features we planted ourselves?

    python planted.py                       # every shape, one process, then torchrun --tp 2
    python planted.py --shapes 64:8 --tp 1  # D=64, K=8 only, one process

Real activations have no answer key, so EV alone cannot tell a good dictionary from one that
smears features together. Here the answer is known: each row is a sum of K of F unit directions
(F = 16 D, drawn at random, so they are in superposition) with exponential magnitudes, then
scaled and offset as real activations are (their mean is far from 0, their norm far from 1). An
SAE with the same F, trained by train.py with its defaults (flags: only the width, K and the
budget), should recover them: we print the share of planted directions whose best-matching
decoder row has cosine > 0.9, with EV and the never-fired share on fresh rows. No tuning per shape.
This is a benchmark that prints numbers (docs/quality.md), not a test; test_all.py runs a small
case.
"""
import argparse
import os
import subprocess
import sys
import tempfile

import torch
from safetensors.torch import save_file

import flags
import metrics
from formats import load_checkpoint

HERE = os.path.dirname(os.path.abspath(__file__))
EXPANSION = 16  # planted directions (and SAE features) per model dimension
SCALE = 7.0  # real activations are neither unit-norm ...
OFFSET = 1.0  # ... nor centred: an offset of this x the mean signal norm


def directions(d, seed=0):
    """(F, D) unit directions, F = 16 D, and the offset (D,) every row carries."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.nn.functional.normalize(torch.randn(EXPANSION * d, d, generator=g), dim=1)
    return dirs, torch.nn.functional.normalize(torch.randn(d, generator=g), dim=0)


def rows(dirs, offset, k, n, seed, chunk=65_536):
    """(n, D): SCALE * (sum of k random directions times Exp(1) magnitudes + offset)."""
    g = torch.Generator().manual_seed(seed)
    signal = (2 * k) ** 0.5  # E||sum of k Exp(1)-weighted unit vectors|| for near-orthogonal ones
    out = []
    for i in range(0, n, chunk):
        m = min(chunk, n - i)
        idx = torch.randint(len(dirs), (m, k), generator=g)  # (m, K); a repeat just adds up
        mag = -torch.rand(m, k, generator=g).log()  # (m, K) ~ Exp(1)
        out.append(SCALE * (torch.einsum("mk,mkd->md", mag, dirs[idx]) + OFFSET * signal * offset))
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


def train_flags(path, k, tokens, folder):
    """train.py's defaults but for the data, the width, K and the budget."""
    return ["--activations", path, "--expansion", str(EXPANSION), "--k", str(k),
            "--total-tokens", str(tokens), "--out", folder, "--seed", "0"]


def score(checkpoint, held, dirs):
    """(recovered, EV, never-fired share) of a trained checkpoint on held-out planted rows."""
    sae, _ = load_checkpoint(checkpoint)
    m = metrics.reconstruction_metrics(sae, held)
    return recovered(sae, dirs), m["explained_variance"], m["dead_frac"]


def train_and_score(d, k, tokens, tp, folder):
    """Train on planted rows with train.py's defaults (a process, or tp under torchrun);
    (recovered, EV, never-fired share, the budget rule it printed)."""
    path, held, dirs = make_data(d, k, tokens, folder)
    cmd = [sys.executable, os.path.join(HERE, "train.py")]
    if tp > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(tp)]
        cmd += [os.path.join(HERE, "train.py"), "--tp", str(tp)]
    threads = os.environ.get("OMP_NUM_THREADS", str(max(1, os.cpu_count() // tp)))
    p = subprocess.run(cmd + train_flags(path, k, tokens, folder), capture_output=True,
                       text=True, env=dict(os.environ, OMP_NUM_THREADS=threads))
    if p.returncode != 0:
        sys.exit(f"train.py failed:\n{p.stderr[-2000:]}")
    rule = next((line for line in p.stdout.splitlines() if line.startswith("budget")), "")
    return (*score(p.stdout.strip().splitlines()[-1].removeprefix("saved "), held, dirs), rule)


def main(argv=None):
    p = argparse.ArgumentParser(description="planted-feature recovery of train.py's defaults")
    p.add_argument("--shapes", default="64:8,96:10,128:12", help="D:K pairs, comma separated")
    p.add_argument("--tokens", type=int, default=1_000_000, help="training rows per run")
    p.add_argument("--tp", type=flags.csv(int), default=[1, 2],
                   help="tensor-parallel sizes to run (2 = torchrun)")
    try:
        args = flags.parse(p, argv, {"tokens": "[1, inf)", "tp": "[1, inf)"})
    except ValueError as e:  # one line, exit code 2
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    print(f"{'D':>4} {'F':>5} {'K':>3} {'tp':>3} {'recovered':>10} {'EV':>7} {'never fired':>12}")
    with tempfile.TemporaryDirectory() as folder:
        for shape in args.shapes.split(","):
            d, k = (int(v) for v in shape.split(":"))
            for tp in args.tp:
                rec, ev, dead, rule = train_and_score(d, k, args.tokens, tp, folder)
                print(f"{d:>4} {EXPANSION * d:>5} {k:>3} {tp:>3} {rec:>10.3f} {ev:>7.3f} "
                      f"{100 * dead:>11.1f}%   {rule.partition(': ')[2].split(' (')[0]}",
                      flush=True)


if __name__ == "__main__":
    main()
