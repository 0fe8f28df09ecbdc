"""Ground truth for the training recipe: can it find features we planted ourselves?

    python planted.py                       # every shape, one process, then torchrun --tp 2
    python planted.py --shapes 64:8 --tp 1  # D=64, K=8 only, one process

Real activations have no answer key, so EV alone cannot tell a good dictionary from one that
smears features together. Here the answer is known (extras/synthetic.py): each row is a sum of K
of F = 16 D random unit directions in superposition, scaled and offset as real activations are.
An SAE with the same F, trained by train.py with its defaults (flags: only the width, K and the
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

import metrics
from extras import flags, synthetic
from formats import load_checkpoint

HERE = os.path.dirname(os.path.abspath(__file__))


def train_flags(path, k, tokens, folder):
    """train.py's defaults but for the data, the width, K and the budget."""
    return ["--activations", path, "--expansion", str(synthetic.EXPANSION), "--k", str(k),
            "--total-tokens", str(tokens), "--out", folder, "--seed", "0"]


def score(checkpoint, held, dirs):
    """(recovered, EV, never-fired share) of a trained checkpoint on held-out planted rows."""
    sae, _ = load_checkpoint(checkpoint)
    m = metrics.reconstruction_metrics(sae, held)
    return synthetic.recovered(sae, dirs), m["explained_variance"], m["dead_frac"]


def train_and_score(d, k, tokens, tp, folder):
    """Train on planted rows with train.py's defaults (a process, or tp under torchrun);
    (recovered, EV, never-fired share, the budget rule it printed)."""
    path, held, dirs = synthetic.make_data(d, k, tokens, folder)
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
                chosen = rule.partition(": ")[2].split(" (")[0]
                print(f"{d:>4} {synthetic.EXPANSION * d:>5} {k:>3} {tp:>3} {rec:>10.3f} "
                      f"{ev:>7.3f} {100 * dead:>11.1f}%   {chosen}", flush=True)


if __name__ == "__main__":
    main()
