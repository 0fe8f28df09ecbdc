"""Every file the project reads or writes, and nothing else: one place per on-disk format.

- Our checkpoint: one .safetensors file, the released Llama Scope tensor names and layouts
  (`decoder.weight` is (D, F)) plus a JSON `config` in the released hyperparams.json names
  (`d_sae`, `top_k`, `act_fn` "relu" for Vanilla, ...). Those names live only in this file; the
  code calls them n_features, k and "vanilla".
- The resumable state of a run (train.py --save-every): any nested state_dict() as one file.
- Released Llama Scope SAEs (a folder, or a Hub reference to one) and SAELens's on-disk format.
- Activation files for --activations: `activations` (N, D) [+ `targets` (N, D)], and the
  activation cache train.py --cache-activations writes: a folder of such files (shards of bounded
  size, per site) with a manifest.json, read lazily shard by shard.
Only safetensors and JSON are read: no file can execute code. Every write goes aside, is
fsynced, then renamed, so a reader or a kill -9 never sees a half-written file. Bad files raise
ValueError with a one-line message (the scripts print it and exit with code 2).
"""
import glob
import itertools
import json
import math
import os
import re

import huggingface_hub
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import model
from buffer import progress, take_rows
from sae import SAE

ACT_FN = {"topk": "topk", "vanilla": "relu", "jumprelu": "jumprelu"}  # ours -> Llama Scope's
RELEASED_FILES = ("hyperparams.json", "lm_config.json", "checkpoints/final.safetensors")
SHARD_BYTES = 256 * 2**20  # an activation cache's shard: at most this many bytes of fp32 rows


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
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    hook_in, hook_out = model.hook_names(config["layer"], config["site"])
    config = dict(config, hook_point_in=hook_in, hook_point_out=hook_out, d_model=sae.d_model,
                  d_sae=sae.n_features, expansion_factor=sae.n_features / sae.d_model,
                  top_k=sae.k, act_fn=ACT_FN[sae.act], jump_relu_threshold=sae.threshold,
                  sparsity_include_decoder_norm=sae.rank_by_decoder_norm)
    if not config.get("folded"):  # a folded SAE keeps the norms it was trained with, for reference
        config["dataset_average_activation_norm"] = {"in": sae.norm_in.item(),
                                                     "out": sae.norm_out.item()}
    atomic_save_file(tensors, path, {"config": json.dumps(config)})


def training_config(args, key, sae, anneal_steps, limit, tokens, step, heldout, train_args):
    """What train.py's checkpoints say beyond the SAE itself, in the released hyperparams.json
    names: where it reads, how it was trained, the held-out check; `device` (type) and `dtype`:
    where and in what precision it trained, which evaluate.py and postprocess.py default to."""
    layer, site = key
    source = dict(model=None if args.activations else args.model, dataset=args.dataset,
                  context_size=args.context_size)
    if args.activations and os.path.isdir(args.activations):  # a cache knows where it came from
        source = read_cache(args.activations)
    return dict(model_name=source["model"], layer=layer, site=site,
                k_warmup_steps=anneal_steps, init_decoder_norm=sae.init_decoder_norm,
                use_batch_norm_mse=args.loss == "batch-norm-mse", norm_activation="dataset-wise",
                apply_decoder_bias_to_pre_encoder=False, use_decoder_bias=True, lr=args.lr,
                l1_coefficient=args.l1_coef, context_size=source["context_size"],
                dataset_path=source["dataset"], prepend_bos=True, outlier_norm_limit=limit,
                n_training_tokens=tokens // args.passes, passes=args.passes, n_rows_served=tokens,
                step=step, folded=False, heldout=heldout, train_args=train_args,
                device=torch.device(args.device).type, dtype=args.dtype)


def read_checkpoint(path):
    """(config, tensors) of one of our checkpoints, validated before use."""
    if not os.path.isfile(path):
        now = renamed(path)
        raise ValueError(f"checkpoint {path}: no such file" + (
            f"; checkpoints are named with K (or the L1 weight) now: {', '.join(now)}"
            if now else ""))
    try:
        with safe_open(path, "pt") as f:
            meta, t = f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # truncated, not safetensors at all, unreadable
        raise ValueError(f"checkpoint {path}: not a readable safetensors file "
                         f"({type(e).__name__}: {e})") from None
    try:
        config = json.loads(meta["config"])
        D, F, norms = config["d_model"], config["d_sae"], config["dataset_average_activation_norm"]
        ok = (isinstance(D, int) and isinstance(F, int) and D > 0 and F > 0
              and config["act_fn"] in ACT_FN.values() and isinstance(config["top_k"], int)
              and config["site"] in model.SITES and isinstance(config["layer"], int)
              and all(isinstance(norms[k], (int, float)) and norms[k] > 0 for k in ("in", "out")))
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"checkpoint {path}: not a Llama Scope checkpoint of this project "
                         f"(metadata `config` missing or incomplete: {type(e).__name__} {e})") \
            from None
    shapes = {k: tuple(v.shape) for k, v in t.items()}
    if not ok or any(shapes.get(k) != v for k, v in released_shapes(D, F).items()):
        raise ValueError(f"checkpoint {path}: tensors {shapes} or config do not match d_model "
                         f"{D}, d_sae {F}")
    return config, t


def renamed(path):
    """The files an old-style name (L15R-8x-TopK.safetensors, before K was in the name) stands
    for now: L15R-8x-k50-TopK.safetensors, L15R-8x-k32-TopK.safetensors, ..."""
    old = re.fullmatch(r"(.*L\d+(?:R|A|M|TC)-[\d.]+x)-(TopK|Vanilla)(-JumpReLU)?\.safetensors",
                       path)
    if not old:
        return []
    return sorted(glob.glob(f"{glob.escape(old[1])}-*-{old[2]}{old[3] or ''}.safetensors"))


def load_checkpoint(path, device="cpu"):
    """(sae, config) from a file written by save_checkpoint. A folded file (postprocess.py) maps
    raw activations to raw targets: its normalization scales are 1."""
    config, t = read_checkpoint(path)
    act = {v: k for k, v in ACT_FN.items()}[config["act_fn"]]
    sae = SAE(config["d_model"], config["d_sae"], act=act, k=config["top_k"],
              transcoder=model.is_transcoder(config["site"]),
              threshold=config.get("jump_relu_threshold"),
              rank_by_decoder_norm=config["sparsity_include_decoder_norm"])
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
    sae.norm_in.fill_(norms["in"])
    sae.norm_out.fill_(norms["out"])


# ----------------------------------------------------------------------------- resumable state

def save_state(path, state):
    """A nested state (dicts and lists of tensors and JSON values, e.g. state_dict()s) as one
    file: each tensor under its dotted path, the rest as JSON with {"tensor": path} in its place."""
    tensors = {}

    def split(x, at):
        if isinstance(x, torch.Tensor):
            tensors[at] = x.detach().contiguous().cpu()
            return {"tensor": at}
        if isinstance(x, dict):
            return {str(k): split(v, f"{at}.{k}") for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [split(v, f"{at}.{i}") for i, v in enumerate(x)]
        return x
    atomic_save_file(tensors, path, {"state": json.dumps(split(state, "state"))})


def load_state(path):
    """The state save_state wrote (dict keys come back as strings)."""
    try:
        with safe_open(path, "pt") as f:
            tree, tensors = json.loads(f.metadata()["state"]), {k: f.get_tensor(k)
                                                                 for k in f.keys()}
    except Exception as e:
        raise ValueError(f"--resume {path}: not a resumable checkpoint "
                         f"({type(e).__name__}: {e})") from None

    def join(x):
        if isinstance(x, dict):
            return tensors[x["tensor"]] if set(x) == {"tensor"} else \
                {k: join(v) for k, v in x.items()}
        return [join(v) for v in x] if isinstance(x, list) else x
    return join(tree)


# ----------------------------------------------------------------------------- released SAEs

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
        root = huggingface_hub.snapshot_download(
            repo, allow_patterns=[f"{sub}/{name}" for name in RELEASED_FILES])
    except Exception as e:  # offline, no such repo, gated without a token
        raise ValueError(f"{ref}: download from the Hugging Face Hub failed "
                         f"({type(e).__name__}: {' '.join(str(e).split())[:300]})") from None
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
    the folded form: postprocess.load_sae). The site comes from the TransformerLens hook names,
    the LM from lm_config.json."""
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
        raise ValueError(f"{ref}: hyperparams.json lacks a usable {e}") from None
    unsupported = {"act_fn": act not in ("jumprelu", "topk"),
                   "dataset_average_activation_norm": not scale_ok,
                   "norm_activation": hp.get("norm_activation", "dataset-wise") != "dataset-wise",
                   "apply_decoder_bias_to_pre_encoder":
                       hp.get("apply_decoder_bias_to_pre_encoder")}
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise ValueError(f"{ref}: hyperparams.json {bad[0]} = {hp.get(bad[0])!r} is not "
                         f"supported")
    layer, site = model.site_of(*hooks)
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
    sae = SAE(D, F, k=hp.get("top_k", 50), transcoder=model.is_transcoder(site), threshold=theta,
              rank_by_decoder_norm=hp.get("sparsity_include_decoder_norm", True))
    load_tensors_(sae, t, norms)
    config = dict(model_name=lm.get("model_name"), layer=layer, site=site,
                  dataset_average_activation_norm=norms,
                  context_size=hp.get("context_size", 1024),
                  dataset_path=hp.get("dataset_path", model.EMBEDDED_DATASET),
                  outlier_norm_limit=None, released_from=ref,
                  tc_input_before_gain=model.is_transcoder(site))  # see model.site_of
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
    input includes is folded into the encoder: W_enc[:, j] * gain_j (model.site_of)."""
    assert config.get("folded")
    tc = model.is_transcoder(config["site"])
    architecture = "standard" if sae.act == "vanilla" else architecture
    if architecture == "jumprelu" and sae.threshold is None:
        raise ValueError("--architecture jumprelu needs a JumpReLU threshold; use "
                         "--architecture topk")
    w_enc = sae.W_enc * gain if tc else sae.W_enc  # (F, D)
    tensors = {"W_enc": w_enc.T, "b_enc": sae.b_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec}
    if architecture == "jumprelu":
        tensors["threshold"] = torch.full((sae.n_features,), float(sae.threshold))
    if tc and architecture != "topk":
        architecture = {"jumprelu": "jumprelu_transcoder", "standard": "transcoder"}[architecture]
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


OURS = "llama_scope.safetensors"  # our single-file checkpoint inside an export folder


def model_card(sae, config, cfg):
    """README.md of an export folder, as the Hugging Face Hub shows it: front matter with
    library_name and tags, what was trained, the held-out numbers, how to load it."""
    layer, site, tokens = config["layer"], config["site"], config.get("n_training_tokens")
    hook_in, hook_out = model.hook_names(layer, site)
    held = config.get("heldout") or {}
    rows = [("explained variance (eq. 6)", "{:.3f}", held.get("explained_variance")),
            ("explained variance, centred", "{:.3f}", held.get("explained_variance_centered")),
            ("L0", "{:.1f}", held.get("l0")), ("never fired", "{:.1%}", held.get("dead_frac")),
            ("held-out tokens", "{:,}", held.get("n_tokens"))]
    table = "\n".join(f"| {k} | {f.format(v)} |" for k, f, v in rows if v is not None) or \
        "| (not evaluated at training time: run evaluate.py) | |"
    hub_id = "/" in (config.get("model_name") or "")  # the Hub wants a real repo id there
    base = f"\nbase_model: {config['model_name']}" if hub_id else ""
    return f"""---
library_name: saelens
tags:
- sparse-autoencoder
- llama-scope
- {cfg["architecture"]}{base}
---
# {site_name((layer, site))}-{sae.n_features / sae.d_model:g}x-k{sae.k}: a {cfg["architecture"]} \
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


# ----------------------------------------------------------------------------- activation files

def load_activations(path):
    """(x, target) from a safetensors file with `activations` (N, D) and optional
    `targets` (N, D)."""
    if not os.path.isfile(path):
        raise ValueError(f"--activations {path}: no such file")
    try:
        with safe_open(path, "pt") as f:
            keys = set(f.keys())
            x = f.get_tensor("activations") if "activations" in keys else None
            y = f.get_tensor("targets") if "targets" in keys else None
    except Exception as e:
        raise ValueError(f"--activations {path}: not a readable safetensors file "
                         f"({type(e).__name__})") from None
    if x is None:
        raise ValueError(f"--activations {path}: no tensor named `activations` (found: "
                         f"{sorted(keys)})")
    if x.ndim != 2 or len(x) == 0 or (y is not None and y.shape != x.shape):
        raise ValueError(f"--activations {path}: need `activations` (N, D) with N > 0 and "
                         f"`targets` of the same shape, got {tuple(x.shape)} and "
                         f"{None if y is None else tuple(y.shape)}")
    return x, y


def site_name(key):
    """(15, "R") -> "L15R", as in checkpoint and cache file names."""
    return f"L{key[0]}{key[1]}"


def is_cache(folder):
    return os.path.isfile(os.path.join(folder, "manifest.json"))


def write_cache(folder, producer, sites, n_rows, d_model, about):
    """Write n_rows rows of every site from producer ({(layer, site): (n, C)} per LM batch; the
    sites' rows come from the same tokens, so the same count) as shards of at most SHARD_BYTES
    of fp32 per site, then manifest.json: a folder without it is an unfinished cache."""
    if is_cache(folder):
        raise ValueError(f"--cache-activations {folder} already holds a cache; give a new folder")
    os.makedirs(folder, exist_ok=True)
    per_shard = max(1, SHARD_BYTES // (2 * d_model * 4))  # rows; a transcoder row is 2D wide
    pending, shards, bar = {key: [] for key in sites}, [], progress(n_rows, "cache")
    held = written = 0

    def shard(n):  # the first n pending rows of every site, as one file each
        shards.append(f"{len(shards):05d}")
        for key in sites:
            rows = torch.cat(pending[key])
            x_in, x_out = model.in_out(rows[:n], d_model)
            t = {"activations": x_in} if not model.is_transcoder(key[1]) else \
                {"activations": x_in, "targets": x_out}
            atomic_save_file({k: v.contiguous() for k, v in t.items()},
                             os.path.join(folder, f"{site_name(key)}-{shards[-1]}.safetensors"),
                             {})
            pending[key] = [rows[n:]]
        bar.update(n)

    for out in producer:
        for key in sites:
            pending[key].append(out[key].cpu())
        held += len(out[sites[0]])
        while written < n_rows and (held >= per_shard or written + held >= n_rows):
            n = min(held, per_shard, n_rows - written)
            shard(n)
            written, held = written + n, held - n
        if written >= n_rows:
            break
    if held and written < n_rows:  # the producer ran dry first
        shard(min(held, n_rows - written))
        written += min(held, n_rows - written)
    bar.close()
    manifest = dict(about, d_model=d_model, rows=written, shards=shards, sites={
        site_name(key): dict(layer=key[0], site=key[1], hook_point_in=model.hook_names(*key)[0],
                             hook_point_out=model.hook_names(*key)[1]) for key in sites})
    with open(os.path.join(folder, "manifest.json.tmp"), "w") as f:
        json.dump(manifest, f, indent=2)
    os.replace(os.path.join(folder, "manifest.json.tmp"), os.path.join(folder, "manifest.json"))
    return manifest


def read_cache(folder, sites=None):
    """The manifest of a cache folder, after checking that it holds the sites asked for."""
    try:
        with open(os.path.join(folder, "manifest.json")) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"--activations {folder}: not an activation cache (no readable "
                         f"manifest.json: {type(e).__name__})") from None
    missing = [site_name(key) for key in sites or [] if site_name(key) not in manifest["sites"]]
    if missing:
        raise ValueError(f"--activations {folder} holds {', '.join(manifest['sites'])}, not "
                         f"{', '.join(missing)}: give --layer and --site of a cached site")
    return manifest


def cache_rows(folder, manifest, sites, rank=0, world=1, epochs=None):
    """{(layer, site): (n, C)} per shard, in the order the LM made them, epoch after epoch (the
    buffer shuffles). Each shard is opened (memory-mapped) only when its turn comes, and of it
    each of `world` ranks reads every world-th row."""
    for _ in itertools.count() if epochs is None else range(epochs):
        for shard in manifest["shards"]:
            out = {}
            for key in sites:
                with safe_open(os.path.join(folder, f"{site_name(key)}-{shard}.safetensors"),
                               "pt") as f:
                    y = f.get_tensor("targets") if "targets" in f.keys() else None
                    out[key] = model.to_rows(f.get_tensor("activations"), y)[rank::world]
            yield out


def activation_rows(path, key, n):
    """The first n rows (N, C) of an --activations file, or of site key in a cache folder."""
    if os.path.isdir(path):
        manifest = read_cache(path, [key])
        return take_rows((r[key] for r in cache_rows(path, manifest, [key], epochs=1)), n)[:n]
    return model.to_rows(*load_activations(path))[:n]
