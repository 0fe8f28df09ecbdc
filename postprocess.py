"""Post-process a trained SAE into its inference form (§3.3.4, App. C).

    python postprocess.py out/L15R-8x-TopK.safetensors  # -> out/L15R-8x-TopK-JumpReLU.safetensors

1. Fold the dataset-wise normalization into the weights, so the SAE maps raw x_in to raw x_out.
2. Make every decoder column unit-norm, moving its norm into the encoder row and bias: the column
   is then the feature's direction and f_i its magnitude. Steps 1-2 are exact reparametrizations.
3. JumpReLU: one global threshold theta such that, on training-distribution tokens, K features fire
   per token on average; at inference f_i = h_i if h_i > theta else 0, no TopK needed.
The folded file keeps `top_k`, so it can still be run in TopK mode (evaluate.py --mode topk).
"""
import argparse
import math
import os

import torch

from sae import bad_input, load_checkpoint, save_checkpoint


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


def main(argv=None):
    p = argparse.ArgumentParser(
        description="Fold normalization, unit decoder norms, JumpReLU theta")
    p.add_argument("checkpoint", help="a train.py checkpoint (.safetensors)")
    p.add_argument("--out", default=None, help="output path (default: <checkpoint>-JumpReLU)")
    p.add_argument("--tokens", type=int, default=20_000,
                   help="training-distribution tokens used to fit theta")
    p.add_argument("--activations", default=None,
                   help="fit theta on a safetensors file of `activations` instead of LM tokens")
    args = p.parse_args(argv)
    sae, config = load_checkpoint(args.checkpoint)
    if config.get("folded"):
        bad_input(f"{args.checkpoint} is already post-processed")
    out = args.out or args.checkpoint.removesuffix(".safetensors") + "-JumpReLU.safetensors"
    if os.path.abspath(out) == os.path.abspath(args.checkpoint):
        bad_input(f"--out {out} would overwrite the input")
    if args.activations:
        from buffer import load_activations
        x = load_activations(args.activations)[0][:args.tokens]
    elif config.get("model_name"):
        x = training_rows(config, args.tokens)
    else:
        bad_input("trained on --activations: give --activations FILE to fit theta")
    config = postprocess(sae, config, x)
    print(f"folded S_in, S_out; decoder columns unit-norm; theta "
          f"{config['jump_relu_threshold']:.6g} from {len(x):,} tokens")
    save_checkpoint(sae, config, out)
    print(f"saved {out}")


if __name__ == "__main__":
    main()
