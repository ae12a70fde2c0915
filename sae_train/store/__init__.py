"""The activation store (Contract 1 in DESIGN.md): shards of activations on disk.

`StoreWriter` publishes shards atomically and resumably from one or many ranks;
`ActivationStore` opens and checks a store; `ShuffledBatches` streams shuffled, rank-split,
resumable batches from it with bounded memory. Knows nothing of models or SAEs.
"""

from sae_train.store.manifest import Manifest, ShardInfo, SiteInfo, merge_manifests
from sae_train.store.reader import ActivationStore
from sae_train.store.shuffle import ShuffledBatches
from sae_train.store.writer import StoreWriter

__all__ = ["ActivationStore", "Manifest", "ShardInfo", "ShuffledBatches", "SiteInfo", "StoreWriter", "merge_manifests"]
