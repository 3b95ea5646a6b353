"""One reader per corpus kind. Each yields, in a deterministic order, a Candidate for every row it could
parse and a Reject (reason `unparseable_row`) for every row it could not; validation happens later."""
