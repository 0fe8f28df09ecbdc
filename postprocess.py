"""Post-process a trained SAE into its inference form (§3.3.4, App. C).

    python postprocess.py out/L15R-8x-k50-TopK.safetensors   # -> ...-k50-TopK-JumpReLU.safetensors
    python postprocess.py out/L15R-8x-k50-TopK.safetensors --export-saelens out/L15R-saelens
    python postprocess.py fnlp/Llama3_1-8B-Base-LXR-8x:Llama3_1-8B-Base-L15R-8x  # a released SAE

1. Fold the dataset-wise normalization into the weights, so the SAE maps raw x_in to raw x_out.
2. Make every decoder column unit-norm, moving its norm into the encoder row and bias: the column
   is then the feature's direction and f_i its magnitude. Steps 1-2 are exact reparametrizations.
3. JumpReLU: one global threshold theta such that, on training-distribution tokens, K features fire
   per token on average; at inference f_i = h_i if h_i > theta else 0, no TopK needed.
The folded file keeps K, so it can still be run in TopK mode (evaluate.py --mode topk). Theta is
fit on the device and in the precision the SAE trained in (`placement`; --device, --dtype).
`load_sae` gives any SAE in inference form: ours, or a released Llama Scope SAE (formats.py reads
it) with the authors' recipe, steps 1-2 and then their global theta. The files themselves (ours,
released, SAELens's) are formats.py's.
"""
import argparse
import math
import os
import sys

import torch

import formats
import model
from buffer import take_rows
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
    (the midpoint between the (N*k)-th and (N*k+1)-th largest). Each row keeps its m largest h; the
    answer is exact when no row has more than m values above theta, else m doubles."""
    m = min(sae.n_features, 4 * k)
    while True:
        top = torch.cat([torch.relu(sae.pre_acts(c.to(sae.W_enc))).topk(m).values
                         for c in x.split(chunk)])  # (N, m), each row descending
        a, b = top.flatten().float().topk(len(x) * k + 1).values[-2:]
        theta = ((a + b) / 2).item()
        if m == sae.n_features or (top[:, -1] <= theta).all():
            return theta
        m = min(sae.n_features, 2 * m)


def training_rows(lm, tok, config, d_model, n_tokens, lm_batch_size=16):
    """n_tokens rows of the SAE's input from the documents it was trained on (train split), with
    the same special-token and massive-activation rules as training."""
    key = (config["layer"], config["site"])
    batches = model.document_batches(tok, config["dataset_path"], "train",
                                     config["context_size"], lm_batch_size, epochs=1)
    rows = (r[key] for r in model.activation_producer(lm, tok, [key], batches))
    rows = model.kept_rows(rows, config.get("outlier_norm_limit"), d_model)
    return model.in_out(take_rows(rows, n_tokens, "theta fit")[:n_tokens], d_model)[0]


def postprocess(sae, config, x):
    """Fold, unit-norm the decoder, and (TopK SAEs) fit theta on raw inputs x. Returns the
    config."""
    fold_norm_(sae)
    unit_decoder_(sae)
    if sae.act == "topk":
        sae.threshold = jumprelu_threshold(sae, x, sae.k)
        sae.act = "jumprelu"
    return dict(config, folded=True)


def load_sae(path, device="cpu", model_name=None):
    """(sae, config) from one of our checkpoint files, or from a released SAE (a folder or a Hub
    reference) in inference form: steps 1-2, then the authors' theta. model_name overrides the
    LM."""
    if os.path.isfile(path) or not (os.path.isdir(path) or formats.hub_ref(path)):
        sae, config = formats.load_checkpoint(path, device)
    else:
        sae, config = formats.read_released(formats.released_folder(path), path)
        fold_norm_(sae)
        unit_decoder_(sae)
        sae.act = "jumprelu" if sae.threshold is not None else sae.act
        sae, config = sae.to(device), dict(config, folded=True)
    if model_name:
        config["model_name"] = model_name
    return sae, config


def placement_args(p):
    """--device and --dtype, for `placement` (postprocess.py and evaluate.py)."""
    p.add_argument("--device", default=None,
                   help="default: where it trained if that kind of device is here, else as "
                        "train.py chooses")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="the LM and the SAE's matmuls (default: as trained on that device, "
                        "else as train.py chooses)")


def placement(config, device=None, dtype=None):
    """(device, dtype, note) to run a checkpoint in: the flags; else where and in what precision
    it trained (`device`, `dtype` in its config) when that kind of device is here; else
    train.py's defaults for this machine. The LM and the SAE's matmuls run in dtype (the SAE's
    weights stay float32), so clean CE and theta are measured as in training."""
    trained_device, trained_dtype = config.get("device"), config.get("dtype")
    if device:
        model.check_device(device)
    device = device or (trained_device if model.device_here(trained_device)
                        else model.default_device())
    same = torch.device(device).type == trained_device
    dtype = dtype or (trained_dtype if same else model.default_dtype(device))
    note = "as trained" if same and dtype == trained_dtype else \
        f"trained on {trained_device} in {trained_dtype}" if trained_device else \
        "the checkpoint does not say where it trained"
    return device, dtype, note


def sae_name(path):
    """L15R-8x-k50-TopK for out/L15R-8x-k50-TopK.safetensors; a released SAE's subfolder name."""
    return os.path.basename(os.path.normpath(path.split(":")[-1])).removesuffix(".safetensors")


# ----------------------------------------------------------------------------- the command

@torch.no_grad()
def firing_frequency(sae, x, chunk=4096):
    """(F,) the share of raw input rows x (N, D) on which each feature fires."""
    counts = torch.zeros(sae.n_features, dtype=torch.float64)
    for c in x.split(chunk):
        f = sae.encode(c.to(sae.W_enc) * sae.scales()[0])
        counts += firing_counts(f, sae.n_features).cpu()
    return counts / len(x)


def ln2_gain(config, sae, lm):
    """(D,) the gain of the RMSNorm before the MLP of a transcoder's layer: our TC input includes
    it, SAELens's (TransformerLens ln2.hook_normalized) does not. A released TC already reads
    x / rms(x): ones."""
    if config.get("tc_input_before_gain"):
        return torch.ones(sae.d_model)
    return lm.model.layers[config["layer"]].post_attention_layernorm.weight.detach().float().cpu()


def needs_lm(args, config, rows):
    """Whether this run needs the LM (rows: theta or firing counts are wanted), checked before
    any slow work: the training rows come from it unless --activations, a transcoder's export
    needs its RMSNorm gain."""
    from_text = rows and not args.activations
    gain = args.export_saelens and model.is_transcoder(config["site"]) \
        and not config.get("tc_input_before_gain")
    if (from_text or gain) and not config.get("model_name"):
        raise ValueError("trained on --activations: give --activations FILE to fit theta" if
                         not gain else "--export-saelens of a transcoder needs its LM's "
                         "RMSNorm gain: give --model (it was trained on --activations)")
    return bool(from_text or gain)


def inputs(args, sae, config, lm, tok):
    """Raw SAE inputs from the training distribution: to fit theta and count firing frequency."""
    if args.activations:
        return model.in_out(formats.activation_rows(args.activations, (config["layer"],
                                                                       config["site"]),
                                                    args.tokens), sae.d_model)[0]
    return training_rows(lm, tok, config, sae.d_model, args.tokens)


def run(argv=None):
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
    placement_args(p)
    args = p.parse_args(argv)
    sae, config = load_sae(args.checkpoint, model_name=args.model)
    ours = os.path.isfile(args.checkpoint)
    if ours and config.get("folded") and not args.export_saelens:
        raise ValueError(f"{args.checkpoint} is already post-processed")
    out = args.out or (args.checkpoint.removesuffix(".safetensors") if ours
                       else sae_name(args.checkpoint)) + "-JumpReLU.safetensors"
    if os.path.abspath(out) == os.path.abspath(args.checkpoint):
        raise ValueError(f"--out {out} would overwrite the input")
    folded = config.get("folded")
    rows = args.export_saelens or not folded  # theta and/or firing counts
    lm, tok = None, None
    args.device, args.dtype, note = placement(config, args.device, args.dtype)
    print(f"running on {args.device} in {args.dtype} ({note})")
    if needs_lm(args, config, rows):  # loaded once: the rows and a transcoder's gain
        lm = model.load_lm(config["model_name"], args.device, getattr(torch, args.dtype))
        tok = None if args.activations else model.load_tokenizer(config["model_name"])
    sae.to(args.device).compute_dtype = getattr(torch, args.dtype)
    gain = ln2_gain(config, sae, lm) if args.export_saelens and model.is_transcoder(
        config["site"]) else None
    x = inputs(args, sae, config, lm, tok) if rows else None
    del lm
    if not folded:
        config = postprocess(sae, config, x)
        print(f"folded S_in, S_out; decoder columns unit-norm; theta "
              f"{sae.threshold:.6g} from {len(x):,} tokens")
    if not (ours and folded):  # a released SAE is saved in our format too
        formats.save_checkpoint(sae, config, out)
        print(f"saved {out}")
    if args.export_saelens:
        if sae.act != "vanilla":
            sae.act = args.architecture  # the inference SAELens will run, for the firing counts
        cfg = formats.export_saelens(sae, config, args.export_saelens, args.architecture,
                                     firing_frequency(sae, x), gain)
        print(f"exported {args.export_saelens} (SAELens {cfg['architecture']}, sparsity from "
              f"{len(x):,} tokens; model card README.md)")


def main(argv=None):
    try:
        return run(argv)
    except ValueError as e:  # bad input, found by any module: one line, exit code 2
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)


if __name__ == "__main__":
    main()
