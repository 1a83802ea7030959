"""
What the doorman says, in pt-BR, by name.

Every text can be replaced in the config (C{[flow.prompts]}, same names). Texts are Python
format strings; the fields each one may use are listed beside it and filled by L{Prompts.say}.
Fixed texts (no fields) are synthesized once at start-up so the first call does not wait.

Nothing a caller typed or said is read back to them: an apartment number in a prompt is always
the directory's (C{confirm_apartment}, C{calling}, C{no_answer}), and so is a resident's name
(C{confirm_resident}: "É para Fernanda Souza, do 201?", the directory's spelling of the
likeliest match, never the words heard); "não encontrei" names no number. The only caller data spoken at all is the visitor's name, to the resident
(C{announce}, C{who_detail}), and only a name of at most L{MAX_NAME_CHARS}.
"""

from __future__ import annotations

import string
from typing import Mapping

from audiosocket.flow.nlu import ENTREGA, SERVICO, VISITA

#: name → default text. Fields in braces are filled in by the flow.
DEFAULTS: dict[str, str] = {
    # Visitor side.
    "greeting": "{greeting}",
    "keypad_hint": "Você também pode digitar o número do apartamento e teclar jogo da velha.",
    "ask_apartment": "Para qual apartamento? Diga o número ou digite e tecle jogo da velha.",
    "ask_apartment_keypad": "Por favor, digite o número do apartamento e tecle jogo da velha.",
    "ask_name": "Qual é o seu nome, por favor?",
    "ask_intent": "É uma visita, uma entrega ou um serviço?",
    # Both missing: one question, not two.
    "ask_name_intent": "Qual é o seu nome? É visita, entrega ou serviço?",
    "confirm_apartment": "Apartamento {apartment}, correto? Diga sim ou tecle 1; não, tecle 2.",
    # {resident} and {apartment} are the directory's, never what the visitor said.
    "confirm_resident": "É para {resident}, do {apartment}? Diga sim ou tecle 1; não, tecle 2.",
    # No field: what the visitor typed or said is never read back.
    "unknown_apartment": "Não encontrei esse apartamento.",
    "unknown_apartment_final": "Não encontrei esse apartamento. Por favor, procure a portaria. Até logo.",
    "not_understood": "Desculpe, não entendi.",
    "use_keypad": "Não consegui ouvir bem. Por favor, use o teclado.",
    "calling": "Aguarde, estou chamando o morador do apartamento {apartment}.",
    "still_calling": "Continue na linha, por favor. Ainda estou chamando.",
    "calling_next": "Aguarde, estou chamando outro morador.",
    "transferring": "Vou transferir para a portaria. Aguarde, por favor.",
    "transfer_failed": "Não consegui transferir para a portaria. Por favor, tente mais tarde. Até logo.",
    "no_answer": "O morador do apartamento {apartment} não atendeu. Por favor, tente mais tarde. Até logo.",
    "authorized": "Entrada autorizada. Pode entrar.",
    "denied": "Desculpe, o morador não autorizou a entrada.",
    "no_decision": "Não foi possível obter a resposta do morador. Por favor, tente mais tarde.",
    "busy": "Todas as linhas estão ocupadas. Por favor, tente novamente em instantes.",
    "goodbye": "Até logo.",
    "max_call": "O tempo da ligação terminou. Até logo.",
    # Pre-authorisation codes (offered in the greeting when the gate takes them).
    "code_hint": "Se tiver um código de acesso, digite asterisco, o código e jogo da velha.",
    "code_welcome": "Bem-vindo, {visitor}. Pode entrar.",
    "code_welcome_unnamed": "Código aceito. Pode entrar.",
    # No field: the code typed is never read back.
    "code_invalid": "Código inválido. Digite asterisco e o código de novo, ou o número do apartamento.",
    "code_no_more": "Código inválido. Por favor, digite o número do apartamento e tecle jogo da velha.",
    "code_locked": "A entrada por código está bloqueada no momento. Por favor, digite o número do apartamento.",
    "code_unavailable": "Não consegui verificar o código agora. Por favor, digite o número do apartamento.",
    # The gate (an http relay) did not open.
    "gate_failed": "Não consegui abrir o portão. Por favor, procure a portaria. Até logo.",
    "gate_failed_operator": "Não consegui abrir o portão. Vou chamar a portaria. Aguarde, por favor.",
    "hangup": "A ligação será encerrada. Até logo.",
    # Resident side.
    "announce": "Olá, morador do apartamento {apartment}! {visitor} está na portaria{purpose}.",
    "announce_unknown": "Olá, morador do apartamento {apartment}! Há um visitante na portaria{purpose}.",
    "ask_decision": "Você autoriza a entrada? Diga sim ou não, ou tecle 1 para autorizar e 2 para negar.",
    "ask_decision_keypad": "Tecle 1 para autorizar ou 2 para negar.",
    "decision_again": "Não entendi. Tecle 1 para autorizar ou 2 para negar.",
    "who_detail": "O visitante é {visitor}{purpose}, procurando {resident}.",
    "visitor_left": "O visitante desligou. Até logo.",
    "resident_authorized": "Obrigado. A entrada foi autorizada. Até logo.",
    "resident_denied": "Obrigado. A entrada não foi autorizada. Até logo.",
    "resident_no_decision": "Não recebi a sua resposta. A entrada não foi autorizada. Até logo.",
    # A parallel dial answered after another resident did (never joined to the call).
    "late_answer": "Outro morador já atendeu. Obrigado.",
}

#: A visitor's name longer than this is not spoken (no real name is; a transcript may be).
MAX_NAME_CHARS = 60

#: How the announcement names the purpose of the visit.
PURPOSE = {
    VISITA: " para uma visita",
    ENTREGA: " para uma entrega",
    SERVICO: " para um serviço",
}


def fields_of(text: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(text) if name}


def check_overrides(overrides: Mapping[str, str]) -> None:
    """
    @raise ValueError: naming the first override that is not a known prompt, or that uses a
        field its default does not offer (a typo would otherwise fail mid-call).
    """
    for name, text in overrides.items():
        if name not in DEFAULTS:
            raise ValueError(f"unknown prompt {name!r}")
        extra = fields_of(text) - fields_of(DEFAULTS[name])
        if extra:
            allowed = ", ".join(sorted(fields_of(DEFAULTS[name]))) or "none"
            raise ValueError(
                f"prompt {name!r} uses unknown field {sorted(extra)[0]!r} (allowed: {allowed})"
            )


class Prompts:
    """The defaults with a condominium's overrides."""

    def __init__(self, overrides: Mapping[str, str] | None = None):
        self._texts = dict(DEFAULTS)
        self._texts.update(overrides or {})

    def say(self, name: str, **values: str) -> str:
        text = self._texts[name]
        if not values and not fields_of(text):
            return text
        return text.format(**values)

    def fixed(self) -> list[str]:
        """The texts that need no field: synthesized ahead of the first call."""
        return [t for t in self._texts.values() if not fields_of(t)]


def greeting(prompts: Prompts, site_greeting: str, codes: bool = False) -> str:
    """
    What a visitor hears first: the condominium's greeting and the keypad offer, and with
    C{codes} the pre-authorisation code path.
    """
    text = prompts.say("greeting", greeting=site_greeting) + " " + prompts.say("keypad_hint")
    return text + " " + prompts.say("code_hint") if codes else text


def announcement(prompts: Prompts, apartment: str, visitor: str | None, intent: str | None) -> str:
    """'Olá, morador do apartamento 501! Pedro da Silva está na portaria para uma entrega.'"""
    purpose = PURPOSE.get(intent or "", "")
    if visitor and len(visitor) <= MAX_NAME_CHARS:
        return prompts.say("announce", apartment=apartment, visitor=visitor, purpose=purpose)
    return prompts.say("announce_unknown", apartment=apartment, purpose=purpose)
