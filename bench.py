"""Benchmark the two costs of SAE training, in one process: the SAE step and the LM forward.

    python bench.py [--json bench.json]       # defaults run in about 5 minutes on 2 CPU cores

- `sae_step_ms`: forward + backward + Adam of one TopK step; `encoder_matmul_ms`: the one dense
  product x W_enc^T that any SAE step must do (the floor); `step_over_floor` = their ratio. The
  same for the dense reference (`SAE.forward_dense`), for the record. Also at Llama-3.1-8B 8x
  shapes, fewer rows. Weights and Adam are float32, the matmuls run in --dtype (as train.py);
  under bfloat16 `pure_step_ms` times the step with bf16 weights as well, for comparison.
- `lm_tok_s`: tokens/s of the early-stopped LM forward for several layers and the full depth.
- `multi_sae`: seconds per token of training S SAEs at one layer from one LM forward, S = 1 and 4.
- `peak_rss_mb`: peak memory of a short run with the default flags.
- `tp_step_ms`: the same SAE step sharded over --tp processes (parallel.py; gloo on CPU, NCCL on
  GPU) against one process. On one CPU the ranks share the cores: a correctness check of the
  plumbing, not a speed claim.
- `--attribution DIR` (instead of the above): attribute.py's work on a folder of transcoders, a
  16-token prompt, up to --attribution-nodes features: seconds per phase and peak memory.
"""
import argparse
import dataclasses
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time

import torch
import torch.multiprocessing as mp

import data
import model
import parallel
from extras import attribution, flags, influence, plan, replacement
from sae import SAE

SMALL = (576, 4608, 50)  # D, F, K of SmolLM2's 8x SAE
LLAMA_8B = (4096, 32768, 50)  # ... and of Llama-3.1-8B's


@dataclasses.dataclass
class Step:
    """One SAE training step to time: its shape, rows per step, and how it runs."""
    d_model: int
    n_features: int
    k: int
    rows: int
    repeat: int  # timed calls (the median is kept)
    dtype: torch.dtype = torch.float32  # the matmuls' and the rows'
    device: str = "cpu"


def timed(fn, repeat):
    """Median ms of `repeat` calls after a warm-up: robust to a shared, noisy machine."""
    fn()
    ms = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        ms.append((time.perf_counter() - t) * 1e3)
    return sorted(ms)[len(ms) // 2]


def no_reduction(sae):
    """One process: the gradients are whole already."""


def train_step(forward, sae, opt, x, reduce_grads_=no_reduction):
    """One training step to time: forward, MSE, backward, gradient reduction (parallel.py),
    Adam."""
    def run():
        x_hat, _ = forward(x)
        opt.zero_grad(set_to_none=True)
        (x_hat - x).pow(2).mean().backward()
        reduce_grads_(sae)
        opt.step()
        sync(x.device)
    return run


def new_sae(step):
    """The SAE to time, its norms set (scales 1), seeded."""
    torch.manual_seed(0)
    sae = SAE(step.d_model, step.n_features, k=step.k)
    sae.set_norms_(torch.ones(1, step.d_model), torch.ones(1, step.d_model))
    return sae


def sae_step(step):
    """ms of one TopK training step (sparse and dense) and of the encoder matmul alone, as
    train.py runs it: float32 weights and Adam, the matmuls (and the rows) in step.dtype. Under
    a dtype other than float32, also the step with the weights themselves in that dtype
    (`pure_step_ms`: what the speed of fp32 master weights costs; docs/precision.md)."""
    sae = new_sae(step).to(step.device)
    sae.compute_dtype = step.dtype
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4, fused=True)  # as train.py
    x = torch.randn(step.rows, step.d_model, device=step.device, dtype=step.dtype)
    W = sae.W_enc.detach().to(step.dtype)
    b = sae.b_enc.detach().to(step.dtype)

    def encoder_matmul():
        torch.addmm(b, x, W.T)
        sync(x.device)
    matmul = timed(encoder_matmul, step.repeat)
    sparse = timed(train_step(sae.forward, sae, opt, x), step.repeat)
    dense = timed(train_step(sae.forward_dense, sae, opt, x), max(1, step.repeat // 2))
    out = {"d_model": step.d_model, "n_features": step.n_features, "k": step.k,
           "rows": step.rows, "encoder_matmul_ms": matmul, "sae_step_ms": sparse,
           "step_over_floor": sparse / matmul, "dense_step_ms": dense,
           "dense_step_over_floor": dense / matmul}
    if step.dtype != torch.float32:
        sae.to(step.dtype).compute_dtype = None
        opt = torch.optim.Adam(sae.parameters(), lr=1e-4, fused=True)
        out["pure_step_ms"] = timed(train_step(sae.forward, sae, opt, x), step.repeat)
    return out


def tp_worker(rank, tp, port, step, result):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(tp), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, torch.get_num_threads() // tp))  # ranks share one machine's CPU
    comms = parallel.Comms(tp, step.device)
    sae = comms.shard(new_sae(step)).to(comms.device)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4, fused=True)
    x = torch.randn(step.rows, step.d_model, device=comms.device)
    ms = timed(train_step(sae.forward, sae, opt, x, comms.reduce_grads_), step.repeat)
    if rank == 0:
        with open(result, "w") as out:
            json.dump(ms, out)
    comms.close()


def tp_step(tp, step):
    """ms of one TopK step with the SAE sharded over tp processes (spawned here)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = os.path.join(tempfile.mkdtemp(), "ms.json")
    mp.spawn(tp_worker, args=(tp, port, step, result), nprocs=tp)
    with open(result) as r:
        return json.load(r)


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def lm_speed(layers, tokens, lm_batch_size, device, dtype):
    """tokens/s of the early-stopped forward on embedded text, per deepest layer."""
    lm, tok = model.load_model(device=device, dtype=dtype)
    docs = list(data.iter_documents(split="train", epochs=1))[:2000]
    batches = list(data.token_batches(tok, docs, 1024, lm_batch_size))
    out = {}
    for layer in layers:
        n = 0
        t = time.perf_counter()
        for ids, mask in batches:
            model.capture(lm, ids.to(device), mask.to(device), [(layer, "R")])
            n += int(mask.sum())
            if n >= tokens:
                break
        sync(device)
        out[layer] = n / (time.perf_counter() - t)
    return out, lm.config.num_hidden_layers


def multi_sae(counts, tokens, device):
    """Seconds per token of a short train.py run of S 8x SAEs at layer 15 (sites R, A, M, TC in
    turn), all fed by one LM pass per batch of documents (model load included in each)."""
    out = {}
    for s in counts:
        cmd = [sys.executable, "train.py", "--site", ",".join(["R", "A", "M", "TC"][:s]),
               "--total-tokens", str(tokens), "--buffer-size", "8192", "--eval-tokens", "0",
               "--out", "/tmp/bench_out", "--device", str(device)]
        t = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True, cwd=os.path.dirname(__file__) or ".")
        out[s] = (time.perf_counter() - t) / tokens
    return out


RANGES = {"rows": "[1, inf)", "big_rows": "[0, inf)", "repeat": "[1, inf)",
          "lm_tokens": "[0, inf)", "multi_tokens": "[0, inf)", "tp": "0 or [2, inf)",
          "attribution_nodes": "[1, inf)"}
PROMPT = "When Mary and John went to the store yesterday, John gave a drink to"  # 16 with BOS


def attribution_bench(folder, max_nodes):
    """Seconds of each phase of an attribution graph (attribute.py's work) on a 16-token prompt
    and the process's peak memory."""
    transcoders, config, placed = replacement.load_transcoders(folder, "cpu", "float32")
    t = {"start": time.perf_counter()}
    lm, tok = model.load_model(config["model_name"], "cpu", torch.float32)
    tokens = torch.tensor(data.encode_documents(tok, [PROMPT])[0])
    saes = {layer: sae for layer, (sae, _) in transcoders.items()}
    t["load"] = time.perf_counter()
    s = attribution.setup(lm, saes, tokens)
    t["setup (clean forward, features, errors)"] = time.perf_counter()
    graph = attribution.attribute(lm, s, max_nodes)
    t["attribution (backward passes, edges)"] = time.perf_counter()
    influence.scores(graph)
    influence.prune(graph)
    t["scores and pruning"] = time.perf_counter()
    names = list(t)
    phases = {b: t[b] - t[a] for a, b in zip(names, names[1:])}
    n_rows = graph.n_features() + len(graph.targets)
    batches = -(-n_rows // attribution.BATCH)
    out = {"tokens": len(tokens), "active_features": len(s.features),
           "feature_nodes": graph.n_features(), "backward_batches": batches,
           "seconds": phases, "total_s": t[names[-1]] - t["start"],
           "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    print(f"attribution of a {len(tokens)}-token prompt through {len(saes)} transcoders: "
          f"{len(s.features):,} active features, {graph.n_features():,} as nodes, "
          f"{out['backward_batches']} backward batches of {attribution.BATCH}")
    for phase, seconds in phases.items():
        print(f"  {phase:<40} {seconds:7.1f} s")
    print(f"  {'in all':<40} {out['total_s']:7.1f} s; peak memory {out['peak_rss_gib']:.2f} GiB")
    return out


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=4096, help="rows per SAE step (small shapes)")
    p.add_argument("--big-rows", type=int, default=512,
                   help="rows per step at 8B shapes; 0 = skip")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--lm-tokens", type=int, default=6000,
                   help="tokens per LM speed point; 0 = skip")
    p.add_argument("--multi-tokens", type=int, default=16384,
                   help="tokens per multi-SAE run; 0 = skip")
    p.add_argument("--tp", type=int, default=2,
                   help="also time the step sharded over this many processes; 0 = skip")
    p.add_argument("--device", default=model.default_device())
    p.add_argument("--dtype", default=None, help="the matmuls' and the rows' precision "
                   "(default: bfloat16 on GPU, float32 on CPU, as train.py); weights float32")
    p.add_argument("--json", default=None)
    p.add_argument("--attribution", default=None, metavar="DIR",
                   help="instead: time an attribution graph through DIR's transcoders")
    p.add_argument("--attribution-nodes", type=int, default=2000,
                   help="--attribution: feature nodes at most")
    return flags.parse(p, argv, RANGES)


def print_sae_steps(res, dtype):
    for key in ("sae_small", "sae_llama8b_8x"):
        if key in res:
            r = res[key]
            pure = ""
            if "pure_step_ms" in r:
                pure = f" | weights in {str(dtype)[6:]} too (pure): {r['pure_step_ms']:.1f} ms"
            print(f"SAE step D={r['d_model']} F={r['n_features']} K={r['k']} rows={r['rows']}: "
                  f"step {r['sae_step_ms']:.1f} ms | encoder matmul "
                  f"{r['encoder_matmul_ms']:.1f} ms | step_over_floor "
                  f"{r['step_over_floor']:.2f} | "
                  f"dense reference {r['dense_step_over_floor']:.2f}{pure}")


def print_costs(res, cfg):
    """What a row costs here in plan.py's units (ms per million weights a row goes through),
    beside the constants plan.py plans with."""
    r = res["sae_small"]
    block, _ = plan.lm_weights(cfg)
    sae = r["sae_step_ms"] / r["rows"] / (r["d_model"] * r["n_features"] / 1e6)
    lm = 1e3 / res["lm_tok_s"]["15"] / (16 * block / 1e6)
    res["costs_ms_per_mweight"] = {"lm": lm, "sae": sae}
    print(f"costs per million weights: LM {lm:.4f} ms per token (plan.py: "
          f"{plan.LM_MS_PER_MWEIGHT:.4f}), SAE step {sae:.4f} ms per row (plan.py: "
          f"{plan.SAE_MS_PER_MWEIGHT:.4f}); an LM row to layer 15 costs "
          f"{lm * 16 * block / (sae * 4608 * 576):.1f}x an 8x SAE's step on it")


def main(argv=None):
    try:
        args = get_args(argv)
    except ValueError as e:  # one line, exit code 2
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    if args.attribution:
        res = attribution_bench(args.attribution, args.attribution_nodes)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(res, f, indent=2)
        return
    dtype = getattr(torch, args.dtype or model.default_dtype(args.device))
    res = {"device": args.device, "dtype": str(dtype), "threads": torch.get_num_threads()}
    if args.multi_tokens:  # first: Linux counts a child's peak as at least this process's size
        cmd = [sys.executable, "train.py", "--total-tokens", "70000", "--eval-tokens", "0",
               "--out", "/tmp/bench_out", "--device", str(args.device)]
        subprocess.run(cmd, check=True, capture_output=True, cwd=os.path.dirname(__file__) or ".")
        res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    small = Step(*SMALL, args.rows, args.repeat, dtype, args.device)
    res["sae_small"] = sae_step(small)
    if args.big_rows:
        res["sae_llama8b_8x"] = sae_step(Step(*LLAMA_8B, args.big_rows, 2, dtype, args.device))
    print_sae_steps(res, dtype)
    if args.tp:
        r = res["sae_small"]
        ms = tp_step(args.tp, dataclasses.replace(small, dtype=torch.float32))
        res["tp_step_ms"] = {"1": r["sae_step_ms"], str(args.tp): ms}
        print(f"SAE step sharded over tp={args.tp} processes: {ms:.1f} ms (tp=1: "
              f"{r['sae_step_ms']:.1f} ms)")
    if args.lm_tokens:
        speeds, n_layers = lm_speed([7, 15, 23, 29], args.lm_tokens, 32, args.device, dtype)
        full = speeds[n_layers - 1]
        res["lm_tok_s"] = {str(k): v for k, v in speeds.items()}
        for layer, v in speeds.items():
            target = 0.9 * n_layers / (layer + 1) * full
            print(f"LM to layer {layer:>2}: {v:8.0f} tok/s | target >= {target:.0f} "
                  f"(0.9 x {n_layers}/{layer + 1} x full depth)")
        print_costs(res, model.load_config())
    if args.multi_tokens:
        per_tok = multi_sae([1, 4], args.multi_tokens, args.device)
        res["multi_sae_s_per_token"] = {str(k): v for k, v in per_tok.items()}
        res["multi_sae_4_over_1"] = per_tok[4] / per_tok[1]
        print(f"S SAEs from one forward: S=1 {per_tok[1] * 1e3:.2f} ms/token, S=4 "
              f"{per_tok[4] * 1e3:.2f} ms/token, ratio {res['multi_sae_4_over_1']:.2f}")
        print(f"peak memory of a default run (70K tokens): {res['peak_rss_mb']:.0f} MB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
