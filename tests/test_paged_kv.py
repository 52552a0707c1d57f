"""The paged KV cache (tinyhun.kv_cache): memory held as tokens arrive, prefixes shared between caches (stored
once, copied on write), exhaustion as a clear error, KV storage types, the model's own context, prompt cache files."""
import gc

import numpy as np
import pytest

import tinyhun
from oracle import ROOT
from tinyhun import prompt_cache
from tinyhun.model import with_adapter
from tinyhun.errors import TinyhunError
from tinyhun.kernels.kv import BLOCK
from tinyhun.kv_cache import KVMemoryFull

TINY = ROOT / "weights" / "tiny-hunyuan"


@pytest.fixture(scope="module")
def model():
    return tinyhun.load(TINY, kv_dtype="fp32")


def ids_of(n, seed=0):
    return [int(i) for i in np.random.default_rng(seed).integers(3, 400, size=n)]


def close(got, want):
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_memory_held_is_tokens_held(model):
    pool = model.kv_pool
    before = pool.used
    cache = model.new_cache()   # the model's whole context: nothing is taken until tokens arrive
    assert pool.used == before and cache.blocks == 0
    model.forward(cache, ids_of(2 * BLOCK + 5))
    assert cache.blocks == 3 and pool.used == before + 3
    cache.trim(BLOCK)
    assert cache.blocks == 1 and pool.used == before + 1
    del cache
    # a forward that compiled leaves Numba's typing errors in reference cycles with the frames of that call (the
    # forward's among them, holding the cache): the cache goes with them at the next collection
    gc.collect()
    assert pool.used == before


def test_a_shared_prefix_is_stored_once_and_computed_once(model):
    pool, prompt = model.kv_pool, ids_of(3 * BLOCK + 7, seed=1)
    a, b = model.new_cache(), model.new_cache()
    model.forward(a, prompt)
    used = pool.used
    assert b.reuse(prompt + [5, 6]) == 3 * BLOCK   # its three full blocks are a's: nothing to compute
    assert pool.used == used and b.table[:3] == a.table[:3]
    got = model.forward(b, (prompt + [5, 6])[3 * BLOCK:])[0]
    assert pool.used == used + 1   # b's own last block
    close(got, model.logits(prompt + [5, 6])[-1])


def test_writing_into_a_shared_block_copies_it_first(model):
    prompt = ids_of(2 * BLOCK, seed=2)
    a, b = model.new_cache(), model.new_cache()
    model.forward(a, prompt)
    b.reuse(prompt)
    shared = b.table[1]
    b.trim(BLOCK + 3)   # into a's second block: b's next tokens must not land in it
    other = [7, 8, 9, 10]
    got = model.forward(b, other)[0]
    assert b.table[1] != shared and a.table[1] == shared
    close(got, model.logits(prompt[:BLOCK + 3] + other)[-1])
    close(model.forward(a, [11])[0], model.logits(prompt + [11])[-1])   # a's keys are untouched


def test_freed_blocks_stay_as_cached_prefixes_until_needed():
    m = tinyhun.load(TINY, kv_dtype="fp32", kv_memory=8 * tinyhun.load(TINY, kv_dtype="fp32").kv_pool.block_bytes)
    pool, prompt = m.kv_pool, ids_of(3 * BLOCK, seed=3)
    want = m.logits(prompt + [4])[-1]   # a cache that is gone: its three full blocks stay cached
    assert pool.used == 0 and pool.cached == 3
    c = m.new_cache()
    assert c.reuse(prompt + [4]) == 3 * BLOCK and pool.cached == 0
    close(m.forward(c, [4])[0], want)
    del c
    big = m.new_cache()
    m.forward(big, ids_of(8 * BLOCK, seed=4))   # needs all 8 blocks: the cached prefixes are evicted
    assert pool.used == 8 and pool.cached == 0 and pool.available() == 0
    with pytest.raises(KVMemoryFull, match="KV memory full"):
        m.forward(m.new_cache(), [1, 2, 3])
    del big
    fresh = m.new_cache()
    assert fresh.reuse(prompt) == 0   # evicted, so computed again, correctly
    close(m.forward(fresh, prompt + [4])[0], want)


def test_batched_decode_of_caches_sharing_a_prefix(model):
    prompt = ids_of(BLOCK + 2, seed=5)
    caches = model.new_caches(3)
    firsts = []
    for i, c in enumerate(caches):
        c.reuse(prompt)
        firsts.append(int(np.argmax(model.forward(c, prompt[len(c):] + [20 + i])[0])))
    logits = model.forward_batch(caches, firsts)
    for i, (c, t) in enumerate(zip(caches, firsts)):
        close(logits[i], model.logits(prompt + [20 + i, t])[-1])


def test_a_prompt_gives_the_same_bits_whole_or_after_a_cached_prefix(tmp_path):
    """What a prompt's logits are does not depend on what the cache held: after a shared prefix of whole blocks, in
    CHUNK-row pieces, or as one row of a batch decode, each row gets the bits it gets alone (INT4 weights: their
    GEMMs are row-invariant, and int8 activations turn the last bit into a different token on real models)."""
    from tinyhun.model import CHUNK
    from tinyhun.quantize import quantize_model
    m = tinyhun.load(quantize_model(TINY, tmp_path / "q4", progress=False), kv_dtype="fp16")
    prompt = ids_of(CHUNK + 3 * BLOCK + 5, seed=8)
    whole = m.logits(prompt)
    for cached in (BLOCK, 3 * BLOCK, CHUNK + BLOCK):
        second = m.new_cache()
        assert second.reuse(prompt[:cached]) == cached   # the blocks `whole` left in the pool
        rest = np.empty((len(prompt) - cached, whole.shape[1]), np.float32)
        np.testing.assert_array_equal(m.forward(second, prompt[cached:], out=rest), whole[cached:])
    alone = m.new_cache()
    m.forward(alone, prompt[:40])
    want = m.forward(alone, [7])[0].copy()
    others = m.new_caches(3)
    for i, c in enumerate(others):
        m.forward(c, ids_of(300 + 50 * i, seed=i))   # longer contexts beside it, each split along the keys
    batch = m.new_cache()
    m.forward(batch, prompt[:40])
    np.testing.assert_array_equal(m.forward_batch([others[0], batch, *others[1:]], [1, 7, 2, 3])[1], want)


def test_caches_of_another_model_are_refused(model):
    other = tinyhun.load(TINY, kv_dtype="fp32")
    with pytest.raises(TinyhunError, match="another model"):
        model.forward(other.new_cache(), [1, 2])
    with pytest.raises(TinyhunError, match="distinct"):
        c = model.new_cache()
        model.forward_batch([c, c], [1, 2])


@pytest.mark.parametrize("kind, bound", [("fp16", 2e-3), ("int8", 3e-2)])
def test_kv_dtypes_stay_close_to_fp32(model, kind, bound):
    # fp16 rounds each key and value to 11 bits (relative 2^-12); int8 to 1/254 of its row's largest entry
    m = tinyhun.load(TINY, kv_dtype=kind)
    assert m.kv_dtype == kind and m.kv_pool.token_bytes < model.kv_pool.token_bytes
    ids = ids_of(150, seed=6)
    want, got = model.logits(ids), m.logits(ids)
    assert np.abs(got - want).max() <= bound * np.abs(want).max()
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.95


def test_kv_options_are_checked(monkeypatch):
    with pytest.raises(TinyhunError, match="kv_dtype 'fp8'"):
        tinyhun.load(TINY, kv_dtype="fp8")
    monkeypatch.delenv("TINYHUN_KV_DTYPE")   # conftest's fp32 for the oracle tests
    assert tinyhun.load(TINY).kv_dtype == "fp16"
    monkeypatch.setenv("TINYHUN_KV_DTYPE", "int8")
    assert tinyhun.load(TINY).kv_dtype == "int8"
    with pytest.raises(TinyhunError, match="kv_memory"):
        tinyhun.load(TINY, kv_memory=-1)


def test_the_context_is_the_models_own_up_to_what_its_rope_supports(model):
    assert model.max_context == model.config.max_position_embeddings
    # Hunyuan's NTK-alpha RoPE is trained for 256K: more than config.json's figure may be asked for
    assert tinyhun.load(TINY, max_context=100_000).new_cache().max_context == 100_000
    with pytest.raises(TinyhunError, match="expected 1..262144"):
        tinyhun.load(TINY, max_context=300_000)


def test_an_adapter_shares_the_pool_but_not_the_base_prefixes(model, tmp_path):
    from test_adapters import ALL, make_adapter   # peft's random LoRA adapter over the checkpoint
    make_adapter(TINY, tmp_path / "a", r=2, lora_alpha=4, target_modules=ALL)
    adapted = with_adapter(model, tmp_path / "a")
    prompt = ids_of(2 * BLOCK + 1, seed=7)
    base = model.new_cache()
    model.forward(base, prompt)
    c = adapted.new_cache()
    assert adapted.kv_pool is model.kv_pool and c.reuse(prompt) == 0
    close(adapted.forward(c, prompt)[0], adapted.logits(prompt)[-1])


# ---- prompt cache files ----

def test_a_prompt_cache_round_trips(model, tmp_path):
    prompt = ids_of(2 * BLOCK + 9, seed=8)
    c = model.new_cache()
    model.forward(c, prompt)
    path = prompt_cache.save(model, c, tmp_path / "p.safetensors")
    del c
    m2 = tinyhun.load(TINY, kv_dtype="fp32")
    loaded = prompt_cache.load(m2, path)
    assert loaded.tokens == prompt
    close(m2.forward(loaded, [3])[0], model.logits(prompt + [3])[-1])
    fresh = m2.new_cache()
    assert fresh.reuse(prompt + [4]) == 2 * BLOCK   # its full blocks are shared with every later prompt


def test_bad_prompt_caches_are_refused_whole(model, tmp_path):
    c = model.new_cache()
    model.forward(c, ids_of(BLOCK + 3, seed=9))
    path = prompt_cache.save(model, c, tmp_path / "p.safetensors")
    data = path.read_bytes()
    (tmp_path / "cut").write_bytes(data[:len(data) // 2])
    flipped = bytearray(data)
    flipped[-10] ^= 1
    (tmp_path / "flip").write_bytes(bytes(flipped))
    m2 = tinyhun.load(TINY, kv_dtype="fp32")
    used = m2.kv_pool.used
    for name, match in (("cut", "not a readable prompt cache"), ("flip", "do not match their digest")):
        with pytest.raises(TinyhunError, match=match):
            prompt_cache.load(m2, tmp_path / name)
    with pytest.raises(TinyhunError, match="kv_dtype fp32.*this model runs kv_dtype int8"):
        prompt_cache.load(tinyhun.load(TINY, kv_dtype="int8"), path)
    with pytest.raises(TinyhunError, match="another model"):
        prompt_cache.load(tinyhun.load(ROOT / "weights" / "tiny-hunyuan-moe", kv_dtype="fp32"), path)
    assert m2.kv_pool.used == used   # nothing half-loaded
