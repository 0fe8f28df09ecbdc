"""Our attribution graph against circuit-tracer's own, on the same transcoders and prompt.

Run in a separate environment (circuit-tracer pins transformers <= 4.57.3; this project's own
environment has a newer one):

    python3 -m venv ct && . ct/bin/activate
    pip install torch==2.13.0 && pip install torch==2.13.0 circuit-tracer==0.5.0
    python postprocess.py TC_FOLDER --export-circuit-tracer CT_FOLDER     # in this project's env
    python docs/compare_circuit_tracer.py TC_FOLDER CT_FOLDER MODEL_FOLDER "PROMPT" [MAX_NODES]

TC_FOLDER: our transcoders (one per layer), CT_FOLDER: their circuit-tracer export, MODEL_FOLDER:
the LM as a transformers folder (for the embedded SmolLM2: ~/.cache/llama_scope/smollm2-135m-
instruct). Both build the whole graph (every active feature a node), or with MAX_NODES each its
greedy choice of that many features, and the script prints the largest difference of their
adjacency matrices over the nodes both have (the features both chose, every error, token and
logit). circuit-tracer's whole graph of 9 tokens (BOS included) through SmolLM2's 30
transcoders did not fit in 24 GB; MAX_NODES 500 does. circuit-tracer sets the first position's
features and error nodes to 0 (the BOS position), so edges from or to nodes at position 0 are
left out of the comparison.
"""
import json
import os
import shutil
import sys
import tempfile

import torch
from safetensors import safe_open
from circuit_tracer import ReplacementModel, attribute as ct_attribute
from circuit_tracer.utils.hf_utils import load_transcoder_from_hub

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import data  # noqa: E402  (this project, importable here)
import inference  # noqa: E402
import model  # noqa: E402
from extras import attribution, replacement  # noqa: E402


def ours(tc_folder, ct_folder, model_folder, tokens, max_nodes):
    """{(kind, key): node index}, adjacency of our whole graph, each transcoder run as the
    export runs it (JumpReLU at the threshold the export holds)."""
    transcoders, _, _ = replacement.load_transcoders(tc_folder, "cpu", "float32")
    lm = model.load_lm(model_folder, "cpu", torch.float32)
    saes = {}
    for layer, (sae, config) in transcoders.items():
        with safe_open(os.path.join(ct_folder, f"layer_{layer}.safetensors"), "pt") as f:
            sae.threshold = f.get_tensor("activation_function.threshold")[0].item()
        sae.act = "jumprelu"
        saes[layer] = inference.for_lm(sae, config, lm)
    s = attribution.setup(lm, saes, tokens)
    graph = attribution.attribute(lm, s, max_nodes or 10**9)
    index = {}
    for i, (node, kind) in enumerate(zip(graph.node_ids().tolist(), graph.kinds())):
        if node < s.first_error() and kind in ("feature", "target"):
            index[("feature", tuple(s.features[node].tolist()))] = i
        elif kind == "error":
            index[("error", divmod(node - s.first_error(), s.n_positions))] = i
        elif kind == "token":
            index[("token", node - s.first_token())] = i
        else:
            index[("logit", int(s.logit_tokens[node - s.first_logit()]))] = i
    return index, graph.adjacency


def theirs(ct_folder, model_folder, tokens, max_nodes):
    """{(kind, key): node index}, adjacency of circuit-tracer's whole graph."""
    transcoders, _ = load_transcoder_from_hub(os.path.abspath(ct_folder), device="cpu",
                                              dtype=torch.float32)
    replacement_model = ReplacementModel.from_pretrained_and_transcoders(
        model_folder, transcoders, backend="nnsight", device="cpu", dtype=torch.float32)
    graph = ct_attribute(tokens.tolist(), replacement_model, max_feature_nodes=max_nodes,
                         batch_size=64)
    features = graph.active_features[graph.selected_features].tolist()  # (layer, pos, feature)
    n_layers = len(transcoders)
    n_pos = len(tokens)
    index = {("feature", (layer, pos, f)): i for i, (layer, pos, f) in enumerate(features)}
    start = len(features)
    for layer in range(n_layers):
        for pos in range(n_pos):
            index[("error", (layer, pos))] = start + layer * n_pos + pos
    start += n_layers * n_pos
    for pos in range(n_pos):
        index[("token", pos)] = start + pos
    start += n_pos
    for k, target in enumerate(graph.logit_targets):
        index[("logit", int(target.vocab_idx))] = start + k
    return index, graph.adjacency_matrix


def position(key):
    kind, value = key
    if kind == "feature":
        return value[1]
    if kind == "error":
        return value[1]
    return value if kind == "token" else None


def older_tokenizer_config(model_folder):
    """A copy of the model folder whose tokenizer config names a class transformers 4.57 knows
    (a folder saved by transformers 5 names `TokenizersBackend`)."""
    copy = os.path.join(tempfile.mkdtemp(), "model")
    shutil.copytree(model_folder, copy)
    path = os.path.join(copy, "tokenizer_config.json")
    with open(path) as f:
        config = json.load(f)
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    with open(path, "w") as f:
        json.dump(config, f)
    return copy


def main(tc_folder, ct_folder, model_folder, prompt, max_nodes=None):
    max_nodes = int(max_nodes) if max_nodes else None
    model_folder = older_tokenizer_config(model_folder)
    tok = model.load_tokenizer(model_folder)
    tokens = torch.tensor(data.encode_documents(tok, [prompt])[0])
    mine, a = ours(tc_folder, ct_folder, model_folder, tokens, max_nodes)
    other, b = theirs(ct_folder, model_folder, tokens, max_nodes)
    common = [key for key in mine if key in other and position(key) != 0]
    rows_a = torch.tensor([mine[key] for key in common])
    rows_b = torch.tensor([other[key] for key in common])
    ours_sub = a[rows_a][:, rows_a].double()
    theirs_sub = b[rows_b][:, rows_b].double()
    diff = (ours_sub - theirs_sub).abs()
    print(f"prompt: {prompt!r} ({len(tokens)} tokens)")
    print(f"nodes: ours {len(mine)}, circuit-tracer {len(other)}, compared {len(common)} "
          f"(position 0 left out)")
    print(f"edges compared: {diff.numel():,}; nonzero in ours {int((ours_sub != 0).sum()):,}, "
          f"in theirs {int((theirs_sub != 0).sum()):,}")
    largest = ours_sub.abs().max().item()
    print(f"max |difference| {diff.max().item():.3g}; largest |edge| {largest:.3g}; relative "
          f"{diff.max().item() / largest:.3g}")


if __name__ == "__main__":
    main(*sys.argv[1:6])
