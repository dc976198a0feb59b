"""The vision-language backend against a fake OpenAI-compatible server on 127.0.0.1 started here:
cache and resume, retries on 429/500/timeouts, malformed replies, refusals, the start-up check,
bounded concurrency, token usage, and build_captions with ``--reporter metadata,image,vlm``."""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from lesiongen.captions import reports, vlm
from lesiongen.captions.build import BuildCaptionsConfig, build
from lesiongen.errors import InputError
from lesiongen.files import read_jsonl

GOOD = {k: None for k in reports.VLM_FIELDS} | {
    "lesion_color": "brown",
    "border_definition": "well-defined",
    "texture": "smooth",
    "skin_tone": "light",
}


class FakeVLM:
    """Answers chat completions; ``rule(kind, body)`` may return (status, payload-or-text, delay)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict]] = []
        self.rule = lambda kind, body: None
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                kind = fake.kind(body)
                with fake.lock:
                    fake.calls.append((kind, body))
                    fake.in_flight += 1
                    fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
                try:
                    status, payload, delay = fake.rule(kind, body) or (200, fake.default(kind), 0.0)
                    time.sleep(delay)
                    with fake.lock:  # done working: the reply is on its way, and the client may send the next
                        fake.in_flight -= 1
                    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                    self.send_response(status)
                    if status == 429:
                        self.send_header("Retry-After", "0")
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @staticmethod
    def kind(body: dict) -> str:
        content = body["messages"][0]["content"]
        if isinstance(content, str):
            return "condense"
        return "probe" if "What colour" in content[0]["text"] else "report"

    @staticmethod
    def reply(content: str | None, refusal: str | None = None, finish: str = "stop") -> dict:
        message = {"role": "assistant", "content": content}
        if refusal:
            message["refusal"] = refusal
        return {
            "choices": [{"index": 0, "message": message, "finish_reason": finish}],
            "usage": {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120},
        }

    def default(self, kind: str) -> dict:
        return self.reply({"probe": "red", "report": json.dumps(GOOD), "condense": "melanoma, brown, smooth"}[kind])

    def count(self, kind: str) -> int:
        return sum(1 for k, _ in self.calls if k == kind)


@pytest.fixture
def fake():
    server = FakeVLM()
    yield server
    server.server.shutdown()
    server.server.server_close()


def image_files(folder, n: int) -> list:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        img = np.full((48, 48, 3), (200, 170, 150), np.uint8)
        img[12:36, 12:36] = (90 + 10 * i, 60, 40)
        path = folder / f"img{i}.png"
        Image.fromarray(img).save(path)
        paths.append(path)
    return paths


def client(fake: FakeVLM, tmp_path, **kw) -> vlm.VLMClient:
    args = {"cache_path": tmp_path / "cache.jsonl", "timeout": 2.0, "retries": 3, "backoff": 0.01, "concurrency": 1}
    args.update(kw)
    return vlm.VLMClient(fake.url, "fake-vl", **args)


def test_report_is_parsed_condensed_and_usage_counted(fake, tmp_path):
    c = client(fake, tmp_path, api_key="sk-test")
    [result] = c.describe_many(image_files(tmp_path / "im", 1), progress=False)
    assert result.status == "ok" and result.report == GOOD and result.prompt == "melanoma, brown, smooth"
    kind, body = fake.calls[0]
    assert kind == "report" and body["model"] == "fake-vl"
    url = body["messages"][0]["content"][1]["image_url"]["url"]
    assert url.startswith("data:image/png;base64,") and base64.b64decode(url.split(",", 1)[1]).startswith(b"\x89PNG")
    s = c.summary()
    assert (s["requests"], s["prompt_tokens"], s["completion_tokens"], s["statuses"]) == (2, 200, 40, {"ok": 1})


def test_rerun_after_kill_makes_no_second_call_for_finished_images(fake, tmp_path):
    paths = image_files(tmp_path / "im", 3)
    first = client(fake, tmp_path)
    first.describe_many(paths[:2], progress=False)  # then the job is killed mid-append of the third:
    with open(tmp_path / "cache.jsonl", "a") as f:
        f.write('{"key": "torn')
    assert fake.count("report") == 2
    rerun = client(fake, tmp_path)
    results = rerun.describe_many(paths, progress=False)
    assert [r.status for r in results] == ["ok"] * 3 and [r.cached for r in results] == [True, True, False]
    assert fake.count("report") == 3 and fake.count("condense") == 3
    again = client(fake, tmp_path)
    again.describe_many(paths, progress=False)
    assert fake.count("report") == 3 and again.summary()["cache_hits"] == 3 and again.summary()["requests"] == 0


def test_429_and_500_are_retried(fake, tmp_path):
    answers = [(429, {"error": "slow down"}, 0.0), (500, {"error": "boom"}, 0.0), (503, b"unavailable", 0.0)]
    fake.rule = lambda kind, body: answers.pop(0) if kind == "report" and answers else None
    c = client(fake, tmp_path)
    [result] = c.describe_many(image_files(tmp_path / "im", 1), progress=False)
    assert result.status == "ok" and fake.count("report") == 4 and c.summary()["retries"] == 3


def test_timeout_is_retried_and_a_dead_endpoint_is_an_error_not_a_caption(fake, tmp_path):
    slow = [True]
    fake.rule = lambda kind, body: (200, fake.default(kind), 1.0) if kind == "report" and slow and slow.pop() else None
    c = client(fake, tmp_path, timeout=0.3)
    [result] = c.describe_many(image_files(tmp_path / "im", 1), progress=False)
    assert result.status == "ok" and c.summary()["retries"] == 1
    fake.rule = lambda kind, body: (200, fake.default(kind), 1.0)
    c = client(fake, tmp_path, timeout=0.2, retries=1, cache_path=tmp_path / "other.jsonl")
    [result] = c.describe_many(image_files(tmp_path / "im2", 1), progress=False)
    assert result.status == "error" and result.report is None and "TimeoutError" in result.reason
    assert not (tmp_path / "other.jsonl").exists()  # not cached: a rerun tries again


@pytest.mark.parametrize(
    "payload, why",
    [
        (FakeVLM.reply("the lesion is brown and round"), "not JSON"),
        (FakeVLM.reply(json.dumps({"lesion_color": "brown"})), "schema mismatch"),
        (FakeVLM.reply(json.dumps(GOOD | {"texture": {"nested": 1}})), "not a phrase"),
        (FakeVLM.reply("```json\n" + json.dumps(["brown"]) + "\n```"), "not a JSON object"),
        (b"<html>gateway</html>", "not JSON"),
        ({"object": "error"}, "no choices"),
        (["a", "JSON", "list"], "not a JSON object"),
        ({"choices": [{"message": {"content": ["parts"]}}]}, "not a chat message"),
        (b"{" + b" " * (vlm.MAX_REPLY_BYTES + 10) + b"}", "over 4 MiB"),
    ],
)
def test_malformed_replies_are_invalid_and_cached(fake, tmp_path, payload, why):
    fake.rule = lambda kind, body: (200, payload, 0.0) if kind == "report" else None
    c = client(fake, tmp_path)
    [result] = c.describe_many(image_files(tmp_path / "im", 1), progress=False)
    assert result.status == "invalid" and result.report is None and why in result.reason
    assert read_jsonl(tmp_path / "cache.jsonl")[0]["status"] == "invalid"


def test_fenced_json_is_accepted():
    report, why = vlm.parse_report("```json\n" + json.dumps(GOOD) + "\n```")
    assert report == GOOD and why == ""


@pytest.mark.parametrize(
    "payload",
    [
        FakeVLM.reply("I'm sorry, but I can't help with identifying medical conditions."),
        FakeVLM.reply(None, refusal="I cannot assist with that request."),
        FakeVLM.reply(json.dumps(GOOD), finish="content_filter"),
    ],
)
def test_refusal_never_becomes_a_caption(fake, tmp_path, payload):
    fake.rule = lambda kind, body: (200, payload, 0.0) if kind == "report" else None
    c = client(fake, tmp_path)
    [result] = c.describe_many(image_files(tmp_path / "im", 1), progress=False)
    assert result.status == "refused" and result.report is None and result.prompt is None
    assert fake.count("condense") == 0


def test_concurrency_is_bounded(fake, tmp_path):
    fake.rule = lambda kind, body: (200, fake.default(kind), 0.15) if kind == "report" else None
    c = client(fake, tmp_path, concurrency=2)
    results = c.describe_many(image_files(tmp_path / "im", 6), progress=False)
    assert all(r.status == "ok" for r in results) and fake.max_in_flight == 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_check_names_the_problem_before_any_image(fake, tmp_path):
    client(fake, tmp_path).check()
    assert [k for k, _ in fake.calls] == ["probe"]
    dead = vlm.VLMClient(f"http://127.0.0.1:{free_port()}/v1", "m", retries=1, backoff=0.01, timeout=1.0)
    with pytest.raises(InputError, match="unreachable"):
        dead.check()
    for status, match in ((401, "API key was rejected"), (400, "does not accept images"), (404, "not found")):
        fake.rule = lambda kind, body, s=status: (s, {"error": {"message": "image input is not supported"}}, 0.0)
        with pytest.raises(InputError, match=match):
            client(fake, tmp_path).check()


def ham_folder(tmp_path, n: int = 4):
    images = tmp_path / "images"
    paths = image_files(images, n)
    rows = [f"L{i},{p.stem},mel,histo,{40 + i},female,back" for i, p in enumerate(paths)]
    csv = tmp_path / "meta.csv"
    csv.write_text("lesion_id,image_id,dx,dx_type,age,sex,localization\n" + "\n".join(rows) + "\n")
    return csv, images, paths


def test_build_captions_with_vlm_reporter(fake, tmp_path, monkeypatch, capsys):
    csv, images, paths = ham_folder(tmp_path)
    refused = base64.b64encode(paths[1].read_bytes()).decode()

    def rule(kind, body):
        if kind == "report" and refused in body["messages"][0]["content"][1]["image_url"]["url"]:
            return 200, FakeVLM.reply("I'm sorry, I can't describe medical images."), 0.0
        return None

    fake.rule = rule
    monkeypatch.setenv("FAKE_VLM_KEY", "sk-secret")
    args = dict(
        dataset="ham10000",
        metadata=str(csv),
        images=str(images),
        output_dir=str(tmp_path / "o"),
        split_fractions=[1.0, 0.0, 0.0],
    )
    args.update(
        reporter="metadata,image,vlm", vlm_base_url=fake.url, vlm_model="fake-vl", vlm_api_key_env="FAKE_VLM_KEY"
    )
    summary = build(BuildCaptionsConfig(**args))
    assert fake.calls[0][0] == "probe"
    rows = {r["image_id"]: r for r in read_jsonl(tmp_path / "o" / "captions.jsonl")}
    assert summary["reports"]["vlm"]["statuses"] == {"ok": 3, "refused": 1}
    assert summary["reports"]["vlm"]["prompt_tokens"] > 0
    for image_id, row in rows.items():
        rep = reports.row_report(row)
        assert "sorry" not in row["text"].lower() and "sorry" not in row["long_text"].lower()
        if image_id == "img1":
            assert rep["vlm"] is None and "well-defined" not in row["text"]
        else:
            assert rep["vlm"]["border_definition"] == "well-defined" and "well-defined border" in row["text"]
            assert rep["vlm_prompt"] == "melanoma, brown, smooth"
    assert "sk-secret" not in (tmp_path / "o" / "summary.json").read_text()
    assert "tokens: " in capsys.readouterr().out
    before = len(fake.calls)
    build(BuildCaptionsConfig(**args))  # a rerun: one probe, everything else from the cache
    assert [k for k, _ in fake.calls[before:]] == ["probe"]


def test_build_captions_stops_before_any_image_when_endpoint_is_down(tmp_path):
    csv, images, _ = ham_folder(tmp_path)
    from lesiongen.captions.build import main

    args = ["--dataset", "ham10000", "--metadata", str(csv), "--images", str(images), "--out", str(tmp_path / "o")]
    args += ["--reporter", "metadata,image,vlm", "--vlm_base_url", f"http://127.0.0.1:{free_port()}/v1"]
    args += ["--vlm_model", "m", "--vlm_retries", "0"]
    assert main(args) == 2
    assert not (tmp_path / "o").exists()


def test_usage_fields_of_the_wrong_type_count_zero_and_the_reply_is_kept(fake, tmp_path):
    payload = FakeVLM.reply(json.dumps(GOOD)) | {"usage": {"prompt_tokens": "many", "completion_tokens": None}}
    fake.rule = lambda kind, body: (200, payload, 0.0) if kind == "report" else None
    c = client(fake, tmp_path)
    [result] = c.describe_many(image_files(tmp_path / "im", 1), progress=False)
    assert result.status == "ok" and c.summary()["prompt_tokens"] == 100  # the condense call's 100 alone
    assert read_jsonl(tmp_path / "cache.jsonl")[0]["status"] == "ok"


class Trickle:
    """A server that answers every request with headers, then one body byte every 50 ms, forever."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1"
        self.stop = threading.Event()
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self) -> None:
        while not self.stop.is_set():
            conn, _ = self.sock.accept()
            threading.Thread(target=self.drip, args=(conn,), daemon=True).start()

    def drip(self, conn) -> None:
        try:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n")
            while not self.stop.is_set():
                conn.sendall(b" ")
                time.sleep(0.05)
        except OSError:
            pass
        finally:
            conn.close()


def test_a_server_that_trickles_bytes_cannot_outlast_the_timeout(tmp_path):
    server = Trickle()
    c = vlm.VLMClient(server.url, "m", cache_path=tmp_path / "c.jsonl", timeout=0.5, retries=1, backoff=0.01)
    start = time.monotonic()
    [result] = c.describe_many(image_files(tmp_path / "im", 1), progress=False)
    elapsed = time.monotonic() - start
    server.stop.set()
    assert result.status == "error" and "TimeoutError after 2 attempts" in result.reason
    assert elapsed < 3.0  # two attempts of 0.5 s each, not the 100 s the drip would take


def test_a_redirect_is_refused_and_the_key_never_reaches_the_other_host(fake, tmp_path):
    class Redirect(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(307)
            self.send_header("Location", fake.url + "/chat/completions")
            self.send_header("Content-Length", "0")
            self.end_headers()

    server = ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    try:
        c = vlm.VLMClient(url, "m", api_key="sk-secret", retries=0, timeout=2.0)
        with pytest.raises(InputError, match="redirected to http://127.0.0.1.*never sent on"):
            c.check()
        [result] = c.describe_many(image_files(tmp_path / "im", 1), progress=False)
        assert result.status == "error" and "redirected" in result.reason
    finally:
        server.shutdown()
        server.server_close()
    assert fake.calls == []  # the other host heard nothing, so it never saw the key


def test_a_key_pasted_for_the_variable_name_is_refused_unshown_and_an_unset_variable_is_one_line(tmp_path, capsys):
    from lesiongen.captions.build import main

    csv, images, _ = ham_folder(tmp_path)
    key = "sk-proj-4fA9x0Qz7LmN2bVc8RtY1uWe"
    args = ["--dataset", "ham10000", "--metadata", str(csv), "--images", str(images), "--out", str(tmp_path / "o")]
    args += ["--split_fractions", "1", "0", "0"]
    assert main([*args, "--vlm_api_key_env", key]) == 2
    err = capsys.readouterr().err
    assert "--vlm_api_key_env" in err and "looks like a key" in err and key not in err
    assert not (tmp_path / "o").exists()
    vlm_args = ["--reporter", "metadata,image,vlm", "--vlm_base_url", "http://127.0.0.1:9/v1", "--vlm_model", "m"]
    assert main([*args, *vlm_args, "--vlm_api_key_env", "LESIONGEN_TEST_UNSET_KEY"]) == 2
    err = capsys.readouterr().err
    assert "environment variable LESIONGEN_TEST_UNSET_KEY is not set" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()
    assert main([*args, "--reporter", "metadata"]) == 0  # the default name, unset, is fine
    assert "LESIONGEN_VLM_API_KEY" in (tmp_path / "o" / "summary.json").read_text()
