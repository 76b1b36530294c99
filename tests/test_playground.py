"""The playground page at /, driven in headless Debian chromium through Playwright."""

import json
from pathlib import Path

import openai
import pytest

from .conftest import save_tiny_text_model
from .live_server import LiveServer

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason=f"needs Debian's chromium at {CHROMIUM} "
                                "(.ci/install-system-deps installs it)")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run"]
PROMPT = "I had always thought"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_text_model(tmp_path_factory.mktemp("playground") / "tiny")


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


def expected_completion(url: str, api_key: str = "unused") -> str:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0)
    return client.completions.create(model="tiny", prompt=PROMPT, max_tokens=40, temperature=0).choices[0].text


def generate_in_page(page) -> None:
    page.fill("#max-tokens", "40")
    page.fill("#temperature", "0")
    page.fill("#prompt", PROMPT)
    page.click("#generate")
    page.wait_for_function("() => document.querySelector('#status').textContent.startsWith('done')", timeout=30_000)


def test_page_streams_a_completion_and_can_stop(browser, model_dir):
    with LiveServer(model_dir) as live:
        page = browser.new_page()
        requests = []
        page.on("request", lambda request: requests.append(request.url))
        page.goto(live.url + "/")
        page.wait_for_function("() => document.querySelector('#model-name').textContent === 'tiny'")
        assert "2 layers · 64 wide · 4 heads · context 128 · vocab 512" in page.text_content("#shape")
        # Count the output's changes (mutation records: a fast server's events can arrive in one network read,
        # and the observer then reports all their changes in one callback): streamed text lands piece by piece.
        page.evaluate("""() => { window.updates = 0;
            new MutationObserver((records) => { window.updates += records.length; }).observe(
                document.querySelector('#completion'), {childList: true, characterData: true, subtree: true}); }""")
        generate_in_page(page)
        assert page.text_content("#completion") == expected_completion(live.url)
        assert page.text_content("#shown-prompt") == PROMPT
        assert page.evaluate("() => window.updates") > 3
        assert page.is_enabled("#generate") and not page.is_enabled("#stop")
        assert all(url.startswith(live.url) for url in requests)  # nothing loaded from elsewhere

        # Stop: abort the request the moment it starts.
        page.evaluate("() => { document.querySelector('#generate').click(); document.querySelector('#stop').click(); }")
        page.wait_for_function("() => document.querySelector('#status').textContent === 'stopped'", timeout=30_000)
        assert page.is_enabled("#generate")

        # A bad value shows the server's error message.
        page.fill("#temperature", "5")
        page.click("#generate")
        page.wait_for_function("() => document.querySelector('#status').className === 'error'", timeout=30_000)
        assert "temperature" in page.text_content("#status")

        # What the field cannot hold as a number is an error, not the default; integers go out as typed.
        page.fill("#temperature", "1e999")
        page.click("#generate")
        assert page.text_content("#status") == "temperature: not a number"
        page.fill("#temperature", "0")
        page.fill("#seed", "9007199254740993")  # 2^53 + 1: a JavaScript number would round it to 2^53
        with page.expect_request("**/v1/completions") as request:
            page.click("#generate")
        assert json.loads(request.value.post_data)["seed"] == 2**53 + 1
        page.wait_for_function("() => document.querySelector('#status').textContent.startsWith('done')")
        page.close()


def expected_reply(url: str, messages: list[dict], max_tokens: int = 20) -> str:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    response = client.chat.completions.create(model="tiny", messages=messages, max_tokens=max_tokens, temperature=0)
    return response.choices[0].message.content


def test_page_chats_over_the_chat_completions_api(browser, model_dir):
    with LiveServer(model_dir) as live:
        page = browser.new_page()
        page.goto(live.url + "/")
        page.wait_for_function("() => document.querySelector('#model-name').textContent === 'tiny'")
        page.check("input[name=mode][value=chat]")
        assert page.is_visible("#chat") and page.is_visible("#system") and not page.is_visible("#output")
        page.fill("#max-tokens", "20")
        page.fill("#temperature", "0")
        page.fill("#system", "A short conversation.")
        sent = []
        for message in ("Hello there", "How are you?"):
            page.fill("#prompt", message)
            page.click("#generate")
            page.wait_for_function("() => document.querySelector('#status').textContent.startsWith('done')",
                                   timeout=30_000)
            assert page.input_value("#prompt") == ""
            sent.append({"role": "user", "content": message})
            reply = page.text_content("#chat .turn.assistant:last-child .content")
            assert reply == expected_reply(live.url, [{"role": "system", "content": "A short conversation."}, *sent])
            sent.append({"role": "assistant", "content": reply})
        roles = page.eval_on_selector_all("#chat .turn .role", "nodes => nodes.map(n => n.textContent)")
        assert roles == ["User:", "Assistant:", "User:", "Assistant:"]

        # Past the context (128 positions, 60 for replies): the oldest exchanges are dropped, the system message
        # kept, and the reply is the one the API gives for what was sent (it refused the whole conversation).
        page.fill("#max-tokens", "60")
        bodies = []
        page.on("request", lambda request: bodies.append(request.post_data) if "/chat/" in request.url else None)
        long = "Tell me more about the painting and the man who painted it, please."
        for message in (long, long, long, "And then?"):
            page.fill("#prompt", message)
            page.click("#generate")
            page.wait_for_function("() => document.querySelector('#status').textContent.startsWith('done')",
                                   timeout=30_000)
            sent.append({"role": "user", "content": message})
            sent.append({"role": "assistant",
                         "content": page.text_content("#chat .turn.assistant:last-child .content")})
        assert "earlier turns dropped to fit the model's context" in page.text_content("#status")
        kept = json.loads(bodies[-1])["messages"]
        assert kept[0] == {"role": "system", "content": "A short conversation."} and len(kept) < len(sent)
        assert kept[1:] == sent[-len(kept):-1] and kept[1]["role"] == "user"  # whole exchanges, the newest
        assert sent[-1]["content"] == expected_reply(live.url, kept, max_tokens=60)
        page.fill("#max-tokens", "20")
        page.click("#reset")
        assert page.eval_on_selector_all("#chat .turn", "nodes => nodes.length") == 0

        # New chat while a request is in flight drops it: the request is aborted, and its failure (a refused
        # temperature) neither shows nor takes back a message of the new chat (it threw a JS error).
        errors = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.fill("#temperature", "5")
        page.fill("#prompt", "dropped")
        with page.expect_event("requestfailed"):
            page.evaluate("() => { document.querySelector('#generate').click(); "
                          "document.querySelector('#reset').click(); }")
        assert page.eval_on_selector_all("#chat .turn", "nodes => nodes.length") == 0
        assert page.text_content("#status") == "" and page.is_enabled("#generate") and not page.is_enabled("#stop")
        page.fill("#temperature", "0")
        page.fill("#prompt", "Hello there")
        page.click("#generate")
        page.wait_for_function("() => document.querySelector('#status').textContent.startsWith('done')")
        reply = page.text_content("#chat .turn.assistant:last-child .content")
        assert reply == expected_reply(live.url, [{"role": "system", "content": "A short conversation."},
                                                  {"role": "user", "content": "Hello there"}])
        assert errors == []
        page.check("input[name=mode][value=completion]")
        assert page.is_visible("#output") and not page.is_visible("#chat")
        page.close()


def test_page_layout_wrapping_and_focus(browser, model_dir):
    """A form the browser restores (back) with Chat checked showed the Completion layout, and replies went into the
    hidden chat; a word longer than the box ran off the page; focus was lost after each send."""
    with LiveServer(model_dir) as live:
        page = browser.new_page(viewport={"width": 1000, "height": 700})
        page.goto(live.url + "/")
        page.wait_for_function("() => document.querySelector('#model-name').textContent === 'tiny'")
        page.check("input[name=mode][value=chat]")
        page.goto(live.url + "/health")
        page.go_back()
        page.wait_for_function("() => document.querySelector('#model-name').textContent === 'tiny'")
        if page.is_checked("input[name=mode][value=chat]"):  # the browser restored the form
            assert page.is_visible("#chat") and not page.is_visible("#output")
            assert page.text_content("#generate") == "Send"
        page.check("input[name=mode][value=completion]")
        page.fill("#max-tokens", "3")
        page.fill("#prompt", "a" * 300)  # shown as typed, whether this model's context holds it or not
        page.click("#generate")
        page.wait_for_function("() => !document.querySelector('#generate').disabled", timeout=30_000)
        assert page.evaluate("() => document.querySelector('#output').scrollWidth <= "
                             "document.querySelector('#output').clientWidth")
        assert page.evaluate("() => document.activeElement.id") == "prompt"
        assert page.get_attribute("#status", "role") == "status"
        page.close()


def test_page_behind_an_api_key(browser, model_dir):
    with LiveServer(model_dir, api_key="s3cret") as live:
        context = browser.new_context(http_credentials={"username": "me", "password": "s3cret"})
        page = context.new_page()
        page.goto(live.url + "/")
        page.wait_for_function("() => document.querySelector('#model-name').textContent === 'tiny'")
        generate_in_page(page)
        assert page.text_content("#completion") == expected_completion(live.url, "s3cret")
        context.close()
        from playwright.sync_api import Error as PlaywrightError

        # The key in the address (http://me:KEY@host/): the page's fetches of "/v1/..." carried the credentials in
        # their URL, which fetch refuses.
        page = browser.new_page()
        page.goto(live.url.replace("http://", "http://me:s3cret@") + "/")
        page.wait_for_function("() => document.querySelector('#model-name').textContent === 'tiny'")
        generate_in_page(page)
        assert page.text_content("#completion") == expected_completion(live.url, "s3cret")
        page.close()
        page = browser.new_page()
        with pytest.raises(PlaywrightError, match="ERR_INVALID_AUTH_CREDENTIALS"):  # no key: refused
            page.goto(live.url + "/")
        page.close()
