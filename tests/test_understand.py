"""
Tests for L{audiosocket.flow.understand}: the rules NLU behind L{INLU}, and the LLM NLU
against a real local OpenAI-compatible chat-completions server (L{httpkit.FakeAPI}),
falling back to the rules on every kind of failure.
"""

from __future__ import annotations

import json
from pathlib import Path

import attrs
import pytest
import pytest_twisted
from twisted.internet import reactor
from zope.interface.verify import verifyObject

from audiosocket.config import SpeechConfig
from audiosocket.flow.directory import Directory
from audiosocket.flow.nlu import Decision, Facts, classify_decision, extract_facts
from audiosocket.flow.understand import (
    INLU,
    LlmError,
    LlmNLU,
    RulesNLU,
    facts_from_answer,
    make_nlu,
)
# The api fixture imported here is, as pytest means it, redefined by every test taking it.
# ruff: noqa: F811
from httpkit import (  # noqa: F401 (api is a fixture)
    HANG,
    FakeAPI,
    api,
    on_its_own,
    within,
)

DIRECTORY = Directory.from_data(
    [
        {"apartment_number": "501", "residents": ["Thaís Oliveira"], "voip_number": "SIP/501"},
        {"apartment_number": "102", "residents": ["José Carlos Souza"], "voip_number": "SIP/102"},
    ]
)
SAID = "Sou o Pedro da Silva, entrega para a Thais do 501"
#: Replies that are not a plain yes, from the project's decision table.
NOT_YES = [
    text
    for category in ("must_not_authorize", "may_ask_again", "who")
    for text in json.loads(
        (Path(__file__).parent / "data" / "resident_decisions.json").read_text("utf-8")
    )[category]
]


def completion(content) -> dict:
    if not isinstance(content, str):
        content = json.dumps(content)
    return {"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]}


def llm(api: FakeAPI, **kwargs) -> LlmNLU:
    options = dict(model="gpt-4o-mini", api_key="sk-l", timeout_s=5, http=api.http)
    options.update(kwargs)
    return LlmNLU(api.url + "/v1", reactor=reactor, **options)


# --- rules -----------------------------------------------------------------------------------


def test_rules_provides_inlu():
    """RulesNLU implements INLU."""
    assert verifyObject(INLU, RulesNLU())


def test_rules_extract_is_extract_facts():
    """RulesNLU.extract fires with exactly what extract_facts finds."""
    d = RulesNLU().extract(SAID, DIRECTORY)
    assert d.result == extract_facts(SAID, DIRECTORY)


def test_rules_decide_is_negation_aware():
    """RulesNLU.decide uses the rules: "não, assim não" refuses."""
    assert RulesNLU().decide("não, assim não").result is Decision.DENIED


def test_rules_decide_is_classify_decision():
    """RulesNLU.decide is the rules' answer for every reply, so it authorizes only plain yeses."""
    for text in NOT_YES + ["sim", "Pode subir", "Libera"]:
        assert RulesNLU().decide(text).result is classify_decision(text)


# --- LLM -------------------------------------------------------------------------------------


def test_llm_provides_inlu():
    """LlmNLU implements INLU."""
    assert verifyObject(INLU, LlmNLU("http://127.0.0.1:1/v1", model="m", http=object()))


@pytest_twisted.ensureDeferred
async def test_llm_request(api):
    """
    A POST to {url}/chat/completions with the Bearer key, the model, JSON mode, a pt-BR
    system prompt naming the four keys and the visitor's words as the user message.
    """
    api.answer(body=completion({"intent": "entrega"}))
    await within(llm(api).extract(SAID, DIRECTORY))
    (seen,) = api.seen
    assert seen.path == "/v1/chat/completions"
    assert seen.headers["authorization"] == "Bearer sk-l"
    body = seen.json()
    assert body["model"] == "gpt-4o-mini"
    assert body["response_format"] == {"type": "json_object"}
    system, user = body["messages"]
    assert system["role"] == "system"
    for key in ("intent", "visitor_name", "apartment", "resident", "portaria"):
        assert key in system["content"]
    assert user == {"role": "user", "content": SAID}


@pytest_twisted.ensureDeferred
async def test_llm_good_json_gives_facts(api):
    """A valid answer becomes the facts, the resident spelled as the directory spells it."""
    api.answer(
        body=completion(
            {"intent": "entrega", "visitor_name": "Pedro da Silva", "apartment": "501",
             "resident": "thais"}
        )  # fmt: skip
    )
    nlu = llm(api)
    facts = await within(nlu.extract("qualquer coisa", DIRECTORY))
    assert facts == Facts(
        intent="entrega",
        visitor_name="Pedro da Silva",
        apartment="501",
        resident_name="Thaís Oliveira",
    )
    assert (nlu.answered, nlu.fell_back) == (1, 0)


@pytest_twisted.ensureDeferred
async def test_llm_nulls_stay_unknown(api):
    """Keys the model leaves null (or out) are unknown facts, not the rules' guesses."""
    api.answer(body=completion({"intent": "visita", "visitor_name": None}))
    facts = await within(llm(api).extract("é uma visita", DIRECTORY))
    assert facts == Facts(intent="visita")


@pytest_twisted.ensureDeferred
async def test_llm_garbage_json_falls_back_to_rules(api):
    """Message content that is not JSON gives the rules' facts."""
    api.answer(body=completion("Claro! O visitante é Pedro."))
    nlu = llm(api)
    facts = await within(nlu.extract(SAID, DIRECTORY))
    assert facts == extract_facts(SAID, DIRECTORY)
    assert (nlu.answered, nlu.fell_back) == (0, 1)


@pytest_twisted.ensureDeferred
async def test_llm_invalid_body_falls_back_to_rules(api):
    """An HTTP body that is not JSON at all gives the rules' facts."""
    api.answer(body=b"<html>bad gateway</html>", content_type="text/html")
    assert await within(llm(api).extract(SAID, DIRECTORY)) == extract_facts(SAID, DIRECTORY)


@pytest_twisted.ensureDeferred
async def test_llm_invalid_intent_falls_back_to_rules(api):
    """An intent outside visita/entrega/servico gives the rules' facts."""
    api.answer(body=completion({"intent": "assalto", "visitor_name": "X"}))
    assert await within(llm(api).extract(SAID, DIRECTORY)) == extract_facts(SAID, DIRECTORY)


@pytest.mark.parametrize("code", [401, 500])
@pytest_twisted.ensureDeferred
async def test_llm_http_error_falls_back_to_rules(api, code):
    """An HTTP error status gives the rules' facts."""
    api.answer(code, {"error": "x"})
    assert await within(llm(api).extract(SAID, DIRECTORY)) == extract_facts(SAID, DIRECTORY)


@pytest_twisted.ensureDeferred
async def test_llm_timeout_falls_back_to_rules(api):
    """A server that never answers gives the rules' facts after timeout_s, request dropped."""
    api.reply = HANG
    facts = await on_its_own(llm(api, timeout_s=0.3).extract(SAID, DIRECTORY))
    assert facts == extract_facts(SAID, DIRECTORY)
    await within(api.abandoned[0])


@pytest_twisted.ensureDeferred
async def test_llm_block_comes_from_rules(api):
    """The block, which the model is not asked for, comes from the rules."""
    api.answer(body=completion({"apartment": "501"}))
    facts = await within(llm(api).extract("apartamento 501 bloco B", DIRECTORY))
    assert (facts.apartment, facts.block) == ("501", "B")


@pytest_twisted.ensureDeferred
async def test_llm_decide_stays_rule_based(api):
    """Decisions never ask the model: "não, assim não" refuses with no request sent."""
    assert await within(llm(api).decide("não, assim não")) is Decision.DENIED
    assert api.seen == []


@pytest_twisted.ensureDeferred
async def test_llm_never_makes_a_yes(api):
    """
    However the model would answer (here: a "yes" for anything), LlmNLU.decide is the rules'
    answer, asked of nobody: no reply the rules do not authorize comes back authorized.
    """
    api.answer(body=completion({"decision": "authorized", "intent": "visita"}))
    nlu = llm(api)
    for text in NOT_YES:
        assert await within(nlu.decide(text)) is classify_decision(text)
        assert await within(nlu.decide(text)) is not Decision.AUTHORIZED
    assert await within(nlu.decide("Pode subir")) is Decision.AUTHORIZED
    assert api.seen == []


@pytest_twisted.ensureDeferred
async def test_llm_blank_text_sends_nothing(api):
    """Blank text is the rules' empty facts, with no request."""
    assert await within(llm(api).extract("  ", DIRECTORY)) == Facts()
    assert api.seen == []


# --- validation ------------------------------------------------------------------------------


def test_answer_accents_and_numbers_normalised():
    """ "Serviço" is servico, an integer apartment is its digits."""
    facts = facts_from_answer({"intent": "Serviço", "apartment": 102}, DIRECTORY)
    assert (facts.intent, facts.apartment) == ("servico", "102")


def test_answer_unknown_resident_kept_as_said():
    """A resident nobody in the directory matches is kept as the model said it."""
    facts = facts_from_answer({"resident": "Marcos Pontes"}, DIRECTORY)
    assert facts.resident_name == "Marcos Pontes"


@pytest.mark.parametrize(
    "answer, what",
    [
        (["not", "an", "object"], "JSON object"),
        ({"visitor_name": 42}, "visitor_name"),
        ({"apartment": "o do fundo"}, "apartment"),
        ({"resident": "x" * 200}, "resident"),
    ],
)
def test_answer_invalid_is_named(answer, what):
    """An unusable answer raises LlmError (bad_response) naming what was wrong."""
    with pytest.raises(LlmError, match=what) as info:
        facts_from_answer(answer, DIRECTORY)
    assert info.value.reason == "bad_response"


# --- make_nlu --------------------------------------------------------------------------------


def test_make_nlu_rules():
    """nlu = "rules" builds a RulesNLU."""
    assert isinstance(make_nlu(SpeechConfig(), lambda n: None), RulesNLU)


@pytest_twisted.ensureDeferred
async def test_make_nlu_llm(api):
    """nlu = "llm" builds an LlmNLU on the configured URL and model, key from secret()."""
    config = attrs.evolve(
        SpeechConfig(),
        nlu="llm",
        llm=attrs.evolve(
            SpeechConfig().llm, url=api.url + "/v1", model="llama3", api_key_env="LK"
        ),
    )
    nlu = make_nlu(config, {"LK": "sk-k"}.get, reactor=reactor, http=api.http)
    api.answer(body=completion({"intent": "visita"}))
    assert await within(nlu.extract("visita", DIRECTORY)) == Facts(intent="visita")
    assert api.seen[0].json()["model"] == "llama3"
    assert api.seen[0].headers["authorization"] == "Bearer sk-k"
