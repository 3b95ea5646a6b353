"""Corpus manifests: one clean record per utterance, and an account of every row left out."""
