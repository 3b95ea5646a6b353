"""An evaluation as a table: the columns every report shows, their markdown and the notes under them."""

from __future__ import annotations

from typing import Any

COLUMNS = {
    "cosine": "cos(h, h_T)",
    "top1_agree": "top-1 agree",
    "answer_top1": "answer top-1",
    "kl": "KL(T‖S)",  # not "||": a markdown table would split the cell
    "identical": "identical",
    "first4": "first 4",
    "first8": "first 8",
    "answer_f1": "answer F1",
    "prefix_tokens": "prefix (tokens)",
    "prefix_frac": "prefix (frac)",
    "align_acc": "align acc",
}


def table_rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The report's per-system table: header and rows of formatted cells (for markdown and the CLI's table); a
    metric an older report lacks reads n/a."""
    header = ["system", *COLUMNS.values()]
    rows = [[name, *(f"{metrics[k]:.3f}" if k in metrics else "n/a" for k in COLUMNS)]
            for name, metrics in report["systems"].items()]  # fmt: skip
    return header, rows


def report_notes(report: dict[str, Any]) -> list[str]:
    """The lines that go under the table: n, skipped rows, what the answer columns count, the cascade's WER, the
    blind control's same-text pairs."""
    notes = [f"n = {report['n']} rows with a transcript ({report['skipped']} without one skipped); answers up to "
             f"{report['max_new_tokens']} tokens, greedy"]  # fmt: skip
    notes.append("identical: whole answer equal to the teacher's; first 4 / first 8: starts with the teacher's first "
                 "4 / 8 tokens; answer F1: token-overlap F1; prefix: tokens shared from the start (and their share "
                 "of the teacher's answer)")  # fmt: skip
    if "cascade_wer" in report:
        notes.append(f"cascade: Whisper's transcripts have WER {report['cascade_wer']:.3f}")
    if "blind_same_text" in report:
        notes.append(f"blind: {report['blind_same_text']:.3f} of the pairs have identical transcripts")
    if "align_constant" in report:
        notes.append(f"align acc: the share of aligned audio-token slots whose best vocabulary token (v E^T) is the "
                     "transcript's; one token guessed in every slot (the commonest aligned transcript token) scores "
                     f"{report['align_constant']:.3f}")  # fmt: skip
    return notes


def render_markdown(report: dict[str, Any]) -> str:
    """The report as a markdown table followed by its notes."""
    header, rows = table_rows(report)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join([*lines, "", *(f"- {note}" for note in report_notes(report))]) + "\n"
