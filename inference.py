"""The SAE in inference form (§3.3.4, App. C): what postprocess.py writes and every reader runs.

1. Fold the dataset-wise normalization into the weights, so the SAE maps raw x_in to raw x_out.
2. Make every decoder column unit-norm, moving its norm into the encoder row and bias: the column
   is then the feature's direction and f_i its magnitude. Steps 1-2 are exact reparametrizations.
3. JumpReLU: one global threshold theta such that, on training-distribution tokens, K features fire
   per token on average; at inference f_i = h_i if h_i > theta else 0, no TopK needed.
`load_sae` hands every reader (evaluate.py, postprocess.py, the extras) one of our checkpoints
after steps 1-2, placed where and in the precision it trained (`placement`); released Llama Scope
SAEs take the same path from extras/interop.py. `apply_token_rule` states which tokens every
SAE is scored on. postprocess.py fits theta and writes the file.
Shapes: N rows, D model width, F features, K active.
"""
import copy
import math

import torch

import data
import formats
import model
from metrics import firing_counts

TOKEN_RULE_ROWS = 16_384  # training rows an outlier norm limit is fit on when it is not stored


@torch.no_grad()
def fold_norm_(sae):
    """Step 1: h' = h / S_in and W_dec' = W_dec S_in / S_out reproduce the raw-space reconstruction
    (x_hat_raw = x_hat / S_out) from raw inputs, and keep the TopK ranking h_i ||W_dec[i]||."""
    s_in, s_out = sae.scales()
    sae.b_enc.div_(s_in)
    sae.W_dec.mul_(s_in / s_out)
    sae.b_dec.div_(s_out)
    if sae.W_skip is not None:  # a skip transcoder's W_skip x S_in / S_out
        sae.W_skip.mul_(s_in / s_out)
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


# ----------------------------------------------------------------------------- loading, placing

def placement_args(parser):
    """--device and --dtype on a parser, for `placement` (postprocess.py, evaluate.py)."""
    parser.add_argument("--device", default=None,
                        help="default: where it trained if that kind of device is here, else as "
                             "train.py chooses")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                        help="the LM and the SAE's matmuls (default: as trained on that device, "
                             "else as train.py chooses)")


def placement(config, device=None, dtype=None):
    """(device, dtype, note) to run a checkpoint in: the flags; else where and in what precision
    it trained (`device`, `dtype` in its config) when that kind of device is here; else
    train.py's defaults for this machine. The LM and the SAE's matmuls run in dtype (the SAE's
    weights stay float32), so clean CE and theta are measured as in training."""
    trained_device = config.get("device")
    trained_dtype = config.get("dtype")
    if device:
        model.check_device(device)
    elif model.device_here(trained_device):
        device = trained_device
    else:
        device = model.default_device()
    same = torch.device(device).type == trained_device
    dtype = dtype or (trained_dtype if same else model.default_dtype(device))
    if same and dtype == trained_dtype:
        note = "as trained"
    elif trained_device:
        note = f"trained on {trained_device} in {trained_dtype}"
    else:
        note = "the checkpoint does not say where it trained"
    return device, dtype, note


def place_and_fold(sae, config, fold, device=None, dtype=None):
    """(sae, config, (device, dtype, note)): sae placed as `placement` says, its matmuls in that
    dtype (weights float32), then, when fold, steps 1-2 on that device."""
    placed = placement(config, device, dtype)
    sae.to(placed[0])
    sae.compute_dtype = getattr(torch, placed[1])
    if fold:
        fold_norm_(sae)
        unit_decoder_(sae)
    return sae, config, placed


def load_sae(path, model_name=None, device=None, dtype=None):
    """(sae, config, (device, dtype, note)) of one of our checkpoint files in inference form
    (steps 1-2, done here unless the file is post-processed already: its config's `folded`).
    model_name overrides the LM the file names."""
    sae, config = formats.load_checkpoint(path)
    if model_name:
        config["model_name"] = model_name
    return place_and_fold(sae, config, not config.get("folded"), device, dtype)


def check_lm(name, sae, config):
    """The LM's config, after checking from it alone (no weights loaded) that the SAE fits."""
    if not name:
        raise ValueError("no LM is known for this SAE: give --model ID, or evaluate with "
                         "--activations FILE")
    try:
        cfg = model.load_config(name)
    except Exception as e:  # no such folder, an unknown Hub id, offline
        reason = " ".join(str(e).split())[:200]
        raise ValueError(f"{name}: no readable model config ({type(e).__name__}: "
                         f"{reason})") from None
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


# ----------------------------------------------------------------------------- training rows

def training_rows(lm, tok, config, n_tokens, outlier_limit=True, desc="theta fit"):
    """n_tokens rows (N, C) of the SAE's place from the documents it was trained on (train
    split), with the same special-token and (outlier_limit) outlier norm rules as training."""
    place = (config["layer"], config["site"])
    d_model = lm.config.hidden_size
    limit = config.get("outlier_norm_limit") if outlier_limit else None
    docs = data.iter_documents(config["dataset_path"], "train", epochs=1)
    batches = data.token_batches(tok, docs, config["context_size"], 16)
    rows = (out[place] for out in data.activation_producer(lm, tok, [place], batches))
    rows = (data.drop_outliers(r, limit, d_model) for r in rows)
    return data.take_rows(rows, n_tokens, desc)[:n_tokens]


def apply_token_rule(lm, tok, config, max_norm_ratio=None, dataset=None):
    """(config with its outlier_norm_limit, the token rule as one line): the one rule every SAE
    is scored by, ours or released. Padding and special tokens are never scored; tokens whose
    norm exceeds max_norm_ratio x the site's median norm on training rows (of dataset) are left
    out: the outlier norm limit of training (data.py). max_norm_ratio: evaluate.py's
    --max-norm-ratio; 0 = no limit; None = as trained: the checkpoint's own limit, else the
    ratio it trained with, else train.py's default (a released SAE records none). A ratio given
    is fit here, on the same TOKEN_RULE_ROWS training rows for every SAE of a place."""
    limit = config.get("outlier_norm_limit")
    how = "the checkpoint's, from its training rows"
    if max_norm_ratio is None:
        trained_with = config.get("train_args", {})
        max_norm_ratio = trained_with.get("max_norm_ratio", data.MAX_NORM_RATIO)
    else:
        limit = None
    if max_norm_ratio <= 0:
        limit = None
    elif limit is None:
        source = dict(config, dataset_path=dataset or config["dataset_path"])
        rows = training_rows(lm, tok, source, TOKEN_RULE_ROWS, outlier_limit=False,
                             desc="token rule")
        limit = data.fit_outlier_norm_limit(rows, lm.config.hidden_size, max_norm_ratio)
        how = f"fit on {len(rows):,} training rows"
    token_rule = "scored: every token but padding and special tokens, "
    if limit:
        token_rule += (f"and none above {max_norm_ratio:g} x the site's median norm (in "
                       f"{limit[0]:.1f}, out {limit[1]:.1f}: {how})")
    else:
        token_rule += "massive activations included (no limit)"
    return dict(config, outlier_norm_limit=limit and list(limit)), token_rule


@torch.no_grad()
def firing_frequency(sae, x, chunk=4096):
    """(F,) the share of raw input rows x (N, D) on which each feature fires."""
    counts = torch.zeros(sae.n_features, dtype=torch.float64)
    for c in x.split(chunk):
        f = sae.encode(c.to(sae.W_enc) * sae.scales()[0])
        counts += firing_counts(f, sae.n_features).cpu()
    return counts / len(x)
