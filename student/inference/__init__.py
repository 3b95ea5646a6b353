"""Using a trained student: loading and exporting it (`checkpoint`), answering speech (`generate`: greedy or sampled,
batched or streamed) and answering a whole manifest (`answer`)."""
