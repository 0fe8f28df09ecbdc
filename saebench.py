"""SAEBench's "core" evaluation as its own results file: `evaluate.py CKPT --saebench-json FILE`.

The community compares SAEs with SAEBench (Karvonen et al.); its core eval writes a JSON that its
pydantic model `sae_bench.evals.core.eval_output.CoreEvalOutput` validates. This file computes the
same numbers with SAEBench's own formulas, on metrics.lm_metrics's pass over held-out documents
(the site zero-ablated for the ablation baselines, special tokens excluded), and writes that JSON.
Where SAEBench's formula is not the textbook one, we follow SAEBench (noted inline), so numbers
compare; our own JSON keeps the paper's eq. 6 under `explained_variance`.
Shapes: N rows, D model width, F features, V vocabulary.
"""
import json
import math
import time
import uuid

import torch
import torch.nn.functional as F

from sae import firing_counts

PRODUCER = "llama-scope evaluate.py --saebench-json (SAEBench core formulas; not sae_bench code)"


def kl_sum(lp_clean, logits):
    """Summed KL(clean || patched) of next-token distributions over the rows of lp_clean (N, V)
    (clean log-probabilities) and the patched logits (N, V)."""
    return (lp_clean.exp() * (lp_clean - F.log_softmax(logits.float(), -1))).sum().item()


class Core:
    """Running sums of SAEBench's core metrics over evaluated batches, in the raw space: x the
    target activation (N, D), x_hat the reconstruction, f the feature activations."""

    def __init__(self, n_features):
        self.n, self.batches, self.sums = 0, 0, dict.fromkeys(
            ["mse", "cossim", "l2_in", "l2_out", "l2_ratio", "ev_legacy", "l0", "l1", "rrb",
             "sq", "sse"], 0.0)
        self.sq_per_dim = 0.0  # sum over batches of mean_t x^2, averaged over D (for EV)
        self.fired = torch.zeros(n_features, dtype=torch.float64)  # activations > 0, per feature
        self.pairs = set()  # (sequence, feature) pairs with a firing: "prompts" per feature

    @torch.no_grad()
    def add(self, x, x_hat, f, seq):
        """One batch: x, x_hat (N, D); f (values, indices) or dense (N, F); seq (N,) ids."""
        x, x_hat = x.double(), x_hat.double()
        sse = (x - x_hat).pow(2).sum(-1)  # (N,)
        nx, nh = x.norm(dim=-1), x_hat.norm(dim=-1)
        s = self.sums
        s["mse"] += (sse / len(x)).sum().item()  # SAEBench: / tokens in the batch, not / D
        s["cossim"] += ((x * x_hat).sum(-1) / (nx * nh)).sum().item()
        s["l2_in"] += nx.sum().item()
        s["l2_out"] += nh.sum().item()
        s["l2_ratio"] += (nh / torch.where(nx < 1e-4, torch.ones_like(nx), nx)).sum().item()
        s["rrb"] += (nh.pow(2).mean() / (x * x_hat).sum(-1).mean()).item()  # per batch
        s["ev_legacy"] += (1 - sse / (x - x.mean(0)).pow(2).sum(-1)).sum().item()
        s["sq"] += nx.pow(2).mean().item()  # SAEBench's EV: batch means of ||x||^2 ...
        self.sq_per_dim += x.pow(2).mean().item()  # ... and of x^2 per element (as written)
        s["sse"] += sse.mean().item()
        vals, idx = f if isinstance(f, tuple) else (f, None)
        s["l0"] += (vals != 0).sum().item()
        s["l1"] += vals.sum().item()  # SAEBench: no abs
        self.fired += firing_counts(f, len(self.fired)).double().cpu()
        rows, feats = (vals > 0).nonzero(as_tuple=True)
        feats = feats if idx is None else idx[rows, feats]
        self.pairs.update(zip(seq[rows].tolist(), feats.tolist()))
        self.n += len(x)
        self.batches += 1

    def metrics(self):
        s, n, b = self.sums, self.n, self.batches
        # SAEBench's batched EV: mean ||x||^2 minus the square of the mean x^2 per element
        total_variance = s["sq"] / b - (self.sq_per_dim / b) ** 2
        density = self.fired / n
        return {"reconstruction_quality": {
                    "explained_variance": 1 - (s["sse"] / b) / total_variance,
                    "explained_variance_legacy": s["ev_legacy"] / n, "mse": s["mse"] / n,
                    "cossim": s["cossim"] / n},
                "shrinkage": {"l2_norm_in": s["l2_in"] / n, "l2_norm_out": s["l2_out"] / n,
                              "l2_ratio": s["l2_ratio"] / n,
                              "relative_reconstruction_bias": s["rrb"] / b},
                "sparsity": {"l0": s["l0"] / n, "l1": s["l1"] / n}}, density


def max_cosine(W, chunk=4096):
    """(F,) each row's largest cosine with another row of W (F, D)."""
    W = F.normalize(W.double(), dim=1)
    out = []
    for i in range(0, len(W), chunk):
        cos = W[i:i + chunk] @ W.T  # (chunk, F)
        cos[torch.arange(len(cos)), torch.arange(i, i + len(cos))] = -math.inf
        out.append(cos.max(1).values)
    return torch.cat(out)


def write(path, core, out, sae, config, dtype, dataset, details=False):
    """SAEBench's core results file for one evaluate.py pass: out is metrics.lm_metrics's dict,
    sae in inference form (inference.load_sae), so l1 and the per-feature values are those of
    the folded features, as in its SAELens export."""
    eval_config = dict(
        model_name=config["model_name"], llm_dtype=dtype,
        batch_size_prompts=8, n_eval_reconstruction_batches=core.batches,
        n_eval_sparsity_variance_batches=core.batches, dataset=dataset,
        context_size=config["context_size"], compute_kl=True, compute_ce_loss=True,
        compute_l2_norms=True, compute_sparsity_metrics=True, compute_variance_metrics=True,
        compute_featurewise_density_statistics=True,
        compute_featurewise_weight_based_metrics=True,
        exclude_special_tokens_from_reconstruction=True, verbose=False)
    result = output(
        core, {"clean": out["ce_loss"], "sae": out["ce_loss_with_sae"],
               "ablated": out["ce_loss_ablated"]},
        {"sae": out["kl_div_with_sae"], "ablated": out["kl_div_ablated"]}, sae,
        dict(config, folded=True), eval_config, details)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)


def output(core, ce, kl, sae, config, eval_config, details=False):
    """The CoreEvalOutput JSON (a dict). ce: {"clean", "sae", "ablated"} mean CE; kl: {"sae",
    "ablated"} mean KL; sae in raw space (weight metrics use its own weights)."""
    metrics, density = core.metrics()
    enc_max, dec_max = max_cosine(sae.W_enc.detach()), max_cosine(sae.W_dec.detach())
    over = {p: density > p / 100 for p in (1, 10)}
    total = density.sum().item()
    metrics.update(
        model_behavior_preservation={"kl_div_score": (kl["ablated"] - kl["sae"]) / kl["ablated"],
                                     "kl_div_with_ablation": kl["ablated"],
                                     "kl_div_with_sae": kl["sae"]},
        model_performance_preservation={
            "ce_loss_score": (ce["ablated"] - ce["sae"]) / (ce["ablated"] - ce["clean"]),
            "ce_loss_with_ablation": ce["ablated"], "ce_loss_with_sae": ce["sae"],
            "ce_loss_without_sae": ce["clean"]},
        token_stats={"total_tokens_eval_reconstruction": core.n,
                     "total_tokens_eval_sparsity_variance": core.n},
        misc_metrics={**{f"freq_over_{p}_percent": o.double().mean().item()
                         for p, o in over.items()},
                      **{f"normalized_freq_over_{p}_percent":
                         density[o].sum().item() / total if total else 0.0
                         for p, o in over.items()},
                      "average_max_encoder_cosine_sim": enc_max.mean().item(),
                      "average_max_decoder_cosine_sim": dec_max.mean().item(),
                      "frac_alive": (density > 0).double().mean().item()})
    out = {"eval_type_id": "core", "eval_config": eval_config, "eval_id": str(uuid.uuid4()),
           "datetime_epoch_millis": int(time.time() * 1000), "eval_result_metrics": metrics,
           "eval_result_details": feature_details(core, sae, density, enc_max, dec_max)
           if details else [], "eval_result_unstructured": None,
           "sae_bench_commit_hash": PRODUCER, "sae_lens_id": None, "sae_lens_release_id": None,
           "sae_lens_version": None, "sae_cfg_dict": config}
    return no_nan(out)


def feature_details(core, sae, density, enc_max, dec_max):
    """Per feature, as SAEBench's eval_result_details."""
    prompts = torch.bincount(torch.tensor([f for _, f in core.pairs], dtype=torch.long),
                             minlength=sae.n_features).double()
    W_enc, W_dec = sae.W_enc.detach().double(), sae.W_dec.detach().double()  # (F, D) each
    cos = F.cosine_similarity(W_enc, W_dec, dim=1)
    return [{"index": i, "feature_density": density[i].item(),
             "consistent_activation_heuristic": (core.fired[i] / prompts[i]).item(),
             "encoder_bias": sae.b_enc[i].item(), "encoder_norm": W_enc[i].norm().item(),
             "encoder_decoder_cosine_sim": cos[i].item(),
             "max_decoder_cosine_sim": dec_max[i].item(),
             "max_encoder_cosine_sim": enc_max[i].item()} for i in range(sae.n_features)]


def no_nan(x):
    """SAEBench writes -1 for every NaN (e.g. a never-firing feature's heuristic)."""
    if isinstance(x, dict):
        return {k: no_nan(v) for k, v in x.items()}
    if isinstance(x, list):
        return [no_nan(v) for v in x]
    return -1 if isinstance(x, float) and math.isnan(x) else x
