"""The training recipe (`train`: one readable function over the parts below), its data (`data`: the cache's
deterministic order, batches, encoder outputs), data-parallel runs (`distributed`), the X-OPD term (`xopd`) and the
periodic held-out evaluation (`heldout`)."""
