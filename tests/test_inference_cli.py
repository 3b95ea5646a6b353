"""Inference end to end through the CLI on the tiny random Whisper and Llama and real clips: `diva train` a few
steps, then `diva generate` (a line per row, an error line for unreadable audio, resumable), `diva chat` (a file
and stdin, the same answer as generate) and `diva eval` (n counts rows with a transcript only, metrics in range,
the student's cosine equals the direct forward's, every row's scores kept and averaged into the table), `diva
report` (verdicts from paired bootstrap intervals, shown in report.md); `--help` explains every option."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

from diva.audio import load_audio
from diva.cli import app
from diva.manifests.store import read_manifest
from diva.student.eval.evaluate import METRICS, length_batches
from diva.student.eval.render import render_markdown
from diva.student.eval.report import build_report
from diva.student.inference.checkpoint import load_pretrained, load_processors
from diva.student.inference.generate import generate
from diva.student.model.features import log_mel
from diva.student.model.metrics import blind_partners
from diva.teacher_cache.backends.hf import HFTeacher
from diva.teacher_cache.prompt import teacher_input_ids, transcript_ids
from diva.tests.test_train import _build, _clips

MAX_NEW = 6


def _invoke(args: list[str], **kw):
    result = CliRunner().invoke(app, args, **kw)
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def run(speech_dir: Path, tiny_whisper: Path, tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    return trained_student(speech_dir, tiny_whisper, tiny_llama, tmp_path_factory.mktemp("inference"))


def trained_student(speech_dir: Path, tiny_whisper: Path, tiny_llama: Path, base: Path) -> dict:
    """A tiny student trained 2 steps by `diva train` on 6 digit clips; the Whisper folder is a copy of the tiny
    Whisper with a tokenizer (the tiny Llama's: its ids cover Whisper's 1,024), so the cascade can decode."""
    from transformers import AutoTokenizer

    whisper = base / "whisper"
    shutil.copytree(tiny_whisper, whisper)
    AutoTokenizer.from_pretrained(tiny_llama).save_pretrained(whisper)
    rows = _clips(speech_dir)[:6]
    cache = _build(speech_dir, rows, tiny_llama, base / "data")
    args = ["train", "--cache", str(cache), "--out", str(base / "run"), "-c", "tiny",
            "--set", f"models.whisper={whisper}", "--set", f"models.llm={tiny_llama}", "--set", "train.steps=2",
            "--set", "train.batch_size=2", "--set", "student.num_queries=8", "--set", "student.long_text=truncate",
            "--set", "runtime.threads=1", "--set", "runtime.device=cpu"]  # fmt: skip
    _invoke(args)
    return {"dir": base / "run", "manifest": base / "data" / "m", "base": base, "clip": speech_dir / rows[0]["file"]}


@pytest.fixture(scope="module")
def loaded(run: dict):
    student, info = load_pretrained(run["dir"])
    return student, info, *load_processors(info)


def _generate(loaded, audios: list[np.ndarray], max_new_tokens: int = MAX_NEW):
    student, info, tokenizer, fe = loaded
    return generate(student, audios, max_new_tokens=max_new_tokens, tokenizer=tokenizer, feature_extractor=fe,
                    trim_mel=info.student_cfg.trim_mel)  # fmt: skip


def _write_manifest(path: Path, utts: list[dict]) -> Path:
    path.write_text("".join(json.dumps(u) + "\n" for u in utts), encoding="utf-8")
    return path


def test_generate_answers_every_row_and_resumes(run: dict, loaded, tmp_path: Path) -> None:
    utts = [u.to_json() for u in read_manifest(run["manifest"])]
    bad_file = tmp_path / "not-audio.wav"
    bad_file.write_text("not a wav")
    bad = {**utts[0], "id": "bad", "audio": str(bad_file)}
    manifest = _write_manifest(tmp_path / "m.jsonl", [*utts[:2], bad, *utts[2:]])  # the bad row is row 3
    out = tmp_path / "answers.jsonl"
    args = ["generate", str(manifest), "-o", str(out), "--model", str(run["dir"]), "--batch-size", "2",
            "--max-new-tokens", str(MAX_NEW), "--limit", "5", "--device", "cpu"]  # fmt: skip
    result = _invoke(args)
    assert "answered 4 rows, 1 unreadable" in result.output
    lines = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert set(lines) == {u["id"] for u in utts[:4]} | {"bad"}
    assert lines["bad"]["row"] == 3 and "not-audio.wav" in lines["bad"]["error"]
    first = lines[utts[0]["id"]]
    alone = _generate(loaded, [load_audio(utts[0]["audio"])[0]])
    assert first["tokens"] == alone.token_ids[0] and first["answer"] == alone.texts[0]
    assert first["chunks"] == 1 and 0 < first["ttft_s"] <= first["seconds"] and first["audio_s"] > 0

    text = out.read_text()
    out.write_text(text + '{"id": "cut sh')  # a line cut short by a crash
    again = _invoke([*args[:-4], "--limit", "6", "--device", "cpu"])
    assert "answered 1 rows, 0 unreadable (error lines), 5 already in" in again.output
    assert out.read_text().startswith(text) and len(out.read_text().splitlines()) == 6


def test_chat_streams_the_generate_answer_from_a_file_and_stdin(run: dict, loaded) -> None:
    expected = _generate(loaded, [load_audio(run["clip"])[0]], max_new_tokens=12).texts[0]
    args = ["--model", str(run["dir"]), "--max-new-tokens", "12", "--device", "cpu"]
    from_file = _invoke(["chat", str(run["clip"]), *args])
    from_stdin = _invoke(["chat", "-", *args], input=run["clip"].read_bytes())
    assert from_file.stdout == from_stdin.stdout == expected + "\n"
    sampled = _invoke(["chat", str(run["clip"]), *args, "--temperature", "0.8", "--top-p", "0.9", "--seed", "1"])
    assert sampled.stdout.endswith("\n")
    instructed = _invoke(["chat", str(run["clip"]), *args, "--prompt", "Answer in one word."])
    student, info, tokenizer, fe = loaded
    expected = generate(student, [load_audio(run["clip"])[0]], "Answer in one word.", 12, tokenizer=tokenizer,
                        feature_extractor=fe, trim_mel=info.student_cfg.trim_mel).texts[0]  # fmt: skip
    assert instructed.stdout == expected + "\n"


def test_export_gives_a_folder_that_answers_the_same(run: dict, tmp_path: Path) -> None:
    exported = tmp_path / "student"
    _invoke(["export", "--model", str(run["dir"]), "-o", str(exported)])
    assert {p.name for p in exported.iterdir()} == {"config.json", "trainable.safetensors"}
    ask = ["chat", str(run["clip"]), "--max-new-tokens", str(MAX_NEW), "--device", "cpu"]
    assert _invoke([*ask, "--model", str(exported)]).stdout == _invoke([*ask, "--model", str(run["dir"])]).stdout


def test_chat_reports_unreadable_audio(run: dict, tmp_path: Path) -> None:
    bad = tmp_path / "x.wav"
    bad.write_text("nope")
    result = CliRunner().invoke(app, ["chat", str(bad), "--model", str(run["dir"]), "--device", "cpu"])
    assert result.exit_code == 2 and "x.wav" in result.output


def test_eval_scores_rows_with_a_transcript(run: dict, loaded, tmp_path: Path) -> None:
    utts = [u.to_json() for u in read_manifest(run["manifest"])][:4]
    utts.sort(key=lambda u: -u["duration_s"])  # longest first: eval batches shortest first, reports manifest order
    assert utts[0]["duration_s"] > utts[-1]["duration_s"]
    manifest = _write_manifest(tmp_path / "m.jsonl", [utts[0], {**utts[1], "id": "silent", "text": " "}, *utts[1:]])
    report_path = tmp_path / "report.json"
    args = ["eval", "--model", str(run["dir"]), "--manifest", str(manifest), "--limit", "10", "--batch-size", "2",
            "--max-new-tokens", str(MAX_NEW), "--systems", "student,cascade,blind,floor", "-o", str(report_path),
            "--device", "cpu"]  # fmt: skip
    result = _invoke(args)
    report = json.loads(report_path.read_text())
    assert report["n"] == 4 and report["skipped"] == 1 and "n = 4 rows" in result.output
    assert set(report["systems"]) == {"student", "cascade", "blind", "floor"} and "cascade" in result.output
    for metrics in report["systems"].values():
        assert -1 <= metrics["cosine"] <= 1 and metrics["kl"] >= 0 and metrics["distill"] >= 0
        assert all(0 <= metrics[k] <= 1 for k in ("top1_agree", "identical", "first4", "first8", "answer_f1",
                                                  "prefix_frac"))  # fmt: skip
        assert 0 <= metrics["prefix_tokens"] <= MAX_NEW
    assert set(report["per_row"]) == set(report["systems"])
    for name, per_row in report["per_row"].items():  # every row's score, in manifest order; the table averages them
        fed_audio = {"align_acc"} if name in ("student", "blind", "floor") else set()  # the cascade gets text
        assert set(per_row) == set(METRICS) | {"answer_top1"} | fed_audio == set(report["systems"][name])
        assert all(0 <= x <= 1 for x in per_row["answer_top1"])
        for key, values in per_row.items():
            assert len(values) == 4 and report["systems"][name][key] == pytest.approx(sum(values) / 4, rel=1e-12)
        for row in zip(per_row["identical"], per_row["first8"], per_row["first4"], strict=True):
            assert row[0] <= row[1] <= row[2]  # an identical answer starts like the teacher's; 8 tokens imply 4
    printed = {line.split("│")[1].strip(): line for line in result.output.splitlines() if line.count("│") > 2}
    f1_cells = [f"{report['systems'][name]['answer_f1']:.3f}" for name in report["systems"]]  # a row per metric
    assert {"first 4", "first 8"} <= set(printed) and all(cell in printed["answer F1"] for cell in f1_cells)
    assert report["cascade_wer"] >= 0 and 0 <= report["blind_same_text"] <= 1
    assert report["examples"][0]["transcript"] == utts[0]["text"] and "whisper_transcript" in report["examples"][0]
    assert [r["id"] for r in report["rows"]] == [u["id"] for u in utts]  # every scored row's answers, in order
    assert all({"teacher", "student", "cascade", "blind", "floor"} <= set(r) for r in report["rows"])
    markdown = render_markdown(report).splitlines()
    assert markdown[0].startswith("| system | cos(h, h_T) |") and markdown[2].startswith("| student | ")
    assert len(markdown[0].split("|")) == len(markdown[2].split("|")) and any("WER" in line for line in markdown)

    student, info, tokenizer, fe = loaded  # the student's cosine, from the training forward and the cache's teacher
    features, frames = log_mel([load_audio(u["audio"])[0] for u in utts], fe, trim=info.student_cfg.trim_mel)
    with torch.no_grad():
        h_s = student(features, frames).h_s  # (4, d)
    teacher = HFTeacher(info.llm_dir, batch_size=4, device="cpu")
    ids = [teacher_input_ids(info.prompt, transcript_ids(tokenizer, u["text"])) for u in utts]
    h_t = torch.tensor(np.stack(teacher.final_hidden(ids)))  # (4, d): h_T as the teacher cache computes it
    cosine = torch.nn.functional.cosine_similarity(h_s, h_t, dim=-1)  # (4,): each row's, in manifest order
    assert report["per_row"]["student"]["cosine"] == pytest.approx(cosine.tolist(), abs=1e-4)
    assert report["systems"]["student"]["cosine"] == pytest.approx(float(cosine.mean()), abs=1e-4)
    partner = blind_partners(4)  # the blind control: each row's h_T against its partner's speech, across batches
    blind = torch.nn.functional.cosine_similarity(h_s[partner], h_t, dim=-1)  # (4,): row i against row i's teacher
    assert report["per_row"]["blind"]["cosine"] == pytest.approx(blind.tolist(), abs=1e-4)
    assert report["systems"]["blind"]["cosine"] == pytest.approx(float(blind.mean()), abs=1e-4)
    # and its answer to row i is the student's answer to row partner[i]'s audio (decoded once, scored twice)
    assert [r["blind"] for r in report["rows"]] == [report["rows"][j]["student"] for j in partner]

    # align acc by hand: the last N of the Q training-forward audio tokens (the run's align_slots), a transcript of
    # Q or more tokens cut to its last Q - 1, each slot's argmax v E^T against the transcript's token there
    with torch.no_grad():
        v = student(features, frames).audio_tokens  # (4, Q, d)
    table = student.llm.get_input_embeddings().weight  # (vocab, d)
    q = v.shape[1]
    assert info.student_cfg.align_slots == "last"
    texts = [transcript_ids(tokenizer, u["text"]) for u in utts]

    def share(best: torch.Tensor, ids: list[int]) -> float:
        kept = ids[-(q - 1) :] if len(ids) >= q else ids
        return float((best[q - len(kept) :] == torch.tensor(kept)).float().mean())

    own = [share((v[i].float() @ table.float().T).argmax(-1), ids) for i, ids in enumerate(texts)]
    assert report["per_row"]["student"]["align_acc"] == pytest.approx(own, abs=1e-6)
    borrowed = [share((v[partner[i]].float() @ table.float().T).argmax(-1), ids) for i, ids in enumerate(texts)]
    assert report["per_row"]["blind"]["align_acc"] == pytest.approx(borrowed, abs=1e-6)
    kept = [ids[-(q - 1) :] if len(ids) >= q else ids for ids in texts]  # the constant: the commonest aligned token
    common = Counter(t for ids in kept for t in ids).most_common(1)[0][0]
    constant = [sum(t == common for t in ids) / len(ids) for ids in kept]
    assert report["align_constant_per_row"] == pytest.approx(constant) and report["align_constant"] == pytest.approx(
        sum(constant) / 4
    )
    assert any(line.startswith("│ align acc") for line in result.output.splitlines())


def test_length_batches_group_the_shortest_rows_first() -> None:
    assert length_batches([20.0, 1.0, 3.0, 1.0, 15.0], 2) == [[1, 3], [2, 4], [0]]
    assert length_batches([], 4) == [] and length_batches([2.0], 8) == [[0]]


def test_blind_partners_pair_every_row_with_another_one() -> None:
    assert blind_partners(40) == blind_partners(40) and blind_partners(40, seed=1) != blind_partners(40)
    for n in (2, 3, 8, 40):
        partner = blind_partners(n)
        assert sorted(partner) == list(range(n)) and all(partner[i] != i for i in range(n))
    neighbours = sum(abs(i - j) == 1 for i, j in enumerate(blind_partners(40)))
    assert neighbours < 10  # not the batch rolled by one
    with pytest.raises(ValueError, match="1 row"):
        blind_partners(1)


def test_report_writes_tables_verdicts_and_curves_once(run: dict) -> None:
    args = ["report", "--model", str(run["dir"]), "--manifest", str(run["manifest"]), "--real", str(run["manifest"]),
            "--limit", "4", "--batch-size", "2", "--max-new-tokens", str(MAX_NEW), "--device", "cpu"]  # fmt: skip
    result = _invoke(args)
    report = json.loads((run["dir"] / "report.json").read_text())
    assert set(report["sets"]) == {"held-out synthetic speech", "real recordings"} and report["step"] == 2
    for result_set in report["sets"].values():
        assert result_set["n"] == 4 and set(result_set["systems"]) == {"student", "cascade", "blind", "floor"}
        assert all(len(v) == 4 for name in result_set["per_row"].values() for v in name.values())
        for ref in ("floor", "blind"):
            verdict = result_set["verdicts"][f"beats_{ref}"]
            assert set(verdict["per_metric"]) >= {"cosine", "top1_agree", "kl", "first4", "first8", "answer_f1"}
            for key, ci in verdict["per_metric_ci"].items():  # the verdict is the interval's, not the means'
                assert ci["low"] <= ci["high"]
                expected = "better" if ci["low"] > 0 else "worse" if ci["high"] < 0 else "tie"
                assert verdict["per_metric"][key] == expected
        assert result_set["verdicts"]["bootstrap"] == {"n": 4, "resamples": 2000, "seed": 0, "level": 0.95}
        assert set(result_set["verdicts"]["gap_closed"]) >= {"first4", "first8", "answer_f1"}
    markdown = (run["dir"] / "report.md").read_text()
    assert "| student | " in markdown and "student better than blind" in markdown and "n = 4 rows" in markdown
    assert "| metric | student - floor [95% interval] | student - blind [95% interval] |" in markdown
    assert markdown.count("paired bootstrap over the n = 4 rows (2000 resamples, seed 0)") == 2  # one per set
    assert "paired-bootstrap interval of the per-row difference excludes 0: 2000 resamples, seed 0" in result.output
    assert (run["dir"] / "curves_train.png").read_bytes()[:4] == b"\x89PNG" and "curves_train.png" in markdown
    for ref in ("floor", "blind"):  # the CLI says what the report says, reasons included
        said = next(line for line in markdown.splitlines() if line.startswith(f"- student better than {ref}: "))
        assert f"  student better than {ref}: {said.split(': ', 1)[1]}" in result.output
    again = _invoke(args)  # nothing changed: nothing recomputed
    assert "up to date" in again.output
    old = json.loads((run["dir"] / "report.json").read_text())  # a report.json from before the paired verdicts
    del old["request"]["bootstrap"]
    for result_set in old["sets"].values():
        del result_set["per_row"]
    (run["dir"] / "report.json").write_text(json.dumps(old))
    assert "up to date" not in _invoke(args).output  # rebuilt, not reused
    assert all("per_row" in s for s in json.loads((run["dir"] / "report.json").read_text())["sets"].values())

    calls: list[tuple[str, int, int]] = []  # each set reports its start (0 rows done) before its first batch
    sets = {"first": run["manifest"], "second": run["manifest"]}
    build_report(run["dir"], sets, 4, 2, MAX_NEW, ("student",), "cpu", force=True, progress=lambda *c: calls.append(c))
    assert calls == [("first", 0, 4), ("first", 2, 4), ("first", 4, 4), ("second", 0, 4), ("second", 2, 4),
                     ("second", 4, 4)]  # fmt: skip


def test_ask_answers_a_spoken_question_twice(run: dict, loaded) -> None:
    utt = next(iter(read_manifest(run["manifest"])))  # the digits have no question: the first row is asked
    result = _invoke(["ask", "--model", str(run["dir"]), "--manifest", str(run["manifest"]), "--max-new-tokens",
                      str(MAX_NEW), "--device", "cpu"])  # fmt: skip
    assert f"transcript:               {utt.text}" in result.output
    student_line = next(line for line in result.output.splitlines() if line.startswith("student (hears"))
    expected = _generate(loaded, [load_audio(utt.audio)[0]]).texts[0].strip()
    assert student_line.split(": ", 1)[1].strip() == expected


def test_ablate_trains_each_variant_and_writes_one_table(run: dict, speech_dir: Path, tiny_llama: Path) -> None:
    out = run["base"] / "ablations"
    answers = _build(speech_dir, _clips(speech_dir)[:6], tiny_llama, run["base"] / "answers", "cache.answer_tokens=4",
                     "cache.answer_targets=ids")  # fmt: skip
    common = ["--cache", str(run["base"] / "data" / "cache"), "--manifest", str(run["manifest"]), "--out", str(out),
              "-c", "tiny", "--set", f"models.whisper={run['base'] / 'whisper'}", "--set", f"models.llm={tiny_llama}",
              "--set", "train.batch_size=2", "--set", "runtime.threads=1", "--steps", "2", "--limit", "3",
              "--device", "cpu"]  # fmt: skip
    refused = CliRunner().invoke(app, ["ablate", *common, "--variants", "both_losses,answer_kl"])
    assert refused.exit_code == 2 and "--answer-cache topk=DIR" in refused.output
    _invoke(["ablate", *common, "--variants", "both_losses,mlp,answer_ce", "--answer-cache", f"ids={answers}",
             "--real", str(run["manifest"])])  # fmt: skip
    text = (out / "ablations.md").read_text()
    table = text.splitlines()
    for label, lines in (("both losses (DiVA)", 3), ("MLP adapter (pooled frames)", 5),
                         ("+ whole-answer CE (answer ids)", 5)):  # 2 sets x (metrics, diffs but the reference) + cost
        assert sum(line.startswith(f"| {label} |") for line in table) == lines, label
    assert "## held-out" in text and "## real" in text and "## Cost" in text
    diff_line = next(line for line in table if line.startswith("| + whole-answer CE") and "[" in line)
    assert diff_line.count("[") == 5  # one interval per difference column
    data = json.loads((out / "ablations.json").read_text())
    assert set(data["rows"]) == {"both_losses", "mlp", "answer_ce"} and data["reference"] == "both_losses"
    for row in data["rows"].values():
        assert set(row["sets"]) == {"held-out", "real"} and all(s["n"] == 3 for s in row["sets"].values())
        assert row["s_per_utterance"] > 0 and row["cache_bytes_per_utterance"] > 0
    same = data["rows"]["both_losses"]["sets"]["held-out"]["vs_reference"]["top1_agree"]
    assert same["diff"] == same["low"] == same["high"] == 0.0 and same["verdict"] == "tie"  # the reference vs itself
    assert data["rows"]["answer_ce"]["cache"] == str(answers)
    assert "answer_loss: ce" in (out / "answer_ce" / "config.yaml").read_text()
    mlp_config = (out / "mlp" / "config.yaml").read_text()
    assert "adapter: mlp" in mlp_config and (out / "mlp" / "checkpoints" / "step_000002").is_dir()


def test_eval_refuses_an_unknown_system(run: dict) -> None:
    result = CliRunner().invoke(app, ["eval", "--model", str(run["dir"]), "--manifest", str(run["manifest"]),
                                      "--systems", "student,oracle"])  # fmt: skip
    assert result.exit_code == 2 and "oracle" in result.output


@pytest.mark.parametrize("command", ["chat", "generate", "eval", "report", "ask", "ablate", "export"])
def test_help_explains_every_option(command: str) -> None:
    click_command = typer.main.get_command(app).commands[command]
    result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "200", "TERMINAL_WIDTH": "200"})
    assert result.exit_code == 0
    for param in click_command.params:
        assert param.help and len(param.help) > 10, f"{command} {param.name} has no help"
        for name in param.opts if param.param_type_name == "option" else []:
            assert name in result.output, f"{command} --help does not list {name}"


def test_answer_scores_count_identical_answers_and_shared_prefixes() -> None:
    from diva.student.eval.evaluate import ANSWER_METRICS, answer_scores, shared_prefix

    assert [shared_prefix([1, 2, 3], b) for b in ([1, 2, 3], [1, 2], [1, 5, 3], [4], [])] == [3, 2, 1, 0, 0]
    teacher = [[1, 2, 3, 9], [4, 9], [7, 8]]
    scores = answer_scores([[1, 2, 3, 9], [4, 5, 9], [6]], teacher)  # per row (tests/test_eval_stats.py: the rest)
    assert set(scores) == set(ANSWER_METRICS) and scores["identical"] == [1.0, 0.0, 0.0]
    assert scores["prefix_tokens"] == [4.0, 1.0, 0.0] and scores["prefix_frac"] == [1.0, 0.5, 0.0]


def test_verdicts_tell_better_tied_and_worse_apart() -> None:
    from diva.student.eval.evaluate import row_means
    from diva.student.eval.report import verdict_text, verdicts

    def rows(cosine, top1, kl, identical, n=4):  # every row scores the same: the interval is a point
        scores = {"cosine": cosine, "top1_agree": top1, "kl": kl, "identical": identical, "first4": top1,
                  "first8": top1, "answer_f1": top1, "prefix_tokens": top1, "prefix_frac": top1}  # fmt: skip
        return {k: [v] * n for k, v in scores.items()}

    per_row = {"student": rows(0.9, 0.5, 0.5, 0.0), "blind": rows(0.8, 0.6, 0.7, 0.0),
               "floor": rows(0.7, 0.1, 1.5, 0.0), "cascade": rows(1.0, 0.9, 0.1, 0.5)}  # fmt: skip
    v = verdicts({"n": 4, "per_row": per_row, "systems": row_means(per_row)})
    assert v["beats_blind"]["per_metric"]["kl"] == "better" and v["beats_blind"]["per_metric"]["top1_agree"] == "worse"
    assert v["beats_floor"]["per_metric"]["identical"] == "tie" and not v["beats_floor"]["all"]
    assert v["beats_floor"]["per_metric_ci"]["kl"] == {"diff": pytest.approx(1.0), "low": pytest.approx(1.0),
                                                       "high": pytest.approx(1.0)}  # fmt: skip
    assert verdict_text(v["beats_floor"]["per_metric"]) == "NO: tied (not distinguishable) on identical"
    worse_and_tied = ("NO: worse on top1_agree, first4, first8, answer_f1, prefix_tokens, prefix_frac; "
                      "tied (not distinguishable) on identical")  # fmt: skip
    assert verdict_text(v["beats_blind"]["per_metric"]) == worse_and_tied
    assert verdict_text({"cosine": "better", "kl": "better"}) == "yes, on every metric"
    assert v["gap_closed"]["cosine"] == pytest.approx(2 / 3) and v["gap_closed"]["kl"] == pytest.approx(1 / 1.4)
    assert v["gap_closed"]["first4"] == pytest.approx(0.4 / 0.8)
