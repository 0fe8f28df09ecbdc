"""The replacement model of a prompt: the LM with each MLP replaced by its transcoder.

- `clean_forward`: one prompt through the LM, step by step as transformers' Llama computes it,
  keeping what the local replacement model freezes (`Frozen`): per layer the RMSNorm scales
  1 / rms(x) before attention and before the MLP, the attention patterns, and the MLP's true input
  and output; and the final norm's scale.
- `linear_forward`: the local replacement model. With those scales and patterns frozen and each
  MLP's output given (a transcoder's feature outputs, its bias and an error node: the true output
  minus the reconstruction), the residual stream is a LINEAR function of what the nodes write into
  it: through attention's OV path, the skip transcoders' W_skip and the frozen norms. This is
  what makes attribution graphs exact (extras/attribution.py).
- `replacement_metrics`: the global replacement model (every MLP replaced by its transcoder at
  once, no error term, attention live) against the real LM: CE, KL and top-1 agreement.
Shapes: B batch, T tokens, D model width, H heads, V vocabulary, L layers.
"""
import contextlib
import dataclasses

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

import data
import inference
import metrics
import model
from extras import scope


@dataclasses.dataclass
class Frozen:
    """What the clean forward of one prompt fixes for the local replacement model."""
    tokens: torch.Tensor  # (T,)
    embeds: torch.Tensor  # (T, D) the token embeddings
    attn_scales: list  # per layer (T, 1): 1 / rms of the residual entering attention
    mlp_scales: list  # per layer (T, 1): 1 / rms of the residual entering the MLP
    patterns: list  # per layer (H, T, T): attention probabilities
    mlp_in: list  # per layer (T, D): the MLP's input (the transcoder's), gain applied
    mlp_out: list  # per layer (T, D): the MLP's true output
    final_scale: torch.Tensor  # (T, 1) 1 / rms of the last residual stream
    logits: torch.Tensor  # (T, V) of the clean forward


def inverse_rms(x, eps):
    """(..., T, 1) 1 / rms(x) as transformers' RMSNorm computes it: in float32 (in float64 for a
    float64 model)."""
    x = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    return torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def normed(norm, x, scale):
    """An RMSNorm's output with its scale given (frozen or just computed): gain * x * scale, in
    the scale's precision (float32 as transformers, float64 for a float64 model or stream)."""
    dtype = torch.promote_types(x.dtype, scale.dtype)
    return norm.weight.to(dtype) * (x.to(dtype) * scale.to(dtype)).to(x.dtype)


def attention_pattern(attn, h, position_embeddings):
    """(1, H, T, T) the causal attention probabilities of one block's attention on its normed
    input h (1, T, D), softmax in float32 as transformers' eager attention."""
    T = h.shape[1]
    q = attn.q_proj(h).view(1, T, -1, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(h).view(1, T, -1, attn.head_dim).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, *position_embeddings)
    k = repeat_kv(k, attn.num_key_value_groups)
    scores = (q @ k.transpose(-1, -2)) * attn.scaling  # (1, H, T, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=h.device).triu(1)
    scores = scores.masked_fill(causal, float("-inf"))
    dtype = torch.float64 if scores.dtype == torch.float64 else torch.float32
    return F.softmax(scores.to(dtype), dim=-1).to(q.dtype)


def attend(attn, h, pattern):
    """(B, T, D) attention's output from its normed input h (B, T, D) with the pattern given:
    linear in h (the OV path)."""
    B, T, _ = h.shape
    v = linear(attn.v_proj, h).view(B, T, -1, attn.head_dim).transpose(1, 2)
    v = repeat_kv(v, attn.num_key_value_groups)  # (B, H, T, hd)
    out = (pattern.to(v.dtype) @ v).transpose(1, 2).reshape(B, T, -1)
    return linear(attn.o_proj, out)


def linear(layer, x):
    """An nn.Linear in x's precision (the local replacement model may run in float64)."""
    bias = None if layer.bias is None else layer.bias.to(x.dtype)
    return F.linear(x, layer.weight.to(x.dtype), bias)


@torch.no_grad()
def clean_forward(lm, tokens):
    """Frozen of one prompt tokens (T,): the LM's forward step by step, each block as
    transformers' Llama computes it (its logits equal lm's own)."""
    inner = lm.model
    ids = tokens[None].to(lm.device)
    x = inner.embed_tokens(ids)  # (1, T, D)
    embeds = x[0].clone()
    positions = torch.arange(len(tokens), device=lm.device)[None]
    position_embeddings = inner.rotary_emb(x, positions)
    frozen = Frozen(tokens, embeds, [], [], [], [], [], None, None)
    for block in inner.layers:
        # attention, its input norm's scale and its pattern kept
        scale = inverse_rms(x, block.input_layernorm.variance_epsilon)
        h = normed(block.input_layernorm, x, scale)
        pattern = attention_pattern(block.self_attn, h, position_embeddings)
        mid = x + attend(block.self_attn, h, pattern)
        # the MLP, its input norm's scale and its true input and output kept
        mlp_scale = inverse_rms(mid, block.post_attention_layernorm.variance_epsilon)
        mlp_in = normed(block.post_attention_layernorm, mid, mlp_scale)
        mlp_out = block.mlp(mlp_in)
        x = mid + mlp_out
        frozen.attn_scales.append(scale[0])
        frozen.patterns.append(pattern[0])
        frozen.mlp_scales.append(mlp_scale[0])
        frozen.mlp_in.append(mlp_in[0])
        frozen.mlp_out.append(mlp_out[0])
    frozen.final_scale = inverse_rms(x, inner.norm.variance_epsilon)[0]
    frozen.logits = lm.lm_head(normed(inner.norm, x, frozen.final_scale))[0]
    return frozen


def linear_forward(lm, frozen, writes, skips):
    """The local replacement model: (per layer the MLP's input (B, T, D), the normed last
    residual stream (B, T, D)) from what the nodes write into the residual stream: writes
    {"embed": (B, T, D), layer: (B, T, D) the MLP's replacement output}. skips: per layer the
    skip transcoder's W_skip (D, D) in raw space, or None. Linear in the writes: the norms'
    scales and the attention patterns are the clean forward's."""
    x = writes["embed"]
    mlp_ins = []
    for layer, block in enumerate(lm.model.layers):
        h = normed(block.input_layernorm, x, frozen.attn_scales[layer])
        mid = x + attend(block.self_attn, h, frozen.patterns[layer])
        mlp_in = normed(block.post_attention_layernorm, mid, frozen.mlp_scales[layer])
        mlp_ins.append(mlp_in)
        x = mid + writes[layer]
        if skips[layer] is not None:  # a skip transcoder's linear path: no node of its own
            x = x + F.linear(mlp_in, skips[layer].to(mlp_in.dtype))
    return mlp_ins, normed(lm.model.norm, x, frozen.final_scale)


def load_transcoders(folder, device=None, dtype=None):
    """({layer: (transcoder in inference form, its config)}, a config, (device, dtype, note)) of
    a folder holding exactly one TC checkpoint per layer of one LM, refused in one line before
    any weight of the LM loads."""
    saes, placed = scope.load(folder, None, device, dtype)
    by_layer = {}
    names = {}
    for name, (sae, config) in saes.items():
        if config["site"] != "TC":
            continue
        if config["layer"] in by_layer:
            raise ValueError(f"{folder}: two transcoders for layer {config['layer']} "
                             f"({names[config['layer']]}, {name}); keep one per layer")
        by_layer[config["layer"]] = (sae, config)
        names[config["layer"]] = name
    if not by_layer:
        raise ValueError(f"{folder}: no transcoder (site TC) in it")
    sae, config = by_layer[min(by_layer)]
    lm_cfg = inference.check_lm(config["model_name"], sae, config)
    missing = [layer for layer in range(lm_cfg["num_hidden_layers"]) if layer not in by_layer]
    if missing:
        raise ValueError(f"{folder}: no transcoder for layer(s) {missing[:5]} of "
                         f"{config['model_name']} ({lm_cfg['num_hidden_layers']} layers); "
                         f"the replacement model needs one at every layer")
    return dict(sorted(by_layer.items())), config, placed


# ----------------------------------------------------------------------------- the global model

@contextlib.contextmanager
def all_spliced(lm, transcoders, keep):
    """Within it, every layer's MLP output is its transcoder's reconstruction (of the MLP input
    the replaced layers before it produce) at the positions keep (B, T)."""
    with contextlib.ExitStack() as stack:
        for layer, sae in transcoders.items():
            spliced, _ = metrics.patches(sae, keep)
            stack.enter_context(model.splice(lm, layer, "TC", spliced))
        yield


@torch.no_grad()
def replacement_metrics(lm, tok, transcoders, batches, n_tokens):
    """The global replacement model, every MLP replaced by its transcoder {layer: sae in
    inference form} at once, no error term, against the real LM on n_tokens scored predictions
    of the batches: CE of each, KL(real || replacement), the share of positions whose top-1
    token agrees."""
    sums = {"ce_loss": 0.0, "ce_loss_replacement": 0.0, "kl_div": 0.0, "top1_agreement": 0.0}
    n = 0
    bar = data.progress(n_tokens, "replacement model")
    for input_ids, mask in batches:
        input_ids = input_ids.to(lm.device)
        mask = mask.to(lm.device)
        keep = data.scored_positions(input_ids, mask, tok)
        ok = keep[:, :-1] & mask[:, 1:].bool()  # predictions scored
        target = input_ids[:, 1:]
        logits = lm(input_ids=input_ids, attention_mask=mask, use_cache=False).logits[:, :-1]
        ce, p, h = metrics.clean_reference(logits, target)
        with all_spliced(lm, transcoders, keep):
            replaced = lm(input_ids=input_ids, attention_mask=mask, use_cache=False).logits
        ce_replaced, kl = metrics.ce_and_kl(replaced[:, :-1], target, p, h)
        agree = logits.argmax(-1) == replaced[:, :-1].argmax(-1)
        sums["ce_loss"] += ce[ok].sum().item()
        sums["ce_loss_replacement"] += ce_replaced[ok].sum().item()
        sums["kl_div"] += kl[ok].sum().item()
        sums["top1_agreement"] += agree[ok].sum().item()
        n += int(ok.sum())
        bar.update(int(ok.sum()))
        if n >= n_tokens:
            break
    bar.close()
    out = {key: total / max(n, 1) for key, total in sums.items()}
    out["n_predictions"] = n
    return out


def evaluate_folder(args):
    """evaluate.py DIR --replacement: the global replacement model of a folder of transcoders
    (one per layer) against the LM on --tokens held-out predictions; printed, returned."""
    transcoders, config, (args.device, args.dtype, note) = load_transcoders(
        args.checkpoint, args.device, args.dtype)
    print(f"running on {args.device} in {args.dtype} ({note})")
    dataset = args.dataset or config["dataset_path"]
    lm, tok = model.load_model(config["model_name"], args.device, getattr(torch, args.dtype))
    saes = {layer: inference.for_lm(sae, c, lm) for layer, (sae, c) in transcoders.items()}
    batches = data.heldout_batches(tok, dataset, config["context_size"], 8)
    out = replacement_metrics(lm, tok, saes, batches, args.tokens)
    print(f"the replacement model of {args.checkpoint} ({len(saes)} transcoders, every MLP "
          f"replaced at once, no error term) on {out['n_predictions']:,} held-out predictions:")
    for key in ("ce_loss", "ce_loss_replacement", "kl_div", "top1_agreement"):
        print(f"  {key:<22} {out[key]:.4f}")
    return dict(out, data=f"held-out {dataset}", checkpoint=args.checkpoint)
