"""Reading and writing other projects' checkpoint formats.

* :mod:`.nemo` -- NeMo / BioNeMo ``.nemo`` archives of Megatron T5 (read only) into the ``megatron`` family.
* :mod:`.hf` -- Hugging Face T5 directories (Rostlab ProtT5) to and from the ``t5`` family.
* :mod:`.sentencepiece` -- the pieces of a SentencePiece model, read without executing anything.
"""
