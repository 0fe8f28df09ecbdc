"""sae_bench's core eval run natively on SmolLM2, against our `--saebench-json` file.

This is the run behind the agreement table of docs/saebench.md. It needs sae-lens, sae-bench
and transformer-lens (what .ci/run installs), the embedded model, and a TopK R checkpoint:

    python evaluate.py CKPT --tokens 4096 --saebench-json ours.json
    python docs/saebench_native.py CKPT ours.json

It builds TransformerLens's HookedTransformer from the embedded weights with from_pretrained's
processing (RMSNorm gains folded into the next weights, the unembedding centred), exports the SAE
to SAELens (`interop.export_saelens`, architecture topk), packs the held-out documents in our
order with SAELens's own ActivationsStore (128-token contexts, 16 a batch) and runs sae_bench
0.6.0's `run_evals` and `calculate_misc_metrics` with the CoreEvalConfig fields our file
records, then prints every metric of both files and the largest relative difference.
"""
import json
import os
import sys
import tempfile
import time

import torch
from datasets import Dataset
from sae_bench.evals.core import main as core_main
from sae_bench.evals.core.eval_config import CoreEvalConfig
from sae_bench.sae_bench_utils.general_utils import load_and_format_sae
from sae_lens import SAE
from sae_lens.training.activations_store import ActivationsStore
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformer_lens.pretrained.weight_conversions import convert_llama_weights

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import data  # noqa: E402  (this project, importable here)
import inference  # noqa: E402
import model  # noqa: E402
from extras import interop  # noqa: E402

COMPUTE = ("compute_kl", "compute_ce_loss", "compute_l2_norms", "compute_sparsity_metrics",
           "compute_variance_metrics", "compute_featurewise_density_statistics",
           "compute_featurewise_weight_based_metrics",
           "exclude_special_tokens_from_reconstruction")


def hooked_smollm(lm, tok):
    """TransformerLens's HookedTransformer of a transformers Llama, as from_pretrained would
    build and process it (SmolLM2 is not in its list of official models)."""
    c = lm.config
    rope = getattr(c, "rope_parameters", None) or {"rope_theta": c.rope_theta}  # transformers 5, 4
    cfg = HookedTransformerConfig(
        d_model=c.hidden_size, n_layers=c.num_hidden_layers, n_heads=c.num_attention_heads,
        d_head=c.hidden_size // c.num_attention_heads, n_key_value_heads=c.num_key_value_heads,
        d_mlp=c.intermediate_size, d_vocab=c.vocab_size, n_ctx=2048, act_fn="silu",
        normalization_type="RMS", positional_embedding_type="rotary",
        rotary_dim=c.hidden_size // c.num_attention_heads, rotary_base=rope["rope_theta"],
        gated_mlp=True, final_rms=True, eps=c.rms_norm_eps, rotary_adjacent_pairs=False,
        original_architecture="LlamaForCausalLM", default_prepend_bos=False,
        tokenizer_prepends_bos=False)
    hooked = HookedTransformer(cfg, tokenizer=tok)
    state = convert_llama_weights(lm, cfg)
    hooked.load_and_process_state_dict(state, fold_ln=True, center_writing_weights=False,
                                       center_unembed=True, fold_value_biases=True)
    return hooked.eval()


def native(checkpoint, ours):
    """sae_bench's metrics of the checkpoint, with the eval_config of our file (ours)."""
    sae, config, _ = inference.load_sae(checkpoint, None, "cpu", "float32")
    lm, tok = model.load_model(config["model_name"], "cpu", torch.float32)
    hooked = hooked_smollm(lm, tok)
    folder = tempfile.mkdtemp()
    interop.export_saelens(sae, dict(config, folded=True), folder, "topk")  # load_sae folded it
    theirs_sae = load_and_format_sae("ours", SAE.load_from_disk(folder), "cpu")[1]
    texts = list(data.iter_documents(config["dataset_path"], "eval", epochs=1))
    store = ActivationsStore(
        model=hooked, dataset=Dataset.from_dict({"text": texts}), streaming=False,
        hook_name=theirs_sae.cfg.metadata.hook_name, hook_head_index=None, context_size=128,
        d_in=sae.d_model, n_batches_in_buffer=2, total_training_tokens=10**6,
        store_batch_size_prompts=16, train_batch_size_tokens=4096, prepend_bos=True,
        normalize_activations="none", device=torch.device("cpu"), dtype="float32")
    mine = ours["eval_config"]
    eval_config = CoreEvalConfig(
        batch_size_prompts=16, context_size=128, dataset=mine["dataset"],
        n_eval_reconstruction_batches=mine["n_eval_reconstruction_batches"],
        n_eval_sparsity_variance_batches=mine["n_eval_sparsity_variance_batches"],
        **{flag: True for flag in COMPUTE})
    ignore = {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}
    metrics, per_feature = core_main.run_evals(theirs_sae, store, hooked, eval_config,
                                               ignore_tokens=ignore)
    metrics["misc_metrics"] = core_main.calculate_misc_metrics(per_feature)
    return metrics


def main(checkpoint, ours_path):
    ours = json.load(open(ours_path))
    started = time.time()
    theirs = native(checkpoint, ours)
    print(f"sae_bench natively: {time.time() - started:.0f} s")
    worst = 0.0
    print(f"| {'metric':<44} | {'ours':>12} | {'sae_bench':>12} |")
    for group, values in theirs.items():
        for key, value in values.items():
            mine = ours["eval_result_metrics"][group][key]
            worst = max(worst, abs(mine - value) / max(abs(value), 1e-12))
            print(f"| {group + '.' + key:<44} | {mine:>12.6g} | {value:>12.6g} |")
    print(f"largest relative difference: {worst:.2g}")


if __name__ == "__main__":
    main(*sys.argv[1:])
