"""
Speaking and listening on one leg, for the flow.

A L{LegIO} turns a leg's two inbound streams — keypad and hangup events from the leg, and
utterances from its L{Listener} when speech recognition is on — into one inbox the flow
reads in order, and speaks by synthesizing text and queueing it on the leg's player. The
flow never touches a transport; the leg never decides what to say.
"""

from __future__ import annotations

from typing import Any

import attrs
from twisted.internet import defer
from twisted.logger import Logger

from audiosocket.leg import AudioSocketProtocol, Dtmf, Hangup


class LegGone(Exception):
    """The leg hung up (or was closed) while the flow was talking to it."""

    def __init__(self, role: str):
        super().__init__("{} hung up".format(role))
        self.role = role


class _Interrupted:
    """Inbox marker: L{LegIO.interrupt} was called."""


class LegIO:
    """
    @ivar interruptible: while true, a key press stops the prompt being played (the
        visitor who already knows the apartment number need not hear the greeting out).
    """

    log = Logger()

    def __init__(self, leg: AudioSocketProtocol, tts, *, reactor, listener=None):
        self.leg = leg
        self.role = leg.role
        self._tts = tts
        self._reactor = reactor
        self.listener = listener
        self.inbox: defer.DeferredQueue = defer.DeferredQueue(size=128)
        self.interruptible = False
        self.gone = False
        self._interrupt: Exception | None = None
        self._pumps: list[defer.Deferred] = []

    def start(self) -> None:
        self._pumps.append(defer.Deferred.fromCoroutine(self._pump_events()))
        if self.listener is not None:
            self.listener.start()
            self._pumps.append(defer.Deferred.fromCoroutine(self._pump_utterances()))

    def stop(self) -> None:
        """Stop reading the leg: pending reads are cancelled, nothing is left waiting."""
        for pump in self._pumps:
            pump.cancel()
        self._pumps = []
        if self.listener is not None:
            self.listener.stop()
        for d in list(self.inbox.waiting):
            d.cancel()

    async def _pump_events(self) -> None:
        try:
            while True:
                event = await self.leg.events.get()
                if isinstance(event, Dtmf) and self.interruptible and self.leg.playing:
                    self.leg.stop_playback()
                self._put(event)
                if isinstance(event, Hangup):
                    return
        except defer.CancelledError:
            return

    async def _pump_utterances(self) -> None:
        try:
            while True:
                self._put(await self.listener.utterances.get())
        except defer.CancelledError:
            return

    def _put(self, item: Any) -> None:
        try:
            self.inbox.put(item)
        except defer.QueueOverflow:
            # Nobody is reading (a long prompt while the caller mashes keys): keep the newest.
            del self.inbox.pending[0]
            self.inbox.put(item)

    def interrupt(self, error: Exception) -> None:
        """
        Make every later (and the pending) L{say} / L{next_input} raise C{error}: the other
        leg of the call went away, so this conversation is over.
        """
        if self._interrupt is None and not self.leg.closed:
            self._interrupt = error
            self.leg.stop_playback()
            self._put(_Interrupted())

    def _check(self) -> None:
        if self._interrupt is not None:
            raise self._interrupt
        if self.leg.closed:
            self.gone = True
            raise LegGone(self.role)

    # ------------------------------------------------------------ input

    def flush(self, *, keys: bool = False) -> None:
        """
        Forget words said so far, before a new question. Keys stay unless C{keys} is true: a
        key is deliberate, and a visitor who types the apartment over "não encontrei" means
        it as the answer; the resident's answer, though, counts only once the question has
        been heard out, keys included.
        """
        kept_kinds = (Hangup, _Interrupted) if keys else (Hangup, Dtmf, _Interrupted)
        kept = [i for i in self.inbox.pending if isinstance(i, kept_kinds)]
        self.inbox.pending[:] = kept
        if self.listener is not None:
            self.listener.flush()

    async def next_input(self, timeout: float | None) -> Any:
        """
        The next key press (L{Dtmf}) or utterance, or C{None} after C{timeout} seconds.

        @raise LegGone: the leg hung up.
        """
        if self._interrupt is not None:
            raise self._interrupt
        if self.gone:
            raise LegGone(self.role)
        d = self.inbox.get()
        if timeout is not None:
            d.addTimeout(timeout, self._reactor)
        try:
            item = await d
        except defer.TimeoutError:
            return None
        if isinstance(item, Hangup):
            self.gone = True
            raise LegGone(self.role)
        if isinstance(item, _Interrupted):
            raise self._interrupt
        return item

    async def digits(self, first: str, timeout: float, max_digits: int | None = None) -> str | None:
        """
        Collect keypad digits after C{first}: C{#} ends, C{*} clears, and C{timeout} seconds
        after the last key the digits typed so far are taken. Speech while typing is ignored.

        At most C{max_digits} are kept: past that the entry is invalid, the rest of it is
        read (so its keys do not start a new entry) but not kept, and the result is C{None}.
        C{*} still starts afresh. Memory stays bounded however long a caller types.

        @return: the digits (C{""} when none were typed), or C{None} for too many.
        """
        typed = ""
        too_long = False
        key = first
        while True:
            if key == "#":
                break
            if key == "*":
                typed, too_long = "", False
            elif key.isdigit() and not too_long:
                if max_digits is not None and len(typed) >= max_digits:
                    typed, too_long = "", True
                else:
                    typed += key
            item = None
            while item is None or not isinstance(item, Dtmf):
                item = await self.next_input(timeout)
                if item is None:
                    return None if too_long else typed
            key = item.digit
        return None if too_long else typed

    # ------------------------------------------------------------ output

    async def say(
        self, text: str, *, interruptible: bool = False, barge_in: bool = True
    ) -> bool:
        """
        Speak C{text} and return once it has played (C{True}) or was cut short by a key
        press or barge-in (C{False}). A synthesis failure is logged and skipped: the call
        goes on without that prompt rather than dying.

        @raise LegGone: the leg hung up.
        """
        leg = self.leg
        self._check()
        try:
            pcm = await self._tts.synthesize(text, leg.rate)
        except defer.CancelledError:
            raise
        except Exception:
            # Not the text itself: it may carry a caller's name.
            self.log.failure(
                "{role} leg {uuid}: cannot synthesize a prompt of {chars} characters",
                role=self.role,
                uuid=str(leg.uuid),
                chars=len(text),
            )
            return False
        self._check()
        if interruptible and any(isinstance(i, Dtmf) for i in self.inbox.pending):
            return False  # already answered by keypad: no need to ask
        self.interruptible = interruptible
        listener = self.listener
        settings = listener.settings if listener is not None else None
        if settings is not None and settings.barge_in and not barge_in:
            # This prompt plays whole, whatever the caller says over it.
            listener.settings = attrs.evolve(settings, barge_in=False)
        try:
            played = await leg.play(pcm)
        finally:
            self.interruptible = False
            if settings is not None:
                listener.settings = settings
        self._check()
        return played

    def queue(self, text: str) -> defer.Deferred:
        """Speak without waiting (the wait message while the phone rings)."""
        return defer.Deferred.fromCoroutine(self._quiet_say(text))

    async def _quiet_say(self, text: str) -> bool:
        try:
            return await self.say(text)
        except LegGone:
            return False

    async def finish(self, text: str | None, *, grace_s: float = 30.0) -> None:
        """
        Say C{text} (if any), then hang up once it has played out, and wait until the
        connection is gone. Never raises: this is the end of the leg whatever happens.
        """
        leg = self.leg
        if text and not leg.closed:
            try:
                pcm = await self._tts.synthesize(text, leg.rate)
            except Exception:
                self.log.failure("{role} leg: cannot synthesize the goodbye", role=self.role)
                pcm = b""
            if pcm and not leg.closed:
                leg.play(pcm)
        closed = leg.hangup()
        closed.addTimeout(grace_s, self._reactor)
        try:
            await closed
        except defer.TimeoutError:
            # The peer stopped reading: do not keep the session alive for it.
            self.log.warn("{role} leg {uuid} did not close; aborting", role=self.role, uuid=str(leg.uuid))
            leg.transport.abortConnection()
        finally:
            self.stop()
