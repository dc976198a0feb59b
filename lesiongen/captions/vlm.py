"""Optional vision-language backend: any OpenAI-compatible chat-completions endpoint (hosted, or a
local vLLM / Ollama / llama.cpp server) describes each image in the paper's 12-field report schema.

Standard library only. The image is attached to every request; the API key is passed in by the
caller (read from an environment variable at the command line, never from a flag or the source).
The endpoint is untrusted: the key goes only to the host named in the URL (a redirect is refused,
never followed, and no proxy is used), each request has one deadline for the whole exchange (a server
that trickles bytes cannot hold the run), and a reply too large or of the wrong shape is counted as
invalid, never a crash that loses the replies already paid for.
Replies are cached per image (JSONL keyed by image hash, model and prompt version), so a killed or
rerun job resumes without paying twice. Requests run with bounded concurrency and are retried with
backoff on 429, 5xx and timeouts. A refusal, an error or a reply that fails the schema check is
counted and never becomes a caption.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import random
import re
import socket
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError
from ..files import append_jsonl, read_jsonl, write_jsonl

# The twelve fields of the paper's VLM report schema (patient info is one field there).
VLM_FIELDS: tuple[str, ...] = (
    "patient_info",
    "lesion_color",
    "color_variability",
    "shape",
    "shape_variability",
    "size",
    "border_definition",
    "texture",
    "dermoscopic_patterns",
    "elevation",
    "skin_tone",
    "other_features",
)
PROMPT_VERSION = "report-v1"
MAX_FIELD_CHARS = 300  # longer "phrases" are not a report field: the reply is invalid
MAX_PROMPT_CHARS = 500
MAX_REPLY_BYTES = 4 * 2**20  # a 600-token chat completion is a few KB; a larger body is not a reply
DEFAULT_KEY_ENV = "LESIONGEN_VLM_API_KEY"
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
REPORT_INSTRUCTIONS = (
    "You are a dermatologist describing a dermoscopic image for a research dataset. Look only at the image "
    "and the patient facts given. Reply with one JSON object and nothing else, with exactly these keys: "
    + ", ".join(VLM_FIELDS)
    + ". Each value is a short phrase (at most 12 words) or null when it cannot be judged from the image. "
    "Describe what is visible (colours, shape, border, texture, dermoscopic structures, surrounding skin tone, "
    "hair or ruler marks); do not give sizes in millimetres."
)
CONDENSE_INSTRUCTIONS = (
    "Condense this dermoscopic report into one text-to-image prompt of at most 40 words. Start with the "
    "diagnosis, then the most distinctive visual features. Reply with the prompt only."
)
REFUSAL_RE = re.compile(r"^\s*(i'?m sorry|i am sorry|sorry,|i can(no|')t|i am unable|i'm unable|as an ai)", re.I)
MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp", ".bmp": "image/bmp"}
# A 2x2 red PNG: the capability check asks the model about it before any real image is sent.
PROBE_PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAIAAAACCAIAAAD91JpzAAAAEklEQVR4nGP4z8DAwMDAAGUABPQB/2BhVFgAAAAASUVORK5CYII="
)


class TransportError(Exception):
    """The endpoint did not answer usefully after all retries (network, 429, 5xx, timeout)."""


class Busy(Exception):
    """HTTP 429 or 5xx: worth retrying, after ``retry_after`` seconds when the server says so."""

    def __init__(self, status: int, retry_after: float | None = None) -> None:
        super().__init__(f"HTTP {status}")
        self.retry_after = retry_after


class RequestRejected(Exception):
    """A non-retryable HTTP error (400, 401, 403, 404, ...)."""

    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"HTTP {status}: {body[:200]}")
        self.status, self.body = status, body


@dataclass
class VLMResult:
    status: str  # ok | refused | invalid | error
    report: dict | None = None
    prompt: str | None = None
    reason: str = ""
    cached: bool = False


@dataclass
class Usage:
    requests: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cache_hits: int = 0
    statuses: dict = field(default_factory=dict)


def image_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def parse_report(content: str) -> tuple[dict | None, str]:
    """(report, "") when ``content`` is a JSON object with exactly the 12 schema keys and short string or
    null values; (None, why) otherwise. Code fences around the JSON are tolerated."""
    text = content.strip()
    fenced = re.match(r"^```(?:json)?\s*(.*?)\s*```$", text, re.S)
    if fenced:
        text = fenced.group(1)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return None, "reply is not JSON"
    if not isinstance(obj, dict):
        return None, "reply is not a JSON object"
    missing = [k for k in VLM_FIELDS if k not in obj]
    extra = [k for k in obj if k not in VLM_FIELDS]
    if missing or extra:
        return None, f"schema mismatch (missing {missing}, unexpected {extra})"
    report = {}
    for k in VLM_FIELDS:
        v = obj[k]
        if v is not None and not isinstance(v, (str, int, float)):
            return None, f"field {k} is not a phrase"
        v = None if v is None else str(v).strip()
        if v is not None and len(v) > MAX_FIELD_CHARS:
            return None, f"field {k} is too long"
        report[k] = v or None
    return report, ""


def token_count(value) -> int:
    """A usage field as a count: servers that send none, null, text or a negative number count 0."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def check_key_env_name(name: str) -> None:
    """Refuse a key pasted where the NAME of its variable belongs, without echoing it: configs are
    written to summaries, and a key must never be."""
    if name and (
        not ENV_NAME_RE.match(name) or (len(name) >= 20 and re.search(r"[a-z]", name) and re.search(r"\d", name))
    ):
        raise InputError(
            "--vlm_api_key_env",
            "takes the NAME of an environment variable, and this value looks like a key itself (not shown)",
            f"export {DEFAULT_KEY_ENV}=<your key> and drop the flag",
        )


def api_key_from_env(name: str) -> str | None:
    """The key held by environment variable ``name`` (None for an empty name: a local server). A
    variable that is not set is an error, except the default, which servers without a key leave unset."""
    check_key_env_name(name)
    key = os.environ.get(name) if name else None
    if name and not key and name != DEFAULT_KEY_ENV:
        raise InputError(
            "--vlm_api_key_env",
            f"environment variable {name} is not set",
            f"export {name}=<your key>, or pass --vlm_api_key_env '' for a server without a key",
        )
    return key or None


def is_refusal(message: dict, finish_reason: str | None) -> bool:
    content = message.get("content") or ""
    return bool(message.get("refusal")) or finish_reason == "content_filter" or bool(REFUSAL_RE.match(content))


class VLMClient:
    """One endpoint + model; thread-safe. ``describe_many`` is the batch entry point."""

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        cache_path: str | Path | None = None,
        timeout: float = 60.0,
        retries: int = 4,
        backoff: float = 1.0,
        concurrency: int = 4,
    ) -> None:
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.api_key = model, api_key
        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        self.concurrency = max(1, concurrency)
        self.cache_path = Path(cache_path) if cache_path else None
        self.usage = Usage()
        self._lock = threading.Lock()
        self._cache: dict[str, dict] = {}
        if self.cache_path and self.cache_path.is_file():
            rows = read_jsonl(self.cache_path)
            for row in rows:
                self._cache[row["key"]] = row
            if not self.cache_path.read_bytes().endswith(b"\n"):  # a kill tore the last line: drop it
                write_jsonl(self.cache_path, rows)

    # transport ---------------------------------------------------------------------------------
    def _post_once(self, payload: dict) -> dict:
        """One POST with one deadline for the whole exchange. The socket timeout bounds each read only,
        so a timer cuts the connection when ``timeout`` seconds have passed in all."""
        parts = urllib.parse.urlsplit(self.url)
        connection = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        conn = connection(parts.hostname, parts.port, timeout=self.timeout)
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        expired = threading.Event()

        def cut() -> None:
            expired.set()
            if conn.sock is not None:
                conn.sock.shutdown(socket.SHUT_RDWR)

        timer = threading.Timer(self.timeout, cut)
        timer.start()
        try:
            conn.request("POST", parts.path or "/", json.dumps(payload).encode(), headers)
            resp = conn.getresponse()
            body = resp.read(MAX_REPLY_BYTES + 1)
        except (OSError, http.client.HTTPException):
            if not expired.is_set():
                raise
        finally:
            timer.cancel()
            conn.close()
        if expired.is_set():  # a cut connection can also end a read early without an error
            raise TimeoutError(f"no complete reply within {self.timeout:g} s")
        if 300 <= resp.status < 400:
            where = urllib.parse.urlsplit(urllib.parse.urljoin(self.url, resp.getheader("Location") or ""))
            raise RequestRejected(resp.status, f"redirected to {where.scheme}://{where.netloc}{where.path}")
        if resp.status == 429 or resp.status >= 500:
            retry_after = resp.getheader("Retry-After") or ""
            raise Busy(resp.status, float(retry_after) if retry_after.replace(".", "", 1).isdigit() else None)
        text = body.decode("utf-8", "replace")
        if resp.status >= 400:
            raise RequestRejected(resp.status, text)
        if len(body) > MAX_REPLY_BYTES:
            raise RequestRejected(200, f"response body is over {MAX_REPLY_BYTES // 2**20} MiB")
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            raise RequestRejected(200, f"response body is not JSON: {text[:100]}") from None

    def _post(self, payload: dict, retries: int | None = None) -> dict:
        """POST with retries: 429, 5xx, timeouts and dropped connections back off exponentially
        (honouring Retry-After); other HTTP errors and redirects are not retried."""
        last = ""
        retries = self.retries if retries is None else retries
        for attempt in range(retries + 1):
            if attempt:
                with self._lock:
                    self.usage.retries += 1
            with self._lock:
                self.usage.requests += 1
            wait = self.backoff * (2**attempt) * (1 + 0.25 * random.random())
            try:
                return self._post_once(payload)
            except Busy as e:
                last = str(e)
                if e.retry_after is not None:
                    wait = min(e.retry_after, 60.0)
            except (TimeoutError, ConnectionError, http.client.HTTPException) as e:
                last = f"{type(e).__name__}"
            except OSError as e:  # no such host, no route: retrying will not help
                raise TransportError(f"cannot reach {self.url} ({e})") from None
            if attempt < retries:
                time.sleep(wait)
        raise TransportError(f"{last} after {retries + 1} attempts")

    def _chat(self, content: list | str, max_tokens: int, retries: int | None = None) -> tuple[dict, str | None]:
        payload = {
            "model": self.model,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": max_tokens,
            "temperature": 0,
        }
        reply = self._post(payload, retries)
        if not isinstance(reply, dict):
            raise RequestRejected(200, f"reply is not a JSON object: {str(reply)[:100]}")
        usage = reply.get("usage") if isinstance(reply.get("usage"), dict) else {}
        with self._lock:
            self.usage.prompt_tokens += token_count(usage.get("prompt_tokens"))
            self.usage.completion_tokens += token_count(usage.get("completion_tokens"))
        try:
            choice = reply["choices"][0]
            message, finish = choice["message"], choice.get("finish_reason")
        except (KeyError, IndexError, TypeError, AttributeError):
            raise RequestRejected(200, f"no choices in reply: {str(reply)[:100]}") from None
        if not isinstance(message, dict) or not isinstance(message.get("content") or "", str):
            raise RequestRejected(200, f"the message is not a chat message: {str(message)[:100]}")
        return message, finish

    # checks and reports ------------------------------------------------------------------------
    def check(self) -> None:
        """One small request with a probe image before any real image: an unreachable endpoint, a
        rejected key or a model without image input becomes one clear InputError."""
        where = f"--vlm_base_url {self.url.rsplit('/chat/completions', 1)[0]}"
        content = [
            {"type": "text", "text": "What colour is this image? Answer in one word."},
            {
                "type": "image_url",
                "image_url": {"url": "data:image/png;base64," + base64.b64encode(PROBE_PNG).decode()},
            },
        ]
        try:
            message, _ = self._chat(content, max_tokens=5, retries=min(self.retries, 1))
        except TransportError as e:
            raise InputError(
                where, f"endpoint unreachable or failing ({e})", "start the server or fix the URL"
            ) from None
        except RequestRejected as e:
            if e.status in (401, 403):
                raise InputError(
                    where,
                    f"the API key was rejected (HTTP {e.status})",
                    "set the key variable named by --vlm_api_key_env",
                ) from None
            if e.status == 404:
                raise InputError(
                    where,
                    f"model '{self.model}' or the chat endpoint was not found",
                    "check --vlm_model and the URL (it usually ends in /v1)",
                ) from None
            if e.status in (400, 415, 422):
                raise InputError(
                    where,
                    f"model '{self.model}' does not accept images ({e.body[:120]})",
                    "serve a vision-language model",
                ) from None
            if 300 <= e.status < 400:
                raise InputError(
                    where,
                    f"the endpoint {e.body}; the key is never sent on to another address",
                    "put the final URL in --vlm_base_url",
                ) from None
            if e.status == 200:
                raise InputError(
                    where, f"the reply is not an OpenAI chat completion ({e.body})", "check the URL and server"
                ) from None
            raise InputError(where, str(e), "check the endpoint") from None
        if "content" not in message:
            raise InputError(
                where, "the reply is not an OpenAI chat completion", "check that the server is OpenAI-compatible"
            )

    def cache_key(self, digest: str) -> str:
        return f"{digest}:{self.model}:{PROMPT_VERSION}"

    def describe(self, image: str | Path, patient: str = "") -> VLMResult:
        """The report (and condensed prompt) for one image file, from the cache when already done."""
        data = Path(image).read_bytes()
        key = self.cache_key(image_hash(data))
        with self._lock:
            hit = self._cache.get(key)
        if hit is not None:
            with self._lock:
                self.usage.cache_hits += 1
            return VLMResult(hit["status"], hit.get("report"), hit.get("prompt"), hit.get("reason", ""), cached=True)
        result = self._describe_uncached(data, Path(image).suffix.lower(), patient)
        if result.status != "error":  # finished answers are kept; transport failures are retried next run
            row = {"key": key, "model": self.model, "prompt_version": PROMPT_VERSION, "status": result.status}
            row.update(report=result.report, prompt=result.prompt, reason=result.reason)
            with self._lock:
                self._cache[key] = row
                if self.cache_path:
                    append_jsonl(self.cache_path, row)
        return result

    def _describe_uncached(self, data: bytes, suffix: str, patient: str) -> VLMResult:
        url = f"data:{MIME.get(suffix, 'image/jpeg')};base64," + base64.b64encode(data).decode()
        text = REPORT_INSTRUCTIONS + (f" Patient facts: {patient}." if patient else "")
        content = [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": url}}]
        try:
            message, finish = self._chat(content, max_tokens=600)
            if is_refusal(message, finish):
                return VLMResult("refused", reason=str(message.get("refusal") or message.get("content") or "")[:200])
            report, why = parse_report(message.get("content") or "")
            if report is None:
                return VLMResult("invalid", reason=why)
            prompt = None
            condensed, finish = self._chat(f"{CONDENSE_INSTRUCTIONS}\n\nReport: {json.dumps(report)}", max_tokens=120)
            candidate = (condensed.get("content") or "").strip().strip('"')
            if candidate and not is_refusal(condensed, finish) and len(candidate) <= MAX_PROMPT_CHARS:
                prompt = candidate
            return VLMResult("ok", report=report, prompt=prompt)
        except TransportError as e:
            return VLMResult("error", reason=str(e))
        except RequestRejected as e:
            return VLMResult("invalid" if e.status == 200 else "error", reason=str(e))

    def describe_many(
        self, images: list[str | Path], patients: list[str] | None = None, progress: bool = True
    ) -> list[VLMResult]:
        """Describe images with at most ``concurrency`` requests in flight; order is kept."""
        from tqdm import tqdm

        patients = patients or [""] * len(images)
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            futures = [pool.submit(self.describe, p, s) for p, s in zip(images, patients, strict=True)]
            results = [f.result() for f in tqdm(futures, desc="vlm", unit="img", disable=None if progress else True)]
        for r in results:
            self.usage.statuses[r.status] = self.usage.statuses.get(r.status, 0) + 1
        return results

    def summary(self) -> dict:
        u = self.usage
        return {
            "model": self.model,
            "requests": u.requests,
            "retries": u.retries,
            "cache_hits": u.cache_hits,
            "prompt_tokens": u.prompt_tokens,
            "completion_tokens": u.completion_tokens,
            "statuses": dict(u.statuses),
        }
