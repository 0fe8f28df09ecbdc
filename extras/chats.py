"""§4.5.2: the same SAE evaluated on an instruct model's chats: `evaluate.py CKPT --chat DATA`.

- `iter_chats`: conversations, each a list of {role, content}: the embedded held-out summaries
  as chats (`wiki_chats`), or every row of a file or Hub dataset with a `messages` or
  `conversation` column.
- `chat_batches`: conversations rendered by the instruct model's chat template, then the chain
  documents take (data.token_batches): truncated, length-sorted, padded. The template's special
  tokens are never scored (data.scored_positions).
- `chat_tokenizer`: which tokenizer renders them (the instruct model's), so two models read the
  same token ids.
"""
import data
import model

EMBEDDED_CHAT = "wiki-chat"  # the held-out summaries as chats: a question, the summary as answer
QUESTIONS = ("Tell me about {}.", "What do you know about {}?", "Give me a short overview of {}.",
             "Could you explain {} briefly?", "I'm curious about {}. What should I know?")


def wiki_chats():
    """The embedded held-out summaries (the documents the SAE never trained on) as chats: a
    question about the article (phrasing cycled over QUESTIONS) answered by its summary, then,
    where the article has a one-line description, a request to sum it up answered by that."""
    for n, (_, article) in enumerate(data.heldout_articles()):
        if not article["extract"].strip():
            continue
        ask = QUESTIONS[n % len(QUESTIONS)].format(article["title"])
        chat = [{"role": "user", "content": ask},
                {"role": "assistant", "content": article["extract"]}]
        if article.get("description"):
            chat += [{"role": "user", "content": "Sum that up in a few words."},
                     {"role": "assistant", "content": article["description"]}]
        yield chat


def iter_chats(chats=EMBEDDED_CHAT):
    """Conversations, each a list of {role, content}: the embedded wiki-chat, or every row of a
    local .jsonl/.json/.parquet file or a Hub dataset (streamed; the SAE trained on neither)
    with a `messages` column or, as WildChat has, a `conversation` column (other keys dropped)."""
    if chats == EMBEDDED_CHAT:
        yield from wiki_chats()
        return
    data.check_dataset(chats, "--chat", EMBEDDED_CHAT)
    for row in data.mixed(data.dataset_rows(chats, "--chat"), data.SHUFFLE_DOCS):
        turns = row.get("messages", row.get("conversation"))
        if turns is None:
            raise ValueError(f"--chat {chats}: a row has neither a `messages` nor a "
                             f"`conversation` column (a list of role/content turns); its "
                             f"columns: {', '.join(row) or 'none'}")
        yield [{"role": turn["role"], "content": turn["content"]} for turn in turns]


def encode_chats(tok, chats):
    """Token id lists of conversations rendered by the tokenizer's chat template; the template
    places its own special tokens, so no BOS is added here."""
    rendered = tok.apply_chat_template(chats, tokenize=True, return_dict=False)
    return [list(ids) for ids in rendered]


def chat_batches(tok, chats, context_size, lm_batch_size):
    """Conversations (`iter_chats`) -> token batches through the chain documents take: rendered
    by tok's chat template, truncated to context_size, length-sorted, padded."""
    if not getattr(tok, "chat_template", None):
        raise ValueError(f"{tok.name_or_path} has no chat template to render --chat {chats}")

    def encode(items):
        return encode_chats(tok, items)
    return data.token_batches(tok, iter_chats(chats), context_size, lm_batch_size, encode)


def chat_tokenizer(names, chats):
    """(name, tokenizer) of the first of names (--eval-model, then the checkpoint's LM) whose
    tokenizer has a chat template: the instruct model renders every conversation, so both
    columns of --eval-model read the same token ids. Checks the data's first row."""
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
