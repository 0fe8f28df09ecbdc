"""An attribution graph written out: the JSON circuit-tracer writes for Neuronpedia, and one
self-contained HTML page that opens from disk (no network, no server).

- `graph_json`: {metadata, qParams, nodes, links} in circuit-tracer's schema (create_graph_files):
  feature nodes `{layer}_{feature}_{position}` (feature_type "cross layer transcoder", as it
  writes for per-layer transcoders too), error nodes `0_{layer}_{position}`, token nodes
  `E_{token id}_{position}`, logit nodes `{layers + 1}_{token id}_{position}`; `influence` is the
  cumulative share of influence at the node's rank; links carry A[target, source].
- `html_page`: the pruned graph drawn by position (x) and layer (y), edges coloured by sign and
  drawn by weight; a click on a node shows its top-activating contexts (extras/features.py) and
  its strongest inputs and outputs. Everything is inline: the data, the drawing code, the style.
Shapes: N nodes, T tokens.
"""
import html
import json

SCHEMA_VERSION = 1


def node_entries(graph, pruned, tok, labels):
    """The JSON node of every graph node kept by pruning, in graph order (None for the others);
    labels: {JSON node id: a short text} for features (their clerp)."""
    s = graph.setup
    kinds = graph.kinds()
    ids = graph.node_ids().tolist()
    T = s.n_positions
    entries = []
    for node, (setup_node, kind) in enumerate(zip(ids, kinds)):
        if not pruned.nodes[node]:
            entries.append(None)
            continue
        entry = {"node_id": "", "feature": 0, "layer": "", "ctx_idx": 0, "feature_type": "",
                 "token_prob": 0.0, "is_target_logit": False, "run_idx": 0,
                 "reverse_ctx_idx": 0, "jsNodeId": "", "clerp": "",
                 "influence": pruned.cumulative[node].item(), "activation": None}
        if kind == "feature" or (kind == "target" and setup_node < s.first_error()):
            layer, pos, feature = s.features[setup_node].tolist()
            entry.update(node_id=f"{layer}_{feature}_{pos}", layer=str(layer), ctx_idx=pos,
                         feature=(layer + feature) * (layer + feature + 1) // 2 + feature,
                         feature_type="cross layer transcoder", jsNodeId=f"{layer}_{feature}-0",
                         activation=s.activations[setup_node].item())
            entry["clerp"] = labels.get(entry["node_id"], "")
        elif kind == "error":
            layer, pos = divmod(setup_node - s.first_error(), T)
            entry.update(node_id=f"0_{layer}_{pos}", feature=-1, layer=str(layer), ctx_idx=pos,
                         feature_type="mlp reconstruction error", jsNodeId=f"{layer}_{pos}-0")
        elif kind == "token":
            pos = setup_node - s.first_token()
            token = int(s.frozen.tokens[pos])
            entry.update(node_id=f"E_{token}_{pos}", feature=pos, layer="E", ctx_idx=pos,
                         feature_type="embedding", jsNodeId=f"E_{token}-{pos}")
        else:
            k = setup_node - s.first_logit()
            token = int(s.logit_tokens[k])
            p = s.logit_probs[k].item()
            entry.update(node_id=f"{s.n_layers + 1}_{token}_{T - 1}", feature=token,
                         layer=str(s.n_layers + 1), ctx_idx=T - 1, feature_type="logit",
                         jsNodeId=f"L_{token}-{T - 1}", token_prob=p, is_target_logit=k == 0,
                         clerp=f'Output "{tok.decode([token])}" (p={p:.3f})', influence=None)
        entries.append(entry)
    return entries


def graph_json(graph, pruned, about, labels=None):
    """The graph in circuit-tracer's JSON schema. about: slug, scan, prompt, prompt_tokens,
    node_threshold, the tokenizer (tok) and our scores (stored in metadata)."""
    entries = node_entries(graph, pruned, about["tok"], labels or {})
    links = []
    for target, source in pruned.edges.nonzero().tolist():
        links.append({"source": entries[source]["node_id"], "target": entries[target]["node_id"],
                      "weight": graph.adjacency[target, source].item()})
    linked = {link["source"] for link in links} | {link["target"] for link in links}
    nodes = [e for e in entries if e is not None and (
        e["node_id"] in linked or e["feature_type"] in ("embedding", "logit"))]
    metadata = {"slug": about["slug"], "scan": about["scan"], "transcoder_list": [],
                "prompt_tokens": about["prompt_tokens"], "prompt": about["prompt"],
                "node_threshold": about["node_threshold"], "schema_version": SCHEMA_VERSION,
                "replacement_score": about["replacement_score"],
                "completeness_score": about["completeness_score"],
                "faithfulness": about.get("faithfulness")}
    q_params = {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "",
                "sg_pos": ""}
    return {"metadata": metadata, "qParams": q_params, "nodes": nodes, "links": links}


STYLE = """
body{font:13px sans-serif;margin:0;display:flex;height:100vh}
#graph{flex:3;overflow:auto;border-right:1px solid #ccc}
#side{flex:2;overflow:auto;padding:8px}
circle{stroke:#333;stroke-width:.5;cursor:pointer}
circle.sel{stroke:#000;stroke-width:2.5}
.ctx{font-family:monospace;white-space:pre-wrap;margin:4px 0}
.peak{outline:1px solid #c00}
td{padding:0 6px}
"""

SCRIPT = """
const G = JSON.parse(document.getElementById('data').textContent);
const byId = {}; G.nodes.forEach(n => byId[n.node_id] = n);
const colour = {'cross layer transcoder': '#4a90d9', 'mlp reconstruction error': '#999',
                'embedding': '#6c6', 'logit': '#e67e22'};
const layers = G.n_layers, T = G.metadata.prompt_tokens.length;
const W = 90 * T + 120, H = 38 * (layers + 3) + 60;
function level(n) { return n.layer === 'E' ? -1 : Number(n.layer); }
function place(n, i) {
  const same = G.nodes.filter(m => m.layer === n.layer && m.ctx_idx === n.ctx_idx);
  const k = same.indexOf(n);
  return [100 + 90 * n.ctx_idx + (k - (same.length - 1) / 2) * Math.min(14, 80 / same.length),
          H - 50 - 38 * (level(n) + 1)];
}
const at = {}; G.nodes.forEach(n => at[n.node_id] = place(n));
const top = Math.max(...G.links.map(l => Math.abs(l.weight)), 1e-9);
let svg = `<svg width="${W}" height="${H}">`;
G.metadata.prompt_tokens.forEach((t, p) => {
  svg += `<text x="${100 + 90 * p}" y="${H - 10}" text-anchor="middle" font-size="11">` +
         `${t.replace(/&/g, '&amp;').replace(/</g, '&lt;')}</text>`; });
for (let l = 0; l <= layers + 1; l++) {
  svg += `<text x="4" y="${H - 46 - 38 * (l + 1)}" font-size="10" fill="#888">` +
         `${l <= layers - 1 ? 'L' + l : l === layers + 1 ? 'logit' : ''}</text>`; }
G.links.forEach((l, i) => {
  const [x1, y1] = at[l.source], [x2, y2] = at[l.target];
  const w = 0.3 + 4 * Math.abs(l.weight) / top;
  svg += `<line id="e${i}" x1="${x1}" y1="${y1}" x2="${x2}" y2="${y2}" ` +
         `stroke="${l.weight > 0 ? '#2b6cb0' : '#c53030'}" stroke-opacity=".45" ` +
         `stroke-width="${w.toFixed(2)}"/>`; });
G.nodes.forEach((n, i) => {
  const [x, y] = at[n.node_id];
  const r = 3 + 6 * (1 - (n.influence === null ? 0 : n.influence));
  svg += `<circle id="n${i}" cx="${x}" cy="${y}" r="${r.toFixed(1)}" ` +
         `fill="${colour[n.feature_type]}" onclick="show(${i})"><title>${n.node_id}</title>` +
         `</circle>`; });
document.getElementById('graph').innerHTML = svg + '</svg>';
function esc(s) { return String(s).replace(/&/g, '&amp;').replace(/</g, '&lt;'); }
function show(i) {
  document.querySelectorAll('circle.sel').forEach(c => c.classList.remove('sel'));
  document.getElementById('n' + i).classList.add('sel');
  const n = G.nodes[i];
  let out = `<h3>${esc(n.node_id)} (${n.feature_type})</h3><p>${esc(n.clerp)}</p>`;
  if (n.activation !== null) out += `<p>activation ${n.activation.toFixed(3)}</p>`;
  for (const [name, end, other] of [['inputs', 'target', 'source'],
                                    ['outputs', 'source', 'target']]) {
    const edges = G.links.filter(l => l[end] === n.node_id)
      .sort((a, b) => Math.abs(b.weight) - Math.abs(a.weight)).slice(0, 8);
    out += `<h4>strongest ${name}</h4><table>` + edges.map(l =>
      `<tr><td>${l.weight.toFixed(3)}</td><td>${esc(l[other])}</td>` +
      `<td>${esc(byId[l[other]].clerp)}</td></tr>`).join('') + '</table>';
  }
  const f = G.contexts[n.node_id];
  if (f) {
    out += `<h4>top-activating contexts (${(100 * f.frequency).toFixed(2)}% of tokens)</h4>`;
    const most = Math.max(...f.contexts.map(c => c.activation), 1e-9);
    f.contexts.forEach(c => {
      out += '<p class="ctx"><b>' + c.activation.toFixed(2) + '</b> ' + c.tokens.map((t, k) =>
        `<span style="background:rgba(230,126,34,${Math.max(0, c.activations[k] / most)})"` +
        `${k === c.marked ? ' class="peak"' : ''}>${esc(t)}</span>`).join('') + '</p>'; });
  }
  document.getElementById('side').innerHTML = out;
}
"""


def html_page(graph, contexts, title):
    """One page: the graph JSON and {node_id: feature contexts (extras/features.py)} inline, and
    the code that draws them (no network, no server)."""
    payload = dict(graph, contexts=contexts)
    text = json.dumps(payload).replace("</", "<\\/")  # nothing in the data closes the script
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
            f"</title><style>{STYLE}</style></head><body><div id='graph'></div><div id='side'>"
            f"<h3>{html.escape(title)}</h3><p>replacement score "
            f"{graph['metadata']['replacement_score']:.3f}, completeness "
            f"{graph['metadata']['completeness_score']:.3f}; click a node.</p></div>"
            f"<script type='application/json' id='data'>{text}</script>"
            f"<script>{SCRIPT}</script></body></html>")
