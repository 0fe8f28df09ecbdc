"""What an attribution graph says (extras/attribution.py makes it): each node's influence on the
targets, the pruned graph, its replacement and completeness scores, its strongest paths, and
what removing a feature does: predicted by the graph, and measured in the real model.

Influence is circuit-tracer's: with An = |A| normalized so that each target's inputs sum to 1,
a node's influence is w^T (An + An^2 + ...), w the targets' weights (their probabilities).
Shapes: N graph nodes.
"""
import contextlib
import dataclasses

import torch

import model
from extras import replacement


def normalized(adjacency):
    """|A| with each target's incoming weights summing to 1."""
    a = adjacency.abs()
    a /= a.sum(1, keepdim=True).clamp(min=1e-10)  # in place: one copy of a large matrix
    return a


def influence(adjacency, weights, max_iter=1000):
    """(N,) each node's influence on the weighted targets: w^T (An + An^2 + ...), An the
    normalized adjacency (a DAG, so the series ends)."""
    An = normalized(adjacency)
    v = weights @ An
    total = v.clone()
    for _ in range(max_iter):
        if not v.any():
            break
        v = v @ An
        total += v
    return total


def threshold_of(scores, share):
    """The score above which the highest scores hold `share` of the total."""
    values = scores.flatten().sort(descending=True).values
    cumulative = values.cumsum(0) / values.sum().clamp(min=1e-10)
    index = min(int(torch.searchsorted(cumulative, share)), len(values) - 1)
    return values[index]


@dataclasses.dataclass
class Pruned:
    """Which nodes and edges of a Graph carry most of the influence on its targets."""
    nodes: torch.Tensor  # (N,) bool
    edges: torch.Tensor  # (N, N) bool
    cumulative: torch.Tensor  # (N,) the share of influence held by nodes ranked up to this one


def prune(graph, node_share=0.8, edge_share=0.98):
    """circuit-tracer's pruning: the nodes holding node_share of the influence (targets and
    tokens always kept), then the edges holding edge_share of the influence-weighted edge
    scores, then until stable every feature and error node keeps an outgoing edge and every
    feature an incoming one."""
    A = graph.adjacency
    kinds = graph.kinds()
    always = torch.tensor([k in ("token", "target") for k in kinds])
    scores = influence(A, graph.weights)
    nodes = (scores >= threshold_of(scores, node_share)) | always
    kept = A * nodes[:, None] * nodes[None, :]
    edge_scores = normalized(kept) * (influence(kept, graph.weights) + graph.weights)[:, None]
    edges = (edge_scores >= threshold_of(edge_scores, edge_share)) & (kept != 0)
    needs_out = torch.tensor([k in ("feature", "error") for k in kinds])
    needs_in = torch.tensor([k == "feature" for k in kinds])
    while True:
        alive = nodes & ~(needs_out & ~edges.any(0)) & ~(needs_in & ~edges.any(1))
        alive |= always
        edges = edges & alive[:, None] & alive[None, :]
        if torch.equal(alive, nodes):
            break
        nodes = alive
    order = scores.argsort(descending=True)
    cumulative = torch.zeros_like(scores)
    cumulative[order] = scores[order].cumsum(0) / scores.sum().clamp(min=1e-10)
    return Pruned(nodes, edges, cumulative)


def scores(graph):
    """(replacement score, completeness score), as circuit-tracer defines them: the share of the
    token nodes' influence against the tokens' and errors' together, and the share of every
    node's input (weighted by its influence) that does not come from an error node."""
    An = normalized(graph.adjacency)
    infl = influence(graph.adjacency, graph.weights)
    kinds = graph.kinds()
    tokens = torch.tensor([k == "token" for k in kinds])
    errors = torch.tensor([k == "error" for k in kinds])
    replacement_score = infl[tokens].sum() / (infl[tokens].sum() + infl[errors].sum())
    weight = infl + graph.weights
    completeness = ((1 - An[:, errors].sum(1)) * weight).sum() / weight.sum()
    return replacement_score.item(), completeness.item()


def strongest_paths(graph, pruned, n=5):
    """The n paths from a token node to the top target with the largest product of normalized
    edge weights |A[t, s]| / sum_s |A[t, s]|, each [(graph node, weight of the edge into it)]."""
    An = normalized(graph.adjacency * pruned.edges)
    best = {}  # graph node -> [(strength, path)] from some token, the n strongest
    kinds = graph.kinds()
    for node in topological_order(graph):
        if kinds[node] == "token":
            best[node] = [(1.0, [node])]
            continue
        incoming = []
        for source in An[node].nonzero(as_tuple=True)[0].tolist():
            for strength, path in best.get(source, []):
                incoming.append((strength * An[node, source].item(), path + [node]))
        best[node] = sorted(incoming, reverse=True)[:n]
    top = len(kinds) - len(graph.targets)  # the first target: the top logit, or the feature
    return best.get(top, [])


def topological_order(graph):
    """Graph nodes so that every source comes before its targets: tokens, then by layer
    (features and errors), then the targets."""
    s = graph.setup
    layers = []
    for node, kind in zip(graph.node_ids().tolist(), graph.kinds()):
        if kind == "token":
            layers.append(-1)
        elif kind == "target":
            layers.append(s.n_layers + 1 if node >= s.first_logit() else
                          s.features[node, 0].item() + 0.5)
        elif kind == "feature":
            layers.append(s.features[node, 0].item())
        else:
            layers.append((node - s.first_error()) // s.n_positions)
    return sorted(range(len(layers)), key=layers.__getitem__)


def predicted_ablation(graph, node, turn_off=True):
    """The change of the top target the graph predicts when feature `node` (a graph index) is
    removed: its activation to 0, and every feature downstream, in layer order, moved by its
    edges per unit of its sources' activations (a JumpReLU's slope is 1 above its threshold),
    with turn_off never below 0 (it turns off); errors and tokens fixed. Without turn_off this
    is exact for the replacement model with its active features' set held."""
    s = graph.setup
    ids = graph.node_ids()
    is_feature = torch.tensor([kind == "feature" for kind in graph.kinds()])
    activation = torch.zeros(len(ids), dtype=graph.adjacency.dtype)
    activation[is_feature] = s.activations[ids[is_feature]]
    safe = torch.where(is_feature, activation, torch.ones_like(activation))
    per_unit = graph.adjacency / safe[None, :] * is_feature[None, :]  # sources: features
    change = torch.zeros(len(ids), dtype=activation.dtype)
    change[node] = -activation[node]
    for _ in range(s.n_layers + 1):  # the graph is a DAG of at most this depth
        moved = per_unit @ change
        if turn_off:
            moved = torch.maximum(moved, -activation)
        moved = moved * is_feature
        moved[node] = -activation[node]
        change = moved
    top = len(ids) - len(graph.targets)
    return (per_unit[top] @ change).item()


@torch.no_grad()
def measured_ablation(lm, graph, node):
    """(held, live): the change of the top logit (demeaned) in the real model, attention, norms
    and every MLP live, when feature `node`'s output a_s W_dec[s] is taken out of its layer's
    MLP output at its position. `held` keeps the last RMSNorm's scale at the clean forward's,
    as the graph does: the change with the common factor every logit shares taken out (at the
    last layers, where MLP outputs are large, that factor alone can outweigh the feature's own
    effect); `live` lets that scale move too."""
    s = graph.setup
    setup_node = int(graph.node_ids()[node])
    layer, pos, _ = s.features[setup_node].tolist()
    ids = s.frozen.tokens[None].to(lm.device)
    token = int(s.logit_tokens[0])

    def removed(x_in, x_out):
        out = x_out.clone()
        out[0, pos] -= s.outputs[setup_node].to(out)
        return out

    def top_logit(logits):
        return (logits[0, -1, token] - logits[0, -1].mean()).item()
    changes = []
    for hold in (True, False):
        with final_scale_held(lm, s.frozen.final_scale) if hold else contextlib.nullcontext():
            before = top_logit(lm(input_ids=ids).logits)
            with model.splice(lm, layer, "TC", removed):
                after = top_logit(lm(input_ids=ids).logits)
        changes.append(after - before)
    return tuple(changes)


@contextlib.contextmanager
def final_scale_held(lm, scale):
    """The LM's last RMSNorm with its scale 1 / rms fixed at `scale` (T, 1)."""
    norm = lm.model.norm

    def held(module, inputs, output):
        x = inputs[0]
        return replacement.normed(norm, x, scale.to(x.device)).to(output.dtype)
    handle = norm.register_forward_hook(held)
    try:
        yield
    finally:
        handle.remove()


def spearman(a, b):
    """Spearman's rank correlation of two equal-length sequences (no tie correction)."""
    ranks = [torch.tensor(x, dtype=torch.float64).argsort().argsort().double() for x in (a, b)]
    centred = [r - r.mean() for r in ranks]
    return (centred[0] @ centred[1] / (centred[0].norm() * centred[1].norm())).item()


def faithfulness(lm, graph, n=20):
    """(Spearman's rank correlation with the last norm's scale held, the same with it live,
    [(graph node, predicted, measured held, measured live)]) over the n features of the graph
    with the most influence on its top logit."""
    infl = influence(graph.adjacency, graph.weights)
    n_features = graph.n_features()
    chosen = infl[:n_features].topk(min(n, n_features)).indices.tolist()
    rows = [(node, predicted_ablation(graph, node), *measured_ablation(lm, graph, node))
            for node in chosen]
    predicted = [row[1] for row in rows]
    held = spearman(predicted, [row[2] for row in rows])
    live = spearman(predicted, [row[3] for row in rows])
    return held, live, rows
