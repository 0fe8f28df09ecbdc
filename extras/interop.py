"""Other people's SAE files: released Llama Scope SAEs in, SAELens's format out.

- A released Llama Scope SAE: a folder in the released layout (hyperparams.json, lm_config.json,
  checkpoints/final.safetensors), or a Hub reference to one (`[hf://]owner/repo:subfolder`), read
  as trained: weights in the normalized space with the dataset norms and the authors' theta.
- `load_sae`: any SAE in inference form, ours (inference.load_sae) or released.
- SAELens: a folded SAE in its on-disk format (cfg.json, sae_weights.safetensors,
  sparsity.safetensors) with a Hugging Face model card (README.md) and our own checkpoint beside.
Our own checkpoint format is formats.py's. Bad files raise ValueError with a one-line message.
"""
import json
import os
import re

import huggingface_hub
import torch
from safetensors import safe_open

import data
import inference
import model
from formats import atomic_save_file, load_tensors_, place_name, released_shapes, save_checkpoint
from sae import SAE

RELEASED_FILES = ("hyperparams.json", "lm_config.json", "checkpoints/final.safetensors")
OURS = "llama_scope.safetensors"  # our single-file checkpoint inside an export folder


def hub_ref(ref):
    """(repo, subfolder) of `[hf://]owner/repo:subfolder` or `hf://owner/repo/subfolder`, else
    None."""
    m = re.fullmatch(r"(?:hf://)?([^/:]+/[^/:]+):(.+)", ref)
    m = m or re.fullmatch(r"hf://([^/:]+/[^/:]+)/(.+)", ref)
    return (m[1], m[2].strip("/")) if m else None


def load_sae(path, model_name=None, device=None, dtype=None):
    """(sae, config, (device, dtype, note)) of any SAE in inference form: one of our files
    (inference.load_sae), or a released one (a folder or a Hub reference), its authors' theta
    applying. A released SAE counts as post-processed (config `folded`); its weights are folded
    here. model_name overrides the LM."""
    if os.path.isfile(path) or not (os.path.isdir(path) or hub_ref(path)):
        return inference.load_sae(path, model_name, device, dtype)
    sae, config = read_released(released_folder(path), path)
    if sae.threshold is not None:
        sae.act = "jumprelu"
    config = dict(config, folded=True)
    if model_name:
        config["model_name"] = model_name
    return inference.place_and_fold(sae, config, True, device, dtype)


def released_folder(ref):
    """The local folder of a released SAE: `ref` itself, or its three files from the Hub."""
    if os.path.isdir(ref):
        return ref
    repo, sub = hub_ref(ref)
    try:
        root = huggingface_hub.snapshot_download(
            repo, allow_patterns=[f"{sub}/{name}" for name in RELEASED_FILES])
    except Exception as e:  # offline, no such repo, gated without a token
        reason = " ".join(str(e).split())[:300]
        raise ValueError(f"{ref}: download from the Hugging Face Hub failed "
                         f"({type(e).__name__}: {reason})") from None
    if not os.path.isfile(os.path.join(root, sub, "hyperparams.json")):
        raise ValueError(f"{ref}: the Hub repo {repo} has no {sub}/hyperparams.json")
    return os.path.join(root, sub)


def _read_json(folder, name, ref):
    try:
        with open(os.path.join(folder, name)) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{ref}: no readable {name} ({type(e).__name__}: {e}); not a released "
                         f"folder") from None


def read_released(folder, ref=None):
    """(sae, config) from a folder in the released layout, as trained: weights in the normalized
    space with the dataset norms, and the authors' global theta in sae.threshold (it applies to
    the folded form: inference.load_sae). The site comes from the TransformerLens hook names,
    the LM from lm_config.json."""
    ref = ref or folder
    hp = _read_json(folder, "hyperparams.json", ref)
    lm = {}
    if os.path.isfile(os.path.join(folder, "lm_config.json")):
        lm = _read_json(folder, "lm_config.json", ref)
    try:
        D = hp["d_model"]
        F = hp["d_sae"]
        norms = hp["dataset_average_activation_norm"]
        act = hp["act_fn"]
        hook_in = hp["hook_point_in"]
        hook_out = hp.get("hook_point_out") or hook_in
        theta = float(hp["jump_relu_threshold"]) if act == "jumprelu" else None
        scale_ok = norms["in"] > 0 and norms["out"] > 0
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{ref}: hyperparams.json lacks a usable {e}") from None
    unsupported = {"act_fn": act not in ("jumprelu", "topk"),
                   "dataset_average_activation_norm": not scale_ok,
                   "norm_activation": hp.get("norm_activation", "dataset-wise") != "dataset-wise",
                   "apply_decoder_bias_to_pre_encoder":
                       hp.get("apply_decoder_bias_to_pre_encoder"),
                   "sparsity_include_decoder_norm":  # TopK ranking by h alone: not ours
                       act == "topk" and not hp.get("sparsity_include_decoder_norm", True)}
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise ValueError(f"{ref}: hyperparams.json {bad[0]} = {hp.get(bad[0])!r} is not "
                         f"supported")
    layer, site = model.place_of(hook_in, hook_out)
    path = os.path.join(folder, "checkpoints", "final.safetensors")
    try:
        with safe_open(path, "pt") as f:
            t = {k: f.get_tensor(k).float() for k in f.keys()}
    except Exception as e:
        raise ValueError(f"{ref}: checkpoints/final.safetensors unreadable "
                         f"({type(e).__name__}: {e})") from None
    t.setdefault("decoder.bias", torch.zeros(D))  # use_decoder_bias: false
    shapes = {k: tuple(v.shape) for k, v in t.items()}
    if any(shapes.get(k) != v for k, v in released_shapes(D, F).items()):
        raise ValueError(f"{ref}: tensors {shapes} do not match d_model {D}, d_sae {F}")
    sae = SAE(D, F, k=hp.get("top_k", 50), transcoder=model.is_transcoder(site), threshold=theta)
    load_tensors_(sae, t, norms)
    config = dict(model_name=lm.get("model_name"), layer=layer, site=site,
                  dataset_average_activation_norm=norms,
                  context_size=hp.get("context_size", 1024),
                  dataset_path=hp.get("dataset_path", data.EMBEDDED_DATASET),
                  outlier_norm_limit=None, released_from=ref,
                  tc_input_before_gain=model.is_transcoder(site))  # see model.place_of
    return sae, config


# ----------------------------------------------------------------------------- SAELens

def export_saelens(sae, config, folder, architecture, freq=None, gain=None):
    """A folded SAE in SAELens's on-disk format, so that `SAE.load_from_disk(folder)` computes our
    features with nothing left to fold: no input normalization, no b_dec subtracted first,
    f = act(x @ W_enc + b_enc), x_hat = f @ W_dec + b_dec. jumprelu: threshold_i = theta for every
    feature; topk: SAELens ranks by h alone, the same as our h_i ||W_dec[i]|| once the decoder
    columns are unit (step 2). freq (F,) -> sparsity.safetensors (log10, +1e-10 as SAELens).
    Transcoders: `jumprelu_transcoder`, `transcoder` (Vanilla: ReLU), and TopK as `topk` with
    `hook_name_out` (SAELens has no TopK transcoder; d_in = d_out here). They read TransformerLens
    `ln2.hook_normalized` = x / rms(x), as the released ones do, so the RMSNorm gain (D,) our TC
    input includes is folded into the encoder: W_enc[:, j] * gain_j (model.place_of), and into a
    skip transcoder's W_skip (`skip_transcoder`, `jumprelu_skip_transcoder`)."""
    assert config.get("folded")
    tc = model.is_transcoder(config["site"])
    architecture = "standard" if sae.act == "vanilla" else architecture
    if architecture == "jumprelu" and sae.threshold is None:
        raise ValueError("--architecture jumprelu needs a JumpReLU threshold; use "
                         "--architecture topk")
    if sae.skip and architecture == "topk":
        raise ValueError("--architecture topk: SAELens has no TopK skip transcoder; use "
                         "--architecture jumprelu")
    w_enc = sae.W_enc * gain if tc else sae.W_enc  # (F, D)
    tensors = {"W_enc": w_enc.T, "b_enc": sae.b_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec}
    if architecture == "jumprelu":
        tensors["threshold"] = torch.full((sae.n_features,), float(sae.threshold))
    if sae.skip:  # (D_out, D_in), applied as x @ W_skip.T to x / rms(x)
        tensors["W_skip"] = sae.W_skip * gain[None, :]
    if tc and architecture != "topk":
        kind = "skip_transcoder" if sae.skip else "transcoder"
        architecture = {"jumprelu": f"jumprelu_{kind}", "standard": kind}[architecture]
    hook_in, hook_out = model.hook_names(config["layer"], config["site"])
    cfg = {"architecture": architecture, "d_in": sae.d_model, "d_sae": sae.n_features,
           "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": False,
           "normalize_activations": "none", "reshape_activations": "none",
           **({"d_out": sae.d_model} if "transcoder" in architecture else {}),
           "metadata": {"model_name": config.get("model_name"), "hook_name": hook_in,
                        **({"hook_name_out": hook_out} if tc else {}),
                        "hook_layer": config["layer"],
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
    save_checkpoint(sae, config, os.path.join(folder, OURS))  # the same SAE, for this project
    with open(os.path.join(folder, "README.md"), "w") as f:
        f.write(model_card(sae, config, cfg))
    return cfg


def model_card(sae, config, cfg):
    """README.md of an export folder, as the Hugging Face Hub shows it: front matter with
    library_name and tags, what was trained, the held-out numbers, how to load it."""
    layer = config["layer"]
    site = config["site"]
    tokens = config.get("n_training_tokens")
    hook_in, hook_out = model.hook_names(layer, site)
    held = config.get("heldout") or {}
    rows = [("explained variance (eq. 6)", "{:.3f}", held.get("explained_variance")),
            ("explained variance, centred", "{:.3f}", held.get("explained_variance_centered")),
            ("L0", "{:.1f}", held.get("l0")), ("never fired", "{:.1%}", held.get("dead_frac")),
            ("held-out tokens", "{:,}", held.get("n_tokens"))]
    table = "\n".join(f"| {k} | {f.format(v)} |" for k, f, v in rows if v is not None)
    table = table or "| (not evaluated at training time: run evaluate.py) | |"
    hub_id = "/" in (config.get("model_name") or "")  # the Hub wants a real repo id there
    base = f"\nbase_model: {config['model_name']}" if hub_id else ""
    return f"""---
library_name: saelens
tags:
- sparse-autoencoder
- llama-scope
- {cfg["architecture"]}{base}
---
# {place_name((layer, site))}-{sae.n_features / sae.d_model:g}x-k{sae.k}: a {cfg["architecture"]} \
sparse autoencoder

Trained with a Llama Scope implementation (He et al. 2024, arXiv 2410.20526).

| | |
|---|---|
| model | {config.get("model_name")} |
| layer, site | {layer}, {site}: `{hook_in}` -> `{hook_out}` |
| width | {sae.n_features:,} features ({sae.n_features / sae.d_model:g} x d_model {sae.d_model}) |
| K | {sae.k} (JumpReLU threshold {sae.threshold}) |
| training tokens | {f"{tokens:,}" if tokens else "unknown"} ({config.get("passes", 1)} pass(es)) |
| dataset | {config.get("dataset_path")}, context {config.get("context_size")} |

Held-out evaluation at training time:

| metric | value |
|---|---|
{table}

## Load it

With SAELens (weights already folded: no input normalization):

```python
from huggingface_hub import snapshot_download
from sae_lens import SAE
sae = SAE.load_from_disk(snapshot_download("<this repo>"))
```

With this project (`{OURS}` is the same SAE in its own format):

```bash
python evaluate.py {OURS}
```
"""


# ----------------------------------------------------------------------------- circuit-tracer

def export_circuit_tracer(transcoders, folder):
    """circuit-tracer's per-layer transcoder folder (model_kind transcoder_set): config.yaml and
    one layer_{i}.safetensors per layer with W_enc (F, D), W_dec (F, D), b_enc (F), b_dec (D),
    W_skip (D, D) for a skip transcoder, and activation_function.threshold (F,): JumpReLU,
    x * (x > theta) as ours. transcoders: {layer: (sae in JumpReLU inference form, config)};
    ours read the MLP's input with the norm's gain, circuit-tracer's `mlp.hook_in`."""
    layers = sorted(transcoders)
    for layer in layers:
        sae, config = transcoders[layer]
        if sae.threshold is None:
            raise ValueError(f"layer {layer}: circuit-tracer runs JumpReLU transcoders; this one "
                             f"has no threshold (post-process it)")
        if config.get("tc_input_before_gain"):
            raise ValueError(f"layer {layer}: a released transcoder reads x / rms(x); "
                             f"circuit-tracer's mlp.hook_in includes the norm's gain")
    os.makedirs(folder, exist_ok=True)
    for layer in layers:
        sae, _ = transcoders[layer]
        tensors = {"W_enc": sae.W_enc, "W_dec": sae.W_dec, "b_enc": sae.b_enc, "b_dec": sae.b_dec,
                   "activation_function.threshold": torch.full((sae.n_features,),
                                                               float(sae.threshold))}
        if sae.skip:
            tensors["W_skip"] = sae.W_skip
        atomic_save_file({k: v.detach().float().contiguous().cpu() for k, v in tensors.items()},
                         os.path.join(folder, f"layer_{layer}.safetensors"), {})
    config = transcoders[layers[0]][1]
    lines = ["model_kind: transcoder_set", f"model_name: {json.dumps(config['model_name'])}",
             "feature_input_hook: mlp.hook_in", "feature_output_hook: mlp.hook_out",
             f"scan: {json.dumps(os.path.basename(os.path.normpath(folder)))}"]
    with open(os.path.join(folder, "config.yaml"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return lines
