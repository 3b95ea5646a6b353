"""The student network (`network`: frozen Whisper encoder -> Q-Former or MLP -> projection -> frozen LLM), its
log-mel features (`features`), its training losses (`losses`) and the scores of its outputs against the teacher
(`metrics`, shared by the trainer's held-out evaluation and `diva eval`)."""
