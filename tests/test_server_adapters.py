"""Several peft adapters over one base in `tinyhun serve`, chosen per request by `model`, through the real openai
client on 127.0.0.1: each adapter answers as that adapter loaded alone, the base as the base, concurrently too."""
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

import tinyhun
from live_server import LiveServer
from test_adapters import ALL, make_adapter
from test_server import TINY
from tinyhun import TinyhunError
from tinyhun.server.options import adapter_specs

PROMPT = "The capital of"


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    # all seven modules: the layer type test_adapters' Hunyuan side-path test compiles already
    root = tmp_path_factory.mktemp("adapters")
    for name, seed in (("a", 1), ("b", 2)):
        make_adapter(TINY, root / name, seed=seed, r=4, lora_alpha=8, target_modules=ALL)
    return {"a": root / "a", "b": root / "b"}


@pytest.fixture(scope="module")
def model():
    return tinyhun.load(TINY)


@pytest.fixture(scope="module")
def single(model, adapters):
    """Each id's model loaded on its own: the base, and each adapter alone over it (a side path, as served)."""
    return {"tiny": model, **{n: tinyhun.load(TINY, adapter=d, adapter_mode="side") for n, d in adapters.items()}}


@pytest.fixture(scope="module")
def live(model, adapters):
    s = LiveServer(model, max_tokens=32, max_context=128, slots=2, queue=4, adapters=adapters)
    yield s
    s.close()


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=live.url + "/v1", api_key="none", max_retries=0, timeout=60)


def alone(model, prompt=PROMPT):
    return "".join(tinyhun.generate(model, prompt, chat=False, max_tokens=12))


def complete(client, name, prompt=PROMPT):
    r = client.completions.create(model=name, prompt=prompt, max_tokens=12, temperature=0)
    assert r.model == name
    return r.choices[0].text


def test_models_lists_the_base_and_each_adapter(client, adapters):
    cards = client.models.list().data
    assert [m.id for m in cards] == ["tiny", "a", "b"]
    b = client.models.retrieve("b")
    assert (b.parent, b.root) == ("tiny", str(adapters["b"]))
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="c", prompt=PROMPT, max_tokens=2)
    assert e.value.code == "model_not_found" and "'tiny', 'a', 'b'" in e.value.message


def test_each_adapter_answers_as_alone_and_the_base_as_the_base(client, single):
    # one after another on 2 slots: the third reuses a slot another model's keys were in (never its prefix)
    want = {name: alone(m) for name, m in single.items()}
    assert len(set(want.values())) == 3
    for name in ("a", "b", "tiny", "a"):
        assert complete(client, name) == want[name]
    messages = [{"role": "user", "content": "Hi"}]
    chat = client.chat.completions.create(model="b", messages=messages, max_tokens=8, temperature=0)
    assert chat.choices[0].message.content == "".join(tinyhun.generate(single["b"], messages, max_tokens=8))


def test_two_adapters_at_once(client, single):
    # both slots busy with different adapters: one forward per adapter per step, no output changed
    jobs = [("a", "Once upon"), ("b", "Once upon"), ("a", "In the"), ("b", "In the")]
    want = [alone(single[name], prompt) for name, prompt in jobs]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda job: complete(client, *job), jobs))
    assert got == want


def test_adapter_specs(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "odd=name").mkdir()
    assert adapter_specs([str(tmp_path / "x")]) == (str(tmp_path / "x"), {})
    assert adapter_specs([f"one={tmp_path / 'x'}", f"two={tmp_path / 'x'}"]) == \
        (None, {"one": str(tmp_path / "x"), "two": str(tmp_path / "x")})
    assert adapter_specs([str(tmp_path / "odd=name")])[0] == str(tmp_path / "odd=name")   # a folder is a folder
    for bad, message in ([f"one={tmp_path / 'x'}", f"one={tmp_path / 'x'}"], "given twice"), \
            ([f"one={tmp_path / 'nope'}"], "not an adapter folder"), \
            ([str(tmp_path / "x"), f"one={tmp_path / 'x'}"], "do not mix"), \
            ([str(tmp_path / "x"), str(tmp_path / "x")], "a second bare adapter folder"):
        with pytest.raises(TinyhunError, match=message):
            adapter_specs(bad)
