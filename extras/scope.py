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
from extras import noise, plots

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
        return config["layer"], model.SITES.index(config["site"]), sae.n_features, name
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
    target: torch.Tensor = None  # (B, T-1) the next tokens; None: the LM ran only to the sites
    ce: torch.Tensor = None  # (B, T-1) clean CE
    p: torch.Tensor = None  # (B, T-1, V) the clean distribution
    h: torch.Tensor = None  # (B, T-1) sum p log p
    ablated: dict = dataclasses.field(default_factory=dict)  # shared ablations: `score_batch`


@dataclasses.dataclass
class Scores:
    """One SAE of the scope and what it has scored so far."""
    sae: object  # in inference form, as it reads the LM
    config: dict
    metrics: metrics.Metrics
    seconds: float = 0.0  # its own passes and its share of the clean ones

    def place(self):
        return self.config["layer"], self.config["site"]


def clean_pass(lm, input_ids, mask, places, with_lm):
    """The CleanBatch of token batch (input_ids, mask): one forward recording every place, and
    with_lm: run through the LM head, with the residual stream entering each place's block;
    else stopped after the deepest place (model.capture)."""
    if not with_lm:
        return CleanBatch(input_ids, mask, model.capture(lm, input_ids, mask, places))
    layers = sorted({layer for layer, _ in places})
    with model.recording(lm, places, layers) as acts:
        logits = lm(input_ids=input_ids, attention_mask=mask, use_cache=False).logits
    target = input_ids[:, 1:]
    ce, p, h = metrics.clean_reference(logits[:, :-1], target)
    return CleanBatch(input_ids, mask, acts, target, ce, p, h)


@torch.no_grad()
def evaluate(lm, tok, saes, batches, budget):
    """metrics.lm_metrics for many SAEs {name: (sae, config)} from one pass over token batches.
    Each SAE reads batches until it has budget.rows scored rows, the first budget.lm_rows of
    them also through the LM, as alone, so its numbers are those lm_metrics gives it. Returns
    {name: metrics}."""
    scores = {name: Scores(sae, config, metrics.Metrics(sae))
              for name, (sae, config) in saes.items()}
    bar = data.progress(budget.rows * len(saes), "evaluate scope")
    checked = False
    for input_ids, mask in batches:
        active = [s for s in scores.values() if s.metrics.n < budget.rows]
        if not active:
            break
        with_lm = any(s.metrics.n < budget.lm_rows for s in active)
        started = time.time()
        places = sorted({s.place() for s in active})
        batch = clean_pass(lm, input_ids.to(lm.device), mask.to(lm.device), places, with_lm)
        if with_lm and not checked:
            check_from_layer(lm, batch, places)
            checked = True
        share = (time.time() - started) / len(active)
        for s in active:
            started = time.time()
            before = s.metrics.n
            score_batch(s, lm, tok, batch, s.metrics.n < budget.lm_rows)
            s.seconds += share + time.time() - started
            bar.update(min(s.metrics.n, budget.rows) - min(before, budget.rows))
    bar.close()
    results = {}
    for name, s in scores.items():
        results[name] = s.metrics.result()
        results[name]["time_s"] = s.seconds
    return results


def score_batch(scores, lm, tok, batch, with_lm):
    """One SAE's share of a CleanBatch into its scores: its rows and, with_lm, its CE and KL
    spliced and ablated (exactly what metrics.three_passes computes for it alone)."""
    place = scores.place()
    x_in, x_out = batch.acts[place]
    # 1. the positions this SAE replaces (its own outlier norm limit) and the predictions scored
    keep = data.scored_positions(batch.input_ids, batch.mask, tok, x_in, x_out,
                                 scores.config.get("outlier_norm_limit"))  # (B, T)
    if with_lm:
        ok = keep[:, :-1] & batch.mask[:, 1:].bool()  # position t scored, predicting t+1
        spliced, zeroed = metrics.patches(scores.sae, keep)
        per_position = {"ce_loss": batch.ce}  # 2. clean: the shared pass
        # 3. spliced: this SAE's reconstruction in place of the site, from its block on
        ce, kl = from_block_on(lm, batch, place, spliced)
        per_position["ce_loss_with_sae"] = ce
        per_position["kl_div_with_sae"] = kl
        # 4. ablated: the site's output zeroed at the same positions
        ce, kl = ablated(lm, batch, place, keep, zeroed)
        per_position["ce_loss_ablated"] = ce
        per_position["kl_div_ablated"] = kl
        scores.metrics.add_losses(per_position, ok)
    # 5. the rows themselves: EV, L0, firing
    s_out = math.sqrt(scores.sae.d_model) / scores.config["dataset_average_activation_norm"]["out"]
    scores.metrics.add(x_in[keep], x_out[keep], s_out, docs=metrics.documents_of(keep))


def ablated(lm, batch, place, keep, zeroed):
    """(CE, KL) with the place's output zeroed at keep, run once per batch for every SAE that
    zeroes the same output at the same positions: the other widths of a place, and M and TC of
    a layer (both replace the MLP's output) when their token rules keep the same positions."""
    output = model.hook_names(*place)[1]
    for other_keep, result in batch.ablated.get(output, []):
        if torch.equal(other_keep, keep):
            return result
    result = from_block_on(lm, batch, place, zeroed)
    batch.ablated.setdefault(output, []).append((keep, result))
    return result


def from_block_on(lm, batch, place, patch):
    """Per-position (CE, KL(clean || patched)), each (B, T-1), with the site's output replaced
    by patch, the LM run from the place's block on: its input is the residual stream the clean
    pass recorded entering that block."""
    layer, site = place
    resid = batch.acts[("resid", layer)][0]  # (B, T, D)
    with model.splice(lm, layer, site, patch), model.from_layer(lm, layer):
        logits = lm(inputs_embeds=resid, attention_mask=batch.mask, use_cache=False).logits
    return metrics.ce_and_kl(logits[:, :-1], batch.target, batch.p, batch.h)


def unchanged(x_in, x_out):
    return x_out


def check_from_layer(lm, batch, places):
    """On the first batch, run clean from the shallowest and the deepest place's block on: the
    predictions must be the full forward's. A model whose forward rescales its input embeddings
    or indexes settings by a block's position would break model.from_layer silently."""
    for place in sorted({min(places), max(places)}):
        ce, kl = from_block_on(lm, batch, place, unchanged)
        scored = batch.mask[:, 1:].bool()
        gap = (ce - batch.ce)[scored].abs().max().item()
        if gap > 1e-3 or kl[scored].abs().max().item() > 1e-3:
            raise ValueError(f"{lm.config.model_type}: running it from block {place[0]} on does "
                             f"not give the full forward's predictions (CE differs by {gap:.2g}); "
                             f"evaluate each checkpoint alone")


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
    results = evaluate(lm, tok, adapted, batches, metrics.Budget(args.tokens, args.lm_tokens))
    for name, m in results.items():  # the keys of a single evaluation
        m.pop("freq")
        noise.with_standard_errors(m)
        m.update(data=f"held-out {dataset}", token_rule=token_rules[name],
                 mode=saes[name][0].act, device=args.device, dtype=args.dtype,
                 checkpoint=os.path.join(args.checkpoint, f"{name}.safetensors"))
    print(f"{len(saes)} SAEs of {args.checkpoint} in {time.time() - t0:.0f}s, "
          f"{reading(results)}:")
    print("\n".join(table(results)))
    places = {name: (c["layer"], c["site"]) for name, (_, c) in saes.items()}
    paired = noise.pairs(results, places.get)
    if paired:
        print("paired differences over the same documents (+- a standard error):")
        print("\n".join(paired))
    if args.plot:
        os.makedirs(args.plot, exist_ok=True)
        path = os.path.join(args.plot, "scope.png")
        configs = {name: c for name, (_, c) in saes.items()}
        plots.plot_scope(results, configs, path,
                         f"{config['model_name']}: {len(saes)} SAEs (Fig. 10)")
        print(f"plotted {path}")
    return results


def reading(results):
    """What the SAEs of a scope's evaluation scored, as a phrase: a range over SAEs."""
    def spread(key):
        values = [m[key] for m in results.values() if key in m]
        if not values:
            return "none"
        low = min(values)
        high = max(values)
        return f"{low:,}" if low == high else f"{low:,}-{high:,}"
    return (f"each SAE {spread('n_tokens')} rows (EV, L0, firing: never fired = on none of "
            f"them), {spread('n_predictions')} predictions (CE, KL) of "
            f"{spread('n_documents')} held-out documents")


def table(results):
    """Lines of the scope's table: one row per SAE {name: metrics}, in the given order; +- a
    standard error over documents (extras/noise.py)."""
    width = max(len(name) for name in results)
    lines = [f"  {'SAE':<{width}}" + "".join(f"{label:>17}" for _, label, _ in SHOWN)]
    for name, m in results.items():
        cells = []
        for key, _, fmt in SHOWN:
            cell = fmt.format(m[key]) if key in m else "-"
            if f"{key}_se" in m:
                cell += " +-" + fmt.format(m[f"{key}_se"])
            cells.append(f"{cell:>17}")
        lines.append(f"  {name:<{width}}" + "".join(cells))
    return lines
