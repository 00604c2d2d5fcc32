"""An LLM safety judge behind an OpenAI-compatible `/v1/chat/completions` endpoint (vLLM's server,
any hosted API), with timeouts, retries and a clear failure policy.

What
- `HTTPJudge(url, model, timeout_s, retries, backoff_s, max_concurrency, api_key_env, temperature,
  max_tokens)` is a `rewards.judge.ChatJudge` whose `complete` POSTs the judge prompt
  (`rewards.judge.judge_messages`) and returns `choices[0].message.content`; `parse_verdict` reads it.
- `url`: a base ("http://host:8000" or ".../v1") or the full ".../chat/completions" address.
- `api_key_env`: the name of an environment variable holding the key (sent as a Bearer token); the
  key itself never goes in the config.

Failures (each request independently; a batch never raises):
- retried up to `retries` times, after `backoff_s * 2**attempt` seconds (or the server's
  `Retry-After`, capped at `MAX_WAIT_S`): a timeout (`timeout_s` for connect, read and write each),
  a refused or dropped connection, HTTP 429 and 5xx;
- not retried: other HTTP 4xx (a wrong model name or URL will not heal), a 200 whose body is not the
  chat-completions shape;
- a reply that arrives but holds no verdict (garbage, a refusal by the judge) is not retried either:
  with greedy decoding the same prompt gives the same answer.
Whatever fails becomes `Verdict(error=...)`, and the `safety` reward's `on_failure` decides
(`zero`, `skip` or `raise`). A request costs at most (retries + 1) * (timeout_s + backoff) seconds;
keep that under `reward.timeout_s`, the composite's guard for the whole batch.

Tested against a real HTTP server started in the test (tests/rewards/test_http_judge.py: canned
verdicts, garbage, partial JSON, a refusing judge, 500s, 429s, a slow endpoint, a closed port). Not
yet tested against vLLM's OpenAI-compatible server with a real judge model.
"""
from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence

from envs.safety_spec import Spec
from rewards.judge import ChatJudge, JudgeRequest, Verdict

MAX_WAIT_S = 30.0  # cap on a server's Retry-After


class JudgeUnavailable(RuntimeError):
    """The endpoint gave no usable reply after the retries (the message says why)."""


def chat_url(url: str) -> str:
    """The chat-completions address for a base URL.

    >>> chat_url("http://h:8000"), chat_url("http://h:8000/v1/"), chat_url("http://h/v1/chat/completions")
    ('http://h:8000/v1/chat/completions', 'http://h:8000/v1/chat/completions', 'http://h/v1/chat/completions')
    """
    url = url.rstrip("/")
    if url.endswith("/chat/completions"):
        return url
    return url + ("/chat/completions" if url.endswith("/v1") else "/v1/chat/completions")


class HTTPJudge:
    """A chat judge over HTTP; see the module docstring for the failure rules."""

    def __init__(self, url: str, model: str, timeout_s: float = 30.0, retries: int = 2, backoff_s: float = 0.5,
                 max_concurrency: int = 8, api_key_env: str | None = None, temperature: float = 0.0,
                 max_tokens: int = 1024):
        if not url or not model:
            raise ValueError(f"HTTPJudge needs url and model (got url={url!r}, model={model!r})")
        if timeout_s <= 0 or retries < 0 or backoff_s < 0:
            raise ValueError(f"timeout_s={timeout_s} must be > 0, retries={retries} and backoff_s={backoff_s} >= 0")
        if api_key_env is not None and not os.environ.get(api_key_env):
            raise ValueError(f"api_key_env={api_key_env!r}: that environment variable is not set")
        self.url, self.model = chat_url(url), model
        self.timeout_s, self.retries, self.backoff_s = float(timeout_s), int(retries), float(backoff_s)
        self.api_key_env, self.temperature, self.max_tokens = api_key_env, temperature, max_tokens
        self._chat = ChatJudge(self.complete, max_concurrency)
        self._client = None
        self._lock = threading.Lock()

    def judge(self, spec: Spec, requests: Sequence[JudgeRequest]) -> list[Verdict]:
        return self._chat.judge(spec, requests)

    def _http(self):
        import httpx

        with self._lock:  # one pooled client, built on first use (the judge object itself stays picklable)
            if self._client is None:
                self._client = httpx.Client(timeout=httpx.Timeout(self.timeout_s))
            return self._client

    def complete(self, messages: list[dict[str, str]]) -> str:
        """The judge model's reply to `messages`; JudgeUnavailable when none came."""
        import httpx

        headers = {"Content-Type": "application/json"}
        if self.api_key_env:
            headers["Authorization"] = f"Bearer {os.environ[self.api_key_env]}"
        body = {"model": self.model, "messages": messages, "temperature": self.temperature,
                "max_tokens": self.max_tokens}
        last = "no attempt"
        for attempt in range(self.retries + 1):
            wait = self.backoff_s * 2**attempt
            try:
                resp = self._http().post(self.url, json=body, headers=headers)
            except httpx.TimeoutException:
                last = f"timed out after {self.timeout_s:g} s"
            except httpx.TransportError as exc:
                last = f"{type(exc).__name__}: {exc}"
            else:
                if resp.status_code == 200:
                    return _content(resp)
                last = f"HTTP {resp.status_code}: {resp.text[:200]}"
                if resp.status_code != 429 and resp.status_code < 500:
                    raise JudgeUnavailable(f"{self.url}: {last} (not retried)")
                wait = _retry_after(resp, wait)
            if attempt < self.retries:
                time.sleep(wait)
        raise JudgeUnavailable(f"{self.url}: {last} (after {self.retries + 1} attempts)")

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_client"], state["_lock"] = None, None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()


def _content(resp) -> str:
    try:
        content = resp.json()["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise JudgeUnavailable(f"reply is not a chat completion ({type(exc).__name__}): {resp.text[:200]!r}") from None
    return "" if content is None else str(content)


def _retry_after(resp, default: float) -> float:
    try:
        return min(MAX_WAIT_S, max(0.0, float(resp.headers.get("Retry-After", default))))
    except ValueError:
        return default
