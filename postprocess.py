"""Post-process a trained SAE into its inference form (§3.3.4, App. C); read and write the formats
other tools use.

    python postprocess.py out/L15R-8x-TopK.safetensors  # -> out/L15R-8x-TopK-JumpReLU.safetensors
    python postprocess.py out/L15R-8x-TopK.safetensors --export-saelens out/L15R-saelens
    python postprocess.py fnlp/Llama3_1-8B-Base-LXR-8x:Llama3_1-8B-Base-L15R-8x  # a released SAE

1. Fold the dataset-wise normalization into the weights, so the SAE maps raw x_in to raw x_out.
2. Make every decoder column unit-norm, moving its norm into the encoder row and bias: the column
   is then the feature's direction and f_i its magnitude. Steps 1-2 are exact reparametrizations.
3. JumpReLU: one global threshold theta such that, on training-distribution tokens, K features fire
   per token on average; at inference f_i = h_i if h_i > theta else 0, no TopK needed.
The folded file keeps `top_k`, so it can still be run in TopK mode (evaluate.py --mode topk).

Released Llama Scope SAEs (a folder with hyperparams.json, lm_config.json and
checkpoints/final.safetensors, or a Hub reference to one) are read by `load_sae`, which applies the
authors' recipe: steps 1-2, then their global `jump_relu_threshold`. `export_saelens` writes any
folded SAE in SAELens's on-disk format (cfg.json, sae_weights.safetensors, sparsity.safetensors).
"""
import argparse
import json
import math
import os
import re

import torch
from safetensors import safe_open

from sae import (SAE, atomic_save_file, bad_input, firing_counts, load_checkpoint, load_tensors_,
                 released_shapes, save_checkpoint)


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
    (the midpoint between the (N*k)-th and (N*k+1)-th largest). Each row keeps its m largest h; the
    answer is exact when no row has more than m values above theta, else m doubles."""
    m = min(sae.n_features, 4 * k)
    while True:
        top = torch.cat([torch.relu(c.to(sae.W_enc.dtype) @ sae.W_enc.T + sae.b_enc).topk(m).values
                         for c in x.split(chunk)])  # (N, m), each row descending
        a, b = top.flatten().float().topk(len(x) * k + 1).values[-2:]
        theta = ((a + b) / 2).item()
        if m == sae.n_features or (top[:, -1] <= theta).all():
            return theta
        m = min(sae.n_features, 2 * m)


def training_rows(config, n_tokens, lm_batch_size=16):
    """n_tokens rows of the SAE's input from the documents it was trained on (train split), with
    the same special-token and massive-activation rules as training."""
    import model
    from buffer import FanOut, kept_rows, take_rows
    lm, tok = model.load_model(config["model_name"])
    key = (config["layer"], config["site"])
    docs = model.iter_documents(config["dataset_path"], "train", epochs=1)
    batches = model.token_batches(tok, docs, config["context_size"], lm_batch_size)
    rows = FanOut(model.activation_producer(lm, tok, [key], batches), [key])[key]
    rows = kept_rows(rows, config.get("outlier_norm_limit"), config["d_model"])
    return take_rows(rows, n_tokens)[:n_tokens, :config["d_model"]]


def postprocess(sae, config, x):
    """Fold, unit-norm the decoder, and (TopK SAEs) fit theta on raw inputs x. Returns the
    config."""
    fold_norm_(sae)
    unit_decoder_(sae)
    config = dict(config, folded=True)
    if config["act_fn"] == "topk":
        sae.threshold = jumprelu_threshold(sae, x, sae.k)
        sae.act = "jumprelu"
        config.update(act_fn="jumprelu", jump_relu_threshold=sae.threshold)
    return config


# ----------------------------------------------------------------------------- released SAEs

RELEASED_FILES = ("hyperparams.json", "lm_config.json", "checkpoints/final.safetensors")


def hub_ref(ref):
    """(repo, subfolder) of `[hf://]owner/repo:subfolder` or `hf://owner/repo/subfolder`, else
    None."""
    m = re.fullmatch(r"(?:hf://)?([^/:]+/[^/:]+):(.+)", ref) \
        or re.fullmatch(r"hf://([^/:]+/[^/:]+)/(.+)", ref)
    return (m[1], m[2].strip("/")) if m else None


def released_folder(ref):
    """The local folder of a released SAE: `ref` itself, or its three files from the Hub."""
    if os.path.isdir(ref):
        return ref
    repo, sub = hub_ref(ref)
    try:
        from huggingface_hub import snapshot_download
        root = snapshot_download(repo, allow_patterns=[f"{sub}/{f}" for f in RELEASED_FILES])
    except Exception as e:  # offline, no such repo, gated without a token
        bad_input(f"{ref}: download from the Hugging Face Hub failed ({type(e).__name__}: "
                  f"{' '.join(str(e).split())[:300]})")
    if not os.path.isfile(os.path.join(root, sub, "hyperparams.json")):
        bad_input(f"{ref}: the Hub repo {repo} has no {sub}/hyperparams.json")
    return os.path.join(root, sub)


def _read_json(folder, name, ref):
    try:
        with open(os.path.join(folder, name)) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        bad_input(f"{ref}: no readable {name} ({type(e).__name__}: {e}); not a released folder")


@torch.no_grad()
def read_released(folder, ref=None):
    """(sae, config) from a folder in the released layout, in inference form. Its weights are in
    training space (bf16): fold the dataset norms (step 1), unit decoder columns (step 2), then
    the authors' global `jump_relu_threshold`, exactly as they run it. The site comes from the
    TransformerLens hook names, the LM from lm_config.json."""
    import model
    ref = ref or folder
    hp = _read_json(folder, "hyperparams.json", ref)
    lm = _read_json(folder, "lm_config.json", ref) \
        if os.path.isfile(os.path.join(folder, "lm_config.json")) else {}
    try:
        D, F, norms, act = hp["d_model"], hp["d_sae"], hp["dataset_average_activation_norm"], \
            hp["act_fn"]
        hooks = hp["hook_point_in"], hp.get("hook_point_out") or hp["hook_point_in"]
        theta = float(hp["jump_relu_threshold"]) if act == "jumprelu" else None
        scale_ok = norms["in"] > 0 and norms["out"] > 0
    except (KeyError, TypeError, ValueError) as e:
        bad_input(f"{ref}: hyperparams.json lacks a usable {e}")
    unsupported = {"act_fn": act not in ("jumprelu", "topk"),
                   "dataset_average_activation_norm": not scale_ok,
                   "norm_activation": hp.get("norm_activation", "dataset-wise") != "dataset-wise",
                   "apply_decoder_bias_to_pre_encoder":
                       hp.get("apply_decoder_bias_to_pre_encoder")}
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        bad_input(f"{ref}: hyperparams.json {bad[0]} = {hp.get(bad[0])!r} is not supported")
    layer, site = model.site_of(*hooks)
    path = os.path.join(folder, "checkpoints", "final.safetensors")
    try:
        with safe_open(path, "pt") as f:
            t = {k: f.get_tensor(k).float() for k in f.keys()}
    except Exception as e:
        bad_input(f"{ref}: checkpoints/final.safetensors unreadable ({type(e).__name__}: {e})")
    t.setdefault("decoder.bias", torch.zeros(D))  # use_decoder_bias: false
    shapes = {k: tuple(v.shape) for k, v in t.items()}
    if any(shapes.get(k) != v for k, v in released_shapes(D, F).items()):
        bad_input(f"{ref}: tensors {shapes} do not match d_model {D}, d_sae {F}")
    sae = SAE(D, F, k=hp.get("top_k", 50), transcoder=site == "TC",
              rank_by_decoder_norm=hp.get("sparsity_include_decoder_norm", True))
    load_tensors_(sae, t, norms)
    fold_norm_(sae)
    unit_decoder_(sae)
    if act == "jumprelu":
        sae.act, sae.threshold = "jumprelu", theta
    config = dict(model_name=lm.get("model_name"), layer=layer, site=site,
                  hook_point_in=hooks[0], hook_point_out=hooks[1], act_fn=act, top_k=sae.k,
                  jump_relu_threshold=theta, dataset_average_activation_norm=norms,
                  context_size=hp.get("context_size", 1024),
                  dataset_path=hp.get("dataset_path", model.EMBEDDED_DATASET),
                  outlier_norm_limit=None, folded=True, released_from=ref,
                  tc_input_before_gain=site == "TC")  # see model.site_of
    return sae, dict(config, d_model=D, d_sae=F,
                     sparsity_include_decoder_norm=sae.rank_by_decoder_norm)


def load_sae(path, device="cpu", model_name=None):
    """(sae, config) from one of our checkpoint files, or from a released SAE (a folder or a Hub
    reference) with the authors' inference recipe applied. model_name overrides the LM."""
    if os.path.isfile(path) or not (os.path.isdir(path) or hub_ref(path)):
        sae, config = load_checkpoint(path, device)
    else:
        sae, config = read_released(released_folder(path), path)
        sae.to(device)
    if model_name:
        config["model_name"] = model_name
    return sae, config


def sae_name(path):
    """L15R-8x-TopK for out/L15R-8x-TopK.safetensors, the subfolder's name for a released SAE."""
    return os.path.basename(os.path.normpath(path.split(":")[-1])).removesuffix(".safetensors")


# ----------------------------------------------------------------------------- SAELens

@torch.no_grad()
def firing_frequency(sae, x, chunk=4096):
    """(F,) the share of raw input rows x (N, D) on which each feature fires."""
    counts = torch.zeros(sae.n_features, dtype=torch.float64)
    for c in x.split(chunk):
        f = sae.encode(c.to(sae.W_enc.dtype) * sae.scales()[0])
        counts += firing_counts(f, sae.n_features).cpu()
    return counts / len(x)


def export_saelens(sae, config, folder, architecture, freq=None):
    """A folded SAE in SAELens's on-disk format, so that `SAE.load_from_disk(folder)` computes our
    features with nothing left to fold: no input normalization, no b_dec subtracted first,
    f = act(x @ W_enc + b_enc), x_hat = f @ W_dec + b_dec. jumprelu: threshold_i = theta for every
    feature; topk: SAELens ranks by h alone, the same as our h_i ||W_dec[i]|| once the decoder
    columns are unit (step 2). freq (F,) -> sparsity.safetensors (log10, +1e-10 as SAELens).
    Sites R, A, M only: SAELens's SAE classes splice their output back at their input hook."""
    assert config.get("folded") and config["site"] != "TC"
    architecture = "standard" if sae.act == "vanilla" else architecture
    if architecture == "jumprelu" and sae.threshold is None:
        bad_input("--architecture jumprelu needs a JumpReLU threshold; use --architecture topk")
    tensors = {"W_enc": sae.W_enc.T, "b_enc": sae.b_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec}
    if architecture == "jumprelu":
        tensors["threshold"] = torch.full((sae.n_features,), float(sae.threshold))
    cfg = {"architecture": architecture, "d_in": sae.d_model, "d_sae": sae.n_features,
           "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": False,
           "normalize_activations": "none", "reshape_activations": "none",
           "metadata": {"model_name": config.get("model_name"),
                        "hook_name": config["hook_point_in"], "hook_layer": config["layer"],
                        "hook_head_index": None, "context_size": config.get("context_size"),
                        "prepend_bos": True, "exclude_special_tokens": True,
                        "dataset_path": config.get("dataset_path"), "sae_lens_version": "6.0.0",
                        "sae_lens_training_version": None}}
    if architecture == "topk":
        cfg["k"] = sae.k
    os.makedirs(folder, exist_ok=True)
    atomic_save_file({k: v.detach().float().contiguous().cpu() for k, v in tensors.items()},
                     os.path.join(folder, "sae_weights.safetensors"), {})
    if freq is not None:
        atomic_save_file({"sparsity": torch.log10(freq.float() + 1e-10)},
                         os.path.join(folder, "sparsity.safetensors"), {})
    with open(os.path.join(folder, "cfg.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    return cfg


def inputs(args, config):
    """Raw SAE inputs from the training distribution: to fit theta and count firing frequency."""
    if args.activations:
        from buffer import load_activations
        return load_activations(args.activations)[0][:args.tokens]
    if config.get("model_name"):
        return training_rows(config, args.tokens)
    bad_input("trained on --activations: give --activations FILE to fit theta")


def main(argv=None):
    p = argparse.ArgumentParser(
        description="Fold normalization, unit decoder norms, JumpReLU theta; read released SAEs, "
                    "export to SAELens")
    p.add_argument("checkpoint", help="a train.py checkpoint (.safetensors), or a released Llama "
                                      "Scope SAE: its folder or `[hf://]owner/repo:subfolder`")
    p.add_argument("--out", default=None, help="output path (default: <checkpoint>-JumpReLU)")
    p.add_argument("--tokens", type=int, default=100_000,
                   help="training-distribution tokens used to fit theta (and count firing)")
    p.add_argument("--activations", default=None,
                   help="fit theta on a safetensors file of `activations` instead of LM tokens")
    p.add_argument("--model", default=None,
                   help="the LM (Hub id or folder) when a released folder has no lm_config.json")
    p.add_argument("--export-saelens", default=None, metavar="DIR",
                   help="also write the folded SAE to DIR in SAELens's format (cfg.json, "
                        "sae_weights.safetensors, sparsity.safetensors)")
    p.add_argument("--architecture", choices=["jumprelu", "topk"], default="jumprelu",
                   help="SAELens architecture for --export-saelens (Vanilla SAEs: standard)")
    args = p.parse_args(argv)
    sae, config = load_sae(args.checkpoint, model_name=args.model)
    ours = os.path.isfile(args.checkpoint)
    if args.export_saelens and config["site"] == "TC":
        bad_input("--export-saelens: transcoders are not exported (SAELens's SAE classes splice "
                  "their output back at their input hook)")
    if ours and config.get("folded") and not args.export_saelens:
        bad_input(f"{args.checkpoint} is already post-processed")
    out = args.out or (args.checkpoint.removesuffix(".safetensors") if ours
                       else sae_name(args.checkpoint)) + "-JumpReLU.safetensors"
    if os.path.abspath(out) == os.path.abspath(args.checkpoint):
        bad_input(f"--out {out} would overwrite the input")
    folded = config.get("folded")
    x = inputs(args, config) if args.export_saelens or not folded else None
    if not folded:
        config = postprocess(sae, config, x)
        print(f"folded S_in, S_out; decoder columns unit-norm; theta "
              f"{config['jump_relu_threshold']:.6g} from {len(x):,} tokens")
    if not (ours and folded):  # a released SAE is saved in our format too
        save_checkpoint(sae, config, out)
        print(f"saved {out}")
    if args.export_saelens:
        if sae.act != "vanilla":
            sae.act = args.architecture  # the inference SAELens will run, for the firing counts
        export_saelens(sae, config, args.export_saelens, args.architecture,
                       firing_frequency(sae, x))
        print(f"exported {args.export_saelens} (SAELens {sae.act}, sparsity from {len(x):,} "
              f"tokens)")


if __name__ == "__main__":
    main()
