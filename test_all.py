"""Tests as a spec: one section per file, in README's reading order (the method's files, the
benchmarks, then extras/); each section opens with the property it proves.

    python -m pytest -q test_all.py                  # everything: a few minutes on 2 CPU cores
    python -m pytest -q -m "not slow" test_all.py    # the fast tier: about a minute

Most tests run a tiny random Llama built from a config, or planted activations. Those marked slow
train on or evaluate the real SmolLM2-135M that the package ships (dequantized once), or start
processes. Training runs in this process, except where a process boundary is the point: the CLI
contract (exit code, stderr), kill -9, torchrun.
"""
import ast
import contextlib
import gc
import copy
import html.parser
import importlib
import io
import itertools
import json
import math
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import time
import tokenize
import types
import weakref

import datasets
import huggingface_hub
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

import attribute
import bench
import buffer
import data
import evaluate
import formats
import inference
import metrics
import model
import parallel
import planted
import postprocess
import recipe
import train
from extras import activations, attribution, chats, checks, flags, influence, interop
from extras import long_context, noise, plan, plots, replacement, saebench, scope, synthetic
from extras import tracking
from sae import SAE

HERE = os.path.dirname(os.path.abspath(__file__))


# ================================================================================= shared fixtures
# Small models and data that several sections use, and the one-line-error check.


def interop_package(name):
    """The interop tests' packages (sae-lens, sae-bench): skipped where they are not installed,
    but required where .ci/run sets LLAMA_SCOPE_INTEROP=1, so CI cannot skip them."""
    if os.environ.get("LLAMA_SCOPE_INTEROP") == "1":
        return importlib.import_module(name)
    return pytest.importorskip(name)


def tiny_llama(n_layers=4, d=64, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=d, intermediate_size=128, num_hidden_layers=n_layers,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=100,
                      max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                      attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).eval()


def run_train(*args, cwd=HERE):
    """train.py as a user runs it; returns (exit code, stdout, stderr)."""
    p = subprocess.run([sys.executable, "train.py", *args], cwd=cwd, capture_output=True,
                       text=True)
    return p.returncode, p.stdout, p.stderr


def one_line_error(capsys, fn, *args):
    """Run fn(*args) expecting exit code 2 with exactly one line on stderr; return that line."""
    with pytest.raises(SystemExit) as e:
        fn(*args)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1, err
    return err


def refuse_model_load(monkeypatch):
    """Any load of the LM's weights fails the test: the check must come before."""
    def refuse(*args, **kwargs):
        pytest.fail("model was loaded")
    monkeypatch.setattr(model, "load_model", refuse)


def tensors(path):
    return load_file(path)


@pytest.fixture(scope="module")
def smollm():
    return model.load_model()


def planted_file(tmp_path, n=60_000, d=64, n_true=128, active=3, seed=0):
    """Activations that are sparse nonnegative mixes of unit directions, saved for
    --activations: (path, directions)."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.nn.functional.normalize(torch.randn(n_true, d, generator=g), dim=1)
    idx = torch.rand(n, n_true, generator=g).argsort(dim=1)[:, :active]
    coef = torch.zeros(n, n_true).scatter_(1, idx, 0.5 + torch.rand(n, active, generator=g))
    path = str(tmp_path / "planted.safetensors")
    save_file({"activations": coef @ dirs}, path)
    return path, dirs


@pytest.fixture(scope="module")
def planted_sae(tmp_path_factory):
    """An SAE trained by train.py --activations on planted features: (checkpoint, directions,
    the activations file)."""
    tmp = tmp_path_factory.mktemp("planted")
    path, dirs = planted_file(tmp)
    paths = train.main(["--activations", path, "--expansion", "8", "--k", "3",
                        "--total-tokens", "800000", "--passes", "1", "--buffer-size", "16384",
                        "--batch-size", "1024", "--lr", "3e-3", "--out", str(tmp)])
    return paths[-1], dirs, path


@pytest.fixture(scope="module")
def embedded_ckpt(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("embedded")
    return train.main(["--layer", "3", "--site", "R", "--expansion", "2", "--total-tokens",
                       "8192", "--buffer-size", "4096", "--batch-size", "1024", "--eval-tokens",
                       "1000", "--out", str(tmp)])[-1]


@pytest.fixture(scope="module")
def embedded_rows(smollm, embedded_ckpt, tmp_path_factory):
    """~3K held-out L3R activations of the embedded model, saved for --activations."""
    lm, tok = smollm
    docs = data.iter_documents(split="eval", epochs=1)
    batches = data.token_batches(tok, docs, 1024, 16)
    rows = (out[(3, "R")] for out in data.activation_producer(lm, tok, [(3, "R")], batches))
    rows = data.take_rows(rows, 3000)[:3000]
    path = str(tmp_path_factory.mktemp("rows") / "rows.safetensors")
    save_file({"activations": rows}, path)
    return path, rows


def write_released(folder, config, tensors, theta, dtype=torch.float32, lm_config=True):
    """A folder in the released layout (paper_notes.md) from one of our unfolded checkpoints."""
    os.makedirs(os.path.join(folder, "checkpoints"), exist_ok=True)
    hp = {k: config[k] for k in (
        "d_model", "d_sae", "expansion_factor", "hook_point_in", "hook_point_out",
        "dataset_average_activation_norm", "top_k", "sparsity_include_decoder_norm",
        "apply_decoder_bias_to_pre_encoder", "use_decoder_bias", "norm_activation",
        "init_decoder_norm")}
    hp.update(act_fn="jumprelu", jump_relu_threshold=theta, k_warmup_steps=0,
              use_batch_norm_mse=False)
    with open(os.path.join(folder, "hyperparams.json"), "w") as f:
        json.dump(hp, f)
    if lm_config:
        with open(os.path.join(folder, "lm_config.json"), "w") as f:
            json.dump({"model_name": config["model_name"], "d_model": config["d_model"]}, f)
    save_file({k: v.to(dtype) for k, v in tensors.items()},
              os.path.join(folder, "checkpoints", "final.safetensors"))
    return folder


@pytest.fixture(scope="module")
def released_embedded(embedded_ckpt, embedded_rows, tmp_path_factory):
    """(our JumpReLU file, the same SAE as a released folder): theta fitted by postprocess.py."""
    tmp = tmp_path_factory.mktemp("released")
    folded = str(tmp / "L3R-JumpReLU.safetensors")
    postprocess.main([embedded_ckpt, "--activations", embedded_rows[0], "--out", folded])
    config, t = formats.read_checkpoint(embedded_ckpt)
    theta = formats.read_checkpoint(folded)[0]["jump_relu_threshold"]
    return folded, write_released(str(tmp / "Llama3_1-8B-Base-L3R-2x"), config, t, theta)


def tiny_lm_folder(folder, n_layers=3):
    """A random 3-block Llama (D 64) with SmolLM2's tokenizer, saved as a Hub-style folder: a
    model train.py and evaluate.py load by path, fast enough for a whole scope."""
    tok = model.load_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=n_layers,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tok),
                      max_position_embeddings=1024, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


SCOPE = ["--layer", "all", "--site", "all", "--expansion", "2", "--k", "8", "--total-tokens",
         "8192", "--buffer-size", "4096", "--batch-size", "256", "--context-size", "128",
         "--eval-tokens", "0"]


@pytest.fixture(scope="module")
def tiny_scope(tmp_path_factory):
    """(the tiny LM's folder, a folder of its 12 SAEs: every layer x R, A, M, TC, from one LM
    pass)."""
    tmp = tmp_path_factory.mktemp("scope")
    lm = tiny_lm_folder(tmp / "lm")
    train.main(["--model", lm, *SCOPE, "--out", str(tmp / "out")])
    return lm, str(tmp / "out")


def trained_like(transcoder, seed=0, skip=False):
    """A float64 SAE with uneven decoder norms, biases and S_in != S_out (a skip transcoder: a
    W_skip too), plus raw data (N, D) x 2."""
    torch.manual_seed(seed)
    sae = SAE(32, 256, k=8, transcoder=transcoder, skip=skip).double()
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(256, 1, dtype=torch.float64) * 2 + 0.1)
        sae.b_enc.normal_(0, 0.3)
        sae.b_dec.normal_(0, 0.3)
        if skip:
            sae.W_skip.normal_(0, 0.1)
    x = torch.randn(400, 32, dtype=torch.float64) * 40 + 5
    y = torch.randn(400, 32, dtype=torch.float64) * 3 if transcoder else x
    sae.set_norms_(x, y)
    return sae, x, y


def random_rows(tmp_path, n, d=16, name="a.safetensors"):
    """n random rows (N, d) saved for --activations; returns the path."""
    path = str(tmp_path / name)
    save_file({"activations": torch.randn(n, d)}, path)
    return path


# ========================================================================================== sae.py
# Sparse equals dense: the TopK selection (decoder norms in the ranking) and the sparse
# gradients equal a brute-force dense reference, also from bf16 rows; the init and the dataset-wise
# normalization are the paper's, and the mean bias init centres every feature.


def test_topk_matches_brute_force_with_uneven_decoder_norms():
    torch.manual_seed(0)
    sae = SAE(16, 128, k=6).double()
    with torch.no_grad():  # decoder norms spread over three orders of magnitude
        spread = torch.logspace(-1.5, 1.5, 128, dtype=torch.float64)[torch.randperm(128), None]
        sae.W_dec.mul_(spread)
        sae.b_enc.normal_()
    x = torch.randn(64, 16, dtype=torch.float64)
    vals, idx = sae.encode(x)
    h = torch.relu(x @ sae.W_enc.T + sae.b_enc)
    norms = sae.W_dec.norm(dim=1)
    for n in range(64):  # brute force: sort every feature by h_i * ||W_dec[i]||
        order = sorted(range(128), key=lambda i: -(h[n, i] * norms[i]).item())[:6]
        assert set(idx[n].tolist()) == set(order)
        torch.testing.assert_close(vals[n].sort().values, h[n, order].sort().values)  # unscaled h
    assert vals.shape == (64, 6) and ((vals > 0).sum(1) == 6).all()  # exactly k kept
    x_hat, f = sae.forward_dense(x)
    assert ((f != 0).sum(1) == 6).all()
    torch.testing.assert_close(sae(x)[0], x_hat)


@pytest.mark.parametrize("transcoder,skip", [(False, False), (True, False), (True, True)])
def test_sparse_gradients_equal_the_dense_reference(transcoder, skip):
    torch.manual_seed(1)
    sae = SAE(24, 192, k=9, transcoder=transcoder, skip=skip).double()
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(192, 1, dtype=torch.float64) * 3)
        sae.b_enc.normal_(0, 0.1)
        if skip:
            sae.W_skip.normal_(0, 0.1)
    x = torch.randn(50, 24, dtype=torch.float64)
    y = torch.randn(50, 24, dtype=torch.float64) if transcoder else x
    grads = []
    for forward in (sae.forward, sae.forward_dense):
        sae.zero_grad()
        x_hat, _ = forward(x)
        (x_hat - y).pow(2).mean().backward()
        grads.append([p.grad.clone() for p in sae.parameters()])
    for sparse, dense in zip(*grads):
        assert ((sparse - dense).norm() / dense.norm()).item() < 1e-6
    assert len(grads[0]) == 4 + skip  # W_skip learns too


def test_a_skip_transcoder_starts_as_a_plain_one_and_learns_a_linear_path():
    """W_skip (D, D) is zero at init, so a skip transcoder starts as the same map as a plain
    one; trained on a target that is a linear map of the input, its W_skip takes it up."""
    torch.manual_seed(0)
    plain = SAE(16, 64, k=4, transcoder=True)
    torch.manual_seed(0)
    skip = SAE(16, 64, k=4, transcoder=True, skip=True)
    x = torch.randn(256, 16)
    y = x @ torch.randn(16, 16)
    for sae in (plain, skip):
        sae.set_norms_(x, y)
    torch.testing.assert_close(plain.loss(x, y)["loss"], skip.loss(x, y)["loss"])
    assert skip.W_skip.shape == (16, 16) and not skip.W_skip.any()
    opt = torch.optim.Adam(skip.parameters(), lr=1e-2)
    for _ in range(300):
        opt.zero_grad()
        skip.loss(x, y)["loss"].backward()
        opt.step()
    assert skip.loss(x, y)["ev"] > 0.95 and skip.W_skip.abs().sum() > 0


def test_bf16_rows_into_float32_weights_give_float32_gradients():
    """Rows straight from a bf16 buffer into a float32 SAE that computes in bf16 (bench.py's step,
    and `forward_dense`): the sparse backward returns float32 gradients close to those of the
    same rows in float32, and the dense reference agrees with the sparse path."""
    torch.manual_seed(0)
    sae = SAE(64, 256, k=8)
    sae.set_norms_(torch.ones(1, 64), torch.ones(1, 64))
    sae.compute_dtype = torch.bfloat16
    x = torch.randn(128, 64).to(torch.bfloat16)
    grads = {}
    for name, rows in (("bf16", x), ("fp32", x.float())):
        sae.zero_grad()
        x_hat, _ = sae(rows)
        (x_hat.float() - rows.float()).pow(2).mean().backward()
        grads[name] = sae.W_enc.grad.clone()
    assert grads["bf16"].dtype == torch.float32 and grads["bf16"].abs().sum() > 0
    torch.testing.assert_close(grads["bf16"], grads["fp32"], rtol=0.05, atol=1e-4)
    with torch.no_grad():  # bf16 rounding may swap near-tied features: close, not equal
        dense = sae.forward_dense(x)[0].float()
        sparse = sae(x)[0].float()
        assert (dense - sparse).norm() < 0.2 * sparse.norm()


def test_init_norms():
    sae = SAE(64, 512)  # 8x: decoder columns sqrt(2 / 8) = 0.5, encoder = decoder transpose
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.full((512,), 0.5))
    assert torch.equal(sae.W_enc, sae.W_dec) and sae.b_enc.abs().sum() == 0
    tc = SAE(64, 2048, transcoder=True, init_decoder_norm=0.5)
    torch.testing.assert_close(tc.W_dec.norm(dim=1), torch.full((2048,), 0.5))
    torch.testing.assert_close(tc.W_enc.norm(dim=1), torch.full((2048,), 0.5))
    assert not torch.equal(tc.W_enc, tc.W_dec)  # transcoders: encoder not tied
    mean_norm = SAE(64, 2048).W_dec.norm(dim=1).mean().item()
    assert math.isclose(mean_norm, math.sqrt(2 / 32), rel_tol=1e-5)


def test_mean_bias_init_centres_every_feature_on_the_data():
    """--init-bias mean: the SAE starts by reconstructing the mean target, and every feature
    reads x - E[x] (its pre-activation at the mean input is 0), in the normalized space."""
    torch.manual_seed(0)
    x_in = torch.randn(500, 16) + 5
    x_out = torch.randn(500, 16) * 3 - 2
    sae = SAE(16, 64, k=4, transcoder=True)
    sae.set_norms_(x_in, x_out, center=True)
    s_in, s_out = sae.scales()
    torch.testing.assert_close(sae.b_dec, x_out.mean(0) * s_out)
    h_at_mean = sae.W_enc @ (x_in.mean(0) * s_in) + sae.b_enc
    assert h_at_mean.abs().max() < 1e-4
    plain = SAE(16, 64, k=4)
    plain.set_norms_(x_in, x_in)  # the paper's init: biases stay 0
    assert plain.b_dec.abs().max() == 0 and plain.b_enc.abs().max() == 0


def test_normalization_and_loss_are_scale_invariant():
    torch.manual_seed(0)
    sae = SAE(32, 256, k=8)
    x = torch.randn(500, 32) * 7 + 3
    sae.set_norms_(x, x)
    s_in, s_out = sae.scales()
    assert math.isclose((x * s_in).norm(dim=1).mean().item(), math.sqrt(32), rel_tol=1e-5)
    a = sae.loss(x, x)
    sae.set_norms_(100 * x, 100 * x)  # the same data 100x larger: normalization absorbs it
    b = sae.loss(100 * x, 100 * x)
    torch.testing.assert_close(a["loss"], b["loss"], rtol=1e-4, atol=1e-6)


# ======================================================================================= buffer.py
# The buffer trains on a full buffer, refills at half and shuffles, serves every row exactly
# `passes` times from bounded memory, asks the producer for no row it will not use, and one LM
# pass feeds every place's buffer.


def counting_producer(log, chunk=37, n=None):
    """Rows 0, 1, 2, ... in chunks; log records how many rows have been produced."""
    i = 0
    while n is None or i < n:
        m = chunk if n is None else min(chunk, n - i)
        log.append(i + m)
        yield torch.arange(i, i + m, dtype=torch.float32)[:, None]
        i += m


def test_buffer_waits_refills_at_half_serves_once_and_shuffles():
    log = []
    buf = buffer.ActivationBuffer(counting_producer(log, n=5000), size=1000, batch_size=100,
                                  seed=0)
    assert log == []  # nothing is made before the first batch is asked for
    served = []
    made_before = []
    while (b := buf.next_batch()) is not None:
        made_before.append(log[-1])
        served.append(b[:, 0].long())
    assert made_before[0] >= 1000  # training starts on a full buffer
    # a refill happens when half the buffer has been read: the 6th batch sees ~500 new rows
    assert made_before[4] == made_before[0] and 1500 <= made_before[5] < 1500 + 37
    served = torch.cat(served)
    assert sorted(served.tolist()) == list(range(5000))  # every row exactly once
    first = served[:500]  # rows served before the first refill come from the first fill
    assert first.max() < made_before[0]
    after = served[500:1000]  # after the refill, old unread rows and new rows are mixed
    assert (after < 1000).any() and (after >= 1000).any()
    assert not torch.equal(first, first.sort().values)  # shuffled, not in production order


def test_buffer_limit_takes_exactly_what_is_needed():
    log = []
    buf = buffer.ActivationBuffer(counting_producer(log), size=400, batch_size=50,
                                  rows_to_serve=1000)
    n = sum(len(b) for b in iter(buf.next_batch, None))
    assert n == 1000 and log[-1] < 1000 + 37


@pytest.mark.parametrize("passes", [3, 8])
def test_buffer_serves_every_row_passes_times_from_bounded_memory(passes):
    """A short run reuses its LM rows: each row is served exactly `passes` times (those of the
    first fill at most that often), the producer makes only the rows needed, the buffer never
    holds more than `size` rows, and a row's uses are spread over the run, not back to back."""
    log = []
    buf = buffer.ActivationBuffer(counting_producer(log), size=1000, batch_size=50, seed=0,
                                  rows_to_serve=20_000, passes=passes)
    served = []
    when = {}
    for step, b in enumerate(iter(buf.next_batch, None)):
        assert len(buf.data) <= 1000
        served.append(b[:, 0].long())
        for r in b[:, 0].long().tolist():
            when.setdefault(r, []).append(step)
    served = torch.cat(served)
    assert len(served) == 20_000
    counts = torch.bincount(served)
    first = counts[:1000]  # the first fill: staggered over 1..passes uses
    later = counts[1000:]
    assert first.max() <= passes and (later[later > 0] == passes).float().mean() > 0.9
    made = log[-1]
    assert made < 20_000 * 2 / (passes + 1) + 1000  # about 1/passes of the rows served
    gaps = [max(w) - min(w) for r, w in when.items() if len(w) == passes and r >= 1000]
    assert sum(gaps) / len(gaps) > 5 * passes  # uses of one row lie far apart


def test_a_buffer_continues_exactly_from_its_state():
    """state_dict() mid-run, loaded into a new buffer over a producer that goes on where the
    first one stood, serves the same rows in the same order as the buffer never stopped."""
    log = []
    whole = buffer.ActivationBuffer(counting_producer(log, n=3000), 500, 50, seed=1,
                                    rows_to_serve=4000, passes=2)
    for _ in range(30):
        whole.next_batch()
    state = copy.deepcopy(whole.state_dict())
    made = log[-1]
    rest = list(iter(whole.next_batch, None))
    later = (rows for rows in counting_producer([], n=3000) if rows[0, 0] >= made)
    again = buffer.ActivationBuffer(later, 500, 50, seed=99, rows_to_serve=4000, passes=2)
    again.load_state_dict(state)
    resumed = list(iter(again.next_batch, None))
    assert len(resumed) == len(rest) > 10
    assert all(torch.equal(a, b) for a, b in zip(rest, resumed))


def test_fan_out_runs_the_producer_once_for_every_place():
    calls = []

    def producer():
        for i in range(3):
            calls.append(i)
            yield {"a": torch.full((2, 1), i), "b": torch.full((3, 1), -i)}
    streams = buffer.FanOut(producer(), ["a", "b"])
    a = list(streams["a"])
    b = list(streams["b"])
    assert calls == [0, 1, 2] and [x[0, 0].item() for x in a] == [0, 1, 2] and streams.made == 3
    assert [x.shape[0] for x in b] == [3, 3, 3]


# ======================================================================================== model.py
# The LM side reads exactly the tensors the paper names: every site equals an independent
# computation of the block, the forward stops after the deepest hooked layer, from_layer gives
# the full forward's logits, and hook names map back to places.


def call_recorder(calls, name):
    """A forward hook that notes `name` in calls each time its module runs."""
    def hook(module, args, output):
        calls.append(name)
    return hook


def record_blocks(lm, calls):
    """Hooks noting every block and the final norm as they run; returns the handles."""
    handles = [block.register_forward_hook(call_recorder(calls, i))
               for i, block in enumerate(lm.model.layers)]
    handles.append(lm.model.norm.register_forward_hook(call_recorder(calls, "norm")))
    return handles


@torch.no_grad()
def test_sites_match_an_independent_block_computation():
    lm = tiny_llama()
    ids = torch.randint(3, 100, (2, 12))
    full = lm.model(ids, output_hidden_states=True)
    L = 2
    block = lm.model.layers[L]
    h = full.hidden_states[L]  # the block's input
    pos = lm.model.rotary_emb(h, torch.arange(12)[None])
    attn = block.self_attn(block.input_layernorm(h), position_embeddings=pos,
                           attention_mask=None)[0]
    mid = h + attn
    mlp_in = block.post_attention_layernorm(mid)
    mlp_out = block.mlp(mlp_in)
    acts = model.capture(lm, ids, torch.ones_like(ids), [(L, s) for s in model.SITES])
    torch.testing.assert_close(acts[(L, "A")][0], attn)
    torch.testing.assert_close(acts[(L, "M")][0], mlp_out)
    torch.testing.assert_close(acts[(L, "R")][0], mid + mlp_out)
    torch.testing.assert_close(acts[(L, "R")][0], full.hidden_states[L + 1])  # hidden_states[L+1]
    torch.testing.assert_close(acts[(L, "TC")][0], mlp_in)
    torch.testing.assert_close(acts[(L, "TC")][1], mlp_out)


@torch.no_grad()
def test_forward_stops_after_the_deepest_hooked_layer():
    lm = tiny_llama()
    ids = torch.randint(3, 100, (2, 10))
    calls = []
    handles = record_blocks(lm, calls)
    early = model.capture(lm, ids, torch.ones_like(ids), [(0, "R"), (1, "M")])
    assert calls == [0, 1]  # layers 2, 3, the final norm and the LM head never ran
    full = model.capture(lm, ids, torch.ones_like(ids), [(0, "R"), (1, "M"), (3, "R")])
    for handle in handles:
        handle.remove()
    for place in [(0, "R"), (1, "M")]:
        assert torch.equal(early[place][0], full[place][0])


@torch.no_grad()
def test_from_layer_gives_the_full_forwards_logits():
    """The scope evaluation runs each splice from its own block on, starting from the residual
    stream the clean pass recorded: the logits equal the full forward's, with padding."""
    lm = tiny_llama()
    ids = torch.randint(3, 100, (2, 10))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    full = lm(input_ids=ids, attention_mask=mask).logits
    with model.recording(lm, [(2, "R")], [2]) as acts:
        lm(input_ids=ids, attention_mask=mask)
    with model.from_layer(lm, 2):
        later = lm(inputs_embeds=acts[("resid", 2)][0], attention_mask=mask).logits
    torch.testing.assert_close(later[mask.bool()], full[mask.bool()])


@torch.no_grad()
def test_embedded_sites_and_early_stop(smollm):
    lm, tok = smollm
    ids = torch.tensor([[tok.bos_token_id] + tok("The capital of France is Paris.")["input_ids"]])
    full = lm.model(ids, output_hidden_states=True)
    ran = []  # the blocks the capture runs, and whether the final norm does
    handles = record_blocks(lm, ran)
    try:
        acts = model.capture(lm, ids, torch.ones_like(ids), [(15, "R"), (23, "R")])
    finally:
        for handle in handles:
            handle.remove()
    assert ran == list(range(24))  # stopped after block 23: blocks 24-29 and the norm never ran
    torch.testing.assert_close(acts[(15, "R")][0], full.hidden_states[16])
    torch.testing.assert_close(acts[(23, "R")][0], full.hidden_states[24])
    assert lm.config.num_hidden_layers == 30 and lm.config.hidden_size == 576


def test_hook_names_map_back_to_our_places():
    for layer in (0, 7, 31):
        for site in model.SITES:
            assert model.place_of(*model.hook_names(layer, site)) == (layer, site)
    assert model.place_of("blocks.15.ln2.hook_normalized", "blocks.15.hook_mlp_out") == (15, "TC")
    with pytest.raises(ValueError, match="not a Llama Scope site"):
        model.place_of("blocks.3.hook_resid_pre", "blocks.3.hook_resid_pre")


# ========================================================================================= data.py
# Text becomes rows as §3.1 says: special tokens and padding never become rows, documents get
# BOS and are truncated and padded, every prefix of the token stream is representative of the
# split, the held-out split is disjoint and mixed, outliers over the norm limit are left out.


@torch.no_grad()
def test_special_tokens_and_padding_are_dropped():
    lm = tiny_llama()
    tok = types.SimpleNamespace(bos_token_id=1, eos_token_id=2, pad_token_id=2)
    ids = torch.tensor([[1, 5, 6, 7, 2, 8], [1, 9, 10, 2, 2, 2]])  # BOS ... EOS, then padding
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    rows = next(data.activation_producer(lm, tok, [(1, "R"), (1, "TC")], [(ids, mask)]))
    ordinary = mask.bool() & (ids > 2)
    assert rows[(1, "R")].shape == (ordinary.sum().item(), 64)  # 6 of 12 positions
    assert rows[(1, "TC")].shape == (6, 128)  # input | target
    full = model.capture(lm, ids, mask, [(1, "R")])[(1, "R")][0]
    torch.testing.assert_close(rows[(1, "R")], full[ordinary])


def test_every_token_the_tokenizer_marks_special_is_unscored():
    """Not only BOS/EOS/PAD: a chat template's turn markers and every added token flagged special
    (SmolLM2 flags 17, its all_special_ids lists 3) are never trained on, replaced or scored."""
    tok = model.load_tokenizer()
    text = "<|im_start|>user\nThe file <filename>a.py in <repo_name>x<|im_end|>\n"
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    marked = {i for i, t in tok.added_tokens_decoder.items() if t.special}
    assert len(marked) == 17 > len(tok.all_special_ids) and {1, 2, 3, 6} <= set(ids[0].tolist())
    keep = data.scored_positions(ids, torch.ones_like(ids), tok)[0]
    assert keep.tolist() == [i not in marked for i in ids[0].tolist()]
    assert keep.sum() >= 8  # the ordinary tokens are scored


class WordTokenizer:
    """Every word one token (10 + its length); BOS 1, padding 2."""
    bos_token_id = 1
    pad_token_id = 2

    def __call__(self, texts, add_special_tokens):
        return {"input_ids": [[10 + len(w) for w in t.split()] for t in texts]}


def test_token_batches_prepend_bos_truncate_and_pad():
    docs = ["a bb ccc", "dddd", "e f g h i j k l m n o p"]
    batches = list(data.token_batches(WordTokenizer(), docs, context_size=5, lm_batch_size=2))
    seqs = [row[m.bool()].tolist() for ids, mask in batches for row, m in zip(ids, mask)]
    assert sorted(seqs, key=len) == [[1, 14], [1, 11, 12, 13], [1, 11, 11, 11, 11]]
    assert all(ids[~mask.bool()].eq(2).all() for ids, mask in batches)


def test_every_prefix_of_the_token_stream_is_representative_and_pads_little():
    """Norms, the outlier limit, theta, the held-out check and feature contexts all read a prefix
    of this stream: the documents behind the first 10% of tokens must have the split's length
    distribution (two-sample KS distance), the stream no length trend, batches little padding."""
    g = torch.Generator().manual_seed(0)
    lengths = (torch.rand(4000, generator=g) ** 3 * 1000).long() + 2  # skewed as real text is
    docs = [" ".join(["w"] * n) for n in lengths.tolist()]
    batches = list(data.token_batches(WordTokenizer(), docs, 1024, 16))
    per_batch = [mask.sum(1) for _, mask in batches]  # (B,) document lengths + BOS
    total = sum(m.sum() for m in per_batch)
    seen = 0
    sample = []
    for m in per_batch:
        if seen >= 0.1 * total:
            break
        sample.append(m)
        seen += m.sum()
    sample = torch.cat(sample).float()
    split = torch.cat(per_batch).float()

    def cdf(lens, v):  # share of TOKENS that sit in documents of length <= v
        return (lens * (lens <= v)).sum() / lens.sum()
    ks = max(abs(cdf(sample, v) - cdf(split, v)).item() for v in split.unique())
    assert ks < 0.2, f"documents behind the first 10% of tokens differ from the split: KS {ks}"
    pool = torch.stack([m.float().mean() for m in per_batch[:64]])  # the first pool's batches
    trend = torch.corrcoef(torch.stack([torch.arange(64.0), pool]))[0, 1].item()
    assert abs(trend) < 0.3, f"document length trends along the stream: r = {trend:.2f}"
    padded = sum(mask.numel() for _, mask in batches) / split.sum().item() - 1
    assert padded < 0.1, f"{padded:.0%} padding"


def test_heldout_split_is_disjoint_and_deterministic():
    train_docs = set(data.iter_documents(split="train", epochs=1))
    held = list(data.iter_documents(split="eval", epochs=1))
    assert len(held) == 1003 and len(train_docs) > 8900  # every 10th of the 10,033 summaries
    assert not train_docs & set(held)
    assert held == list(data.iter_documents(split="eval", epochs=1, seed=7))  # one order


def test_any_prefix_of_the_heldout_stream_mixes_topics(tmp_path):
    """The embedded file runs topic by topic (12 topics); held-out documents are read in one
    seeded order, so the first 100 (~10K tokens) already hold every topic. A local file sorted
    by topic is mixed the same way."""
    topic = {a["extract"]: a["topic"] for a in data._embedded_articles()}
    held = list(data.iter_documents(split="eval", epochs=1))
    assert len({topic[d] for d in held[:100]}) == 12
    articles = enumerate(data._embedded_articles())
    in_file = [a["extract"] for i, a in articles if data.is_heldout(i)]
    assert sorted(held) == sorted(in_file) and len({topic[d] for d in in_file[:100]}) <= 2
    path = tmp_path / "sorted.jsonl"
    path.write_text("".join(json.dumps({"text": f"topic {i // 500} doc {i}"}) + "\n"
                            for i in range(5000)))
    held = list(data.iter_documents(str(path), "eval", epochs=1))
    assert sorted(held) == sorted(f"topic {i // 500} doc {i}" for i in range(9, 5000, 10))
    assert len({d.split()[1] for d in held[:20]}) >= 6  # of 10 topics
    assert sorted(data.mixed(range(1000), 64)) == list(range(1000))


def test_drop_outliers_leaves_out_rows_over_the_limit():
    rows = torch.cat([torch.ones(10, 4), 100 * torch.ones(1, 4)])
    assert len(data.drop_outliers(rows, (10.0, 10.0), 4)) == 10
    assert len(data.drop_outliers(rows, None, 4)) == 11
    limit = data.fit_outlier_norm_limit(rows, 4, 10.0)  # 10 x the median norm (2): 20
    assert limit == pytest.approx((20.0, 20.0)) and data.fit_outlier_norm_limit(rows, 4, 0) is None


# ======================================================================================= recipe.py
# The schedule is the paper's at paper scale and adapts to short budgets; the SAE's weights and
# Adam's state stay float32 under bf16 matmuls; a log line's numbers are the means since the last
# one; Vanilla warms its L1 weight up.


def test_k_annealing_and_lr_schedule():
    assert recipe.k_at(0, 50, 4096, 100) == 4096 and recipe.k_at(100, 50, 4096, 100) == 50
    assert recipe.k_at(50, 50, 4096, 100) == math.ceil((4096 + 50) / 2)
    assert recipe.k_at(10**6, 50, 4096, 100) == 50
    D = 4096
    K = 50
    W = 1000
    m0 = D / (2 * K)  # the released formula with m0 = D / 2K
    for t in (0, 1, 333, 999, 1000):
        assert recipe.k_at(t, K, D // 2, W) == math.ceil(max(1, m0 + (1 - m0) * t / W) * K)
    schedule = recipe.Schedule(steps=1000, warmup=100, decay=200, k_anneal_steps=0, lr=8e-4)
    assert schedule.lr_at(0) == pytest.approx(8e-6) and schedule.lr_at(99) == pytest.approx(8e-4)
    assert schedule.lr_at(500) == schedule.lr_at(799) == 8e-4
    assert schedule.lr_at(800) == pytest.approx(8e-4)
    assert schedule.lr_at(900) == pytest.approx(4e-4)
    assert schedule.lr_at(999) == pytest.approx(4e-6)
    assert recipe.lr_at(999, 1000, 8e-4, 0, 200, 8e-6) > 8e-6


def planned(*args):
    """train.py's flags as its checks leave them: --layer and --site resolved, the budget rule
    applied (checks.check_flags reads the model's config, no weights)."""
    resolved = train.get_args(list(args))
    checks.check_flags(resolved)
    return resolved


def test_budget_rule_adapts_short_runs_and_keeps_the_paper_recipe_at_scale():
    """A short run reuses its rows and takes small batches so it makes thousands of steps;
    explicit flags win; at the paper's 800M tokens the paper's recipe is unchanged."""
    short = planned()
    assert short.passes == recipe.MAX_PASSES and short.batch_size == 256
    assert checks.schedule_for(short).steps >= 10_000 and "passes 8" in short.rule
    paper = planned("--total-tokens", "800000000")
    assert (paper.passes, paper.batch_size) == (1, 2048)
    steps = checks.schedule_for(paper)
    assert (steps.steps, steps.warmup, steps.decay, steps.k_anneal_steps, steps.l1_warmup) == (
        390_625, 10_000, 78_125, 39_062, 0)
    assert short.init_bias == "mean" and paper.init_bias == "zero"
    given = planned("--batch-size", "2048", "--passes", "1", "--init-bias", "zero")
    assert (given.passes, given.batch_size, given.init_bias) == (1, 2048, "zero")
    assert given.rule == "as given"
    assert planned("--batch-size", "1024").passes == recipe.MAX_PASSES
    mid = planned("--total-tokens", "10000000")
    assert mid.passes == 5 and mid.batch_size == 2048
    assert checks.schedule_for(short).warmup == 531  # the paper's 10K, capped at 5%
    assert checks.schedule_for(planned("--warmup-steps", "10000")).warmup == 10_000  # given


def test_budget_rule_reuses_rows_only_while_they_are_costly():
    """Passes follow what a row costs: the LM forward to the deepest site against every SAE it
    feeds. One 8x SAE at layer 15 (LM ~4x the SAE): 8 passes; at layer 3 the forward is 4x
    cheaper: 2; a whole scope of 120 SAEs: fresh rows, 1 pass, its LM cost summed over the
    groups the plan makes (3 under the default 12 GiB: twice one forward's); pre-saved rows: the
    token budget alone."""
    _, _, ratio = plan.costs(model.load_config(), [[(15, "R")]], [4608])
    assert ratio == pytest.approx(4.0, rel=1e-3) and planned().passes == 8
    assert planned("--layer", "3").passes == 2
    whole = planned("--layer", "all", "--site", "all", "--expansion", "4")
    assert (whole.layer, whole.site, whole.passes) == (list(range(30)), list(model.SITES), 1)
    groups = plan.groups(model.load_config(), list(itertools.product(whole.layer, whole.site)),
                         whole, 340_000 // 256, 256, 4)
    assert len(groups) == 3 and "(here 0.25x)" in whole.rule  # one forward's: 0.12x
    assert recipe.budget_rule(340_000)[0] == recipe.MAX_PASSES  # no cost known: --activations


def test_bf16_runs_keep_float32_weights_that_learn_where_bf16_weights_stall():
    """--dtype bfloat16 (the paper's GPU precision) runs the SAE's matmuls in bf16 but keeps its
    weights and Adam state in float32. At a small lr (the tail of the decay), Adam's steps are
    below half a bf16 ulp of the weights: pure bf16 weights round them away and stall, the
    float32 weights learn. Same init, same rows, same steps."""
    g = torch.Generator().manual_seed(0)
    dirs = F.normalize(torch.randn(256, 64, generator=g), dim=1)
    idx = torch.rand(102_400, 256, generator=g).argsort(dim=1)[:, :4]
    coef = torch.zeros(102_400, 256).scatter_(1, idx, 0.5 + torch.rand(102_400, 4, generator=g))
    rows = (coef @ dirs).to(torch.bfloat16)  # the buffer's dtype
    args = train.get_args(["--device", "cpu", "--dtype", "bfloat16", "--k", "4", "--lr", "5e-5"])
    run = types.SimpleNamespace(args=args, comms=parallel.Comms(), dtype=torch.bfloat16)
    torch.manual_seed(0)
    master = train.new_trainer(run, (3, "R"), 256, 64)
    pure = copy.deepcopy(master)
    pure.sae.to(torch.bfloat16)  # what --dtype bfloat16 used to build
    pure.opt = torch.optim.Adam(pure.sae.parameters(), lr=args.lr, betas=args.adam_betas)
    result = {}
    for name, trainer in (("master", master), ("pure", pure)):
        trainer.sae.set_norms_(rows[:4096], rows[:4096], center=True)
        w0 = trainer.sae.W_dec.detach().clone()
        losses = [trainer.step(b, 4, args.lr, 0.0, i) for i, b in enumerate(rows.split(256) * 2)]
        drop = sum(losses[:20]) / 20 - sum(losses[-20:]) / 20
        moved = (trainer.sae.W_dec.detach() != w0).float().mean().item()
        result[name] = (drop, moved)
    assert master.sae.W_dec.dtype == torch.float32
    moments = [s for p in master.opt.state.values() for s in p.values() if s.dim() > 0]
    assert all(s.dtype == torch.float32 for s in moments)  # Adam's moments
    assert master.sae.pre_acts(rows[:8].float()).dtype == torch.bfloat16  # bf16 matmuls
    assert result["master"][0] > 0.03 and result["master"][1] > 0.99  # every weight learns
    assert result["pure"][0] < 0.005 and result["pure"][1] < 0.25  # stalls: most never move


def test_a_log_lines_numbers_are_the_means_since_the_last_line():
    """Trainer.summary: loss, EV and L0 averaged over the steps since the last line (then a
    fresh start); dead: the share of features silent for the last DEAD_WINDOW rows served;
    fired: the share that ever fired; recent: that fired in the last RECENT_WINDOW rows."""
    torch.manual_seed(0)
    sae = SAE(8, 32, k=2)
    x = torch.randn(4, 64, 8)
    sae.set_norms_(x[0], x[0])
    trainer = recipe.Trainer("t", (0, "R"), sae, parallel.Comms(), (0.9, 0.999))
    losses = [trainer.step(rows, 2, 1e-3, 0.0, 64 * (i + 1)) for i, rows in enumerate(x[:3])]
    first = trainer.summary(192)
    assert first["loss"] == pytest.approx(sum(losses) / 3, rel=1e-6)
    assert first["l0"] == pytest.approx(2.0) and first["dead"] == 0
    assert all(values == [] for values in trainer.running.values())
    fired_before = trainer.last_fired > 0
    assert first["fired"] == pytest.approx(fired_before.float().mean().item())
    assert first["recent"] == first["fired"]  # all of it within the last RECENT_WINDOW rows
    served = 192 + recipe.DEAD_WINDOW
    trainer.step(x[3], 2, 1e-3, 0.0, served)
    fired_now = trainer.last_fired == served
    later = trainer.summary(served)
    assert later["dead"] == pytest.approx(1 - fired_now.float().mean().item())
    assert later["recent"] == pytest.approx(fired_now.float().mean().item())
    assert later["recent"] < later["fired"]


def test_vanilla_warms_its_l1_weight_up_linearly(tmp_path, monkeypatch):
    """The released trainer's L1 warm-up: the weight rises linearly over --l1-warmup-frac of the
    steps, then stays; TopK SAEs have none."""
    seen = []
    step = recipe.Trainer.step

    def noting_l1(trainer, rows, k, lr, l1_coef, served):
        seen.append(l1_coef)
        return step(trainer, rows, k, lr, l1_coef, served)
    monkeypatch.setattr(recipe.Trainer, "step", noting_l1)
    train.main(["--activations", random_rows(tmp_path, 4096), "--expansion", "4",
                "--act", "vanilla", "--l1-coef", "1e-3", "--l1-warmup-frac", "0.25",
                "--total-tokens", "4096", "--batch-size", "512", "--buffer-size", "2048",
                "--out", str(tmp_path)])
    assert len(seen) == 64 and seen[0] == pytest.approx(1e-3 / 16)  # 64 steps, 16 warming up
    assert seen[7] == pytest.approx(1e-3 / 2) and seen[15:] == [pytest.approx(1e-3)] * 49
    assert checks.schedule_for(planned()).l1_warmup == 0


# ======================================================================================== train.py
# Training recovers planted features; one LM pass trains every place with its own limit;
# checkpoints describe themselves and a K sweep keeps every one; bad input is one line and exit
# code 2; NaN stops with the step; a killed run resumes bit-identically, also across groups.


def test_training_recovers_planted_features(planted_sae):
    ckpt, dirs, _ = planted_sae
    sae, config = formats.load_checkpoint(ckpt)
    cos = torch.nn.functional.normalize(sae.W_dec, dim=1) @ dirs.T  # (F, n_true)
    recovered = (cos.max(dim=0).values > 0.9).float().mean().item()
    assert recovered >= 0.9, f"only {recovered:.0%} of planted features recovered"


@pytest.mark.slow
def test_several_places_train_from_one_lm_pass(tmp_path, capsys):
    """R and TC at one layer: each place keeps its own outlier limit, buffer and checkpoint."""
    train.main(["--layer", "1", "--site", "R,TC", "--expansion", "1,2", "--total-tokens", "8192",
                "--buffer-size", "4096", "--batch-size", "1024", "--eval-tokens", "0",
                "--out", str(tmp_path)])
    names = [line.removeprefix("saved ") for line in capsys.readouterr().out.splitlines()
             if line.startswith("saved")]
    assert [os.path.basename(n) for n in names] == [
        "L1R-1x-k50-TopK.safetensors", "L1R-2x-k50-TopK.safetensors",
        "L1TC-1x-k50-TopK.safetensors", "L1TC-2x-k50-TopK.safetensors"]
    limits = set()
    for name in names:
        config = formats.load_checkpoint(name)[1]
        assert config["n_training_tokens"] == 8192
        limits.add(tuple(config["outlier_norm_limit"]))
    assert len(limits) == 2  # one limit per place, not the last place's for all


@pytest.mark.slow
@pytest.mark.parametrize("site", ["R", "TC"])
def test_embedded_training_writes_a_self_describing_checkpoint(site, tmp_path, capsys):
    train.main(["--layer", "3", "--site", site, "--expansion", "2", "--total-tokens", "4096",
                "--buffer-size", "4096", "--batch-size", "1024", "--eval-tokens", "1000",
                "--out", str(tmp_path)])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == f"saved {tmp_path}/L3{site}-2x-k50-TopK.safetensors"
    sae, config = formats.load_checkpoint(last.removeprefix("saved "))
    if site == "TC":
        assert config["hook_point_out"] == "blocks.3.hook_mlp_out"
    else:
        assert config["hook_point_in"] == "blocks.3.hook_resid_post"
    assert config["d_model"] == 576 and config["d_sae"] == 1152
    assert config["n_training_tokens"] == 4096
    assert config["step"] * 1024 == config["n_rows_served"]
    assert config["dataset_average_activation_norm"]["in"] > 0
    assert config["heldout"]["n_tokens"] > 0
    assert json.loads(json.dumps(config["train_args"]))["site"] == [site]
    assert (config["device"], config["dtype"]) == ("cpu", "float32")  # where and how it trained


@pytest.mark.slow
def test_cli_contract_bad_input_is_one_line_and_exit_code_2():
    """As a user runs it: a separate process, its exit code and its stderr."""
    code, out, err = run_train("--layer", "30")
    wanted = "error: --layer 30 is out of range: smollm2-135m-instruct has 30 layers, allowed 0-29"
    assert code == 2 and err.strip() == wanted
    code, _, err = run_train("--site", "X")
    assert code == 2 and "--site X is unknown; allowed: all, R, A, M, TC" in err


def test_a_k_sweep_in_one_folder_keeps_every_checkpoint(tmp_path, capsys):
    """K (or the L1 weight) is in the name; an old-style name is refused naming the new ones."""
    args = ["--activations", random_rows(tmp_path, 4096), "--expansion", "4",
            "--total-tokens", "2048", "--batch-size", "512", "--buffer-size", "2048",
            "--out", str(tmp_path)]
    sweep = (["--k", "4"], ["--k", "8"], ["--act", "vanilla", "--k", "4"])
    paths = [train.main(args + extra)[0] for extra in sweep]
    assert [os.path.basename(p) for p in paths] == [
        "L15R-4x-k4-TopK.safetensors", "L15R-4x-k8-TopK.safetensors",
        "L15R-4x-l1_0.0002-Vanilla.safetensors"]
    assert formats.load_checkpoint(paths[1])[0].k == 8 and all(map(os.path.exists, paths))
    err = one_line_error(capsys, evaluate.main, [str(tmp_path / "L15R-4x-TopK.safetensors")])
    assert f"named with K (or the L1 weight) now: {paths[0]}, {paths[1]}" in err


def test_nan_stops_training_and_names_the_step(tmp_path, capsys):
    x = torch.randn(8192, 16)
    x[5000] = float("nan")
    save_file({"activations": x}, str(tmp_path / "nan.safetensors"))
    err = one_line_error(capsys, train.main, [
        "--activations", str(tmp_path / "nan.safetensors"), "--expansion", "4", "--k", "4",
        "--max-norm-ratio", "0", "--batch-size", "1024", "--buffer-size", "8192",
        "--total-tokens", "8192", "--out", str(tmp_path)])
    assert err.startswith("error: step ") and "NaN" in err
    assert not os.path.exists(tmp_path / "L15R-4x-k4-TopK.safetensors")


def test_a_run_that_runs_dry_says_so_and_saves_what_it_trained(tmp_path, capsys, monkeypatch):
    """A finite producer ending before the schedule does (an --activations file is endless,
    so here the buffer is starved): every rank stops together at the same step, and the
    checkpoint's `step` is the steps actually taken."""
    path = random_rows(tmp_path, 4096)
    original = activations.file_producer

    def once(rows, chunk=4096, seed=0):  # one epoch only
        return itertools.islice(original(rows, chunk, seed), 1)
    monkeypatch.setattr(activations, "file_producer", once)
    paths = train.main(["--activations", path, "--expansion", "4", "--k", "4", "--passes", "1",
                        "--total-tokens", "8192", "--batch-size", "512", "--buffer-size",
                        "4096", "--out", str(tmp_path)])
    assert "data ran out at step 8" in capsys.readouterr().out
    assert formats.load_checkpoint(paths[0])[1]["step"] == 8


RESUMABLE = ["--layer", "1", "--expansion", "2", "--total-tokens", "16384",
             "--buffer-size", "4096", "--batch-size", "512", "--save-every", "2048",
             "--eval-tokens", "0"]


def kill_when(proc, ready):
    """SIGKILL the process once ready() holds; it must still have been running."""
    while not ready() and proc.poll() is None:
        time.sleep(0.02)
    time.sleep(0.3)
    proc.kill()
    assert proc.wait() == -9, "the run ended before it could be killed"


@pytest.mark.slow
def test_kill_9_then_resume_ends_bit_identical(tmp_path, capsys):
    a = tmp_path / "a"
    b = tmp_path / "b"
    # a real process, to be killed with SIGKILL; the rest runs in this one
    proc = subprocess.Popen([sys.executable, "train.py", *RESUMABLE, "--out", str(a)], cwd=HERE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_when(proc, (a / "resume.safetensors").exists)
    assert not (a / "L1R-2x-k50-TopK.safetensors").exists()
    assert tensors(str(a / "resume.safetensors"))  # the resume file is complete: it loads
    train.main([*RESUMABLE, "--out", str(a), "--resume", "auto"])
    assert "resuming at step" in capsys.readouterr().out
    train.main([*RESUMABLE, "--out", str(b)])
    ta = tensors(str(a / "L1R-2x-k50-TopK.safetensors"))
    tb = tensors(str(b / "L1R-2x-k50-TopK.safetensors"))
    assert all(torch.equal(ta[k], tb[k]) for k in tb)
    # determinism: the same seed and flags give the same bits
    train.main([*RESUMABLE, "--out", str(tmp_path / "c")])
    tc = tensors(str(tmp_path / "c" / "L1R-2x-k50-TopK.safetensors"))
    assert all(torch.equal(tc[k], tb[k]) for k in tb)
    # a resume checkpoint refuses a different configuration
    err = one_line_error(capsys, train.main, [*RESUMABLE, "--lr", "1e-3", "--out", str(a),
                                              "--resume", "auto"])
    assert "from a different configuration: --lr was 0.0008, now 0.001" in err


@pytest.mark.slow
def test_a_scope_split_into_groups_resumes_bit_identical_after_kill_9(tmp_path, capsys):
    """--max-memory that holds two of the four places trains them as groups one after another,
    each from its own LM pass; a run killed in its second group resumes there (the first
    group's checkpoints kept) and ends with the same bits as a run never stopped."""
    lm = tiny_lm_folder(tmp_path / "lm", n_layers=2)
    places = [(0, "R"), (0, "TC"), (1, "R"), (1, "TC")]
    memory = plan.Memory(model.load_config(lm), [128], 256, 32, 128, 4)
    two = memory.bytes(places[:2], plan.MIN_BUFFER_ROWS)
    args = [*SCOPE, "--site", "R,TC", "--model", lm, "--max-memory",
            f"{(two + 2 ** 20) / plan.GIB:.6f}",
            "--total-tokens", "20480", "--buffer-size", "16384", "--save-every", "2048"]
    a = tmp_path / "a"
    b = tmp_path / "b"
    proc = subprocess.Popen([sys.executable, "train.py", *args, "--out", str(a)], cwd=HERE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = a / "L0R-2x-k8-TopK.safetensors"

    def in_second_group():
        resume = a / "resume.safetensors"
        return first.exists() and resume.stat().st_mtime > first.stat().st_mtime
    kill_when(proc, in_second_group)
    assert not (a / "L1R-2x-k8-TopK.safetensors").exists()
    train.main([*args, "--out", str(a), "--resume", "auto"])
    out = capsys.readouterr().out
    assert "in 2 group(s)" in out and "resuming at step" in out
    paths = train.main([*args, "--out", str(b)])
    assert len(paths) == 4
    for path in paths:
        ta = tensors(str(a / os.path.basename(path)))
        tb = tensors(path)
        assert all(torch.equal(ta[k], tb[k]) for k in tb)


# ===================================================================================== parallel.py
# A sharded step equals one process: dp x tp ranks select the same features and reach the same
# weights as one process on the whole batch; torchrun --tp 2 trains like one process.


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_step_worker(rank, world, tp, port, transcoder, k=5):
    """One training step of a dp x tp sharded SAE vs the same step in one process (float64)."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)  # tiny tensors, several processes on few cores
    torch.manual_seed(0)
    full = SAE(16, 64, k=k, transcoder=transcoder, skip=transcoder).double()
    x = torch.randn(48, 16, dtype=torch.float64)
    y = torch.randn(48, 16, dtype=torch.float64) if transcoder else x
    full.set_norms_(x, y)
    with torch.no_grad():
        f_ref = full.forward_dense(x * full.scales()[0])[1] > 0  # (48, 64): features selected
    ref = copy.deepcopy(full)  # one process, the whole batch
    opt = torch.optim.Adam(ref.parameters(), lr=1e-2)
    out_ref = ref.loss(x, y)
    out_ref["loss"].backward()
    opt.step()
    comms = parallel.Comms(tp)
    shard = comms.shard(full)
    opt = torch.optim.Adam(shard.parameters(), lr=1e-2)
    rows = torch.cat([x, y], -1).chunk(world)[rank]  # this rank's own rows
    rows = comms.gather_rows(rows)  # its tensor-parallel group's rows, (48 / dp, 32)
    F_shard = 64 // tp
    n = 48 // comms.dp
    mine = slice(comms.tp_rank * F_shard, (comms.tp_rank + 1) * F_shard)  # this shard's features
    with torch.no_grad():
        vals, idx = shard.encode(rows[:, :16] * full.scales()[0])
    selected = torch.zeros(n, F_shard, dtype=torch.bool).scatter_(1, idx, vals > 0)
    assert torch.equal(selected, f_ref[comms.dp_rank * n:(comms.dp_rank + 1) * n, mine])
    out = shard.loss(rows[:, :16], rows[:, 16:])
    out["loss"].backward()
    comms.reduce_grads_(shard)
    opt.step()
    loss = comms.sum_(out["loss"].detach().clone(), comms.dp_group) / comms.dp
    assert abs(loss.item() - out_ref["loss"].item()) < 1e-12 * out_ref["loss"].item()
    for name, p in shard.named_parameters():
        want = getattr(ref, name) if name in parallel.REPLICATED else getattr(ref, name)[mine]
        assert (p - want).norm() <= 1e-5 * want.norm(), name
    whole = comms.gather_sae(shard)
    if rank == 0:
        for name, p in ref.named_parameters():
            assert (getattr(whole, name) - p).norm() <= 1e-5 * p.norm(), name
    comms.close()


@pytest.mark.slow
@pytest.mark.parametrize("tp,dp,transcoder,k", [(2, 1, False, 5), (1, 2, False, 5),
                                                 (2, 2, True, 5), (2, 1, False, 40)])
def test_parallel_step_equals_one_process(tp, dp, transcoder, k):
    """k = 40 > F/tp = 32: each shard offers at most its width (K-annealing starts at K = D)."""
    mp.spawn(one_step_worker, args=(tp * dp, tp, free_port(), transcoder, k), nprocs=tp * dp)


@pytest.mark.slow
def test_torchrun_tp2_trains_like_one_process_and_evaluate_reads_it(tmp_path):
    path, _ = planted_file(tmp_path)
    args = ["train.py", "--activations", path, "--expansion", "4", "--k", "3", "--total-tokens",
            "160000", "--buffer-size", "8192", "--batch-size", "1024", "--lr", "3e-3",
            "--passes", "1"]
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node=2", *args, "--tp", "2", "--out", str(tmp_path / "tp")],
                       cwd=HERE, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.strip().splitlines()
    assert lines[-1] == f"saved {tmp_path / 'tp' / 'L15R-4x-k3-TopK.safetensors'}"
    assert sum(line.startswith("saved") for line in lines) == 1  # rank 0 alone prints
    assert "dp 1 x tp 2" in p.stdout
    train.main([*args[1:], "--out", str(tmp_path / "one")])  # the same run in one process
    ev = {}
    for name in ("tp", "one"):
        ckpt = str(tmp_path / name / "L15R-4x-k3-TopK.safetensors")
        ev[name] = evaluate.main([ckpt, "--activations", path])["explained_variance"]
    assert ev["tp"] > 0.7 and abs(ev["tp"] - ev["one"]) < 0.02, ev


# ==================================================================================== inference.py
# The inference form is exact where it should be: folding and unit decoder norms change no
# output, theta gives exactly K per token, a released transcoder reads our gain-applied MLP input
# exactly, and a checkpoint runs where and in the precision it trained.


@pytest.mark.parametrize("transcoder,skip", [(False, False), (True, False), (True, True)])
def test_folding_is_exact(transcoder, skip):
    sae, x, y = trained_like(transcoder, skip=skip)
    s_in, s_out = sae.scales()
    assert transcoder == (abs(s_in - s_out) > 1e-3)
    before = sae(x * s_in)[0] / s_out  # the trained SAE's raw-space reconstruction
    inference.fold_norm_(sae)
    inference.unit_decoder_(sae)
    after = sae(x)[0]  # the folded SAE on raw inputs
    assert ((after - before).norm() / before.norm()).item() < 1e-5
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(256, dtype=torch.float64))


def test_jumprelu_threshold_gives_k_per_token_exactly():
    sae, x, _ = trained_like(False)
    inference.fold_norm_(sae)
    inference.unit_decoder_(sae)
    inference.fit_jumprelu_(sae, x)
    assert sae.act == "jumprelu" and sae.threshold > 0
    l0 = (sae.encode(x) > 0).float().sum(1).mean().item()
    assert l0 == pytest.approx(8, abs=1e-9)


def test_a_bf16_sae_keeps_k_per_token_under_jumprelu():
    """Under bf16 matmuls many pre-activations tie (8 bits of mantissa): a theta fit on bf16
    values lands on a tied value and `h > theta` drops the whole bin (L0 well under K). theta is
    fit and applied in float32, so L0 stays at K on the fitting tokens."""
    torch.manual_seed(0)
    sae = SAE(64, 1024, k=32).float()
    x = torch.randn(2000, 64) * 3 + 1
    sae.set_norms_(x, x)
    inference.fold_norm_(sae)
    inference.unit_decoder_(sae)
    with torch.no_grad():  # features that read nearly the same direction: close pre-activations
        sae.W_enc.copy_(sae.W_enc[:1] + 0.001 * torch.randn_like(sae.W_enc))
    sae.compute_dtype = torch.bfloat16
    h = torch.relu(sae.pre_acts(x)).flatten()  # (N F) in bf16
    assert len(h.unique()) < 0.01 * len(h)  # ties everywhere
    inference.fit_jumprelu_(sae, x.to(torch.bfloat16))  # rows as a bf16 buffer holds them
    l0 = (sae.encode(x.to(torch.bfloat16)) > 0).float().sum(1).mean().item()
    assert l0 == pytest.approx(32, rel=1e-3)  # bf16 theta and h: 31.6


def test_released_transcoder_reads_our_gain_applied_mlp_input():
    lm = tiny_llama()
    norm = lm.model.layers[1].post_attention_layernorm
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2.0)  # a gain far from 1
    ids = torch.randint(3, 100, (2, 12))
    x_in = model.capture(lm, ids, torch.ones_like(ids), [(1, "TC")])[(1, "TC")][0].flatten(0, 1)
    torch.manual_seed(0)
    tc = SAE(64, 256, act="jumprelu", transcoder=True, threshold=0.1)
    adapted = inference.for_lm(tc, {"tc_input_before_gain": True, "layer": 1}, lm)
    with torch.no_grad():
        released_view = x_in / norm.weight  # TransformerLens ln2.hook_normalized: x / rms(x)
        torch.testing.assert_close(adapted.encode(x_in), tc.encode(released_view))
    assert inference.for_lm(tc, {"layer": 1}, lm) is tc  # our own TC checkpoints: unchanged


def test_evaluation_runs_where_and_in_the_precision_it_trained():
    """evaluate.py and postprocess.py default to the checkpoint's training device type and dtype
    when that kind of device is here, else to train.py's defaults for this machine; flags win."""
    gpu = model.device_here("cuda")
    cpu_bf16 = {"device": "cpu", "dtype": "bfloat16"}
    assert inference.placement(cpu_bf16) == ("cpu", "bfloat16", "as trained")
    assert inference.placement(cpu_bf16, dtype="float32")[:2] == ("cpu", "float32")
    cuda = ("cuda", "bfloat16", "as trained")
    here = ("cpu", "float32", "trained on cuda in bfloat16")  # no GPU: train.py's choice
    assert inference.placement({"device": "cuda", "dtype": "bfloat16"}) == (cuda if gpu else here)
    default = model.default_device()
    assert inference.placement({})[:2] == (default, model.default_dtype(default))
    with pytest.raises(ValueError, match="--device tpu: no such device here; allowed: cpu"):
        inference.placement(cpu_bf16, device="tpu")


# ================================================================================== postprocess.py
# postprocess.py makes a faithful JumpReLU file: it matches TopK on training-like data, theta
# is fit in float32 under any dtype, and the input file is never overwritten.


def test_jumprelu_matches_topk_on_training_like_data(planted_sae, tmp_path):
    ckpt, dirs, acts = planted_sae
    out = str(tmp_path / "folded.safetensors")
    postprocess.main([ckpt, "--out", out, "--activations", acts, "--tokens", "20000"])
    held_path = str(tmp_path / "held.safetensors")
    g = torch.Generator().manual_seed(7)  # fresh rows on the SAME planted directions
    idx = torch.rand(20_000, 128, generator=g).argsort(dim=1)[:, :3]
    coef = torch.zeros(20_000, 128).scatter_(1, idx, 0.5 + torch.rand(20_000, 3, generator=g))
    save_file({"activations": coef @ dirs}, held_path)
    jump = evaluate.main([out, "--activations", held_path, "--mode", "jumprelu"])
    topk = evaluate.main([out, "--activations", held_path, "--mode", "topk"])
    raw = evaluate.main([ckpt, "--activations", held_path])
    assert abs(jump["l0"] - 3) <= 0.3, jump["l0"]  # within 10% of K
    assert abs(jump["explained_variance"] - topk["explained_variance"]) <= 0.02
    assert topk["explained_variance"] == pytest.approx(raw["explained_variance"], abs=1e-5)


def test_postprocess_never_overwrites_its_input(planted_sae, capsys):
    ckpt, _, acts = planted_sae
    err = one_line_error(capsys, postprocess.main, [ckpt, "--out", ckpt, "--activations", acts])
    assert "would overwrite the input" in err


def test_theta_is_fit_in_float32_under_any_dtype(planted_sae, tmp_path, capsys):
    """postprocess.py --dtype bfloat16 runs the LM and the SAE's matmuls in bf16, but theta is
    fit (and JumpReLU applied) on float32 pre-activations, where bf16's ties cannot move it: the
    same rows give the same theta, and the JumpReLU file fires K per row in either dtype."""
    ckpt, _, acts = planted_sae
    x = activations.load_activations(acts)[0][:5000]
    thetas = {}
    for dtype in ("float32", "bfloat16"):
        out = str(tmp_path / f"{dtype}.safetensors")
        postprocess.main([ckpt, "--activations", acts, "--tokens", "5000", "--out", out,
                          "--dtype", dtype])
        assert f"running on cpu in {dtype}" in capsys.readouterr().out
        sae, config = formats.load_checkpoint(out)
        assert sae.W_enc.dtype == torch.float32 and config["dtype"] == "float32"
        sae.compute_dtype = getattr(torch, dtype)
        with torch.no_grad():
            l0 = (sae.encode(x) > 0).float().sum(-1).mean().item()
        thetas[dtype] = sae.threshold
        assert l0 == pytest.approx(sae.k, rel=1e-3)
    assert thetas["bfloat16"] == thetas["float32"]


# ====================================================================================== metrics.py
# The metrics are the paper's: CE and KL from one dot product equal a log-softmax's, the streamed
# held-out check equals scoring all its rows at once, splicing the identity costs no CE, and the
# splice leaves special tokens unreplaced and unscored.


def test_ce_and_kl_equal_a_log_softmax():
    torch.manual_seed(0)
    clean = torch.randn(3, 5, 50) * 4
    patched = torch.randn(3, 5, 50) * 4
    target = torch.randint(50, (3, 5))
    ce0, p, h = metrics.clean_reference(clean, target)
    ce, kl = metrics.ce_and_kl(patched, target, p, h)
    lp0 = F.log_softmax(clean, -1)
    lp = F.log_softmax(patched, -1)
    assert torch.allclose(ce0, -lp0.gather(-1, target[..., None])[..., 0], atol=1e-5)
    assert torch.allclose(ce, -lp.gather(-1, target[..., None])[..., 0], atol=1e-5)
    assert torch.allclose(kl, (lp0.exp() * (lp0 - lp)).sum(-1), atol=1e-5) and (kl > 0).all()


@torch.no_grad()
def test_the_streamed_heldout_check_equals_scoring_all_rows_at_once(capsys):
    """heldout_check feeds each LM batch's rows into every SAE as they come, in the chunks
    reconstruction_metrics cuts from all the rows (float32 results depend on the chunk), and
    scores the split's last, short chunk too: the same numbers, bit for bit."""
    lm = tiny_llama()
    tok = types.SimpleNamespace(bos_token_id=1, eos_token_id=2, pad_token_id=2)
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(3, 100, (8, 200), generator=g) for _ in range(6)]
    batches = [(i, torch.ones_like(i)) for i in ids]
    torch.manual_seed(0)
    saes = {}
    for name, place in (("r", (1, "R")), ("tc", (1, "TC"))):
        rows = next(data.activation_producer(lm, tok, [place], batches[:1]))[place]
        sae = SAE(64, 256, k=8, transcoder=place[1] == "TC")
        sae.set_norms_(*model.in_out(rows, 64))
        saes[name] = (place, sae)
    limits = {(1, "R"): None, (1, "TC"): None}
    checked = metrics.heldout_check(lm, tok, batches, saes, limits, 10**6)  # the whole split
    assert "r held-out (9,600 tokens)" in capsys.readouterr().out
    for name, (place, sae) in saes.items():
        rows = torch.cat([out[place] for out in data.activation_producer(lm, tok, [place],
                                                                         batches)])
        assert torch.equal(torch.tensor(list(checked[name].values())),
                           torch.tensor(list(metrics.reconstruction_metrics(sae, rows).values())))


def with_reconstruction(monkeypatch, new_x_hat):
    """metrics.raw_forward with x_hat replaced by new_x_hat(x_in): what the splice puts back."""
    raw_forward = metrics.raw_forward

    def patched(sae, x_in):
        _, f = raw_forward(sae, x_in)
        return new_x_hat(x_in), f
    monkeypatch.setattr(metrics, "raw_forward", patched)


def identity(x):
    return x


def plus_one(x):
    return x + 1


@pytest.mark.slow
def test_identity_splice_has_zero_delta_lm_loss(smollm, monkeypatch):
    lm, tok = smollm
    sae = SAE(576, 1152)
    sae.set_norms_(torch.ones(1, 576), torch.ones(1, 576))
    with_reconstruction(monkeypatch, identity)
    config = {"layer": 5, "site": "R", "context_size": 1024, "outlier_norm_limit": None,
              "dataset_average_activation_norm": {"in": 1.0, "out": 1.0}}
    batches = data.heldout_batches(tok, data.EMBEDDED_DATASET, 1024, 8)
    m = metrics.lm_metrics(lm, tok, sae, config, metrics.Budget(200), batches)
    assert m["ce_loss_with_sae"] == pytest.approx(m["ce_loss"], abs=1e-6)
    assert m["ce_loss_ablated"] > m["ce_loss"] + 1


@pytest.mark.slow
@torch.no_grad()
def test_the_splice_leaves_a_chats_special_tokens_unreplaced_and_unscored(smollm, tmp_path,
                                                                         monkeypatch):
    """On a rendered chat the site keeps its clean activation exactly at every special token
    (the template's turn markers, a <filename> the user typed) and takes the reconstruction at
    every other token; predictions made at special tokens are not scored."""
    lm, tok = smollm
    path = tmp_path / "code.jsonl"
    path.write_text(json.dumps({"messages": [
        {"role": "user", "content": "What does <filename> mean in a code prompt?"},
        {"role": "assistant", "content": "It marks where the file's name goes."}]}) + "\n")
    sae = SAE(576, 1152)
    sae.set_norms_(torch.ones(1, 576), torch.ones(1, 576))
    with_reconstruction(monkeypatch, plus_one)
    config = {"layer": 3, "site": "R", "context_size": 1024, "outlier_norm_limit": None,
              "dataset_average_activation_norm": {"in": 1.0, "out": 1.0}}
    seen = []  # the input of block 4, i.e. the site's output after the splice, for each pass

    def note_block_input(module, args, kwargs):
        seen.append((args or [kwargs["hidden_states"]])[0][0])
    hook = lm.model.layers[4].register_forward_pre_hook(note_block_input, with_kwargs=True)
    try:
        batches = chats.chat_batches(tok, str(path), 1024, 8)
        m = metrics.lm_metrics(lm, tok, sae, config, metrics.Budget(10**6), batches)
    finally:
        hook.remove()
    clean, spliced, ablated = seen  # (T, D) each
    ids, mask = next(iter(chats.chat_batches(tok, str(path), 1024, 8)))
    special = torch.isin(ids[0], torch.tensor(data.special_ids(tok)))  # (T,)
    assert mask.all() and {1, 2, 6} <= set(ids[0][special].tolist())  # turns and <filename>
    assert torch.equal(spliced[special], clean[special])
    assert torch.equal(ablated[special], clean[special])
    assert torch.equal(spliced[~special], clean[~special] + 1)  # the "reconstruction"
    assert ablated[~special].eq(0).all()
    logits = lm(input_ids=ids, attention_mask=mask).logits[0, :-1]
    ok = ~special[:-1]  # predictions made at ordinary tokens
    ce = F.cross_entropy(logits[ok], ids[0, 1:][ok]).item()
    assert m["ce_loss"] == pytest.approx(ce, rel=1e-5)
    assert m["n_tokens"] == (~special).sum().item()


# ===================================================================================== evaluate.py
# evaluate.py reports every key, in the dtype asked, the §4.4 label only over its window; two
# models side by side; chats through the template.


@pytest.mark.slow
def test_evaluate_reports_every_key(embedded_ckpt, tmp_path, capsys):
    path = str(tmp_path / "m.json")
    core = str(tmp_path / "core.json")
    evaluate.main([embedded_ckpt, "--tokens", "300", "--json", path, "--saebench-json", core])
    m = json.load(open(path))
    assert set(evaluate.KEYS) <= set(m) and m["n_tokens"] >= 300
    assert m["ce_loss_ablated"] > m["ce_loss_with_sae"] > m["ce_loss"] > 0
    assert m["delta_lm_loss"] == pytest.approx(m["ce_loss_with_sae"] - m["ce_loss"])
    assert 0 < m["explained_variance"] < 1 and m["l0"] == pytest.approx(50, abs=1e-6)
    printed = capsys.readouterr().out
    assert m["kl_div_ablated"] > m["kl_div_with_sae"] > 0 and "kl_div_with_sae" in printed
    assert "never fired on any of the n_tokens rows" in printed
    assert "§4.4: over 100K" not in printed
    c = json.load(open(core))  # the SAEBench file, from a pass of its own protocol
    assert c["eval_type_id"] == "core" and c["eval_result_details"] == []
    kl = c["eval_result_metrics"]["model_behavior_preservation"]
    assert kl["kl_div_with_ablation"] > kl["kl_div_with_sae"] > 0
    assert c["eval_config"]["n_eval_reconstruction_batches"] == 1  # 300 tokens: one batch
    assert c["eval_result_metrics"]["token_stats"]["total_tokens_eval_reconstruction"] == 2048
    assert "documents" in c["eval_config"]["differences_from_sae_bench"]
    assert c["eval_result_metrics"]["sparsity"]["l0"] == pytest.approx(50, abs=1e-6)


def test_the_section_4_4_label_only_over_its_100k_window(capsys):
    """§4.4 counts never-firing features over 100K tokens: evaluate.py says so only when its
    window is that long."""
    args = types.SimpleNamespace(checkpoint="c", device="cpu", dtype="float32", plot=None,
                                 json=None)
    sae = types.SimpleNamespace(act="topk")
    subject = evaluate.Subject("L0R", sae, {}, "wiki-summaries", time.time())
    for n, labelled in ((99_999, False), (100_000, True)):
        out = {"n_tokens": n, "dead_frac": 0.01, "freq": torch.zeros(4)}
        evaluate.report(args, subject, out)
        line = [x for x in capsys.readouterr().out.splitlines() if "dead_frac" in x][0]
        assert ("(§4.4: over 100K)" in line) == labelled and "never fired" in line


@pytest.mark.slow
def test_evaluate_measures_in_the_dtype_asked(embedded_ckpt, tmp_path, capsys):
    """--dtype bfloat16: the LM and the SAE's matmuls run in bf16, so clean CE itself moves (by
    bf16 rounding only); the JSON says where and in what it ran. This float32 checkpoint
    defaults to float32 on this CPU."""
    ms = {}
    for dtype in (None, "bfloat16"):
        path = str(tmp_path / f"{dtype}.json")
        extra = ["--dtype", dtype] if dtype else []
        evaluate.main([embedded_ckpt, "--tokens", "300", "--json", path] + extra)
        ms[dtype] = json.load(open(path))
    assert (ms[None]["device"], ms[None]["dtype"]) == ("cpu", "float32")
    assert "running on cpu in float32 (as trained)" in capsys.readouterr().out
    assert ms["bfloat16"]["dtype"] == "bfloat16"
    assert ms["bfloat16"]["n_tokens"] == ms[None]["n_tokens"]
    for key in ("ce_loss", "ce_loss_with_sae", "explained_variance"):
        assert ms["bfloat16"][key] != ms[None][key]
        assert ms["bfloat16"][key] == pytest.approx(ms[None][key], rel=0.02)


@pytest.mark.slow
def test_eval_model_reports_two_models_side_by_side(embedded_ckpt, smollm, tmp_path, capsys,
                                                   monkeypatch):
    _, tok = smollm
    torch.manual_seed(0)
    other = LlamaForCausalLM(LlamaConfig(
        hidden_size=576, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=len(tok), tie_word_embeddings=True,
        max_position_embeddings=2048, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id))
    random_llama = tmp_path / "random-llama"
    other.save_pretrained(random_llama)
    tok.save_pretrained(random_llama)
    path = str(tmp_path / "two.json")
    out = evaluate.main([embedded_ckpt, "--eval-model", str(random_llama), "--tokens", "100",
                         "--json", path])
    assert set(out) == {model.EMBEDDED_MODEL, str(random_llama)}
    real = out[model.EMBEDDED_MODEL]
    rand = out[str(random_llama)]
    assert set(evaluate.KEYS) <= set(real) and set(evaluate.KEYS) <= set(rand)
    assert real["n_tokens"] >= 100 and rand["n_tokens"] >= 100
    assert real["explained_variance"] > rand["explained_variance"]  # trained on the real model
    assert "delta_lm_loss" in capsys.readouterr().out
    tiny_llama(d=64).save_pretrained(tmp_path / "narrow")
    err = one_line_error(capsys, evaluate.main, [embedded_ckpt, "--eval-model",
                                                 str(tmp_path / "narrow")])
    assert "checkpoint d_model 576 does not match" in err
    seen = []  # with --chat both columns read the same rendered ids
    scored_positions = data.scored_positions

    def noting_ids(ids, *args):
        seen.append(ids.tolist())
        return scored_positions(ids, *args)
    monkeypatch.setattr(data, "scored_positions", noting_ids)
    out = evaluate.main([embedded_ckpt, "--eval-model", str(random_llama), "--chat",
                         "wiki-chat", "--tokens", "100"])
    assert len(seen) == 2 and seen[0] == seen[1] and seen[0][0][0] == tok.bos_token_id
    rendered = f"chats wiki-chat in {random_llama}'s chat template"
    assert out[model.EMBEDDED_MODEL]["data"] == out[str(random_llama)]["data"] == rendered


@pytest.mark.slow
def test_chat_evaluation_reports_every_key(embedded_ckpt, tmp_path, capsys):
    """§4.5.2: --chat is the plain evaluation on conversations rendered by the instruct model's
    chat template, the embedded wiki-chat or a chat file; bad chat data, or --chat with a flag
    it does not go with, is one line."""
    path = str(tmp_path / "chat.json")
    evaluate.main([embedded_ckpt, "--chat", "wiki-chat", "--tokens", "300", "--json", path])
    m = json.load(open(path))
    assert set(evaluate.KEYS) <= set(m) and m["n_tokens"] >= 300
    assert m["ce_loss_ablated"] > m["ce_loss_with_sae"] > m["ce_loss"] > 0
    assert m["data"] == f"chats wiki-chat in {model.EMBEDDED_MODEL}'s chat template"
    assert f"tokens of {m['data']}" in capsys.readouterr().out
    sums = tmp_path / "chats.jsonl"
    sums.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"What is {n} plus {n}?"},
        {"role": "assistant", "content": f"{n} plus {n} is {2 * n}."}]}) + "\n" for n in range(3)))
    assert evaluate.main([embedded_ckpt, "--chat", str(sums), "--tokens", "20"])["n_tokens"] >= 20
    bad = tmp_path / "plain.jsonl"
    bad.write_text(json.dumps({"text": "What is two plus two?"}) + "\n")
    err = one_line_error(capsys, evaluate.main, [embedded_ckpt, "--chat", str(bad)])
    assert "neither a `messages` nor a `conversation` column" in err and "columns: text" in err
    err = one_line_error(capsys, evaluate.main, [embedded_ckpt, "--chat", "wiki-chat",
                                                 "--long-context", "256"])
    assert "not with --activations, --features, --long-context or --dataset" in err


# ====================================================================================== formats.py
# Our files come back as they went and bad files are refused: a checkpoint carries its config in
# the released names and layouts, a resumable state round-trips, a broken or foreign file stops in
# one line without touching anything.


def test_checkpoint_round_trip_carries_its_config(tmp_path):
    torch.manual_seed(0)
    sae = SAE(32, 128, k=7, transcoder=True, skip=True)
    with torch.no_grad():
        sae.W_skip.normal_()
    sae.set_norms_(torch.randn(10, 32) * 3, torch.randn(10, 32))
    path = str(tmp_path / "L3TC-4x-TopK.safetensors")
    formats.save_checkpoint(sae, {"site": "TC", "layer": 3, "act_fn": "topk", "n": [1, 2]}, path)
    back, config = formats.load_checkpoint(path)
    for a, b in zip(sae.state_dict().values(), back.state_dict().values()):
        assert torch.equal(a, b)
    assert config["n"] == [1, 2] and config["d_sae"] == 128 and back.k == 7 and back.transcoder
    assert config["skip"] and back.skip and torch.equal(back.W_skip, sae.W_skip)
    with safe_open(path, "pt") as f:  # the released Llama Scope names and layouts
        assert f.get_slice("decoder.weight").get_shape() == [32, 128]
        assert f.get_slice("encoder.weight").get_shape() == [128, 32]
        assert f.get_slice("skip.weight").get_shape() == [32, 32]  # (D_out, D_in)
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]  # no temporary file left behind


def test_resumable_state_round_trips(tmp_path):
    """Any nested state_dict(): tensors (0-dim included), numbers, inf, None, strings, lists."""
    state = {"step": 7, "rest": math.inf, "none": None, "name": "L1R",
             "runs": [{"w": torch.randn(3, 2), "n": torch.tensor(5.0)}, {"w": torch.zeros(0)}],
             "gen": torch.Generator().manual_seed(3).get_state()}
    formats.save_state(str(tmp_path / "s.safetensors"), state)
    back = formats.load_state(str(tmp_path / "s.safetensors"))
    plain = ("step", "rest", "none", "name")
    assert {k: back[k] for k in plain} == {k: state[k] for k in plain}
    assert torch.equal(back["gen"], state["gen"]) and back["runs"][1]["w"].shape == (0,)
    assert all(torch.equal(back["runs"][0][k], state["runs"][0][k]) for k in ("w", "n"))


def test_saving_and_loading_a_state_keep_no_tensor_alive(tmp_path):
    """Nothing of save_state or load_state sits in a reference cycle: a buffer replaced after a
    save is freed at once, not whenever Python's cyclic GC happens to run (a recursive closure
    did that, and a 15-site scope held ~8 GB of old buffers between saves)."""
    gc.disable()
    try:
        rows = torch.randn(100, 4)
        saved = weakref.ref(rows)
        formats.save_state(str(tmp_path / "s.safetensors"), {"buffers": [{"data": rows}]})
        del rows
        assert saved() is None
        back = formats.load_state(str(tmp_path / "s.safetensors"))
        loaded = weakref.ref(back["buffers"][0]["data"])
        del back
        assert loaded() is None
    finally:
        gc.enable()


@pytest.fixture(scope="module")
def bad_checkpoints(tmp_path_factory):
    """A good small checkpoint and broken ones beside it: (folder, the good file's bytes)."""
    tmp = tmp_path_factory.mktemp("bad")
    sae = SAE(32, 64)
    sae.set_norms_(torch.ones(2, 32), torch.ones(2, 32))
    formats.save_checkpoint(sae, {"site": "R", "layer": 1, "model_name": model.EMBEDDED_MODEL},
                            str(tmp / "good"))
    good = open(tmp / "good", "rb").read()
    (tmp / "truncated").write_bytes(good[:len(good) // 2])
    (tmp / "text").write_bytes(b"hello, not safetensors")
    save_file({"encoder.weight": torch.zeros(64, 32)}, str(tmp / "foreign"))
    config = json.dumps(formats.read_checkpoint(str(tmp / "good"))[0])
    save_file({"encoder.weight": torch.zeros(64, 31)}, str(tmp / "shapes"),
              metadata={"config": config})  # our config, but tensors of the wrong shapes
    return tmp, good


BAD_CHECKPOINTS = [("missing", "no such file"), ("truncated", "not a readable safetensors file"),
                   ("text", "not a readable safetensors file"),
                   ("foreign", "not a Llama Scope checkpoint"),
                   ("shapes", "do not match d_model 32")]


@pytest.mark.parametrize("script", [evaluate, postprocess], ids=["evaluate", "postprocess"])
@pytest.mark.parametrize("name,message", BAD_CHECKPOINTS)
def test_bad_checkpoints_are_rejected_cleanly(name, message, script, bad_checkpoints, capsys):
    folder, good = bad_checkpoints
    assert message in one_line_error(capsys, script.main, [str(folder / name)])
    assert open(folder / "good", "rb").read() == good  # nothing on disk was touched


def test_a_checkpoint_for_another_model_width_is_refused_before_it_loads(bad_checkpoints,
                                                                          capsys, monkeypatch):
    refuse_model_load(monkeypatch)
    err = one_line_error(capsys, evaluate.main, [str(bad_checkpoints[0] / "good")])
    assert "checkpoint d_model 32 does not match smollm2-135m-instruct (hidden size 576)" in err


# ======================================================================================== bench.py
# bench.py times the step train.py takes (float32 weights, the matmuls in the dtype asked) and
# the floor it cannot beat; its numbers are printed, never asserted as speeds.


def test_bench_times_the_step_and_its_floor():
    out = bench.sae_step(bench.Step(64, 256, 8, rows=128, repeat=1))
    assert (out["d_model"], out["n_features"], out["k"], out["rows"]) == (64, 256, 8, 128)
    assert out["sae_step_ms"] > 0 and out["encoder_matmul_ms"] > 0
    assert out["step_over_floor"] == pytest.approx(out["sae_step_ms"] / out["encoder_matmul_ms"])
    assert "pure_step_ms" not in out  # float32: no bf16-weights comparison to make
    bf16 = bench.sae_step(bench.Step(64, 256, 8, rows=128, repeat=1, dtype=torch.bfloat16))
    assert bf16["pure_step_ms"] > 0


# ====================================================================================== planted.py
# train.py's defaults find planted features in superposition (the benchmark, small).


@pytest.mark.slow
def test_defaults_recover_planted_features_in_superposition(tmp_path, capsys):
    """planted.py's benchmark, small: 512 directions in 32 dimensions (K = 4, exponential
    magnitudes, scaled and offset), 400K rows, train.py's defaults alone (README: the full
    benchmark). The paper's recipe as it was (batch 2048, one pass, zero biases) recovers 0% of
    the benchmark's directions; the defaults recover ~90% of these."""
    path, held, dirs = synthetic.make_data(32, 4, 400_000, str(tmp_path))
    ckpt = train.main(planted.train_flags(path, 4, 400_000, str(tmp_path)))[-1]
    printed = capsys.readouterr().out.splitlines()
    rule = next(line for line in printed if line.startswith("budget"))
    recovered, ev, dead = planted.score(ckpt, held, dirs)
    assert "passes 8, batch size 256" in rule
    assert recovered >= 0.85 and ev > 0.85 and dead < 0.05, (recovered, ev, dead)


# ================================================================================ extras/checks.py
# Bad flags stop in one line before any slow work: the model's config is read, its weights are
# not; `all`, lists and ranges name the SAEs a user would type out.


BAD_FLAGS = [
    (["--layer", "30"],
     "--layer 30 is out of range: smollm2-135m-instruct has 30 layers, allowed 0-29"),
    (["--site", "R,X"], "--site X is unknown; allowed: all, R, A, M, TC"),
    (["--layer", "all,3"], "--layer all,3: `all` stands alone; allowed: all, a list (3,7) or"),
    (["--layer", "5-2"], "--layer 5-2: '5-2' is not a block index or a range a-b; allowed: all"),
    (["--layer", "28-30"], "--layer 30 is out of range: smollm2-135m-instruct has 30 layers"),
    (["--site", "all,R"], "--site all,R: `all` stands alone; allowed: all or a list of R, A"),
    (["--layer", "all", "--site", "all", "--max-memory", "1"],
     "--max-memory 1 is too small for even one SAE: L0R needs"),
    (["--k", "4608"], "--k 4608 must be less than the number of features (4608)"),
    (["--batch-size", "4096", "--buffer-size", "4096"], "--batch-size 4096 must be in 1..2048"),
    (["--context-size", "100000"], "--context-size 100000 is out of range: allowed 2-8192"),
    (["--dataset", "./nope.jsonl"], "--dataset ./nope.jsonl: no such file or folder; give a .txt"),
    (["--activations", "nope.safetensors"], "--activations nope.safetensors: no such file"),
    (["--resume", "nope.safetensors"], "--resume nope.safetensors: no such file"),
    (["--log-file", "nope/log.jsonl"], "--log-file nope/log.jsonl: no such folder"),
    (["--device", "tpu"], "--device tpu: no such device here; allowed: cpu"),
    (["--skip", "--site", "R,TC"],
     "--skip trains skip transcoders: give --site TC, not --site R,TC"),
]


def test_layer_and_site_specs_resolve_against_the_model():
    """`all`, lists and ranges name the same SAEs a user would type out; the order given is kept
    and repeats are dropped."""
    assert planned("--layer", "0-3,15,2").layer == [0, 1, 2, 3, 15]
    assert planned("--layer", "all").layer == list(range(30))
    assert planned("--layer", "7, 15", "--site", "TC,R").site == ["TC", "R"]
    assert planned("--site", "all").site == ["R", "A", "M", "TC"]


@pytest.mark.parametrize("argv,message", BAD_FLAGS)
def test_bad_flags_fail_in_one_line_before_the_model_loads(argv, message, capsys, monkeypatch):
    """Checks that need the model's config (ranges alone: extras/flags.py's test)."""
    refuse_model_load(monkeypatch)
    assert message in one_line_error(capsys, train.main, argv)


BAD_DATA = [("a.safetensors", "--activations", "no tensor named `activations` (found: ['acts'])"),
            ("empty.txt", "--dataset", "no text in its train split")]


@pytest.mark.parametrize("name,flag,message", BAD_DATA)
def test_bad_data_is_rejected(name, flag, message, tmp_path, capsys):
    save_file({"acts": torch.zeros(10, 8)}, str(tmp_path / "a.safetensors"))
    (tmp_path / "empty.txt").write_text("\n\n   \n")
    err = one_line_error(capsys, train.main, [flag, str(tmp_path / name), "--layer", "1",
                                              "--out", str(tmp_path)])
    assert message in err


# ================================================================================== extras/plan.py
# A scope that does not fit --max-memory splits into groups that do, in layer order, with
# buffers of at least MIN_BUFFER_ROWS rows; --plan-only prints the plan from the config alone;
# a buffer gets exactly the rows its first fill takes.


def plan_flags(**given):
    """The flags plan.groups reads, as train.py's parser and budget rule leave them."""
    defaults = dict(buffer_size=65_536, passes=1, batch_size=256, expansion=[4],
                    n_features=None, max_memory=12.0, lm_batch_size=8, context_size=128,
                    total_tokens=1_000_000, eval_tokens=0)
    return types.SimpleNamespace(**(defaults | given))


def test_memory_planning_splits_a_scope_into_groups_that_fit():
    """A scope that does not fit --max-memory is split into groups, in layer order, each under
    the limit with buffers of at least MIN_BUFFER_ROWS rows; one that fits stays one group with
    the whole --buffer-size, or smaller buffers first; a limit below one place's needs is one
    line saying what it needs."""
    cfg = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=1000)
    places = list(itertools.product(range(8), model.SITES))
    steps = 1_000_000 // 256
    memory = plan.Memory(cfg, [256], 256, 8, 128, 4)
    one = memory.bytes(places[:1], plan.MIN_BUFFER_ROWS)
    least = memory.bytes(places, plan.MIN_BUFFER_ROWS)
    everything = memory.bytes(places, 65_536)
    limit = (one + least) / 2 / plan.GIB  # below what the whole scope needs at the least
    groups = plan.groups(cfg, places, plan_flags(max_memory=limit), steps, 256, 4)
    assert len(groups) > 1 and sorted(p for g in groups for p in g.places) == sorted(places)
    assert all(g.bytes <= limit * plan.GIB and g.rows >= plan.MIN_BUFFER_ROWS for g in groups)
    assert all(max(a.places)[0] <= min(b.places)[0] for a, b in zip(groups, groups[1:]))
    whole = plan.groups(cfg, places, plan_flags(max_memory=everything / plan.GIB), steps, 256, 4)
    assert len(whole) == 1 and whole[0].rows == 65_536
    between = (least + everything) / 2 / plan.GIB  # buffers shrink before the scope splits
    shrunk = plan.groups(cfg, places, plan_flags(max_memory=between), steps, 256, 4)
    assert len(shrunk) == 1 and plan.MIN_BUFFER_ROWS < shrunk[0].rows < 65_536
    with pytest.raises(ValueError, match=r"--max-memory 0.5 is too small for even one SAE: "
                                         r"L0R needs \d+\.\d GiB with 16,384 buffer rows"):
        plan.groups(cfg, places, plan_flags(max_memory=0.5), steps, 256, 4)


def test_only_a_run_of_several_places_serves_large_blocks_by_mmap(monkeypatch):
    """glibc's mmap threshold is lowered for a scope (its row tensors fragment the heap) and left
    alone for one place, whose every step would otherwise get fresh pages for its temporaries."""
    calls = []

    class Libc:
        def mallopt(self, option, value):
            calls.append((option, value))
    monkeypatch.setattr(plan.ctypes, "CDLL", lambda name: Libc())
    plan.return_freed_memory(places=1)
    assert calls == []
    plan.return_freed_memory(places=2)
    assert calls == [(-3, 1 << 20)]


def test_plan_only_prints_the_scope_from_the_config_alone(capsys, monkeypatch):
    """--plan-only sizes a whole scope (here SmolLM2's 120 SAEs at 4x under 8 GiB) and exits
    without loading weights: groups, buffer rows, memory and time, then each group's arithmetic
    is printed when it trains."""
    refuse_model_load(monkeypatch)
    assert train.main(["--layer", "all", "--site", "all", "--expansion", "4",
                       "--max-memory", "8", "--plan-only"]) == []
    out = capsys.readouterr().out
    assert "plan: 120 site(s) in " in out and "under --max-memory 8 GiB" in out
    assert "group 0: " in out and "buffer rows per site" in out and " h, peak ~" in out


def test_measuring_costs_leaves_the_random_state_as_it_was():
    """The plan times a real SAE step on random data; a run that plans must then initialize its
    SAEs as one that never planned (training from a cache, which plans no time, is compared
    bit for bit with training from the LM)."""
    cfg = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=1000)
    torch.manual_seed(1)
    expected = torch.rand(4)
    torch.manual_seed(1)
    costs = plan.measure_costs(cfg, "cpu", torch.float32)
    assert costs.lm > 0 and costs.sae > 0
    assert torch.equal(torch.rand(4), expected)


@pytest.mark.parametrize("passes,steps", [(1, 10), (8, 10), (8, 10_000)])
def test_buffer_rows_are_what_the_first_fill_takes(passes, steps):
    """plan.buffer_rows, the size train.py gives each buffer, is exactly what its first fill
    asks of the producer when the run is shorter than --buffer-size, and --buffer-size when not:
    the formula lives once (buffer.first_fill_rows)."""
    batch = 64
    log = []
    size = plan.buffer_rows(4096, batch, steps, passes)
    buf = buffer.ActivationBuffer(counting_producer(log, chunk=1), size, batch,
                                  rows_to_serve=steps * batch, passes=passes)
    buf.next_batch()
    assert len(buf.data) == size == min(4096, max(2 * batch, log[-1]))
    assert size == 4096 if steps == 10_000 else size < 4096


# ================================================================================= extras/flags.py
# Every numeric flag of every script has a stated range, checked right after parsing: a value
# just outside it is one line naming the flag, the value and the range, exit code 2, before any
# model or config is read.

SCRIPTS = {"train.py": (train.main, []), "evaluate.py": (evaluate.main, ["x.safetensors"]),
           "postprocess.py": (postprocess.main, ["x.safetensors"]),
           "bench.py": (bench.main, []), "planted.py": (planted.main, []),
           "attribute.py": (attribute.main, ["folder", "prompt"])}


def numeric_flags():
    """(script, option, type, nargs, range) of every numeric flag, read from each script's own
    parser as flags.parse receives it."""
    out = []
    parse = flags.parse
    for script, (main, positional) in SCRIPTS.items():
        def grab(parser, argv, ranges, script=script):
            for a in parser._actions:
                if flags.kind(a):
                    out.append((script, a.option_strings[0], flags.kind(a), a.nargs,
                                ranges.get(a.dest)))
            raise SystemExit(0)
        flags.parse = grab
        try:
            with pytest.raises(SystemExit):
                main(positional)
        finally:
            flags.parse = parse
    return out


def outside(text, kind):
    """Values of kind just outside the range `text` (either side of each bound)."""
    bounds = [v for lo, hi, _, _ in flags.intervals(text) for v in (lo, hi) if math.isfinite(v)]
    near = {v + d for v in bounds for d in (-1, -0.5, 0, 0.5, 1)}
    return sorted(kind(v) for v in near if kind(v) == v and not flags.inside(v, text))


def test_every_numeric_flag_of_every_script_is_range_checked(capsys, monkeypatch):
    def refuse(*args, **kwargs):
        pytest.fail("the model was read")
    for name in ("load_model", "load_config", "load_tokenizer"):
        monkeypatch.setattr(model, name, refuse)
    table = numeric_flags()
    assert len(table) >= 35 and {s for s, *_ in table} == set(SCRIPTS)
    for script, option, kind, nargs, text in table:
        assert text, f"{script} {option} has no stated range"
        bad = outside(text, kind)
        assert bad, f"{script} {option}: the range {text} excludes nothing"
        main, positional = SCRIPTS[script]
        for v in bad:
            err = one_line_error(capsys, main, positional + [option] + [str(v)] * (nargs or 1))
            assert f"{option} {v} is out of range: allowed {text}" in err, (script, err)


def test_ranges_read_as_written():
    assert flags.inside(0, "0 or (1, inf)") and flags.inside(1.5, "0 or (1, inf)")
    assert not flags.inside(1, "0 or (1, inf)") and not flags.inside(0.5, "0 or (1, inf)")
    assert flags.inside(0, "[0, 1)") and not flags.inside(1, "[0, 1)")
    assert flags.inside(1e12, "[1, inf)") and not flags.inside(0.99, "[1, inf)")
    assert outside("[0, 1]", float) == [-1.0, -0.5, 1.5, 2.0]


# ============================================================================== extras/tracking.py
# Progress bars show on a terminal only; every printed log line is one logged entry, to W&B
# and to a JSON-lines file; without either the logger is a no-op.


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bars_on_a_terminal_only(tmp_path, capsys, monkeypatch):
    """The first fill and training show bars with rate and ETA on a terminal; written to a
    file or pipe there are none, and the grep-friendly log lines are the same either way."""
    args = ["--activations", random_rows(tmp_path, 4096), "--expansion", "4", "--k", "4",
            "--total-tokens", "4096", "--batch-size", "512", "--buffer-size", "2048",
            "--log-every", "4"]
    train.main(args + ["--out", str(tmp_path / "a")])
    piped = capsys.readouterr()
    assert piped.err == ""
    monkeypatch.setattr(sys, "stderr", Terminal())
    train.main(args + ["--out", str(tmp_path / "b")])
    shown = sys.stderr.getvalue()
    out = capsys.readouterr().out
    assert "first fill" in shown and "training" in shown and "step/s" in shown
    assert "<" in shown  # tqdm's [elapsed<remaining] ETA
    logs = [[line.split(" | ")[:4] for line in o.splitlines() if " step " in line]
            for o in (piped.out, out)]
    assert logs[0] == logs[1] and len(logs[0]) == 64 // 4  # 4096 rows x 8 passes / 512


class FakeWandb:
    """What `wandb` is asked for: init, then log and finish on its run."""

    def __init__(self, calls):
        self.calls = calls

    def init(self, project, config):
        self.calls.append(project)
        return self

    def log(self, values, step):
        self.calls.append(dict(values, step=step))

    def finish(self):
        self.calls.append("finish")


def test_wandb_project_and_log_file_log_every_log_line(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setitem(sys.modules, "wandb", FakeWandb(calls))
    train.main(["--activations", random_rows(tmp_path, 8192), "--expansion", "4", "--k", "4",
                "--total-tokens", "8192", "--passes", "1", "--batch-size", "1024",
                "--buffer-size", "4096", "--log-every", "2", "--out", str(tmp_path),
                "--wandb-project", "scope", "--log-file", str(tmp_path / "log.jsonl")])
    lines = [line for line in capsys.readouterr().out.splitlines() if " step " in line]
    assert calls[0] == "scope" and calls[-1] == "finish" and len(lines) == 4
    assert [e["step"] for e in calls[1:-1]] == [2, 4, 6, 8]  # one entry per printed log line
    keys = {"L15R-4x-k4-TopK/loss", "L15R-4x-k4-TopK/ev", "L15R-4x-k4-TopK/dead", "lr"}
    assert keys <= set(calls[1])
    saved = [json.loads(line) for line in open(tmp_path / "log.jsonl")]  # the same, as a file
    assert saved == calls[1:-1]
    fired = [e["L15R-4x-k4-TopK/fired"] for e in saved]  # the share that ever fired
    assert 0 < fired[0] and fired == sorted(fired) and fired[-1] <= 1
    plots.plot_training({"run": str(tmp_path / "log.jsonl")}, str(tmp_path / "f.png"), "t")
    assert os.path.getsize(tmp_path / "f.png") > 1000
    assert tracking.make_logger(None, {}).loggers == []  # the default: no-op
    assert tracking.make_logger("scope", {}, rank=1).loggers == []  # only rank 0 logs
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed: a one-line error
    with pytest.raises(ValueError, match="--wandb-project scope needs wandb"):
        tracking.make_logger("scope", {})


# =========================================================================== extras/activations.py
# Activation files and the cache: training from a cache is bit-identical to training from the
# LM, the cache's shards are bounded, and evaluation from it needs no LM.


@pytest.mark.slow
def test_training_from_the_cache_equals_training_from_the_lm(tmp_path, capsys, monkeypatch):
    """--cache-activations writes shards of bounded size and a manifest; training from the folder
    is bit-identical to training from the LM on the same rows, and evaluation needs no LM."""
    monkeypatch.setattr(activations, "SHARD_BYTES", 3000 * 2 * 576 * 4)  # 3,000 rows a shard
    cache = str(tmp_path / "cache")
    train.main(["--cache-activations", cache, "--layer", "1", "--site", "R,TC",
                "--total-tokens", "20000"])
    manifest = json.load(open(os.path.join(cache, "manifest.json")))
    assert manifest["rows"] == 20_000 and len(manifest["shards"]) == 7
    assert manifest["model"] == model.EMBEDDED_MODEL and set(manifest["sites"]) == {"L1R", "L1TC"}
    with safe_open(os.path.join(cache, "L1TC-00006.safetensors"), "pt") as f:
        assert f.get_slice("targets").get_shape() == [2000, 576]  # the rest: 20,000 - 6 x 3,000
    args = ["--layer", "1", "--expansion", "2", "--total-tokens", "8192", "--batch-size", "512",
            "--buffer-size", "4096", "--eval-tokens", "0"]
    from_lm = tensors(train.main(args + ["--out", str(tmp_path / "lm")])[0])
    refuse_model_load(monkeypatch)
    path = train.main(args + ["--activations", cache, "--out", str(tmp_path / "cache_run")])[0]
    assert all(torch.equal(tensors(path)[k], from_lm[k]) for k in from_lm)
    assert formats.read_checkpoint(path)[0]["model_name"] == model.EMBEDDED_MODEL
    m = evaluate.main([path, "--activations", cache, "--tokens", "5000"])
    assert m["n_tokens"] == 5000 and 0 < m["explained_variance"] < 1
    err = one_line_error(capsys, train.main, args + ["--activations", cache, "--site", "A"])
    assert f"--activations {cache} holds L1R, L1TC, not L1A" in err
    err = one_line_error(capsys, train.main, ["--cache-activations", cache, "--layer", "1"])
    assert "already holds a cache; give a new folder" in err


# ================================================================================= extras/scope.py
# A folder of SAEs is evaluated in one pass, each SAE's numbers those it gets alone; a folder of
# mixed models or of nothing is one line.


@pytest.mark.slow
def test_a_scope_is_evaluated_in_one_pass_as_each_sae_alone(tiny_scope, tmp_path, capsys,
                                                            monkeypatch):
    """evaluate.py DIR: one full forward per batch for every place (each SAE then spliced from
    its own block on, every site of R, A, M and TC), and every SAE's numbers, standard errors
    included, equal evaluating its checkpoint alone, with Delta LM loss on all of --tokens or on
    fewer (--lm-tokens); the table lists them in layer order and --plot draws Fig. 10."""
    lm_dir, folder = tiny_scope
    load = model.load_model
    forwards = []
    zeroed = []
    from_block_on = scope.from_block_on

    def count_embedding(*args):
        forwards.append(1)

    def counting(*args, **kwargs):  # count the forwards that start from the embeddings
        lm, tok = load(*args, **kwargs)
        lm.model.embed_tokens.register_forward_hook(count_embedding)
        return lm, tok

    def counting_ablations(lm, batch, place, patch):
        zeroed.append(patch.__name__ == "zeroed")
        return from_block_on(lm, batch, place, patch)
    monkeypatch.setattr(model, "load_model", counting)
    monkeypatch.setattr(scope, "from_block_on", counting_ablations)
    together = evaluate.main([folder, "--tokens", "300", "--json", str(tmp_path / "s.json"),
                              "--plot", str(tmp_path)])
    printed = capsys.readouterr().out
    names = [f"L{layer}{site}-2x-k8-TopK" for layer in range(3) for site in ("R", "A", "M", "TC")]
    assert list(together) == names and json.load(open(tmp_path / "s.json")).keys() == set(names)
    assert [line.split()[0] for line in printed.splitlines() if line.startswith("  L")] == names
    batches = len(forwards)
    assert sum(zeroed) < len(names) * batches  # M and TC of a layer share their ablation
    assert os.path.getsize(tmp_path / "scope.png") > 0
    keys = evaluate.KEYS + [f"{key}_se" for key in noise.SE_KEYS]
    for name in names:
        forwards.clear()
        alone = evaluate.main([os.path.join(folder, f"{name}.safetensors"), "--tokens", "300"])
        assert len(forwards) == 3 * batches  # clean, spliced, ablated: every pass full
        for key in keys:
            assert together[name][key] == pytest.approx(alone[key], rel=1e-3, abs=1e-6), key
    few = evaluate.main([folder, "--tokens", "3000", "--lm-tokens", "150"])  # ~1,000 a batch
    for name in names[:4]:
        alone = evaluate.main([os.path.join(folder, f"{name}.safetensors"), "--tokens", "3000",
                               "--lm-tokens", "150"])
        for key in keys:
            assert few[name][key] == pytest.approx(alone[key], rel=1e-3, abs=1e-6), key
        assert few[name]["n_tokens"] >= 3000 and few[name]["n_predictions"] < 1500
        assert len(alone["per_document"]["rows"]) > len(alone["per_document"]["predictions"])


def test_a_scope_refuses_a_model_that_from_layer_cannot_run(tiny_scope, capsys, monkeypatch):
    """The first batch checks that running from a place's block on reproduces the full
    forward's predictions: a model whose forward rescales its embeddings or indexes per-layer
    settings would make every Delta LM loss of the scope wrong without it."""
    _, folder = tiny_scope

    @contextlib.contextmanager
    def off_by_one(lm, layer):  # as if block `layer` were not run
        blocks = lm.model.layers
        lm.model.layers = blocks[layer + 1:]
        try:
            yield
        finally:
            lm.model.layers = blocks
    monkeypatch.setattr(model, "from_layer", off_by_one)
    err = one_line_error(capsys, evaluate.main, [folder, "--tokens", "100"])
    assert "running it from block 0 on does not give the full forward's predictions" in err


def test_an_empty_or_mixed_folder_is_one_line(tiny_scope, tmp_path, capsys, monkeypatch):
    _, folder = tiny_scope
    names = [f"L{layer}{site}-2x-k8-TopK" for layer in range(3) for site in ("R", "A", "M", "TC")]
    empty = tmp_path / "empty"
    empty.mkdir()
    err = one_line_error(capsys, evaluate.main, [str(empty)])
    assert "no checkpoints (*.safetensors) to evaluate" in err
    first = os.path.join(folder, f"{names[0]}.safetensors")
    config, _ = formats.read_checkpoint(first)
    mixed = tmp_path / "mixed"
    shutil.copytree(folder, mixed)
    sae, _ = formats.load_checkpoint(first)
    formats.save_checkpoint(sae, dict(config, model_name="other-model"),
                            str(mixed / "x.safetensors"))
    refuse_model_load(monkeypatch)
    err = one_line_error(capsys, evaluate.main, [str(mixed)])
    assert "its checkpoints read different model_names (" in err and "other-model)" in err


# ========================================================================== extras/long_context.py
# §4.5.1: long documents truncated, never joined, MSE and L0 by position bucket.


@pytest.mark.slow
def test_long_context_reads_long_documents_truncated_never_joined(embedded_ckpt, smollm,
                                                                  monkeypatch, tmp_path, capsys):
    """Each sequence is the first T tokens of ONE held-out document at least T tokens long (BOS
    included), each document once; too few such documents is said in one line with the count,
    none is an error naming the longest document."""
    _, tok = smollm
    docs = data.encode_documents(tok, list(data.iter_documents(split="eval", epochs=1)))
    long_enough = [d[:256] for d in docs if len(d) >= 256]
    seen = []
    capture = model.capture

    def noting_ids(lm, ids, *args):
        seen.append(ids[0].tolist())
        return capture(lm, ids, *args)
    monkeypatch.setattr(model, "capture", noting_ids)
    path = str(tmp_path / "long.json")
    evaluate.main([embedded_ckpt, "--long-context", "256", "--tokens", "100000", "--json", path])
    assert sorted(seen) == sorted(long_enough) and len(seen) == len(long_enough) == 9
    out = json.load(open(path))
    printed = capsys.readouterr().out
    assert out["documents"] == 9 and sum(b["n_tokens"] for b in out["buckets"]) == 9 * 255
    said = ("--long-context 256: only 9 held-out documents have at least 256 tokens; used all 9 "
            "(2,304 tokens of the 100,000 asked)")
    assert said in printed
    longest = max(map(len, docs))
    err = one_line_error(capsys, evaluate.main, [embedded_ckpt, "--long-context", "512"])
    assert "no held-out document of wiki-summaries has 512 tokens" in err
    assert f"the longest has {longest}" in err and longest == 355


@pytest.mark.slow
def test_long_context_reports_mse_and_l0_by_position(embedded_ckpt, tmp_path, capsys):
    path = str(tmp_path / "long.json")
    evaluate.main([embedded_ckpt, "--long-context", "256", "--tokens", "512", "--json", path,
                   "--plot", str(tmp_path)])
    out = json.load(open(path))
    assert [b["positions"] for b in out["buckets"]] == ["1-63", "64-127", "128-255"]
    assert all(b["n_tokens"] >= 60 and b["mse"] > 0 for b in out["buckets"])
    assert all(b["l0"] == pytest.approx(50, abs=1) for b in out["buckets"])  # TopK: K per token
    assert sum(b["n_tokens"] for b in out["buckets"]) <= 2 * 255 and out["documents"] == 2
    assert os.path.exists(tmp_path / "L3R-2x-k50-TopK-long-context.png")
    assert "on 2 held-out documents of at least 256 tokens" in capsys.readouterr().out
    assert long_context.buckets(4096)[-1] == (2048, 4096)
    assert long_context.buckets(100) == [(1, 64), (64, 100)]
    err = one_line_error(capsys, evaluate.main, [embedded_ckpt, "--long-context", "100000"])
    assert "--long-context 100000 is out of range: allowed 2-8192" in err


# ================================================================================= extras/chats.py
# §4.5.2: chats are the held-out summaries as conversations (or a file of them), rendered by the
# instruct model's chat template and cut like documents.


def test_chat_batches_render_heldout_chats_with_the_template():
    """wiki-chat asks about each held-out article (the SAE never trained on its summary), in the
    held-out order, and answers with the summary; the batches are the chat template's rendering,
    its own special tokens and no BOS of ours, truncated to the context like documents."""
    tok = model.load_tokenizer()
    held = list(data.iter_documents(split="eval", epochs=1))
    conversations = list(chats.iter_chats(chats.EMBEDDED_CHAT))
    assert len(conversations) == 1003
    assert [c[1]["content"] for c in conversations] == [d for d in held if d.strip()]
    assert len({c[0]["content"].split()[0] for c in conversations[:5]}) == 5  # phrasings vary
    rendered = [tok(tok.apply_chat_template(c, tokenize=False), add_special_tokens=False)
                ["input_ids"][:64] for c in conversations]  # the template as text, tokenized
    batches = list(chats.chat_batches(tok, chats.EMBEDDED_CHAT, 64, 16))
    rows = [r[m.bool()].tolist() for ids, mask in batches for r, m in zip(ids, mask)]
    assert sorted(rows) == sorted(rendered)
    start = tok("<|im_start|>system\n", add_special_tokens=False)["input_ids"]
    assert all(r[:len(start)] == start for r in rows)
    assert any(tok.convert_tokens_to_ids("<|im_end|>") in r for r in rows)
    base = types.SimpleNamespace(chat_template=None, name_or_path="some-base-model")
    with pytest.raises(ValueError, match="some-base-model has no chat template"):
        chats.chat_batches(base, chats.EMBEDDED_CHAT, 64, 16)


def test_chat_rows_need_messages_or_conversation(tmp_path):
    """A chat file's rows give `messages`, or `conversation` as WildChat does (its turns' other
    keys dropped); a row with neither is one line naming the columns it has."""
    good = tmp_path / "wild.jsonl"
    bad = tmp_path / "plain.jsonl"
    turns = [{"role": "user", "content": "hi", "timestamp": 1, "language": "English"},
             {"role": "assistant", "content": "hello", "timestamp": 2, "language": "English"}]
    good.write_text(json.dumps({"conversation": turns, "model": "gpt-4"}) + "\n")
    bad.write_text(json.dumps({"text": "hi", "id": 3}) + "\n")
    assert list(chats.iter_chats(str(good))) == [[{"role": "user", "content": "hi"},
                                                  {"role": "assistant", "content": "hello"}]]
    with pytest.raises(ValueError, match="neither a `messages` nor a `conversation` column.*"
                                         "its columns: text, id"):
        list(chats.iter_chats(str(bad)))
    with pytest.raises(ValueError, match="--chat ./missing.jsonl: no such file"):
        list(chats.iter_chats("./missing.jsonl"))


def test_chats_are_rendered_by_the_instruct_models_tokenizer(monkeypatch):
    """--eval-model's tokenizer renders the chats when it has a chat template, else the
    checkpoint LM's; neither is one line naming both."""
    toks = {"base": types.SimpleNamespace(chat_template=None),
            "instruct": types.SimpleNamespace(chat_template="{{ messages }}")}
    monkeypatch.setattr(model, "load_tokenizer", toks.get)
    assert chats.chat_tokenizer(["instruct", "base"], "wiki-chat")[0] == "instruct"
    assert chats.chat_tokenizer(["base", "instruct"], "wiki-chat")[0] == "instruct"
    with pytest.raises(ValueError, match="the tokenizer of base or other has no chat template"):
        chats.chat_tokenizer(["base", "other"], "wiki-chat")


# ============================================================================== extras/features.py
# One pass over held-out text serves every requested feature: contexts, frequencies and
# neighbours are consistent with the SAE itself, and the page is self-contained.


class PageParser(html.parser.HTMLParser):
    """What a feature page shows: its sections, histograms, per-feature token shading, and any
    script or remote resource."""

    def __init__(self):
        super().__init__()
        self.sections = []
        self.svgs = 0
        self.shading = []
        self.external = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section":
            self.sections.append(attrs["id"])
            self.shading.append([])
        self.svgs += tag == "svg"
        if "data-act" in attrs:
            self.shading[-1].append(float(attrs["data-act"]))
        if tag == "script" or any(str(v).startswith(("http", "//")) for v in attrs.values()):
            self.external.append(tag)


@pytest.mark.slow
def test_feature_inspection_in_one_pass(released_embedded, embedded_rows, tmp_path, capsys,
                                        monkeypatch):
    folded, folder = released_embedded
    sae, _ = formats.load_checkpoint(folded)
    freq = (sae.encode(embedded_rows[1]) > 0).float().mean(0)
    feats = freq.topk(2).indices.tolist()  # two features that fire on held-out text
    passes = []
    capture = model.capture

    def counting(*args):
        passes.append(1)
        return capture(*args)
    monkeypatch.setattr(model, "capture", counting)
    path = str(tmp_path / "features.json")
    page = str(tmp_path / "features.html")
    evaluate.main([folder, "--features", ",".join(map(str, feats)), "--top", "3",
                   "--tokens", "300", "--json", path, "--html", page])
    printed = capsys.readouterr().out
    out = json.load(open(path))
    eps = math.sqrt(12 * math.log(sae.n_features) / sae.d_model)
    assert out["jl_eps"] == pytest.approx(eps) and out["n_tokens"] >= 300
    assert [f["feature"] for f in out["features"]] == feats
    W = torch.nn.functional.normalize(sae.W_dec, dim=1)
    for f in out["features"]:
        assert f["frequency"] == pytest.approx(f["fired"] / out["n_tokens"]) and f["fired"] > 0
        acts = [c["activation"] for c in f["contexts"]]
        assert 1 <= len(acts) <= 3 and acts == sorted(acts, reverse=True)
        for c in f["contexts"]:
            assert c["activations"][c["marked"]] == pytest.approx(c["activation"], abs=1e-3)
            assert max(c["activations"]) == pytest.approx(c["activation"], abs=1e-3)
            assert len(c["tokens"]) == len(c["activations"]) <= 33
        cos = [n["cosine"] for n in f["neighbours"]]
        assert cos == sorted(cos, reverse=True)
        assert f["feature"] not in [n["feature"] for n in f["neighbours"]]
        assert all(n["above_jl"] == (n["cosine"] > eps) for n in f["neighbours"])
        second = (W @ W[f["feature"]]).sort().values[-2].item()
        assert cos[0] == pytest.approx(second, abs=1e-5)
    assert printed.count("<START>") == sum(len(f["contexts"]) for f in out["features"])
    assert "Sentence 1:" in printed and "JL baseline eps = sqrt(12 ln F / D)" in printed
    # the HTML page: every feature, its histogram, and the JSON's activations as token shading
    parser = PageParser()
    parser.feed(open(page).read())
    assert parser.sections == [f"feature-{i}" for i in feats] and parser.svgs == len(feats)
    assert parser.shading == [[a for c in f["contexts"] for a in c["activations"]]
                              for f in out["features"]]
    assert not parser.external  # self-contained: no script, no remote resource
    for f in out["features"]:
        assert sum(f["histogram"]["counts"]) == f["fired"]
    one = len(passes)
    evaluate.main([folder, "--features", str(feats[0]), "--top", "3", "--tokens", "300"])
    assert len(passes) == 2 * one  # two features cost the same single pass as one


# =============================================================================== extras/interop.py
# Other people's formats mean the same SAE: a released folder (local or from the Hub) gives our
# features, one token rule scores both, and the SAELens export computes them with SAELens's
# documented forward (and with sae-lens itself), transcoders included.


@pytest.mark.slow
def test_released_folder_gives_the_same_features_l0_and_ev(released_embedded, embedded_rows,
                                                           embedded_ckpt, tmp_path):
    folded, folder = released_embedded
    acts, rows = embedded_rows
    ours, _ = formats.load_checkpoint(folded)
    released, config, _ = interop.load_sae(folder)
    assert (config["layer"], config["site"]) == (3, "R")
    assert config["model_name"] == model.EMBEDDED_MODEL  # from lm_config.json
    f_ours = ours.encode(rows)
    f_released = released.encode(rows)
    assert torch.equal(f_ours > 0, f_released > 0)
    torch.testing.assert_close(f_released, f_ours, rtol=1e-5, atol=1e-5)
    m_ours = evaluate.main([folded, "--activations", acts])
    m_released = evaluate.main([folder, "--activations", acts])
    assert m_released["l0"] == pytest.approx(m_ours["l0"], abs=1e-9)
    assert m_released["explained_variance"] == pytest.approx(m_ours["explained_variance"],
                                                             abs=1e-6)
    assert 20 < m_released["l0"] < 120  # theta fitted for K = 50 on training rows
    # released weights are bf16: the same recipe, within bf16 rounding
    bf16 = write_released(str(tmp_path / "bf16"), *formats.read_checkpoint(embedded_ckpt),
                          released.threshold, dtype=torch.bfloat16, lm_config=False)
    m_bf16 = evaluate.main([bf16, "--activations", acts])
    assert abs(m_bf16["explained_variance"] - m_ours["explained_variance"]) < 0.02
    # postprocess.py converts a released folder into our single-file format, unchanged
    out = str(tmp_path / "converted.safetensors")
    postprocess.main([folder, "--out", out])
    back, _ = formats.load_checkpoint(out)
    torch.testing.assert_close(back.encode(rows), f_released)


@pytest.mark.slow
def test_one_token_rule_for_our_checkpoints_and_released_folders(released_embedded, capsys):
    """Ours carry the outlier norm limit they trained with, a released folder none: by default
    each is scored as trained (a released SAE at train.py's 10 x median, fit on its training
    rows), and the rule is printed; --max-norm-ratio R (or 0) scores both on the same tokens."""
    folded, folder = released_embedded
    ours = evaluate.main([folded, "--tokens", "300"])
    released = evaluate.main([folder, "--tokens", "300"])
    assert "the checkpoint's, from its training rows" in ours["token_rule"]
    assert "none above 10 x the site's median norm" in released["token_rule"]
    assert "fit on 16,384 training rows" in released["token_rule"]
    assert capsys.readouterr().out.count("token rule: scored: every token but padding") == 2
    for ratio in ("10", "0"):
        a = evaluate.main([folded, "--tokens", "300", "--max-norm-ratio", ratio])
        b = evaluate.main([folder, "--tokens", "300", "--max-norm-ratio", ratio])
        assert a["token_rule"] == b["token_rule"] and a["n_tokens"] == b["n_tokens"]
        assert a["explained_variance"] == pytest.approx(b["explained_variance"], abs=1e-4)
    assert "massive activations included (no limit)" in a["token_rule"]


@pytest.mark.slow
def test_hub_reference_downloads_only_that_sae(released_embedded, monkeypatch, tmp_path, capsys):
    calls = []

    def fake_download(repo_id, allow_patterns=None, **kw):
        calls.append((repo_id, allow_patterns))
        shutil.copytree(released_embedded[1], tmp_path / "snap" / "Sub" / "L3R")
        return str(tmp_path / "snap")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    sae, config, _ = interop.load_sae("fnlp/Llama3_1-8B-Base-LXR-8x:Sub/L3R")
    assert calls == [("fnlp/Llama3_1-8B-Base-LXR-8x",
                      ["Sub/L3R/hyperparams.json", "Sub/L3R/lm_config.json",
                       "Sub/L3R/checkpoints/final.safetensors"])]
    assert config["site"] == "R" and sae.act == "jumprelu"
    assert interop.hub_ref("hf://fnlp/Repo/A/B") == ("fnlp/Repo", "A/B")
    assert interop.hub_ref("out/L15R-8x-TopK.safetensors") is None  # a missing file stays one

    def offline(*args, **kwargs):
        raise OSError("cannot reach huggingface.co\n(offline)")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    err = one_line_error(capsys, evaluate.main, ["fnlp/Nope:L3R"])
    assert "download from the Hugging Face Hub failed" in err and "(offline)" in err


def saelens_forward(cfg, w, x):
    """SAELens's documented inference forward (saes/{jumprelu,topk,standard}_sae.py and
    transcoder.py: a transcoder never subtracts b_dec from its input), from the exported files
    alone: (feature activations (N, F), reconstruction (N, D))."""
    assert cfg["normalize_activations"] == "none"
    hidden_pre = (x - w["b_dec"] * cfg["apply_b_dec_to_input"]) @ w["W_enc"] + w["b_enc"]
    if cfg["architecture"].startswith("jumprelu"):
        acts = torch.relu(hidden_pre) * (hidden_pre > w["threshold"])
    elif cfg["architecture"] == "topk":
        top = hidden_pre.topk(cfg["k"], dim=-1)
        acts = torch.zeros_like(hidden_pre).scatter(-1, top.indices, torch.relu(top.values))
    else:
        acts = torch.relu(hidden_pre)
    out = acts @ w["W_dec"] + w["b_dec"]
    if "W_skip" in w:  # a skip transcoder: x @ W_skip.T
        out = out + x @ w["W_skip"].T
    return acts, out


def dense(f, n_features):
    """(N, F) activations from TopK's (values, indices) or dense f."""
    if isinstance(f, tuple):
        return torch.zeros(len(f[0]), n_features).scatter(1, f[1], f[0])
    return f


def export_planted(planted_sae, tmp_path, architecture):
    """The planted SAE post-processed and exported: (SAELens folder, our file, its rows)."""
    ckpt, _, acts = planted_sae
    out = str(tmp_path / "folded.safetensors")
    folder = str(tmp_path / "saelens")
    postprocess.main([ckpt, "--activations", acts, "--tokens", "5000", "--out", out,
                      "--export-saelens", folder, "--architecture", architecture])
    x = activations.load_activations(acts)[0][:5000]  # the rows theta and sparsity were fit on
    return folder, out, x


@pytest.mark.parametrize("architecture", ["jumprelu", "topk"])
def test_saelens_export_matches_the_documented_forward(architecture, planted_sae, tmp_path):
    ckpt = planted_sae[0]
    folder, out, x = export_planted(planted_sae, tmp_path, architecture)
    cfg = json.load(open(os.path.join(folder, "cfg.json")))
    w = load_file(os.path.join(folder, "sae_weights.safetensors"))
    assert cfg["architecture"] == architecture and (cfg["d_in"], cfg["d_sae"]) == (64, 512)
    assert cfg["apply_b_dec_to_input"] is False and cfg["metadata"]["sae_lens_version"] >= "6"
    assert cfg["metadata"]["hook_name"] == "blocks.15.hook_resid_post"
    assert w["W_enc"].shape == (64, 512) and w["W_dec"].shape == (512, 64)
    assert ("threshold" in w) == (architecture == "jumprelu")
    assert cfg.get("k") == (3 if architecture == "topk" else None)
    ours, _ = formats.load_checkpoint(out)  # our post-processed SAE, in the same inference mode
    ours.act = architecture
    f_ref, x_ref = saelens_forward(cfg, w, x)
    f_ours = dense(ours.encode(x), 512)
    assert torch.equal(f_ref > 0, f_ours > 0)
    torch.testing.assert_close(f_ref, f_ours, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x_ref, ours(x)[0], rtol=1e-4, atol=1e-5)
    if architecture == "topk":  # and the raw trained checkpoint: folding is exact
        raw, _ = formats.load_checkpoint(ckpt)
        s_in, s_out = raw.scales()
        torch.testing.assert_close(x_ref, raw(x * s_in)[0] / s_out, rtol=1e-4, atol=1e-4)
    card = open(os.path.join(folder, "README.md")).read()  # the model card the Hub shows
    assert "library_name: saelens" in card.split("---")[1] and f"- {architecture}" in card
    assert "| K | 3 " in card and "blocks.15.hook_resid_post" in card
    tokens = formats.read_checkpoint(ckpt)[0]["n_training_tokens"]
    assert f"| training tokens | {tokens:,} (1 pass(es)) |" in card and "load_from_disk" in card
    mine, _ = formats.load_checkpoint(os.path.join(folder, interop.OURS))  # and for this project
    mine.act = architecture
    torch.testing.assert_close(mine(x)[0], x_ref, rtol=1e-4, atol=1e-5)
    freq = (f_ref > 0).double().mean(0)
    sparsity = load_file(os.path.join(folder, "sparsity.safetensors"))["sparsity"]
    assert sparsity.shape == (512,)  # log10 firing frequency on the --tokens rows
    torch.testing.assert_close(10 ** sparsity.double(), freq + 1e-10, rtol=1e-5, atol=1e-12)


def export_tc(tmp_path, architecture, skip=False):
    """A TopK transcoder (skip: with a W_skip) on a tiny Llama whose pre-MLP RMSNorm gain is far
    from 1, post-processed and exported: (the SAELens folder, our TC input x_in,
    TransformerLens's x / rms(x), our SAE)."""
    lm = tiny_llama()
    norm = lm.model.layers[1].post_attention_layernorm
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2.0)
    lm.save_pretrained(tmp_path / "lm")
    ids = torch.randint(3, 100, (16, 32))
    x_in, x_out = model.capture(lm, ids, torch.ones_like(ids), [(1, "TC")])[(1, "TC")]
    x_in = x_in.flatten(0, 1).clone()
    x_out = x_out.flatten(0, 1).clone()
    torch.manual_seed(0)
    tc = SAE(64, 256, k=8, transcoder=True, skip=skip)
    tc.set_norms_(x_in, x_out)
    if skip:
        with torch.no_grad():
            tc.W_skip.normal_(0, 0.05)
    ckpt = str(tmp_path / "L1TC-4x-k8-TopK.safetensors")
    acts = str(tmp_path / "acts.safetensors")
    formats.save_checkpoint(tc, {"site": "TC", "layer": 1, "model_name": str(tmp_path / "lm")},
                            ckpt)
    save_file({"activations": x_in, "targets": x_out}, acts)
    folder = str(tmp_path / "saelens")
    out = str(tmp_path / "folded.safetensors")
    postprocess.main([ckpt, "--activations", acts, "--out", out, "--export-saelens", folder,
                      "--architecture", architecture])
    ours, _ = formats.load_checkpoint(out)
    ours.act = architecture
    return folder, x_in, (x_in / norm.weight).detach(), ours


TC_EXPORTS = [("jumprelu", False, "jumprelu_transcoder"), ("topk", False, "topk"),
              ("jumprelu", True, "jumprelu_skip_transcoder")]


@pytest.mark.parametrize("architecture,skip,exported", TC_EXPORTS)
def test_transcoder_export_reads_x_over_rms_and_matches_ours(architecture, skip, exported,
                                                             tmp_path):
    """A transcoder goes out as jumprelu_transcoder (TopK: topk with hook_name_out; SAELens has
    no TopK transcoder), a skip transcoder as jumprelu_skip_transcoder, reading TransformerLens
    ln2.hook_normalized = x / rms(x) like the released ones: the gain our input includes is
    folded into its encoder and its W_skip."""
    folder, x_in, released_view, ours = export_tc(tmp_path, architecture, skip)
    cfg = json.load(open(os.path.join(folder, "cfg.json")))
    w = load_file(os.path.join(folder, "sae_weights.safetensors"))
    assert cfg["architecture"] == exported and ("W_skip" in w) == skip
    hooks = (cfg["metadata"]["hook_name"], cfg["metadata"]["hook_name_out"])
    assert hooks == ("blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out")
    assert cfg.get("d_out", 64) == 64 and cfg["apply_b_dec_to_input"] is False
    _, x_ref = saelens_forward(cfg, w, released_view)
    torch.testing.assert_close(x_ref, ours(x_in)[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("architecture", ["jumprelu", "topk"])
def test_real_sae_lens_loads_our_sae_export(architecture, planted_sae, tmp_path):
    """With the sae-lens package installed (it is not a dependency): an exported SAE, loaded by
    SAE.load_from_disk, gives our reconstruction."""
    sae_lens = interop_package("sae_lens")
    folder, out, x = export_planted(planted_sae, tmp_path, architecture)
    ours, _ = formats.load_checkpoint(out)
    ours.act = architecture
    with torch.no_grad():
        theirs = sae_lens.SAE.load_from_disk(folder)(x)
        torch.testing.assert_close(theirs, ours(x)[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("architecture,skip,exported", TC_EXPORTS)
def test_real_sae_lens_loads_our_transcoder_exports(architecture, skip, exported, tmp_path):
    """With the sae-lens package installed (it is not a dependency): SAE.load_from_disk on an
    exported transcoder (a skip transcoder too: its JumpReLUSkipTranscoder) gives our
    reconstruction."""
    sae_lens = interop_package("sae_lens")
    folder, x_in, released_view, ours = export_tc(tmp_path, architecture, skip)
    theirs = sae_lens.SAE.load_from_disk(folder)
    classes = {"jumprelu_transcoder": "JumpReLUTranscoder", "topk": "TopKSAE",
               "jumprelu_skip_transcoder": "JumpReLUSkipTranscoder"}
    assert type(theirs).__name__ == classes[exported]
    with torch.no_grad():
        torch.testing.assert_close(theirs(released_view), ours(x_in)[0], rtol=1e-4, atol=1e-4)


def test_a_topk_skip_transcoder_is_refused_for_saelens(tmp_path, capsys):
    """SAELens has no TopK skip transcoder: one line naming the architecture that works, before
    theta is fit or any file written."""
    with pytest.raises(SystemExit):
        export_tc(tmp_path, "topk", skip=True)
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the tiny model's saving
    assert err == ("error: --architecture topk: SAELens has no TopK skip transcoder; use "
                   "--architecture jumprelu")
    assert not os.path.exists(tmp_path / "folded.safetensors")


# ============================================================================== extras/saebench.py
# SAEBench's core file holds SAEBench's formulas: each metric equals a direct computation, the
# packing is SAELens's, the file validates with sae-bench's own model, and sae_bench's own code
# on the same batches gives the same numbers.


def saebench_run():
    """saebench.evaluate on six batches of four packed 16-token contexts of a tiny Llama (L2R,
    an SAE in inference form with norms from those activations): three for CE and KL, the next
    three for the sparsity and variance metrics. (lm, batches, sae, config, Result, the core
    JSON)."""
    lm = tiny_llama()
    tok = types.SimpleNamespace(bos_token_id=1, eos_token_id=2, pad_token_id=2)
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(3, 100, (int(n),), generator=g).tolist()
            for n in torch.randint(1, 30, (40,), generator=g)]
    docs[3][5] = 2  # an EOS inside a document: ignored like BOS
    contexts = torch.tensor(list(saebench.packed_contexts(docs, 1, 16))[:24])
    batches = list(contexts.split(4))
    torch.manual_seed(0)
    sae = SAE(64, 256, k=8)
    x = torch.cat([model.capture(lm, i, torch.ones_like(i), [(2, "R")])[(2, "R")][0].flatten(0, 1)
                   for i in batches])
    sae.set_norms_(x, x)
    inference.fold_norm_(sae)
    inference.unit_decoder_(sae)
    config = {"layer": 2, "site": "R", "context_size": 16, "model_name": "tiny",
              "dataset_path": "any", "folded": True}
    result = saebench.evaluate(lm, tok, sae, config, batches, 3)
    out = saebench.output(result, sae, config, {"model_name": "tiny"}, details=True)
    return lm, batches, sae, config, result, out


@torch.no_grad()
def saebench_reference(lm, batches, sae):
    """The tiny model's own forwards, clean, spliced at non-special positions and ablated at
    every position at L2R: (mean KL per patch, mean CE per pass, per batch (x, x_hat, f, kept
    positions))."""
    kl = {"sae": [], "ablated": []}
    ce = {"clean": [], "sae": [], "ablated": []}
    rows = []
    for ids in batches:
        keep = ids > 2
        mask = torch.ones_like(ids)
        x = model.capture(lm, ids, mask, [(2, "R")])[(2, "R")][0].clone()  # (B, T, D)
        x_hat = sae(x.flatten(0, 1))[0].view_as(x)
        rows.append((x[keep].double(), x_hat[keep].double(), sae.encode(x[keep]), keep))
        logits = {}
        for name, new in (("clean", x), ("sae", torch.where(keep[..., None], x_hat, x)),
                          ("ablated", torch.zeros_like(x))):
            def patch(x_in, x_out, new=new):
                return new
            with model.splice(lm, 2, "R", patch):
                logits[name] = lm(input_ids=ids, attention_mask=mask).logits
            ce[name].append(F.cross_entropy(logits[name][:, :-1][keep[:, :-1]],
                                            ids[:, 1:][keep[:, :-1]], reduction="none"))
        p = F.softmax(logits["clean"][keep], -1)
        for name in kl:
            kl[name].append((p * (p.log() - F.softmax(logits[name][keep], -1).log())).sum(-1))
    kl = {k: torch.cat(v).mean().item() for k, v in kl.items()}
    ce = {k: torch.cat(v).mean().item() for k, v in ce.items()}
    return kl, ce, rows


def test_packed_contexts_are_saelens_packing():
    """BOS leads every context and separates documents; a long document runs on into the next
    context behind a fresh BOS; a separator may end a context; empty documents add nothing; the
    partial tail is dropped. With sae-lens installed, its own packing gives the same contexts."""
    docs = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [], [14], [15, 16, 17, 18], [19]]
    ours = list(saebench.packed_contexts(docs, 1, 5))
    assert ours == [[1, 5, 6, 7, 1], [1, 8, 9, 10, 11], [1, 12, 13, 1, 14], [1, 15, 16, 17, 18]]
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(3, 100, (int(n),), generator=g).tolist()
            for n in torch.randint(0, 300, (200,), generator=g)]
    ours = list(saebench.packed_contexts(docs, 1, 128))
    assert all(len(c) == 128 and c[0] == 1 for c in ours)
    packed = [t for c in ours for t in c if t != 1]
    assert packed == [t for d in docs for t in d][:len(packed)]  # every token once, in order
    batching = interop_package("sae_lens.tokenization_and_batching")
    theirs = batching.concat_and_batch_sequences(
        (torch.tensor(d, dtype=torch.long) for d in docs), 128, begin_batch_token_id=1,
        sequence_separator_token_id=1)
    assert [c.tolist() for c in theirs] == ours


def test_sae_bench_reads_on_after_its_reset_as_we_do():
    """sae_bench's core eval calls reset_input_dataset between its CE loop and its sparsity
    loop, but SAELens's ActivationsStore packs from a generator of its own, so the second loop
    reads the NEXT contexts, not the first ones again. saebench.evaluate does the same: its
    sparsity and variance metrics count the tokens of batches n..2n-1."""
    stores = interop_package("sae_lens.training.activations_store")
    rows = [[1] + list(range(10 * i + 3, 10 * i + 10)) for i in range(8)]  # 8 contexts of 8
    store = stores.ActivationsStore(
        model=torch.nn.Linear(1, 1), dataset=datasets.Dataset.from_dict({"input_ids": rows}),
        streaming=False, hook_name="blocks.0.hook_resid_post", hook_head_index=None,
        context_size=8, d_in=4, n_batches_in_buffer=2, total_training_tokens=8,
        store_batch_size_prompts=2, train_batch_size_tokens=8, prepend_bos=True,
        normalize_activations="none", device=torch.device("cpu"), dtype="float32")
    first = store.get_batch_tokens(2).tolist()
    store.reset_input_dataset()
    assert first == rows[:2] and store.get_batch_tokens(2).tolist() == rows[2:4]
    lm, batches, sae, config, _, _ = saebench_run()
    tok = types.SimpleNamespace(bos_token_id=1, eos_token_id=2, pad_token_id=2)
    uneven = batches[:3] + [b[:2] for b in batches[3:6]]  # 4 contexts each, then 2 each
    result = saebench.evaluate(lm, tok, sae, config, uneven, 3)
    assert result.core.tokens == sum(b.numel() for b in uneven[3:])


class NumberTokenizer:
    """Every word an integer token id; BOS 1."""
    bos_token_id = 1

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [int(w) for w in text.split()]}


def test_saebench_batches_read_the_split_again_at_its_end(monkeypatch):
    """Like SAELens's get_batch_tokens: when the held-out split ends, packing starts again from
    its first document (its partial last context dropped); a split without one whole context is
    refused rather than read forever."""
    split = [" ".join(str(3 + (i + j) % 90) for j in range(60)) for i in range(3)]

    def three_documents(*args, **kwargs):
        return iter(split)
    monkeypatch.setattr(data, "iter_documents", three_documents)
    out = list(saebench.batches(NumberTokenizer(), "any", 2))
    assert [b.shape for b in out] == [(saebench.PROMPTS, saebench.CONTEXT)] * 2
    ids = [NumberTokenizer()(d)["input_ids"] for d in split]
    first = list(saebench.packed_contexts(ids, 1))
    assert len(first) == 1 and all(c.tolist() == first[0] for b in out for c in b)

    def one_short_document(*args, **kwargs):
        return iter(["5 6 7"])
    monkeypatch.setattr(data, "iter_documents", one_short_document)
    with pytest.raises(ValueError):
        next(saebench.batches(NumberTokenizer(), "any", 1))


def close(a, b):
    return pytest.approx(float(b), rel=1e-3, abs=1e-6) == a


@torch.no_grad()
def test_saebench_core_metrics_match_a_direct_computation():
    """Each SAEBench core metric, recomputed here from the tiny model's own forwards with
    SAEBench's formulas (main.py): KL(clean || patched), the CE score, its two EVs, mse, cossim,
    shrinkage, sparsity, the feature statistics."""
    lm, batches, sae, _, result, out = saebench_run()
    m = out["eval_result_metrics"]
    kl, ce, _ = saebench_reference(lm, batches[:3], sae)
    rows = saebench_reference(lm, batches[3:], sae)[2]
    assert close(m["model_behavior_preservation"]["kl_div_with_sae"], kl["sae"])
    assert close(m["model_behavior_preservation"]["kl_div_score"],
                 (kl["ablated"] - kl["sae"]) / kl["ablated"])
    assert close(m["model_performance_preservation"]["ce_loss_score"],
                 (ce["ablated"] - ce["sae"]) / (ce["ablated"] - ce["clean"]))
    assert close(result.kl["ablated"], kl["ablated"]) and close(result.ce["clean"], ce["clean"])
    x = torch.cat([r[0] for r in rows])
    x_hat = torch.cat([r[1] for r in rows])
    q = m["reconstruction_quality"]
    per_row = torch.cat([(r[0] - r[1]).pow(2).sum(-1) / len(r[0]) for r in rows])
    assert close(q["mse"], per_row.mean().item())
    assert close(q["cossim"], F.cosine_similarity(x, x_hat, dim=-1).mean().item())
    legacy = torch.cat([1 - (r[0] - r[1]).pow(2).sum(-1) / (r[0] - r[0].mean(0)).pow(2).sum(-1)
                        for r in rows])
    assert close(q["explained_variance_legacy"], legacy.mean().item())
    mean_sq = torch.stack([r[0].pow(2).sum(-1).mean() for r in rows]).mean()
    total = mean_sq - torch.cat([r[0].pow(2).mean(0) for r in rows]).mean() ** 2
    sse = torch.stack([(r[0] - r[1]).pow(2).sum(-1).mean() for r in rows]).mean()
    assert close(q["explained_variance"], 1 - sse.item() / total.item())
    assert close(m["shrinkage"]["l2_ratio"], (x_hat.norm(dim=-1) / x.norm(dim=-1)).mean().item())
    bias = torch.stack([r[1].norm(dim=-1).pow(2).mean() / (r[0] * r[1]).sum(-1).mean()
                        for r in rows]).mean()
    assert close(m["shrinkage"]["relative_reconstruction_bias"], bias)
    f = torch.cat([dense(r[2], 256) for r in rows])
    assert close(m["sparsity"]["l0"], (f != 0).sum(-1).double().mean().item())
    assert close(m["sparsity"]["l1"], f.sum(-1).double().mean().item())
    density = (f > 0).double().mean(0)
    assert close(m["misc_metrics"]["frac_alive"], (density > 0).double().mean().item())
    assert close(m["misc_metrics"]["freq_over_1_percent"], (density > 0.01).double().mean())
    W = F.normalize(sae.W_dec.double(), dim=1)
    cos = W @ W.T - 3 * torch.eye(256, dtype=torch.float64)
    assert close(m["misc_metrics"]["average_max_decoder_cosine_sim"], cos.max(1).values.mean())
    prompts = torch.zeros(256)
    for r in rows:  # sequences (prompts) in which each feature fires at least once
        per_seq = torch.zeros(len(r[3]), 256)
        seq = torch.arange(len(r[3]))[:, None].expand_as(r[3])[r[3]]
        per_seq.index_add_(0, seq, (dense(r[2], 256) > 0).float())
        prompts += (per_seq > 0).float().sum(0)
    fires = (f > 0).sum(0)
    i = int(fires.argmax())
    detail = out["eval_result_details"][i]
    assert detail["index"] == i and close(detail["feature_density"], density[i].item())
    assert close(detail["consistent_activation_heuristic"], (fires[i] / prompts[i]).item())
    assert m["token_stats"]["total_tokens_eval_reconstruction"] == 3 * 4 * 16  # as SAEBench
    assert m["token_stats"]["total_tokens_eval_sparsity_variance"] == 3 * 4 * 16
    assert result.core.n == len(x) < 3 * 4 * 16  # BOS separators and the EOS are not scored


def test_saebench_json_validates_with_sae_bench():
    """The file SAEBench's own output model accepts (sae-bench is not a dependency: skipped
    when it is not installed)."""
    eval_output = interop_package("sae_bench.evals.core.eval_output")
    pydantic = interop_package("pydantic")
    out = saebench_run()[-1]
    parsed = pydantic.TypeAdapter(eval_output.CoreEvalOutput).validate_json(json.dumps(out))
    score = out["eval_result_metrics"]["model_behavior_preservation"]["kl_div_score"]
    assert parsed.eval_result_metrics.model_behavior_preservation.kl_div_score == score
    assert len(parsed.eval_result_details) == 256


class HookedLM:
    """The slice of TransformerLens's HookedTransformer that SAEBench's core eval calls, over our
    LM at one place: forwards whose hook (fn(activation, hook)) replaces the site's output,
    per-token CE of next-token predictions, the site's activations as a cache."""

    def __init__(self, lm, place):
        self.lm = lm
        self.place = place

    def __call__(self, tokens, return_type="both", loss_per_token=True, fwd_hooks=()):
        def patch(x_in, x_out):
            return fwd_hooks[0][1](x_out.clone(), None) if fwd_hooks else x_out
        with model.splice(self.lm, *self.place, patch):
            logits = self.lm(input_ids=tokens, attention_mask=torch.ones_like(tokens)).logits
        ce = F.cross_entropy(logits[:, :-1].transpose(1, 2), tokens[:, 1:], reduction="none")
        return logits, ce

    def run_with_hooks(self, tokens, fwd_hooks, **kw):
        return self(tokens, fwd_hooks=fwd_hooks)

    def run_with_cache(self, tokens, names_filter, **kw):
        acts = model.capture(self.lm, tokens, torch.ones_like(tokens), [self.place])
        return None, {names_filter[0]: acts[self.place][1].clone()}


class TokenStore:
    """SAEBench's view of an ActivationsStore: token batches in order. Its reset_input_dataset
    restarts the document iterator, which the packed-context generator does not read, so the
    batches go on (SAELens 6.54)."""

    def __init__(self, batches):
        self.batches = batches
        self.i = 0
        self.context_size = batches[0].shape[1]

    def get_batch_tokens(self, n):
        self.i += 1
        assert len(self.batches[self.i - 1]) == n
        return self.batches[self.i - 1]

    def reset_input_dataset(self):
        pass


@torch.no_grad()
def test_saebench_core_agrees_with_sae_bench_own_code(tmp_path):
    """sae_bench 0.6.0's own core functions (run_evals, calculate_misc_metrics) on our SAE's
    SAELens export, over the same packed batches of the tiny Llama, give every metric and
    per-feature value our file holds (sae-bench and sae-lens: installed in CI)."""
    core_main = interop_package("sae_bench.evals.core.main")
    sae_lens = interop_package("sae_lens")
    config_cls = interop_package("sae_bench.evals.core.eval_config").CoreEvalConfig
    lm, batches, sae, config, _, ours = saebench_run()
    interop.export_saelens(sae, config, str(tmp_path / "saelens"), "topk")
    utils = interop_package("sae_bench.sae_bench_utils.general_utils")
    exported = sae_lens.SAE.load_from_disk(str(tmp_path / "saelens"))
    theirs_sae = utils.load_and_format_sae("ours", exported, "cpu")[1]  # as sae_bench takes one
    flags_on = {f: True for f in ("compute_kl", "compute_ce_loss", "compute_l2_norms",
                                  "compute_sparsity_metrics", "compute_variance_metrics",
                                  "compute_featurewise_density_statistics",
                                  "compute_featurewise_weight_based_metrics",
                                  "exclude_special_tokens_from_reconstruction")}
    eval_config = config_cls(batch_size_prompts=4, n_eval_reconstruction_batches=3,
                             n_eval_sparsity_variance_batches=3, context_size=16, **flags_on)
    theirs, per_feature = core_main.run_evals(theirs_sae, TokenStore(batches),
                                              HookedLM(lm, (2, "R")), eval_config,
                                              ignore_tokens={1, 2})
    theirs["misc_metrics"] = core_main.calculate_misc_metrics(per_feature)
    compared = 0
    for group, values in theirs.items():
        for key, value in values.items():
            assert ours["eval_result_metrics"][group][key] == pytest.approx(
                value, rel=1e-3, abs=1e-5), (group, key)
            compared += 1
    assert compared == 26  # every metric of CoreEvalOutput
    details = ours["eval_result_details"]
    for key in ("feature_density", "consistent_activation_heuristic", "encoder_norm",
                "encoder_bias", "encoder_decoder_cosine_sim", "max_encoder_cosine_sim",
                "max_decoder_cosine_sim"):
        mine = torch.tensor([d[key] for d in details], dtype=torch.float64)
        other = torch.tensor(per_feature[key], dtype=torch.float64).nan_to_num(-1)
        torch.testing.assert_close(mine, other, rtol=1e-3, atol=1e-5, msg=key)


@pytest.mark.slow
def test_saebench_l1_and_per_feature_values_are_those_of_the_folded_sae(
        embedded_ckpt, released_embedded, tmp_path):
    """A TopK file that was never post-processed and its JumpReLU file run as TopK are one SAE:
    the SAEBench file's l1 and per-feature values agree (both folded, as its SAELens export)."""
    files = []
    for argv in ([embedded_ckpt], [released_embedded[0], "--mode", "topk"]):
        path = str(tmp_path / f"{len(files)}.json")
        evaluate.main(argv + ["--tokens", "300", "--saebench-json", path, "--saebench-details"])
        files.append(json.load(open(path)))
    raw, folded = files
    l1 = raw["eval_result_metrics"]["sparsity"]["l1"]
    assert l1 == pytest.approx(folded["eval_result_metrics"]["sparsity"]["l1"], rel=1e-4)
    assert len(raw["eval_result_details"]) == len(folded["eval_result_details"]) > 0
    for a, b in zip(raw["eval_result_details"], folded["eval_result_details"]):
        assert a.keys() == b.keys()
        assert all(a[k] == pytest.approx(b[k], rel=1e-3, abs=1e-6) for k in a)


# ================================================================================= extras/plots.py
# The figures draw what they are given: Fig. 2's TopK points and Vanilla lines over L0.


def test_fig2_plot_draws_topk_points_and_vanilla_lines_over_l0(tmp_path):
    configs = {f"L{layer}R-{w}x-{act}-{i}": dict(layer=layer, act_fn=act, expansion_factor=w)
               for layer in (7, 15) for w in (8, 32) for act, n in (("topk", 1), ("relu", 3))
               for i in range(n)}
    results = {name: dict(l0=10.0 * (1 + len(name) % 5), explained_variance=0.9,
                          delta_lm_loss=0.1) for name in configs}
    plots.plot_sweep(results, configs, str(tmp_path / "fig2.png"), "Fig. 2")
    with open(tmp_path / "fig2.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(tmp_path / "fig2.png") > 10000


# =========================================================================== extras/replacement.py
# The local replacement model is the LM: its clean forward gives the LM's logits, and with the
# nodes' writes (features, biases, errors) its frozen linear forward gives them again; the global
# replacement model is measured against the LM with every MLP replaced at once.


def random_transcoders(lm, n_features=96, dtype=torch.float64, skip_layers=(1,)):
    """A JumpReLU transcoder (inference form, random, some with a W_skip) for every layer."""
    d = lm.config.hidden_size
    transcoders = {}
    for layer in range(lm.config.num_hidden_layers):
        torch.manual_seed(layer)
        sae = SAE(d, n_features, act="jumprelu", transcoder=True, threshold=0.05,
                  skip=layer in skip_layers).to(dtype)
        with torch.no_grad():
            sae.b_enc.normal_(0, 0.1)
            if sae.skip:
                sae.W_skip.normal_(0, 0.05)
        sae.set_norms_(torch.full((1, d), 3.0, dtype=dtype), torch.ones(1, d, dtype=dtype))
        inference.fold_norm_(sae)
        inference.unit_decoder_(sae)
        sae.requires_grad_(False)
        transcoders[layer] = sae
    return transcoders


@pytest.fixture(scope="module")
def tiny_circuit():
    """(a float64 tiny Llama with eager attention, its random transcoders, a prompt, Setup)."""
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=50,
                      max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                      attn_implementation="eager")
    lm = LlamaForCausalLM(cfg).double().eval()
    lm.requires_grad_(False)
    transcoders = random_transcoders(lm)
    tokens = torch.tensor([1, 5, 9, 7, 12, 5, 9, 30])
    return lm, transcoders, tokens, attribution.setup(lm, transcoders, tokens)


def clean_writes(s, extra_node=None):
    """What every node writes into the residual stream of Setup s (writes of linear_forward);
    extra_node: that node's output written once more (its scale doubled)."""
    T = s.n_positions
    writes = {"embed": s.frozen.embeds[None].clone()}
    for layer in range(s.n_layers):
        writes[layer] = (s.decoder_biases[layer] + s.errors[layer])[None].clone()
    nodes = list(range(len(s.features))) + ([extra_node] if extra_node is not None else [])
    for node in nodes:
        if node < s.first_error():
            layer, pos, _ = s.features[node].tolist()
            writes[layer][0, pos] += s.outputs[node]
        elif node < s.first_token():
            layer, pos = divmod(node - s.first_error(), T)
            writes[layer][0, pos] += s.errors[layer, pos]
        else:
            pos = node - s.first_token()
            writes["embed"][0, pos] += s.frozen.embeds[pos]
    return writes


def target_value(lm, s, node, writes):
    """A target's value in the local replacement model: a feature's pre-activation, or a
    logit's demeaned value at the last position."""
    mlp_ins, final = replacement.linear_forward(lm, s.frozen, writes, s.skips)
    if node >= s.first_logit():
        return (final[0, -1] @ s.logit_dirs[node - s.first_logit()]).item()
    layer, pos, _ = s.features[node].tolist()
    return (mlp_ins[layer][0, pos] @ s.encoders[node] + s.biases[node]).item()


@torch.no_grad()
def test_the_clean_forward_is_the_lms_forward(tiny_circuit):
    """Step by step as transformers computes it: the same logits (float64 model; transformers
    takes its norms and softmax in float32, hence 1e-6)."""
    lm, _, tokens, s = tiny_circuit
    real = lm(input_ids=tokens[None]).logits[0]
    assert (s.frozen.logits - real).abs().max() < 1e-6
    assert len(s.frozen.patterns) == 3 and s.frozen.patterns[0].shape == (4, 8, 8)
    torch.testing.assert_close(s.frozen.patterns[1].sum(-1), torch.ones(4, 8, dtype=torch.float64))


@torch.no_grad()
def test_with_its_error_nodes_the_replacement_model_is_complete(tiny_circuit):
    """Completeness: the frozen linear forward of every node's write (features, decoder biases,
    error nodes, token embeddings) gives the clean forward's logits exactly."""
    lm, _, _, s = tiny_circuit
    _, final = replacement.linear_forward(lm, s.frozen, clean_writes(s), s.skips)
    assert (lm.lm_head(final)[0] - s.frozen.logits).abs().max() < 1e-12


@torch.no_grad()
def test_the_global_replacement_model_against_the_lm(tiny_scope, monkeypatch):
    """Every MLP replaced at once: with patches that put the MLP's own output back, CE equals
    the clean CE, KL is 0 and every top-1 agrees; with the real transcoders it differs."""
    lm_dir, _ = tiny_scope
    lm, tok = model.load_model(lm_dir)
    transcoders = random_transcoders(lm, dtype=torch.float32, skip_layers=())
    docs = data.iter_documents(split="eval", epochs=1)
    batches = list(itertools.islice(data.token_batches(tok, docs, 64, 4), 2))
    real = replacement.replacement_metrics(lm, tok, transcoders, batches, 10**6)
    patches = metrics.patches

    def unchanged(sae, keep):
        _, zeroed = patches(sae, keep)

        def own(x_in, x_out):
            return x_out
        return own, zeroed
    monkeypatch.setattr(metrics, "patches", unchanged)
    same = replacement.replacement_metrics(lm, tok, transcoders, batches, 10**6)
    assert same["ce_loss_replacement"] == pytest.approx(same["ce_loss"], abs=1e-6)
    assert abs(same["kl_div"]) < 1e-6 and same["top1_agreement"] == 1.0
    assert same["n_predictions"] == real["n_predictions"] > 100
    assert real["kl_div"] > 0.01 and real["ce_loss"] == pytest.approx(same["ce_loss"])


# =========================================================================== extras/attribution.py
# The graph is right: every edge is exactly the change of its target when its source is scaled
# (exactness); each target is its constant part plus the sum of its incoming edges
# (conservation); greedy selection takes features by influence up to the budget; a feature can
# be the target (a local circuit).


@pytest.fixture(scope="module")
def tiny_graph(tiny_circuit):
    lm, _, _, s = tiny_circuit
    return attribution.attribute(lm, s, 10**6)


def test_every_edge_is_exactly_the_targets_change(tiny_circuit, tiny_graph):
    """Exactness: doubling a source node's output (a feature, an error, a token) changes each
    target's pre-activation (or demeaned logit) in the frozen replacement model by exactly the
    edge's weight, skip transcoders' W_skip paths included."""
    lm, _, _, s = tiny_circuit
    graph = tiny_graph
    ids = graph.node_ids()
    base = clean_writes(s)
    g = torch.Generator().manual_seed(0)
    targets = graph.adjacency.any(1).nonzero(as_tuple=True)[0]
    kinds = graph.kinds()
    checked = set()
    for t in targets[torch.randperm(len(targets), generator=g)[:12]].tolist():
        before = target_value(lm, s, int(ids[t]), base)
        for kind in ("feature", "error", "token"):  # its strongest source of each kind
            weights = graph.adjacency[t] * torch.tensor([k == kind for k in kinds])
            if not weights.any():
                continue
            source = int(weights.abs().argmax())
            after = target_value(lm, s, int(ids[t]), clean_writes(s, int(ids[source])))
            edge = graph.adjacency[t, source].item()
            assert after - before == pytest.approx(edge, abs=1e-12)
            checked.add(kind)
    assert checked == {"feature", "error", "token"}


def test_each_target_is_its_constant_plus_its_incoming_edges(tiny_circuit, tiny_graph):
    """Conservation: a target's value is what the decoder biases alone give it (and its own
    encoder bias) plus the sum of its incoming edges."""
    lm, _, _, s = tiny_circuit
    graph = tiny_graph
    ids = graph.node_ids()
    base = clean_writes(s)
    biases_only = {"embed": torch.zeros_like(base["embed"])}
    for layer in range(s.n_layers):
        biases_only[layer] = s.decoder_biases[layer].expand_as(base[layer]).clone()
    for t in graph.adjacency.any(1).nonzero(as_tuple=True)[0].tolist():
        constant = target_value(lm, s, int(ids[t]), biases_only)
        total = target_value(lm, s, int(ids[t]), base)
        assert constant + graph.adjacency[t].sum().item() == pytest.approx(total, abs=1e-12)


def test_features_are_taken_greedily_by_influence_up_to_the_budget(tiny_circuit, tiny_graph):
    """A budget of 40 features keeps the 40 the full graph ranks first by influence on the
    logits (up to ties at the cut), and the scores are shares in [0, 1]."""
    lm, _, _, s = tiny_circuit
    small = attribution.attribute(lm, s, 40)
    assert small.n_features() == 40 and tiny_graph.n_features() > 40
    full_influence = influence.influence(tiny_graph.adjacency, tiny_graph.weights)
    ranked = tiny_graph.selected[full_influence[:tiny_graph.n_features()].argsort(
        descending=True)]
    assert len(set(small.selected.tolist()) & set(ranked[:40].tolist())) >= 36
    replacement_score, completeness = influence.scores(tiny_graph)
    assert 0 < replacement_score <= 1 and 0 < completeness <= 1


def test_a_feature_can_be_the_target(tiny_circuit):
    """A local circuit: the graph of one feature's pre-activation holds only features of earlier
    layers, and its edges are that feature's."""
    lm, _, _, s = tiny_circuit
    later = (s.features[:, 0] == 2).nonzero(as_tuple=True)[0]
    node = int(later[s.activations[later].argmax()])
    graph = attribution.attribute(lm, s, 10**6, feature_target=node)
    assert graph.targets.tolist() == [node] and node not in graph.selected.tolist()
    assert (s.features[graph.selected, 0] < 2).all()
    row = attribution.rows(lm, s, torch.tensor([node]))[0]
    torch.testing.assert_close(graph.adjacency[-1], row[graph.node_ids()])


# ============================================================================= extras/influence.py
# Pruning keeps what carries the influence (tokens and targets always); the graph's predicted
# effect of removing a feature agrees with removing it in the real model.


def test_pruning_keeps_the_influential_nodes_and_every_token_and_target(tiny_graph):
    pruned = influence.prune(tiny_graph, 0.8, 0.98)
    kinds = tiny_graph.kinds()
    assert all(pruned.nodes[i] for i, k in enumerate(kinds) if k in ("token", "target"))
    assert pruned.nodes.sum() < len(kinds) and pruned.edges.sum() > 0
    assert not (pruned.edges & ~(pruned.nodes[:, None] & pruned.nodes[None, :])).any()
    for i in pruned.nodes.nonzero(as_tuple=True)[0].tolist():
        if kinds[i] == "feature":  # every kept feature has a kept input and a kept output
            assert pruned.edges[i].any() and pruned.edges[:, i].any()
    everything = influence.prune(tiny_graph, 1.0, 1.0)
    assert everything.nodes.sum() >= pruned.nodes.sum()


@torch.no_grad()
def top_logit_with_live_features(lm, s, transcoders, removed=None):
    """The top logit (demeaned) of the local replacement model with its attention and norms
    frozen but its features live: each active feature's activation is its pre-activation on its
    layer's input as it now is (a JumpReLU above its threshold), the set of active features and
    the errors fixed; removed: a feature node held at 0."""
    x = s.frozen.embeds[None].double()
    for layer, block in enumerate(lm.model.layers):
        h = replacement.normed(block.input_layernorm, x, s.frozen.attn_scales[layer])
        mid = x + replacement.attend(block.self_attn, h, s.frozen.patterns[layer])
        norm = block.post_attention_layernorm
        mlp_in = replacement.normed(norm, mid, s.frozen.mlp_scales[layer])
        sae = transcoders[layer]
        active = attribution.dense_codes(sae, s.frozen.mlp_in[layer].double()) > 0
        f = (mlp_in[0] @ sae.W_enc.T + sae.b_enc) * active
        if removed is not None and s.features[removed, 0] == layer:
            _, pos, feature = s.features[removed].tolist()
            f[pos, feature] = 0
        out = f @ sae.W_dec + sae.b_dec + s.errors[layer]
        if sae.skip:
            out = out + mlp_in[0] @ sae.W_skip.T
        x = mid + out[None]
    final = replacement.normed(lm.model.norm, x, s.frozen.final_scale)
    return (final[0, -1] @ s.logit_dirs[0]).item()


def test_the_graph_predicts_what_removing_a_feature_does(tiny_circuit, tiny_graph):
    """Removing each of the 10 most influential features from the replacement model with live
    features (its set of active ones held) moves the top logit exactly as the graph predicts
    through its edges per unit of activation. The same check in the real model, where the MLPs
    themselves respond and features turn on and off, is reported on SmolLM2
    (docs/circuits.md)."""
    lm, transcoders, _, s = tiny_circuit
    graph = tiny_graph
    base = top_logit_with_live_features(lm, s, transcoders)
    clean = s.frozen.logits[-1]
    assert base == pytest.approx((clean[s.logit_tokens[0]] - clean.mean()).item(), abs=1e-9)
    infl = influence.influence(graph.adjacency, graph.weights)[:graph.n_features()]
    nodes = infl.topk(10).indices.tolist()
    for node in nodes:
        predicted = influence.predicted_ablation(graph, node, turn_off=False)
        removed = int(graph.selected[node])
        measured = top_logit_with_live_features(lm, s, transcoders, removed) - base
        assert predicted == pytest.approx(measured, rel=1e-9, abs=1e-9)


def test_the_real_models_ablation_holds_the_last_norms_scale_as_the_graph_does(tiny_circuit,
                                                                              tiny_graph):
    """In the real model (attention, norms and MLPs live), removing a last-layer feature at the
    last position moves the top logit exactly as the graph predicts once the last RMSNorm's
    scale is held (nothing else lies downstream), and otherwise when that scale moves with it;
    faithfulness reports both rank correlations."""
    lm, _, _, s = tiny_circuit
    graph = tiny_graph
    ids = graph.node_ids()
    last = [node for node in range(graph.n_features())
            if s.features[ids[node], 0] == s.n_layers - 1
            and s.features[ids[node], 1] == s.n_positions - 1]
    assert len(last) >= 3
    for node in last[:5]:
        held, live = influence.measured_ablation(lm, graph, node)
        predicted = influence.predicted_ablation(graph, node)
        assert held == pytest.approx(predicted, rel=1e-9, abs=1e-12)
        assert live != pytest.approx(held, rel=1e-6, abs=1e-12)
    rho, rho_live, rows = influence.faithfulness(lm, graph, n=8)
    assert len(rows) == 8 and -1 <= rho <= 1 and -1 <= rho_live <= 1
    assert rho == pytest.approx(influence.spearman([r[1] for r in rows], [r[2] for r in rows]))


# ==================================================================================== attribute.py
# attribute.py: a scope's transcoders, a prompt, a graph in circuit-tracer's schema and a page
# that opens from disk; bad input is one line before the LM loads.


@pytest.fixture(scope="module")
def tiny_transcoder_scope(tiny_scope, tmp_path_factory):
    """(the tiny LM's folder, a folder of skip transcoders, one per layer, from one LM pass)."""
    lm_dir, _ = tiny_scope
    out = str(tmp_path_factory.mktemp("tc"))
    args = ["--model", lm_dir, "--layer", "all", "--site", "TC", "--skip", "--expansion", "2",
            "--k", "8", "--total-tokens", "8192", "--buffer-size", "4096", "--batch-size", "256",
            "--context-size", "128", "--eval-tokens", "0", "--out", out]
    train.main(args)
    return lm_dir, out


def test_attribute_writes_circuit_tracers_json_and_a_page(tiny_transcoder_scope, tmp_path,
                                                          capsys):
    _, folder = tiny_transcoder_scope
    path = str(tmp_path / "g.json")
    page = str(tmp_path / "g.html")
    out = attribute.main([folder, "The cat sat on the mat because the cat", "--json", path,
                          "--html", page, "--contexts", "300",
                          "--node-threshold", "1.0"])  # keep every node with influence
    printed = capsys.readouterr().out
    saved = json.load(open(path))
    assert saved == json.loads(json.dumps(out))
    assert set(saved) == {"metadata", "qParams", "nodes", "links"}
    meta = saved["metadata"]
    assert meta["prompt_tokens"][0] == "<|im_start|>" and meta["schema_version"] == 1
    assert 0 < meta["replacement_score"] <= 1 and 0 < meta["completeness_score"] <= 1
    fields = ["node_id", "feature", "layer", "ctx_idx", "feature_type", "token_prob",
              "is_target_logit", "run_idx", "reverse_ctx_idx", "jsNodeId", "clerp", "influence",
              "activation"]
    assert all(list(node) == fields for node in saved["nodes"])
    kinds = {node["feature_type"] for node in saved["nodes"]}
    assert {"embedding", "logit"} <= kinds <= {"embedding", "logit", "cross layer transcoder",
                                               "mlp reconstruction error"}
    ids = {node["node_id"] for node in saved["nodes"]}
    assert all(link["source"] in ids and link["target"] in ids for link in saved["links"])
    logits = [n for n in saved["nodes"] if n["feature_type"] == "logit"]
    assert sum(n["is_target_logit"] for n in logits) == 1 and logits[0]["layer"] == "4"
    features = [n for n in saved["nodes"] if n["feature_type"] == "cross layer transcoder"]
    # every kept feature is named by where it fires highest (Neuronpedia's clerp)
    assert features and all(n["clerp"].startswith(f"L{n['layer']}#") for n in features)
    assert "replacement score" in printed and "strongest paths" in printed
    html_text = open(page).read()
    assert "http" not in html_text.replace("http-equiv", "") and " src=" not in html_text
    assert html_text.count("<script") == 2  # the data and the drawing code, inline


BAD_ATTRIBUTIONS = [(["", ], "the prompt is empty"),
                    (["word " * 200], "the transcoders trained on contexts of 128"),
                    (["The cat", "--target", "1:2"], "--target 1:2: give LAYER:FEATURE:POSITION")]


@pytest.mark.parametrize("extra,message", BAD_ATTRIBUTIONS)
def test_bad_prompts_and_targets_are_one_line(extra, message, tiny_transcoder_scope, capsys,
                                              monkeypatch):
    _, folder = tiny_transcoder_scope
    refuse_model_load(monkeypatch)
    monkeypatch.setattr(model, "load_lm", model.load_model)  # so the LM's load fails the test
    assert message in one_line_error(capsys, attribute.main, [folder, *extra])


def test_a_folder_that_cannot_chain_is_one_line(tiny_transcoder_scope, tiny_scope, tmp_path,
                                                capsys, monkeypatch):
    """A layer without its transcoder, or two for one layer, or SAEs of another site only."""
    _, folder = tiny_transcoder_scope
    _, scope_folder = tiny_scope
    refuse_model_load(monkeypatch)
    gap = tmp_path / "gap"
    shutil.copytree(folder, gap)
    os.remove(gap / "L1TC-2x-k8-SkipTopK.safetensors")
    err = one_line_error(capsys, attribute.main, [str(gap), "The cat"])
    assert "no transcoder for layer(s) [1]" in err and "needs one at every layer" in err
    two = tmp_path / "two"
    shutil.copytree(folder, two)
    shutil.copy(os.path.join(scope_folder, "L1TC-2x-k8-TopK.safetensors"), two)
    err = one_line_error(capsys, attribute.main, [str(two), "The cat"])
    assert "two transcoders for layer 1" in err
    sites_only = tmp_path / "r"
    sites_only.mkdir()
    shutil.copy(os.path.join(scope_folder, "L1R-2x-k8-TopK.safetensors"), sites_only)
    err = one_line_error(capsys, attribute.main, [str(sites_only), "The cat"])
    assert "no transcoder (site TC)" in err


def test_a_target_feature_must_be_active_there(tiny_transcoder_scope, capsys):
    _, folder = tiny_transcoder_scope
    err = one_line_error(capsys, attribute.main, [folder, "The cat sat", "--target", "1:9999:2"])
    assert "--target 1:9999:2: feature 9999 is not active at position 2 of layer 1" in err


def test_a_scopes_transcoders_export_for_circuit_tracer(tiny_transcoder_scope, tmp_path):
    """postprocess.py DIR --export-circuit-tracer: config.yaml and layer_{i}.safetensors with
    exactly circuit-tracer's keys and shapes, and its JumpReLU forward (x * (x > theta), then
    acts @ W_dec + b_dec + x @ W_skip.T) from the files alone is our transcoder's."""
    lm_dir, folder = tiny_transcoder_scope
    out = tmp_path / "ct"
    postprocess.main([folder, "--export-circuit-tracer", str(out), "--tokens", "2000"])
    lines = open(out / "config.yaml").read().splitlines()
    assert lines[0] == "model_kind: transcoder_set" and "feature_input_hook: mlp.hook_in" in lines
    layer_files = [f"layer_{i}.safetensors" for i in range(3)]
    assert sorted(os.listdir(out)) == ["config.yaml"] + layer_files
    w = load_file(str(out / "layer_1.safetensors"))
    assert {k: tuple(v.shape) for k, v in w.items()} == {
        "W_enc": (128, 64), "W_dec": (128, 64), "b_enc": (128,), "b_dec": (64,),
        "W_skip": (64, 64), "activation_function.threshold": (128,)}
    sae, _, _ = inference.load_sae(os.path.join(folder, "L1TC-2x-k8-SkipTopK.safetensors"))
    sae.threshold = w["activation_function.threshold"][0].item()
    sae.act = "jumprelu"
    x = torch.randn(50, 64) * 3
    pre = x @ w["W_enc"].T + w["b_enc"]
    acts = pre * (pre > w["activation_function.threshold"])
    theirs = acts @ w["W_dec"] + w["b_dec"] + x @ w["W_skip"].T
    torch.testing.assert_close(theirs, sae(x)[0], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@torch.no_grad()
def test_smollm2s_replacement_model_is_complete_to_1e_4(smollm):
    """On the real SmolLM2 in float32, with a transcoder at every one of its 30 layers (random:
    completeness holds for any, the error nodes take up the rest), the frozen replacement model's
    logits are the LM's own within 1e-4."""
    lm, tok = smollm
    transcoders = random_transcoders(lm, n_features=1152, dtype=torch.float32, skip_layers=(3,))
    tokens = torch.tensor(data.encode_documents(tok, ["The capital of France is Paris."])[0])
    s = attribution.setup(lm, transcoders, tokens)
    real = lm(input_ids=tokens[None]).logits[0]
    _, final = replacement.linear_forward(lm, s.frozen, clean_writes(s), s.skips)
    logits = final[0] @ lm.lm_head.weight.double().T
    assert (logits - real).abs().max() < 1e-4


# ============================================================================= extras/synthetic.py
# Planted activations have an answer key: an SAE whose decoder rows are the directions recovers
# them all, a random one none; rows carry the offset and the scale real activations have.


def test_recovery_scores_the_decoder_against_the_planted_directions():
    dirs, offset = synthetic.directions(16)
    assert dirs.shape == (16 * synthetic.EXPANSION, 16)
    torch.testing.assert_close(dirs.norm(dim=1), torch.ones(len(dirs)))
    exact = SAE(16, len(dirs))
    with torch.no_grad():
        exact.W_dec.copy_(dirs * 3)  # any norm: recovery reads directions
    assert synthetic.recovered(exact, dirs) == 1.0
    assert synthetic.recovered(SAE(16, len(dirs)), dirs) < 0.05
    rows = synthetic.rows(dirs, offset, 4, 2000, seed=0)
    assert rows.shape == (2000, 16)
    mean_direction = F.normalize(rows.mean(0), dim=0)
    assert mean_direction @ offset > 0.9  # far from centred, along the offset


# ======================================================================================== the tree
# The code reads as teaching code: one statement per line, no packing (no parallel assignment of
# unrelated values, no backslash continuation), lines of at most 99 characters, few functions
# of many parameters, the method's files within their budgets; libraries sit below the scripts,
# the method's files import nothing from extras/, and README names every file in the tree.

METHOD = {"train.py": 400, "evaluate.py": 300, "postprocess.py": 180, "sae.py": 200,
          "model.py": 320, "buffer.py": 170, "parallel.py": 200}  # lines (style.md)
SCRIPTS_ON_TOP = {"train.py", "evaluate.py", "postprocess.py", "bench.py", "planted.py",
                  "attribute.py"}


def python_files():
    """Every Python file of the project: the top level and extras/."""
    root = pathlib.Path(HERE)
    return sorted(root.glob("*.py")) + sorted((root / "extras").glob("*.py"))


def crammed(path):
    """[(line, what)] of the packing the style forbids in one file."""
    src = path.read_text()
    found = []
    for node in ast.walk(ast.parse(src)):
        body = [getattr(node, field, None) for field in ("body", "orelse", "finalbody")]
        for stmts in body:
            if isinstance(stmts, list):
                found += [(b.lineno, "two statements on a line") for a, b in zip(stmts, stmts[1:])
                          if isinstance(a, ast.stmt) and a.end_lineno == b.lineno]
        tuples = isinstance(node, ast.Assign) and isinstance(node.value, ast.Tuple)
        if tuples and isinstance(node.targets[0], ast.Tuple):
            targets = sorted(ast.unparse(t) for t in node.targets[0].elts)
            values = sorted(ast.unparse(v) for v in node.value.elts)
            if targets != values:  # a swap is fine
                found.append((node.lineno, "parallel assignment"))
    strings = set()
    for token in tokenize.generate_tokens(io.StringIO(src).readline):
        if token.type == tokenize.STRING:
            strings.update(range(token.start[0], token.end[0]))
    for n, line in enumerate(src.splitlines(), 1):
        if line.rstrip().endswith("\\") and n not in strings:
            found.append((n, "backslash continuation"))
        if len(line) > 99:
            found.append((n, "line over 99 characters"))
    return found


def project_modules():
    """The names a file could import: every module at the top and in extras/."""
    return {p.stem for p in python_files()} - {"__init__"}


def test_no_packing_anywhere_in_the_tree():
    found = {}
    for path in python_files():
        if crammed(path):
            found[path.name] = crammed(path)
    assert not found, found


def test_few_functions_take_many_parameters():
    """At most 10 functions in the tree take more than 6 parameters (self and cls not counted):
    where more travel together they are one object."""
    wide = []
    for path in python_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef):
                a = node.args
                names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs]
                n = len([x for x in names if x not in ("self", "cls")])
                n += (a.vararg is not None) + (a.kwarg is not None)
                if n > 6:
                    wide.append(f"{path.name}:{node.name} ({n})")
    assert len(wide) <= 10, wide


def imported_names(tree):
    """The module names a file binds at its top: `import data`, `from extras import plan`."""
    names = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
        if isinstance(node, ast.ImportFrom) and node.module == "extras":
            names |= {a.asname or a.name for a in node.names}
    return names


def test_no_local_name_shadows_a_module():
    """A parameter or local variable named like a module the file imports, or like `flags`,
    `data` or `metrics` anywhere, hides the module from the reader."""
    shadowing = []
    for path in python_files():
        tree = ast.parse(path.read_text())
        modules = imported_names(tree) | {"flags", "data", "metrics"}
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.Lambda)):
                continue
            args = node.args
            names = {x.arg for x in args.posonlyargs + args.args + args.kwonlyargs}
            for inner in ast.walk(node):
                if isinstance(inner, ast.Name) and isinstance(inner.ctx, ast.Store):
                    names.add(inner.id)
            shadowing += [f"{path.name}:{node.lineno} {name}" for name in names & modules]
    assert not shadowing, sorted(set(shadowing))


def test_the_methods_files_keep_their_budgets():
    """style.md's line budgets; any other module at most 350 lines; at most 16 modules at the
    top (the method, its scripts and its tests), the rest in extras/."""
    lines = {path.name: len(path.read_text().splitlines()) for path in python_files()
             if path.name != "test_all.py"}
    over = {name: n for name, n in lines.items() if n > METHOD.get(name, 350)}
    assert not over, over
    assert len(list(pathlib.Path(HERE).glob("*.py"))) <= 16


def project_imports(path):
    """The project modules a file imports: `sae`, `extras.plan`, ..."""
    modules = project_modules()
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] in modules}
        if isinstance(node, ast.ImportFrom) and node.module == "extras":
            found |= {f"extras.{a.name}" for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module in modules:
            found.add(node.module)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("extras."):
            found.add(node.module)
    return found


def test_libraries_sit_below_the_scripts():
    """Nothing but the tests imports a script; the method's libraries import nothing from
    extras/ (the scripts may); sae.py, buffer.py and model.py import nothing of the project."""
    for path in python_files():
        if path.name == "test_all.py":
            continue
        imported = project_imports(path)
        scripts = {m for m in imported if f"{m}.py" in SCRIPTS_ON_TOP}
        assert not scripts, f"{path.name} imports the script(s) {scripts}"
        method_library = path.parent == pathlib.Path(HERE) and path.name not in SCRIPTS_ON_TOP
        if method_library:
            extras = {m for m in imported if m.startswith("extras")}
            assert not extras, f"{path.name} (the method) imports {extras}"
        if path.name in ("sae.py", "buffer.py", "model.py"):
            assert not imported, f"{path.name} imports {imported}"


def test_readme_names_every_file_in_the_tree():
    """README's files in reading order are the tree's files."""
    readme = open(os.path.join(HERE, "README.md")).read()
    missing = [str(path.relative_to(HERE)) for path in python_files()
               if path.name != "__init__.py" and f"`{path.relative_to(HERE)}`" not in readme
               and f"`{path.name}`" not in readme]
    assert not missing, missing
