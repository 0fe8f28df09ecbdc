"""Activation files: pre-saved rows for --activations, and the activation cache (App. A.3).

- A file: `activations` (N, D) [+ `targets` (N, D) for a transcoder], served by `file_producer`
  in a new random order every epoch.
- The cache train.py --cache-activations writes (`CacheWriter`): a folder of such files (shards
  of bounded size, per place) with a manifest.json, read lazily shard by shard, so a sweep over K
  or width, or an evaluation, runs from it with no LM.
Rows are model.in_out's layout; files are written aside and renamed (formats.atomic_save_file).
"""
import itertools
import json
import os
import time

import torch
from safetensors import safe_open

import data
import model
from buffer import FanOut
from formats import atomic_save_file, place_name

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


class CacheWriter:
    """Rows of every place, as they come from the LM, written as shards of at most SHARD_BYTES
    of fp32 per place: L15R-00000.safetensors, ... The places' rows come from the same tokens,
    so every place holds the same count."""

    def __init__(self, folder, places, d_model):
        self.folder = folder
        self.places = places
        self.d_model = d_model
        self.rows_per_shard = max(1, SHARD_BYTES // (2 * d_model * 4))  # a TC row is 2D wide
        self.pending = {place: [] for place in places}  # rows not written yet
        self.held = 0  # rows pending per place
        self.shards = []  # names of the shards written

    def add(self, rows):
        """One LM batch {place: (n, C)}."""
        for place in self.places:
            self.pending[place].append(rows[place].cpu())
        self.held += len(rows[self.places[0]])

    def write_shard(self, n):
        """The first n pending rows of every place, as one file each."""
        self.shards.append(f"{len(self.shards):05d}")
        for place in self.places:
            rows = torch.cat(self.pending[place])
            x_in, x_out = model.in_out(rows[:n], self.d_model)
            tensors = {"activations": x_in.contiguous()}
            if model.is_transcoder(place[1]):
                tensors["targets"] = x_out.contiguous()
            name = f"{place_name(place)}-{self.shards[-1]}.safetensors"
            atomic_save_file(tensors, os.path.join(self.folder, name), {})
            self.pending[place] = [rows[n:]]
        self.held -= n


def write_cache(folder, producer, places, n_rows, d_model, about):
    """Write n_rows rows of every place from producer ({(layer, site): (n, C)} per LM batch),
    then manifest.json (about: where the rows came from): a folder without it is an
    unfinished cache."""
    if is_cache(folder):
        raise ValueError(f"--cache-activations {folder} already holds a cache; give a new folder")
    os.makedirs(folder, exist_ok=True)
    writer = CacheWriter(folder, places, d_model)
    written = 0
    bar = data.progress(n_rows, "cache")
    for rows in producer:
        writer.add(rows)
        # a whole shard, or the last rows the cache needs
        while written < n_rows and (writer.held >= writer.rows_per_shard
                                    or written + writer.held >= n_rows):
            n = min(writer.held, writer.rows_per_shard, n_rows - written)
            writer.write_shard(n)
            written += n
            bar.update(n)
        if written >= n_rows:
            break
    if writer.held and written < n_rows:  # the producer ran dry first
        n = min(writer.held, n_rows - written)
        writer.write_shard(n)
        written += n
        bar.update(n)
    bar.close()
    manifest = dict(about, d_model=d_model, rows=written, shards=writer.shards,
                    sites={place_name(place): site_entry(place) for place in places})
    with open(os.path.join(folder, "manifest.json.tmp"), "w") as f:
        json.dump(manifest, f, indent=2)
    os.replace(os.path.join(folder, "manifest.json.tmp"), os.path.join(folder, "manifest.json"))
    return manifest


def site_entry(place):
    """What the manifest says of a place: its layer, site and TransformerLens hook names."""
    hook_in, hook_out = model.hook_names(*place)
    return dict(layer=place[0], site=place[1], hook_point_in=hook_in, hook_point_out=hook_out)


def read_cache(folder, places=None):
    """The manifest of a cache folder, after checking that it holds the places asked for."""
    try:
        with open(os.path.join(folder, "manifest.json")) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"--activations {folder}: not an activation cache (no readable "
                         f"manifest.json: {type(e).__name__})") from None
    names = [place_name(place) for place in places or []]
    missing = [name for name in names if name not in manifest["sites"]]
    if missing:
        raise ValueError(f"--activations {folder} holds {', '.join(manifest['sites'])}, not "
                         f"{', '.join(missing)}: give --layer and --site of a cached site")
    return manifest


def cache_rows(folder, manifest, places, shard_of=(0, 1), epochs=None):
    """{(layer, site): (n, C)} per shard, in the order the LM made them, epoch after epoch (the
    buffer shuffles). Each shard is opened (memory-mapped) only when its turn comes, and of it
    rank r of `world` ranks (shard_of = (r, world)) reads every world-th row."""
    rank, world = shard_of
    for _ in itertools.count() if epochs is None else range(epochs):
        for shard in manifest["shards"]:
            out = {}
            for place in places:
                path = os.path.join(folder, f"{place_name(place)}-{shard}.safetensors")
                with safe_open(path, "pt") as f:
                    y = f.get_tensor("targets") if "targets" in f.keys() else None
                    out[place] = model.to_rows(f.get_tensor("activations"), y)[rank::world]
            yield out


def activation_rows(path, place, n):
    """The first n rows (N, C) of an --activations file, or of a place in a cache folder."""
    if os.path.isdir(path):
        manifest = read_cache(path, [place])
        rows = (out[place] for out in cache_rows(path, manifest, [place], epochs=1))
        return data.take_rows(rows, n)[:n]
    return model.to_rows(*load_activations(path))[:n]


def open_stream(path, places, comms, dtype=torch.float32, seed=0, skip=0):
    """(FanOut of rows per place, D) for training from an --activations file (its rows in a new
    order every epoch) or cache folder (shard by shard, each rank every world-th row). skip:
    items a resumed run has used already."""
    if os.path.isdir(path):
        manifest = read_cache(path, places)
        shards = cache_rows(path, manifest, places, (comms.rank, comms.world))
        rows = ({place: r.to(dtype) for place, r in out.items()} for out in shards)
        return FanOut(itertools.islice(rows, skip, None), places, skip), manifest["d_model"]
    x, y = load_activations(path)
    one_tc = len(places) == 1 and model.is_transcoder(places[0][1])
    if (y is not None) != one_tc:
        sites = ",".join(dict.fromkeys(site for _, site in places))
        raise ValueError(f"--activations {path}: a file with `targets` trains one TC site, a "
                         f"file without trains R, A or M (got --site {sites})")
    rows = file_producer(model.to_rows(x, y)[comms.rank::comms.world].to(dtype), seed=seed)
    items = ({places[0]: r} for r in itertools.islice(rows, skip, None))
    return FanOut(items, places, skip), x.shape[1]


def source(path, model_name, dataset, context_size):
    """Where a run's rows came from (model, dataset, context_size), for its checkpoints: an
    activation cache's manifest knows; a single file does not know its model; else the flags."""
    if path and os.path.isdir(path):
        return read_cache(path)
    return dict(model=None if path else model_name, dataset=dataset, context_size=context_size)


def cache_from_lm(args, producer, places, d_model):
    """train.py --cache-activations: write --total-tokens rows of every place from the LM's
    producer, then train, sweep K or width, and evaluate from the folder with no LM
    (--activations DIR). Returns [the folder]."""
    t0 = time.time()
    about = dict(model=args.model, dataset=args.dataset, split="train", seed=args.seed,
                 context_size=args.context_size, dtype=args.dtype)
    manifest = write_cache(args.cache_activations, producer, places, args.total_tokens, d_model,
                           about)
    print(f"cached {manifest['rows']:,} rows of {', '.join(manifest['sites'])} in "
          f"{len(manifest['shards'])} shard(s) in {time.time() - t0:.0f}s")
    print(f"saved {args.cache_activations}")
    return [args.cache_activations]
