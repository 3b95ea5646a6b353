"""The vllm teacher backend against the transformers one, on a tiny random Llama and real transcripts.

A vLLM engine takes ~40 s to start on 2 cores, so ONE starts per run: the session fixture `vllm_run` runs
tests/vllm_probe.py in a subprocess (vLLM spawns processes, which re-import the main module: a script
guarded by `__main__`, as the `diva` command is), which builds a cache with `diva cache build --set
cache.backend=vllm` and then encodes a set of prompts with the same engine. The tests compare both with
the hf backend. Without vllm installed they skip, which CI=true turns into a failure.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from diva.audio import AudioError, probe
from diva.config import CacheConfig, RuntimeConfig
from diva.manifests.record import Utterance
from diva.manifests.store import ManifestWriter
from diva.teacher_cache.prompt import build_prompt, teacher_input_ids, transcript_ids

PROBE_SCRIPT = Path(__file__).with_name("vllm_probe.py")
TOLERANCE = 1e-4  # float32; measured ~1e-6
N_UTTERANCES = 10  # plus the non-English clips
SHARD_SIZE = 4  # several shards: several backend calls in one build


def require_vllm() -> None:
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vllm is not installed (make install-vllm)")


def pick_rows(speech_dir: Path, n: int) -> list[dict[str, str]]:
    """Clips of transcripts.tsv with distinct transcripts and audio that opens: `n` spread from the shortest
    text to the longest, plus the non-English ones (multi-byte text)."""
    with open(speech_dir / "transcripts.tsv", encoding="utf-8", newline="") as f:
        by_text = {r["transcript"]: r for r in csv.DictReader(f, delimiter="\t") if r["transcript"].strip()}
    rows = sorted(by_text.values(), key=lambda r: (len(r["transcript"]), r["file"]))
    picked = [rows[round(i * (len(rows) - 1) / (n - 1))] for i in range(n)]
    picked += [r for r in rows if r["language"] != "en" and r not in picked]
    return [r for r in picked if _opens(speech_dir / r["file"])]


def _opens(path: Path) -> bool:
    try:
        probe(path)
    except AudioError:
        return False
    return True


def write_manifest(speech_dir: Path, rows: list[dict[str, str]], out_dir: Path) -> Path:
    writer = ManifestWriter(out_dir)
    for row in rows:
        info = probe(speech_dir / row["file"])
        writer.write(
            Utterance(
                id=row["file"], audio=str((speech_dir / row["file"]).resolve()), duration_s=info.duration_s,
                sample_rate=info.sample_rate, channels=info.channels, text=row["transcript"],
                language=row["language"] or None, corpus="shared-speech",
            )
        )  # fmt: skip
    writer.commit({"source": "tests/test_vllm_backend.py"})
    return out_dir


def build_prompts(teacher: Path, texts: list[str]) -> list[list[int]]:
    """Teacher inputs from 4 to ~120 tokens: a bare 4-token start, each transcript in the chat prompt, and
    all transcripts joined up to ~100 text tokens."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(teacher)
    prompt = build_prompt(tokenizer)
    prompts = [list(prompt.prefix_ids[:4])]
    prompts += [teacher_input_ids(prompt, transcript_ids(tokenizer, text)) for text in texts]
    joined = transcript_ids(tokenizer, " ".join(sorted(texts, key=len, reverse=True)))[:100]
    prompts.append(teacher_input_ids(prompt, joined))
    return prompts


@dataclass(frozen=True)
class VLLMRun:
    """What the probe subprocess produced."""

    teacher: Path
    manifest: Path
    cache: Path
    prompts: list[list[int]]
    hidden: dict[str, np.ndarray]
    report: dict
    wall_s: float


@pytest.fixture(scope="session")
def vllm_run(tiny_llama: Path, speech_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> VLLMRun:
    """One vLLM engine for the session: a vllm-backend cache build through the CLI, then `final_hidden` on
    the prompts, in a subprocess."""
    require_vllm()
    work = tmp_path_factory.mktemp("vllm")
    rows = pick_rows(speech_dir, N_UTTERANCES)
    manifest = write_manifest(speech_dir, rows, work / "manifest")
    prompts = build_prompts(tiny_llama, [r["transcript"] for r in rows])
    (work / "prompts.json").write_text(json.dumps(prompts))
    command = [
        sys.executable, str(PROBE_SCRIPT), "--teacher", str(tiny_llama), "--manifest", str(manifest),
        "--cache", str(work / "cache-vllm"), "--prompts", str(work / "prompts.json"), "--out", str(work / "out"),
        "--shard-size", str(SHARD_SIZE),
    ]  # fmt: skip
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, timeout=480)
    wall_s = time.perf_counter() - start
    assert result.returncode == 0, (
        f"vllm probe failed ({result.returncode}):\n{result.stdout[-6000:]}\n{result.stderr[-8000:]}"
    )
    report = json.loads((work / "out" / "probe.json").read_text())
    print(f"vllm probe: {wall_s:.1f} s in all; {report}")
    with np.load(work / "out" / "hidden.npz") as data:
        hidden = {k: data[k] for k in data.files}
    return VLLMRun(tiny_llama, manifest, work / "cache-vllm", prompts, hidden, report, wall_s)


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max())


@pytest.mark.slow
def test_final_hidden_matches_transformers(vllm_run: VLLMRun) -> None:
    from diva.teacher_cache.backends.hf import HFTeacher

    lengths = [len(p) for p in vllm_run.prompts]
    assert min(lengths) == 4 and max(lengths) >= 100, lengths
    hf = HFTeacher(vllm_run.teacher, dtype="float32")
    expected = np.stack(hf.final_hidden(vllm_run.prompts))  # (N, d)
    got = vllm_run.hidden["forward"]
    assert got.dtype == np.float32 and got.shape == expected.shape == (len(lengths), hf.hidden_size)
    assert vllm_run.report["hidden_size"] == hf.hidden_size
    per_prompt = np.abs(got - expected).max(axis=1)
    by_length = [(n, f"{d:.1e}") for n, d in zip(lengths, per_prompt.tolist(), strict=True)]
    print(f"vllm vs hf final_hidden: max abs diff {per_prompt.max():.2e} over {len(lengths)} prompts of "
          f"{min(lengths)}-{max(lengths)} tokens; (tokens, diff): {by_length}")  # fmt: skip
    assert per_prompt.max() <= TOLERANCE
    # not L2-normalised: the raw hidden states keep their norm (a tiny random Llama's is ~11, not 1)
    assert not np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-3)
    # input order: the same prompts given reversed come back to the same rows
    assert max_abs_diff(vllm_run.hidden["reversed"], got) <= TOLERANCE


@pytest.mark.slow
def test_cache_build_matches_hf_build(vllm_run: VLLMRun, tmp_path: Path) -> None:
    from diva.teacher_cache.build import build_cache
    from diva.teacher_cache.index import read_index
    from diva.teacher_cache.read import open_table

    cfg = CacheConfig(backend="hf", dtype="float32", shard_size=SHARD_SIZE)
    build_cache(vllm_run.manifest, tmp_path / "cache-hf", vllm_run.teacher, cfg, RuntimeConfig(dtype="float32"))
    vllm_index, hf_index = read_index(vllm_run.cache), read_index(tmp_path / "cache-hf")
    assert vllm_index["fingerprint"] == hf_index["fingerprint"]  # interchangeable for the trainer
    assert vllm_index["provenance"]["last_run"]["backend"] == "vllm"
    assert vllm_index["rows"] == hf_index["rows"] > 0

    vllm_rows = open_table(vllm_run.cache).to_pydict()
    hf_rows = open_table(tmp_path / "cache-hf").to_pydict()
    assert vllm_rows["id"] == hf_rows["id"] and len(vllm_rows["id"]) == vllm_index["rows"] > 0
    assert vllm_rows["text_ids"] == hf_rows["text_ids"]
    diff = max_abs_diff(np.array(vllm_rows["h_t"]), np.array(hf_rows["h_t"]))  # (N, d) each
    print(f"vllm vs hf cache build: {len(vllm_rows['id'])} rows, h_T max abs diff {diff:.2e}")
    assert diff <= TOLERANCE


def test_engine_closed_and_timed(vllm_run: VLLMRun) -> None:
    assert vllm_run.report["children_after_close"] == []  # close() stopped the engine's processes
    print(f"vllm engine start {vllm_run.report['engine_start_s']:.1f} s, close {vllm_run.report['close_s']:.1f} s, "
          f"probe subprocess {vllm_run.wall_s:.1f} s")  # fmt: skip


def test_module_imports_without_vllm() -> None:
    """The backend module imports vllm only when a VLLMTeacher is made, and names the install command."""
    code = (
        "import sys; sys.modules['vllm'] = None\n"  # as if vllm were not installed
        "from diva.teacher_cache.backends import open_backend\n"
        "import diva.teacher_cache.backends.vllm\n"
        "try:\n"
        "    open_backend('vllm', 'unused')\n"
        "except ImportError as e:\n"
        "    print(e)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "make install-vllm" in result.stdout and "diva-distill[vllm]" in result.stdout, result.stdout
