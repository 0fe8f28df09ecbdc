"""Activation files: pre-saved rows for --activations, and the activation cache (App. A.3).

- A file: `activations` (N, D) [+ `targets` (N, D) for a transcoder], served by `file_producer`
  in a new random order every epoch.
- The cache train.py --cache-activations writes: a folder of such files (shards of bounded size,
  per site) with a manifest.json, read lazily shard by shard, so a sweep over K or width, or an
  evaluation, runs from it with no LM.
Rows are model.in_out's layout; files are written aside and renamed (formats.atomic_save_file).
"""
import itertools
import json
import os

import torch
from safetensors import safe_open

import model
from buffer import FanOut
from data import take_rows
from formats import atomic_save_file, site_name
from tracking import progress

SHARD_BYTES = 256 * 2**20  # an activation cache's shard: at most this many bytes of fp32 rows


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


def file_producer(rows, chunk=4096, seed=0):
    """Pre-saved activation rows (N, C) as an endless producer, in a new random order every
    epoch."""
    g = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(len(rows), generator=g)
        for i in range(0, len(rows), chunk):
            yield rows[perm[i:i + chunk]]


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


def open_stream(path, sites, rank=0, world=1, dtype=torch.float32, seed=0, skip=0):
    """(FanOut of rows per site, D) for training from an --activations file (its rows in a new
    order every epoch) or cache folder (shard by shard, each rank every world-th row). skip:
    items a resumed run has used already."""
    if os.path.isdir(path):
        manifest = read_cache(path, sites)
        rows = ({key: r.to(dtype) for key, r in out.items()}
                for out in cache_rows(path, manifest, sites, rank, world))
        return FanOut(itertools.islice(rows, skip, None), sites, skip), manifest["d_model"]
    x, y = load_activations(path)
    if (y is not None) != (len(sites) == 1 and model.is_transcoder(sites[0][1])):
        raise ValueError(f"--activations {path}: a file with `targets` trains one TC site, a "
                         f"file without trains R, A or M (got --site "
                         f"{','.join(dict.fromkeys(site for _, site in sites))})")
    rows = file_producer(model.to_rows(x, y)[rank::world].to(dtype), seed=seed)
    return FanOut(({sites[0]: r} for r in itertools.islice(rows, skip, None)), sites,
                  skip), x.shape[1]


def source(path, model_name, dataset, context_size):
    """Where a run's rows came from (model, dataset, context_size), for its checkpoints: an
    activation cache's manifest knows; a single file does not know its model; else the flags."""
    if path and os.path.isdir(path):
        return read_cache(path)
    return dict(model=None if path else model_name, dataset=dataset, context_size=context_size)
