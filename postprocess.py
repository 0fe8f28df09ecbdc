"""Post-process a trained SAE into its inference form (§3.3.4, App. C), and export it.

    python postprocess.py out/L15R-8x-k50-TopK.safetensors   # -> ...-k50-TopK-JumpReLU.safetensors
    python postprocess.py out/L15R-8x-k50-TopK.safetensors --export-saelens out/L15R-saelens
    python postprocess.py fnlp/Llama3_1-8B-Base-LXR-8x:Llama3_1-8B-Base-L15R-8x  # a released SAE

1. Fold the dataset-wise normalization into the weights, so the SAE maps raw x_in to raw x_out.
2. Make every decoder column unit-norm, moving its norm into the encoder row and bias.
3. JumpReLU: one global theta such that, on training-distribution tokens, K features fire per
   token on average; at inference f_i = h_i if h_i > theta else 0, no TopK needed.
Steps 1-2 happen as the SAE is loaded (inference.load_sae); this script runs the LM for theta's
rows on the device and in the precision the SAE trained in (inference.placement; --device,
--dtype), fits theta on float32 pre-activations (bf16 ones tie: a tie at theta flips a whole
bin) and writes the file.
The folded file keeps K, so it can still be run in TopK mode (evaluate.py --mode topk). A
released SAE is saved in our format with the authors' theta. --export-saelens writes SAELens's
format (extras/interop.py).
"""
import argparse
import os
import sys

import torch

import formats
import inference
import model
from extras import activations, flags, interop, replacement


def get_args(argv=None):
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
    p.add_argument("--export-circuit-tracer", default=None, metavar="DIR",
                   help="checkpoint a folder with a transcoder for every layer: write them to "
                        "DIR as circuit-tracer's transcoder set (TopK ones get theta first)")
    inference.placement_args(p)
    return flags.parse(p, argv, {"tokens": "[1, inf)"})


def needs_lm(args, config, needs_rows):
    """Whether this run needs the LM (needs_rows: theta or firing counts are wanted), checked
    before any slow work: the training rows come from it unless --activations, a transcoder's
    export needs its RMSNorm gain."""
    from_text = needs_rows and not args.activations
    tc_export = args.export_saelens and model.is_transcoder(config["site"])
    gain = tc_export and not config.get("tc_input_before_gain")
    if gain and not config.get("model_name"):
        raise ValueError("--export-saelens of a transcoder needs its LM's RMSNorm gain: give "
                         "--model (it was trained on --activations)")
    if from_text and not config.get("model_name"):
        raise ValueError("trained on --activations: give --activations FILE to fit theta")
    return bool(from_text or gain)


def inputs(args, sae, config, lm, tok):
    """Raw SAE inputs from the training distribution: to fit theta and count firing frequency."""
    if args.activations:
        place = (config["layer"], config["site"])
        rows = activations.activation_rows(args.activations, place, args.tokens)
    else:
        rows = inference.training_rows(lm, tok, config, args.tokens)
    return model.in_out(rows, sae.d_model)[0]


def tc_gain(config, lm, d_model):
    """(D,) the RMSNorm gain a transcoder's SAELens export folds into its encoder: ours reads
    g x / rms(x), SAELens x / rms(x); a released TC already reads x / rms(x) (ones)."""
    if config.get("tc_input_before_gain"):
        return torch.ones(d_model)
    return model.ln2_gain(lm, config["layer"])


def export_circuit_tracer(args):
    """A folder of transcoders, one per layer, as circuit-tracer's: a TopK one gets its theta
    first, from --tokens training rows of its layer (the files are left as they are)."""
    transcoders, config, (args.device, args.dtype, note) = replacement.load_transcoders(
        args.checkpoint, args.device, args.dtype)
    print(f"running on {args.device} in {args.dtype} ({note})")
    unfitted = [layer for layer, (sae, _) in transcoders.items() if sae.threshold is None]
    if unfitted:
        lm, tok = model.load_model(config["model_name"], args.device, getattr(torch, args.dtype))
        for layer in unfitted:
            sae, layer_config = transcoders[layer]
            x = inputs(args, sae, layer_config, lm, tok)
            inference.fit_jumprelu_(sae, x)
            print(f"L{layer}TC: theta {sae.threshold:.6g} from {len(x):,} tokens")
    interop.export_circuit_tracer(transcoders, args.export_circuit_tracer)
    print(f"exported {args.export_circuit_tracer} (circuit-tracer transcoder set, "
          f"{len(transcoders)} layers)")


def postprocess(args):
    """Fit theta (step 3) and write the file; export to SAELens when asked."""
    scope_folder = not os.path.isfile(os.path.join(args.checkpoint, "hyperparams.json"))
    if os.path.isdir(args.checkpoint) and scope_folder:
        if not args.export_circuit_tracer:
            raise ValueError(f"{args.checkpoint} is a folder: post-process its checkpoints one "
                             f"by one, or give --export-circuit-tracer DIR")
        return export_circuit_tracer(args)
    if args.export_circuit_tracer:
        raise ValueError("--export-circuit-tracer takes a folder with a transcoder for every "
                         "layer, not one checkpoint")
    sae, config, (args.device, args.dtype, note) = interop.load_sae(
        args.checkpoint, args.model, args.device, args.dtype)
    ours = os.path.isfile(args.checkpoint)
    folded = config.get("folded")  # the file is post-processed already (a released one is)
    if args.export_saelens and sae.skip and args.architecture == "topk":
        raise ValueError("--architecture topk: SAELens has no TopK skip transcoder; use "
                         "--architecture jumprelu")
    if ours and folded and not args.export_saelens:
        raise ValueError(f"{args.checkpoint} is already post-processed")
    stem = formats.sae_name(args.checkpoint)
    if ours:
        stem = args.checkpoint.removesuffix(".safetensors")
    out = args.out or stem + "-JumpReLU.safetensors"
    if os.path.abspath(out) == os.path.abspath(args.checkpoint):
        raise ValueError(f"--out {out} would overwrite the input")
    needs_rows = args.export_saelens or not folded  # theta and/or firing counts
    print(f"running on {args.device} in {args.dtype} ({note})")
    lm = None
    tok = None
    if needs_lm(args, config, needs_rows):  # loaded once: the rows and a transcoder's gain
        lm = model.load_lm(config["model_name"], args.device, getattr(torch, args.dtype))
        if not args.activations:
            tok = model.load_tokenizer(config["model_name"])
    gain = None
    if args.export_saelens and model.is_transcoder(config["site"]):
        gain = tc_gain(config, lm, sae.d_model).to(sae.W_enc)
    x = inputs(args, sae, config, lm, tok) if needs_rows else None
    del lm
    if not folded:
        config = dict(config, folded=True)
        theta = ""
        if sae.act == "topk":
            inference.fit_jumprelu_(sae, x)
            theta = f"; theta {sae.threshold:.6g} from {len(x):,} tokens"
        print(f"folded S_in, S_out; decoder columns unit-norm{theta}")
    if not (ours and folded):  # a released SAE is saved in our format too
        formats.save_checkpoint(sae, config, out)
        print(f"saved {out}")
    if args.export_saelens:
        export(args, sae, config, x, gain)


def export(args, sae, config, x, gain):
    """SAELens's folder: the inference SAELens will run, firing counts from the rows x."""
    if sae.act != "vanilla":
        sae.act = args.architecture
    cfg = interop.export_saelens(sae, config, args.export_saelens, args.architecture,
                                 inference.firing_frequency(sae, x), gain)
    print(f"exported {args.export_saelens} (SAELens {cfg['architecture']}, sparsity from "
          f"{len(x):,} tokens; model card README.md)")


def main(argv=None):
    try:
        return postprocess(get_args(argv))
    except ValueError as e:  # bad input, found by any module: one line, exit code 2
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)


if __name__ == "__main__":
    main()
