"""rewards/unifiedreward.py: the score parser, the HTTP route against a real OpenAI-format server on 127.0.0.1 (started
here, answering from the PNG it receives), and the local route on a tiny random Qwen2.5-VL saved and loaded by
path. Every request loop is bounded (a handful of requests, short timeouts)."""
import base64
import io
import json
import math
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")  # the test server is local, whatever proxy is set

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from rewards import unifiedreward as ur  # noqa: E402


# ---------------------------------------------------------------- parsing
@pytest.mark.parametrize("text,want", [
    ("The image matches well.\nFinal Score: 3.5", 3.5),
    ("**Final Score:** 4", 4.0),
    ("final score = 2/5", 2.0),
    ("Final Score is [5]", 5.0),
    ("Final Score (1-5): 1.25.", 1.25),
    ("Final Score: 2\n...on reflection...\nFinal Score: 4", 4.0),  # the last one counts
    ("You asked me to give a score from 1 to 5 after 'Final Score:'. Score: 3", 3.0),
    ("Overall I would rate it 4 out of 5.", 4.0),
    ("3/5", 3.0),
    ("  4.  ", 4.0),
])
def test_parse_score(text, want):
    assert ur.parse_score(text) == want


@pytest.mark.parametrize("text,match", [
    ("The image shows a cat.", "no score"), ("", "no score"), (None, "no score"),
    ("Final Score: 7", "outside"), ("Final Score: 0.5", "outside"),
    ("assign a score from 1 to 5 after 'Final Score:'", "no score"),  # an echo of the instruction is no score
])
def test_parse_score_errors(text, match):
    with pytest.raises(ur.ScoreParseError, match=match):
        ur.parse_score(text)


def test_question_is_the_point_prompt():
    q = ur.question("a red cube")
    assert q.endswith("Text Caption: [a red cube]") and "after 'Final Score:'" in q and not q.startswith("<image>")
    assert ur.question("x", image_tag=True).startswith("<image>\n")


# ---------------------------------------------------------------- HTTP route
def brightness_score(png: bytes) -> float:
    """What the test server answers: 1 + 4 * mean pixel value of the image it received."""
    a = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float64) / 255
    return round(1 + 4 * a.mean(), 3)


class Server:
    """An OpenAI-compatible server on 127.0.0.1 (ephemeral port) in a thread: GET /v1/models and
    POST /v1/chat/completions. The first `fail_first` POSTs answer 503; a caption containing NOSCORE gets a reply
    without a score. It checks each request and records it."""

    def __init__(self, fail_first=0, model="UnifiedReward-test"):
        self.requests, self.fail_first, self.model, self.lock = [], fail_first, model, threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, code, obj):
                body = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                with outer.lock:
                    outer.requests.append({"GET": self.path})
                if self.path == "/v1/models":
                    self._send(200, {"object": "list", "data": [{"id": outer.model, "object": "model"}]})
                else:
                    self._send(404, {"error": "not found"})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                body["_auth"] = self.headers.get("Authorization")
                with outer.lock:
                    outer.requests.append(body)
                    n = sum("GET" not in r for r in outer.requests)
                if self.path != "/v1/chat/completions":
                    return self._send(404, {"error": "not found"})
                if n <= outer.fail_first:
                    return self._send(503, {"error": "warming up"})
                if body.get("model") != outer.model:
                    return self._send(400, {"error": f"model {body.get('model')!r} does not exist"})
                image, text = body["messages"][0]["content"]
                assert image["type"] == "image_url" and text["type"] == "text"
                head, data = image["image_url"]["url"].split(",", 1)
                assert head == "data:image/png;base64" and body["temperature"] == 0
                caption = text["text"].rsplit("Text Caption: [", 1)[1][:-1]
                answer = "I cannot judge this." if "NOSCORE" in caption else \
                    f"Caption: {caption}. Looks fine.\nFinal Score: {brightness_score(base64.b64decode(data))}"
                self._send(200, {"id": "x", "object": "chat.completion", "model": outer.model,
                                 "choices": [{"index": 0, "finish_reason": "stop",
                                              "message": {"role": "assistant", "content": answer}}]})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def images(B=3, H=24, W=20, seed=0):
    return torch.rand(B, 3, H, W, generator=torch.Generator().manual_seed(seed))


def test_http_scores_follow_the_image_sent():
    x = images()
    with Server() as s:
        reward = ur.load(url=s.url, timeout=10, workers=2)  # model name asked from /v1/models
        got = reward.score(x, ["a cat", "a dog", "a red cube"])
    assert reward.judge.model == "UnifiedReward-test" and len(s.requests) == 4  # 1 GET + 3 POST
    want = [brightness_score(_png(img)) for img in ur.to_pil(x)]
    assert got.tolist() == pytest.approx(want, abs=1e-6) and got.dtype == torch.float32
    assert len(set(want)) == 3
    sent = [r["messages"][0]["content"][1]["text"] for r in s.requests[1:]]
    assert sorted(t.rsplit("[", 1)[1] for t in sent) == ["a cat]", "a dog]", "a red cube]"]  # any arrival order:
    # the scores above still come back in image order, each from its own image


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_http_retries_5xx_then_succeeds(monkeypatch):
    monkeypatch.setenv("UNIFIEDREWARD_API_KEY", "sk-test")
    with Server(fail_first=2) as s:
        reward = ur.load(url=s.url + "/chat/completions", model="UnifiedReward-test", timeout=10, workers=1)
        reward.judge.backoff = 0.01
        assert reward.score(images(1), "a cat").shape == (1,)
    assert len(s.requests) == 3  # two 503s, then the answer
    assert all(r["_auth"] == "Bearer sk-test" for r in s.requests)


def test_http_errors_are_clear():
    with Server() as s:
        with pytest.raises(RuntimeError, match="HTTP 400.*does not exist"):  # a wrong model name: no retry
            ur.load(url=s.url, model="nope", timeout=10).score(images(1), "a cat")
        assert len(s.requests) == 1
        strict = ur.load(url=s.url, model="UnifiedReward-test", timeout=10)
        with pytest.raises(ur.ScoreParseError, match="cannot judge"):
            strict.score(images(1), "NOSCORE")
        lenient = ur.load(url=s.url, model="UnifiedReward-test", timeout=10, strict=False)
        got = lenient.score(images(2), ["a cat", "NOSCORE please"])
        assert not math.isnan(got[0]) and math.isnan(got[1])
        assert lenient.failures[0][0] == "NOSCORE please" and "cannot judge" in lenient.failures[0][1]
    port = s.httpd.server_address[1]  # closed now: connection refused, bounded retries
    judge = ur.HTTPJudge(f"http://127.0.0.1:{port}/v1", "m", timeout=2, retries=1, backoff=0.01)
    t0 = time.time()
    with pytest.raises(RuntimeError, match="failed 2 time.*Is the server running"):
        judge.ask(ur.to_pil(images(1))[0], "q")
    assert time.time() - t0 < 10
    with pytest.raises(ValueError, match="exactly one"):
        ur.load()


# ---------------------------------------------------------------- local route: tiny random Qwen2.5-VL
ANSWER = "Final Score: 4"  # token 0 of the tiny vocabulary


def save_tiny_qwen(path, zero_head=False):
    """A Qwen2.5-VL of the real classes (1 text layer, 1 vision block, width 32) with a byte-level BPE
    vocabulary, the Qwen special tokens and a chat template, saved like a downloaded model folder.
    zero_head: the final norm's gain is 0, so every logit is 0 and greedy decoding repeats token 0 (ANSWER)."""
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor,
                              Qwen2Tokenizer, Qwen2VLImageProcessor, Qwen2VLVideoProcessor)
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    byte = bytes_to_unicode()
    vocab = {ANSWER.replace(" ", byte[32]): 0}
    for b in range(256):
        vocab[byte[b]] = len(vocab)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>"]
    tok = Qwen2Tokenizer(vocab=vocab, merges=[], unk_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": specials})
    ids = {s: tok.convert_tokens_to_ids(s) for s in specials}
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}"
                "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}"
                "{% endif %}{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
                "{% endif %}")
    proc = Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=4 * 56 * 56),
                               tokenizer=tok, video_processor=Qwen2VLVideoProcessor(), chat_template=template)
    cfg = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                         bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32,
                           fullatt_block_indexes=[0]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False)
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    if zero_head:
        with torch.no_grad():
            model.model.language_model.norm.weight.zero_()
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = ids["<|im_end|>"], ids["<|endoftext|>"]
    model.save_pretrained(path)
    proc.save_pretrained(path)
    return path


def test_local_tiny_qwen(tmp_path):
    """The local route end to end: processor and model loaded by path, the image through the vision tower,
    only the NEW tokens decoded (the prompt itself contains 'Final Score:'), then parsed."""
    rigged = ur.load(local=save_tiny_qwen(tmp_path / "rigged", zero_head=True), max_tokens=2, workers=2)
    got = rigged.score(images(3, 20, 28), ["a cat", "a dog on a mat", "x"])
    assert got.tolist() == [4.0, 4.0, 4.0]
    text = rigged.judge.answers(ur.to_pil(images(1)), [ur.question("a cat")])[0]
    assert text == ANSWER * 2
    random = ur.load(local=save_tiny_qwen(tmp_path / "random"), max_tokens=4, strict=False)
    out = random.score(images(2), ["a cat", "a dog"])  # random weights: replies of random bytes, no score
    assert torch.isnan(out).all() and len(random.failures) == 2 and "no score" in random.failures[0][2]
