"""A user's own dataset for the Transformers Trainer: the demo's masked-language-modelling sequences with an extra
column the model's forward does not take (an example index, as many datasets carry). The Trainer drops it before
collating (``remove_unused_columns``); anything calling ``model(**batch)`` on the raw items would fail."""

from adapters.frameworks.hf_parts import SyntheticMLM


class IndexedMLM(SyntheticMLM):
    def __getitem__(self, index: int) -> dict:
        return {**super().__getitem__(index), "idx": index}
