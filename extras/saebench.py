"""SAEBench's "core" evaluation, run SAEBench's way: `evaluate.py CKPT --saebench-json FILE`.

The community compares SAEs with SAEBench (Karvonen et al.); its core eval writes a JSON that its
pydantic model `sae_bench.evals.core.eval_output.CoreEvalOutput` validates. This file follows its
protocol (sae_bench 0.6.0, evals/core/main.py, with CoreEvalConfig's defaults) on our LM:
- held-out documents packed as SAELens's ActivationsStore packs them: contexts of 128 tokens,
  each led by BOS, documents joined by BOS, a long one running on into the next context;
- batches of 16 contexts; BOS, EOS and PAD ignored (SAEBench's ignore_tokens), no other rule
  (our evaluation's outlier norm limit does not apply here);
- per batch the LM runs clean, with the SAE's reconstruction in place of the site at every
  non-ignored position, and with the site zeroed at EVERY position (its ablation baseline);
  KL over every position, CE over every prediction, both at non-ignored inputs;
- the sparsity and variance metrics over the clean activations of the NEXT batches (as sae_bench
  with SAELens 6 does: see `evaluate`), `mse` per batch of kept rows, a "prompt" is a context
  (the consistent-activation heuristic); at the split's end it is read again from the start.
Where SAEBench's formula is not the textbook one we follow SAEBench (noted inline). What still
differs from running sae_bench itself is listed in DIFFERENCES and written into the file's
eval_config. Our own evaluation (metrics.py: padded documents, §4 of the paper) is separate.
Shapes: N rows, D model width, F features, V vocabulary, B contexts, T tokens.
"""
import dataclasses
import itertools
import json
import math
import time
import uuid

import torch
import torch.nn.functional as F

import data
import model
from metrics import firing_counts, raw_forward

PRODUCER = "llama-scope evaluate.py --saebench-json (SAEBench core protocol; not sae_bench code)"
CONTEXT = 128  # CoreEvalConfig's context_size ...
PROMPTS = 16  # ... and batch_size_prompts
DIFFERENCES = (
    "documents: the held-out split of `dataset` in data.py's seeded order, not "
    "dataset.shuffle(seed=42); the LM: transformers' Llama, not TransformerLens's "
    "HookedTransformer (docs/saebench.md compares the two); "
    "a transcoder (TC) reads the MLP input and replaces the MLP output")


def packed_contexts(docs, bos, context=CONTEXT):
    """SAELens's packing (concat_and_batch_sequences with BOS leading every context and between
    documents): token id lists of `context` tokens from docs, lists of ids without BOS; the
    last, partial context is dropped."""
    ctx = []
    for ids in docs:
        if not ids:
            continue
        if ctx:
            ctx.append(bos)  # the separator; it may be a context's last token
            if len(ctx) == context:
                yield ctx
                ctx = []
        pos = 0
        while pos < len(ids):
            ctx = ctx or [bos]
            take = context - len(ctx)
            ctx += ids[pos:pos + take]
            pos += take
            if len(ctx) == context:
                yield ctx
                ctx = []


def n_batches(n_tokens):
    """Batches of PROMPTS x CONTEXT tokens that hold n_tokens: evaluate.py's --tokens."""
    return -(-n_tokens // (PROMPTS * CONTEXT))


def batches(tok, dataset, n_batches):
    """n_batches (PROMPTS, CONTEXT) token batches of the held-out split, packed; at its end the
    split is read again from the start, as SAELens's get_batch_tokens does."""
    contexts = []
    while n_batches > 0:
        docs = (tok(d, add_special_tokens=False)["input_ids"]
                for d in data.iter_documents(dataset, "eval", epochs=1))
        made = 0  # contexts of this pass over the split
        for ctx in packed_contexts(docs, tok.bos_token_id):
            contexts.append(ctx)
            made += 1
            if len(contexts) == PROMPTS:
                yield torch.tensor(contexts)
                contexts = []
                n_batches -= 1
                if n_batches == 0:
                    return
        if made == 0:  # a whole pass gave not one context
            raise data.no_tokens()


def kl_sum(lp_clean, logits):
    """Summed KL(clean || patched) of next-token distributions over the rows of lp_clean (N, V)
    (clean log-probabilities) and the patched logits (N, V)."""
    return (lp_clean.exp() * (lp_clean - F.log_softmax(logits.float(), -1))).sum().item()


@dataclasses.dataclass
class Result:
    """What one `evaluate` pass measured."""
    core: "Core"  # the sparsity and variance metrics
    ce: dict  # mean CE: {"clean", "sae", "ablated"}
    kl: dict  # mean KL(clean || patched): {"sae", "ablated"}


@torch.no_grad()
def evaluate(lm, tok, sae, config, batches, n_batches):
    """SAEBench's core eval (run_evals) over an iterable of (B, T) token batches (`batches` of
    the held-out split): CE and KL over n_batches of them, then the sparsity and variance
    metrics over the NEXT n_batches (sae_bench calls reset_input_dataset between them, but
    SAELens's packed-context generator reads on, so it sees new batches). sae in inference form,
    for this LM (inference.for_lm). Returns a Result."""
    place = (config["layer"], config["site"])
    ignore = torch.tensor(sorted({tok.bos_token_id, tok.eos_token_id, tok.pad_token_id} -
                                 {None}), device=lm.device)
    stream = iter(batches)
    core = Core(sae.n_features)
    sums = dict.fromkeys(["clean", "sae", "ablated", "kl_sae", "kl_ablated"], 0.0)
    n_ce = 0
    n_kl = 0
    for ids in itertools.islice(stream, n_batches):  # reconstruction: CE and KL
        ids = ids.to(lm.device)
        keep = ~torch.isin(ids, ignore)  # (B, T)
        logits = three_logits(lm, sae, place, ids, keep)
        scored = keep[:, :-1]  # CE of position t predicting t+1, t not ignored
        lp_clean = F.log_softmax(logits["clean"][keep], -1)  # KL at every kept position
        for name, lg in logits.items():
            sums[name] += F.cross_entropy(lg[:, :-1][scored], ids[:, 1:][scored],
                                          reduction="sum").item()
            if name != "clean":
                sums["kl_" + name] += kl_sum(lp_clean, lg[keep])
        n_ce += scored.sum().item()
        n_kl += keep.sum().item()
        core.recon_batches += 1
        core.recon_tokens += ids.numel()
    for ids in itertools.islice(stream, n_batches):  # sparsity and variance
        ids = ids.to(lm.device)
        keep = ~torch.isin(ids, ignore)
        x_in, x_out = model.capture(lm, ids, torch.ones_like(ids), [place])[place]
        x_hat, f = raw_forward(sae, x_in[keep])
        seq = torch.arange(core.contexts, core.contexts + len(ids), device=ids.device)
        core.add(x_out[keep], x_hat, f, seq[:, None].expand_as(keep)[keep])
        core.contexts += len(ids)
        core.tokens += ids.numel()
    if core.batches == 0 or n_ce == 0:
        raise data.no_tokens()
    ce = {key: sums[key] / n_ce for key in ("clean", "sae", "ablated")}
    kl = {key: sums["kl_" + key] / n_kl for key in ("sae", "ablated")}
    return Result(core, ce, kl)


def three_logits(lm, sae, place, ids, keep):
    """{clean, sae, ablated}: the logits (B, T, V) with the site as it is, the SAE's
    reconstruction in its place at the kept positions (exclude_special_tokens_from_
    reconstruction), and the site zeroed at every position (SAEBench's ablation)."""
    def clean(x_in, x_out):
        return x_out

    def spliced(x_in, x_out):
        x_hat, _ = raw_forward(sae, x_in.flatten(0, 1))
        return torch.where(keep[..., None], x_hat.view_as(x_out).to(x_out.dtype), x_out)

    def ablated(x_in, x_out):
        return torch.zeros_like(x_out)
    logits = {}
    for name, patch in (("clean", clean), ("sae", spliced), ("ablated", ablated)):
        with model.splice(lm, *place, patch):
            logits[name] = lm(input_ids=ids, attention_mask=torch.ones_like(ids),
                              use_cache=False).logits.float()
    return logits


class Core:
    """Running sums of SAEBench's core metrics over evaluated batches, in the raw space: x the
    target activation (N, D), x_hat the reconstruction, f the feature activations."""

    def __init__(self, n_features):
        self.n = 0  # rows
        self.batches = 0  # of the sparsity and variance metrics
        self.contexts = 0
        self.tokens = 0
        self.sums = dict.fromkeys(["mse", "cossim", "l2_in", "l2_out", "l2_ratio", "ev_legacy",
                                   "l0", "l1", "rrb", "sq", "sse"], 0.0)
        self.recon_batches = 0  # CE and KL's batches ...
        self.recon_tokens = 0  # ... and their tokens
        self.sq_per_dim = 0.0  # sum over batches of mean_t x^2, averaged over D (for EV)
        self.fired = torch.zeros(n_features, dtype=torch.float64)  # activations > 0, per feature
        self.pairs = set()  # (sequence, feature) pairs with a firing: "prompts" per feature

    @torch.no_grad()
    def add(self, x, x_hat, f, seq):
        """One batch: x, x_hat (N, D); f (values, indices) or dense (N, F); seq (N,) ids."""
        x = x.double()
        x_hat = x_hat.double()
        sse = (x - x_hat).pow(2).sum(-1)  # (N,)
        nx = x.norm(dim=-1)
        nh = x_hat.norm(dim=-1)
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
        vals, idx = f if isinstance(f, tuple) else (f, None)  # TopK's (N, K) or dense (N, F)
        s["l0"] += (vals != 0).sum().item()
        s["l1"] += vals.sum().item()  # SAEBench: no abs
        self.fired += firing_counts(f, len(self.fired)).double().cpu()
        rows, feats = (vals > 0).nonzero(as_tuple=True)
        feats = feats if idx is None else idx[rows, feats]
        self.pairs.update(zip(seq[rows].tolist(), feats.tolist()))
        self.n += len(x)
        self.batches += 1

    def metrics(self):
        s = self.sums
        n = self.n
        b = self.batches
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


def write(path, result, sae, config, about, details=False):
    """SAEBench's core results file for one `evaluate` pass (a Result), sae in inference form
    (inference.load_sae), so l1 and the per-feature values are those of the folded features, as
    in its SAELens export; about: the LM's dtype (`llm_dtype`) and the `dataset` read."""
    eval_config = dict(
        model_name=config["model_name"], llm_dtype=about["llm_dtype"],
        batch_size_prompts=PROMPTS, n_eval_reconstruction_batches=result.core.recon_batches,
        n_eval_sparsity_variance_batches=result.core.batches, dataset=about["dataset"],
        context_size=CONTEXT,
        compute_kl=True, compute_ce_loss=True, compute_l2_norms=True,
        compute_sparsity_metrics=True, compute_variance_metrics=True,
        compute_featurewise_density_statistics=True,
        compute_featurewise_weight_based_metrics=True,
        exclude_special_tokens_from_reconstruction=True, verbose=False,
        differences_from_sae_bench=DIFFERENCES)
    out = output(result, sae, dict(config, folded=True), eval_config, details)
    with open(path, "w") as f:
        json.dump(out, f, indent=2)


def output(result, sae, config, eval_config, details=False):
    """The CoreEvalOutput JSON (a dict) of a Result; sae in raw space (the weight metrics use
    its own weights)."""
    core = result.core
    ce = result.ce
    kl = result.kl
    result_metrics, density = core.metrics()
    enc_max = max_cosine(sae.W_enc.detach())
    dec_max = max_cosine(sae.W_dec.detach())
    over = {p: density > p / 100 for p in (1, 10)}
    total = density.sum().item()
    result_metrics.update(
        model_behavior_preservation={"kl_div_score": (kl["ablated"] - kl["sae"]) / kl["ablated"],
                                     "kl_div_with_ablation": kl["ablated"],
                                     "kl_div_with_sae": kl["sae"]},
        model_performance_preservation={
            "ce_loss_score": (ce["ablated"] - ce["sae"]) / (ce["ablated"] - ce["clean"]),
            "ce_loss_with_ablation": ce["ablated"], "ce_loss_with_sae": ce["sae"],
            "ce_loss_without_sae": ce["clean"]},
        token_stats={"total_tokens_eval_reconstruction": core.recon_tokens,  # ignored too
                     "total_tokens_eval_sparsity_variance": core.tokens},
        misc_metrics={**{f"freq_over_{p}_percent": o.double().mean().item()
                         for p, o in over.items()},
                      **{f"normalized_freq_over_{p}_percent":
                         density[o].sum().item() / total if total else 0.0
                         for p, o in over.items()},
                      "average_max_encoder_cosine_sim": enc_max.mean().item(),
                      "average_max_decoder_cosine_sim": dec_max.mean().item(),
                      "frac_alive": (density > 0).double().mean().item()})
    per_feature = []
    if details:
        per_feature = feature_details(core, sae, density, enc_max, dec_max)
    out = {"eval_type_id": "core", "eval_config": eval_config, "eval_id": str(uuid.uuid4()),
           "datetime_epoch_millis": int(time.time() * 1000),
           "eval_result_metrics": result_metrics,
           "eval_result_details": per_feature, "eval_result_unstructured": None,
           "sae_bench_commit_hash": PRODUCER, "sae_lens_id": None, "sae_lens_release_id": None,
           "sae_lens_version": None, "sae_cfg_dict": config}
    return no_nan(out)


def feature_details(core, sae, density, enc_max, dec_max):
    """Per feature, as SAEBench's eval_result_details."""
    prompts = torch.bincount(torch.tensor([f for _, f in core.pairs], dtype=torch.long),
                             minlength=sae.n_features).double()
    W_enc = sae.W_enc.detach().double()  # (F, D)
    W_dec = sae.W_dec.detach().double()  # (F, D)
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
