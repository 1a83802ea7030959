# -*- test-case-name: tests.test_flow,tests.test_flow_voice,tests.test_privacy,tests.test_decision_tcp -*-
"""
The doorman conversation, as coroutines over a L{Session}.

Visitor: greeting (with the keypad offer) → the facts (apartment by keypad, or by voice with
name, purpose and resident when speech recognition is on) → the directory → "aguarde" and
the dialer, with a wait message while the phone rings → the resident's decision → the
visitor is told → both legs say goodbye and get the hangup frame after it has played.

Resident: the announcement → 1/2 or "sim"/"não" → "quem é?" gets the detail → unclear is
asked again (bounded, then "no_decision") → silence past the timeout is a denial.

The resident's answer is read only after the question has finished playing: the announcement
and every question to the resident play whole (no key and no speech cuts them), and what the
resident said or typed meanwhile is discarded once the question has played. Someone picking
up says "Alô? Pode falar" over the announcement; that is not an answer to a question not yet
asked. Keys 1/2 after the question are the sure path; by voice only a plain yes authorises
(L{audiosocket.flow.nlu.classify_decision}).

Everything the flow waits for has a timeout, and every path ends in L{_finish}, which is the
only place legs are hung up.

Reaching a person
=================

A condominium's C{[condominiums.dial] strategy} says whom the call rings (L{Site.strategy}):
C{unit} the apartment's C{voip_number}; C{sequential} each distinct phone of the unit in turn,
the resident the visitor named first, C{ring_timeout_s} each (busy, no answer or a failure
moves on at once, and the visitor hears "chamando outro morador"); C{parallel} all of them at
once, each dial with its own fresh leg UUID. The first leg to join is announced and decides;
the dialer is told at once to cancel the others' dials (their phones stop ringing). A phone
of the same attempt answered in the race (after another joined, before its cancel took
effect) is admitted into the late path only (see L{audiosocket.session}): it hears "outro
morador já atendeu" (C{late_answer}) and the hangup frame, nothing else, and its keys go
nowhere; the record lists its dial as C{late}. The call record's C{reach} lists every
leg tried with its result (C{answered}, C{busy}, C{no_answer}, ..., C{cancelled}, C{late}) and who
decided (C{decided_by}).

With an operator (C{[condominiums.operator] dial}), the visitor is handed to a human when
they press 0 (alone, at any question or while it rings) or ask for a person ("quero falar
com o porteiro": L{audiosocket.flow.nlu.asks_for_person}), when recognition fails twice, and
as configured when nobody answered or the apartment is unknown: "vou transferir para a
portaria" plays while the dialer's C{handoff(uuid, "transfer", dial)} leaves the instruction
for the dialplan; once it is acknowledged (within L{HANDOFF_TIMEOUT_S}) the visitor's leg gets
its hangup frame and the PBX dials the operator. Outcome C{transferred}, the reason
(C{keypad_0}, C{asked}, C{recognition_failed}, C{no_answer}, C{unknown_apartment}) in the
record's C{reach.handoff}; a hand-off that fails or times out is told to the visitor
("não consegui transferir") and the outcome is C{transfer_failed}.
"""

from __future__ import annotations

import uuid as _uuid
import zoneinfo
from typing import Any, Callable

from attrs import frozen
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from audiosocket.config import AccessConfig, AudioConfig, FlowConfig, GateConfig, OperatorConfig, PrivacyConfig
from audiosocket.dialer import DialFailed, DialRequest
from audiosocket.gate import GateError, OpenRequest
from audiosocket.flow.directory import Directory, Match
from audiosocket.flow.io import LegGone, LegIO
from audiosocket.flow.nlu import (
    Decision,
    Facts,
    answer_name,
    asks_for_person,
    classify_decision,
    classify_dtmf,
    confirms,
)
from audiosocket.flow.prompts import MAX_NAME_CHARS, Prompts, announcement, greeting
from audiosocket.leg import Dtmf
from audiosocket import session as S

#: How long the visitor has to start answering a question before it is asked again.
ANSWER_TIMEOUT_S = 8.0
#: How long a new leg may take to send its first audio frame (which tells its sample rate).
FIRST_AUDIO_WAIT_S = 0.1
#: How long the PBX may take to acknowledge a hand-off (the visitor hears a goodbye after).
HANDOFF_TIMEOUT_S = 3.0
#: Utterances or entries not understood before the call goes to the operator (if any).
RECOGNITION_FAILURES = 2
#: A pre-authorisation code's length (typed as * + code + #).
CODE_DIGITS = 6


@frozen
class Site:
    """
    What a call needs of its condominium, read once at the call's start: a config reload
    builds new ones and swaps them whole, so the next call gets the new settings and a call
    in progress keeps its own.
    """

    id: int
    name: str
    greeting: str
    directory: Directory
    prompts: Prompts
    #: This condominium's listening settings ([audio] with its overrides).
    audio: AudioConfig = AudioConfig()
    #: Concurrent visitor calls allowed for this condominium (None: only the other limits).
    max_calls: int | None = None
    #: The conversation's timings and limits (C{[flow]}).
    flow: FlowConfig = FlowConfig()
    #: C{[condominiums.dial] strategy}: "unit", "sequential" or "parallel".
    strategy: str = "unit"
    #: C{[condominiums.operator]}: the human operator (C{dial} empty: none).
    operator: OperatorConfig = OperatorConfig()
    #: C{[condominiums.gate]}: what opens the gate (C{kind = "none"}: nothing).
    gate: GateConfig = GateConfig()
    #: The building's IANA time zone (pre-authorisation hours and weekdays).
    timezone: str = "America/Sao_Paulo"
    #: C{[access]}: tries of a code per call.
    access: AccessConfig = AccessConfig()

    @property
    def codes(self) -> bool:
        """Pre-authorisation codes are offered and accepted here (a gate that acts, codes on)."""
        return self.gate.kind != "none" and self.gate.codes


class _Transfer(Exception):
    """The call goes to the human operator, for C{reason}."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class _Preauthorized(Exception):
    """The visitor typed a valid pre-authorisation code."""

    def __init__(self, preauth):
        super().__init__(preauth.id)
        self.preauth = preauth


class DoormanFlow:
    """
    Runs the calls. One instance serves every session; per-call state lives in the session
    and in the coroutine's locals. Its attributes are the collaborators a call uses:

    @ivar tts: the L{ITTS} every prompt is spoken with.
    @ivar dialer: the L{IDialer} that rings the resident.
    @ivar sites: condominium id → L{Site} (looked up at the start of each call, so a
        reload applies to the next call and never changes one in progress).
    @ivar reactor: for every timeout of the conversation.
    @ivar stt: an L{ISTT}, or C{None} for keypad-only calls.
    @ivar nlu: extracts the visitor's facts from what was said (with C{stt}).
    @ivar listener_for: C{listener_for(leg, audio_config) -> Listener} when speech is on.
    @ivar match_threshold: the directory's fuzzy-match score a name must reach.
    @ivar privacy: whether transcripts may go to the log and the call record (by default
        neither: they say "voice" and how many words); read at a call's start, swapped whole
        on a reload.
    @ivar gate: the L{audiosocket.gate.GateOpener} that opens a condominium's gate once the
        visitor may enter (C{None}: no gate acts).
    @ivar preauths: the L{audiosocket.preauth.Preauths} that redeem codes (C{None}: no codes).
    @ivar code_guard: the L{audiosocket.preauth.CodeGuard} that locks an extension's code
        entry after repeated wrong codes.
    """

    log = Logger()

    def __init__(
        self,
        *,
        tts,
        dialer,
        sites: Callable[[int], Site],
        reactor,
        stt=None,
        nlu=None,
        listener_for: Callable[[Any], Any] | None = None,
        match_threshold: float = 80.0,
        privacy: PrivacyConfig = PrivacyConfig(),
        gate=None,
        preauths=None,
        code_guard=None,
    ):
        self.tts = tts
        self.dialer = dialer
        self.sites = sites
        self.reactor = reactor
        self.stt = stt
        self.nlu = nlu
        self.listener_for = listener_for if stt is not None else None
        self.match_threshold = match_threshold
        self.privacy = privacy
        self.gate = gate
        self.preauths = preauths
        self.code_guard = code_guard

    @property
    def voice(self) -> bool:
        return self.stt is not None

    def io_for(self, leg, site: Site) -> LegIO:
        """A started L{LegIO} for C{leg}, listening (when speech is on) with C{site}'s settings."""
        listener = self.listener_for(leg, site.audio) if self.listener_for is not None else None
        io = LegIO(leg, self.tts, reactor=self.reactor, listener=listener)
        io.start()
        return io

    # ------------------------------------------------------------ entry points

    def run(self, session: S.Session) -> defer.Deferred:
        return defer.Deferred.fromCoroutine(self._run(session))

    def run_busy(self, session: S.Session) -> defer.Deferred:
        return defer.Deferred.fromCoroutine(self._busy(session))

    async def _busy(self, session: S.Session) -> None:
        session.conclude("busy")
        session.enter(S.FINISHING)
        site = self.sites(session.extension.condominium_id)
        io = LegIO(session.visitor, self.tts, reactor=self.reactor)
        io.start()
        await io.finish(site.prompts.say("busy"))

    async def _run(self, session: S.Session) -> None:
        site = self.sites(session.extension.condominium_id)
        call = _Call(self, session, site)
        await call.run()


class _Call:
    """One call's conversation (its locals would not fit in one coroutine readably)."""

    log = Logger()

    def __init__(self, flow: DoormanFlow, session: S.Session, site: Site):
        self.flow = flow
        self.session = session
        self.site = site
        self.prompts = site.prompts
        #: This call's settings, fixed at its start (a reload changes the next call's).
        self.config = site.flow
        self.privacy = flow.privacy
        self.reactor = flow.reactor
        self.visitor = flow.io_for(session.visitor, site)
        self.resident: LegIO | None = None
        self.apartment = None  # the directory's Apartment once known
        self.keypad_only = not flow.voice
        #: The operator's dial string, or None when this condominium has none.
        self.operator = site.operator.dial or None
        #: Visitor utterances or entries not understood so far.
        self.unrecognized = 0
        #: The resident whose leg joined (the one who decides), once known.
        self.answered_by: str | None = None
        #: The late answers' mini-flows still running (awaited before the call is over).
        self.late: list[defer.Deferred] = []
        #: Every log event of this call carries its UUID and extension (structured logs).
        self.fields = {"uuid": str(session.uuid), "ext": session.extension.id}
        #: The resident's decision as the record keeps it ("dtmf:1", "voice"), once made.
        self.evidence: str | None = None
        #: Wrong pre-authorisation codes typed in this call.
        self.code_failures = 0
        #: The visitor has heard their last words already (no goodbye of ours follows).
        self.farewell_said = False
        #: Codes are read in this call (the condominium offers them, and a redeemer exists).
        self.codes = site.codes and flow.preauths is not None

    # ------------------------------------------------------------ the call

    async def run(self) -> None:
        session = self.session
        to_visitor: str | None = self.prompts.say("goodbye")
        to_resident: str | None = None
        closed = False
        try:
            try:
                outcome = await self._converse()
            except LegGone as e:
                if e.role == "visitor":
                    session.conclude("abandoned", by="visitor")
                    to_visitor = None
                    to_resident = self.prompts.say("visitor_left")
                    return
                raise
            session.conclude(outcome, by="server")
            to_visitor, to_resident = self._farewells(outcome)
        except defer.CancelledError:
            # Ended from outside: the call's time ran out, an operator, or shutdown
            # (L{S.Session.end} has said which).
            session.conclude(
                "no_decision" if session.resident is not None else "abandoned", by="operator"
            )
            text = self.prompts.say("max_call" if session.ended_by == "max_call" else "hangup")
            to_visitor = to_resident = text
        except GeneratorExit:
            # The coroutine is being closed unfinished: its Deferred was dropped without
            # firing (the process is exiting, or a test let a call go). Awaiting now would
            # make Python raise "coroutine ignored GeneratorExit"; the legs go with it.
            closed = True
            raise
        finally:
            session.enter(S.FINISHING)
            session.stop_expecting()
            session.stop_late()
            if not closed:
                await self._finish(to_visitor, to_resident)

    def _farewells(self, outcome: str) -> tuple[str | None, str | None]:
        """What each leg hears last, after the decision has been told."""
        p = self.prompts
        if outcome in ("transferred", "transfer_failed"):
            return None, None  # the visitor has heard it already; no resident
        if outcome == "preauthorized":
            return p.say("goodbye"), None
        resident = {
            "authorized": p.say("resident_authorized"),
            "denied": p.say("resident_denied"),
            "no_decision": p.say("resident_no_decision"),
        }.get(outcome, p.say("goodbye"))
        return (None if self.farewell_said else p.say("goodbye")), resident

    async def _finish(self, to_visitor: str | None, to_resident: str | None) -> None:
        legs = [self.visitor.finish(to_visitor)]
        if self.resident is not None:
            legs.append(self.resident.finish(to_resident))
        elif self.session.resident is not None:
            self.resident = self.flow.io_for(self.session.resident, self.site)
            legs.append(self.resident.finish(to_resident))
        await defer.gatherResults(
            [defer.Deferred.fromCoroutine(c) for c in legs] + self.late, consumeErrors=True
        )

    async def _converse(self) -> str:
        try:
            return await self._conversation()
        except _Transfer as t:
            return await self._transfer(t.reason)
        except _Preauthorized as p:
            return await self._preauthorized(p.preauth)

    async def _conversation(self) -> str:
        session = self.session
        await self._peer_rate(self.session.visitor)
        await self.visitor.say(
            self._greeting(), interruptible=True, barge_in=self.site.audio.barge_in_greeting
        )
        session.enter(S.COLLECTING)
        found = await self._find_apartment()
        if found is None:
            return "unknown_apartment"
        outcome = await self._call_resident()
        if outcome == "no_answer" and self._operator_on("on_no_answer"):
            raise _Transfer("no_answer")
        if outcome == "authorized":
            await self._admit(
                self.prompts.say("authorized"), "resident", who=self.answered_by, evidence=self.evidence
            )
        else:
            await self._tell_visitor(outcome)
        return outcome

    async def _peer_rate(self, leg) -> None:
        """
        Asterisk sends audio from the moment it connects; its kind tells the leg's sample
        rate. Wait for it (briefly: a peer that sends nothing still gets an 8 kHz greeting).
        """
        d = leg.when_audio()
        d.addTimeout(FIRST_AUDIO_WAIT_S, self.reactor)
        try:
            await d
        except defer.TimeoutError:
            pass

    def _greeting(self) -> str:
        return greeting(self.prompts, self.site.greeting, codes=self.codes)

    # ------------------------------------------------------------ the visitor's facts

    async def _find_apartment(self):
        """
        Gather the facts until the apartment is known and in the directory. The apartment is
        asked again up to C{max_retries} times; then the visitor is told and the call ends.

        A match the directory is not sure of is confirmed first: a near number ("Apartamento
        501, correto?") or a resident's name that is approximate or fits several apartments
        ("É para Fernanda Souza, do 201?" — the directory's name and number, never the words
        heard). A "no" to the resident asks for the apartment.

        @return: the directory's Apartment, or C{None}.
        """
        tries = 0
        asked = 0
        while True:
            facts = await self._gather(asked)
            asked += 1
            if facts is None:
                # Nothing said or typed in time.
                if asked > self.config.max_retries + 1:
                    return await self._not_found()
                await self._ask_missing()
                continue
            match = self._lookup(facts)
            rejected = False
            if match is not None and not match.exact:
                if not await self._confirm(match):
                    rejected = match.resident is not None
                    match = None
            if match is not None:
                self.apartment = match.apartment
                resident = match.resident or self._resident_for(match.apartment)
                self.session.learn(
                    Facts(
                        intent=facts.intent,
                        visitor_name=facts.visitor_name,
                        apartment=match.apartment.number,
                        resident_name=resident,
                        block=facts.block,
                    )
                )
                await self._complete_facts()
                return match.apartment
            tries += 1
            heard = facts.apartment or ""
            self.session.learn(Facts(intent=facts.intent, visitor_name=facts.visitor_name))
            if not heard and not rejected:
                self._unrecognized()
            if tries > self.config.max_retries:
                return await self._not_found()
            if rejected:
                pass  # "É para Fernanda, do 201?" "Não.": only the apartment is asked
            elif heard:
                # Never the number itself: what a caller typed or said is not read back.
                await self.visitor.say(self.prompts.say("unknown_apartment"), interruptible=True)
            else:
                await self.visitor.say(self.prompts.say("not_understood"), interruptible=True)
            await self._ask_missing()

    async def _gather(self, asked: int) -> Facts | None:
        """
        Read the visitor's next answer: keys (the apartment) or an utterance (any facts).
        Returns the facts known so far, merged, or C{None} when nothing came in time.
        """
        while True:
            item = await self.visitor.next_input(ANSWER_TIMEOUT_S)
            if item is None:
                return None
            if isinstance(item, Dtmf):
                if item.digit == "*" and self.codes:
                    # "*" first: a pre-authorisation code, up to "#".
                    await self._code_entry()
                    continue
                typed = await self.visitor.digits(
                    item.digit, self.config.dtmf_timeout_s, self.config.max_digits
                )
                if typed is None:
                    # Longer than any apartment number: an invalid entry ("não entendi").
                    self.log.info(
                        "call {uuid}: visitor typed more than {max_digits} digits",
                        **self.fields,
                        max_digits=self.config.max_digits,
                    )
                    known = self.session.facts
                    return Facts(intent=known.intent, visitor_name=known.visitor_name)
                if not typed:
                    return None
                if typed == "0" and self.operator:
                    raise _Transfer("keypad_0")
                return self.session.facts.merge(Facts(apartment=typed))
            _, facts = await self._understand(item)
            if facts is not None:
                merged = self.session.facts.merge(facts)
                self.session.learn(merged)
                if merged.apartment or merged.resident_name:
                    return merged
                self._unrecognized()
                await self._ask_missing()

    async def _understand(self, utterance) -> tuple[str | None, Facts | None]:
        """Transcribe and extract; a provider failure turns the call to the keypad."""
        text = await self._transcribe(utterance)
        if text is None or not text.strip():
            return text, None
        if self.privacy.log_speech:
            self.log.info("call {uuid}: visitor said {text!r}", **self.fields, text=text)
            self.session.heard(text)
        else:
            self.log.info(
                "call {uuid}: visitor said {words} word(s)", **self.fields, words=len(text.split())
            )
        if self.operator and asks_for_person(text):
            raise _Transfer("asked")
        try:
            return text, await self.flow.nlu.extract(text, self.site.directory)
        except defer.CancelledError:
            raise
        except Exception:
            self.log.failure("call {uuid}: understanding failed", **self.fields)
            return text, None

    async def _transcribe(self, utterance, offer_keypad: bool = True) -> str | None:
        """
        The text of an utterance, or C{None} when recognition failed; on the visitor's leg a
        failure also turns the rest of the call to the keypad (the resident is asked for keys
        by every prompt already).
        """
        try:
            return await self.flow.stt.transcribe(utterance.pcm, utterance.rate)
        except defer.CancelledError:
            raise
        except Exception as e:
            self.log.warn(
                "call {uuid}: speech recognition failed ({error})",
                **self.fields,
                error=str(e),
            )
            if offer_keypad and not self.keypad_only:
                self.keypad_only = True
                await self.visitor.say(self.prompts.say("use_keypad"))
            return None

    async def _ask_missing(self) -> None:
        self.visitor.flush()
        name = "ask_apartment_keypad" if self.keypad_only else "ask_apartment"
        await self.visitor.say(self.prompts.say(name), interruptible=True)

    async def _complete_facts(self) -> None:
        """
        By voice, ask for the visitor's name and purpose if they were not said — in one
        question when both are missing, and once: an answer that leaves a gap is not asked
        again (the announcement does without).
        """
        if self.keypad_only:
            return
        facts = self.session.facts
        missing = tuple(f for f in ("visitor_name", "intent") if getattr(facts, f) is None)
        if not missing:
            return
        prompt = {("visitor_name",): "ask_name", ("intent",): "ask_intent"}.get(
            missing, "ask_name_intent"
        )
        self.visitor.flush()
        await self.visitor.say(self.prompts.say(prompt))
        item = await self.visitor.next_input(ANSWER_TIMEOUT_S)
        self._keypad_0(item)
        if item is None or isinstance(item, Dtmf):
            return
        text, said = await self._understand(item)
        said = said or Facts()
        if "visitor_name" in missing and said.visitor_name is None and text:
            # "Pedro Santos." answers "qual é o seu nome?" without "sou o".
            said = Facts(intent=said.intent, visitor_name=answer_name(text))
        self.session.learn(
            self.session.facts.merge(Facts(intent=said.intent, visitor_name=said.visitor_name))
        )

    def _lookup(self, facts: Facts) -> Match | None:
        return lookup(self.site.directory, facts, self.flow.match_threshold)

    def _resident_for(self, apartment) -> str | None:
        # Nobody named: the apartment's first listed resident is its contact.
        return apartment.residents[0] if apartment.residents else None

    async def _confirm(self, match: Match) -> bool:
        """
        'Apartamento 101, correto?' or 'É para Fernanda Souza, do 201?' (the directory's
        number and name) — 1, or a plain "sim" / "isso" / "correto" with no "não" and no
        question in it, confirms; anything else does not.
        """
        self.visitor.flush()
        if match.resident is not None:
            text = self.prompts.say(
                "confirm_resident", resident=match.resident, apartment=match.apartment.number
            )
        else:
            text = self.prompts.say("confirm_apartment", apartment=match.apartment.number)
        await self.visitor.say(text, interruptible=True)
        item = await self.visitor.next_input(ANSWER_TIMEOUT_S)
        if item is None:
            return False
        self._keypad_0(item)
        if isinstance(item, Dtmf):
            return classify_dtmf(item.digit) is Decision.AUTHORIZED
        said = await self._transcribe(item)
        if said and self.operator and asks_for_person(said):
            raise _Transfer("asked")
        return said is not None and confirms(said)

    # ------------------------------------------------------------ pre-authorisation codes

    async def _code_entry(self) -> None:
        """
        The visitor pressed C{*}: read a code up to C{#} and redeem it. A valid one raises
        L{_Preauthorized}. A wrong one (or an extension whose code entry is locked) is told
        and counted; after C{[access] code_tries_per_call} the code path ends for this call
        (a C{*} is then an ordinary key). The code is never logged, spoken or recorded.
        """
        guard = self.flow.code_guard
        ext_id = self.session.extension.id
        # Read it whole first: its keys must not become an apartment number.
        code = await self.visitor.digits("", self.config.dtmf_timeout_s, CODE_DIGITS)
        if guard is not None and guard.locked(ext_id):
            self.log.warn(
                "call {uuid}: code entry is locked on extension {ext} (too many wrong codes)",
                **self.fields,
            )
            self.codes = False
            await self.visitor.say(self.prompts.say("code_locked"), interruptible=True)
            return
        try:
            preauth = None
            if code is not None and len(code) == CODE_DIGITS:
                preauth = await self.flow.preauths.redeem(
                    self.site.id, code, zoneinfo.ZoneInfo(self.site.timezone)
                )
        except defer.CancelledError:
            raise
        except Exception as e:
            self.log.warn(
                "call {uuid}: a code could not be checked ({error})", **self.fields, error=str(e)
            )
            await self.visitor.say(self.prompts.say("code_unavailable"), interruptible=True)
            return
        if preauth is not None:
            raise _Preauthorized(preauth)
        self.code_failures += 1
        if guard is not None:
            guard.failed(ext_id)
        self.log.info(
            "call {uuid}: wrong or expired code ({n} of {tries})",
            **self.fields,
            n=self.code_failures,
            tries=self.site.access.code_tries_per_call,
        )
        if self.code_failures >= self.site.access.code_tries_per_call:
            self.codes = False
            await self.visitor.say(self.prompts.say("code_no_more"), interruptible=True)
        else:
            await self.visitor.say(self.prompts.say("code_invalid"), interruptible=True)

    async def _preauthorized(self, preauth) -> str:
        """
        A valid code: "Bem-vindo, <nome>", the gate opens, and the resident is told (the
        dialer's C{notify}). Nobody is called.
        """
        session = self.session
        self.visitor.flush(keys=True)
        session.learn(
            Facts(apartment=preauth.apartment, visitor_name=preauth.visitor_name)
        )
        session.note_reach(preauth=preauth.id)
        session.conclude("preauthorized", by="server", evidence="code")
        self.log.info(
            "call {uuid}: pre-authorisation {id} for apartment {apartment} accepted",
            **self.fields,
            id=preauth.id,
            apartment=preauth.apartment,
        )
        name = preauth.visitor_name
        if name and len(name) <= MAX_NAME_CHARS:
            welcome = self.prompts.say("code_welcome", visitor=name)
        else:
            welcome = self.prompts.say("code_welcome_unnamed")
        self._notify(preauth)
        await self._admit(welcome, "preauth", who=preauth.id, evidence="code")
        return "preauthorized"

    def _notify(self, preauth) -> None:
        """Tell the resident a pre-authorised visitor came in (never waited for)."""
        event = {
            "uuid": str(self.session.uuid),
            "condominium_id": self.site.id,
            "apartment": preauth.apartment,
            "visitor_name": preauth.visitor_name,
            "preauth_id": preauth.id,
            "kind": "preauthorized",
        }
        d = defer.maybeDeferred(self.flow.dialer.notify, event)
        d.addErrback(
            lambda f: self.log.failure("call {uuid}: notifying the resident failed", f, **self.fields)
        )

    # ------------------------------------------------------------ the gate

    async def _admit(
        self, told: str, authorized_by: str, *, who: str | None, evidence: str | None
    ) -> None:
        """
        The visitor may enter: tell them (C{told}: "pode entrar"), then open the
        condominium's gate (nothing with C{kind = "none"}) — not if they hung up before it
        opened (audited as C{not_opened}). A C{dtmf} gate is a hand-off to the PBX: the
        visitor's goodbye and hangup frame follow, then the dialplan sends the digits. An
        C{http} relay that fails is told to the visitor, who goes to the operator when
        there is one. The record's C{gate} says what happened.
        """
        opener, gate = self.flow.gate, self.site.gate
        if opener is None or gate.kind == "none":
            await self.visitor.say(told)
            return
        session = self.session
        facts = session.facts
        request = OpenRequest(
            condominium_id=self.site.id,
            authorized_by=authorized_by,
            evidence=evidence or "",
            who=who,
            uuid=str(session.uuid),
            extension_id=session.extension.id,
            apartment=facts.apartment,
            visitor=facts.visitor_name,
        )

        def withhold():
            result = opener.withheld(gate, request, "the visitor hung up before it opened")
            session.note_gate(kind=gate.kind, **result.to_dict())

        try:
            await self.visitor.say(told)
        except LegGone:
            withhold()
            raise
        if session.visitor.closed:
            withhold()
            raise LegGone("visitor")
        try:
            result = await opener.open(gate, request)
        except GateError as e:
            self.log.warn("call {uuid}: gate not opened: {error}", **self.fields, error=str(e))
            return
        session.note_gate(kind=gate.kind, **result.to_dict())
        if result.ok:
            return
        self.farewell_said = True
        if self.operator:
            await self._transfer("gate_failed", prompt="gate_failed_operator")
        else:
            await self.visitor.say(self.prompts.say("gate_failed"))

    # ------------------------------------------------------------ calling the resident

    def _dial_request(self, leg_uuid: _uuid.UUID, resident: str | None, dial: str) -> DialRequest:
        session = self.session
        ext = session.extension
        return DialRequest(
            uuid=str(session.uuid),
            leg_uuid=str(leg_uuid),
            dial=dial,
            apartment=self.apartment.number,
            resident=resident or "",
            extension_id=ext.id,
            return_extension=ext.return_extension,
            audiosocket=session.return_address,
            timeout_s=float(self.config.ring_timeout_s),
        )

    def _targets(self) -> list[tuple[str | None, str]]:
        """C{(resident, dial string)} to ring, by the condominium's strategy."""
        named = self.session.facts.resident_name
        if self.site.strategy == "unit":
            return [(named, self.apartment.dial)]
        return self.apartment.targets(named)

    async def _call_resident(self) -> str:
        """Ring the resident(s) (with retries, by the strategy), then ask for the decision."""
        session = self.session
        session.enter(S.DIALING)
        strategy = self.site.strategy
        self._note(strategy=strategy)
        targets = self._targets()
        # The phone starts ringing while the visitor hears "aguarde": the resident's time to
        # answer is not added to the prompt's.
        self.visitor.queue(self.prompts.say("calling", apartment=self.apartment.number))
        leg = None
        for attempt in range(1, self.config.attempts + 1):
            session.attempt(attempt)
            if strategy == "parallel":
                leg = await self._ring(attempt, targets)
            else:
                for k, target in enumerate(targets):
                    if k > 0:
                        self.visitor.queue(self.prompts.say("calling_next"))
                    leg = await self._ring(attempt, [target])
                    if leg is not None:
                        break
            if leg is not None:
                break
        session.stop_expecting()
        if leg is None:
            return "no_answer"
        await self._peer_rate(leg)
        self.resident = self.flow.io_for(leg, self.site)
        # The visitor hanging up while the resident decides ends the resident's part too.
        session.visitor.when_closed().addCallback(self._visitor_left)
        return await self._ask_resident()

    def _visitor_left(self, _leg) -> None:
        if self.session.state != S.FINISHING and self.resident is not None:
            self.resident.interrupt(LegGone("visitor"))

    async def _ring(self, attempt: int, targets: list[tuple[str | None, str]]):
        """
        One attempt at C{targets} (C{(resident, dial string)}, rung at once): each dial gets
        a fresh leg UUID, admitted for this attempt's ring window only; the dialer is asked
        to call with it, and the visitor hears a wait message every
        C{wait_message_interval_s} until a resident's leg joins, every dial has failed, or
        the ring window (C{ring_timeout_s} plus L{S.RESIDENT_GRACE_S} for the connect and
        handshake) passes. However the attempt ends, its leg UUIDs are revoked: a late
        answer is refused (see L{audiosocket.session}); and every dial whose leg did not
        join is cancelled (the phone stops ringing) — also when the attempt ends because the
        visitor hung up, asked for the operator, or the call was ended from outside.

        @return: the resident's leg, or C{None}.
        @raise LegGone: the visitor hung up meanwhile.
        @raise _Transfer: the visitor asked for the operator meanwhile.
        """
        session = self.session
        ring_s = self.config.ring_timeout_s
        window_s = ring_s + S.RESIDENT_GRACE_S
        race = _Race(self.reactor)
        legs: dict[_uuid.UUID, tuple[str | None, str]] = {}
        joined = None
        for resident, dial in targets:
            # uuid4 reads os.urandom: not guessable from anything the visitor sees or chooses.
            leg_uuid = _uuid.uuid4()
            legs[leg_uuid] = (resident, dial)
            # One wait for the call: whichever of its leg UUIDs joins fires the latest. In a
            # parallel attempt the others then admit only a late answer.
            on_late = None
            if len(targets) > 1:

                def on_late(leg, target=(resident, dial)):
                    self.late.append(defer.Deferred.fromCoroutine(self._late(attempt, target, leg)))

            joined = session.expect_resident(leg_uuid, window_s, on_late)
        race.add("joined", joined)
        for leg_uuid, (resident, dial) in legs.items():

            def start(leg_uuid=leg_uuid, resident=resident, dial=dial):
                return self.flow.dialer.dial(self._dial_request(leg_uuid, resident, dial))

            # A bad directory entry (a dial string the request refuses) is a failed dial.
            race.add(("dial", leg_uuid), defer.maybeDeferred(start))
        race.add("visitor", defer.Deferred.fromCoroutine(self.visitor.next_input(None)))
        ringing = set(legs)
        now = self.reactor.seconds()
        ring_deadline = now + ring_s
        deadline = now + window_s
        try:
            while True:
                remaining = deadline - self.reactor.seconds()
                if remaining <= 1e-6:
                    for leg_uuid in sorted(ringing, key=list(legs).index):
                        self._dial_failed(
                            attempt, "no_answer", "rang for {} s".format(ring_s), legs[leg_uuid]
                        )
                    ringing.clear()
                    return None
                which, result = await race.next(
                    min(remaining, self.config.wait_message_interval_s)
                )
                if which == "joined":
                    answered = legs.get(result.uuid, (None, ""))
                    ringing.discard(result.uuid)
                    self.answered_by = answered[0]
                    self._note_dial(attempt, answered, "answered")
                    return result
                if isinstance(which, tuple):
                    leg_uuid = which[1]
                    if isinstance(result, DialFailed):
                        reason, message = result.reason, str(result)
                    elif isinstance(result, Exception):
                        reason, message = "error", repr(result)
                    else:
                        continue  # accepted: the phone is ringing
                    ringing.discard(leg_uuid)
                    session.stop_expecting(leg_uuid)
                    self._dial_failed(attempt, reason, message, legs[leg_uuid])
                    if not ringing:
                        return None
                    continue
                if which == "visitor":
                    if isinstance(result, Exception):
                        raise result
                    # A key or a word while it rings: only the operator is listened for.
                    await self._operator_asked(result)
                    race.add("visitor", defer.Deferred.fromCoroutine(self.visitor.next_input(None)))
                    continue
                if ring_deadline - self.reactor.seconds() > 1e-6:
                    self.visitor.queue(self.prompts.say("still_calling"))
        finally:
            race.cancel()
            for leg_uuid in legs:
                # Strict: this attempt's leg UUIDs are good for this attempt only.
                session.stop_expecting(leg_uuid)
                if session.resident_leg_uuid != leg_uuid:
                    if leg_uuid in ringing:
                        self._note_dial(attempt, legs[leg_uuid], "cancelled")
                    self._cancel_dial(attempt, leg_uuid)

    async def _late(self, attempt: int, target: tuple[str | None, str], leg) -> None:
        """
        A phone of a parallel attempt answered after another resident joined: it hears
        C{late_answer} once, then the hangup frame. No listener: its keys and words go
        nowhere (the session closes it after L{S.LATE_MAX_S} in any case).
        """
        resident, dial = target
        self.session.tried_late(attempt, resident, dial)
        await self._peer_rate(leg)
        io = LegIO(leg, self.flow.tts, reactor=self.reactor)
        io.start()
        await io.finish(self.prompts.say("late_answer"), grace_s=S.LATE_MAX_S)

    def _cancel_dial(self, attempt: int, leg_uuid: _uuid.UUID) -> None:
        """
        Tell the dialer this attempt's leg is no longer expected, so the resident's phone
        stops ringing. Never waited for and never fails the call (a dialer's cancel is
        idempotent and its errors are only logged).
        """
        self.log.info(
            "call {uuid}: attempt {attempt} over without this leg; cancelling the dial "
            "of leg {leg_uuid}",
            **self.fields,
            attempt=attempt,
            leg_uuid=str(leg_uuid),
        )
        d = defer.maybeDeferred(self.flow.dialer.cancel, str(leg_uuid))
        d.addErrback(
            lambda f: self.log.failure(
                "call {uuid}: cancelling the dial of leg {leg_uuid} failed",
                f,
                **self.fields,
                leg_uuid=str(leg_uuid),
            )
        )

    def _dial_failed(
        self, attempt: int, reason: str, message: str, target: tuple[str | None, str]
    ) -> None:
        self.session.dial_failed(attempt, reason)
        self._note_dial(attempt, target, reason)
        self.log.info(
            "call {uuid}: attempt {attempt} to reach apartment {apartment} failed: {message}",
            **self.fields,
            attempt=attempt,
            apartment=self.apartment.number,
            message=message,
        )

    # ------------------------------------------------------------ the record's "reach"

    def _note(self, **values) -> None:
        """Set keys of the record's C{reach}."""
        self.session.note_reach(**values)

    def _note_dial(self, attempt: int, target: tuple[str | None, str], result: str) -> None:
        """One leg tried, with its result, in the record's C{reach.dials}."""
        resident, dial = target
        self.session.tried(attempt, resident, dial, result)

    # ------------------------------------------------------------ the operator

    def _operator_on(self, when: str) -> bool:
        """Does C{[condominiums.operator] <when>} send the call to the operator?"""
        return bool(self.operator) and getattr(self.site.operator, when) == "operator"

    def _keypad_0(self, item) -> None:
        """A 0 alone, with an operator: the call goes to them."""
        if self.operator and isinstance(item, Dtmf) and item.digit == "0":
            raise _Transfer("keypad_0")

    def _unrecognized(self) -> None:
        """One more answer not understood; the second, with an operator, goes to them."""
        self.unrecognized += 1
        if self.operator and self.unrecognized >= RECOGNITION_FAILURES:
            raise _Transfer("recognition_failed")

    async def _operator_asked(self, item) -> None:
        """While it rings: a 0, or asking for a person, goes to the operator (if any)."""
        if not self.operator:
            return
        self._keypad_0(item)
        if not isinstance(item, Dtmf):
            text = await self._transcribe(item, offer_keypad=False)
            if text and asks_for_person(text):
                raise _Transfer("asked")

    async def _not_found(self) -> None:
        """The apartment could not be found: the operator (if so configured), or goodbye."""
        if self._operator_on("on_unknown_apartment"):
            raise _Transfer("unknown_apartment")
        await self.visitor.say(self.prompts.say("unknown_apartment_final"))
        return None

    async def _transfer(self, reason: str, prompt: str = "transferring") -> str:
        """
        Hand the visitor to the operator: "vou transferir" plays while the dialer leaves the
        instruction for the dialplan; the visitor's hangup frame follows (in L{_finish}) only
        once it is acknowledged, within L{HANDOFF_TIMEOUT_S}.
        """
        session = self.session
        self.visitor.flush(keys=True)
        handoff = {"action": "transfer", "reason": reason}
        self._note(handoff=handoff)
        self.log.info(
            "call {uuid}: transferring to the operator ({reason})", **self.fields, reason=reason
        )
        started = self.reactor.seconds()
        d = defer.maybeDeferred(
            self.flow.dialer.handoff, str(session.uuid), "transfer", self.operator
        )
        d.addTimeout(HANDOFF_TIMEOUT_S, self.reactor)
        # Every result becomes a value: it is read after the prompt has played.
        d.addBoth(lambda r: r.value if isinstance(r, Failure) else r)
        try:
            await self.visitor.say(self.prompts.say(prompt))
            result = await d
        finally:
            if not d.called:
                d.cancel()
        if isinstance(result, defer.CancelledError):
            raise result
        handoff["handoff_s"] = round(self.reactor.seconds() - started, 3)
        if isinstance(result, Exception):
            handoff["result"] = "failed"
            handoff["error"] = (
                "no answer within {} s".format(HANDOFF_TIMEOUT_S)
                if isinstance(result, defer.TimeoutError)
                else str(result) or type(result).__name__
            )
            self.log.warn(
                "call {uuid}: the hand-off to the operator failed: {error}",
                **self.fields,
                error=handoff["error"],
            )
            await self.visitor.say(self.prompts.say("transfer_failed"))
            return "transfer_failed"
        handoff["result"] = "ok"
        return "transferred"

    # ------------------------------------------------------------ the resident's decision

    async def _ask_resident(self) -> str:
        session = self.session
        facts = session.facts
        resident = self.resident
        session.enter(S.ANNOUNCING)
        ask = "ask_decision_keypad" if self.keypad_only_resident else "ask_decision"
        try:
            await self._put_to_resident(
                announcement(self.prompts, facts.apartment, facts.visitor_name, facts.intent),
                self.prompts.say(ask),
                deciding=True,
            )
            unclear = 0
            while True:
                item = await resident.next_input(self.config.decision_timeout_s)
                if item is None:
                    return self._decided("denied", "timeout")
                if isinstance(item, Dtmf):
                    decision = classify_dtmf(item.digit)
                    evidence = "dtmf:" + item.digit
                else:
                    text = await self._transcribe(item, offer_keypad=False)
                    decision = classify_decision(text) if text else Decision.UNCLEAR
                    evidence = "voice:" + (text or "")
                if decision is Decision.AUTHORIZED:
                    return self._decided("authorized", evidence)
                if decision is Decision.DENIED:
                    return self._decided("denied", evidence)
                if decision is Decision.WHO:
                    await self._put_to_resident(self._detail(), self.prompts.say(ask))
                    continue
                unclear += 1
                if unclear > self.config.max_retries:
                    session.conclude("no_decision", evidence=self._kept(evidence))
                    return "no_decision"
                await self._put_to_resident(self.prompts.say("decision_again"))
        except LegGone as e:
            if e.role != "resident":
                raise
            session.conclude("no_decision", by="resident")
            return "no_decision"

    async def _put_to_resident(self, *texts: str, deciding: bool = False) -> None:
        """
        Say C{texts} to the resident whole — a key or speech does not cut them — then forget
        every key and word that came in meanwhile: the answer is what follows the question.
        With C{deciding}, the session moves to L{S.DECIDING} as the last text (the question)
        starts.
        """
        resident = self.resident
        for k, text in enumerate(texts):
            if deciding and k == len(texts) - 1:
                self.session.enter(S.DECIDING)
            await resident.say(text, interruptible=False, barge_in=False)
        resident.flush(keys=True)

    @property
    def keypad_only_resident(self) -> bool:
        return not self.flow.voice

    def _detail(self) -> str:
        facts = self.session.facts
        return self.prompts.say(
            "who_detail",
            visitor=facts.visitor_name or "Um visitante",
            purpose={"visita": " para uma visita", "entrega": " com uma entrega", "servico": " para um serviço"}.get(
                facts.intent or "", ""
            ),
            resident=facts.resident_name or "o morador",
        )

    def _decided(self, outcome: str, evidence: str) -> str:
        self._note(decided_by=self.answered_by)
        self.evidence = self._kept(evidence)
        self.session.conclude(outcome, evidence=self.evidence)
        logged = evidence if self.privacy.log_speech else _kind(evidence)
        self.log.info(
            "call {uuid}: resident {outcome} ({evidence})",
            **self.fields,
            outcome=outcome,
            evidence=logged,
        )
        return outcome

    def _kept(self, evidence: str) -> str:
        """
        The evidence as the call record keeps it: C{"dtmf:1"}, C{"timeout"}, C{"voice"} — the
        resident's words (C{"voice:pode subir"}) only with C{[privacy] record_speech}.
        """
        return evidence if self.privacy.record_speech else _kind(evidence)

    async def _tell_visitor(self, outcome: str) -> None:
        name = {
            "authorized": "authorized",
            "denied": "denied",
            "no_decision": "no_decision",
        }.get(outcome)
        if outcome == "no_answer":
            text = self.prompts.say("no_answer", apartment=self.apartment.number)
        elif name is not None:
            text = self.prompts.say(name)
        else:
            return
        await self.visitor.say(text)


class _Race:
    """
    Several Deferreds raced over and over: each result is kept until it is taken, so a
    result arriving between two waits is never lost, and failures are consumed (as values).
    """

    def __init__(self, reactor):
        self._reactor = reactor
        self._sources: dict[str, defer.Deferred] = {}
        self._ready: list[tuple[str, Any]] = []
        self._waiter: defer.Deferred | None = None

    def add(self, name: str, d: defer.Deferred) -> None:
        self._sources[name] = d

        def fired(result):
            if self._sources.get(name) is d:
                del self._sources[name]
                value = result.value if isinstance(result, Failure) else result
                self._ready.append((name, value))
                if self._waiter is not None and not self._waiter.called:
                    self._waiter.callback(None)
            return None

        d.addBoth(fired)

    async def next(self, timeout: float) -> tuple[str | None, Any]:
        """The next C{(name, result)}, or C{(None, None)} after C{timeout} seconds."""
        if not self._ready:
            self._waiter = defer.Deferred()
            self._waiter.addTimeout(timeout, self._reactor)
            try:
                await self._waiter
            except defer.TimeoutError:
                return None, None
            finally:
                self._waiter = None
        return self._ready.pop(0)

    def cancel(self) -> None:
        sources, self._sources = self._sources, {}
        for d in sources.values():
            d.cancel()


def _kind(evidence: str) -> str:
    """C{"voice:<words>"} is C{"voice"}; keys and timeouts carry no caller's words."""
    return "voice" if evidence.startswith("voice:") else evidence


def lookup(directory: Directory, facts: Facts, threshold: float = 80.0) -> Match | None:
    """
    Where the visitor's C{facts} point in C{directory}: a L{Match} whose C{exact} says
    whether the flow may go on without confirming, or C{None}.

      - An apartment said (in its block, when the directory writes blocks into numbers):
        that apartment, exactly, or a near number to confirm; with the resident said
        matched within it.
      - Else a resident's name: the apartment where someone is so named — sure when the
        name is exact and no other apartment comes within L{Directory.AMBIGUITY_MARGIN};
        else the likeliest, to confirm ("É para Fernanda Souza, do 201?").
      - An apartment said that is not in the directory, with a resident's name that is:
        that resident's apartment, to confirm.
    """
    if facts.apartment:
        home = directory.apartment_in_block(facts.apartment, facts.block)
        if home is not None:
            match: Match | None = Match(home, None, 100.0, True)
        else:
            match = directory.find_apartment(facts.apartment)
        if match is not None:
            if facts.resident_name:
                named = directory.find_resident(
                    facts.resident_name, match.apartment, threshold=threshold
                )
                if named is not None:
                    return Match(match.apartment, named.resident, named.score, match.exact)
            return match
    if not facts.resident_name:
        return None
    candidates = directory.find_residents(facts.resident_name, threshold=threshold)
    if not candidates:
        return None
    best = candidates[0]
    sure = (
        not facts.apartment
        and best.exact
        and (
            len(candidates) == 1
            or best.score - candidates[1].score >= directory.AMBIGUITY_MARGIN
        )
    )
    return Match(best.apartment, best.resident, best.score, sure)
