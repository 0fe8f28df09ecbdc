"""Attribution graphs of a prompt through per-layer transcoders (the linear computation graphs
of Ge, He et al. 2024; circuit-tracer's attribution graphs).

Nodes: active features at (layer, position); one error node per (layer, position), the true MLP
output minus the transcoder's reconstruction; token embeddings; targets: the top logits (up to
0.95 probability, at most 10), each as its demeaned unembedding direction, or one feature (its
pre-activation: a local circuit). In the local replacement model (extras/replacement.py) the
residual stream is linear in what the nodes write, so an edge is exact:

    A[t, s] = (a_s W_dec[s]) . J . w_t   (w_t: W_enc[t], or the demeaned unembedding)

the change in target t's pre-activation (or demeaned logit) per the output of source s, through
every path without a node: attention's OV path with frozen patterns, frozen norms, W_skip.
`Setup` holds the prompt's nodes; `rows` computes A for a batch of targets with one backward
pass; `attribute` takes features greedily by influence (as circuit-tracer does) up to a maximum.
What the graph then says (influence, pruning, scores, paths) is extras/influence.py's.
Shapes: T tokens, D model width, L layers, F features, N nodes, B a batch of targets.
"""
import dataclasses

import torch

from extras import replacement
from extras.influence import normalized

MAX_LOGITS = 10  # logit targets: the top tokens up to LOGIT_PROB of probability, at most this many
LOGIT_PROB = 0.95
ROUND = 128  # features taken per round of the greedy selection
BATCH = 32  # targets per backward pass: its autograd graph holds ~20 MB per target through
#             SmolLM2's 30 layers in float64, so memory, not time, sets it
PRECISION = torch.float64  # of the local replacement model: its nodes sum back exactly


@dataclasses.dataclass
class Setup:
    """The nodes of one prompt and what the edges need: every active feature, the error and
    token nodes, and the targets' directions."""
    frozen: replacement.Frozen  # the clean forward's norms, patterns, MLP inputs and outputs
    skips: list  # per layer W_skip (D, D) of a skip transcoder, or None
    features: torch.Tensor  # (n, 3) long: layer, position, feature of every active feature
    activations: torch.Tensor  # (n,) their activations a_s
    outputs: torch.Tensor  # (n, D) what each writes: a_s W_dec[s]
    encoders: torch.Tensor  # (n, D) its encoder row W_enc[s]: its direction as a target
    biases: torch.Tensor  # (n,) its encoder bias b_enc[s]
    errors: torch.Tensor  # (L, T, D) true MLP output minus the reconstruction
    decoder_biases: torch.Tensor  # (L, D) each transcoder's b_dec
    logit_tokens: torch.Tensor  # (n_logits,) the target tokens
    logit_probs: torch.Tensor  # (n_logits,) their probabilities
    logit_dirs: torch.Tensor  # (n_logits, D) W_U[k] - mean W_U: the demeaned unembedding

    @property
    def n_layers(self):
        return len(self.frozen.mlp_in)

    @property
    def n_positions(self):
        return len(self.frozen.tokens)

    def first_error(self):
        """Node index of the first error node; errors are layer-major: layer * T + position."""
        return len(self.features)

    def first_token(self):
        return self.first_error() + self.n_layers * self.n_positions

    def first_logit(self):
        return self.first_token() + self.n_positions

    def n_nodes(self):
        return self.first_logit() + len(self.logit_tokens)

    def groups(self):
        """{(layer, position): node indices of the features there}, made once."""
        if not hasattr(self, "_groups"):
            keys = self.features[:, 0] * self.n_positions + self.features[:, 1]
            self._groups = {}
            for key in keys.unique().tolist():
                where = (keys == key).nonzero(as_tuple=True)[0]
                self._groups[divmod(key, self.n_positions)] = where
        return self._groups


@torch.no_grad()
def setup(lm, transcoders, tokens):
    """The Setup of a prompt tokens (T,): the clean forward, every transcoder's active features
    on it (transcoders {layer: sae in inference form}, raw space; they infer in their own
    precision), the error nodes, the logit targets. The local replacement model runs in float64
    (PRECISION) whatever the LM's dtype, so that its nodes sum back to the LM's own MLP outputs
    to float64 rounding: the error nodes are what float32 leaves out."""
    frozen = replacement.clean_forward(lm, tokens)
    features = []
    activations = []
    outputs = []
    encoders = []
    biases = []
    errors = []
    skips = []
    for layer in range(len(frozen.mlp_in)):
        sae = transcoders[layer]
        f = dense_codes(sae, frozen.mlp_in[layer].to(sae.W_enc)).to(PRECISION)  # (T, F)
        pos, feat = f.nonzero(as_tuple=True)
        a = f[pos, feat]
        W_dec = sae.W_dec.detach().to(PRECISION)
        features.append(torch.stack([torch.full_like(pos, layer), pos, feat], 1))
        activations.append(a)
        outputs.append(a[:, None] * W_dec[feat])
        encoders.append(sae.W_enc.detach()[feat].to(PRECISION))
        biases.append(sae.b_enc.detach()[feat].to(PRECISION))
        x = frozen.mlp_in[layer].to(PRECISION)  # (T, D)
        reconstruction = f @ W_dec + sae.b_dec.detach().to(PRECISION)
        skips.append(None)
        if sae.skip:
            skips[-1] = sae.W_skip.detach().to(PRECISION)
            reconstruction = reconstruction + x @ skips[-1].T
        errors.append(frozen.mlp_out[layer].to(PRECISION) - reconstruction)
    tokens_p, dirs = logit_targets(lm, frozen.logits[-1])
    decoder_biases = torch.stack([transcoders[i].b_dec.detach() for i in range(len(errors))])
    return Setup(frozen, skips, torch.cat(features), torch.cat(activations),
                 torch.cat(outputs), torch.cat(encoders), torch.cat(biases),
                 torch.stack(errors), decoder_biases.to(PRECISION), tokens_p[0], tokens_p[1],
                 dirs.to(PRECISION))


def dense_codes(sae, x):
    """(T, F) the transcoder's feature activations on raw inputs x (T, D), however it infers."""
    f = sae.encode(x)
    if isinstance(f, tuple):
        vals, idx = f
        return torch.zeros(len(x), sae.n_features, dtype=vals.dtype, device=x.device).scatter(
            1, idx, vals)
    return f


def logit_targets(lm, last_logits):
    """((tokens, probabilities), demeaned unembedding directions (n, D)) of the top next tokens
    up to LOGIT_PROB of probability, at most MAX_LOGITS."""
    probs = torch.softmax(last_logits.double(), -1)
    top = probs.topk(MAX_LOGITS)
    n = int(torch.searchsorted(top.values.cumsum(0), LOGIT_PROB).item()) + 1
    tokens = top.indices[:min(n, MAX_LOGITS)]
    unembed = lm.lm_head.weight.detach()  # (V, D)
    dirs = unembed[tokens] - unembed.mean(0)
    return (tokens, top.values[:len(tokens)].float()), dirs


def rows(lm, s, targets):
    """A[t, :] (len(targets), N) for target nodes (node indices: features or logits), BATCH of
    them per backward pass."""
    return torch.cat([batch_rows(lm, s, batch) for batch in targets.split(BATCH)])


def batch_rows(lm, s, targets):
    """A[t, :] (B, N) for a batch of target nodes: one backward pass through the local
    replacement model gives each target's gradient at every point a node writes to, and its dot
    product with the node's output is the edge."""
    B = len(targets)
    T = s.n_positions
    D = s.errors.shape[-1]
    dtype = s.errors.dtype
    # 1. zero writes as leaves: the model is linear, so its gradient does not depend on them
    writes = {key: torch.zeros(B, T, D, dtype=dtype, requires_grad=True)
              for key in ["embed", *range(s.n_layers)]}
    with torch.enable_grad():
        mlp_ins, final = replacement.linear_forward(lm, s.frozen, writes, s.skips)
        # 2. each target's value in its own copy b: a feature's pre-activation (its encoder row
        #    on its layer's MLP input), or a logit's demeaned direction on the last position
        objective = target_values(s, targets, mlp_ins, final).sum()
        grads = torch.autograd.grad(objective, list(writes.values()), allow_unused=True)
    # a write after every target's layer reaches none of them: its gradient is 0
    grad = {key: torch.zeros_like(w) if g is None else g
            for (key, w), g in zip(writes.items(), grads)}
    # 3. the edges: each gradient at a node's write point, dotted with what the node writes
    out = torch.zeros(B, s.n_nodes(), dtype=dtype)
    for (layer, pos), here in s.groups().items():  # the features writing at (layer, position)
        out[:, here] = grad[layer][:, pos] @ s.outputs[here].T
    errors = torch.einsum("lbtd,ltd->blt", torch.stack([grad[i] for i in range(s.n_layers)]),
                          s.errors)
    out[:, s.first_error():s.first_token()] = errors.reshape(B, -1)
    out[:, s.first_token():s.first_logit()] = (grad["embed"] * s.frozen.embeds.to(dtype)).sum(-1)
    return out


def target_values(s, targets, mlp_ins, final):
    """(B,) each target's value in its copy of the batch: W_enc[t] . MLP input at its layer and
    position, or the demeaned unembedding . the last normed residual."""
    values = []
    for b, node in enumerate(targets.tolist()):
        if node >= s.first_logit():
            values.append(final[b, -1] @ s.logit_dirs[node - s.first_logit()])
        else:
            layer, pos, _ = s.features[node].tolist()
            values.append(mlp_ins[layer][b, pos] @ s.encoders[node])
    return torch.stack(values)


# ----------------------------------------------------------------------------- the graph

@dataclasses.dataclass
class Graph:
    """An attribution graph: its nodes in adjacency order (the selected features, every error
    node, the token nodes, the targets) and A[target, source] (N, N)."""
    setup: Setup
    selected: torch.Tensor  # setup's indices of the features kept as nodes
    targets: torch.Tensor  # setup's indices of the target nodes (logits, or one feature)
    adjacency: torch.Tensor  # (N, N)
    weights: torch.Tensor  # (N,) how much each target counts: its probability, or 1

    def node_ids(self):
        """setup's index of every graph node, in adjacency order."""
        s = self.setup
        middle = torch.arange(s.first_error(), s.first_logit())  # errors and tokens
        return torch.cat([self.selected, middle, self.targets])

    def n_features(self):
        return len(self.selected)

    def kinds(self):
        """Per graph node: "feature", "error", "token" or "target"."""
        s = self.setup
        n_errors = s.n_layers * s.n_positions
        return (["feature"] * len(self.selected) + ["error"] * n_errors
                + ["token"] * s.n_positions + ["target"] * len(self.targets))


def attribute(lm, s, max_feature_nodes, feature_target=None):
    """The Graph of Setup s: the targets' rows first (the logits, or the feature node
    feature_target: a local circuit), then, in rounds, the rows of the ROUND unvisited features
    with the most influence on the targets so far (circuit-tracer's greedy order), until
    max_feature_nodes features have rows or none has any influence left. A logit graph whose
    budget holds every active feature takes them all at once: there is no order to find."""
    if feature_target is None:
        targets = torch.arange(s.first_logit(), s.n_nodes())
        weights = s.logit_probs.to(s.errors.dtype)
    else:
        targets = torch.tensor([feature_target])
        weights = torch.ones(1, dtype=s.errors.dtype)
    visited = torch.zeros(len(s.features), dtype=torch.bool)
    if feature_target is not None:
        visited[feature_target] = True  # a target is not its own source
    budget = min(max_feature_nodes, len(s.features) - int(visited.sum()))
    # the rows (R, N) of the nodes visited so far, targets first, filled in place round by round
    computed = torch.zeros(len(targets) + budget, s.n_nodes(), dtype=s.errors.dtype)
    computed[:len(targets)] = rows(lm, s, targets)
    row_nodes = torch.cat([targets, torch.zeros(budget, dtype=torch.long)])
    row_weights = torch.cat([weights, torch.zeros(budget, dtype=weights.dtype)])
    n_rows = len(targets)
    take_all = feature_target is None and budget == len(s.features)  # each reaches the logits
    while n_rows < len(computed):
        if take_all:  # no order to find
            chosen = (~visited).nonzero(as_tuple=True)[0]
        else:
            known = slice(0, n_rows)
            influence = node_influence(computed[known], row_nodes[known], row_weights[known])
            influence = influence[:len(s.features)]
            influence[visited] = -1
            best = influence.topk(min(ROUND, len(computed) - n_rows))
            chosen = best.indices[best.values > 0]
            if len(chosen) == 0:  # nothing left reaches the targets
                break
        visited[chosen] = True
        computed[n_rows:n_rows + len(chosen)] = rows(lm, s, chosen)
        row_nodes[n_rows:n_rows + len(chosen)] = chosen
        n_rows += len(chosen)
    if feature_target is not None:
        visited[feature_target] = False
    selected = visited.nonzero(as_tuple=True)[0]
    return assemble(s, selected, targets, (computed[:n_rows], row_nodes[:n_rows]), weights)


def assemble(s, selected, targets, computed, weights):
    """The Graph: rows and columns of the adjacency restricted to its nodes; computed = (rows
    (R, N), their setup node indices)."""
    computed_rows, row_nodes = computed
    graph = Graph(s, selected, targets, None, None)
    ids = graph.node_ids()
    position = torch.full((s.n_nodes(),), -1, dtype=torch.long)
    position[ids] = torch.arange(len(ids))
    adjacency = torch.zeros(len(ids), len(ids), dtype=computed_rows.dtype)
    here = position[row_nodes] >= 0
    adjacency[position[row_nodes[here]]] = computed_rows[here][:, ids]
    graph.adjacency = adjacency
    graph.weights = torch.zeros(len(ids), dtype=computed_rows.dtype)
    graph.weights[-len(targets):] = weights
    return graph


def node_influence(computed, row_nodes, row_weights):
    """influence over every setup node with only some rows known (greedy selection): the rows
    (R, N) of the nodes row_nodes, whose own weights are row_weights (R,)."""
    An = normalized(computed)
    v = row_weights @ An  # (N,)
    total = v.clone()
    for _ in range(1000):
        v = v[row_nodes] @ An
        if not v.any():
            break
        total += v
    return total
