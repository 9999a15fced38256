"""The on-disk format of a storage unit: the header and its regions (:mod:`.header`),
how the regions are laid out per concealment mode and grown (:mod:`.layout`), the GPT a
raw view shows (:mod:`.gpt`), keys and AES-GCM (:mod:`.crypto`) and the sealed chunks of
the hidden regions (:mod:`.sealed`). Pure encoding: nothing here opens a pool."""
