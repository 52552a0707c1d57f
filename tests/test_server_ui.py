"""What a browser meets on `tinyhun serve`: the chat page at GET / driven in a real headless browser (Debian's
chromium through Selenium; .ci/run installs both), --no-ui, and --cors (preflights and Access-Control headers)."""
import json
import os
import shutil

import httpx
import pytest

import tinyhun
from live_server import LiveServer
from oracle import ROOT
from tinyhun.server.openai_api import Streamed

TINY = ROOT / "weights" / "tiny-hunyuan"
KEY = "sk-ui"
APP = "https://app.example.com"


@pytest.fixture(scope="module")
def model():
    return tinyhun.load(TINY)


@pytest.fixture(scope="module")
def live(model):
    s = LiveServer(model, api_key=KEY, max_tokens=64, max_context=256, slots=2, queue=4, cors=(APP,))
    yield s
    s.close()


def _browser_paths():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if chromium and driver:
        return chromium, driver
    if os.environ.get("TINYHUN_REQUIRE_BROWSER"):   # .ci/run sets it: CI must not skip the browser test
        pytest.fail("chromium and chromedriver are not installed (Debian: apt-get install chromium chromium-driver)")
    pytest.skip("no chromium/chromedriver here (Debian: apt-get install chromium chromium-driver)")


@pytest.fixture(scope="module")
def browser():
    chromium, driver = _browser_paths()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1200,900"):
        options.add_argument(arg)
    b = webdriver.Chrome(service=Service(driver), options=options)
    yield b
    b.quit()


def wait(browser, condition, timeout=60):
    from selenium.webdriver.support.ui import WebDriverWait
    return WebDriverWait(browser, timeout, poll_frequency=0.05).until(lambda b: condition(b))


def open_chat(browser, live):
    from selenium.webdriver.common.by import By
    browser.get(live.url + "/")
    browser.execute_script("sessionStorage.clear()")   # where the page keeps the key of an earlier visit
    browser.get(live.url + "/")
    key = browser.find_element(By.ID, "api-key")
    wait(browser, lambda b: key.is_displayed())   # the server wants a key: the page asks for it
    key.send_keys(KEY)
    wait(browser, lambda b: b.find_element(By.ID, "send").is_enabled())   # the model list came with the key
    return By


def say(browser, By, text, **settings):
    for name, value in settings.items():
        field = browser.find_element(By.ID, name)
        field.clear()
        field.send_keys(str(value))
    box = browser.find_element(By.ID, "input")
    box.send_keys(text)
    browser.find_element(By.ID, "send").click()
    wait(browser, lambda b: b.find_elements(By.CSS_SELECTOR, ".msg.assistant")
         and b.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1].get_attribute("data-state") != "streaming")
    return browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1]


def test_the_page_streams_a_conversation(browser, live, model):
    By = open_chat(browser, live)
    assert browser.find_element(By.ID, "model").get_attribute("value") == "tiny"
    assert "formal" in [o.text for o in browser.find_elements(By.CSS_SELECTOR, "#style option")]
    reply = say(browser, By, "Hello", temperature=0, **{"max-tokens": 12})
    want = "".join(tinyhun.generate(model, [{"role": "user", "content": "Hello"}], max_tokens=12))
    assert reply.get_attribute("data-state") == "done"
    assert reply.find_element(By.CSS_SELECTOR, ".content").get_attribute("textContent") == want
    assert int(reply.get_attribute("data-chunks")) > 2   # it came in pieces, as they were generated
    assert "12 tokens" in reply.find_element(By.CSS_SELECTOR, ".meta").text
    # the second turn carries the first: the same reply as the library gives the whole conversation
    second = say(browser, By, "And then?")
    history = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": want},
               {"role": "user", "content": "And then?"}]
    assert second.find_element(By.CSS_SELECTOR, ".content").get_attribute("textContent") == "".join(
        tinyhun.generate(model, history, max_tokens=12))
    assert len(browser.find_elements(By.CSS_SELECTOR, ".msg.user")) == 2


def test_thinking_is_folded_and_tool_calls_are_shown(browser, live, monkeypatch):
    """A reply with reasoning_content and streamed tool_calls (OpenAI's delta shape: the call's id and name first,
    its arguments in pieces), answered by a stand-in for the chat endpoint: the page shows the thinking folded away
    and the call as a call, and sends the person's tool result back with the call's id."""
    seen = []

    async def chat(server, req):
        seen.append(req)
        head = {"id": "chatcmpl-ui", "object": "chat.completion.chunk", "created": 0, "model": req.model}

        def chunk(delta, finish=None):
            return "data: " + json.dumps({**head, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})\
                + "\n\n"

        async def chunks():
            yield chunk({"role": "assistant", "reasoning_content": "The user wants "})
            yield chunk({"reasoning_content": "an order looked up."})
            yield chunk({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                         "function": {"name": "find_order", "arguments": ""}}]})
            for piece in ('{"order', '_id": ', '"A-17"}'):
                yield chunk({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]})
            yield chunk({}, "tool_calls")
            yield "data: [DONE]\n\n"
        return Streamed(chunks())

    monkeypatch.setattr("tinyhun.server.openai_api.chat", chat)
    By = open_chat(browser, live)
    browser.find_element(By.ID, "new-chat").click()
    reply = say(browser, By, "Where is order A-17?")
    thinking = reply.find_element(By.CSS_SELECTOR, "details.thinking")
    assert thinking.get_attribute("open") is None   # folded
    assert thinking.find_element(By.CSS_SELECTOR, ".reasoning").get_attribute("textContent") == \
        "The user wants an order looked up."
    call = reply.find_element(By.CSS_SELECTOR, ".tool-call")
    assert "find_order" in call.find_element(By.CSS_SELECTOR, ".tool-name").text
    assert json.loads(call.find_element(By.CSS_SELECTOR, ".tool-args").text) == {"order_id": "A-17"}
    assert "finish: tool_calls" in reply.find_element(By.CSS_SELECTOR, ".meta").text
    # what the page sends next, read off its fetch, and what the server made of it (the stand-in answers again)
    browser.execute_script("window.sent = []; const f = window.fetch; window.fetch = (url, init) => {"
                           " window.sent.push(init && init.body); return f(url, init); };")
    call.find_element(By.CSS_SELECTOR, ".tool-result input").send_keys('{"status": "shipped"}')
    call.find_element(By.CSS_SELECTOR, ".tool-result button").click()
    sent = json.loads(wait(browser, lambda b: b.execute_script("return window.sent[0]")))
    assert [m["role"] for m in sent["messages"]] == ["user", "assistant", "tool"]
    assert sent["messages"][1]["tool_calls"] == [{"id": "call_1", "type": "function", "function": {
        "name": "find_order", "arguments": '{"order_id": "A-17"}'}}]
    assert sent["messages"][2] == {"role": "tool", "tool_call_id": "call_1", "content": '{"status": "shipped"}'}
    assert sent["stream"] is True
    wait(browser, lambda b: len(seen) == 2)
    assert [m.role for m in seen[1].messages] == ["user", "assistant", "tool"]
    assert seen[1].messages[2].tool_call_id == "call_1"


def test_no_ui_and_the_page_needs_no_key(model, live):
    r = httpx.get(live.url + "/", timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in r.headers["content-security-policy"] and "/*CONFIG*/" not in r.text
    off = LiveServer(model, ui=False)
    try:
        assert httpx.get(off.url + "/", timeout=30).status_code == 404
    finally:
        off.close()


def test_cors_preflight_and_headers(model, live):
    preflight = {"Origin": APP, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os"}
    r = httpx.options(live.url + "/v1/chat/completions", headers=preflight, timeout=30)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == APP
    assert "POST" in r.headers["access-control-allow-methods"]
    assert "authorization" in r.headers["access-control-allow-headers"].lower()
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    r = httpx.post(live.url + "/v1/chat/completions", json=body, timeout=60,
                   headers={"Origin": APP, "Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == APP
    r = httpx.options(live.url + "/v1/chat/completions", headers={**preflight, "Origin": "https://evil.example"},
                      timeout=30)
    assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
    off = LiveServer(model)   # off by default: no preflight answered, no header added
    try:
        assert httpx.options(off.url + "/v1/chat/completions", headers=preflight, timeout=30).status_code == 405
        r = httpx.post(off.url + "/v1/chat/completions", json=body, headers={"Origin": APP}, timeout=60)
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    finally:
        off.close()


@pytest.mark.parametrize("origin", ["app.example.com", "https://app.example.com/path", "ftp://x"])
def test_a_bad_cors_origin_is_refused(model, origin):
    from tinyhun.errors import TinyhunError
    from tinyhun.server import Settings, create_app
    with pytest.raises(TinyhunError, match=f"--cors {origin}: expected an origin"):
        create_app(lambda: (model, "tiny"), Settings(cors=(origin,)))
