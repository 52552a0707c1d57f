"""A tiny model through the CUDA backend (Numba's simulator in CI, run by test_cuda_sim.py) equals the CPU path.

Two comparisons, both on the same random weights:
- exact weights: the CPU (NumPy reference backend) runs the very weights the device multiplies by (fp16-rounded
  floats, or the INT4 weights dequantized) and keeps its KV cache in the device's storage (kv_dtype fp32, fp16 or
  int8: the same rounding of the same values), so only fp32 summation order differs: max |Δlogit| <= 1e-4 x
  max |logit| (the oracle tests' tolerance);
- as loaded: the CPU runs the fp32 checkpoint weights with an fp32 KV cache, the device their fp16 rounding and an
  fp16 cache: max |Δlogit| <= 1e-2 x max |logit| (fp16's relative rounding is 2^-11 per weight and cached value).
The KV blocks are made small here (BLOCK 4, or 2) so that a few tokens span several blocks: every cache reads and
writes through a block table of several entries, shares a block with another, copies one on write.
"""
import os

import numpy as np
import pytest

from tinyhun.backends import NumpyBackend
from tinyhun.families import hunyuan_v1_moe, llama
from tinyhun.kernels import q4
from tinyhun.kernels.linear import as_linear
from tinyhun.kernels.moe import stack_linears
from tinyhun.model import Model
from tinyhun.structs import Attention, DenseMLP, Layer, MoEMLP, Weights

pytestmark = pytest.mark.skipif(os.environ.get("TINYHUN_CUDA_TESTS") != "1",
                                reason="run by test_cuda_sim.py (simulator subprocess) or bench/gpu_check.py")
f32 = np.float32
V, H, I, NH, NKV, D = 32, 32, 32, 2, 1, 16   # tiny: the simulator runs a thread as a Python thread


# mixture-of-experts layers (E experts of width Ie, top k, shared MLPs): layer 0 top-1 of 4 with the shared MLP
# stacked among the experts (its width is theirs), layer 1 k = E = 3 of width 64 with the shared MLP apart (width I)
MOE = dict(num_experts=(4, 3), moe_topk=(1, 3), moe_intermediate_size=(I, 64), num_shared_expert=(1, 1))
COUNTING = np.zeros(1, np.bool_)   # the MoE layers' routing-statistics switch
KV = dict(max_context=8, kv_memory=1 << 16)   # a pool of 64 KiB: 128 blocks of 4 tokens of a fp16 2-layer model


def small_blocks(monkeypatch, bs):
    """KV blocks of bs positions in the pool, the model's tables and the kernels (kernels.kv.BLOCK where each
    module reads it)."""
    from tinyhun import kv_cache, model, prompt_cache
    from tinyhun.kernels import kv
    for m in (kv, kv_cache, model, prompt_cache):
        monkeypatch.setattr(m, "BLOCK", bs)


def config(family, layers):
    extra = MOE if family is hunyuan_v1_moe else {}
    return family.Config(model_type=family.MODEL_TYPE, vocab_size=V, hidden_size=H, intermediate_size=I,
                         num_layers=layers, num_heads=NH, num_kv_heads=NKV, head_dim=D, rms_norm_eps=1e-5,
                         rope_base=10000.0, max_position_embeddings=32, tie_word_embeddings=True, **extra)


def weights(rng, qk_norm, fmts, moe=None):
    """Random weights of len(fmts) layers, layer i's matrices in format fmts[i] (the embedding in fmts[0]): f32,
    q4 or q4-asym."""
    def mat(n, k, fmt=None):
        fmt = fmt or fmts[i]
        w = (rng.standard_normal((n, k)) * 0.2).astype(f32)
        return as_linear(q4.quantize_q4(w, 32, fmt == "q4") if fmt.startswith("q4") else w)

    def norm(n):
        return (1 + 0.1 * rng.standard_normal(n)).astype(f32)

    def mlp(i):
        dense = DenseMLP(mat(I, H), mat(I, H), mat(H, I))
        if moe is None:
            return dense
        E, Ie = moe["num_experts"][i], moe["moe_intermediate_size"][i]
        gate, up, down = (stack_linears([mat(n, k) for _ in range(E)]) for n, k in ((Ie, H), (Ie, H), (H, Ie)))
        return MoEMLP(rng.standard_normal((E, H)).astype(f32), gate, up, down, dense, True, moe["moe_topk"][i], Ie,
                      np.zeros(E, np.int64), COUNTING)
    none = np.zeros(0, f32)
    layers = []
    for i in range(len(fmts)):
        layers.append(Layer(norm(H), Attention(mat(NH * D, H), mat(NKV * D, H), mat(NKV * D, H), mat(H, NH * D),
                                               norm(D) if qk_norm else none, norm(D) if qk_norm else none),
                            norm(H), mlp(i)))
    embed = mat(V, H, fmts[0])
    return Weights(embed, tuple(layers), norm(H), embed)


def run(model, share=True):
    """A prefill (GEMMs) over two blocks, a decode step (GEMVs), and a batch step of two caches at different
    positions (GEMVs of two rows); share: then a third cache takes the first's full first block by its prefix
    (shared), is trimmed into it and writes there (a copy on write), and decodes beside the first. The kernel
    launches of the decode step."""
    ids = np.array([5, 17, 2, 30, 9, 21])
    a, b, c = model.new_caches(3)
    out = [model.forward(a, ids[:5]).copy()]
    before = getattr(model.backend, "launches", 0)
    out.append(model.forward(a, ids[5:]).copy())
    launches = getattr(model.backend, "launches", 0) - before
    out.append(model.forward_batch([a, b], np.array([7, 8])).copy())
    if not share:
        return out, launches
    assert c.reuse(list(ids)) == 4 and c.table[0] == a.table[0]
    c.trim(2)
    out.append(model.forward(c, np.array([3, 11, 12])).copy())
    assert c.table[0] != a.table[0]
    out.append(model.forward_batch([c, a], np.array([4, 6])).copy())
    return out, launches


def assert_close(got, ref, rel):
    for g, r in zip(got[0], ref[0]):
        err, bound = float(np.abs(g - r).max()), rel * float(np.abs(r).max())
        assert err <= bound, f"max |Δlogit| {err:.3g} > {bound:.3g} (= {rel} x max |logit|)"


# launches of a decode step: embed; per layer four for attention (five with its split's merge), two for a dense
# MLP, three for a mixture of experts plus two for a shared MLP kept apart; the norm + lm_head
LAUNCHES = {llama: 1 + (4 + 2) + 1, hunyuan_v1_moe: 1 + (4 + 3) + (4 + 5) + 1}


@pytest.mark.parametrize("family, fmts, split, kind", [(llama, ("q4-asym",), None, "int8"),
                                                       (hunyuan_v1_moe, ("f32", "q4"), 4, "fp16")])
def test_cuda_model_equals_cpu(family, fmts, split, kind, monkeypatch):
    """Llama: one layer, INT4 asymmetric, no QK-norm, a dense MLP, int8 KV, its caches sharing a block and copying
    it on write (run's share). Hunyuan MoE (QK-norm), fp16 KV: layer 0 fp16, top-1 of 4 experts with the shared MLP
    stacked among them; layer 1 INT4, k = E = 3 with the shared MLP apart (another width); split=4: a sequence of
    more than 4 positions splits its attention along the sequence, one block per split (two splits and their
    merge). The mixture of experts counts its routing (tinyhun.moe_stats) on both paths: the same experts are
    picked. (fp32 KV: test_lora_side_paths_on_the_device.)"""
    from tinyhun.backends.cuda import CudaBackend
    from tinyhun.backends.cuda_memory import device_view
    from tinyhun.kernels import cuda_attention
    small_blocks(monkeypatch, 4)
    if split:
        monkeypatch.setattr(cuda_attention, "SPLIT", split)
    rng = np.random.default_rng(3)
    cfg = config(family, len(fmts))
    w = weights(rng, family is not llama, fmts, MOE if family is hunyuan_v1_moe else None)
    COUNTING[0] = family is hunyuan_v1_moe
    try:
        share = family is llama   # the paging is the family's no matter: the cheaper model shares and copies
        got = run(Model(cfg, w, backend=CudaBackend(), kv_dtype=kind, **KV), share)
        loads = [layer.mlp.load.copy() for layer in w.layers if isinstance(layer.mlp, MoEMLP)]
        for layer in w.layers[:len(loads)]:
            layer.mlp.load[:] = 0
        device_sees = device_view(w)
        assert_close(got, run(Model(cfg, device_sees, backend=NumpyBackend(), kv_dtype=kind, **KV), share), 1e-4)
        for layer, load in zip(device_sees.layers, loads):
            assert load.sum() > 0 and np.array_equal(layer.mlp.load, load)
    finally:
        COUNTING[0] = False
    assert got[1] == LAUNCHES[family] + (len(fmts) if split else 0)   # a merge per layer
    if kind == "fp16":   # and against the fp32 weights and KV as loaded, fp16's rounding apart
        assert_close(got, run(Model(cfg, w, backend=NumpyBackend(), kv_dtype="fp32", **KV), share), 1e-2)


def test_repeated_steps_replay_as_graphs(monkeypatch):
    """A decode step seen a second time is captured (a Replay here, a CUDA graph on a GPU) and replayed with one
    host launch from then on; every step's logits equal, bit for bit, those of the same steps launched kernel by
    kernel (TINYHUN_CUDA_GRAPHS=0), though the position a replayed step reads and writes has moved on, into a block
    the graph never saw (blocks of 2: the third step, a replay, starts the cache's second block, whose table entry
    the graph reads from device memory); greedy tokens picked on the device (forward argmax=True) equal the argmax
    of the launched steps' logits. One INT4 mixture-of-experts layer with QK-norm (top-1 of 4, the shared MLP
    stacked), int8 KV: every decode kernel kind."""
    from tinyhun.backends.cuda import CudaBackend, graphs_wanted
    from tinyhun.errors import TinyhunError
    small_blocks(monkeypatch, 2)
    cfg = config(hunyuan_v1_moe, 1)
    w = weights(np.random.default_rng(5), True, ("q4",), MOE)

    def steps(graphs):
        monkeypatch.setenv("TINYHUN_CUDA_GRAPHS", graphs)
        model = Model(cfg, w, backend=CudaBackend(), kv_dtype="int8", **KV)
        qkv = model.weights.layers[0].qkv
        assert qkv.mins is qkv.scales   # symmetric INT4: no mins on the device, the scales stand in
        cache = model.new_cache()
        out, host = [], []
        for t in (5, 9, 30):
            before = model.backend.host_launches
            out.append(model.forward(cache, np.array([t])).copy())
            host.append(model.backend.host_launches - before)
        for t in (2, 3, 4):   # greedy picks on the device (one more kernel, in the graph), the logits on the host
            before = model.backend.host_launches
            got = model.forward(cache, np.array([t]), argmax=graphs == "1")
            out.append(got if graphs == "1" else int(np.argmax(got)))
            host.append(model.backend.host_launches - before)
        assert cache.table[1] != cache.table[0]
        return out, host, len(model._scratch().graphs)

    launched, host_launched, _ = steps("0")
    replayed, host_replayed, kept = steps("1")
    for i, (g, r) in enumerate(zip(replayed, launched)):
        assert np.array_equal(g, r), f"step {i}: max |Δlogit| {np.abs(g - r).max():.3g}"
    step = 1 + (4 + 3) + 1   # embed; attention (no split); the mixture of experts; the lm_head
    assert host_launched == [step] * 6
    # run, then captured and launched, then launched; the same for the steps that pick on the device
    assert host_replayed == [step, 1, 1, step + 1, 1, 1]
    assert kept == 1   # the graphs of the model's one pool
    monkeypatch.setenv("TINYHUN_CUDA_GRAPHS", "yes")
    with pytest.raises(TinyhunError, match="TINYHUN_CUDA_GRAPHS='yes': expected 0 or 1"):
        graphs_wanted()
    # a capture that fails (an old driver, say) warns once and the step runs launched, as do the later ones
    monkeypatch.setenv("TINYHUN_CUDA_GRAPHS", "1")
    model = Model(cfg, w, backend=CudaBackend(), kv_dtype="int8", **KV)
    monkeypatch.setattr(model.backend.k_common, "capture", lambda *a: 1 / 0)
    cache = model.new_cache()
    model.forward(cache, np.array([5]))
    with pytest.warns(RuntimeWarning, match="CUDA graph capture failed .ZeroDivisionError"):
        assert np.array_equal(model.forward(cache, np.array([9])), launched[1])
    assert not model.backend.graphs


@pytest.mark.parametrize("kind", ["fp16", "int8"])
def test_prompt_cache_files_cross_backends(kind, tmp_path, monkeypatch):
    """A prompt cache written from the device loads on the host and back (the file holds fp16 as the host's bits),
    and the blocks read back give the logits the writer's cache gives."""
    from tinyhun import prompt_cache
    from tinyhun.backends.cuda import CudaBackend
    small_blocks(monkeypatch, 4)
    cfg, rng = config(llama, 1), np.random.default_rng(5)
    w = weights(rng, False, ("f32",))
    gpu, cpu = (Model(cfg, w, backend=b, kv_dtype=kind, **KV) for b in (CudaBackend(), NumpyBackend()))
    ids = np.array([5, 17, 2, 30, 9, 21])
    c = gpu.new_cache()
    gpu.forward(c, ids)
    want = gpu.forward(c, np.array([7])).copy()
    c.trim(len(ids))
    monkeypatch.setattr(prompt_cache, "fingerprint", lambda model: "same")   # one model on two backends
    path = prompt_cache.save(gpu, c, tmp_path / "p.safetensors")
    host = prompt_cache.load(cpu, path)
    np.testing.assert_array_equal(cpu.backend.read_blocks(cpu.kv_pool.layers, host.table)[0],
                                  gpu.backend.read_blocks(gpu.kv_pool.layers, c.table)[0])
    back = prompt_cache.load(gpu, prompt_cache.save(cpu, host, tmp_path / "q.safetensors"))
    np.testing.assert_array_equal(gpu.forward(back, np.array([7])), want)


def adapter_folder(folder, rng, ranks):
    """A peft adapter folder (as peft saves one) of random lora_A/lora_B: ranks[layer] maps module -> rank, each
    module's scale 2 / rank (lora_alpha 2, rank_pattern)."""
    import json
    from safetensors.numpy import save_file
    from tinyhun.adapters import PARENT
    shapes = {"q_proj": (NH * D, H), "k_proj": (NKV * D, H), "v_proj": (NKV * D, H), "o_proj": (H, NH * D),
              "gate_proj": (I, H), "up_proj": (I, H), "down_proj": (H, I)}
    tensors, pattern = {}, {}
    for layer, rs in enumerate(ranks):
        for m, r in rs.items():
            name = f"base_model.model.model.layers.{layer}.{PARENT[m]}.{m}"
            pattern[name[len("base_model.model."):]] = r
            tensors[f"{name}.lora_A.weight"] = rng.standard_normal((r, shapes[m][1])).astype(f32) * 0.3
            tensors[f"{name}.lora_B.weight"] = rng.standard_normal((shapes[m][0], r)).astype(f32) * 0.3
    folder.mkdir()
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps(dict(
        peft_type="LORA", r=4, lora_alpha=2, target_modules=sorted({m for rs in ranks for m in rs}),
        rank_pattern=pattern)))
    return folder


def test_lora_side_paths_on_the_device(tmp_path, monkeypatch):
    """An adapter kept as LoRA side paths beside INT4 bases: layer 0 adapts all seven linears at mixed ranks
    (q 4, k 2, v none; o 3; gate 4, up 1, down 2), layer 1 q and v only, fp32 KV. The device equals the NumPy
    reference of the same merged fp16 weights (max |Δlogit| <= 1e-4 x max |logit|), the adapter moves the logits far
    more than that, and each adapted linear costs one launch (its A product). An adapter added to a model already on the
    device (model.with_adapter, as `tinyhun serve --adapter` does) shares the base's device arrays and gives the
    same logits, bit for bit, as the adapter attached before loading; one clear error each for merging there, for
    a second adapter, and for an MLP adapter over a mixture of experts."""
    from tinyhun.adapters import attach, read_adapter
    from tinyhun.backends.cuda import CudaBackend
    from tinyhun.backends.cuda_memory import device_view
    from tinyhun.errors import TinyhunError
    from tinyhun.kernels.linear import LoRA
    from tinyhun.model import with_adapter
    small_blocks(monkeypatch, 4)
    rng = np.random.default_rng(4)
    cfg = config(llama, 2)
    w = weights(rng, False, ("q4", "q4-asym"))
    ranks = [dict(q_proj=4, k_proj=2, o_proj=3, gate_proj=4, up_proj=1, down_proj=2), dict(q_proj=4, v_proj=2)]
    folder = adapter_folder(tmp_path / "lora", rng, ranks)
    tuned = attach(w, cfg, read_adapter(folder))
    assert isinstance(tuned.layers[0].mlp.down, LoRA)
    got = run(Model(cfg, tuned, backend=CudaBackend(), kv_dtype="fp32", **KV), share=False)
    assert_close(got, run(Model(cfg, device_view(tuned), backend=NumpyBackend(), kv_dtype="fp32", **KV), False), 1e-4)
    bare = run(Model(cfg, device_view(w), backend=NumpyBackend(), kv_dtype="fp32", **KV), share=False)
    moved = max(float(np.abs(g - b).max() / np.abs(b).max()) for g, b in zip(got[0], bare[0]))
    assert moved > 100 * 1e-4, f"the adapter moved the logits by only {moved:.3g} x max |logit|"
    assert got[1] == 1 + 2 * (4 + 2) + 1 + 4 + 1   # LAUNCHES[llama] per layer, + layer 0's four A products + one

    base = Model(cfg, w, backend=CudaBackend(), kv_dtype="fp32", **KV)
    added = with_adapter(base, folder)
    assert added.weights.layers[0].qkv.base is base.weights.layers[0].qkv   # the base's device arrays, shared
    assert added.weights.layers[1].mlp is base.weights.layers[1].mlp        # not adapted: the very same
    again = run(added, share=False)
    for g, r in zip(again[0], got[0]):
        assert np.array_equal(g, r)
    with pytest.raises(TinyhunError, match=r"^device 'cuda': an adapter added to a model already on the GPU runs"):
        with_adapter(base, folder, mode="merge")
    with pytest.raises(TinyhunError, match=r"^device 'cuda': this model already has an adapter on the GPU"):
        with_adapter(added, folder)
    moe_cfg = config(hunyuan_v1_moe, 2)
    moe = Model(moe_cfg, weights(rng, True, ("q4", "q4"), MOE), backend=CudaBackend(), **KV)
    with pytest.raises(TinyhunError, match=r"down_proj targets a dense MLP; this model's layer 0 has MoEMLP"):
        with_adapter(moe, folder)
