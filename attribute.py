"""Attribution graphs of a prompt through a scope's transcoders: which features, through which
paths, make the model's next token (Ge, He et al. 2024; circuit-tracer, Neuronpedia).

    python attribute.py DIR "PROMPT" --json g.json --html g.html     # the top logits' circuit
    python attribute.py DIR "PROMPT" --target 12:345:7 --html g.html # feature 345 of L12TC at 7

DIR holds a transcoder (site TC, skip or not) for every layer of one LM, e.g. a scope's folder.
The local replacement model (extras/replacement.py) freezes the prompt's attention patterns and
RMSNorm scales and replaces each MLP by its transcoder plus an error node, so every edge is
exact (extras/attribution.py): features are taken greedily by influence up to
--max-feature-nodes, the graph is pruned to the nodes and edges that carry --node-threshold and
--edge-threshold of the influence, and written as circuit-tracer's JSON (Neuronpedia) and a page
that opens from disk (extras/graph_page.py). The terminal prints the replacement and
completeness scores and the strongest paths from tokens to the top logit.
"""
import argparse
import json
import resource
import sys
import time

import torch

import data
import inference
import model
from extras import attribution, features, flags, graph_page, influence, replacement

RANGES = {"max_feature_nodes": "[1, inf)", "node_threshold": "(0, 1]",
          "edge_threshold": "(0, 1]", "contexts": "[0, inf)", "top": "[1, inf)",
          "faithfulness": "[0, inf)"}


def get_args(argv=None):
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("folder", help="a folder with a transcoder (site TC) for every layer")
    p.add_argument("prompt", help="the text; BOS is put in front")
    p.add_argument("--json", default=None, help="write circuit-tracer's graph JSON here")
    p.add_argument("--html", default=None, help="write the self-contained page here")
    p.add_argument("--target", default=None, metavar="LAYER:FEATURE:POSITION",
                   help="attribute one feature's pre-activation (a local circuit) instead of "
                        "the top logits; it must be active there")
    p.add_argument("--max-feature-nodes", type=int, default=2000,
                   help="features taken as nodes, greedily by influence")
    p.add_argument("--node-threshold", type=float, default=0.8,
                   help="pruning: the nodes holding this share of the influence")
    p.add_argument("--edge-threshold", type=float, default=0.98,
                   help="pruning: the edges holding this share of the influence")
    p.add_argument("--contexts", type=int, default=4000,
                   help="held-out tokens read for the page's feature contexts; 0 = none")
    p.add_argument("--top", type=int, default=5, help="contexts per feature, paths printed")
    p.add_argument("--slug", default=None, help="the graph's name (default: from the prompt)")
    p.add_argument("--faithfulness", type=int, default=0, metavar="N",
                   help="ablate each of the N features with the most influence in the real "
                        "model and rank-correlate the top logit's change with the graph's "
                        "prediction (top-logit graphs); 0 = off")
    inference.placement_args(p)
    return flags.parse(p, argv, RANGES)


def parse_target(text):
    """(layer, feature, position) of --target."""
    parts = text.split(":")
    if len(parts) != 3 or not all(part.isdigit() for part in parts):
        raise ValueError(f"--target {text}: give LAYER:FEATURE:POSITION, e.g. 12:345:7")
    return tuple(int(part) for part in parts)


def prompt_tokens(args, tok, config):
    """(T,) BOS + the prompt's tokens, refused when empty or over the transcoders' context."""
    if not args.prompt.strip():
        raise ValueError("the prompt is empty; give some text")
    ids = data.encode_documents(tok, [args.prompt])[0]
    if len(ids) > config["context_size"]:
        raise ValueError(f"the prompt is {len(ids)} tokens (BOS included); the transcoders "
                         f"trained on contexts of {config['context_size']}: give a shorter one")
    return torch.tensor(ids)


def feature_target(s, target):
    """The setup node index of --target, refused unless that feature is active there."""
    layer, feature, pos = target
    if pos >= s.n_positions or layer >= s.n_layers:
        raise ValueError(f"--target {layer}:{feature}:{pos}: the prompt has {s.n_positions} "
                         f"positions and the model {s.n_layers} layers")
    match = (s.features == torch.tensor([layer, feature, pos])).all(1).nonzero()
    if len(match) == 0:
        active = s.features[(s.features[:, 0] == layer) & (s.features[:, 1] == pos), 2]
        raise ValueError(f"--target {layer}:{feature}:{pos}: feature {feature} is not active at "
                         f"position {pos} of layer {layer}; active there: "
                         f"{active[:10].tolist()}")
    return int(match[0, 0])


def attribute(args):
    """Load, check, attribute, prune, print; write the JSON and the page. Returns the graph
    JSON."""
    target = parse_target(args.target) if args.target else None
    transcoders, config, placed = replacement.load_transcoders(args.folder, args.device,
                                                                args.dtype)
    args.device, args.dtype, _ = placed
    tok = model.load_tokenizer(config["model_name"])
    tokens = prompt_tokens(args, tok, config)
    clock = {"load": time.time()}
    lm = model.load_lm(config["model_name"], args.device, getattr(torch, args.dtype))
    saes = {layer: inference.for_lm(sae, c, lm) for layer, (sae, c) in transcoders.items()}
    clock["setup"] = time.time()
    s = attribution.setup(lm, saes, tokens)
    node = feature_target(s, target) if target else None
    clock["attribution"] = time.time()
    graph = attribution.attribute(lm, s, args.max_feature_nodes, node)
    clock["pruning"] = time.time()
    pruned = influence.prune(graph, args.node_threshold, args.edge_threshold)
    replacement_score, completeness_score = influence.scores(graph)
    clock["contexts"] = time.time()
    report(graph, pruned, tok, (replacement_score, completeness_score), args.top)
    contexts = feature_contexts(args, lm, tok, graph, pruned, saes, config)
    clock["faithfulness"] = time.time()
    faithful = check_faithfulness(args, lm, graph, node_names(graph, tok))
    clock["end"] = time.time()
    about = dict(slug=args.slug or slug_of(args.prompt), scan=args.folder, prompt=args.prompt,
                 prompt_tokens=[tok.decode([t]) for t in tokens.tolist()], tok=tok,
                 node_threshold=args.node_threshold, replacement_score=replacement_score,
                 completeness_score=completeness_score, faithfulness=faithful)
    labels = {node_id: contexts[node_id]["label"] for node_id in contexts}
    out = graph_page.graph_json(graph, pruned, about, labels)
    write(args, out, contexts, s.n_layers)
    print_timing(clock, graph)
    return out


def check_faithfulness(args, lm, graph, names):
    """--faithfulness N: Spearman's rank correlation between the top logit's change when each
    of N features is ablated in the real model and the graph's prediction (None when off)."""
    if not args.faithfulness or args.target:
        return None
    held, live, rows = influence.faithfulness(lm, graph, args.faithfulness)
    print(f"faithfulness: Spearman {held:.3f} between the top logit's change in the real model "
          f"(attention and MLPs live; the last norm's scale held, as in the graph) and the "
          f"graph's prediction, ablating each of {len(rows)} features; {live:.3f} with that "
          f"scale live too:")
    for node, predicted, measured, measured_live in rows:
        print(f"  {names[node]:<16} predicted {predicted:+.4f}  measured {measured:+.4f}  "
              f"(scale live {measured_live:+.4f})")
    return {"spearman": held, "spearman_final_norm_live": live, "ablations": [
        {"node": names[node], "predicted": p, "measured": m, "measured_final_norm_live": m_live}
        for node, p, m, m_live in rows]}


def slug_of(prompt):
    return "".join(c if c.isalnum() else "-" for c in prompt.lower())[:40].strip("-") or "graph"


def report(graph, pruned, tok, both_scores, n_paths):
    """The terminal's summary: nodes, scores, the strongest paths to the top target."""
    kinds = graph.kinds()
    kept = int(pruned.nodes.sum())
    print(f"{graph.n_features():,} features of {len(graph.setup.features):,} active as nodes; "
          f"{kept} nodes and {int(pruned.edges.sum())} edges after pruning; replacement score "
          f"{both_scores[0]:.3f}, completeness {both_scores[1]:.3f}")
    names = node_names(graph, tok)
    print("strongest paths from a token to the top target (normalized edge weights multiplied):")
    for strength, path in influence.strongest_paths(graph, pruned, n_paths):
        print(f"  {strength:.3g}  " + " -> ".join(names[node] for node in path))
    if not kinds:
        print("  (none)")


def node_names(graph, tok):
    """A short name per graph node: L12#345@7, err L12@7, "tok"@3, logit "Paris"."""
    s = graph.setup
    names = []
    for setup_node, kind in zip(graph.node_ids().tolist(), graph.kinds()):
        if setup_node < s.first_error():
            layer, pos, feature = s.features[setup_node].tolist()
            names.append(f"L{layer}#{feature}@{pos}")
        elif kind == "error":
            layer, pos = divmod(setup_node - s.first_error(), s.n_positions)
            names.append(f"err L{layer}@{pos}")
        elif kind == "token":
            pos = setup_node - s.first_token()
            names.append(f"{tok.decode([int(s.frozen.tokens[pos])])!r}@{pos}")
        else:
            token = int(s.logit_tokens[setup_node - s.first_logit()])
            names.append(f"logit {tok.decode([token])!r}")
    return names


def feature_contexts(args, lm, tok, graph, pruned, saes, config):
    """{JSON node id: top-activating contexts (extras/features.py) and a label} of every
    feature the pruned graph keeps, from one pass over --contexts held-out tokens."""
    s = graph.setup
    wanted = {}  # layer -> {feature: JSON node ids}
    ids = graph.node_ids().tolist()
    for node in pruned.nodes.nonzero(as_tuple=True)[0].tolist():
        if ids[node] < s.first_error():
            layer, pos, feature = s.features[ids[node]].tolist()
            wanted.setdefault(layer, {}).setdefault(feature, []).append(f"{layer}_{feature}_{pos}")
    if not args.contexts or not wanted:
        return {}
    reading = dict(config, outlier_norm_limit=None)
    per_layer = features.contexts_by_layer(lm, tok, saes, wanted, reading, args)
    out = {}
    for layer, found in per_layer.items():
        for feature, entry in found.items():
            entry["label"] = f"L{layer}#{feature}"
            if entry["contexts"]:  # the token where it peaks highest
                peak = entry["contexts"][0]
                entry["label"] += f" {peak['tokens'][peak['marked']]!r}"
            for node_id in wanted[layer][feature]:
                out[node_id] = entry
    return out


def write(args, out, contexts, n_layers):
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
        print(f"wrote {args.json} (circuit-tracer's graph schema, for Neuronpedia)")
    if args.html:
        page = graph_page.html_page(dict(out, n_layers=n_layers), contexts, args.prompt)
        with open(args.html, "w") as f:
            f.write(page)
        print(f"wrote {args.html} (self-contained: open it from disk)")


def print_timing(clock, graph):
    """Where the time went, and the peak memory."""
    steps = list(clock)
    spans = [f"{a} {clock[b] - clock[a]:.1f}s" for a, b in zip(steps, steps[1:])]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"time: {' | '.join(spans)}; {graph.n_features():,} feature rows; peak {peak:.2f} GiB")


def main(argv=None):
    try:
        return attribute(get_args(argv))
    except ValueError as e:  # bad input, found by any module: one line, exit code 2
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)


if __name__ == "__main__":
    main()
