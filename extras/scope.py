"""A scope: a folder of SAE checkpoints over layers, sites and widths, evaluated together.

- `load`: every checkpoint of a folder in inference form (inference.load_sae), refused in one line
  when there is none or they belong to different models, datasets or contexts.
- `evaluate`: metrics.lm_metrics for every SAE from one pass over held-out documents: per batch
  ONE clean forward records every place; then each SAE is spliced alone, and each site ablated
  once, from its own block on (model.from_layer: the blocks before it would compute what the
  clean pass did).
- `table`: L0, EV (eq. 6), Delta LM loss (§4.1) and the never-fired share of each SAE, in layer
  order, as evaluate.py prints them; plots.plot_scope draws them as the paper's Fig. 10.
Training a scope is train.py's (extras/plan.py splits it into groups that fit in memory).
Shapes: B sequences, T tokens, D model width, V vocabulary.
"""
import dataclasses
import glob
import math
import os
import time

import torch

import data
import formats
import inference
import metrics
import model
from extras import plots

SHOWN = [("l0", "L0", "{:.1f}"), ("explained_variance", "EV", "{:.3f}"),
         ("delta_lm_loss", "dLM loss", "{:.4f}"), ("dead_frac", "never fired", "{:.1%}")]


def checkpoints(folder):
    """Our checkpoint files in folder (resumable states and other safetensors files left out)."""
    paths = sorted(glob.glob(os.path.join(glob.escape(folder), "*.safetensors")))
    return [p for p in paths if not os.path.basename(p).startswith("resume")]


def load(folder, model_name=None, device=None, dtype=None):
    """({name: (sae, config)} in layer, site, width order, (device, dtype, note)) of every
    checkpoint in folder; they must read the same model, dataset and context."""
    paths = checkpoints(folder)
    if not paths:
        raise ValueError(f"{folder}: no checkpoints (*.safetensors) to evaluate")
    saes = {}
    for path in paths:
        sae, config, placed = inference.load_sae(path, model_name, device, dtype)
        saes[formats.sae_name(path)] = (sae, config)
    for key in ("model_name", "dataset_path", "context_size"):
        seen = {str(config.get(key)) for _, config in saes.values()}
        if len(seen) > 1:
            raise ValueError(f"{folder}: its checkpoints read different {key}s ("
                             f"{', '.join(sorted(seen))}); evaluate each in a folder of its own")

    def order(name):
        sae, config = saes[name]
        return config["layer"], config["site"], sae.n_features, name
    return {name: saes[name] for name in sorted(saes, key=order)}, placed


def for_lm(saes, lm, tok, max_norm_ratio=None, dataset=None):
    """({name: (sae, config)} as each SAE must read lm, {name: its token rule}): one rule for
    all (inference.apply_token_rule: --max-norm-ratio), each SAE its own outlier norm limit;
    prints the rule."""
    adapted = {}
    token_rules = {}
    for name, (sae, config) in saes.items():
        config, token_rules[name] = inference.apply_token_rule(lm, tok, config, max_norm_ratio,
                                                               dataset)
        adapted[name] = (inference.for_lm(sae, config, lm), config)
    print(f"token rule: {token_rules[name]} ({name}; each SAE its own limit)")
    return adapted, token_rules


@dataclasses.dataclass
class CleanBatch:
    """One batch of held-out documents run clean once, for every SAE of the scope."""
    input_ids: torch.Tensor  # (B, T)
    mask: torch.Tensor  # (B, T)
    acts: dict  # (layer, site) -> [x_in, x_out]; ("resid", L) -> [the stream entering block L]
    target: torch.Tensor  # (B, T-1) the next tokens
    ce: torch.Tensor  # (B, T-1) clean CE
    p: torch.Tensor  # (B, T-1, V) the clean distribution
    h: torch.Tensor  # (B, T-1) sum p log p
    ablated: dict = dataclasses.field(default_factory=dict)  # shared ablations: `score_batch`


@dataclasses.dataclass
class Scores:
    """What one SAE has scored so far: its rows' Metrics, summed CE and KL, predictions."""
    metrics: metrics.Metrics
    sums: dict
    n_predictions: int = 0


def clean_pass(lm, input_ids, mask, places):
    """The CleanBatch of token batch (input_ids, mask): one full forward recording every place
    and the residual stream entering each of their blocks."""
    layers = sorted({layer for layer, _ in places})
    with model.recording(lm, places, layers) as acts:
        logits = lm(input_ids=input_ids, attention_mask=mask, use_cache=False).logits
    target = input_ids[:, 1:]
    ce, p, h = metrics.clean_reference(logits[:, :-1], target)
    return CleanBatch(input_ids, mask, acts, target, ce, p, h)


@torch.no_grad()
def evaluate(lm, tok, saes, batches, n_tokens):
    """metrics.lm_metrics for many SAEs {name: (sae, config)} from one pass over token batches.
    Each SAE reads batches until it has n_tokens scored rows, as alone, so its numbers are those
    lm_metrics gives it. Returns {name: metrics}."""
    places = sorted({(config["layer"], config["site"]) for _, config in saes.values()})
    scores = {name: Scores(metrics.Metrics(sae), dict.fromkeys(metrics.CE_PASSES +
                                                                 metrics.KL_KEYS, 0.0))
              for name, (sae, _) in saes.items()}
    bar = data.progress(n_tokens * len(saes), "evaluate scope")
    for input_ids, mask in batches:
        active = [name for name, s in scores.items() if s.metrics.n < n_tokens]
        if not active:
            break
        batch = clean_pass(lm, input_ids.to(lm.device), mask.to(lm.device), places)
        for name in active:
            before = scores[name].metrics.n
            score_batch(scores[name], *saes[name], lm, tok, batch)
            bar.update(min(scores[name].metrics.n, n_tokens) - min(before, n_tokens))
    bar.close()
    out = {}
    for name, s in scores.items():
        out[name] = s.metrics.result()
        out[name].update({key: total / max(s.n_predictions, 1) for key, total in s.sums.items()})
        out[name]["delta_lm_loss"] = out[name]["ce_loss_with_sae"] - out[name]["ce_loss"]
    return out


def score_batch(scores, sae, config, lm, tok, batch):
    """One SAE's share of a CleanBatch: its rows, its CE and KL spliced and ablated, into
    scores (exactly what metrics.three_passes computes for it alone)."""
    place = (config["layer"], config["site"])
    limit = config.get("outlier_norm_limit")
    x_in, x_out = batch.acts[place]
    # 1. the positions this SAE replaces (its own outlier norm limit) and the predictions scored
    keep = data.scored_positions(batch.input_ids, batch.mask, tok, x_in, x_out, limit)  # (B, T)
    ok = keep[:, :-1] & batch.mask[:, 1:].bool()  # position t scored, predicting t+1
    # 2. clean: the shared pass
    scores.sums["ce_loss"] += batch.ce[ok].sum().item()
    # 3. spliced: this SAE's reconstruction in place of the site, from its block on
    spliced, zeroed = metrics.patches(sae, keep)
    ce, kl = from_block_on(lm, batch, place, spliced)
    scores.sums["ce_loss_with_sae"] += ce[ok].sum().item()
    scores.sums["kl_div_with_sae"] += kl[ok].sum().item()
    # 4. ablated: the site zeroed at the same positions, so shared by the SAEs of this place
    #    with this limit (the other widths), run once per batch
    shared = (place, str(limit))
    if shared not in batch.ablated:
        batch.ablated[shared] = from_block_on(lm, batch, place, zeroed)
    ce, kl = batch.ablated[shared]
    scores.sums["ce_loss_ablated"] += ce[ok].sum().item()
    scores.sums["kl_div_ablated"] += kl[ok].sum().item()
    # 5. the rows themselves: EV, L0, firing
    scores.n_predictions += int(ok.sum())
    s_out = math.sqrt(sae.d_model) / config["dataset_average_activation_norm"]["out"]
    scores.metrics.add(x_in[keep], x_out[keep], s_out)


def from_block_on(lm, batch, place, patch):
    """Per-position (CE, KL(clean || patched)), each (B, T-1), with the site's output replaced
    by patch, the LM run from the place's block on: its input is the residual stream the clean
    pass recorded entering that block."""
    layer, site = place
    resid = batch.acts[("resid", layer)][0]  # (B, T, D)
    with model.splice(lm, layer, site, patch), model.from_layer(lm, layer):
        logits = lm(inputs_embeds=resid, attention_mask=batch.mask, use_cache=False).logits
    return metrics.ce_and_kl(logits[:, :-1], batch.target, batch.p, batch.h)


def evaluate_folder(args):
    """evaluate.py DIR: every checkpoint of a folder from one pass over held-out documents; a
    table in layer order, Fig. 10 with --plot; returns {name: metrics} (each with the keys of a
    single evaluation)."""
    single = ("activations", "features", "long_context", "eval_model", "chat", "saebench_json",
              "mode", "html")
    other = [flag for flag in single if getattr(args, flag)]
    if other:
        raise ValueError(f"--{other[0].replace('_', '-')} evaluates one checkpoint; "
                         f"{args.checkpoint} is a folder (a scope)")
    saes, (args.device, args.dtype, note) = load(args.checkpoint, args.model, args.device,
                                                args.dtype)
    print(f"running on {args.device} in {args.dtype} ({note})")
    config = next(iter(saes.values()))[1]
    for sae, c in saes.values():  # every check before the slow load
        inference.check_lm(c["model_name"], sae, c)
    t0 = time.time()
    dataset = args.dataset or config.get("dataset_path")
    lm, tok = model.load_model(config["model_name"], args.device, getattr(torch, args.dtype))
    adapted, token_rules = for_lm(saes, lm, tok, args.max_norm_ratio, args.dataset)
    batches = data.heldout_batches(tok, dataset, config["context_size"], 8)
    results = evaluate(lm, tok, adapted, batches, args.tokens)
    for name, m in results.items():  # the keys of a single evaluation
        m.pop("freq")
        m.update(data=f"held-out {dataset}", token_rule=token_rules[name],
                 time_s=time.time() - t0, mode=saes[name][0].act, device=args.device,
                 dtype=args.dtype, checkpoint=os.path.join(args.checkpoint, f"{name}.safetensors"))
    print(f"{len(saes)} SAEs of {args.checkpoint}, {args.tokens:,} held-out tokens each "
          f"({time.time() - t0:.0f}s):")
    print("\n".join(table(results)))
    if args.plot:
        os.makedirs(args.plot, exist_ok=True)
        path = os.path.join(args.plot, "scope.png")
        configs = {name: c for name, (_, c) in saes.items()}
        plots.plot_scope(results, configs, path,
                         f"{config['model_name']}: {len(saes)} SAEs (Fig. 10)")
        print(f"plotted {path}")
    return results


def table(results):
    """Lines of the scope's table: one row per SAE {name: metrics}, in the given order."""
    width = max(len(name) for name in results)
    lines = [f"  {'SAE':<{width}}" + "".join(f"{label:>13}" for _, label, _ in SHOWN)]
    for name, m in results.items():
        values = "".join(f"{fmt.format(m[key]):>13}" for key, _, fmt in SHOWN)
        lines.append(f"  {name:<{width}}{values}")
    return lines
