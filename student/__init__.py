"""The student: frozen Whisper encoder -> Q-Former -> projection -> frozen LLM, trained from the cache."""
