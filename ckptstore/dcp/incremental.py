"""Incremental saves: what did not change since this rank's last save is linked, not
written again (issue 19).

Every item a rank writes (a tensor, a tensor's shard, a pack of small tensors, a pickled
value) is hashed whole before it is encoded: xxh3-128 of its raw bytes, on the codec pool
and the writer thread (:mod:`ckptstore.dcp.hashing`), never on the training thread (~13 GB/s a core here, against ~1.3 GB/s for zstd). An
item whose key, dtype, size and hash are those of the same item in this rank's last
committed save is not written, whatever codec either save chose (each item records its
own; ``codec="auto"`` changes its mind in a run's first saves): the shard file that holds it in that checkpoint is
hard-linked into the new one (:meth:`PendingCheckpoint.link_files`; on an object store,
copied inside the store; first checked to be the file this rank wrote, by size and index
checksum) under a name that says which checkpoint first wrote it
(``__0_0-step_00000100.distcp``), and DCP's
``.metadata`` points the item there. The manifest lists the linked file like any other,
and names its first writer under ``"linked"`` (:mod:`ckptstore.format.manifest`).

So every checkpoint is still a directory holding every byte it needs: every reader,
``verify``, retention and deletion work on it as on any other, and deleting the
checkpoint that first wrote the frozen weights leaves every later one loadable (the file
system counts the links). A linked file also holds its first save's items that changed
since (they are not read); a full save every ``full_every`` saves bounds those stale bytes.

Where links cannot be made (a file system without hard links) the save writes
everything, as without this. What this rank remembers is its last *committed* save, in
memory, and (where that save linked something, or was the first after a restore) in its
shard file as one more item (``@ckptstore.incremental``, a key no DCP item has, JSON;
not in ``.metadata``, so no load reads it): where each item lies and its digest. After a
restart, a rank that loaded a checkpoint from this root
(:meth:`IncrementalCache.restored_from`) reads that note from its own shard there, and
its first save links from that checkpoint; a rank that loaded nothing, or whose note is
missing, damaged, of another version or layout, or otherwise makes no sense (it is read
from disk: every field is checked), saves in full. Every file is checked before it is
linked from: its size and index checksum, and, for each item used, its key and size at
the noted position; on a node-local disk other than rank 0's, whose files no retention
read covers, every byte of those items too (:attr:`IncrementalCache.read_through`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import posixpath
from collections.abc import Callable
from concurrent.futures import Executor, Future
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass, field
from typing import Any

from ckptstore.dcp.hashing import start_hashing
from ckptstore.dcp.note import NOTE_KEY
from ckptstore.dcp.note import NOTE_VERSION as _NOTE_VERSION
from ckptstore.dcp.note import count as _count
from ckptstore.dcp.note import hexdigest as _hex
from ckptstore.dcp.note import plain as _plain
from ckptstore.dcp.note import read_note as _read_note
from ckptstore.dcp.note import text as _text
from ckptstore.dcp.raw import tensor_bytes
from ckptstore.errors import CkptStoreError
from ckptstore.format.manifest import Manifest
from ckptstore.format.shard import ShardInfo, ShardReader

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Held:
    """Where an item of the last save lies, and what it was."""

    file: str  # the name its file gets when linked into the next checkpoint
    item: int  # its index in that file
    digest: str  # xxh3-128 of its raw bytes ("": not hashed, it had changed)
    kind: str  # dtype and size, as one string
    version: tuple[int, int] | None  # its tensor's (version counter, data pointer)


@dataclass(frozen=True)
class _File:
    """A shard file of the last save, linkable into the next one."""

    source: str  # "<last checkpoint>/<its name there>"
    origin: str  # the checkpoint that first wrote it
    size_bytes: int
    xxh3_64: str
    raw_bytes: int  # of every item it holds, those no save uses any more included


# A file is linked only if the items used from it hold at least this share of its raw
# bytes: what a link keeps alive is then at most twice what it saves writing (a few
# unchanged buffers do not pin a whole earlier shard on disk).
MIN_USED = 0.5


@dataclass
class Reuse:
    """One save's decision for one rank's shard: which items it links, from where."""

    digests: list[str]
    kinds: list[str]
    versions: list[tuple[int, int] | None]
    items: dict[int, tuple[str, int]] = field(default_factory=dict)  # position -> (file, item)
    links: dict[str, _File] = field(default_factory=dict)  # file name -> the file linked
    raw_linked: int = 0  # raw bytes of the items linked
    stored: dict[str, str] = field(default_factory=dict)  # stored name -> file name
    note_bytes: int = 0  # the note's, in this save's shard (not state: not counted)
    noted: bool = False  # whether this save's shard gets a note (place())
    # whether it found files worth linking (found before a full save or a failed link
    # drops the links: a scheduled full save in fine-tuning has matched)
    matched: bool = False


@dataclass
class Hashing:
    """Items being hashed (:meth:`IncrementalCache.start`)."""

    moved: list[int]  # positions that changed for certain: not hashed
    hashed: list[int]  # positions being hashed
    result: Callable[[], list[str]]  # their digests, once done
    jobs: list[Future[bool]]
    versions: list[tuple[int, int] | None]
    given: dict[int, str] = field(default_factory=dict)  # position -> digest found in staging
    fqns: list[str] | None = None  # each position's tensor
    expected: int | None = None  # raw bytes this save expects to write (start())
    pool: Executor | None = None  # what hashes them (and reads linked files through)

    def wait(self) -> None:
        """Until no job reads the items any more (before their buffer is given back)."""
        futures_wait(self.jobs)


def _index(
    backend: Any, f: _File, read: set[int] | None = None, pool: Executor | None = None
) -> list[tuple[str, int]] | None:
    """The items (key, raw size) of ``f.source`` in ``backend`` if it is still the file
    noted (size and index checksum), and the items at the indices in ``read`` (if given)
    read through and intact; None if not."""
    try:
        with backend.open_reader(f.source) as reader:
            shard = ShardReader(reader, f.source, size_bytes=f.size_bytes, index_xxh3=f.xxh3_64)
            if read is not None:
                shard.verify(pool, read)
            return [(item.key, item.nbytes) for item in shard.items]
    except CkptStoreError as exc:
        if read is not None:
            log.warning(
                "%s is damaged: this save writes its items again instead of linking it; the "
                "checkpoints on this disk that hold it are damaged too (`ckptstore verify %s` "
                "names them): %s", f"{backend.url}/{f.source}", backend.url, exc,
            )  # fmt: skip
        return None
    except OSError:
        return None


class IncrementalCache:
    """One rank's memory of its last committed save (module doc); writer thread only."""

    def __init__(self, full_every: int = 10) -> None:
        self.full_every = full_every
        self._items: dict[str, _Held] = {}
        self._files: dict[str, _File] = {}
        self._since_full = 0
        self._next: tuple[dict[str, _Held], dict[str, _File], bool, bool] | None = None
        self._matched = False  # whether the last committed save found files worth linking
        self.linked_bytes = 0  # raw bytes the last save linked (for tests, benchmarks)
        self.hashed_bytes = 0  # raw bytes the last save hashed (for tests, benchmarks)
        # fqn -> (version counter, data pointer) of the save being written (StagedState)
        self.versions: dict[str, tuple[int, int] | None] | None = None
        # fqn -> (digest, bytes) of the tensors staging found unchanged by hashing them
        # where they lie (engine.unchanged; StagedState.verified): not hashed again
        self.given: dict[str, tuple[str, int]] = {}
        # fqn -> (digest, bytes) of each item this save hashed (engine.unchanged notes them)
        self.hashed_tensors: dict[str, tuple[str, int]] = {}
        # id(staged tensor) -> (it, its bytes), for the save being written (Arena.raws)
        self.raws: dict[int, tuple[Any, Any]] = {}
        self._restored: tuple[str, Manifest] | None = None  # see restored_from()
        # Read through what this save links (the items it uses) before linking it; set
        # by the writer for a rank whose root is a node-local disk other than rank 0's.
        # Rank 0's housekeeping reads its own disk only: there, a file rotten since it was
        # written is found and the next save writes everything (manager.housekeeping);
        # on another disk nothing else would, and every later save would link it.
        self.read_through = False

    def bytes_of(self, t: Any) -> Any:
        """``tensor_bytes(t)``, looked up in :attr:`raws` where ``t`` is staged there."""
        hit = self.raws.get(id(t))
        return hit[1] if hit is not None and hit[0] is t else tensor_bytes(t)

    def restored_from(self, name: str, manifest: Manifest) -> None:
        """This process loaded checkpoint ``name`` from the root it saves to: a rank that
        remembers no save of its own links its next save from that one (module doc)."""
        self._restored = (name, manifest)

    def _seed(self, backend: Any, base_name: str) -> None:
        """Remember the restored checkpoint as if this rank had just saved it, from the
        note in its shard file there; on any doubt, nothing (a full save)."""
        assert self._restored is not None
        name, manifest = self._restored
        self._restored = None
        stem, ext = posixpath.splitext(base_name)
        own = [
            f
            for f, e in manifest.files.items()
            if e.kind == "shard"
            and f not in manifest.linked
            and (f == base_name or (f.startswith(f"{stem}-") and f.endswith(ext)))
        ]
        if len(own) != 1:
            return
        try:
            note, raw_bytes = _read_note(backend, name, own[0], manifest.files[own[0]])
            if note.get("v") != _NOTE_VERSION:
                raise ValueError(f"a note of version {note.get('v')!r}")
            files = {
                _plain(link): _File(f"{name}/{_plain(src)}", _plain(origin), _count(size), _hex(xxh3), _count(raw))
                for link, (src, origin, size, xxh3, raw) in note["files"].items()
            }  # fmt: skip
            entry = manifest.files[own[0]]
            files[_plain(note["own"])] = _File(
                f"{name}/{own[0]}", name, entry.size_bytes, entry.xxh3_64, raw_bytes
            )
            items = {
                _text(key): _Held(_plain(file), _count(item), _hex(d), _text(kind), None)
                for key, file, item, d, kind in note["items"]
            }
            if any(h.file not in files for h in items.values()):
                raise ValueError("an item lies in a file the note does not name")
            since_full = _count(note["since_full"])
        except Exception as exc:  # untrusted input: any doubt means a full save
            log.info(
                "%s/%s: no incremental note to link from (%s): the next save writes the "
                "tensors of this file in full", name, own[0], exc,
            )  # fmt: skip
            return
        self._items, self._files, self._since_full = items, files, since_full

    def place(
        self,
        writer: Any,
        pending: Any,
        backend: Any,
        entries: list[tuple[str, Any, Any]],
        hashing: Hashing,
        names: tuple[str, str, str],
        spec: Any,
    ) -> tuple[Reuse, list[tuple[str, int]]]:
        """Write into ``writer`` (a ``ShardWriter``) what changed, link the rest, and add
        the note; returns the decision and each entry's (stored file, item).
        ``names``: the checkpoint's, its shard file's, and that file's stored name;
        ``spec``: the save's (whether it is ``full``)."""
        checkpoint, file_names = names[0], (names[1], names[2])
        # changed for certain: written while the rest are hashed
        at = {pos: (names[2], writer.add(*entries[pos])) for pos in hashing.moved}
        reuse = self.plan(pending, backend, entries, hashing, file_names, spec.full)
        placed = [
            at.get(pos) or reuse.items.get(pos) or (names[2], writer.add(key, raw, dtype))
            for pos, (key, raw, dtype) in enumerate(entries)
        ]
        if reuse.noted:
            note = self.note(checkpoint, file_names, [e[0] for e in entries], placed, reuse)
            writer.add(NOTE_KEY, note, None)
            reuse.note_bytes = len(note)
        return reuse, placed

    def note(
        self,
        checkpoint: str,
        names: tuple[str, str],
        keys: list[str],
        placed: list[tuple[str, int]],
        reuse: Reuse,
    ) -> bytes:
        """What :meth:`written` will remember of this save (``names``: its shard file's
        name, and as stored), as an item of that shard (:data:`NOTE_KEY`)."""
        own = names[1]
        renamed = _renamed(checkpoint, names[0], own, reuse)
        files = {
            renamed[s]: [s, f.origin, f.size_bytes, f.xxh3_64, f.raw_bytes]
            for s, f in ((s, reuse.links[n]) for s, n in reuse.stored.items())
        }
        items = [
            [key, renamed[f], i, reuse.digests[pos], reuse.kinds[pos]]
            for pos, (key, (f, i)) in enumerate(zip(keys, placed, strict=True))
        ]
        since_full = 0 if not reuse.items else self._since_full + 1
        body = {"v": _NOTE_VERSION, "own": renamed[own], "files": files, "items": items}
        body["since_full"] = since_full
        return json.dumps(body, separators=(",", ":")).encode()

    def _full_due(self) -> bool:
        return self.full_every > 0 and self._since_full + 1 >= self.full_every

    def start(
        self,
        entries: list[tuple[str, Any, Any]],
        fqns: list[str] | None,
        pool: Executor,
        full: bool = False,
    ) -> Hashing:
        """Start hashing ``entries`` (key, raw bytes, dtype; ``fqns``: each one's
        tensor) on ``pool``, but those that changed for certain: an item whose tensor's
        version counter moved since the last save, its storage the same (cheap
        detection first; the hash decides whether an item is unchanged). The caller writes those
        (:attr:`Hashing.moved`) while the rest are hashed."""
        known = self.versions or {}
        versions: list[tuple[int, int] | None] = (
            [known.get(f) for f in fqns] if fqns is not None else [None] * len(entries)
        )
        moved, hashed, given = [], [], {}
        for pos, (key, raw, _) in enumerate(entries):
            if fqns is not None and (found := self.given.get(fqns[pos])) and found[1] == len(raw):
                given[pos] = found[0]  # hashed where it lay while staging, and unchanged
                continue
            held = self._items.get(key)
            now = versions[pos]
            # The same storage with another version: written to since, for certain.
            # Another storage (a state built anew each save) says nothing: hashed.
            if (
                held is not None
                and held.version is not None
                and now is not None
                and held.version[1] == now[1]
                and held.version[0] != now[0]
            ):
                moved.append(pos)
            else:
                hashed.append(pos)
        self.hashed_bytes = sum(len(entries[p][1]) for p in hashed)
        self.hashed_tensors = {}
        result, jobs = start_hashing([entries[p][1] for p in hashed], pool)
        # What staging did not find unchanged is (at most) what is written, if this save
        # can link at all; a full one writes everything (None: size unknown, the file is
        # written as a full save's). Where staging found nothing and the last save had
        # nothing worth linking (full training), it is likely a full one too.
        expected: int | None = sum(len(e[1]) for p, e in enumerate(entries) if p not in given)
        likely_full = bool(not given and self._items and not self._matched)
        if full or not (self._items or self._restored) or self._full_due() or likely_full:
            expected = None
        return Hashing(moved, hashed, result, jobs, versions, given, fqns, expected, pool)

    def plan(
        self,
        pending: Any,
        backend: Any,
        entries: list[tuple[str, Any, Any]],
        hashing: Hashing,
        names: tuple[str, str] = ("", ""),
        full: bool = False,
    ) -> Reuse:
        """Once ``hashing`` is done: link what the last save holds unchanged into
        ``pending`` (``full``: nothing, a full save on demand), from ``backend``'s
        files, each first checked to be the one this rank wrote (its size and index
        checksum: a checkpoint replaced under the same name is not linked from)."""
        # A rank with nothing in memory that restored a checkpoint notes this save even
        # if it links nothing (its restored one had no note): a run that restarts after
        # every save still links from the save before.
        restarted = self._restored is not None and not self._items
        if restarted:
            self._seed(backend, names[0])
        digests = [""] * len(entries)
        got = hashing.result()
        for pos, d in zip(hashing.hashed, got, strict=True):
            digests[pos] = d
        if hashing.fqns is not None:  # what staging compares with next (engine.unchanged)
            self.hashed_tensors = {
                hashing.fqns[p]: (d, len(entries[p][1]))
                for p, d in zip(hashing.hashed, got, strict=True)
            }
        for pos, d in hashing.given.items():
            digests[pos] = d
        versions = hashing.versions
        reuse = Reuse(digests, [f"{e[2]}|{len(e[1])}" for e in entries], versions)
        used: dict[str, int] = {}
        for pos, (key, raw, _) in enumerate(entries):
            held = self._items.get(key)
            if (
                held is not None
                and reuse.digests[pos]
                and (held.digest, held.kind) == (reuse.digests[pos], reuse.kinds[pos])
            ):
                reuse.items[pos] = (held.file, held.item)
                used[held.file] = used.get(held.file, 0) + len(raw)
        worth = {f for f, n in used.items() if n >= MIN_USED * self._files[f].raw_bytes}
        # A state that links from its last save is worth a note for after a restart
        # (where everything changes, as in full training, it would be bytes for nothing).
        reuse.noted = reuse.matched = bool(worth)
        reuse.noted |= restarted
        if full or self._full_due():
            reuse.items = {}
            return reuse  # a full save
        reuse.items = {pos: fi for pos, fi in reuse.items.items() if fi[0] in worth}
        reuse.links = {f: self._files[f] for f in worth}
        reuse.raw_linked = sum(used[f] for f in worth)
        # Each file is linked under this attempt's name for it (object stores make
        # names unique per attempt: PendingCheckpoint.stored_name)
        stored = {name: pending.stored_name(name) for name in reuse.links}
        read: dict[str, set[int]] | None = None
        if self.read_through:
            read = {name: set() for name in reuse.links}
            for f, i in reuse.items.values():
                read[f].add(i)
        indexes = {
            name: _index(backend, f, None if read is None else read[name], hashing.pool)
            for name, f in reuse.links.items()
        }
        where_ok = all(
            (index := indexes[f]) is not None
            and 0 <= i < len(index)
            and index[i] == (entries[pos][0], len(entries[pos][1]))
            for pos, (f, i) in reuse.items.items()
        )
        if reuse.links and not (
            where_ok
            and pending.link_files({stored[name]: f.source for name, f in reuse.links.items()})
        ):
            reuse.items, reuse.links, reuse.raw_linked = {}, {}, 0
            reuse.noted = False  # as without incremental saves: nothing but the state
        reuse.items = {pos: (stored[f], i) for pos, (f, i) in reuse.items.items()}
        reuse.stored = {stored[name]: name for name in reuse.links}
        return reuse

    def written(
        self,
        checkpoint: str,
        shard: tuple[str, str, ShardInfo],
        entries: list[tuple[str, Any, Any]],
        placed: list[tuple[str, int]],
        reuse: Reuse,
    ) -> dict[str, Any]:
        """Note where checkpoint ``checkpoint`` holds each item (``placed[pos]``: the
        stored file and item of ``entries[pos]``; ``shard``: the file this save wrote, its
        name and stored name, and info), to be compared with if the save commits.
        Returns the linked files' facts, by stored name."""
        name, own, info = shard
        renamed = _renamed(checkpoint, name, own, reuse)
        files = {
            renamed[s]: dataclasses.replace(f, source=f"{checkpoint}/{s}")
            for s, f in ((s, reuse.links[n]) for s, n in reuse.stored.items())
        }
        files[renamed[own]] = _File(
            f"{checkpoint}/{own}",
            checkpoint,
            info.size_bytes,
            info.index_xxh3,
            info.raw_bytes,  # the note's bytes taken out (the writer)
        )
        items = {
            key: _Held(renamed[f], i, reuse.digests[pos], reuse.kinds[pos], reuse.versions[pos])
            for pos, (key, (f, i)) in enumerate(zip([e[0] for e in entries], placed, strict=True))
        }
        self._next = (items, files, not reuse.items, reuse.matched)
        self.linked_bytes = reuse.raw_linked
        return {
            s: {"size_bytes": f.size_bytes, "xxh3_64": f.xxh3_64, "from": f.origin}
            for s, f in ((s, reuse.links[n]) for s, n in reuse.stored.items())
        }

    def commit(self) -> None:
        """The save committed on every rank: the next one compares with it."""
        if self._next is None:
            return
        self._items, self._files, full, self._matched = self._next
        self._next = None
        self._since_full = 0 if full else self._since_full + 1

    def drop(self) -> None:
        """The save failed: the next compares with the last committed one, as before."""
        self._next = None


def _renamed(checkpoint: str, name: str, own: str, reuse: Reuse) -> dict[str, str]:
    """stored name -> the name each file of this save gets when the next one links it:
    a linked file keeps its name; this save's own is named after it (``own``, stored as
    ``name``), unlike any file it links (a step deleted and saved again: a file linked
    from its first incarnation has that name)."""
    stem, ext = posixpath.splitext(name)
    renamed = dict(reuse.stored)
    link_as, n = f"{stem}-{checkpoint}{ext}", 1
    while link_as in renamed.values():
        n += 1
        link_as = f"{stem}-{checkpoint}.{n}{ext}"
    renamed[own] = link_as
    return renamed
