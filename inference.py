"""The SAE in inference form (§3.3.4, App. C), and any SAE loaded in that form (`load_sae`).

1. Fold the dataset-wise normalization into the weights, so the SAE maps raw x_in to raw x_out.
2. Make every decoder column unit-norm, moving its norm into the encoder row and bias: the column
   is then the feature's direction and f_i its magnitude. Steps 1-2 are exact reparametrizations.
3. JumpReLU: one global threshold theta such that, on training-distribution tokens, K features fire
   per token on average; at inference f_i = h_i if h_i > theta else 0, no TopK needed.
`load_sae` hands every reader (evaluate.py, features, SAEBench, postprocess.py) an SAE after
steps 1-2: ours as trained, or a released Llama Scope SAE (interop.py reads it) with the authors'
theta. postprocess.py fits theta and writes the file.
Shapes: N rows, D model width, F features, K active.
"""
import copy
import math
import os

import torch

import data
import formats
import interop
import model
from sae import firing_counts


@torch.no_grad()
def fold_norm_(sae):
    """Step 1: h' = h / S_in and W_dec' = W_dec S_in / S_out reproduce the raw-space reconstruction
    (x_hat_raw = x_hat / S_out) from raw inputs, and keep the TopK ranking h_i ||W_dec[i]||."""
    s_in, s_out = sae.scales()
    sae.b_enc.div_(s_in)
    sae.W_dec.mul_(s_in / s_out)
    sae.b_dec.div_(s_out)
    sae.norm_in.fill_(math.sqrt(sae.d_model))  # scales are 1 from now on
    sae.norm_out.fill_(math.sqrt(sae.d_model))


@torch.no_grad()
def unit_decoder_(sae):
    """Step 2: W_dec[i] /= n_i, W_enc[i] *= n_i, b_enc[i] *= n_i with n_i = ||W_dec[i]||."""
    n = sae.W_dec.norm(dim=1)  # (F,)
    sae.W_dec.div_(n[:, None])
    sae.W_enc.mul_(n[:, None])
    sae.b_enc.mul_(n)


@torch.no_grad()
def jumprelu_threshold(sae, x, k, chunk=4096):
    """theta: on the raw inputs x (N, D) of a folded SAE, exactly N*k pre-activations h exceed it
    (the midpoint between the (N*k)-th and (N*k+1)-th largest), h in float32 whatever the
    compute dtype (SAE.pre_acts full). Each row keeps its m largest h; the answer is exact when
    no row has more than m values above theta, else m doubles."""
    m = min(sae.n_features, 4 * k)
    while True:
        top = torch.cat([torch.relu(sae.pre_acts(c, full=True)).topk(m).values
                         for c in x.split(chunk)])  # (N, m), each row descending
        a, b = top.flatten().float().topk(len(x) * k + 1).values[-2:]
        theta = ((a + b) / 2).item()
        if m == sae.n_features or (top[:, -1] <= theta).all():
            return theta
        m = min(sae.n_features, 2 * m)


def fit_jumprelu_(sae, x):
    """Step 3 on a folded TopK SAE: theta from raw inputs x (N, D); the SAE now infers JumpReLU
    (it keeps K, so evaluate.py --mode topk can still run it as TopK)."""
    sae.threshold = jumprelu_threshold(sae, x, sae.k)
    sae.act = "jumprelu"


def load_sae(path, model_name=None, device=None, dtype=None):
    """(sae, config, (device, dtype, note)) from one of our checkpoint files or a released SAE (a
    folder or a Hub reference; the authors' theta then applies): placed where and in the
    precision it is to run (model.placement: the flags, else as trained), then steps 1-2 on that
    device. config is the file's, and its `folded` says whether the file is post-processed (a
    released one counts as such). model_name overrides the LM."""
    if os.path.isfile(path) or not (os.path.isdir(path) or interop.hub_ref(path)):
        sae, config = formats.load_checkpoint(path)
        unfolded = not config.get("folded")
    else:
        sae, config = interop.read_released(interop.released_folder(path), path)
        sae.act = "jumprelu" if sae.threshold is not None else sae.act
        config, unfolded = dict(config, folded=True), True
    if model_name:
        config["model_name"] = model_name
    placed = model.placement(config, device, dtype)
    sae.to(placed[0]).compute_dtype = getattr(torch, placed[1])  # float32 weights
    if unfolded:
        fold_norm_(sae)
        unit_decoder_(sae)
    return sae, config, placed


def check_lm(name, sae, config):
    """The LM's config, after checking from it alone (no weights loaded) that the SAE fits."""
    if not name:
        raise ValueError("no LM is known for this SAE: give --model ID, or evaluate with "
                         "--activations FILE")
    try:
        cfg = model.load_config(name)
    except Exception as e:  # no such folder, an unknown Hub id, offline
        raise ValueError(f"{name}: no readable model config ({type(e).__name__}: "
                         f"{' '.join(str(e).split())[:200]})") from None
    if cfg["hidden_size"] != sae.d_model:
        raise ValueError(f"checkpoint d_model {sae.d_model} does not match {name} "
                         f"(hidden size {cfg['hidden_size']})")
    if config["layer"] >= cfg["num_hidden_layers"]:
        raise ValueError(f"the SAE reads layer {config['layer']}: {name} has "
                         f"{cfg['num_hidden_layers']} layers")
    return cfg


def for_lm(sae, config, lm):
    """The SAE as it must read this LM's activations. A released transcoder reads x / rms(x)
    before the RMSNorm gain g (TransformerLens ln2.hook_normalized); our TC input is g x / rms(x)
    (model.py), so its encoder columns are divided by g: exact while no g_j is 0."""
    if not config.get("tc_input_before_gain"):
        return sae
    sae = copy.deepcopy(sae)
    with torch.no_grad():
        sae.W_enc.div_(model.ln2_gain(lm, config["layer"]).to(sae.W_enc))
    return sae


def training_rows(lm, tok, config, d_model, n_tokens, lm_batch_size=16, limit=True,
                  desc="theta fit"):
    """n_tokens rows (N, C) of the SAE's site from the documents it was trained on (train
    split), with the same special-token and (limit) massive-activation rules as training."""
    key = (config["layer"], config["site"])
    batches = data.document_batches(tok, config["dataset_path"], "train",
                                    config["context_size"], lm_batch_size, epochs=1)
    rows = (r[key] for r in data.activation_producer(lm, tok, [key], batches))
    rows = data.kept_rows(rows, config.get("outlier_norm_limit") if limit else None, d_model)
    return data.take_rows(rows, n_tokens, desc)[:n_tokens]


def token_rule(lm, tok, config, d_model, ratio=None, dataset=None, n_tokens=16_384):
    """(config with its outlier_norm_limit, the rule as one line): the one rule every SAE is
    scored by, ours or released. Padding and special tokens are never scored; tokens whose norm
    exceeds ratio x the site's median norm on training rows (of dataset) are left out: the
    massive-activation limit of training (data.py). ratio: evaluate.py's --max-norm-ratio; 0 =
    no limit; None = as trained: the checkpoint's own limit, else the ratio it trained with,
    else train.py's default (a released SAE records none). A ratio given is fit here, on the
    same n_tokens training rows for every SAE of a site, ours or released."""
    limit, how = config.get("outlier_norm_limit"), "the checkpoint's, from its training rows"
    if ratio is None:
        ratio = config.get("train_args", {}).get("max_norm_ratio", data.MAX_NORM_RATIO)
    else:
        limit = None
    if ratio <= 0:
        limit = None
    elif limit is None:
        rows = training_rows(lm, tok, dict(config, dataset_path=dataset or config["dataset_path"]),
                             d_model, n_tokens, limit=False, desc="token rule")
        limit = data.outlier_norm_limit(rows, d_model, ratio)
        how = f"fit on {len(rows):,} training rows"
    rule = "scored: every token but padding and special tokens, " + (
        f"and none above {ratio:g} x the site's median norm (in {limit[0]:.1f}, out "
        f"{limit[1]:.1f}: {how})" if limit else "massive activations included (no limit)")
    return dict(config, outlier_norm_limit=limit and list(limit)), rule


@torch.no_grad()
def firing_frequency(sae, x, chunk=4096):
    """(F,) the share of raw input rows x (N, D) on which each feature fires."""
    counts = torch.zeros(sae.n_features, dtype=torch.float64)
    for c in x.split(chunk):
        f = sae.encode(c.to(sae.W_enc) * sae.scales()[0])
        counts += firing_counts(f, sae.n_features).cpu()
    return counts / len(x)
