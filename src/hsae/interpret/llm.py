"""A chat client for any OpenAI-compatible endpoint (OpenAI, vLLM, llama.cpp, Ollama, ...), through the
`openai` package. Nothing here runs unless a command is asked to use an LLM.

Endpoint, model and key come from options or the environment (HSAE_LLM_BASE_URL / OPENAI_BASE_URL,
HSAE_LLM_MODEL, HSAE_LLM_API_KEY / OPENAI_API_KEY). The key is never written anywhere: `record()`
(what labels and scores files keep) leaves it out, the config's repr hides it, and error messages
have it masked.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from hsae.errors import HsaeError

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class LLMConfig:
    base_url: str
    model: str
    api_key: str = field(default="", repr=False)
    timeout: float = 120.0
    max_tokens: int = 400
    temperature: float = 0.0
    concurrency: int = 4

    @classmethod
    def from_options(
        cls, base_url: str | None = None, model: str | None = None, api_key: str | None = None, **rest: Any
    ) -> LLMConfig:
        env = os.environ
        base_url = base_url or env.get("HSAE_LLM_BASE_URL") or env.get("OPENAI_BASE_URL")
        model = model or env.get("HSAE_LLM_MODEL")
        api_key = api_key or env.get("HSAE_LLM_API_KEY") or env.get("OPENAI_API_KEY") or "unused"
        if not base_url:
            raise HsaeError("the LLM needs an endpoint: pass --llm-base-url URL (or set HSAE_LLM_BASE_URL)")
        if not model:
            raise HsaeError("the LLM needs a model name: pass --llm-model NAME (or set HSAE_LLM_MODEL)")
        config = cls(base_url, model, api_key, **rest)
        if config.concurrency <= 0 or config.max_tokens <= 0 or config.timeout <= 0:
            raise HsaeError("the LLM's concurrency, max tokens and timeout must be positive")
        return config

    def record(self) -> dict[str, Any]:
        """What a results file keeps about the LLM (never the key)."""
        return {"base_url": self.base_url, "model": self.model, "temperature": self.temperature}


class LLMClient:
    def __init__(self, config: LLMConfig):
        from openai import OpenAI

        self.config = config
        self.client = OpenAI(base_url=config.base_url, api_key=config.api_key, timeout=config.timeout, max_retries=2)

    def _masked(self, text: str) -> str:
        key = self.config.api_key
        return text.replace(key, "***") if key and key != "unused" else text

    def chat(self, system: str, user: str) -> str:
        import openai

        try:
            response = self.client.chat.completions.create(
                model=self.config.model,
                messages=[{"role": "system", "content": system}, {"role": "user", "content": user}],
                temperature=self.config.temperature,
                max_tokens=self.config.max_tokens,
            )
        except openai.APIError as err:
            raise HsaeError(
                f"the LLM endpoint {self.config.base_url} failed ({type(err).__name__}: "
                f"{self._masked(str(err))[:300]}): check --llm-base-url, --llm-model and the key"
            ) from None
        if not response.choices:
            return ""
        return response.choices[0].message.content or ""

    def map(self, work: Callable[[T], R], items: Iterable[T]) -> Iterable[R]:
        """work(item) for every item, `concurrency` requests at a time, results in order."""
        with ThreadPoolExecutor(self.config.concurrency) as pool:
            yield from pool.map(work, items)
