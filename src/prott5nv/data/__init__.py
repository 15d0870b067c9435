"""Training data: FASTA -> :mod:`.preprocess` -> :mod:`.store` (memory-mapped splits) -> :mod:`.masking`
(T5 span corruption, collation) -> :mod:`.sampler` / :mod:`.batching` (distributed, resumable order and
token-budget batches) -> :mod:`.dataset` (the torch Dataset). Nothing here imports models."""
