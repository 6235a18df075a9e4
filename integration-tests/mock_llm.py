"""A stand-in LLM provider for tests: OpenAI, Anthropic and Gemini wire formats.

It is the only stand-in in the test stack. It speaks the providers' real
response shapes (streamed and not) with exact, known usage numbers, splits every
SSE event across several writes (with an optional delay between them), and
records every request it receives so tests can assert what reached the
provider.

Per-request behaviour is steered by request headers (they pass through Envoy):
  x-mock-output-tokens: N     output tokens to produce (default DEFAULT_OUTPUT),
                              never more than the request's own max-output field
  x-mock-chunk-delay-ms: N    sleep between writes of a stream (default 0)
  x-mock-end-delay-ms: N      sleep before ending a stream, after its last event
  x-mock-status: N            answer with this HTTP status and a provider error body
  x-mock-fail: midstream      emit a provider error event in the middle of a 200 stream
  x-mock-fail: cut            stop a stream half-way and close the connection
  x-mock-fail: no-usage       send the response without any usage
  x-mock-gzip: 1              gzip the response if the request allows gzip
  x-mock-extra-headers: 1     also send two set-cookie headers and a header
                              value with a byte that is not UTF-8 (Latin-1 é)
  x-mock-first-byte-ms: N     wait N ms before answering (a provider's think time)
  x-mock-bulk-bytes: N        an OpenAI chat stream of about N bytes, written in
                              64 KiB pieces as fast as possible (benchmarks)
  upgrade: websocket          answer 101 Switching Protocols and echo the
                              bytes that follow (a WebSocket stand-in)
  x-mock-iterations: 1        Anthropic: the final usage also carries
                              usage.iterations (ITERATIONS: a compaction and an
                              advisor call outside the top-level totals)

Control endpoints (not provider APIs):
  GET    /__mock/requests    JSON list of recorded requests
  DELETE /__mock/requests    clear the record
  GET    /__mock/health      200
  POST   /__mock/fail        answer every provider request with an error from
                             now on: JSON {"status": N, "retry_after": "S"}
                             (retry_after optional; sent as retry-after)
  DELETE /__mock/fail        answer normally again

Run: python3 mock_llm.py --port N
"""

import argparse
import asyncio
import gzip
import json
import re
import sys
import time

# Exact usage the mock reports. Tests compare metering with these.
OPENAI_PROMPT = 12
OPENAI_CACHED = 4
OPENAI_REASONING = 2
ANTHROPIC_INPUT = 10
ANTHROPIC_CACHE_READ = 3
ANTHROPIC_CACHE_WRITE = 2
GEMINI_PROMPT = 11
GEMINI_CACHED = 5
GEMINI_THOUGHTS = 6
EMBEDDING_PROMPT = 7
COMPACT_INPUT = 40
COMPACT_CACHED = 8
COMPACT_OUTPUT = 6
COUNTED_INPUT = 21
# usage.iterations of an Anthropic response asked for with x-mock-iterations
# (the `message` entry is the top level's own; compaction and advisor are not
# in the top-level totals).
ADVISOR_MODEL = "claude-opus-4-7"
ITERATION_COMPACTION = {"type": "compaction", "input_tokens": 1000, "output_tokens": 50,
                        "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0}
ITERATION_ADVISOR = {"type": "advisor_message", "model": ADVISOR_MODEL, "input_tokens": 300, "output_tokens": 40,
                     "cache_read_input_tokens": 100, "cache_creation_input_tokens": 0}
DEFAULT_OUTPUT = 9

RECORDS = []
# Set by POST /__mock/fail: every provider request gets this error.
FAIL = {}


def output_tokens(headers, requested_max):
    n = int(headers.get("x-mock-output-tokens", DEFAULT_OUTPUT))
    if requested_max is not None:
        n = min(n, int(requested_max))
    return max(n, 1)


def words(n):
    """n pieces of text, one per output token."""
    return ["tok%d " % i for i in range(n)]


def sse(data, event=None):
    out = ""
    if event:
        out += "event: %s\n" % event
    out += "data: %s\n\n" % (data if isinstance(data, str) else json.dumps(data, separators=(",", ":")))
    return out.encode()


class Reply:
    def __init__(self, status=200, body=None, events=None, content_type="application/json", headers=None):
        self.status = status
        self.body = body  # bytes for a plain response
        self.events = events  # list of bytes pieces for a stream
        self.content_type = content_type
        self.headers = headers or {}


def error_reply(api, status, retry_after=None):
    if api == "anthropic":
        body = {"type": "error", "error": {"type": "rate_limit_error" if status == 429 else "api_error",
                                           "message": "mock upstream error"}}
    elif api == "gemini":
        body = {"error": {"code": status, "message": "mock upstream error",
                          "status": "RESOURCE_EXHAUSTED" if status == 429 else "INTERNAL"}}
    else:
        body = {"error": {"message": "mock upstream error", "type": "server_error", "param": None,
                          "code": "rate_limit_exceeded" if status == 429 else None}}
    headers = {"retry-after": retry_after} if retry_after is not None else None
    return Reply(status, json.dumps(body).encode(), headers=headers)


def openai_chat(req, headers, fail):
    model = req.get("model", "unknown")
    answered = model + "-2024-08-06"
    max_out = req.get("max_completion_tokens", req.get("max_tokens"))
    n = output_tokens(headers, max_out)
    usage = {
        "prompt_tokens": OPENAI_PROMPT,
        "completion_tokens": n,
        "total_tokens": OPENAI_PROMPT + n,
        "prompt_tokens_details": {"cached_tokens": OPENAI_CACHED},
        "completion_tokens_details": {"reasoning_tokens": min(OPENAI_REASONING, n)},
    }
    text = words(n)
    if not req.get("stream"):
        body = {
            "id": "chatcmpl-mock", "object": "chat.completion", "created": 1, "model": answered,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(text)},
                         "finish_reason": "stop"}],
        }
        if fail != "no-usage":
            body["usage"] = usage
        if "service_tier" in req:
            body["service_tier"] = {"fast": "priority", "auto": "default"}.get(req["service_tier"], req["service_tier"])
        return Reply(200, json.dumps(body).encode())
    include_usage = bool((req.get("stream_options") or {}).get("include_usage"))
    base = {"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 1, "model": answered}
    if "service_tier" in req:
        # The tier that served it: `fast` is served as `priority`, `auto` as `default`.
        base["service_tier"] = {"fast": "priority", "auto": "default"}.get(req["service_tier"], req["service_tier"])

    def chunk(choices, usage_value=None):
        c = dict(base, choices=choices)
        if include_usage:
            c["usage"] = usage_value
        return sse(c)

    events = [chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])]
    for i, t in enumerate(text):
        events.append(chunk([{"index": 0, "delta": {"content": t}, "finish_reason": None}]))
        if fail == "midstream" and i == len(text) // 2:
            events.append(sse({"error": {"message": "mock overload", "type": "server_error", "code": None}}))
    events.append(chunk([{"index": 0, "delta": {}, "finish_reason": "stop"}]))
    if include_usage and fail != "no-usage":
        events.append(chunk([], usage))
    events.append(sse("[DONE]"))
    return Reply(200, events=events, content_type="text/event-stream")


def openai_responses(req, headers, fail):
    model = req.get("model", "unknown")
    answered = model + "-2025-04-16"
    n = output_tokens(headers, req.get("max_output_tokens"))
    usage = {
        "input_tokens": OPENAI_PROMPT,
        "input_tokens_details": {"cached_tokens": OPENAI_CACHED},
        "output_tokens": n,
        "output_tokens_details": {"reasoning_tokens": min(OPENAI_REASONING, n)},
        "total_tokens": OPENAI_PROMPT + n,
    }
    text = words(n)
    response = {"id": "resp_mock", "object": "response", "created_at": 1, "model": answered,
                "status": "completed",
                "output": [{"type": "message", "id": "msg_mock", "role": "assistant", "status": "completed",
                            "content": [{"type": "output_text", "text": "".join(text), "annotations": []}]}]}
    if fail != "no-usage":
        response["usage"] = usage
    if not req.get("stream"):
        return Reply(200, json.dumps(response).encode())
    events = [sse({"type": "response.created", "sequence_number": 0,
                   "response": dict(response, status="in_progress", output=[], usage=None)},
                  "response.created")]
    for i, t in enumerate(text):
        events.append(sse({"type": "response.output_text.delta", "sequence_number": i + 1, "item_id": "msg_mock",
                           "output_index": 0, "content_index": 0, "delta": t}, "response.output_text.delta"))
        if fail == "midstream" and i == len(text) // 2:
            events.append(sse({"type": "error", "code": "server_error", "message": "mock overload",
                               "sequence_number": 999}, "error"))
    events.append(sse({"type": "response.completed", "sequence_number": len(text) + 1, "response": response},
                      "response.completed"))
    return Reply(200, events=events, content_type="text/event-stream")


def openai_responses_compact(req, headers, fail):
    # openai-python CompactedResponse: no model, usage as in a response.
    body = {"id": "resp_cmp_mock", "object": "response.compaction", "created_at": 1,
            "output": [{"type": "compaction", "id": "cmp_mock", "encrypted_content": "opaque"}]}
    if fail != "no-usage":
        body["usage"] = {"input_tokens": COMPACT_INPUT, "input_tokens_details": {"cached_tokens": COMPACT_CACHED},
                         "output_tokens": COMPACT_OUTPUT, "output_tokens_details": {"reasoning_tokens": 0},
                         "total_tokens": COMPACT_INPUT + COMPACT_OUTPUT}
    return Reply(200, json.dumps(body).encode())


def openai_embeddings(req, headers, fail):
    body = {"object": "list", "model": req.get("model", "unknown"),
            "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2, 0.3]}]}
    if fail != "no-usage":
        body["usage"] = {"prompt_tokens": EMBEDDING_PROMPT, "total_tokens": EMBEDDING_PROMPT}
    return Reply(200, json.dumps(body).encode())


def anthropic_messages(req, headers, fail):
    model = req.get("model", "unknown")
    n = output_tokens(headers, req.get("max_tokens"))
    text = words(n)
    usage = {"input_tokens": ANTHROPIC_INPUT, "cache_creation_input_tokens": ANTHROPIC_CACHE_WRITE,
             "cache_read_input_tokens": ANTHROPIC_CACHE_READ, "output_tokens": n}
    iterations = None
    if headers.get("x-mock-iterations") == "1":
        own = {"type": "message", "model": model, "input_tokens": ANTHROPIC_INPUT, "output_tokens": n,
               "cache_read_input_tokens": ANTHROPIC_CACHE_READ,
               "cache_creation_input_tokens": ANTHROPIC_CACHE_WRITE}
        iterations = [ITERATION_COMPACTION, own, ITERATION_ADVISOR]
    if not req.get("stream"):
        if iterations:
            usage = dict(usage, iterations=iterations)
        body = {"id": "msg_mock", "type": "message", "role": "assistant", "model": model,
                "content": [{"type": "text", "text": "".join(text)}], "stop_reason": "end_turn",
                "stop_sequence": None}
        if fail != "no-usage":
            body["usage"] = usage
        return Reply(200, json.dumps(body).encode())
    start_usage = dict(usage, output_tokens=1)
    message = {"id": "msg_mock", "type": "message", "role": "assistant", "model": model, "content": [],
               "stop_reason": None, "stop_sequence": None}
    if fail != "no-usage":
        message["usage"] = start_usage
    events = [
        sse({"type": "message_start", "message": message}, "message_start"),
        sse({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
            "content_block_start"),
        sse({"type": "ping"}, "ping"),
    ]
    half = len(text) // 2
    for i, t in enumerate(text):
        events.append(sse({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": t}},
                          "content_block_delta"))
        if i == half and fail == "midstream":
            events.append(sse({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}},
                              "error"))
        if i == half and fail != "no-usage":
            # A cumulative interim count: the final message_delta supersedes it.
            events.append(sse({"type": "message_delta", "delta": {"stop_reason": None, "stop_sequence": None},
                               "usage": {"output_tokens": i + 1}}, "message_delta"))
    events.append(sse({"type": "content_block_stop", "index": 0}, "content_block_stop"))
    delta = {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None}}
    if fail != "no-usage":
        delta["usage"] = {"output_tokens": n}
        if iterations:
            delta["usage"]["iterations"] = iterations
    events.append(sse(delta, "message_delta"))
    events.append(sse({"type": "message_stop"}, "message_stop"))
    return Reply(200, events=events, content_type="text/event-stream")


def gemini(req, headers, fail, model, method, alt_sse):
    n = output_tokens(headers, (req.get("generationConfig") or {}).get("maxOutputTokens"))
    text = words(n)
    version = model + "-001"

    def usage_meta(out):
        return {"promptTokenCount": GEMINI_PROMPT, "cachedContentTokenCount": GEMINI_CACHED,
                "candidatesTokenCount": out, "thoughtsTokenCount": GEMINI_THOUGHTS,
                "totalTokenCount": GEMINI_PROMPT + out + GEMINI_THOUGHTS}

    def chunk(parts_text, out, finish=None):
        cand = {"content": {"role": "model", "parts": [{"text": parts_text}]}, "index": 0}
        if finish:
            cand["finishReason"] = finish
        c = {"candidates": [cand], "modelVersion": version, "responseId": "mock"}
        if fail != "no-usage":
            c["usageMetadata"] = usage_meta(out)
        return c

    if method == "generateContent":
        return Reply(200, json.dumps(chunk("".join(text), n, "STOP")).encode())
    chunks = []
    for i, t in enumerate(text):
        last = i == len(text) - 1
        chunks.append(chunk(t, i + 1, "STOP" if last else None))
    if fail == "midstream":
        chunks.insert(len(chunks) // 2, {"error": {"code": 503, "message": "mock overload", "status": "UNAVAILABLE"}})
    if alt_sse:
        return Reply(200, events=[sse(c) for c in chunks], content_type="text/event-stream")
    # Without alt=sse: one JSON array, streamed in pieces.
    pieces = []
    for i, c in enumerate(chunks):
        pieces.append((("[" if i == 0 else ",\r\n") + json.dumps(c, indent=1)).encode())
    pieces.append(b"]")
    return Reply(200, events=pieces, content_type="application/json")


def gemini_interactions(req, headers, fail):
    # google-genai _interactions: typed events up to interaction.complete;
    # total_cached_tokens is inside total_input_tokens, thoughts on top of output.
    model = req.get("model", "unknown")
    n = output_tokens(headers, (req.get("generation_config") or {}).get("max_output_tokens"))
    text = words(n)
    usage = {"total_input_tokens": GEMINI_PROMPT, "total_cached_tokens": GEMINI_CACHED, "total_output_tokens": n,
             "total_thought_tokens": GEMINI_THOUGHTS, "total_tool_use_tokens": 0,
             "total_tokens": GEMINI_PROMPT + n + GEMINI_THOUGHTS}
    done = {"id": "v1_mock", "status": "completed", "model": model, "object": "interaction", "role": "model"}
    if fail != "no-usage":
        done["usage"] = usage
    if not req.get("stream"):
        return Reply(200, json.dumps(dict(done, outputs=[{"type": "text", "text": "".join(text)}])).encode())
    events = [sse({"event_type": "interaction.start",
                   "interaction": {"id": "v1_mock", "status": "in_progress", "model": model}}, "interaction.start"),
              sse({"event_type": "content.start", "index": 0, "content": {"type": "text"}}, "content.start")]
    for t in text:
        events.append(sse({"event_type": "content.delta", "index": 0, "delta": {"type": "text", "text": t}},
                          "content.delta"))
    events.append(sse({"event_type": "content.stop", "index": 0}, "content.stop"))
    events.append(sse({"event_type": "interaction.complete", "interaction": dict(done, outputs=[])},
                      "interaction.complete"))
    return Reply(200, events=events, content_type="text/event-stream")


def dispatch(method, path, headers, body):
    fail = headers.get("x-mock-fail")
    bare = path.split("?", 1)[0]
    try:
        req = json.loads(body) if body else {}
    except ValueError:
        return Reply(400, b'{"error":{"message":"mock: bad json"}}')
    api = "openai"
    if bare.endswith("/messages") or bare.endswith("/messages/count_tokens"):
        api = "anthropic"
    elif "/models/" in bare and ":" in bare:
        api = "gemini"
    if FAIL:
        return error_reply(api, FAIL["status"], FAIL.get("retry_after"))
    if "x-mock-status" in headers:
        return error_reply(api, int(headers["x-mock-status"]), headers.get("x-mock-retry-after"))
    if bare.endswith("/interactions"):
        return gemini_interactions(req, headers, fail)
    if bare.endswith("/responses/compact"):
        return openai_responses_compact(req, headers, fail)
    if bare.endswith("/responses/input_tokens"):
        return Reply(200, json.dumps({"object": "response.input_tokens", "input_tokens": COUNTED_INPUT}).encode())
    if bare.endswith("/messages/count_tokens"):
        return Reply(200, json.dumps({"input_tokens": COUNTED_INPUT}).encode())
    if bare.endswith("/chat/completions"):
        return openai_chat(req, headers, fail)
    if bare.endswith("/responses"):
        return openai_responses(req, headers, fail)
    if bare.endswith("/embeddings"):
        return openai_embeddings(req, headers, fail)
    if api == "anthropic":
        return anthropic_messages(req, headers, fail)
    m = re.search(r"/models/([^/:]+):(\w+)$", bare)
    if m:
        alt_sse = "alt=sse" in path.split("?", 1)[-1]
        return gemini(req, headers, fail, m.group(1), m.group(2), alt_sse)
    return Reply(404, b'{"error":{"message":"mock: unknown path"}}')


async def write_chunk(writer, data):
    writer.write(b"%x\r\n" % len(data) + data + b"\r\n")
    await writer.drain()


def bulk_stream(req, total):
    """An OpenAI chat stream of about `total` bytes, in 64 KiB writes."""
    text = "x" * 200
    chunk = sse({"id": "chatcmpl-bulk", "object": "chat.completion.chunk", "created": 1, "model": "bulk",
                 "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]})
    per_write = max(1, 65536 // len(chunk))
    writes = []
    sent = 0
    while sent < total:
        piece = chunk * per_write
        writes.append(piece)
        sent += len(piece)
    n = sent // len(chunk)
    usage = {"prompt_tokens": OPENAI_PROMPT, "completion_tokens": n, "total_tokens": OPENAI_PROMPT + n}
    writes.append(sse({"id": "chatcmpl-bulk", "object": "chat.completion.chunk", "created": 1, "model": "bulk",
                       "choices": [], "usage": usage}) + sse("[DONE]"))
    return writes


async def send_bulk(writer, writes):
    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
    for w in writes:
        await write_chunk(writer, w)
    writer.write(b"0\r\n\r\n")
    await writer.drain()


async def send_reply(writer, reply, headers, delay):
    gz = headers.get("x-mock-gzip") == "1" and "gzip" in headers.get("accept-encoding", "")
    head = ["HTTP/1.1 %d %s" % (reply.status, "OK" if reply.status == 200 else "Error"),
            "content-type: " + reply.content_type]
    for k, v in reply.headers.items():
        head.append("%s: %s" % (k, v))
    if headers.get("x-mock-extra-headers") == "1":
        head += ["set-cookie: a=1", "set-cookie: b=2", "x-provider-odd: caf\xe9"]
    if reply.events is None:
        body = reply.body or b""
        if gz:
            body = gzip.compress(body)
            head.append("content-encoding: gzip")
        head.append("content-length: %d" % len(body))
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
        await writer.drain()
        return True
    head.append("transfer-encoding: chunked")
    head.append("cache-control: no-cache")
    writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
    await writer.drain()
    fail = headers.get("x-mock-fail")
    if gz:
        await write_chunk(writer, gzip.compress(b"".join(reply.events)))
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        return True
    for i, ev in enumerate(reply.events):
        if fail == "cut" and i >= len(reply.events) // 2:
            # Upstream cut-off: the connection dies mid-stream.
            return False
        # Split each event into three writes at uneven points, so the filter
        # sees events (and CR/LF pairs) straddling chunk boundaries.
        cuts = sorted({0, len(ev), max(1, len(ev) // 3), max(1, (2 * len(ev)) // 3 + 1)})
        for a, b in zip(cuts, cuts[1:]):
            if b > a:
                await write_chunk(writer, ev[a:b])
                if delay:
                    await asyncio.sleep(delay)
    if "x-mock-end-delay-ms" in headers:
        # The last event is out; the upstream's end of stream comes later.
        await writer.drain()
        await asyncio.sleep(int(headers["x-mock-end-delay-ms"]) / 1000.0)
    writer.write(b"0\r\n\r\n")
    await writer.drain()
    return True


async def handle(reader, writer):
    try:
        while True:
            line = await reader.readline()
            if not line:
                break
            try:
                method, target, _version = line.decode("latin-1").strip().split(" ", 2)
            except ValueError:
                break
            headers = {}
            raw_headers = []
            while True:
                h = await reader.readline()
                if h in (b"\r\n", b"\n", b""):
                    break
                k, _, v = h.decode("latin-1").partition(":")
                raw_headers.append([k.strip().lower(), v.strip()])
                headers[k.strip().lower()] = v.strip()
            body = b""
            if headers.get("transfer-encoding", "").lower() == "chunked":
                while True:
                    size_line = await reader.readline()
                    size = int(size_line.strip().split(b";")[0] or b"0", 16)
                    if size == 0:
                        while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                            pass
                        break
                    body += await reader.readexactly(size)
                    await reader.readexactly(2)
            elif "content-length" in headers:
                body = await reader.readexactly(int(headers["content-length"]))
            if target.startswith("/__mock/"):
                if target == "/__mock/requests" and method == "DELETE":
                    RECORDS.clear()
                    out = b"{}"
                elif target == "/__mock/requests":
                    out = json.dumps(RECORDS).encode()
                elif target == "/__mock/fail" and method == "POST":
                    FAIL.clear()
                    FAIL.update(json.loads(body or b"{}"))
                    out = b"{}"
                elif target == "/__mock/fail" and method == "DELETE":
                    FAIL.clear()
                    out = b"{}"
                else:
                    out = b'{"ok":true}'
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n"
                             % len(out) + out)
                await writer.drain()
                continue
            RECORDS.append({"method": method, "path": target, "headers": raw_headers,
                            "body": body.decode("utf-8", "replace"), "time": time.time()})
            if "x-mock-first-byte-ms" in headers:
                await asyncio.sleep(int(headers["x-mock-first-byte-ms"]) / 1000.0)
            if "x-mock-bulk-bytes" in headers:
                await send_bulk(writer, bulk_stream({}, int(headers["x-mock-bulk-bytes"])))
                continue
            if headers.get("upgrade", "").lower() == "websocket":
                # A WebSocket handshake (RFC 6455), then an echo of whatever
                # bytes come until the client closes.
                import base64
                import hashlib
                accept = base64.b64encode(hashlib.sha1((headers.get("sec-websocket-key", "") +
                                                        "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest())
                writer.write(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\n"
                             b"sec-websocket-accept: " + accept + b"\r\n\r\n")
                await writer.drain()
                while True:
                    data = await reader.read(65536)
                    if not data:
                        break
                    writer.write(data)
                    await writer.drain()
                break
            reply = dispatch(method, target, headers, body)
            delay = int(headers.get("x-mock-chunk-delay-ms", "0")) / 1000.0
            if not await send_reply(writer, reply, headers, delay):
                break
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        try:
            writer.close()
        except Exception:
            pass


async def main(port):
    server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=1024)
    print("mock_llm listening on 127.0.0.1:%d" % port, flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    args = p.parse_args()
    try:
        asyncio.run(main(args.port))
    except KeyboardInterrupt:
        sys.exit(0)
