"""Prompt perturbation by a language model behind an OpenAI-compatible chat endpoint.

The paper perturbs real prompts with GPT-5; this is the same step for any server that speaks the
OpenAI chat-completions protocol (OpenAI, vLLM, llama.cpp, Ollama, ...). It is optional: the
rule-based `perturb.perturb_prompt` is the default, works offline, and is what tests use. Only the
standard library (`urllib`) is used, so no client package is needed.

The model gets `INSTRUCTION` as the system message and the prompt as the user message, and must
answer with one JSON object:

  {"perturbed_prompt": "<the prompt with exactly one spatial relation changed>",
   "relation_changed": "<before> -> <after>, e.g. left of -> right of"}

or `{"perturbed_prompt": null}` when the prompt has no spatial relation.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
import urllib.error
import urllib.request
from typing import Any

INSTRUCTION = """\
You edit text-to-image prompts to build a data set about spatial relations.

Change exactly ONE spatial relation of the user's prompt so that the described layout becomes \
wrong, and keep everything else (objects, attributes, counts, style, wording) unchanged. Spatial \
relations are directional relations between objects or to the frame: left of / right of, above / \
below, on top of / beneath, over / under, in front of / behind, higher / lower, foreground / \
background. Reverse the relation word (e.g. "left of" -> "right of") or swap the two objects it \
relates; never add or remove objects. Non-directional relations ("next to", "near", "with") do \
not count.

Answer with a single JSON object and nothing else:
{"perturbed_prompt": "<the edited prompt>", "relation_changed": "<before> -> <after>"}
for example {"perturbed_prompt": "a dog to the right of a cat", "relation_changed": \
"left of -> right of"} for "a dog to the left of a cat".
If the prompt has no spatial relation, answer {"perturbed_prompt": null, "relation_changed": ""}.
"""

_CHAT_PATH = "/chat/completions"
_RETRY_HTTP_CODES = (408, 409, 425, 429, 500, 502, 503, 504)


class LLMEndpointError(RuntimeError):
  """The chat endpoint cannot be used (unreachable, refused, HTTP error); the URL is named."""


class LLMReplyError(ValueError):
  """The model's answer for one prompt is not a usable perturbation."""


def chat_url(endpoint: str) -> str:
  """The chat-completions URL of `endpoint`: a base URL (`http://host:8000/v1`) or the full URL."""
  endpoint = endpoint.strip().rstrip("/")
  if not re.match(r"^https?://", endpoint):
    raise ValueError(
      f"LLM perturber endpoint {endpoint!r} is not an http(s) URL "
      "(e.g. http://localhost:8000/v1 or https://api.openai.com/v1)"
    )
  return endpoint if endpoint.endswith(_CHAT_PATH) else endpoint + _CHAT_PATH


def parse_reply(text: str, prompt: str) -> tuple[str, str] | None:
  """(perturbed prompt, relation changed) from the model's answer; None: no spatial relation.

  Tolerates a Markdown code fence and text around the JSON object, as chat models add them.

  Raises:
    LLMReplyError: no JSON object, a wrong type, or a perturbed prompt equal to `prompt`.
  """
  match = re.search(r"\{.*\}", text, re.DOTALL)
  if match is None:
    raise LLMReplyError(f"no JSON object in the reply {text[:200]!r}")
  try:
    obj = json.loads(match.group())
  except json.JSONDecodeError as e:
    raise LLMReplyError(f"malformed JSON in the reply ({e.msg}): {text[:200]!r}") from None
  if not isinstance(obj, dict) or "perturbed_prompt" not in obj:
    raise LLMReplyError(f"the reply has no 'perturbed_prompt' key: {text[:200]!r}")
  perturbed = obj["perturbed_prompt"]
  if perturbed is None:
    return None
  if not isinstance(perturbed, str) or not perturbed.strip():
    raise LLMReplyError(f"'perturbed_prompt' must be a non-empty string or null, got {perturbed!r}")
  perturbed = perturbed.strip()
  if perturbed == prompt.strip():
    raise LLMReplyError("the perturbed prompt equals the original")
  change = obj.get("relation_changed")
  return perturbed, change.strip() if isinstance(change, str) else ""


@dataclasses.dataclass
class LLMPerturber:
  """Calls a chat endpoint once per prompt: `perturber(prompt) -> (perturbed, change) | None`.

  Attributes:
    endpoint: the server's base URL (`.../v1`) or its chat-completions URL.
    model: the model name the server expects.
    api_key: sent as a Bearer token when not empty.
    timeout_s: seconds to wait for one answer.
    temperature: sampling temperature (0: as deterministic as the server allows).
    max_retries: retries of a timeout or a transient HTTP error (429, 5xx), with backoff.
  """

  endpoint: str
  model: str
  api_key: str = ""
  timeout_s: float = 60.0
  temperature: float = 0.0
  max_retries: int = 2

  def __post_init__(self):
    self.url = chat_url(self.endpoint)
    if not self.model:
      raise ValueError(f"LLM perturber for {self.url}: no model name (config.perturb.llm.model)")

  @classmethod
  def from_config(cls, llm: Any) -> LLMPerturber:
    """From a `config.perturb.llm` section; the API key is read from `llm.api_key_env`."""
    if not llm.endpoint:
      raise ValueError(
        "config.perturb.method='llm' needs config.perturb.llm.endpoint (an OpenAI-compatible "
        "base URL such as http://localhost:8000/v1)"
      )
    return cls(
      endpoint=llm.endpoint,
      model=llm.model,
      api_key=os.environ.get(llm.api_key_env, "") if llm.api_key_env else "",
      timeout_s=float(llm.timeout_s),
      temperature=float(llm.temperature),
      max_retries=int(llm.max_retries),
    )

  @property
  def name(self) -> str:
    """What is recorded as the perturber in each row's source."""
    return f"llm:{self.model}@{self.url}"

  def __call__(self, prompt: str) -> tuple[str, str] | None:
    """The perturbation of `prompt` (see `parse_reply`).

    Raises:
      LLMEndpointError: the endpoint is unreachable or keeps failing (the URL is named).
      LLMReplyError: the answer is not a usable perturbation (this prompt only).
    """
    reply = self._post(
      dict(
        model=self.model,
        temperature=self.temperature,
        messages=[
          dict(role="system", content=INSTRUCTION),
          dict(role="user", content=prompt),
        ],
      )
    )
    try:
      text = reply["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
      raise LLMReplyError(
        f"{self.url} answered without choices[0].message.content: {str(reply)[:200]}"
      ) from None
    return parse_reply(text or "", prompt)

  def _post(self, body: dict[str, Any]) -> dict[str, Any]:
    headers = {"Content-Type": "application/json"}
    if self.api_key:
      headers["Authorization"] = f"Bearer {self.api_key}"
    data = json.dumps(body).encode()
    for attempt in range(self.max_retries + 1):
      request = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
      try:
        with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
          return json.loads(response.read().decode("utf-8"))
      except urllib.error.HTTPError as e:  # Before URLError: it is a subclass.
        detail = e.read().decode("utf-8", "replace")[:300]
        error = LLMEndpointError(
          f"LLM perturber endpoint {self.url} answered HTTP {e.code}: {detail}"
        )
        transient = e.code in _RETRY_HTTP_CODES
      except (TimeoutError, urllib.error.URLError, ConnectionError) as e:
        reason = getattr(e, "reason", e)
        error = LLMEndpointError(
          f"LLM perturber endpoint {self.url} is unreachable ({reason}); start the server, fix "
          "config.perturb.llm.endpoint, or use config.perturb.method='rules'"
        )
        # A refused connection is no server at all; a timeout may be a busy one.
        transient = isinstance(reason, TimeoutError)
      except json.JSONDecodeError as e:
        raise LLMEndpointError(
          f"LLM perturber endpoint {self.url} answered non-JSON ({e.msg}): is it an "
          "OpenAI-compatible chat-completions endpoint?"
        ) from None
      if not transient or attempt == self.max_retries:
        raise error from None
      time.sleep(min(2.0**attempt, 30.0))
    raise AssertionError("unreachable")
