"""Scoring a trained student against the teacher: `evaluate` (one set: student, cascade, audio-blind control,
floor), `report` (several sets, paired-bootstrap verdicts, curves), `ablations` (short runs varying one choice) and
`stats` (the paired bootstrap and the blind pairing)."""
