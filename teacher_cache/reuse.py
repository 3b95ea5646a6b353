"""What an incremental build takes from earlier caches instead of recomputing (`diva cache build --reuse OLD`).

    reused caches --(their teacher key = ours?)--> rows by utterance id: (text, audio sha256, shard file, row)
    new manifest row (id, text, audio sha256) --match--> that row's stored values, as they are (bit for bit)
                                              --no match--> the teacher runs on it
    reused caches' audio tars by their file hash --> an identical new audio shard becomes a hard link to one

A teacher row depends on its transcript and the teacher alone, but a row is reused only when its id, transcript
and audio bytes (their sha256) all match: a re-recorded clip under the same id is new data. The teacher key is
the fingerprint less the manifest, format and code version (`index.teacher_key`), so a cache of another teacher,
prompt, dtype or answer setting lends its audio shards but no teacher rows. A format-1 cache (audio and tensors
in shared shards) lends its teacher rows too: their audio checksums are taken from its tars.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diva.teacher_cache.index import AUDIO, FORMAT, OLD_FORMAT, TEACHER, CacheError, read_index, teacher_key
from diva.teacher_cache.read import table_rows
from diva.teacher_cache.write import Answer, TeacherRow, recorded_hash

OPEN_TABLES = 4  # reused Parquet shards kept decoded at once (new shards mostly draw from neighbouring old ones)


def _v1_audio_checksums(tar_path: Path) -> dict[str, str]:
    """id -> sha256 of the audio member of each sample of a format-1 tar (its .json names the extension)."""
    members: dict[str, dict[str, bytes]] = {}
    with tarfile.open(tar_path) as tar:
        for member in tar:
            key, _, ext = member.name.partition(".")
            if ext == "json" or not ext.endswith(".npy.zst"):
                members.setdefault(key, {})[ext] = tar.extractfile(member).read()  # type: ignore[union-attr]
    out = {}
    for sample in members.values():
        meta = json.loads(sample["json"])
        out[meta["id"]] = hashlib.sha256(sample[meta["audio_ext"]]).hexdigest()
    return out


@dataclass
class ReusedCaches:
    """The rows and audio shards that `caches` can lend to a build whose fingerprint is `fingerprint`."""

    caches: list[Path]
    fingerprint: dict[str, Any]
    files: list[Path] = field(default_factory=list)  # teacher Parquet shards rows are taken from
    rows: dict[str, tuple[str, str, int, int]] = field(default_factory=dict)  # id -> (text, sha, file, row)
    audio_tars: dict[tuple[str, str], Path] = field(default_factory=dict)  # (hash, digest) -> a tar of those bytes
    not_lending: dict[str, str] = field(default_factory=dict)  # cache -> why it lends no teacher rows
    _open: OrderedDict = field(default_factory=OrderedDict)

    def __post_init__(self) -> None:
        for cache in self.caches:
            self._add(Path(cache))

    def _add(self, cache: Path) -> None:
        index = read_index(cache, any_format=True)
        if index.get("format") not in (FORMAT, OLD_FORMAT):
            raise CacheError(f"{cache}: a cache of format {index.get('format')!r}, which this diva cannot reuse")
        old = index.get("format") == OLD_FORMAT
        for shard in index["shards"] if not old else []:
            facts = shard["files"][f"{AUDIO}/{shard['shard']:05d}.tar"]
            self.audio_tars.setdefault(recorded_hash(facts), cache / AUDIO / f"{shard['shard']:05d}.tar")
        theirs, ours = teacher_key(index["fingerprint"]), teacher_key(self.fingerprint)
        if theirs != ours:
            differ = sorted(k for k in {*theirs, *ours} if theirs.get(k) != ours.get(k))
            self.not_lending[str(cache)] = f"built with other teacher settings ({', '.join(differ)} differ)"
            return
        import pyarrow.parquet as pq

        for shard in index["shards"]:
            name = f"{shard['shard']:05d}"
            path = cache / ("shards" if old else TEACHER) / f"{name}.parquet"
            table = pq.read_table(path, columns=["id", "text"] if old else ["id", "text", "audio_sha256"])
            ids, texts = table.column("id").to_pylist(), table.column("text").to_pylist()
            if old:
                checksums = _v1_audio_checksums(cache / "shards" / f"{name}.tar")
                shas = [checksums[i] for i in ids]
            else:
                shas = table.column("audio_sha256").to_pylist()
            self.files.append(path)
            for r, (utt_id, text, sha) in enumerate(zip(ids, texts, shas, strict=True)):
                self.rows.setdefault(utt_id, (text, sha, len(self.files) - 1, r))  # the first cache given wins

    def lookup(self, utt_id: str, text: str, audio_sha256: str) -> tuple[int, int] | None:
        """(file, row) of a reusable row with this id, transcript and audio, or None."""
        found = self.rows.get(utt_id)
        if found is None or found[0] != text or found[1] != audio_sha256:
            return None
        return found[2], found[3]

    def _table_rows(self, file: int) -> list[dict[str, Any]]:
        if file not in self._open:
            import pyarrow.parquet as pq

            self._open[file] = table_rows(pq.read_table(self.files[file]))
            if len(self._open) > OPEN_TABLES:
                self._open.popitem(last=False)
        self._open.move_to_end(file)
        return self._open[file]

    def take(self, hit: tuple[int, int], audio_sha256: str) -> TeacherRow:
        """The stored row at `hit` as a TeacherRow, its tensors in the stored dtype (written back bit for bit)."""
        row = self._table_rows(hit[0])[hit[1]]
        answer = None
        if "answer_ids" in row:
            answer = Answer(
                [int(t) for t in row["answer_ids"]], row["answer_text"], hidden=row.get("answer_hidden"),
                topk_ids=row.get("answer_topk_ids"), topk_logprobs=row.get("answer_topk_logprobs"),
            )  # fmt: skip
        return TeacherRow(row["id"], row["text"], audio_sha256, [int(t) for t in row["text_ids"]], row["h_t"],
                          row.get("embeddings"), answer)  # fmt: skip
