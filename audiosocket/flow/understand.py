"""
Understanding what callers say, behind one interface: L{INLU}.

  - L{RulesNLU}: the offline rules of L{audiosocket.flow.nlu}, the default and the fallback;
  - L{LlmNLU}: any OpenAI-compatible chat-completions API reads the visitor's sentence into
    the four facts, as JSON, validated before use.

An LLM is an aid, never a dependency: any failure (timeout, HTTP error, invalid or
ill-typed JSON) is logged and the rules' answer is used, so no call dies of it.

The resident's decision stays with the rules in both (L{INLU.decide} never asks a model):
the rules authorise only on a plain yes (L{audiosocket.flow.nlu.classify_decision}), and
authorising entry is the one answer that must not be guessed. Should a model ever be
consulted about a decision, it may only turn the rules' "yes" into "ask again" — never
produce a yes the rules did not give, never turn "ask again" into a yes.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from zope.interface import Interface, implementer

from audiosocket.flow.directory import Directory, normalize, normalize_number
from audiosocket.flow.nlu import (
    ENTREGA,
    INTENTS,
    SERVICO,
    VISITA,
    Facts,
    classify_decision,
    extract_facts,
)
from audiosocket.speech.stt import OpenAICompatible, ProviderError, parse_json

__all__ = ["INLU", "LlmError", "LlmNLU", "RulesNLU", "make_nlu"]


class INLU(Interface):
    """Reads facts from the visitor's words and the decision from the resident's."""

    def extract(text: str, directory: Directory | None) -> Deferred:
        """
        @return: a Deferred firing with the L{Facts} in C{text}; resident names are matched
            to C{directory} (spelled as it spells them) when it is given. Never fails for
            what the caller said.
        """

    def decide(text: str) -> Deferred:
        """
        @return: a Deferred firing with the resident's L{Decision}. Never fails, and never
            fires L{Decision.AUTHORIZED} where the rules'
            L{audiosocket.flow.nlu.classify_decision} does not.
        """


@implementer(INLU)
class RulesNLU:
    """The rules of L{audiosocket.flow.nlu}: offline, instant, deterministic."""

    name = "rules"

    def extract(self, text: str, directory: Directory | None = None) -> Deferred:
        return succeed(extract_facts(text or "", directory))

    def decide(self, text: str) -> Deferred:
        return succeed(classify_decision(text or ""))


class LlmError(ProviderError):
    """The language model did not give a usable answer; C{reason} as for L{ProviderError}."""


SYSTEM_PROMPT = """\
Você é a portaria virtual de um condomínio no Brasil. Leia o que o visitante disse na \
portaria (transcrição de voz, pode ter erros) e responda SOMENTE com um objeto JSON com \
exatamente estas chaves:
"intent": "visita", "entrega" ou "servico" (o motivo da visita), ou null se não foi dito;
"visitor_name": o nome de quem está na portaria, ou null;
"apartment": o número do apartamento, só com dígitos (ex.: "501"; "quinhentos e um" é \
"501"), ou null;
"resident": o nome do morador que o visitante procura, ou null.
Não invente: o que não foi dito é null. Não confunda o nome do visitante com o do morador.\
"""

#: Accent-folded spellings an LLM may use for each intent.
_INTENT_ALIASES = {
    "visita": VISITA,
    "visit": VISITA,
    "entrega": ENTREGA,
    "delivery": ENTREGA,
    "servico": SERVICO,
    "service": SERVICO,
}
_MAX_NAME = 80


def _optional_text(answer: dict, key: str) -> str | None:
    value = answer.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise LlmError("bad_response", f'"{key}" must be a string or null, not {type(value).__name__}')
    value = " ".join(value.split())
    if not value or normalize(value) in ("null", "none", "nenhum", "desconhecido"):
        return None
    if len(value) > _MAX_NAME:
        raise LlmError("bad_response", f'"{key}" is longer than {_MAX_NAME} characters')
    return value


def facts_from_answer(answer: Any, directory: Directory | None) -> Facts:
    """
    Validate the model's JSON object into L{Facts}; raise L{LlmError} when it is not one (its
    message, which is logged, never quotes the values: they are the visitor's words).

    The intent must be one of L{INTENTS} (accents and case aside); the apartment must be an
    apartment number; the resident is re-matched to C{directory} with its fuzzy matcher (in
    the apartment named, then anywhere), kept as said when nobody matches.
    """
    if not isinstance(answer, dict):
        raise LlmError("bad_response", f"expected a JSON object, not {type(answer).__name__}")
    intent = _optional_text(answer, "intent")
    if intent is not None:
        folded = normalize(intent)
        if folded not in _INTENT_ALIASES:
            raise LlmError("bad_response", f'"intent" must be one of {INTENTS}')
        intent = _INTENT_ALIASES[folded]
    apartment = answer.get("apartment")
    if isinstance(apartment, int) and not isinstance(apartment, bool):
        apartment = str(apartment)
    apartment = _optional_text({"apartment": apartment}, "apartment")
    if apartment is not None:
        number = normalize_number(apartment)
        if number is None:
            raise LlmError("bad_response", '"apartment" is not an apartment number')
        apartment = number
    resident = _optional_text(answer, "resident")
    if resident is not None and directory is not None:
        match = None
        if apartment is not None and directory.apartment(apartment) is not None:
            match = directory.find_resident(resident, apartment=apartment)
        if match is None:
            match = directory.find_resident(resident)
        if match is not None:
            resident = match.resident
    return Facts(
        intent=intent,
        visitor_name=_optional_text(answer, "visitor_name"),
        apartment=apartment,
        resident_name=resident,
    )


@implementer(INLU)
class LlmNLU(OpenAICompatible):
    """
    Facts read by any OpenAI-compatible C{POST {url}/chat/completions} (JSON mode), with
    L{RulesNLU} (or C{fallback}) answering whenever the model cannot, and for decisions.

    The block/tower, which the prompt does not ask for, comes from the rules.

    Counters: C{answered} (facts from the model), C{fell_back} (facts from the fallback).
    """

    log = Logger()
    error = LlmError
    path = "/chat/completions"

    def __init__(
        self,
        url: str,
        *,
        model: str,
        api_key: str | None = None,
        timeout_s: float = 5.0,
        http=None,
        reactor=None,
        fallback: INLU | None = None,
    ):
        if not url:
            raise ValueError("LlmNLU needs the API's base URL")
        if not model:
            raise ValueError("LlmNLU needs a model name")
        super().__init__(
            url, model=model, api_key=api_key, timeout_s=timeout_s, http=http, reactor=reactor
        )
        self._fallback = fallback if fallback is not None else RulesNLU()
        self.name = f"llm:{model}"
        self.answered = 0
        self.fell_back = 0

    def extract(self, text: str, directory: Directory | None = None) -> Deferred:
        return Deferred.fromCoroutine(self._extract(text or "", directory))

    def decide(self, text: str) -> Deferred:
        # The rules alone: the model is not asked whether a stranger may come in.
        return self._fallback.decide(text)

    async def _extract(self, text: str, directory: Directory | None) -> Facts:
        rules = await self._fallback.extract(text, directory)
        if not text.strip():
            return rules
        try:
            facts = await self._ask(text, directory)
        except Exception as e:
            self.fell_back += 1
            self.log.warn(
                "LLM understanding failed ({error}); using the rules' facts",
                error=str(e) or type(e).__name__,
            )
            return rules
        self.answered += 1
        return Facts(
            intent=facts.intent,
            visitor_name=facts.visitor_name,
            apartment=facts.apartment,
            resident_name=facts.resident_name,
            block=rules.block,
        )

    async def _ask(self, text: str, directory: Directory | None) -> Facts:
        body = json.dumps(
            {
                "model": self._model,
                "messages": [
                    {"role": "system", "content": SYSTEM_PROMPT},
                    {"role": "user", "content": text},
                ],
                "response_format": {"type": "json_object"},
                "temperature": 0,
            },
            ensure_ascii=False,
        ).encode("utf-8")
        content = await self._post(self._headers("application/json", "application/json"), body)
        completion = parse_json(content, LlmError, self._url)
        try:
            message = completion["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise LlmError("bad_response", "no choices[0].message.content in the answer") from None
        if not isinstance(message, str):
            raise LlmError("bad_response", "choices[0].message.content is not a string")
        answer = parse_json(message.encode("utf-8"), LlmError, "the model")
        return facts_from_answer(answer, directory)


def make_nlu(speech_config, secret, *, reactor=None, http=None) -> INLU:
    """
    The NLU C{speech_config.nlu} names: L{RulesNLU}, or L{LlmNLU} from C{speech_config.llm}
    with its key read through C{secret(env_name)}.
    """
    if speech_config.nlu == "rules":
        return RulesNLU()
    if speech_config.nlu == "llm":
        llm = speech_config.llm
        return LlmNLU(
            llm.url,
            model=llm.model,
            api_key=secret(llm.api_key_env) if llm.api_key_env else None,
            timeout_s=llm.timeout_s,
            http=http,
            reactor=reactor,
        )
    raise ValueError(f"unknown speech.nlu {speech_config.nlu!r}")
