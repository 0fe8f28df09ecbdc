"""Our own files, and the names they go by: one place per on-disk format of this project.

- Our checkpoint: one .safetensors file, the released Llama Scope tensor names and layouts
  (`decoder.weight` is (D, F)) plus a JSON `config` in the released hyperparams.json names
  (`d_sae`, `top_k`, `act_fn` "relu" for Vanilla, ...). Those names live only in this file; the
  code calls them n_features, k and "vanilla".
- Names: `run_name` (L15R-8x-k50-TopK), `place_name` (L15R for the place (15, "R")), `sae_name`
  (a path's SAE name), and `renamed` (what an old-style name stands for now).
- The resumable state of a run (train.py --save-every): any nested state_dict() as one file per
  rank, refused when it is another run's.
Released Llama Scope folders and SAELens's format are extras/interop.py's, activation files
extras/activations.py's. Only safetensors and JSON are read: no file can execute code. Every
write goes aside, is fsynced, then renamed, so a reader or a kill -9 never sees a half-written
file. Bad files raise ValueError with a one-line message (the scripts print it, exit code 2).
"""
import glob
import json
import math
import os
import re

import torch
from safetensors import safe_open
from safetensors.torch import save_file

import model
from sae import SAE

ACT_FN = {"topk": "topk", "vanilla": "relu", "jumprelu": "jumprelu"}  # ours -> Llama Scope's
RESUME_FREE = {"resume", "save_every", "out", "log_every", "eval_tokens", "device", "rule",
               "wandb_project", "plan_only"}  # train.py flags a resumed run may change


def atomic_save_file(tensors, path, metadata):
    """save_file aside, fsync, rename: a reader (or a kill -9) never sees a half-written `path`."""
    tmp = f"{path}.tmp{os.getpid()}"
    save_file(tensors, tmp, metadata=metadata)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- our checkpoint

def save_checkpoint(sae, config, path):
    """One self-describing file. What the SAE knows (widths, K, activation, threshold, norms)
    is taken from it; config adds where it reads and how it was trained."""
    tensors = {"encoder.weight": sae.W_enc, "encoder.bias": sae.b_enc,
               "decoder.weight": sae.W_dec.T, "decoder.bias": sae.b_dec}
    if sae.W_skip is not None:  # a skip transcoder: W_skip (D_out, D_in)
        tensors["skip.weight"] = sae.W_skip
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    hook_in, hook_out = model.hook_names(config["layer"], config["site"])
    config = dict(config, hook_point_in=hook_in, hook_point_out=hook_out, d_model=sae.d_model,
                  d_sae=sae.n_features, expansion_factor=sae.n_features / sae.d_model,
                  top_k=sae.k, act_fn=ACT_FN[sae.act], jump_relu_threshold=sae.threshold,
                  sparsity_include_decoder_norm=True, skip=sae.skip)
    if not config.get("folded"):  # a folded SAE keeps the norms it was trained with, for reference
        config["dataset_average_activation_norm"] = {"in": sae.norm_in.item(),
                                                     "out": sae.norm_out.item()}
    atomic_save_file(tensors, path, {"config": json.dumps(config)})


def training_config(sae, place, source, train_args, trained):
    """What train.py's checkpoints say beyond the SAE itself, in the released hyperparams.json
    names: where it reads (place; source: model, dataset, context_size), how it was trained
    (train_args: train.py's flags as a dict), and what the run did (trained: k_anneal_steps,
    outlier_norm_limit, rows_served, step, heldout (the held-out check), device: where it
    trained, which evaluate.py and postprocess.py default to, with train_args' dtype)."""
    passes = train_args["passes"]
    return dict(model_name=source["model"], layer=place[0], site=place[1],
                k_warmup_steps=trained["k_anneal_steps"], init_decoder_norm=sae.init_decoder_norm,
                use_batch_norm_mse=train_args["loss"] == "batch-norm-mse",
                norm_activation="dataset-wise", apply_decoder_bias_to_pre_encoder=False,
                use_decoder_bias=True, lr=train_args["lr"], l1_coefficient=train_args["l1_coef"],
                context_size=source["context_size"], dataset_path=source["dataset"],
                prepend_bos=True, outlier_norm_limit=trained["outlier_norm_limit"],
                n_training_tokens=trained["rows_served"] // passes, passes=passes,
                n_rows_served=trained["rows_served"], step=trained["step"], folded=False,
                heldout=trained["heldout"], train_args=train_args,
                device=torch.device(trained["device"]).type, dtype=train_args["dtype"])


def read_checkpoint(path):
    """(config, tensors) of one of our checkpoints, validated before use."""
    if not os.path.isfile(path):
        now = renamed(path)
        raise ValueError(f"checkpoint {path}: no such file" + (
            f"; checkpoints are named with K (or the L1 weight) now: {', '.join(now)}"
            if now else ""))
    try:
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
            t = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # truncated, not safetensors at all, unreadable
        raise ValueError(f"checkpoint {path}: not a readable safetensors file "
                         f"({type(e).__name__}: {e})") from None
    try:
        config = json.loads(meta["config"])
        D = config["d_model"]
        F = config["d_sae"]
        norms = config["dataset_average_activation_norm"]
        ok = (isinstance(D, int) and isinstance(F, int) and D > 0 and F > 0
              and config["act_fn"] in ACT_FN.values() and isinstance(config["top_k"], int)
              and config["site"] in model.SITES and isinstance(config["layer"], int)
              and all(isinstance(norms[k], (int, float)) and norms[k] > 0 for k in ("in", "out")))
    except (KeyError, TypeError, ValueError) as e:
        reason = f"metadata `config` missing or incomplete: {type(e).__name__} {e}"
        raise ValueError(f"checkpoint {path}: not a Llama Scope checkpoint of this project "
                         f"({reason})") from None
    shapes = {k: tuple(v.shape) for k, v in t.items()}
    expected = released_shapes(D, F)
    if config.get("skip"):
        expected["skip.weight"] = (D, D)
    if not ok or shapes != expected:
        raise ValueError(f"checkpoint {path}: tensors {shapes} or config do not match d_model "
                         f"{D}, d_sae {F}")
    return config, t


def load_checkpoint(path, device="cpu"):
    """(sae, config) from a file written by save_checkpoint. A folded file (postprocess.py) maps
    raw activations to raw targets: its normalization scales are 1."""
    config, t = read_checkpoint(path)
    act = {v: k for k, v in ACT_FN.items()}[config["act_fn"]]
    sae = SAE(config["d_model"], config["d_sae"], act=act, k=config["top_k"],
              transcoder=model.is_transcoder(config["site"]),
              threshold=config.get("jump_relu_threshold"), skip=config.get("skip", False))
    norms = config["dataset_average_activation_norm"]
    if config.get("folded"):
        norms = {"in": math.sqrt(sae.d_model), "out": math.sqrt(sae.d_model)}
    load_tensors_(sae, t, norms)
    return sae.to(device), config


def released_shapes(D, F):
    """The tensors of a checkpoint in the released Llama Scope layout, and their shapes."""
    return {"encoder.weight": (F, D), "encoder.bias": (F,), "decoder.weight": (D, F),
            "decoder.bias": (D,)}


@torch.no_grad()
def load_tensors_(sae, t, norms):
    """Fill sae from released-layout tensors t and the dataset norms {"in", "out"}."""
    sae.W_enc.copy_(t["encoder.weight"])
    sae.b_enc.copy_(t["encoder.bias"])
    sae.W_dec.copy_(t["decoder.weight"].T)
    sae.b_dec.copy_(t["decoder.bias"])
    if sae.W_skip is not None:
        sae.W_skip.copy_(t["skip.weight"])
    sae.norm_in.fill_(norms["in"])
    sae.norm_out.fill_(norms["out"])


# ----------------------------------------------------------------------------- resumable state

def save_state(path, state):
    """A nested state (dicts and lists of tensors and JSON values, e.g. state_dict()s) as one
    file: each tensor under its dotted path, the rest as JSON with {"tensor": path} in its
    place."""
    tensors = {}
    tree = _split(state, "state", tensors)
    atomic_save_file(tensors, path, {"state": json.dumps(tree)})


def _split(x, at, tensors):
    """x with each tensor moved into tensors under its dotted path. (Module-level, not a
    closure: a closure that calls itself is a reference cycle, which would hold every saved
    tensor, old buffers included, until Python's cyclic GC happens to run: 8 GB in a scope.)"""
    if isinstance(x, torch.Tensor):
        tensors[at] = x.detach().contiguous().cpu()
        return {"tensor": at}
    if isinstance(x, dict):
        return {str(k): _split(v, f"{at}.{k}", tensors) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_split(v, f"{at}.{i}", tensors) for i, v in enumerate(x)]
    return x


def load_state(path):
    """The state save_state wrote (dict keys come back as strings)."""
    try:
        with safe_open(path, "pt") as f:
            tree = json.loads(f.metadata()["state"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise ValueError(f"--resume {path}: not a resumable checkpoint "
                         f"({type(e).__name__}: {e})") from None
    return _join(tree, tensors)


def _join(x, tensors):
    """The inverse of _split."""
    if isinstance(x, dict) and set(x) == {"tensor"}:
        return tensors[x["tensor"]]
    if isinstance(x, dict):
        return {k: _join(v, tensors) for k, v in x.items()}
    if isinstance(x, list):
        return [_join(v, tensors) for v in x]
    return x


def run_flags(args):
    """The train.py flags (a dict) that define a run: saved in its checkpoints as `train_args`."""
    return {k: v for k, v in args.items() if k not in RESUME_FREE}


def resumable(args):
    """The flags a resumed run must share with the run it continues (JSON-normalized)."""
    return json.loads(json.dumps(run_flags(args)))


def resume_path(out, resume, comms):
    """This rank's file to continue from (`auto`: <out>/resume.safetensors), or None."""
    if not resume:
        return None
    path = os.path.join(out, "resume.safetensors") if resume == "auto" else resume
    return comms.shard_path(path)


def read_resume(out, resume, args, comms):
    """The saved state of the run to continue (--resume: a file or `auto`, in the folder out),
    or None when there is none; refused if it is another run's (a flag the file predates counts
    as its default) or the ranks' files disagree."""
    path = resume_path(out, resume, comms)
    state = load_state(path) if path and os.path.isfile(path) else None
    steps = comms.all_values(torch.tensor([state["step"] if state else -1])).tolist()
    if len(set(steps)) > 1:
        raise ValueError(f"--resume: the ranks' files ({path}) are from different steps, or "
                         f"missing")
    if state is None:
        return None
    now = resumable(args)
    diff = [k for k in now if k in state["args"] and now[k] != state["args"][k]]
    if diff:
        raise ValueError(f"--resume {path} is from a different configuration: "
                         f"--{diff[0].replace('_', '-')} was {state['args'].get(diff[0])}, "
                         f"now {now[diff[0]]}")
    if state["world"] != comms.world:
        raise ValueError(f"--resume {path} was written by {state['world']} processes, now "
                         f"{comms.world}")
    return state


def save_resume(out, args, comms, state):
    """Everything to continue bit-identically (each object's state_dict() in state), with the
    flags and the world size it must match: one file per rank in out."""
    save_state(comms.shard_path(os.path.join(out, "resume.safetensors")),
               {"args": resumable(args), "world": comms.world, **state})


# ----------------------------------------------------------------------------- names

def place_name(place):
    """(15, "R") -> "L15R", as in checkpoint and cache file names."""
    return f"L{place[0]}{place[1]}"


def run_name(place, sae, l1_coef):
    """L15R-8x-k50-TopK (Vanilla: L15R-8x-l1_0.0002-Vanilla; a skip transcoder: L7TC-8x-k50-
    SkipTopK): K, or the L1 weight, is in the name, so a sweep over it in one --out keeps every
    checkpoint."""
    kind = f"k{sae.k}-TopK" if sae.act == "topk" else f"l1_{l1_coef:g}-Vanilla"
    if sae.skip:
        kind = kind.replace("-", "-Skip", 1)
    return f"{place_name(place)}-{sae.n_features / sae.d_model:g}x-{kind}"


def sae_name(path):
    """L15R-8x-k50-TopK for out/L15R-8x-k50-TopK.safetensors; a released SAE's subfolder name."""
    return os.path.basename(os.path.normpath(path.split(":")[-1])).removesuffix(".safetensors")


def renamed(path):
    """The files an old-style name (L15R-8x-TopK.safetensors, before K was in the name) stands
    for now: L15R-8x-k50-TopK.safetensors, L15R-8x-k32-TopK.safetensors, ..."""
    old = re.fullmatch(r"(.*L\d+(?:R|A|M|TC)-[\d.]+x)-(TopK|Vanilla)(-JumpReLU)?\.safetensors",
                       path)
    if not old:
        return []
    return sorted(glob.glob(f"{glob.escape(old[1])}-*-{old[2]}{old[3] or ''}.safetensors"))
