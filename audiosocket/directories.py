"""
The residents directories, kept in the store and changed live.

Each condominium's directory is stored as its rows, in the original system's JSON format (a
list of C{{"apartment_number", "residents", "voip_number"}}, a resident being a name or
C{{"name", "phone"}}; see L{audiosocket.flow.directory}). The config's directory files only
seed the store: at start, a condominium never stored gets its file's rows; from then on the
store is the truth, changed through the API (C{/api/condominiums/{id}/apartments}) or
C{audiosocket-admin directory}. A change, made here or on another node (the store tells every
node, see L{audiosocket.store.DirectoryChange}), swaps that condominium's L{Site} for one with
the new L{Directory}: the next call uses it, a call in progress keeps its own.

Every directory written is first validated whole by L{Directory.from_data} and bounded
(L{MAX_APARTMENTS} apartments, L{MAX_RESIDENTS} residents each, names and dial strings of at
most L{MAX_TEXT} characters); what is stored is its canonical form (L{to_rows}): numbers
normalised, whitespace folded. A change the store cannot take (Redis down) changes nothing.

Changes made on this node are serialised (one at a time); one apartment's put or delete reads
the condominium's rows from the store and writes them back whole, so two nodes changing the
same condominium in the same instant may lose one of the two changes (the last write wins).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

from twisted.internet import defer
from twisted.logger import Logger

from .extension import _locked
from .flow.directory import Directory, DirectoryError, normalize_number
from .reactors import default_reactor
from .store import StoreRetry, StoreUnavailable

#: Apartments in one condominium's directory, at most.
MAX_APARTMENTS = 5000
#: Residents of one apartment, at most.
MAX_RESIDENTS = 20
#: Characters of a resident's name or of a dial string, at most.
MAX_TEXT = 200


class UnknownCondominium(KeyError):
    """No condominium with this id in the config (the API answers 404)."""


def to_rows(directory: Directory) -> list[dict]:
    """A L{Directory} as the original format's rows (what is stored and exported)."""
    rows = []
    for apartment in directory:
        phones = dict(apartment.phones)
        residents = [
            {"name": name, "phone": phones[name]} if name in phones else name
            for name in apartment.residents
        ]
        rows.append(
            {
                "apartment_number": apartment.number,
                "residents": residents,
                "voip_number": apartment.dial,
            }
        )
    return rows


def validate(data: Any, source: str) -> tuple[Directory, list[dict]]:
    """
    The directory C{data} describes (the original JSON: a list of rows, or an object with
    C{"apartments"}) and its canonical rows.

    @raise DirectoryError: naming C{source}, the entry and the field.
    """
    if isinstance(data, dict) and isinstance(data.get("apartments"), list):
        data = data["apartments"]
    if isinstance(data, list):
        if len(data) > MAX_APARTMENTS:
            raise DirectoryError(
                "{} apartments: at most {} are allowed".format(len(data), MAX_APARTMENTS),
                source,
                field="apartments",
            )
        for index, entry in enumerate(data):
            _bounded(entry, source, index)
    directory = Directory.from_data(data, source)
    return directory, to_rows(directory)


def _bounded(entry: Any, source: str, index: int) -> None:
    if not isinstance(entry, dict):
        return  # Directory.from_data says what is wrong
    residents = entry.get("residents")
    if isinstance(residents, list):
        if len(residents) > MAX_RESIDENTS:
            raise DirectoryError(
                "{} residents: at most {} are allowed".format(len(residents), MAX_RESIDENTS),
                source,
                index,
                "residents",
            )
        for position, resident in enumerate(residents):
            if isinstance(resident, dict):
                name, phone = resident.get("name"), resident.get("phone")
                if isinstance(phone, str) and len(phone) > MAX_TEXT:
                    raise DirectoryError(
                        "over {} characters".format(MAX_TEXT),
                        source,
                        index,
                        "residents[{}].phone".format(position),
                    )
            else:
                name = resident
            if isinstance(name, str) and len(name) > MAX_TEXT:
                raise DirectoryError(
                    "item {}: over {} characters".format(position, MAX_TEXT),
                    source,
                    index,
                    "residents",
                )
    elif isinstance(residents, str) and len(residents) > MAX_TEXT:
        raise DirectoryError("over {} characters".format(MAX_TEXT), source, index, "residents")
    voip = entry.get("voip_number")
    if isinstance(voip, str) and len(voip) > MAX_TEXT:
        raise DirectoryError("over {} characters".format(MAX_TEXT), source, index, "voip_number")


class DirectoryControl:
    """
    The condominiums' directories: loaded from the store at start, changed here and applied
    to the sites.

    @param store: an C{IStore}.
    @param sites: returns the server's current C{{condominium id: Site}}.
    @param swap: C{swap(condominium_id, directory)} makes the next call of that condominium
        use C{directory}.
    @param retry_s: the store unavailable at start: the files' directories are served and
        loading is retried every C{retry_s} seconds.
    """

    log = Logger()

    def __init__(
        self,
        store,
        *,
        sites: Callable[[], dict],
        swap: Callable[[int, Directory], None],
        reactor=None,
        retry_s: float = 10.0,
    ):
        self.store = store
        self._sites = sites
        self._swap = swap
        self._reactor = default_reactor(reactor)
        self._retry = StoreRetry(self._reactor, retry_s, self._retry_load, "directories")
        self._lock = defer.DeferredLock()
        self._unsubscribe = None
        self._started = False
        self._stopped = False
        #: condominium id -> the version of its directory applied here (0: as loaded).
        self.versions: dict[int, int] = {}
        #: condominium id -> its directory as the store holds it (for a reload to keep).
        self.stored: dict[int, Directory] = {}

    # ------------------------------------------------------------ start, stop, reload

    async def start(self) -> None:
        """
        Seed the store with the files' directories of the condominiums it never held, then
        serve the store's. The store unavailable: serve the files' and retry later.
        """
        self._started = True
        subscribe = getattr(self.store, "subscribe_directories", None)
        if subscribe is not None:
            self._unsubscribe = subscribe(self.apply_remote)
        try:
            await self._load(self._sites())
        except StoreUnavailable as e:
            self.log.warn(
                "store unavailable at start-up ({error}); serving the directory files, "
                "retrying in {s}s",
                error=str(e),
                s=self._retry.every_s,
            )
            self._retry.schedule()

    async def _load(self, sites: dict) -> None:
        seeds = {cid: to_rows(site.directory) for cid, site in sites.items()}
        seeded = await self.store.seed_directories(seeds)
        if seeded:
            self.log.info(
                "store seeded with the directory of condominium(s) {ids} from their files",
                ids=", ".join(map(str, seeded)),
            )
        loaded = await self.store.load_directories()
        differ = []
        for cid in sites:
            if cid not in loaded or cid in self.stored:
                continue  # corrupt (logged by the store), or changed meanwhile
            try:
                directory, rows = validate(loaded[cid], "stored directory {}".format(cid))
            except DirectoryError as e:
                self.log.error("{error}; serving the file's directory", error=str(e))
                continue
            if rows != seeds[cid]:
                differ.append(cid)
            self.stored[cid] = directory
            self.versions.setdefault(cid, 0)
            self._swap(cid, directory)
        self._log_seed_only(differ)

    def _log_seed_only(self, differ: Iterable[int]) -> None:
        differ = sorted(differ)
        if differ:
            self.log.warn(
                "the directory file(s) of condominium(s) {ids} differ from the store, which is "
                "used: a file only seeds the store; change directories with the API or "
                "audiosocket-admin directory",
                ids=", ".join(map(str, differ)),
            )

    async def _retry_load(self) -> None:
        """A retry (L{StoreRetry}): seed and load from the store."""
        async with _locked(self._lock):
            await self._load(self._sites())
        self.log.info("store available again: directories loaded")

    def stop(self) -> None:
        """At shutdown: no more retries, no more remote changes."""
        self._stopped = True
        unsubscribe, self._unsubscribe = self._unsubscribe, None
        if callable(unsubscribe):
            unsubscribe()
        self._retry.stop()

    def overlay(self, sites: dict) -> dict:
        """
        For a config reload: C{sites} (built from the files) with the stored directories in
        place of their files'; logs which files differ from the store.
        """
        import attrs

        result = dict(sites)
        differ = []
        for cid, site in sites.items():
            stored = self.stored.get(cid)
            if stored is None:
                continue
            if to_rows(site.directory) != to_rows(stored):
                differ.append(cid)
            result[cid] = attrs.evolve(site, directory=stored)
        self._log_seed_only(differ)
        return result

    def adopt(self) -> defer.Deferred:
        """
        After a reload: seed and load the condominiums new to this node (added to the file),
        in the background; a failure is logged, and their files' directories are served.
        """
        if not self._started or self._stopped:
            return defer.succeed(None)
        new = {cid: site for cid, site in self._sites().items() if cid not in self.stored}
        if not new:
            return defer.succeed(None)

        async def load():
            async with _locked(self._lock):
                await self._load(new)

        d = defer.Deferred.fromCoroutine(load())
        d.addErrback(
            lambda f: self.log.warn(
                "loading the directories of condominium(s) {ids} failed: {error}",
                ids=", ".join(map(str, sorted(new))),
                error=f.getErrorMessage(),
            )
        )
        return d

    # ------------------------------------------------------------ reading

    def _site(self, cid: int):
        site = self._sites().get(cid)
        if site is None:
            raise UnknownCondominium(cid)
        return site

    def condominiums(self) -> list[dict]:
        return [
            {"id": cid, "name": site.name, "apartments": len(site.directory)}
            for cid, site in sorted(self._sites().items())
        ]

    def rows(self, cid: int) -> list[dict]:
        """The directory the next call of C{cid} uses, as rows."""
        return to_rows(self._site(cid).directory)

    # ------------------------------------------------------------ changes

    async def replace(self, cid: int, data: Any) -> list[dict]:
        """
        Replace C{cid}'s whole directory with C{data} (the original JSON).

        @raise UnknownCondominium: @raise DirectoryError: @raise StoreUnavailable: nothing
            changed.
        """
        self._site(cid)
        directory, rows = validate(data, "condominium {}".format(cid))
        async with _locked(self._lock):
            await self._save(cid, directory, rows)
        return rows

    async def put_apartment(self, cid: int, number: str, data: Any) -> tuple[bool, dict]:
        """
        Add or replace apartment C{number} of C{cid}: C{data} is C{{"residents": [...],
        "voip_number": "..."}} (an C{apartment_number}, if given, must be C{number}).

        @return: (whether it was added, its canonical row).
        """
        self._site(cid)
        source = "condominium {} apartment {}".format(cid, number)
        if not isinstance(data, dict):
            raise DirectoryError("must be an object", source)
        key = normalize_number(number)
        if key is None:
            raise DirectoryError(
                "not an apartment number: {!r}".format(number), source, field="apartment_number"
            )
        given = data.get("apartment_number", number)
        if normalize_number(given) != key:
            raise DirectoryError(
                "must match the number in the path ({}), or be omitted".format(key),
                source,
                field="apartment_number",
            )
        row = dict(data, apartment_number=key)
        # The row alone first: its errors name its fields, not an index in the whole.
        validate([row], source)
        async with _locked(self._lock):
            rows = await self._current(cid)
            found = [i for i, r in enumerate(rows) if _number(r) == key]
            if found:
                rows[found[0]] = row
            else:
                rows.append(row)
            directory, rows = validate(rows, "condominium {}".format(cid))
            await self._save(cid, directory, rows)
        return not found, next(r for r in rows if r["apartment_number"] == key)

    async def remove_apartment(self, cid: int, number: str) -> bool:
        """Remove apartment C{number} of C{cid}; C{False} if there is none."""
        self._site(cid)
        key = normalize_number(number)
        if key is None:
            return False
        async with _locked(self._lock):
            rows = await self._current(cid)
            kept = [r for r in rows if _number(r) != key]
            if len(kept) == len(rows):
                return False
            directory, rows = validate(kept, "condominium {}".format(cid))
            await self._save(cid, directory, rows)
        return True

    async def _current(self, cid: int) -> list:
        """The rows the store holds for C{cid} (never stored: the file's, being served)."""
        rows = await self.store.load_directory(cid)
        return list(rows) if rows is not None else self.rows(cid)

    async def _save(self, cid: int, directory: Directory, rows: list) -> None:
        version = await self.store.save_directory(cid, rows)
        self._apply(cid, version, directory)

    def _apply(self, cid: int, version: int, directory: Directory) -> None:
        if version <= self.versions.get(cid, 0):
            return  # a newer one is applied already
        self.versions[cid] = version
        # Kept even for a condominium this node's config lacks: a reload may add it.
        self.stored[cid] = directory
        if cid not in self._sites():
            return
        self._swap(cid, directory)
        self.log.info(
            "directory of condominium {cid} changed (version {version}, {n} apartments): "
            "the next call uses it",
            cid=cid,
            version=version,
            n=len(directory),
        )

    def apply_remote(self, change) -> None:
        """A directory saved by another node: the next call here uses it too."""
        try:
            directory, _ = validate(
                change.rows, "directory {} from node {}".format(change.condominium_id, change.node_id)
            )
        except DirectoryError as e:
            self.log.error("ignoring a directory change: {error}", error=str(e))
            return
        self._apply(change.condominium_id, change.version, directory)


def _number(row: Any) -> str | None:
    if isinstance(row, dict):
        return normalize_number(row.get("apartment_number"))
    return None
