"""A scope: a folder of SAE checkpoints over layers, sites and widths, evaluated together.

- `load`: every checkpoint of a folder in inference form (inference.load_sae), refused in one line
  when there is none or they belong to different models, datasets or contexts.
- `table`: L0, EV (eq. 6), Delta LM loss (§4.1) and the never-fired share of each SAE, in layer
  order, as evaluate.py prints them; plots.plot_scope draws them as the paper's Fig. 10.
The one-pass evaluation itself is metrics.scope_metrics; training a scope is train.py's (plan.py
splits it into groups that fit in memory).
"""
import glob
import os

import formats
import inference

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
    saes, placed = {}, None
    for path in paths:
        sae, config, placed = inference.load_sae(path, model_name, device, dtype)
        saes[formats.sae_name(path)] = (sae, config)
    for key in ("model_name", "dataset_path", "context_size"):
        seen = {str(config.get(key)) for _, config in saes.values()}
        if len(seen) > 1:
            raise ValueError(f"{folder}: its checkpoints read different {key}s ("
                             f"{', '.join(sorted(seen))}); evaluate each in a folder of its own")
    order = sorted(saes, key=lambda name: (saes[name][1]["layer"], saes[name][1]["site"],
                                           saes[name][0].n_features, name))
    return {name: saes[name] for name in order}, placed


def for_lm(saes, lm, tok, ratio=None, dataset=None):
    """({name: (sae, config)} as each SAE must read lm, {name: its token rule}): one rule for
    all (inference.token_rule: --max-norm-ratio), each SAE its own limit; prints the rule."""
    adapted, rules = {}, {}
    for name, (sae, config) in saes.items():
        config, rules[name] = inference.token_rule(lm, tok, config, sae.d_model, ratio, dataset)
        adapted[name] = (inference.for_lm(sae, config, lm), config)
    print(f"token rule: {rules[name]} ({name}; each SAE its own limit)")
    return adapted, rules


def table(results):
    """Lines of the scope's table: one row per SAE {name: metrics}, in the given order."""
    width = max(len(name) for name in results)
    lines = [f"  {'SAE':<{width}}" + "".join(f"{label:>13}" for _, label, _ in SHOWN)]
    for name, m in results.items():
        lines.append(f"  {name:<{width}}" + "".join(f"{fmt.format(m[key]):>13}"
                                                   for key, _, fmt in SHOWN))
    return lines
