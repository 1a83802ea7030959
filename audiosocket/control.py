"""
The one place where extension changes become manager and store changes.

Changes come from two directions: the HTTP API on this node (L{ExtensionControl.add},
C{update}, C{remove}, C{restart}) and the store's pub/sub, carrying changes made on other
nodes (L{ExtensionControl.apply_remote}). Both go through one lock, so the order in which the
store saw changes is the order in which the manager applies them, and an API change never
interleaves with a remote one.

A local change is all-or-nothing: the store is checked before anything is touched; ports are
opened before the store is written (so a 201 means "listening and persisted"); a failed write
undoes the manager change and re-raises.
"""

from __future__ import annotations

from typing import Sequence

from twisted.internet import defer
from twisted.logger import Logger

from .extension import Conflict, ExtensionManager, ExtensionService, NotFound, _locked
from .model import Extension, InvalidField
from .reactors import default_reactor
from .store import DELETE, PUT, StoreRetry, StoreUnavailable


class ExtensionControl:
    """
    Apply extension changes to the L{ExtensionManager} and the store, consistently.

    @param manager: the live extensions of this process.
    @param store: an C{IStore}.
    @param retry_s: when the store is unavailable at start-up, the configured extensions are
        served from memory and loading from the store is retried every C{retry_s} seconds.
    """

    log = Logger()

    def __init__(
        self,
        manager: ExtensionManager,
        store,
        *,
        reactor=None,
        retry_s: float = 10.0,
    ):
        reactor = default_reactor(reactor)
        self.manager = manager
        self.store = store
        self._reactor = reactor
        self._retry = StoreRetry(reactor, retry_s, self._retry_load, "extensions")
        self._seed: tuple[Extension, ...] = ()
        self._lock = defer.DeferredLock()
        self._unsubscribe = None
        self._on_applied: list = []
        #: True once the extensions come from the store (False while serving the seed
        #: from memory because the store was unavailable at start-up).
        self.synced = False

    def _require_store(self) -> None:
        if not self.store.available:
            raise StoreUnavailable("the extension store is unavailable; nothing was changed")

    # ------------------------------------------------------------ local changes

    async def add(self, ext: Extension) -> ExtensionService:
        """
        Listen on the extension's ports, then persist it.

        @raise StoreUnavailable: the store is down (nothing changed, or the add was undone).
        @raise Conflict: id or port taken. @raise InvalidField: unknown condominium.
        """
        async with _locked(self._lock):
            self._require_store()
            svc = await self.manager.add(ext)
            try:
                await self.store.save_extension(ext)
            except BaseException:
                self.log.warn(
                    "extension {ext}: saving failed, undoing the add", ext=ext.id
                )
                removed = await self.manager.remove(ext.id, force=True)
                await removed.stopped
                raise
            return svc

    async def update(self, ext: Extension) -> ExtensionService:
        """
        Change an extension (rebinding ports that changed), then persist it; a failed save
        puts the old definition back.

        @raise NotFound: no such extension.
        """
        async with _locked(self._lock):
            old = self.manager.get(ext.id).extension
            self._require_store()
            svc = await self.manager.update(ext)
            try:
                await self.store.save_extension(ext)
            except BaseException:
                self.log.warn(
                    "extension {ext}: saving failed, restoring the previous definition",
                    ext=ext.id,
                )
                await self.manager.update(old)
                raise
            return svc

    async def remove(self, ext_id: int, force: bool = False) -> ExtensionService:
        """
        Delete an extension from the store, then stop its listeners. Its calls drain in the
        background (or are hung up cleanly with C{force}).

        @raise NotFound: no such extension.
        """
        async with _locked(self._lock):
            self.manager.get(ext_id)
            self._require_store()
            await self.store.delete_extension(ext_id)
            return await self.manager.remove(ext_id, force=force)

    async def restart(self, ext_id: int) -> ExtensionService:
        """Close and reopen an extension's ports; the store is not involved."""
        async with _locked(self._lock):
            return await self.manager.restart(ext_id)

    # ------------------------------------------------------------ start-up

    async def start(self, seed: Sequence[Extension]) -> None:
        """
        Seed the store on first start and load its extensions into the manager. If the store
        is unavailable, serve C{seed} from memory and retry loading later.
        """
        self._seed = tuple(seed)
        try:
            self._unsubscribe = await defer.maybeDeferred(
                self.store.subscribe, self.apply_remote
            )
        except Exception:
            self.log.failure("subscribing to extension changes failed")
        try:
            extensions = await self._load_from_store()
        except StoreUnavailable as e:
            self.log.warn(
                "store unavailable at start-up ({error}); serving {n} configured "
                "extension(s) from memory, retrying in {s}s",
                error=str(e),
                n=len(self._seed),
                s=self._retry.every_s,
            )
            async with _locked(self._lock):
                await self.manager.load(self._seed)
            self._retry.schedule()
            return
        async with _locked(self._lock):
            await self.manager.load(extensions)
            self.synced = True

    async def _load_from_store(self) -> list[Extension]:
        seeded = await self.store.seed(list(self._seed))
        if seeded:
            self.log.info(
                "store seeded with {n} configured extension(s)", n=len(self._seed)
            )
        return list(await self.store.load_extensions())

    async def _retry_load(self) -> None:
        """A retry (L{StoreRetry}): load from the store and make the manager match it."""
        extensions = await self._load_from_store()
        async with _locked(self._lock):
            await self._converge(extensions)
            self.synced = True
        self.log.info(
            "store available again: {n} extension(s) loaded", n=len(extensions)
        )

    async def _converge(self, extensions: Sequence[Extension]) -> None:
        """Make the manager hold exactly C{extensions} (the store is the source of truth)."""
        wanted = {e.id: e for e in extensions}
        for ext_id in list(self.manager.extensions):
            if ext_id not in wanted:
                await self._apply(self.manager.remove(ext_id), "remove", ext_id)
        for ext in extensions:
            await self._put_locally(ext)

    def stop(self) -> None:
        """At shutdown: cancel a pending retry and stop applying remote changes."""
        unsubscribe, self._unsubscribe = self._unsubscribe, None
        if callable(unsubscribe):
            unsubscribe()
        self._retry.stop()

    # ------------------------------------------------------------ remote changes

    def apply_remote(self, change) -> defer.Deferred:
        """
        Apply a change made on another node: a put adds or updates the extension here, a
        delete removes it (its calls drain). Errors are logged, never raised to the store.
        """
        return defer.Deferred.fromCoroutine(self._apply_remote(change))

    def add_observer(self, on_applied) -> None:
        """Call C{on_applied(change)} once a change from another node has been applied here."""
        self._on_applied.append(on_applied)

    async def _apply_remote(self, change) -> None:
        await self._apply_remote_locked(change)
        for on_applied in list(self._on_applied):
            on_applied(change)

    async def _apply_remote_locked(self, change) -> None:
        try:
            async with _locked(self._lock):
                if change.kind == PUT:
                    if change.extension is None:
                        raise ValueError("a put change carries no extension")
                    await self._put_locally(change.extension)
                elif change.kind == DELETE:
                    if change.ext_id in self.manager.extensions:
                        await self._apply(
                            self.manager.remove(change.ext_id), "remove", change.ext_id
                        )
                else:
                    raise ValueError("unknown change kind {!r}".format(change.kind))
        except Exception:
            self.log.failure(
                "applying a change from node {node} failed",
                node=getattr(change, "node_id", None),
            )

    async def _put_locally(self, ext: Extension) -> None:
        current = self.manager.extensions.get(ext.id)
        if current is None:
            await self._apply(self.manager.add(ext), "add", ext.id)
        elif current.extension != ext:
            await self._apply(self.manager.update(ext), "update", ext.id)

    async def _apply(self, coro, what: str, ext_id: int) -> None:
        # A change that cannot be applied here (port busy on this host, a condominium this
        # node does not know) must not stop the others: log it and go on.
        try:
            await coro
        except (Conflict, InvalidField, NotFound) as e:
            self.log.error(
                "extension {ext}: {what} could not be applied here: {error}",
                ext=ext_id,
                what=what,
                error=str(e),
            )
