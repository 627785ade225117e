"""UnifiedReward (Wang et al., 2025) as an evaluation metric: a Qwen2.5-VL judge asked for a 1-5 score.

    R(x, c) = the number after 'Final Score:' in the judge's greedy answer to POINT_PROMPT(c) shown image x

POINT_PROMPT is UnifiedReward's point-scoring instruction for generated images (caption alignment and overall
quality, 'assign a score from 1 to 5 after 'Final Score:''), as the baselines send it. Two routes, one prompt,
one parser:

    route        what it talks to                                               option of evaluate.py
    HTTPJudge    an OpenAI-compatible chat-completions server (vLLM, SGLang)    --unifiedreward-url
                 serving e.g. CodeGoat24/UnifiedReward-qwen-7b: one request per
                 image, the image as a base64 PNG data URL, temperature 0, as
                 the baselines call it (stdlib urllib, bounded retries, timeout)
    LocalJudge   Qwen2_5_VLForConditionalGeneration + AutoProcessor from a      --unifiedreward-local
                 local folder (transformers), greedy decoding, batched

Both apply the model's own chat template (the server does it server-side), so both see the same tokens.
The baselines' client prefixes the text with a LLaVA-style '<image>\\n'; a Qwen chat template places the vision
tokens itself, so we send no such prefix (image_tag=True restores it).

Parsing (parse_score) takes, in this order, the LAST number after 'Final Score' (markdown and '=', 'is', '[...]'
tolerated), else the last 'score'/'rating' followed by a number, else the last 'N/5' or 'N out of 5', else a
reply that is only a number; the value must lie in [1, 5]. A reply without one raises ScoreParseError naming the
reply (the baselines silently count it as 0). UnifiedReward(strict=False) instead returns NaN for that image and
keeps the reply in `.failures`, so a long evaluation reports such images instead of dying on them.
"""
import base64
import io
import json
import math
import os
import re
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import torch

from . import REWARDS

POINT_PROMPT = (
    "You are given a text caption and a generated image based on that caption. Your task is to evaluate this "
    "image based on two key criteria:\n"
    "1. Alignment with the Caption: Assess how well this image aligns with the provided caption. Consider the "
    "accuracy of depicted objects, their relationships, and attributes as described in the caption.\n"
    "2. Overall Image Quality: Examine the visual quality of this image, including clarity, detail preservation, "
    "color accuracy, and overall aesthetic appeal.\n"
    "Based on the above criteria, assign a score from 1 to 5 after 'Final Score:'.\n"
    "Your task is provided as follows:\n"
    "Text Caption: [{prompt}]")
LOW, HIGH = 1.0, 5.0
ORIGIN = REWARDS["unifiedreward"].origin  # where the model comes from (the registry's text)

_NUM = r"(\d+(?:\.\d+)?)"
_RANGE = r"(?:\(\s*1\s*-\s*5\s*\))?\s*"  # an optional "(1-5)"
_RULES = (  # (what, pattern): the last match of the first rule that matches wins
    ("Final Score", re.compile(r"final\s*score\s*" + _RANGE + r"(?:is|of|[:=\-])?\s*\[?\s*" + _NUM, re.I)),
    ("score/rating", re.compile(r"\b(?:score|rating)\s*" + _RANGE + r"(?:is|of|[:=])?\s*\[?\s*" + _NUM, re.I)),
    ("N/5", re.compile(_NUM + r"\s*(?:/|out\s+of)\s*5(?!\.?\d)", re.I)),
    ("bare number", re.compile(r"^\s*" + _NUM + r"\s*\.?\s*$")),
)


class ScoreParseError(ValueError):
    """The judge's reply holds no score in [1, 5]."""


def parse_score(text: str) -> float:
    """The score in a judge's free-text reply; ScoreParseError if there is none (see the module docstring)."""
    clean = re.sub(r"[*_`#]", "", text or "")  # markdown emphasis and headings
    for what, rule in _RULES:
        found = rule.findall(clean)
        if found:
            value = float(found[-1])
            if not LOW <= value <= HIGH:
                raise ScoreParseError(f"UnifiedReward reply gives {what} {value:g}, outside [{LOW:g}, {HIGH:g}]: "
                                      f"{_excerpt(text)}")
            return value
    raise ScoreParseError(f"no score in the UnifiedReward reply {_excerpt(text)} (expected 'Final Score: N')")


def _excerpt(text, n=200) -> str:
    text = "" if text is None else str(text)
    return repr(text if len(text) <= n else text[:n] + "...")


def question(prompt: str, image_tag: bool = False) -> str:
    return ("<image>\n" if image_tag else "") + POINT_PROMPT.format(prompt=prompt)


def to_pil(images: torch.Tensor) -> list:
    """(B, 3, H, W) float in [0, 1] -> B RGB PIL images (uint8, x * 255 rounded, as a PNG holds them)."""
    from PIL import Image
    u8 = (images.detach().float().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in u8]


# ---------------------------------------------------------------------------------------------
# the two judges: answers(images, questions) -> list of reply strings
# ---------------------------------------------------------------------------------------------
class HTTPJudge:
    """An OpenAI-compatible /chat/completions endpoint. `url` is the API base (http://host:port/v1) or the full
    endpoint. `model` is the served model name; None asks GET {base}/models and takes the only one served.
    `api_key` (default: $UNIFIEDREWARD_API_KEY, if set) is sent as a Bearer token, for servers started with one.
    Each request is retried `retries` times on connection errors, timeouts and 5xx answers (backoff x 2 from
    `backoff` seconds); a 4xx answer is an error at once. At most `workers` requests are in flight."""

    def __init__(self, url: str, model: str = None, api_key: str = None, timeout: float = 120.0, retries: int = 3,
                 backoff: float = 1.0, max_tokens: int = 512, workers: int = 8):
        url = url.rstrip("/")
        self.endpoint = url if url.endswith("/chat/completions") else url + "/chat/completions"
        self.base = self.endpoint[: -len("/chat/completions")]
        self.api_key = api_key or os.environ.get("UNIFIEDREWARD_API_KEY")
        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        self.max_tokens, self.workers = max_tokens, workers
        self.model = model or self._served_model()

    def _request(self, url, body=None) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = None if body is None else json.dumps(body).encode()
        last = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                with urllib.request.urlopen(urllib.request.Request(url, data, headers), timeout=self.timeout) as r:
                    return json.loads(r.read().decode())
            except urllib.error.HTTPError as e:
                detail = e.read().decode(errors="replace")[:300]
                if e.code < 500:
                    raise RuntimeError(f"UnifiedReward server {url} answered HTTP {e.code}: {detail}") from None
                last = f"HTTP {e.code}: {detail}"
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
                last = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
        raise RuntimeError(f"UnifiedReward server {url} failed {self.retries + 1} time(s), last: {last}. "
                           f"Is the server running? ({ORIGIN})")

    def _served_model(self) -> str:
        ids = [m.get("id") for m in self._request(self.base + "/models").get("data", [])]
        if len(ids) != 1:
            raise RuntimeError(f"UnifiedReward server {self.base} serves {ids or 'no model'}: "
                               "name one with --unifiedreward-model")
        return ids[0]

    def ask(self, image, text: str) -> str:
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        body = {"model": self.model, "temperature": 0, "max_tokens": self.max_tokens,
                "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                          {"type": "text", "text": text}]}]}
        reply = self._request(self.endpoint, body)
        try:
            content = reply["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise RuntimeError(f"UnifiedReward server {self.endpoint} sent no choices[0].message.content: "
                               f"{_excerpt(json.dumps(reply))}") from None
        if isinstance(content, list):  # some servers answer with content parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        return content or ""

    def answers(self, images: list, questions: list) -> list:
        with ThreadPoolExecutor(max(1, min(self.workers, len(images)))) as pool:
            return list(pool.map(self.ask, images, questions))


class LocalJudge:
    """Qwen2.5-VL (UnifiedReward-qwen-*) from a local folder, greedy decoding of `max_new_tokens` at most,
    `batch_size` images per generate call (left padding)."""

    def __init__(self, path: str, device="cpu", dtype=None, max_new_tokens: int = 512, batch_size: int = 8):
        from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration
        self.device = torch.device(device)
        dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.processor = AutoProcessor.from_pretrained(path)
        self.processor.tokenizer.padding_side = "left"
        self.model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=dtype).to(self.device).eval()
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size

    @torch.no_grad()
    def answers(self, images: list, questions: list) -> list:
        out = []
        for i in range(0, len(images), self.batch_size):
            ims, qs = images[i:i + self.batch_size], questions[i:i + self.batch_size]
            texts = [self.processor.apply_chat_template(
                [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
                tokenize=False, add_generation_prompt=True) for q in qs]
            inputs = self.processor(text=texts, images=ims, padding=True, return_tensors="pt").to(self.device)
            ids = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
            out += self.processor.batch_decode(ids[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        return out


# ---------------------------------------------------------------------------------------------
# the metric: reward interface of rewards/__init__.py
# ---------------------------------------------------------------------------------------------
class UnifiedReward:
    """`score(images (B, 3, H, W) in [0, 1], prompts) -> (B,) float32` in [1, 5]. strict=False: NaN for a reply
    without a score, and (prompt, reply, error) appended to `.failures`."""

    name = "unifiedreward"

    def __init__(self, judge, strict: bool = True, image_tag: bool = False):
        self.judge, self.strict, self.image_tag, self.failures = judge, strict, image_tag, []

    def score(self, images: torch.Tensor, prompts) -> torch.Tensor:
        B = images.shape[0]
        prompts = [prompts] * B if isinstance(prompts, str) else list(prompts)
        if len(prompts) != B:
            raise ValueError(f"unifiedreward: {B} images but {len(prompts)} prompts")
        replies = self.judge.answers(to_pil(images), [question(p, self.image_tag) for p in prompts])
        scores = []
        for p, text in zip(prompts, replies):
            try:
                scores.append(parse_score(text))
            except ScoreParseError as e:
                if self.strict:
                    raise
                self.failures.append((p, text, str(e)))
                scores.append(math.nan)
        return torch.tensor(scores, dtype=torch.float32, device=images.device)


def load(url: str = None, model: str = None, local: str = None, device="cpu", strict: bool = True,
         workers: int = 8, max_tokens: int = 512, timeout: float = 120.0, image_tag: bool = False,
         dtype=None) -> UnifiedReward:
    """UnifiedReward through a server (url, served model name) or a local folder (local); exactly one of them.
    dtype: the local model's (None: bf16 on cuda, fp32 on cpu)."""
    if bool(url) == bool(local):
        raise ValueError(f"unifiedreward: give exactly one of url and local ({ORIGIN})")
    judge = HTTPJudge(url, model, timeout=timeout, max_tokens=max_tokens, workers=workers) if url else \
        LocalJudge(local, device, dtype, max_new_tokens=max_tokens, batch_size=workers)
    return UnifiedReward(judge, strict, image_tag)
